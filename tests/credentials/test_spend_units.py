"""Usage accounting pieces on their own: SSE framing, usage assembly per provider, the
metering table, pricing and the ledger's arithmetic."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price
from mitmproxy.test import tflow

from egress_guard.addons.flow import state
from egress_guard.addons.spend_guard import Overrun, SpendGuard, StreamTap
from egress_guard.spend import (
    Cost,
    Ledger,
    Limits,
    Refusal,
    RunningCost,
    SessionLimits,
    SpendSettings,
    SSEEvents,
    StreamEnd,
    Unpriced,
    UsageFromStream,
    cost_of,
    meter,
    model_allowed,
    price,
    reservation,
)

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


def test_usage_from_streams() -> None:
    anthropic = UsageFromStream("anthropic", "default")
    anthropic.observe(
        {"type": "message_start", "message": {"model": "m", "usage": {"input_tokens": 4, "output_tokens": 1}}}
    )
    anthropic.observe({"type": "message_delta", "usage": {"output_tokens": 9}})
    assert anthropic.response == {"model": "m", "usage": {"input_tokens": 4, "output_tokens": 9}}
    responses = UsageFromStream("openai", "responses")
    responses.observe({"type": "response.output_text.delta", "delta": "x"})
    responses.observe({"type": "response.completed", "response": {"model": "gpt-4o", "usage": {"input_tokens": 1}}})
    assert responses.response == {"model": "gpt-4o", "usage": {"input_tokens": 1}}
    gemini = UsageFromStream("google", "default")
    gemini.observe({"usageMetadata": {"promptTokenCount": 1}, "modelVersion": "g"})
    gemini.observe({"usageMetadata": {"promptTokenCount": 2}, "modelVersion": "g"})
    assert gemini.response == {"modelVersion": "g", "usageMetadata": {"promptTokenCount": 2}}


@pytest.mark.parametrize(
    ("provider", "path", "body", "expected"),
    [
        (
            "openai",
            "/v1/chat/completions",
            {"model": "gpt-4o", "max_tokens": 5, "stream": True},
            ("chat", "gpt-4o", 5, True),
        ),
        ("openai", "/v1/responses", {"model": "gpt-4o", "max_output_tokens": 7}, ("responses", "gpt-4o", 7, False)),
        (
            "openai",
            "/v1/embeddings?x=1",
            {"model": "text-embedding-3-small"},
            ("embeddings", "text-embedding-3-small", None, False),
        ),
        (
            "anthropic",
            "/v1/messages",
            {"model": "claude-haiku-4-5", "max_tokens": 9},
            ("default", "claude-haiku-4-5", 9, False),
        ),
        (
            "google",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            {"generationConfig": {"maxOutputTokens": 3}},
            ("default", "gemini-2.5-flash", 3, True),
        ),
        # OpenAI-compatible and other hosts' prefixes (Groq, OpenRouter, Vertex AI)
        (
            "openai",
            "/openai/v1/chat/completions",
            {"model": "llama-3.1-8b-instant"},
            ("chat", "llama-3.1-8b-instant", None, False),
        ),
        ("openai", "/api/v1/embeddings", {"model": "x"}, ("embeddings", "x", None, False)),
        (
            "google",
            "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-flash:generateContent",
            {},
            ("default", "gemini-2.5-flash", None, False),
        ),
        ("openai", "/v1/models", None, None),
        ("openai", "/v1/chat/completions/chatcmpl-1/messages", None, None),
        ("anthropic", "/v1/messages/count_tokens", {}, None),
        ("anthropic", "/v1/messages/batches", {}, None),
    ],
)
def test_meter(provider, path, body, expected) -> None:
    m = meter(provider, path, body, 100)
    assert (None if m is None else (m.flavor, m.model, m.max_output, m.stream)) == expected


def test_prices_come_from_genai_prices_and_unknown_models_follow_the_config(caplog) -> None:
    assert price(SETTINGS, "openai", "gpt-4o-mini", 1000, 10) == Decimal(
        calc_price(Usage(input_tokens=1000, output_tokens=10), "gpt-4o-mini", provider_id="openai").total_price
    )
    with pytest.raises(Unpriced, match="no price is known for model 'my-model'"):
        price(SETTINGS, "openai", "my-model", 1, 1)
    fallback = SpendSettings(
        unknown_model="fallback", fallback_input_per_mtok=Decimal(2), fallback_output_per_mtok=Decimal(8)
    )
    assert price(fallback, "openai", "my-model", 500_000, 250_000) == Decimal(3)
    assert price(fallback, "openai", "my-model", 1_000_000, 0) == Decimal(2)
    logged = [r.getMessage() for r in caplog.records if "fallback_price" in r.getMessage()]
    assert logged == [
        "no price is known for model 'my-model' at openai: pricing it at spend.fallback_price (2 in, 8 out per MTok)"
    ]


def test_ledger_reserves_settles_and_refuses_with_the_numbers() -> None:
    ledger = Ledger(SETTINGS)
    limits = Limits(budget_session=Decimal("1.00"), concurrent=2)
    a = ledger.admit(limits, "ag", "s", Decimal("0.40"), 10)
    b = ledger.admit(limits, "ag", "s", Decimal("0.40"), 10)
    with pytest.raises(Refusal, match="concurrency limit: 2"):
        ledger.admit(limits, "ag", "s", Decimal("0.01"), 1)
    ledger.settle(a, Decimal("0.10"), 5)
    with pytest.raises(Refusal) as info:
        ledger.admit(limits, "ag", "s", Decimal("0.60"), 1)
    assert "session budget of $1.00" in info.value.reason and "spent $0.1" in info.value.reason
    assert "reserved $0.4" in info.value.reason
    ledger.settle(b, Decimal("0.20"), 5)
    ledger.admit(limits, "ag", "s", Decimal("0.60"), 1)  # 0.30 spent + 0.60 fits in 1.00
    assert ledger.spent[("session", "ag/s")] == Decimal("0.30")


def _as_stream(tap: StreamTap) -> Callable[[bytes], bytes]:
    """The tap as mitmproxy's stream sees it: b"" is the end."""
    return lambda data: tap(data, data == b"")


