"""Spend: what a request may cost at most and what it did cost (the ledger that holds
budgets and rate limits against these is egress_guard.ledger).

Pure except for genai-prices' bundled price snapshot (no network).
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import functools
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

log = logging.getLogger("egress_guard")
MTOK = Decimal(1_000_000)


@dataclass(frozen=True)
class SessionLimits:
    """A config override for the sessions whose id matches `glob`: their session budget
    and/or their model allowlists (per service) replace the agent's."""

    glob: str
    budget_usd: Decimal | None = None
    models: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent: int | None = None
    budget_session: Decimal | None = None
    budget_day: Decimal | None = None
    budget_total: Decimal | None = None
    models: dict[str, tuple[str, ...]] = field(default_factory=dict)  # service -> globs
    sessions: tuple[SessionLimits, ...] = ()  # first match wins

    def session(self, session: str) -> SessionLimits | None:
        """The config override for this session id, if one matches."""
        return next((s for s in self.sessions if fnmatch.fnmatchcase(session, s.glob)), None)


@dataclass(frozen=True)
class SpendSettings:
    timezone: str = "UTC"
    unknown_model: str = "deny"  # or "fallback"
    fallback_input_per_mtok: Decimal = Decimal(0)
    fallback_output_per_mtok: Decimal = Decimal(0)
    default_max_output_tokens: int = 4096
    on_overrun: str = "finish"  # or "cut": end an SSE stream cleanly when it crosses a budget

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


# --- what a request is ---------------------------------------------------------------------


@dataclass(frozen=True)
class Meter:
    """How a service's calls are metered: its API's shape (which endpoints, where usage is)
    and the genai-prices provider id that prices them (an OpenAI-compatible API can be priced
    as groq, deepseek, azure, ...)."""

    api: str
    provider: str


# services of these names are metered even where the config predates `meter:`
METER_OF = {"openai": Meter("openai", "openai"), "anthropic": Meter("anthropic", "anthropic")}
METER_OF["google-gemini"] = Meter("google", "google")
_GEMINI_PATH = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent|embedContent)$")
_OPENAI_ENDS = (
    ("/chat/completions", "chat"),
    ("/completions", "chat"),
    ("/responses", "responses"),
    ("/embeddings", "embeddings"),
)


@dataclass(frozen=True)
class Metered:
    provider: str  # the API's shape: openai, anthropic or google (also how usage is extracted)
    flavor: str  # genai-prices api_flavor
    model: str
    max_output: int | None  # what the client capped the output at, if it did
    stream: bool
    input_bytes: int
    price_as: str = ""  # the genai-prices provider id that prices it ("": the API's own)
    choices: int = 1  # completions asked for (OpenAI n / best_of, Gemini candidateCount)

    @property
    def pricing(self) -> str:
        return self.price_as or self.provider


def meter(provider: str, path: str, body: Any, body_len: int, price_as: str = "") -> Metered | None:
    """The metered call a request is, or None for an unmetered endpoint (model lists, files...)."""
    m = _meter(provider, path, body, body_len)
    return m if m is None or not price_as or price_as == provider else replace(m, price_as=price_as)


def _meter(provider: str, path: str, body: Any, body_len: int) -> Metered | None:
    path = path.split("?", 1)[0]
    data = body if isinstance(body, dict) else {}
    # matched by their end: OpenAI-compatible APIs put their own prefix before /v1 or instead
    # of it (Groq: /openai/v1/chat/completions; OpenRouter: /api/v1/...)
    if provider == "openai":
        flavor = next((f for end, f in _OPENAI_ENDS if path.endswith(end)), None)
        if flavor is None:
            return None
        cap = data.get("max_completion_tokens") or data.get("max_output_tokens") or data.get("max_tokens")
        choices = max(_int(data.get("n")) or 1, _int(data.get("best_of")) or 1)  # each one writes up to cap
        return Metered(
            provider, flavor, str(data.get("model", "")), _int(cap), bool(data.get("stream")), body_len, choices=choices
        )
    if provider == "anthropic":
        if not path.endswith("/messages"):
            return None
        return Metered(
            provider,
            "default",
            str(data.get("model", "")),
            _int(data.get("max_tokens")),
            bool(data.get("stream")),
            body_len,
        )
    if provider == "google":
        m = _GEMINI_PATH.search(path)
        if not m:
            return None
        config = data.get("generationConfig") or {}
        config = config if isinstance(config, dict) else {}
        return Metered(
            provider,
            "default",
            m.group(1),
            _int(config.get("maxOutputTokens")),
            m.group(2) == "streamGenerateContent",
            body_len,
            choices=_int(config.get("candidateCount")) or 1,
        )
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def allowed_models(limits: Limits, service: str, session: str) -> tuple[str, ...] | None:
    """The model globs that apply to this service and session (None: any model)."""
    override = limits.session(session)
    if override is not None and service in override.models:
        return override.models[service]
    return limits.models.get(service)


