"""Anthropic's Messages API (`/v1/messages`)."""

from __future__ import annotations

from typing import Any

from egress_guard.providers.base import BaseProvider, Metered, StreamEnd, StreamUsage, positive_int, sse_event

# egress-guard's status -> the error type Anthropic's SDKs map to their exceptions
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class Anthropic(BaseProvider):
    name = "anthropic"
    usage_id = "anthropic"

    def meter(self, path: str, body: Any, body_len: int) -> Metered | None:
        if not path.split("?", 1)[0].endswith("/messages"):  # not /messages/count_tokens, /messages/batches
            return None
        data = body if isinstance(body, dict) else {}
        return Metered(
            self.name,
            "default",
            str(data.get("model", "")),
            positive_int(data.get("max_tokens")),
            bool(data.get("stream")),
            body_len,
        )

    def stream_usage(self, flavor: str) -> StreamUsage:
        return _Usage()

    def streamed_text(self, flavor: str, event: dict[str, Any]) -> int:
        delta = event.get("delta") if event.get("type") == "content_block_delta" else None
        if not isinstance(delta, dict):
            return 0
        return sum(len(delta[k]) for k in ("text", "partial_json", "thinking") if isinstance(delta.get(k), str))

    def stream_end(self, flavor: str) -> StreamEnd:
        return _End()

    def error_body(self, ours: dict[str, Any], status: int) -> dict[str, Any]:
        api_type = ERROR_TYPES.get(status, "api_error")
        return {"type": "error", "error": ours | {"type": api_type, "egress_guard": ours["type"]}}


class _Usage(StreamUsage):
    """message_start carries the input's usage, each message_delta the output so far."""

    def observe(self, event: dict[str, Any]) -> bool:
        if event.get("type") == "message_start":
            msg = event.get("message") or {}
            self.response = {"model": msg.get("model", ""), "usage": dict(msg.get("usage") or {})}
            return True
        if event.get("type") == "message_delta" and self.response is not None:
            self.response["usage"].update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            return True
        return False


class _End(StreamEnd):
    """The open content block stopped, a message_delta with stop_reason max_tokens, message_stop."""

    def __init__(self) -> None:
        self.open_block: int | None = None  # the content block being streamed

    def observe(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "content_block_start":
            self.open_block = event.get("index")
        elif kind == "content_block_stop":
            self.open_block = None

    def closing(self, output_tokens: int) -> list[str]:
        out = []
        if self.open_block is not None:
            out.append(sse_event({"type": "content_block_stop", "index": self.open_block}, "content_block_stop"))
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        }
        out.append(sse_event(delta, "message_delta"))
        out.append(sse_event({"type": "message_stop"}, "message_stop"))
        return out
