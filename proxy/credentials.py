"""Credentialed services and the pure logic of the swap: where a service's credential
travels, how to find the agent's fake key there, and what to call every other credential.

No I/O and no mitmproxy: the addon hands in header and query values and gets back a
`CredentialCheck`; the key table and the secret store are consulted by the addon.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from egress_guard.fakekeys import KeyShape, parse_key
from egress_guard.forms import views
from egress_guard.secrets import SecretRef
from egress_guard.spend import Limits, Meter


@dataclass(frozen=True)
class Slot:
    """One place a credential travels: a header (optionally `Scheme value`), a query
    parameter, or HTTP basic auth (the secret is the password)."""

    kind: Literal["header", "query", "basic"]
    name: str  # header name (lowercase) or query parameter
    scheme: str | None = None  # e.g. "Bearer"
    username: str = ""  # basic auth

    def describe(self) -> str:
        if self.kind == "query":
            return f"query parameter {self.name}"
        if self.kind == "basic":
            return "HTTP basic auth"
        return f"header {self.name}" + (f" ({self.scheme} …)" if self.scheme else "")


@dataclass(frozen=True)
class Service:
    name: str
    hosts: frozenset[str]
    slots: tuple[Slot, ...]
    shape: KeyShape
    env_var: str
    secret: SecretRef
    anonymous: bool = False
    meter: Meter | None = None  # how its calls are priced (None: not metered)
    websocket: bool = True  # False: WebSocket upgrades to its hosts are refused


@dataclass(frozen=True)
class Agent:
    name: str
    services: tuple[str, ...]
    limits: Limits = field(default_factory=Limits)


class Credential(StrEnum):
    """The credential decision recorded in the audit log."""

    SWAPPED = "swapped"
    ANONYMOUS = "anonymous"
    MISSING = "denied-missing"
    FORGED = "denied-forged"
    EXPIRED = "denied-expired"
    REVOKED = "denied-revoked"
    WRONG_SERVICE = "denied-wrong-service"
    NOT_PERMITTED = "denied-agent-not-permitted"
    FOREIGN = "denied-foreign-key"
    UNBOUND_HOST = "denied-unbound-host"
    CLEARTEXT = "denied-cleartext"
    UNREADABLE = "denied-unreadable-body"
    UNAVAILABLE = "error-secret-unavailable"
    STORE_UNAVAILABLE = "error-store-unavailable"  # the key's record, or that it is unrevoked, cannot be confirmed


@dataclass(frozen=True)
class Found:
    """A credential the agent sent: where, and the bare value (scheme stripped)."""

    slot: Slot
    value: str
    scheme: str | None = None  # the scheme word the agent used, kept on injection


def _split_scheme(value: str) -> tuple[str | None, str]:
    parts = value.strip().split(None, 1)
    if len(parts) == 2 and re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", parts[0]):
        return parts[0], parts[1].strip()
    return None, value.strip()


def find_credentials(service: Service, headers: dict[str, list[str]], query: dict[str, list[str]]) -> list[Found]:
    """Every credential the request carries in the service's slots. `headers` keys are lowercase."""
    found: list[Found] = []
    for slot in service.slots:
        if slot.kind == "query":
            found.extend(Found(slot, v) for v in query.get(slot.name, []))
        elif slot.kind == "basic":
            for v in headers.get("authorization", []):
                scheme, rest = _split_scheme(v)
                if scheme and scheme.lower() == "basic":
                    try:
                        user_pass = base64.b64decode(rest, validate=True).decode()
                    except (binascii.Error, UnicodeDecodeError):
                        continue
                    found.append(Found(slot, user_pass.partition(":")[2], "Basic"))
        else:
            for v in headers.get(slot.name, []):
                scheme, rest = _split_scheme(v) if slot.scheme else (None, v.strip())
                if slot.scheme and scheme and scheme.lower() == "basic":
                    continue
                found.append(Found(slot, rest, scheme))
    # the same value in two slots of one request is one credential
    unique: dict[tuple[Slot, str], Found] = {(f.slot, f.value): f for f in found}
    return list(unique.values())


def header_value(slot: Slot, secret: str, scheme: str | None) -> str:
    if slot.kind == "basic":
        return "Basic " + base64.b64encode(f"{slot.username}:{secret}".encode()).decode()
    word = scheme or slot.scheme
    return f"{word} {secret}" if word else secret


def identify(hmac_key: bytes, services: Iterable[Service], value: str) -> tuple[Service, str] | None:
    """(service, key id) if `value` is a genuine fake key of one of `services`."""
    for service in services:
        key_id = parse_key(hmac_key, service.shape, service.name, value)
        if key_id is not None:
            return service, key_id
    return None


class FakeKeyScanner:
    """Finds genuine fake keys of any service inside arbitrary bytes (headers, URLs, bodies),
    also percent-encoded, JSON-escaped, hex or base64 (egress_guard.forms.views)."""

    def __init__(self, hmac_key: bytes, services: Iterable[Service]) -> None:
        self.hmac_key = hmac_key
        self.services = tuple(services)
        patterns = sorted({s.shape.pattern() for s in self.services}, key=len, reverse=True)
        self._regex = re.compile("|".join(f"(?:{p})" for p in patterns).encode()) if patterns else None
        lengths = [len(s.shape.prefix) + s.shape.length + len(s.shape.suffix) for s in self.services]
        self.max_len = max(lengths, default=0)
        self.min_len = min(lengths, default=0)
        # how much of a body's tail to keep between streamed pieces: a key in its longest
        # encoding (hex of it, JSON-escaped: 12 bytes a character) may straddle two pieces
        self.window = 12 * self.max_len + 8
        # a decoded view is searched with the key regex only if it holds some key's prefix
        # (most of a 1 MB base64 image's decodings do not)
        prefixes = {s.shape.prefix.encode() for s in self.services}
        self._prefixes = tuple(prefixes) if all(prefixes) else ()

    def scan(self, data: bytes) -> list[tuple[Service, str]]:
        if self._regex is None or not data:
            return []
        hits = []
        for view in views(data, self.min_len):
            if self._prefixes and not any(p in view for p in self._prefixes):
                continue
            for match in self._regex.finditer(view):
                hit = identify(self.hmac_key, self.services, match.group().decode("latin-1"))
                if hit is not None:
                    hits.append(hit)
        return hits