def model_allowed(limits: Limits, service: str, model: str, session: str = "") -> bool:
    globs = allowed_models(limits, service, session)
    return globs is None or any(fnmatch.fnmatchcase(model, g) for g in globs)


# --- prices ------------------------------------------------------------------------------


class Unpriced(Exception):
    """No price is known for the model (and the config says deny)."""


@dataclass(frozen=True)
class Cost:
    usd: Decimal
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    model: str


@functools.lru_cache(maxsize=8192)
def _calc(
    provider: str, model: str, input_tokens: int, output_tokens: int, cache_read: int, cache_write: int, day: str
) -> Decimal | None:
    """genai-prices for one usage, memoised: a pure function of its arguments for a given day
    (the snapshot is bundled; `day` keeps date-dependent prices right). None: unknown model."""
    from genai_prices import Usage, calc_price

    usage = Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read or None,
        cache_write_tokens=cache_write or None,
    )
    try:
        return Decimal(calc_price(usage, model, provider_id=provider).total_price)
    except LookupError:
        return None


_FALLBACK_LOGGED: set[tuple[str, str]] = set()


def price(
    settings: SpendSettings,
    provider: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_read: int = 0,
    cache_write: int = 0,
) -> Decimal:
    day = datetime.datetime.now(datetime.UTC).date().isoformat()
    usd = _calc(provider, model, input_tokens, output_tokens, cache_read, cache_write, day)
    if usd is not None:
        return usd
    if settings.unknown_model != "fallback":
        raise Unpriced(f"no price is known for model {model!r} at {provider} (spend.unknown_model: deny)")
    if (provider, model) not in _FALLBACK_LOGGED:  # once per model: it repeats on every call
        _FALLBACK_LOGGED.add((provider, model))
        log.warning(
            "no price is known for model %r at %s: pricing it at spend.fallback_price (%s in, %s out per MTok)",
            model,
            provider,
            settings.fallback_input_per_mtok,
            settings.fallback_output_per_mtok,
        )
    return (settings.fallback_input_per_mtok * input_tokens + settings.fallback_output_per_mtok * output_tokens) / MTOK


def input_estimate(m: Metered) -> int:
    """The prompt's tokens at most: one per 3 bytes of body (an overestimate for text),
    rounded up to a multiple of 256 (even safer, and the price cache can reuse it)."""
    return math.ceil((m.input_bytes / 3 + 16) / 256) * 256


def reservation(settings: SpendSettings, m: Metered) -> tuple[Decimal, int]:
    """Worst-case cost and tokens of a request before it is sent: the prompt estimated at one
    token per 3 bytes of body (an overestimate for text), the output at the client's cap or
    the configured default, for each of the completions it asks for."""
    input_tokens = input_estimate(m)
    output_tokens = 0 if m.flavor == "embeddings" else (m.max_output or settings.default_max_output_tokens) * m.choices
    return price(settings, m.pricing, m.model, input_tokens, output_tokens), input_tokens + output_tokens


@functools.lru_cache(maxsize=64)
def _usage_keys(provider: str, flavor: str) -> tuple[str, ...] | None:
    """The top-level keys of a response that genai-prices' extractor reads (its usage root and
    model path), or None if it has no extractor for this flavor."""
    from genai_prices import data_snapshot

    found = data_snapshot.get_snapshot().find_provider(None, provider, None)
    for e in found.extractors or ():
        if e.api_flavor == flavor:
            root = e.root if isinstance(e.root, str) else e.root[0]
            model = e.model_path if isinstance(e.model_path, str) else e.model_path[0]
            return (root, model) if isinstance(root, str) and isinstance(model, str) else None
    return None


def cost_of(settings: SpendSettings, provider: str, flavor: str, response: dict, price_as: str = "") -> Cost | None:
    """The real cost of a provider response (or of the response object a stream assembled):
    usage read as `provider`'s API shape, priced as `price_as` (default: that provider).

    Memoised on the part of the response genai-prices reads: usage blocks repeat (the same
    model, the same token counts), and extraction is most of what pricing a call costs."""
    keys = _usage_keys(provider, flavor)
    if keys is None:
        return _cost_of(settings, provider, flavor, response, price_as)
    try:
        seen = json.dumps([response.get(k) for k in keys], sort_keys=True)
    except (TypeError, ValueError):
        return _cost_of(settings, provider, flavor, response, price_as)
    day = datetime.datetime.now(datetime.UTC).date().isoformat()
    return _cost_of_seen(settings, provider, flavor, seen, price_as, day)