def test_stream_tap_drops_only_the_usage_chunk_it_asked_for() -> None:
    m = meter("openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True}, 10)
    assert m is not None
    seen: list[dict | None] = []
    tap = _as_stream(StreamTap(m, sse=True, drop=True, done=seen.append))
    content = b'data: {"choices":[{"delta":{"content":"x"}}],"model":"gpt-4o-mini"}\r\n\r\n'
    usage = b'data: {"choices":[],"model":"gpt-4o-mini","usage":{"prompt_tokens":3,"completion_tokens":2}}\r\n\r\n'
    out = tap(content + usage[:20]) + tap(usage[20:] + b"data: [DONE]\r\n\r\n") + tap(b"")
    assert out == content + b"data: [DONE]\r\n\r\n"
    assert seen == [{"model": "gpt-4o-mini", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}]


def test_compressed_json_response_is_priced() -> None:
    flow = tflow.tflow(resp=True)
    body = {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 100, "completion_tokens": 20}}
    flow.response.headers["content-encoding"] = "gzip"
    flow.response.raw_content = gzip.compress(json.dumps(body).encode())
    ledger = Ledger(SETTINGS)
    m = meter("openai", "/v1/chat/completions", {"model": "gpt-4o-mini"}, 10)
    usd, tokens = reservation(SETTINGS, m)
    state(flow).hold = ledger.admit(Limits(), "ag", "s", usd, tokens)
    state(flow).metered = m
    spend = SpendGuard.__new__(SpendGuard)
    spend.settings, spend.ledger = SETTINGS, ledger
    spend.response(flow)
    expected = Decimal(
        calc_price(Usage(input_tokens=100, output_tokens=20), "gpt-4o-mini", provider_id="openai").total_price
    )
    usage = state(flow).usage
    assert usage is not None and usage.usd == expected
    assert ledger.spent[("total", "ag")] == expected and ledger.reserved[("total", "ag")] == 0


def test_tokens_per_minute_counts_real_tokens_after_settling() -> None:
    ledger = Ledger(SETTINGS)
    limits = Limits(tokens_per_minute=1000)
    a = ledger.admit(limits, "ag", "s", Decimal(0), 900)  # estimated 900
    with pytest.raises(Refusal, match="1000 tokens per minute"):
        ledger.admit(limits, "ag", "s", Decimal(0), 200)
    ledger.settle(a, Decimal(0), 100)  # really used 100
    ledger.admit(limits, "ag", "s", Decimal(0), 850)  # 100 + 850 fits
    with pytest.raises(Refusal) as info:
        ledger.admit(limits, "ag", "s", Decimal(0), 100)
    assert "(950 used" in info.value.reason and 1 <= info.value.retry_after <= 60


