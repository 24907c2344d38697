"""The API shapes egress-guard knows, one module each, behind one contract (base.Provider).

A service names its API in the config (`meter: {api: openai, provider: groq}`): that API's
module meters its calls, reads their usage and shapes its refusals, whatever the service is
called — an OpenAI-compatible service named `groq` answers in OpenAI's error shape. A
service without `meter:` is known by its preset's name (openai, anthropic, google-gemini,
github) or gets egress-guard's own shape.

A new API: a module here with a class meeting `Provider`, one line in APIS, and a table test
in tests/providers/.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from egress_guard.providers.anthropic import Anthropic
from egress_guard.providers.base import BaseProvider, Metered, Provider, input_estimate, reservation
from egress_guard.providers.github import GitHub
from egress_guard.providers.google import Google
from egress_guard.providers.openai import OpenAI
from egress_guard.spend import Meter

if TYPE_CHECKING:
    from egress_guard.credentials import Service

__all__ = [
    "APIS",
    "Metered",
    "Provider",
    "Styles",
    "api_of",
    "error_styles",
    "get",
    "input_estimate",
    "meter",
    "meter_of",
    "reservation",
]

APIS: dict[str, Provider] = {p.name: p for p in (OpenAI(), Anthropic(), Google(), GitHub())}
DEFAULT: Provider = BaseProvider()  # a service of no known API: egress-guard's own error shape

# services of these names are metered even where the config predates `meter:`
METER_OF = {
    "openai": Meter("openai", "openai"),
    "anthropic": Meter("anthropic", "anthropic"),
    "google-gemini": Meter("google", "google"),
}
_PRESET_API = {"github": "github"}  # unmetered presets whose errors have a shape of their own
Styles = dict[str, str]  # host name -> the API (error shape) of its service: a Provider's name


def get(api: str | None) -> Provider:
    """The API shape named `api` (egress-guard's own, for None or an unknown name)."""
    return APIS.get(api or "", DEFAULT)


def meter_of(service: str, declared: Meter | None) -> Meter | None:
    """How a service's calls are metered: as its config declares, else by its preset's name."""
    return declared or METER_OF.get(service)


def api_of(service: str, declared: Meter | None) -> Provider:
    """The API a service speaks, for its error shape: the one its meter names, else its preset's."""
    how = meter_of(service, declared)
    return get(how.api if how is not None else _PRESET_API.get(service))


def meter(api: str, path: str, body: Any, body_len: int, price_as: str = "") -> Metered | None:
    """The metered call a request to an `api`-shaped service is, priced as genai-prices
    provider `price_as` (default: the API's own); None for an unmetered endpoint."""
    m = get(api).meter(path, body, body_len)
    return None if m is None else m.priced_as(price_as)


def error_styles(services: Iterable[Service]) -> Styles:
    """Each service host's error shape: the name of the API its service speaks (`api_of`)."""
    return {host: api_of(s.name, s.meter).name for s in services for host in s.hosts}
