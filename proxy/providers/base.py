"""The contract every API shape meets (`Provider`), and the defaults an API that says nothing
else gets (`BaseProvider`).

A provider module answers, for one API shape, everything egress-guard needs to know about
it: which requests are metered calls and what they may cost at most, where a response (JSON,
SSE event, WebSocket message) reports its usage, how much output a stream event carries,
how to end a stream as the API ends one at its output limit, how its errors look, and which
request rewrites metering needs. Pure: no I/O, no mitmproxy.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, Protocol

from egress_guard.pricing import Cost, cost_of
from egress_guard.providers.metered import Metered, input_estimate, reservation
from egress_guard.providers.ws import WsReader
from egress_guard.spend import SpendSettings

__all__ = ["BaseProvider", "Metered", "Provider", "StreamEnd", "StreamUsage", "input_estimate", "reservation"]


def positive_int(value: Any) -> int | None:
    """A token count or a number of completions as a request gives it (else None)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def sse_event(obj: Any, name: str | None = None) -> str:
    """One SSE event (without its blank line), compact JSON as the APIs send it."""
    return (f"event: {name}\n" if name else "") + f"data: {json.dumps(obj, separators=(',', ':'))}"


class StreamUsage:
    """Assembles, from a stream's events, the response object genai-prices reads."""

    def __init__(self) -> None:
        self.response: dict[str, Any] | None = None

    def observe(self, event: dict[str, Any]) -> bool:
        """Take one event; True if it reported usage."""
        return False


class StreamEnd:
    """Follows an SSE stream so that it can be ended cleanly at any point: `closing` are the
    events the API itself sends when a response hits its output limit."""

    def observe(self, event: dict[str, Any]) -> None:
        """Take one event the agent got (what the closing events must continue)."""

    def closing(self, output_tokens: int) -> list[str]:
        return []

    def events(self, note: str, output_tokens: int) -> bytes:
        """A comment naming why, then the API's own end-of-output events."""
        out = [f": egress-guard: {note}", *self.closing(output_tokens)]
        return "".join(line + "\n\n" for line in out).encode()


class Provider(Protocol):
    """One API shape. A new API is one module with a class meeting this, registered in
    egress_guard.providers, plus a table test in tests/providers/."""

    name: str  # as a service's `meter: {api: ...}` names it
    usage_id: str  # the genai-prices provider whose extractors read this API's usage

    def meter(self, path: str, body: Any, body_len: int) -> Metered | None:
        """The metered call a request (path with its query, parsed JSON body or None, body
        length) is, or None for an endpoint that costs nothing (model lists, files...). With
        body None: whether the endpoint is metered at all (before its body is read)."""
        ...

    def rewrite(self, m: Metered, body: Any) -> bool:
        """Change the request body in place so its usage can be read (OpenAI chat streams:
        `stream_options.include_usage`); True if it did. What the change adds to the answer
        (`added`) is then taken out of it, so the agent gets what it asked for."""
        ...

    def added(self, event: dict[str, Any]) -> bool:
        """Whether a stream event is one that only `rewrite` made the upstream send."""
        ...

    def reservation(self, settings: SpendSettings, m: Metered) -> tuple[Decimal, int]:
        """The worst-case cost and tokens of a call before it is sent. Raises Unpriced."""
        ...

    def cost(self, settings: SpendSettings, m: Metered, response: dict[str, Any]) -> Cost | None:
        """What a call cost, from the response object (JSON, assembled from a stream, or a
        WebSocket call's last event); None: no usage in it, or a model with no price."""
        ...

    def stream_usage(self, flavor: str) -> StreamUsage:
        """A fresh reader of a stream's usage events."""
        ...

    def streamed_text(self, flavor: str, event: dict[str, Any]) -> int:
        """Characters of generated output (text, tool arguments, thinking) in one stream event."""
        ...

    def stream_end(self, flavor: str) -> StreamEnd:
        """A fresh follower of a stream that can end it as the API would at its output limit."""
        ...

    def error_body(self, ours: dict[str, Any], status: int) -> dict[str, Any]:
        """A refusal's JSON body in the API's error shape, so its SDKs show egress-guard's
        reason; `ours` is egress-guard's own error object (type, message, rule, request_id)."""
        ...

    def websocket(self, path: str, price_as: str) -> WsReader | None:
        """A reader for one WebSocket connection upgraded at `path`, if its calls can be
        metered (else None)."""
        ...


class BaseProvider:
    """Defaults: nothing metered, nothing rewritten, usage read by genai-prices' extractor of
    `usage_id`, streams followed for nothing, egress-guard's own error shape."""

    name = "default"
    usage_id = ""

    def meter(self, path: str, body: Any, body_len: int) -> Metered | None:
        return None

    def rewrite(self, m: Metered, body: Any) -> bool:
        return False

    def added(self, event: dict[str, Any]) -> bool:
        return False

    def reservation(self, settings: SpendSettings, m: Metered) -> tuple[Decimal, int]:
        return reservation(settings, m)

    def cost(self, settings: SpendSettings, m: Metered, response: dict[str, Any]) -> Cost | None:
        return cost_of(settings, self.usage_id or self.name, m.flavor, response, m.price_as)

    def stream_usage(self, flavor: str) -> StreamUsage:
        return StreamUsage()

    def streamed_text(self, flavor: str, event: dict[str, Any]) -> int:
        return 0

    def stream_end(self, flavor: str) -> StreamEnd:
        return StreamEnd()

    def error_body(self, ours: dict[str, Any], status: int) -> dict[str, Any]:
        return {"error": ours}

    def websocket(self, path: str, price_as: str) -> WsReader | None:
        return None