def test_session_budget_precedence_most_specific_wins_and_run_time_beats_config() -> None:
    limits = Limits(
        budget_session=Decimal(1),
        models={"openai": ("gpt-4o-mini",)},
        sessions=(
            SessionLimits("ci-nightly", Decimal(9), {"openai": ("gpt-4o",)}),
            SessionLimits("ci-*", Decimal(3)),
        ),
    )
    ledger = Ledger(SETTINGS)
    assert ledger.limit(limits, "ag", "session", "dev") == 1
    assert ledger.limit(limits, "ag", "session", "ci-nightly") == 9  # first match wins
    assert ledger.limit(limits, "ag", "session", "ci-7") == 3
    ledger.overrides = {("ag", "session"): Decimal(5)}  # run time, agent-wide: below a session's config entry
    assert ledger.limit(limits, "ag", "session", "dev") == 5
    assert ledger.limit(limits, "ag", "session", "ci-7") == 3
    ledger.overrides[("ag", "session:ci-7")] = Decimal("0.5")  # run time, this session: above everything
    assert ledger.limit(limits, "ag", "session", "ci-7") == Decimal("0.5")
    assert ledger.limit(limits, "ag", "day", "ci-7") is None  # other scopes are untouched
    with pytest.raises(Refusal, match=r"session budget of \$0.5"):
        ledger.admit(limits, "ag", "ci-7", Decimal("0.6"), 1)
    ledger.admit(limits, "ag", "ci-nightly", Decimal("8"), 1)
    # a session's model allowlist replaces the agent's for that service only
    assert model_allowed(limits, "openai", "gpt-4o", "ci-nightly")
    assert not model_allowed(limits, "openai", "gpt-4o-mini", "ci-nightly")
    assert model_allowed(limits, "openai", "gpt-4o-mini", "ci-7") and not model_allowed(
        limits, "openai", "gpt-4o", "ci-7"
    )


def _sse(obj: dict, event: str | None = None) -> bytes:
    return ((f"event: {event}\n" if event else "") + f"data: {json.dumps(obj)}\n\n").encode()


