"""The stream tap on its own: SSE framing, usage read as events pass, the added usage chunk
taken out, and a stream ended with each API's own closing events when it crosses a budget."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal

import pytest

from egress_guard import providers
from egress_guard.pricing import Cost
from egress_guard.providers.stream import Overrun, RunningCost, SSEEvents, StreamTap
from egress_guard.spend import SpendSettings

SETTINGS = SpendSettings()


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"])
def test_sse_events_any_line_ending_split_anywhere_multiline_data(sep: bytes) -> None:
    stream = (
        b"event: a"
        + sep
        + b'data: {"x":'
        + sep
        + b"data: 1}"
        + sep
        + sep
        + b": comment"
        + sep
        + b"data: [DONE]"
        + sep
        + sep
    )
    parser = SSEEvents()
    events = []
    for i in range(len(stream)):  # one byte at a time: events split at every possible point
        events.extend(parser.feed(stream[i : i + 1]))
    assert [(name, data) for _, name, data in events] == [("a", '{"x":\n1}'), (None, "[DONE]")]
    assert b"".join(raw for raw, _, _ in events) == stream


def _as_stream(tap: StreamTap) -> Callable[[bytes], bytes]:
    """The tap as mitmproxy's stream sees it: b"" is the end."""
    return lambda data: tap(data, data == b"")


def _sse(obj: dict, event: str | None = None) -> bytes:
    return ((f"event: {event}\n" if event else "") + f"data: {json.dumps(obj)}\n\n").encode()


def test_the_tap_drops_only_the_usage_chunk_it_asked_for() -> None:
    m = providers.meter("openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True}, 10)
    assert m is not None
    seen: list[dict | None] = []
    tap = _as_stream(StreamTap(m, sse=True, drop=True, done=seen.append))
    content = b'data: {"choices":[{"delta":{"content":"x"}}],"model":"gpt-4o-mini"}\r\n\r\n'
    usage = b'data: {"choices":[],"model":"gpt-4o-mini","usage":{"prompt_tokens":3,"completion_tokens":2}}\r\n\r\n'
    out = tap(content + usage[:20]) + tap(usage[20:] + b"data: [DONE]\r\n\r\n") + tap(b"")
    assert out == content + b"data: [DONE]\r\n\r\n"
    assert seen == [{"model": "gpt-4o-mini", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}]


def test_the_tap_reads_a_json_body_and_a_gemini_json_array() -> None:
    m = providers.meter("google", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", {}, 10)
    assert m is not None
    seen: list[dict | None] = []
    tap = StreamTap(m, sse=False, drop=False, done=seen.append)
    body = json.dumps([{"candidates": []}, {"modelVersion": "g", "usageMetadata": {"promptTokenCount": 7}}]).encode()
    assert tap(body[:9], False) + tap(body[9:], True) == body
    assert seen == [{"modelVersion": "g", "usageMetadata": {"promptTokenCount": 7}}]


def test_a_tap_that_fails_passes_the_stream_through() -> None:
    m = providers.meter("anthropic", "/v1/messages", {"model": "claude-haiku-4-5", "stream": True}, 10)
    assert m is not None

    def broken(_: dict | None) -> None:
        raise RuntimeError("boom")

    tap = StreamTap(m, sse=True, drop=False, done=broken)
    assert tap(b"data: {}\n\n", True) == b"data: {}\n\n"
    assert tap.broken and tap(b"more", False) == b"more"


STREAMS = {
    # (api, path, request body, events before the text, one text event, closing event types)
    "openai-chat": (
        "openai",
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "stream": True},
        [],
        _sse(
            {"id": "c1", "created": 1, "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "abcd"}}]}
        ),
        ["chat.completion.chunk", "[DONE]"],
    ),
    "openai-responses": (
        "openai",
        "/v1/responses",
        {"model": "gpt-4o-mini", "stream": True},
        [_sse({"type": "response.created", "sequence_number": 0, "response": {"id": "r1", "status": "in_progress"}})],
        _sse({"type": "response.output_text.delta", "sequence_number": 1, "delta": "abcd"}),
        ["response.incomplete"],
    ),
    "anthropic": (
        "anthropic",
        "/v1/messages",
        {"model": "claude-haiku-4-5", "stream": True},
        [
            _sse(
                {
                    "type": "message_start",
                    "message": {"model": "claude-haiku-4-5", "usage": {"input_tokens": 9, "output_tokens": 1}},
                }
            ),
            _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ],
        _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "abcd"}}),
        ["content_block_stop", "message_delta", "message_stop"],
    ),
    "gemini": (
        "google",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        {},
        [],
        _sse({"candidates": [{"content": {"parts": [{"text": "abcd"}]}}], "modelVersion": "gemini-2.5-flash"}),
        ["MAX_TOKENS"],
    ),
}


