"""The fake OpenAI API (and Groq's, which is OpenAI's under /openai/v1): model list, chat
completions (JSON and SSE, `include_usage`, a runaway model), embeddings, Responses, and
/v1/slow, a stream that goes on until the test stops it. The "model" writes as many tokens
as it may (max_tokens): costs are predictable."""

from __future__ import annotations

import threading
import time

from support.llm.common import REAL, Fake, FakeAPI, Request


class SlowStream:
    """Controls /v1/slow: events every `interval` seconds until `stop` is set."""

    stop = threading.Event()
    interval = 0.1


def models(api: FakeAPI, req: Request) -> None:
    api._json(
        200,
        {
            "object": "list",
            "data": [{"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "openai"}],
        },
    )


def slow(api: FakeAPI, req: Request) -> None:
    api._sse_start()
    for i in range(200):
        if SlowStream.stop.is_set():
            break
        api._event({"i": i})
        time.sleep(SlowStream.interval)
    api._end()


def embeddings(api: FakeAPI, req: Request) -> None:
    api._json(
        200,
        {
            "object": "list",
            "model": req.body.get("model"),
            "usage": {"prompt_tokens": 8, "total_tokens": 8},
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
        },
    )


def responses(api: FakeAPI, req: Request) -> None:
    body = req.body
    out = body.get("max_output_tokens") or 1
    response = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": body.get("model"),
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "pong", "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": 13,
            "output_tokens": out,
            "total_tokens": 13 + out,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }
    if body.get("stream"):
        api._sse_start()
        started = response | {"status": "in_progress", "output": [], "usage": None}
        api._event({"type": "response.created", "sequence_number": 0, "response": started}, "response.created")
        api._event({"type": "response.completed", "sequence_number": 1, "response": response}, "response.completed")
        api._end()
        return
    api._json(200, response)


def chat_completions(api: FakeAPI, req: Request) -> None:
    body = req.body
    model = body.get("model", "gpt-4o-mini")
    out = body.get("max_completion_tokens") or body.get("max_tokens") or 1
    usage = {"prompt_tokens": 11, "completion_tokens": out, "total_tokens": 11 + out}
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    if body.get("stream"):
        api._sse_start()
        if body.get("x_runaway"):

            def text(t: str) -> None:
                api._event(chunk | {"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]})

            if not api._runaway(body["x_runaway"], text):
                return
            out = body["x_runaway"]
            usage = {"prompt_tokens": 11, "completion_tokens": out, "total_tokens": 11 + out}
        for piece in ("po", "ng"):
            api._event(chunk | {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        api._event(chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            api._event(chunk | {"choices": [], "usage": usage})
        api._event("[DONE]")
        api._end()
        return
    message = {"role": "assistant", "content": "pong"}
    api._json(
        200,
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": usage,
        },
    )


FAKE = Fake(
    hosts=("api.openai.com", "api.groq.com"),
    authorized=lambda req: req.auth == f"Bearer {REAL['openai']}",
    unauthorized={
        "error": {
            "message": "Incorrect API key provided",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    },
    routes=[
        ("*", "/v1/models", models),
        ("*", "/v1/slow", slow),
        ("*", "/v1/embeddings", embeddings),
        ("*", "/v1/responses", responses),
        ("*", "*", chat_completions),  # any other path: /v1/chat/completions, Groq's /openai/v1/…
    ],
)