STREAMS = {
    # (provider, path, request body, events before the text, one text event, closing event types)
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


def _cutting_tap(
    provider: str, path: str, body: dict, budget: str, held: str, done=lambda _: None
) -> tuple[Callable[[bytes], bytes], Ledger, RunningCost, list]:
    """A tap that ends the stream over a total budget of `budget`, with `held` reserved."""
    m = meter(provider, path, body, 10)
    assert m is not None
    ledger = Ledger(SETTINGS)
    limits = Limits(budget_total=Decimal(budget))
    hold = ledger.admit(limits, "ag", "s", Decimal(held), 10)
    cuts: list[tuple[str, Cost]] = []
    running = RunningCost(SETTINGS, m)
    over = Overrun(
        running,
        StreamEnd(m.provider, m.flavor),
        lambda usd: ledger.overrun(limits, hold, usd),
        lambda *a: cuts.append(a),
    )
    tap = _as_stream(StreamTap(m, sse=True, drop=provider == "openai", done=done, overrun=over))
    return tap, ledger, running, cuts


@pytest.mark.parametrize("name", STREAMS)
def test_stream_over_the_budget_ends_with_the_providers_own_closing_events(name: str) -> None:
    provider, path, body, head, text, closing = STREAMS[name]
    tap, ledger, running, cuts = _cutting_tap(provider, path, body, "1", "0.001")
    out = b"".join(tap(e) for e in head) + tap(text * 3)
    assert not cuts and out == b"".join(head) + text * 3  # within the budget: untouched
    ledger.overrides[("ag", "total")] = running.usd + running.per_output / 2  # `budget set` lowers it mid-stream
    out = tap(text + text)  # the first event crosses: it is delivered, the stream ends after it
    assert out.startswith(text) and text not in out[len(text) :]
    assert tap(text) == b"" and tap(b"") == b""  # what the upstream sends after the end is dropped
    ((reason, cost),) = cuts
    assert reason.startswith("total budget of $") and "reached mid-stream" in reason
    assert cost.output_tokens == (5 if provider == "anthropic" else 4) and cost.usd == running.usd
    events = [e for e in out[len(text) :].split(b"\n\n") if e]
    assert events[0].startswith(b": egress-guard: stream ended: total budget")
    kinds = []
    for event in events[1:]:
        data = event.split(b"data: ", 1)[1]
        if data == b"[DONE]":
            kinds.append("[DONE]")
            continue
        obj = json.loads(data)
        kinds.append(obj.get("type") or obj.get("object") or obj["candidates"][0]["finishReason"])
    assert kinds == closing


def test_overrun_counts_what_others_hold_and_spent() -> None:
    ledger = Ledger(SETTINGS)
    limits = Limits(budget_day=Decimal("1.00"))
    a = ledger.admit(limits, "ag", "s", Decimal("0.30"), 1)
    b = ledger.admit(limits, "ag", "s", Decimal("0.30"), 1)
    assert ledger.overrun(limits, a, Decimal("0.70")) is None  # 0.70 + b's 0.30 = 1.00
    assert "day budget of $1.00" in (ledger.overrun(limits, a, Decimal("0.71")) or "")
    ledger.settle(b, Decimal("0.10"), 1)
    assert ledger.overrun(limits, a, Decimal("0.90")) is None
    assert ledger.overrun(Limits(), a, Decimal("100")) is None  # no budget: nothing to cut at


def test_usage_reported_at_the_end_never_ends_a_stream_twice() -> None:
    tap, _, _, cuts = _cutting_tap(
        "anthropic", "/v1/messages", {"model": "claude-haiku-4-5", "stream": True}, "0.001", "0.0005"
    )
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
    tap, *_ = _cutting_tap(
        "openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True}, "0.0002", "0.0001", done.append
    )
    text = _sse({"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": "abcd"}}]})
    out = b"".join(tap(text) for _ in range(400))
    assert b"[DONE]" in out and not done
    usage = _sse({"model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 500}})
    assert tap(text + usage + b"data: [DONE]\n\n") == b"" and tap(b"") == b""
    assert done == [{"model": "gpt-4o-mini", "usage": {"prompt_tokens": 11, "completion_tokens": 500}}]


def test_an_openai_compatible_api_is_priced_as_its_own_provider() -> None:
    m = meter("openai", "/openai/v1/chat/completions", {"model": "llama-3.1-8b-instant", "max_tokens": 10}, 300, "groq")
    assert m is not None and (m.provider, m.pricing) == ("openai", "groq")
    groq = lambda i, o: Decimal(  # noqa: E731
        calc_price(Usage(input_tokens=i, output_tokens=o), "llama-3.1-8b-instant", provider_id="groq").total_price
    )
    assert reservation(SETTINGS, m) == (groq(256, 10), 266)
    response = {"model": "llama-3.1-8b-instant", "usage": {"prompt_tokens": 40, "completion_tokens": 9}}
    cost = cost_of(SETTINGS, "openai", "chat", response, "groq")
    assert cost is not None and (cost.usd, cost.input_tokens, cost.output_tokens) == (groq(40, 9), 40, 9)
    assert cost.model == "llama-3.1-8b-instant"
    with pytest.raises(Unpriced, match="at groq"):  # a model groq does not list
        reservation(SETTINGS, meter("openai", "/v1/chat/completions", {"model": "gpt-4o"}, 10, "groq"))


def test_reservation_covers_every_completion_asked_for() -> None:
    one = meter("openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 100}, 300)
    four = meter("openai", "/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 100, "n": 4}, 300)
    gemini = meter(
        "google",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {"generationConfig": {"maxOutputTokens": 50, "candidateCount": 3}},
        300,
    )
    assert one is not None and four is not None and gemini is not None
    assert reservation(SETTINGS, one)[1] == 256 + 100 and reservation(SETTINGS, four)[1] == 256 + 400
    assert reservation(SETTINGS, four)[0] == price(SETTINGS, "openai", "gpt-4o-mini", 256, 400)
    assert reservation(SETTINGS, gemini)[1] == 256 + 150
