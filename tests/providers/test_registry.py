"""Which API a service speaks: the one its `meter:` declares, else its preset's, else none."""

from __future__ import annotations

import pytest

from egress_guard import providers
from egress_guard.spend import Meter


@pytest.mark.parametrize(
    ("service", "declared", "meter", "api"),
    [
        ("openai", None, Meter("openai", "openai"), "openai"),
        ("anthropic", None, Meter("anthropic", "anthropic"), "anthropic"),
        ("google-gemini", None, Meter("google", "google"), "google"),
        ("github", None, None, "github"),  # unmetered, with an error shape of its own
        ("npm", None, None, "default"),
        # the declared API wins over the name
        ("groq", Meter("openai", "groq"), Meter("openai", "groq"), "openai"),
        ("anthropic", Meter("openai", "openai"), Meter("openai", "openai"), "openai"),
        ("vertex", Meter("google", "google-vertex"), Meter("google", "google-vertex"), "google"),
    ],
)
def test_a_service_speaks_the_api_it_declares(
    service: str, declared: Meter | None, meter: Meter | None, api: str
) -> None:
    assert providers.meter_of(service, declared) == meter
    assert providers.api_of(service, declared).name == api


def test_every_api_is_registered_under_its_name_and_unknown_names_get_the_default() -> None:
    assert {name: p.name for name, p in providers.APIS.items()} == {
        n: n for n in ("openai", "anthropic", "google", "github")
    }
    default = providers.get("no-such-api")
    assert default is providers.get(None) and default.name == "default"
    ours = {"type": "egress_error", "message": "m", "rule": None, "request_id": "i"}
    assert default.error_body(ours, 502) == {"error": ours}
    assert default.meter("/v1/chat/completions", {}, 1) is None


def test_meter_names_the_price_list_only_when_it_is_not_the_apis_own() -> None:
    assert providers.meter("openai", "/v1/chat/completions", {}, 1, "groq").pricing == "groq"
    assert providers.meter("openai", "/v1/chat/completions", {}, 1, "openai").price_as == ""
    assert providers.meter("anthropic", "/v1/models", None, 0, "x") is None
    assert providers.meter("npm", "/v1/chat/completions", {}, 1) is None
