"""OpenAI's API shape (and every OpenAI-compatible API: Groq, DeepSeek, OpenRouter, Azure...):
Chat Completions, the Responses API, Completions and Embeddings over HTTP; the Responses
API's WebSocket mode and the Realtime API in providers/openai_ws.py.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from egress_guard.pricing import Cost
from egress_guard.providers.base import BaseProvider, Metered, StreamEnd, StreamUsage, positive_int, sse_event
from egress_guard.providers.openai_ws import REALTIME, reader, realtime_cost, realtime_reservation
from egress_guard.providers.ws import WsReader
from egress_guard.spend import SpendSettings

# matched by their end: OpenAI-compatible APIs put their own prefix before /v1 or instead of
# it (Groq: /openai/v1/chat/completions; OpenRouter: /api/v1/...)
ENDPOINTS = (
    ("/chat/completions", "chat"),
    ("/completions", "chat"),
    ("/responses", "responses"),
    ("/embeddings", "embeddings"),
)


class OpenAI(BaseProvider):
    name = "openai"
    usage_id = "openai"

    def meter(self, path: str, body: Any, body_len: int) -> Metered | None:
        path = path.split("?", 1)[0]
        flavor = next((f for end, f in ENDPOINTS if path.endswith(end)), None)
        if flavor is None:
            return None
        data = body if isinstance(body, dict) else {}
        cap = data.get("max_completion_tokens") or data.get("max_output_tokens") or data.get("max_tokens")
        # each of the completions asked for writes up to the cap
        choices = max(positive_int(data.get("n")) or 1, positive_int(data.get("best_of")) or 1)
        return Metered(
            self.name,
            flavor,
            str(data.get("model", "")),
            positive_int(cap),
            bool(data.get("stream")),
            body_len,
            choices=choices,
        )

    def rewrite(self, m: Metered, body: Any) -> bool:
        """A chat stream reports its usage only when asked (`stream_options.include_usage`)."""
        if m.flavor != "chat" or not m.stream or not isinstance(body, dict):
            return False
        raw = body.get("stream_options")
        options: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if options.get("include_usage"):
            return False
        body["stream_options"] = {**options, "include_usage": True}
        return True

    def added(self, event: dict[str, Any]) -> bool:
        """The extra usage-only chunk sent because of stream_options.include_usage."""
        return bool(event.get("usage")) and event.get("choices") == []

    def reservation(self, settings: SpendSettings, m: Metered) -> tuple[Decimal, int]:
        if m.flavor == REALTIME:
            return realtime_reservation(settings, m)
        return super().reservation(settings, m)

    def cost(self, settings: SpendSettings, m: Metered, response: dict[str, Any]) -> Cost | None:
        if m.flavor == REALTIME:
            return realtime_cost(settings, m.model, response, m.pricing)
        return super().cost(settings, m, response)

    def stream_usage(self, flavor: str) -> StreamUsage:
        return _ResponsesUsage() if flavor == "responses" else _ChatUsage()

    def streamed_text(self, flavor: str, event: dict[str, Any]) -> int:
        if flavor == "responses":
            delta = event.get("delta")
            return len(delta) if isinstance(delta, str) and str(event.get("type", "")).endswith(".delta") else 0
        n = 0
        for choice in event.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            n += sum(
                len(delta[k]) for k in ("content", "refusal", "reasoning_content") if isinstance(delta.get(k), str)
            )
            for call in delta.get("tool_calls") or ():
                args = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
                n += len(args) if isinstance(args, str) else 0
        return n

    def stream_end(self, flavor: str) -> StreamEnd:
        return _ResponsesEnd() if flavor == "responses" else _ChatEnd()

    def error_body(self, ours: dict[str, Any], status: int) -> dict[str, Any]:
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status, ours["type"])
        return {"error": ours | {"code": code, "param": None}}

    def websocket(self, path: str, price_as: str) -> WsReader | None:
        return reader(path, price_as, self.meter)


class _ChatUsage(StreamUsage):
    def observe(self, event: dict[str, Any]) -> bool:
        if event.get("usage"):
            self.response = {"model": event.get("model", ""), "usage": event["usage"]}
            return True
        return False


class _ResponsesUsage(StreamUsage):
    def observe(self, event: dict[str, Any]) -> bool:
        if event.get("type") == "response.completed" and isinstance(event.get("response"), dict):
            self.response = event["response"]
            return True
        return False


class _ChatEnd(StreamEnd):
    """A last chunk with finish_reason "length", then [DONE]."""

    def __init__(self) -> None:
        self.last: dict[str, Any] = {}  # id/created/model of the last chunk

    def observe(self, event: dict[str, Any]) -> None:
        self.last = {k: event[k] for k in ("id", "created", "model") if k in event}

    def closing(self, output_tokens: int) -> list[str]:
        chunk = {"object": "chat.completion.chunk", **self.last}
        return [sse_event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}), "data: [DONE]"]


class _ResponsesEnd(StreamEnd):
    """response.incomplete (max_output_tokens), continuing the stream's sequence numbers."""

    def __init__(self) -> None:
        self.response: dict[str, Any] | None = None  # the response.created object
        self.sequence = 0

    def observe(self, event: dict[str, Any]) -> None:
        if isinstance(event.get("sequence_number"), int):
            self.sequence = event["sequence_number"]
        if event.get("type") == "response.created" and isinstance(event.get("response"), dict):
            self.response = event["response"]

    def closing(self, output_tokens: int) -> list[str]:
        response = dict(self.response or {"object": "response", "output": []})
        response.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        event = {"type": "response.incomplete", "sequence_number": self.sequence + 1, "response": response}
        return [sse_event(event, "response.incomplete")]
