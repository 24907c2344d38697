"""What WebSocket messages mean to metering, whatever the API: the events a provider's
`WsReader` reads out of them, and the strict JSON every one of them is parsed with.

Over HTTP one request is one call. Over WebSocket one connection carries many: an API's
reader says which message from the agent starts one (`Create`), which from the upstream
begins (`Started`) or ends it (`Finished`, `Failed`). egress_guard.ws_meter keeps the
connection's calls; the WebSocket addon admits, refuses and records them.

Pure: no I/O, no mitmproxy. A reader never raises on any message bytes (a message it
cannot read is not a call, or, from the agent, refused as Unreadable).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from egress_guard.providers.metered import Metered

# --- from the agent --------------------------------------------------------------------------


@dataclass(frozen=True)
class Create:
    """A message that starts a metered call."""

    metered: Metered
    carried: bool  # it continues earlier context the server holds (previous_response_id / the session)


@dataclass(frozen=True)
class SetModel:
    """A message that changes the session's model (from the agent: to be allowed first)."""

    model: str


@dataclass(frozen=True)
class Unreadable:
    """A message egress-guard cannot be sure it reads as the server will: refused. A text
    message that is not one plain JSON object (a lenient server might still run it), or has
    a key twice (which one counts differs between parsers), could start a call unmetered."""

    reason: str


# --- from the upstream -------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The server began answering the oldest open call."""


@dataclass(frozen=True)
class Finished:
    """The oldest open call ended; `usage` is what the provider's `cost` reads (None: none reported)."""

    status: str  # completed, incomplete, failed, cancelled, ...
    usage: dict[str, Any] | None


@dataclass(frozen=True)
class Failed:
    """An `error` event: the oldest open call was refused (or broke off)."""

    status: int | None
    message: str


class WsReader(Protocol):
    """One WebSocket connection's messages, read as one API's (Provider.websocket makes it)."""

    flavor: str  # the calls' genai-prices api_flavor
    model: str  # the session's model, where the API keeps one ("" otherwise)
    server_starts_calls: bool  # the server may answer unasked (the budget then closes the connection)

    def from_agent(self, data: bytes) -> Create | SetModel | Unreadable | None:
        """What a text message from the agent means (None: nothing that costs)."""
        ...

    def from_upstream(self, data: bytes) -> Started | Finished | Failed | SetModel | None:
        """What a text message from the upstream means (None: nothing)."""
        ...

    def pending_tokens(self) -> int:
        """Input the agent added to the session since the last response ended, as tokens: the
        next call that continues the session is billed for it."""
        ...

    def unasked(self) -> Metered:
        """The call the server started by itself (server_starts_calls)."""
        ...

    def error_event(self, status: int, code: str, message: str, retry_after: int | None) -> bytes:
        """The message that tells the agent one of its messages was refused, in the API's shape."""
        ...


# --- parsing -----------------------------------------------------------------------------------


def obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def loose_json(data: bytes) -> dict[str, Any] | None:
    """A JSON object, or None: for the upstream's messages (read, never trusted)."""
    if data[:1] != b"{":
        data = data.lstrip()
        if data[:1] != b"{":
            return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(f"the key {key!r} appears twice in one object")
            seen.add(key)
    return found


def strict_json(data: bytes) -> dict[str, Any] | Unreadable:
    """An agent's message as one plain JSON object, or why it is refused. Every message is
    parsed (a call hidden behind an escape, `response\\u002ecreate`, is still a call), and
    strictly: one the server might read differently is Unreadable."""
    try:
        body = json.loads(data, object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        return Unreadable(f"ambiguous message: {exc}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return Unreadable("the message is not JSON; this API takes JSON messages only")
    if not isinstance(body, dict):
        return Unreadable("the message is not a JSON object; this API takes JSON objects only")
    return body
