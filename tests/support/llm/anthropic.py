"""The fake Anthropic Messages API, JSON and SSE (with a runaway model), on any path. The
"model" writes as many tokens as it may (max_tokens): costs are predictable."""

from __future__ import annotations

from support.llm.common import REAL, Fake, FakeAPI, Request


def messages(api: FakeAPI, req: Request) -> None:
    body = req.body
    model = body.get("model", "claude-haiku-4-5")
    out = body.get("max_tokens") or 1
    usage_in = {"input_tokens": 5, "cache_read_input_tokens": 2, "cache_creation_input_tokens": 3}
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage_in | {"output_tokens": 1},
    }
    if body.get("stream"):
        api._sse_start()
        api._event({"type": "message_start", "message": message}, "message_start")
        block = {"type": "text", "text": ""}
        api._event({"type": "content_block_start", "index": 0, "content_block": block}, "content_block_start")
        if body.get("x_runaway"):

            def text(t: str) -> None:
                api._event(
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
                    "content_block_delta",
                )

            if not api._runaway(body["x_runaway"], text):
                return
            out = body["x_runaway"]
        delta = {"type": "text_delta", "text": "pong"}
        api._event({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta")
        api._event({"type": "content_block_stop", "index": 0}, "content_block_stop")
        api._event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": out},
            },
            "message_delta",
        )
        api._event({"type": "message_stop"}, "message_stop")
        api._end()
        return
    api._json(
        200,
        message
        | {
            "content": [{"type": "text", "text": "pong"}],
            "stop_reason": "end_turn",
            "usage": usage_in | {"output_tokens": out},
        },
    )


FAKE = Fake(
    hosts=("api.anthropic.com",),
    # the key in x-api-key, or as a bearer token (as OAuth clients send it)
    authorized=lambda req: REAL["anthropic"] in (req.headers.get("x-api-key"), req.auth.removeprefix("Bearer ")),
    unauthorized={"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
    routes=[("*", "*", messages)],
)
