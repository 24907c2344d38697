"""Metering model calls made over WebSocket: which messages start a call, which end it, and
what it cost.

Over HTTP one request is one call. Over WebSocket one connection carries many: the OpenAI
Responses API's WebSocket mode (`wss://…/v1/responses`, what Codex CLI uses) starts a call
with each `response.create` message and ends it with `response.completed` (or
`.incomplete` / `.failed`, or an `error` event); the Realtime API (`wss://…/v1/realtime`)
ends each response with `response.done`, and with server-side turn detection starts them
itself. This module reads those messages and prices the usage they report; the WebSocket
addon reserves, admits and settles each call with spend.py's ledger as SpendGuard does for
HTTP.

Pure: no I/O, no mitmproxy. It never raises on any message bytes (a message it cannot read
is not a call).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

from egress_guard.spend import Cost, Metered, SpendSettings, Unpriced, cost_of, meter, price, reservation

RESPONSES = "responses"
REALTIME = "realtime"

# What a server message must contain to matter to metering: checked before any JSON is
# parsed, so the stream of deltas between them costs one regex search each.
_SERVER_KINDS = re.compile(
    rb'"type"\s*:\s*"(response\.(?:created|completed|incomplete|failed|done)|error|session\.(?:created|updated))"'
)


def ws_api(api: str, path: str) -> str | None:
    """The metered WebSocket API an upgrade to `path` speaks, for a service whose calls have
    API shape `api` (spend.Meter.api); None if egress-guard cannot meter it."""
    if api != "openai":
        return None
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


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _json(data: bytes) -> dict[str, Any] | None:
    if data[:1] != b"{":
        data = data.lstrip()
        if data[:1] != b"{":
            return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# --- from the agent --------------------------------------------------------------------------


@dataclass(frozen=True)
class Create:
    """A message that starts a metered call."""

    metered: Metered
    carried: bool  # it continues earlier context the server holds (previous_response_id / the session)


@dataclass(frozen=True)
class SetModel:
    """A Realtime `session.update` that changes the session's model."""

    model: str


@dataclass(frozen=True)
class Unreadable:
    """A message egress-guard cannot be sure it reads as the server will: refused. A text
    message that is not one plain JSON object (a lenient server might still run it), or has
    a key twice (which one counts differs between parsers), could start a call unmetered."""

    reason: str


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(f"the key {key!r} appears twice in one object")
            seen.add(key)
    return obj