@functools.lru_cache(maxsize=4096)
def _cost_of_seen(
    settings: SpendSettings, provider: str, flavor: str, seen: str, price_as: str, day: str
) -> Cost | None:
    keys = _usage_keys(provider, flavor)
    assert keys is not None
    response = {k: v for k, v in zip(keys, json.loads(seen), strict=True) if v is not None}
    return _cost_of(settings, provider, flavor, response, price_as)


def _cost_of(settings: SpendSettings, provider: str, flavor: str, response: dict, price_as: str) -> Cost | None:
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    try:
        # the provider's extractor alone: it reads the usage even of a model it does not list
        model_ref, u = snapshot.find_provider(None, provider, None).extract_usage(response, api_flavor=flavor)
    except (ValueError, KeyError, TypeError, LookupError):
        return None
    tokens = {
        k: int(getattr(u, k) or 0) for k in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
    }
    pid = price_as or provider
    model = model_ref or str(response.get("model") or response.get("modelVersion") or "")
    with contextlib.suppress(LookupError, ValueError):  # the model's id as the price list names it
        model = snapshot.find_provider_model(model, None, pid, None)[1].id
    try:
        usd = price(
            settings,
            pid,
            model,
            tokens["input_tokens"],
            tokens["output_tokens"],
            tokens["cache_read_tokens"],
            tokens["cache_write_tokens"],
        )
    except Unpriced:
        return None  # the response names a model with no price: billed at its reservation
    return Cost(
        usd,
        tokens["input_tokens"],
        tokens["output_tokens"],
        tokens["cache_read_tokens"] + tokens["cache_write_tokens"],
        model,
    )


# --- streams ------------------------------------------------------------------------------


class SSEEvents:
    """Splits a byte stream into complete SSE events (any of \\n, \\r\\n, \\r line ends;
    multi-line data joined with \\n). Keeps an incomplete event for the next feed."""

    _BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> Iterator[tuple[bytes, str | None, str]]:
        """(raw event bytes incl. its blank line, event name, data) for each complete event."""
        self.pending += data
        while True:
            m = self._BOUNDARY.search(self.pending)
            if not m:
                return
            raw, self.pending = self.pending[: m.end()], self.pending[m.end() :]
            name, lines = None, []
            for line in re.split(rb"\r\n|\n|\r", raw[: m.start()]):
                key, _, value = line.partition(b":")
                value = value[1:] if value.startswith(b" ") else value
                if key == b"data":
                    lines.append(value.decode("utf-8", "replace"))
                elif key == b"event":
                    name = value.decode("utf-8", "replace")
            yield raw, name, "\n".join(lines)

    def rest(self) -> bytes:
        out, self.pending = self.pending, b""
        return out


class UsageFromStream:
    """Assembles, from a provider's stream events, the response object genai-prices reads."""

    def __init__(self, provider: str, flavor: str) -> None:
        self.provider, self.flavor = provider, flavor
        self.response: dict[str, Any] | None = None

    def observe(self, data: dict[str, Any]) -> bool:
        """Take one event; True if it reported usage."""
        p = self.provider
        if p == "openai" and self.flavor == "responses":
            if data.get("type") == "response.completed" and isinstance(data.get("response"), dict):
                self.response = data["response"]
                return True
        elif p == "openai":
            if data.get("usage"):
                self.response = {"model": data.get("model", ""), "usage": data["usage"]}
                return True
        elif p == "anthropic":
            if data.get("type") == "message_start":
                msg = data.get("message") or {}
                self.response = {"model": msg.get("model", ""), "usage": dict(msg.get("usage") or {})}
                return True
            if data.get("type") == "message_delta" and self.response is not None:
                self.response["usage"].update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
                return True
        elif p == "google" and data.get("usageMetadata"):
            self.response = {"modelVersion": data.get("modelVersion", ""), "usageMetadata": data["usageMetadata"]}
            return True
        return False


