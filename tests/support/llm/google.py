"""The fake Gemini API: generateContent, and streamGenerateContent as SSE (`alt=sse`) or as
one JSON array (without it)."""

from __future__ import annotations

from support.llm.common import REAL, Fake, FakeAPI, Request


def stream_generate(api: FakeAPI, req: Request) -> None:
    parts = [
        {
            "candidates": [{"content": {"parts": [{"text": "po"}], "role": "model"}}],
            "modelVersion": "gemini-2.5-flash",
            "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": n, "totalTokenCount": 7 + n},
        }
        for n in (1, 2, 3)
    ]
    if req.params.get("alt") != ["sse"]:  # without alt=sse: one JSON array
        api._json(200, parts)
        return
    api._sse_start()
    for part in parts:
        api._event(part)
    api._end()


def generate(api: FakeAPI, req: Request) -> None:
    api._json(
        200,
        {
            "candidates": [{"content": {"parts": [{"text": "pong"}], "role": "model"}}],
            "modelVersion": "gemini-2.5-flash",
            "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3, "totalTokenCount": 10},
        },
    )


FAKE = Fake(
    hosts=("generativelanguage.googleapis.com",),
    # the key in its header or in the query (?key=)
    authorized=lambda req: (
        REAL["google-gemini"] in (req.headers.get("x-goog-api-key"), req.params.get("key", [None])[0])
    ),
    unauthorized={"error": {"code": 401, "message": "API key not valid", "status": "UNAUTHENTICATED"}},
    routes=[
        ("*", "*:streamGenerateContent", stream_generate),
        ("*", "*", generate),
    ],
)
