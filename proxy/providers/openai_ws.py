"""OpenAI's model calls over WebSocket: the Responses API's WebSocket mode and the Realtime API.

The Responses API's WebSocket mode (`wss://…/v1/responses`, what Codex CLI uses) starts a
call with each `response.create` message and ends it with `response.completed` (or
`.incomplete` / `.failed`, or an `error` event); the Realtime API (`wss://…/v1/realtime`)
ends each response with `response.done`, and with server-side turn detection starts them
itself. Realtime calls are priced with their audio tokens apart from text.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

from egress_guard.pricing import Cost, Unpriced, price
from egress_guard.providers.base import positive_int
from egress_guard.providers.metered import Metered, reservation
from egress_guard.providers.ws import (
    Create,
    Failed,
    Finished,
    SetModel,
    Started,
    Unreadable,
    loose_json,
    obj,
    strict_json,
)
from egress_guard.spend import SpendSettings

RESPONSES = "responses"
REALTIME = "realtime"
API = "openai"

# What a server message must contain to matter to metering: checked before any JSON is
# parsed, so the stream of deltas between them costs one regex search each.
_SERVER_KINDS = re.compile(
    rb'"type"\s*:\s*"(response\.(?:created|completed|incomplete|failed|done)|error|session\.(?:created|updated))"'
)

Meter = Callable[[str, Any, int], Metered | None]


def flavor(path: str) -> str | None:
    """The metered WebSocket API an upgrade to `path` speaks; None if egress-guard cannot meter it."""
    bare = path.split("?", 1)[0].rstrip("/")
    if bare.endswith("/responses"):
        return RESPONSES
    if bare.endswith("/realtime"):
        return REALTIME
    return None


def url_model(path: str) -> str:
    """The Realtime API takes the session's model in the URL (`?model=gpt-realtime`)."""
    _, _, query = path.partition("?")
    return (parse_qs(query).get("model") or [""])[0]


def client_message(
    kind: str, path: str, session_model: str, data: bytes, meter: Meter, price_as: str = ""
) -> Create | SetModel | Unreadable | None:
    """What a text message from the agent means to metering on a `kind` (RESPONSES or
    REALTIME) connection; `meter` is the HTTP API's (what a response.create is)."""
    body = strict_json(data)
    if isinstance(body, Unreadable):
        return body
    what = body.get("type")
    if kind == RESPONSES and what == "response.create":
        # the Responses API's WebSocket mode sends the request's fields next to "type"; an
        # older shape nested them under "response": a model named in both must agree
        nested = body.get("response")
        fields = body
        if isinstance(nested, dict):
            if "model" in nested and "model" in body and nested["model"] != body["model"]:
                return Unreadable("ambiguous message: two different models in one response.create")
            fields = {**nested, **body}
        m = meter(path, fields, len(data))
        if m is None:  # not reached for a /responses path: meter() knows it
            return None
        return Create(replace(m.priced_as(price_as), stream=True), bool(fields.get("previous_response_id")))
    if kind == REALTIME and what == "response.create":
        response = obj(body.get("response"))
        cap = response.get("max_output_tokens") or response.get("max_response_output_tokens")
        m = Metered(API, REALTIME, session_model, positive_int(cap), True, len(data))
        return Create(m.priced_as(price_as), True)
    if kind == REALTIME and what == "session.update":
        model = obj(body.get("session")).get("model")
        if isinstance(model, str) and model:
            return SetModel(model)
    return None


def server_message(kind: str, data: bytes) -> Started | Finished | Failed | SetModel | None:
    """What a message from the upstream means to metering (None: nothing)."""
    if _SERVER_KINDS.search(data) is None:
        return None
    body = loose_json(data)
    if body is None:
        return None
    what = body.get("type")
    response = obj(body.get("response"))
    if what == "response.created":
        return Started()
    if what == "error":
        error = obj(body.get("error"))
        status = body.get("status") or body.get("status_code")
        message = error.get("message") or error.get("code") or "error"
        return Failed(status if isinstance(status, int) else None, str(message)[:200])
    if kind == RESPONSES and what in ("response.completed", "response.incomplete", "response.failed"):
        usage = response if isinstance(response.get("usage"), dict) else None
        return Finished(str(what).removeprefix("response."), usage)
    if kind == REALTIME and what == "response.done":
        usage = {"response": response} if isinstance(response.get("usage"), dict) else None
        return Finished(str(response.get("status") or "completed"), usage)
    if kind == REALTIME and what in ("session.created", "session.updated"):
        model = obj(body.get("session")).get("model")
        if isinstance(model, str) and model:
            return SetModel(model)
    return None