def streamed_text(provider: str, flavor: str, data: dict[str, Any]) -> int:
    """Characters of generated output (text, tool arguments, thinking) in one stream event."""
    n = 0
    if provider == "openai" and flavor == "responses":
        delta = data.get("delta")
        return len(delta) if isinstance(delta, str) and str(data.get("type", "")).endswith(".delta") else 0
    if provider == "openai":
        for choice in data.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            n += sum(
                len(delta[k]) for k in ("content", "refusal", "reasoning_content") if isinstance(delta.get(k), str)
            )
            for call in delta.get("tool_calls") or ():
                args = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
                n += len(args) if isinstance(args, str) else 0
    elif provider == "anthropic":
        delta = data.get("delta") if data.get("type") == "content_block_delta" else None
        if isinstance(delta, dict):
            n += sum(len(delta[k]) for k in ("text", "partial_json", "thinking") if isinstance(delta.get(k), str))
    elif provider == "google":
        for cand in data.get("candidates") or ():
            parts = ((cand.get("content") or {}).get("parts") or ()) if isinstance(cand, dict) else ()
            n += sum(len(p["text"]) for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
    return n


class RunningCost:
    """What a stream has cost so far, while it runs: the last usage the provider reported
    (Anthropic's message_start, every Gemini chunk), else the reservation's prompt estimate,
    plus the output streamed since, at one token per 4 characters (at least one per event).
    An estimate: it decides when a stream is ended (`spend.on_overrun: cut`), and is what
    such a stream is billed unless the upstream still reports its usage."""

    def __init__(self, settings: SpendSettings, m: Metered) -> None:
        self.settings, self.m = settings, m
        self.input_tokens = input_estimate(m)
        self.base = price(settings, m.pricing, m.model, self.input_tokens, 0)
        self.per_output = (price(settings, m.pricing, m.model, self.input_tokens, 1_000_000) - self.base) / MTOK
        self.reported: Cost | None = None
        self.output_since = 0  # tokens streamed since the last usage report

    def observe(self, data: dict[str, Any], usage: dict[str, Any] | None) -> bool:
        """One event; `usage` is the response object if this event reported usage. True if
        the event carried generated output (only those can be followed by more)."""
        chars = streamed_text(self.m.provider, self.m.flavor, data)
        if chars:
            self.output_since += max(1, math.ceil(chars / 4))
        if usage is not None:
            cost = cost_of(self.settings, self.m.provider, self.m.flavor, usage, self.m.price_as)
            if cost is not None:
                self.reported, self.output_since = cost, 0
        return chars > 0

    @property
    def output_tokens(self) -> int:
        return (self.reported.output_tokens if self.reported else 0) + self.output_since

    @property
    def usd(self) -> Decimal:
        return (self.reported.usd if self.reported else self.base) + self.per_output * self.output_since

    def cost(self) -> Cost:
        r = self.reported
        return Cost(
            self.usd,
            r.input_tokens if r else self.input_tokens,
            self.output_tokens,
            r.cached_tokens if r else 0,
            r.model if r else self.m.model,
        )


class StreamEnd:
    """Follows a provider's SSE stream so that it can be ended cleanly at any point: the
    closing events the provider itself sends when a response hits its output limit."""

    def __init__(self, provider: str, flavor: str) -> None:
        self.provider, self.flavor = provider, flavor
        self.last: dict[str, Any] = {}  # OpenAI chat: id/created/model of the last chunk
        self.response: dict[str, Any] | None = None  # Responses API: the response.created object
        self.sequence = 0
        self.open_block: int | None = None  # Anthropic: the content block being streamed

    def observe(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if self.provider == "openai" and self.flavor == "responses":
            if isinstance(data.get("sequence_number"), int):
                self.sequence = data["sequence_number"]
            if kind == "response.created" and isinstance(data.get("response"), dict):
                self.response = data["response"]
        elif self.provider == "openai":
            self.last = {k: data[k] for k in ("id", "created", "model") if k in data}
        elif self.provider == "anthropic":
            if kind == "content_block_start":
                self.open_block = data.get("index")
            elif kind == "content_block_stop":
                self.open_block = None
        elif self.provider == "google" and data.get("modelVersion"):
            self.last = {"modelVersion": data["modelVersion"]}

    def events(self, note: str, output_tokens: int) -> bytes:
        """A comment naming why, then the provider's own end-of-output events."""
        out = [f": egress-guard: {note}"]

        def event(obj: Any, name: str | None = None) -> None:
            out.append((f"event: {name}\n" if name else "") + f"data: {json.dumps(obj, separators=(',', ':'))}")

        if self.provider == "openai" and self.flavor == "responses":
            response = dict(self.response or {"object": "response", "output": []})
            response.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
            event(
                {"type": "response.incomplete", "sequence_number": self.sequence + 1, "response": response},
                "response.incomplete",
            )
        elif self.provider == "openai":
            chunk = {"object": "chat.completion.chunk", **self.last}
            event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            out.append("data: [DONE]")
        elif self.provider == "anthropic":
            if self.open_block is not None:
                event({"type": "content_block_stop", "index": self.open_block}, "content_block_stop")
            event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                },
                "message_delta",
            )
            event({"type": "message_stop"}, "message_stop")
        elif self.provider == "google":
            candidate = {
                "content": {"parts": [{"text": ""}], "role": "model"},
                "finishReason": "MAX_TOKENS",
                "index": 0,
            }
            event({"candidates": [candidate], **self.last})
        return "".join(line + "\n\n" for line in out).encode()


def is_usage_only_chunk(data: dict[str, Any]) -> bool:
    """OpenAI's extra chunk sent because of stream_options.include_usage."""
    return bool(data.get("usage")) and data.get("choices") == []


def decode_event(text: str) -> dict[str, Any] | None:
    if not text or text == "[DONE]":
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