def client_message(
    api: str, path: str, session_model: str, data: bytes, price_as: str = ""
) -> Create | SetModel | Unreadable | None:
    """What a text message from the agent means to metering (None: nothing that costs).

    Every message is parsed, strictly: a call hidden behind an escape (`response\\u002ecreate`)
    is still a call, and one the server might read differently is refused (Unreadable)."""
    try:
        body = json.loads(data, object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        return Unreadable(f"ambiguous message: {exc}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return Unreadable("the message is not JSON; this API takes JSON messages only")
    if not isinstance(body, dict):
        return Unreadable("the message is not a JSON object; this API takes JSON objects only")
    kind = body.get("type")
    if api == RESPONSES and kind == "response.create":
        # the Responses API's WebSocket mode sends the request's fields next to "type"; an
        # older shape nested them under "response": a model named in both must agree
        nested = body.get("response")
        fields = body
        if isinstance(nested, dict):
            if "model" in nested and "model" in body and nested["model"] != body["model"]:
                return Unreadable("ambiguous message: two different models in one response.create")
            fields = {**nested, **body}
        m = meter("openai", path, fields, len(data), price_as)
        if m is None:  # not reached for a /responses path: meter() knows it
            return None
        return Create(replace(m, stream=True), bool(fields.get("previous_response_id")))
    if api == REALTIME and kind == "response.create":
        response = _obj(body.get("response"))
        cap = response.get("max_output_tokens") or response.get("max_response_output_tokens")
        m = Metered(
            "openai",
            REALTIME,
            session_model,
            cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None,
            True,
            len(data),
            price_as,
        )
        return Create(m, True)
    if api == REALTIME and kind == "session.update":
        model = _obj(body.get("session")).get("model")
        if isinstance(model, str) and model:
            return SetModel(model)
    return None


# --- from the upstream -------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The server began answering the oldest open call."""


@dataclass(frozen=True)
class Finished:
    """The oldest open call ended; `usage` is what genai-prices reads (None: none reported)."""

    status: str  # completed, incomplete, failed, cancelled, ...
    usage: dict[str, Any] | None


@dataclass(frozen=True)
class Failed:
    """An `error` event: the oldest open call was refused (or broke off)."""

    status: int | None
    message: str


def server_message(api: str, data: bytes) -> Started | Finished | Failed | SetModel | None:
    """What a message from the upstream means to metering (None: nothing)."""
    found = _SERVER_KINDS.search(data)
    if found is None:
        return None
    body = _json(data)
    if body is None:
        return None
    kind = body.get("type")
    response = _obj(body.get("response"))
    if kind == "response.created":
        return Started()
    if kind == "error":
        error = _obj(body.get("error"))
        status = body.get("status") or body.get("status_code")
        message = error.get("message") or error.get("code") or "error"
        return Failed(status if isinstance(status, int) else None, str(message)[:200])
    if api == RESPONSES and kind in ("response.completed", "response.incomplete", "response.failed"):
        usage = response if isinstance(response.get("usage"), dict) else None
        return Finished(str(kind).removeprefix("response."), usage)
    if api == REALTIME and kind == "response.done":
        usage = {"response": response} if isinstance(response.get("usage"), dict) else None
        return Finished(str(response.get("status") or "completed"), usage)
    if api == REALTIME and kind in ("session.created", "session.updated"):
        model = _obj(body.get("session")).get("model")
        if isinstance(model, str) and model:
            return SetModel(model)
    return None


# --- prices ----------------------------------------------------------------------------------


def carry(m: Metered, tokens: int) -> Metered:
    """`m` with `tokens` of context the server already holds added to its prompt estimate:
    a response.create that continues a previous response is billed for all of it, though
    the message carries only what is new."""
    return replace(m, input_bytes=m.input_bytes + 3 * tokens) if tokens > 0 else m


def reserve(settings: SpendSettings, m: Metered) -> tuple[Decimal, int]:
    """The worst-case cost and tokens of a call (spend.reservation; a Realtime call's prompt
    and output are priced as audio, its dearest kind of token). Raises Unpriced."""
    usd, tokens = reservation(settings, m)
    if m.flavor != REALTIME:
        return usd, tokens
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


def cost(settings: SpendSettings, m: Metered, usage: dict[str, Any]) -> Cost | None:
    """What a finished call cost, from the usage its last event reported (None: no usage, or
    a model with no price under spend.unknown_model: deny — billed at its reservation)."""
    if m.flavor != REALTIME:
        return cost_of(settings, m.provider, m.flavor, usage, m.price_as)
    return realtime_cost(settings, m.model, usage, m.pricing)


def realtime_cost(settings: SpendSettings, model: str, event: dict[str, Any], provider: str = "openai") -> Cost | None:
    """A Realtime `response.done`'s usage priced with its audio and image tokens apart from
    text (they cost up to 8x as much): genai-prices' own Realtime extractor and prices."""
    from genai_prices import calc_price, data_snapshot

    snapshot = data_snapshot.get_snapshot()
    try:
        found, usage = snapshot.find_provider(None, "openai", None).extract_usage(
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


def carried_tokens(c: Cost | None) -> int:
    """The context a finished call leaves on the server for the next one to continue."""
    return 0 if c is None else c.input_tokens + c.output_tokens


def audio_bytes_as_tokens(n: int) -> int:
    """Base64 PCM audio appended to a Realtime input buffer, as input tokens, generously:
    24 kHz 16-bit mono is 64 kB of base64 a second, which the API bills at about 10 tokens."""
    return math.ceil(n / 3200)
