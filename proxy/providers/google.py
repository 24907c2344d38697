"""Google's Gemini API (generateContent, streamGenerateContent, embedContent), also as Vertex
AI serves it (`/v1/projects/…/publishers/google/models/…`)."""

from __future__ import annotations

import re
from typing import Any

from egress_guard.providers.base import BaseProvider, Metered, StreamEnd, StreamUsage, positive_int, sse_event

PATH = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent|embedContent)$")
# egress-guard's status -> Google's canonical error status
STATUS_TEXT = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED"}


class Google(BaseProvider):
    name = "google"
    usage_id = "google"

    def meter(self, path: str, body: Any, body_len: int) -> Metered | None:
        m = PATH.search(path.split("?", 1)[0])
        if not m:
            return None
        data = body if isinstance(body, dict) else {}
        config = data.get("generationConfig") or {}
        config = config if isinstance(config, dict) else {}
        return Metered(
            self.name,
            "default",
            m.group(1),
            positive_int(config.get("maxOutputTokens")),
            m.group(2) == "streamGenerateContent",
            body_len,
            choices=positive_int(config.get("candidateCount")) or 1,
        )

    def stream_usage(self, flavor: str) -> StreamUsage:
        return _Usage()

    def streamed_text(self, flavor: str, event: dict[str, Any]) -> int:
        n = 0
        for cand in event.get("candidates") or ():
            parts = ((cand.get("content") or {}).get("parts") or ()) if isinstance(cand, dict) else ()
            n += sum(len(p["text"]) for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
        return n

    def stream_end(self, flavor: str) -> StreamEnd:
        return _End()

    def error_body(self, ours: dict[str, Any], status: int) -> dict[str, Any]:
        status_text = STATUS_TEXT.get(status, "UNAVAILABLE")
        return {"error": {"code": status, "message": ours["message"], "status": status_text, "egress_guard": ours}}


class _Usage(StreamUsage):
    """Every chunk reports the usage so far: the last one counts."""

    def observe(self, event: dict[str, Any]) -> bool:
        if event.get("usageMetadata"):
            self.response = {"modelVersion": event.get("modelVersion", ""), "usageMetadata": event["usageMetadata"]}
            return True
        return False


class _End(StreamEnd):
    """A last chunk whose candidate's finishReason is MAX_TOKENS."""

    def __init__(self) -> None:
        self.last: dict[str, Any] = {}

    def observe(self, event: dict[str, Any]) -> None:
        if event.get("modelVersion"):
            self.last = {"modelVersion": event["modelVersion"]}

    def closing(self, output_tokens: int) -> list[str]:
        candidate = {"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": "MAX_TOKENS", "index": 0}
        return [sse_event({"candidates": [candidate], **self.last})]