def error_event(status: int, code: str, message: str, retry_after: int | None) -> bytes:
    """An `error` event as both APIs send one, with egress-guard's headers."""
    kind = "egress_denied" if status < 500 else "egress_error"
    event: dict[str, Any] = {
        "type": "error",
        "status": status,
        "error": {"type": kind, "code": code, "message": message, "param": None},
    }
    headers = {"x-egress-guard-decision": "deny" if status < 500 else "error"}
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    event["headers"] = headers
    return json.dumps(event).encode()


def audio_bytes_as_tokens(n: int) -> int:
    """Base64 PCM audio appended to a Realtime input buffer, as input tokens, generously:
    24 kHz 16-bit mono is 64 kB of base64 a second, which the API bills at about 10 tokens."""
    return math.ceil(n / 3200)


class Reader:
    """One connection's messages (a WsReader)."""

    def __init__(self, kind: str, path: str, price_as: str, meter: Meter) -> None:
        self.flavor, self.path, self.price_as, self.meter = kind, path, price_as, meter
        self.model = url_model(path) if kind == REALTIME else ""
        self.server_starts_calls = kind == REALTIME  # server-side turn detection
        self.audio_bytes = 0  # Realtime: input appended since the last response
        self.text_bytes = 0

    def from_agent(self, data: bytes) -> Create | SetModel | Unreadable | None:
        if self.flavor == REALTIME:
            if b"input_audio_buffer.append" in data[:80]:
                self.audio_bytes += len(data)
            else:
                self.text_bytes += len(data)
        return client_message(self.flavor, self.path, self.model, data, self.meter, self.price_as)

    def from_upstream(self, data: bytes) -> Started | Finished | Failed | SetModel | None:
        event = server_message(self.flavor, data)
        if isinstance(event, SetModel):
            self.model = event.model
        elif isinstance(event, Finished) and self.flavor == REALTIME:
            self.audio_bytes = self.text_bytes = 0
        return event

    def pending_tokens(self) -> int:
        return audio_bytes_as_tokens(self.audio_bytes) + self.text_bytes // 3

    def unasked(self) -> Metered:
        return Metered(API, REALTIME, self.model, None, True, 0).priced_as(self.price_as)

    def error_event(self, status: int, code: str, message: str, retry_after: int | None) -> bytes:
        return error_event(status, code, message, retry_after)


def reader(path: str, price_as: str, meter: Meter) -> Reader | None:
    kind = flavor(path)
    return None if kind is None else Reader(kind, path, price_as, meter)


# --- prices ----------------------------------------------------------------------------------


def realtime_reservation(settings: SpendSettings, m: Metered) -> tuple[Decimal, int]:
    """The worst-case cost and tokens of a Realtime call: its prompt and output priced as
    audio, its dearest kind of token (or as text, if genai-prices has no such price)."""
    usd, tokens = reservation(settings, m)
    from genai_prices import Usage, calc_price

    input_tokens = tokens - (m.max_output or settings.default_max_output_tokens)
    output_tokens = tokens - input_tokens
    try:
        worst = Usage(
            input_tokens=input_tokens,
            input_audio_tokens=input_tokens,
            output_tokens=output_tokens,
            output_audio_tokens=output_tokens,
        )
        audio = Decimal(calc_price(worst, m.model, provider_id=m.pricing).total_price)
    except LookupError:
        return usd, tokens
    return max(usd, audio), tokens


def realtime_cost(settings: SpendSettings, model: str, event: dict[str, Any], provider: str = API) -> Cost | None:
    """A Realtime `response.done`'s usage priced with its audio and image tokens apart from
    text (they cost up to 8x as much): genai-prices' own Realtime extractor and prices."""
    from genai_prices import calc_price, data_snapshot

    snapshot = data_snapshot.get_snapshot()
    try:
        found, usage = snapshot.find_provider(None, API, None).extract_usage(
            {"model": model, **event}, api_flavor=REALTIME
        )
    except (ValueError, KeyError, TypeError, LookupError):
        return None
    model = found or model
    inputs, outputs = int(usage.input_tokens or 0), int(usage.output_tokens or 0)
    cached = int(usage.cache_read_tokens or 0)
    given = vars(usage)  # (reading a missing attribute makes genai-prices infer it, or raise)
    if cached and given.get("cache_audio_read_tokens") is None and given.get("cache_text_read_tokens") is None:
        # genai-prices needs cached tokens split by kind when audio is reported; a usage that
        # does not say is taken as cached text (cached audio costs the same or less)
        usage.cache_text_read_tokens, usage.cache_audio_read_tokens = cached, 0
    try:
        usd = Decimal(calc_price(usage, model, provider_id=provider).total_price)
    except (LookupError, ValueError):
        try:  # no price for this model: spend.unknown_model decides (deny -> None)
            usd = price(settings, provider, model, inputs, outputs, cached)
        except Unpriced:
            return None
    return Cost(usd, inputs, outputs, cached, model)