@pytest.mark.parametrize("name", STREAMS)
def test_a_stream_over_its_budget_ends_with_the_apis_own_closing_events(name: str) -> None:
    api, path, body, head, text, closing = STREAMS[name]
    m = providers.meter(api, path, body, 10)
    assert m is not None
    running = RunningCost(SETTINGS, m)
    cap = [Decimal(1)]
    cuts: list[tuple[str, Cost]] = []
    over = Overrun(
        running,
        providers.get(api).stream_end(m.flavor),
        lambda usd: f"total budget of ${cap[0]} reached mid-stream" if usd > cap[0] else None,
        lambda *a: cuts.append(a),
    )
    tap = _as_stream(StreamTap(m, sse=True, drop=api == "openai", done=lambda _: None, overrun=over))
    out = b"".join(tap(e) for e in head) + tap(text * 3)
    assert not cuts and out == b"".join(head) + text * 3  # within the budget: untouched
    cap[0] = running.usd + running.per_output / 2  # the budget drops mid-stream
    out = tap(text + text)  # the first event crosses: it is delivered, the stream ends after it
    assert out.startswith(text) and text not in out[len(text) :]
    assert tap(text) == b"" and tap(b"") == b""  # what the upstream sends after the end is dropped
    ((reason, cost),) = cuts
    assert reason.startswith("total budget of $")
    assert cost.output_tokens == (5 if api == "anthropic" else 4) and cost.usd == running.usd
    events = [e for e in out[len(text) :].split(b"\n\n") if e]
    assert events[0] == f": egress-guard: stream ended: {reason}".encode()
    kinds = []
    for event in events[1:]:
        data = event.split(b"data: ", 1)[1]
        if data == b"[DONE]":
            kinds.append("[DONE]")
            continue
        obj = json.loads(data)
        kinds.append(obj.get("type") or obj.get("object") or obj["candidates"][0]["finishReason"])
    assert kinds == closing


def _cutting_tap(
    api: str, path: str, body: dict, budget: str, done: Callable[[dict | None], None] = lambda _: None
) -> tuple[Callable[[bytes], bytes], list]:
    """A tap that ends the stream once its running cost is over `budget`."""
    m = providers.meter(api, path, body, 10)
    assert m is not None
    cuts: list[tuple[str, Cost]] = []
    over = Overrun(
        RunningCost(SETTINGS, m),
        providers.get(api).stream_end(m.flavor),
        lambda usd: "over" if usd > Decimal(budget) else None,
        lambda *a: cuts.append(a),
    )
    return _as_stream(StreamTap(m, sse=True, drop=api == "openai", done=done, overrun=over)), cuts


def test_usage_reported_at_the_end_never_ends_a_stream_twice() -> None:
    tap, cuts = _cutting_tap("anthropic", "/v1/messages", {"model": "claude-haiku-4-5", "stream": True}, "0.0005")
    start = _sse(
        {
            "type": "message_start",
            "message": {"model": "claude-haiku-4-5", "usage": {"input_tokens": 9, "output_tokens": 1}},
        }
    )
    text = _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "abcd"}})
    # the provider's final count is far over the budget: the output is complete, so it passes
    end = _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 100000}})
    stop = _sse({"type": "message_stop"})
    assert tap(start + text + end + stop) + tap(b"") == start + text + end + stop
    assert not cuts


def test_after_the_end_the_usage_the_upstream_still_reports_is_billed() -> None:
    # an upstream that is not cut (HTTP/2: shared connection) finishes: its real usage counts
    done: list = []
    tap, cuts = _cutting_tap(
        "openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True}, "0.0001", done.append
    )
    text = _sse({"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "abcd"}}]})
    out = b"".join(tap(text) for _ in range(400))
    assert b"[DONE]" in out and not done and len(cuts) == 1
    usage = _sse({"model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 500}})
    assert tap(text + usage + b"data: [DONE]\n\n") == b"" and tap(b"") == b""
    assert done == [{"model": "gpt-4o-mini", "usage": {"prompt_tokens": 11, "completion_tokens": 500}}]
