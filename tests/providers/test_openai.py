"""OpenAI's API shape (and OpenAI-compatible ones) as tables: which requests are metered
calls and what they reserve, where responses and streams report usage, how a stream is
ended at a budget, and how refusals look."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price

from egress_guard import providers
from egress_guard.providers import openai_ws
from egress_guard.spend import SpendSettings

SETTINGS = SpendSettings()
API = providers.get("openai")


def usd(model: str, provider: str = "openai", **usage: int) -> Decimal:
    return Decimal(calc_price(Usage(**usage), model, provider_id=provider).total_price)


# --- request -> metered call ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        # (flavor, model, max_output, stream, choices)
        ("/v1/chat/completions", {"model": "gpt-4o", "max_tokens": 5, "stream": True}, ("chat", "gpt-4o", 5, True, 1)),
        ("/v1/chat/completions", {"model": "m", "max_completion_tokens": 6, "n": 3}, ("chat", "m", 6, False, 3)),
        ("/v1/completions", {"model": "m", "max_tokens": 2, "best_of": 4, "n": 2}, ("chat", "m", 2, False, 4)),
        ("/v1/responses", {"model": "gpt-4o", "max_output_tokens": 7}, ("responses", "gpt-4o", 7, False, 1)),
        ("/v1/embeddings?x=1", {"model": "e"}, ("embeddings", "e", None, False, 1)),
        # OpenAI-compatible hosts' prefixes (Groq, OpenRouter)
        ("/openai/v1/chat/completions", {"model": "llama"}, ("chat", "llama", None, False, 1)),
        ("/api/v1/embeddings", {"model": "x"}, ("embeddings", "x", None, False, 1)),
        # what a client cannot mean as a cap or a count is no cap
        ("/v1/chat/completions", {"model": "m", "max_tokens": True, "n": -1}, ("chat", "m", None, False, 1)),
        ("/v1/chat/completions", {"model": "m", "max_tokens": "9"}, ("chat", "m", None, False, 1)),
        ("/v1/chat/completions", None, ("chat", "", None, False, 1)),  # the endpoint alone: metered
        ("/v1/chat/completions", ["not", "an", "object"], ("chat", "", None, False, 1)),
        ("/v1/models", None, None),
        ("/v1/chat/completions/chatcmpl-1/messages", None, None),
        ("/v1/files", {"model": "m"}, None),
        ("/v1/responses/resp_1/input_items", None, None),
    ],
)
def test_meter(path: str, body: Any, expected: tuple | None) -> None:
    m = API.meter(path, body, 100)
    assert (None if m is None else (m.flavor, m.model, m.max_output, m.stream, m.choices)) == expected
    assert m is None or (m.api, m.input_bytes, m.pricing) == ("openai", 100, "openai")


@pytest.mark.parametrize(
    ("body", "max_tokens", "expected_tokens"),
    [
        ({"model": "gpt-4o-mini", "max_tokens": 100}, 100, 256 + 100),
        ({"model": "gpt-4o-mini", "max_tokens": 100, "n": 4}, 400, 256 + 400),
        ({"model": "gpt-4o-mini"}, 4096, 256 + 4096),  # no cap: spend.default_max_output_tokens
    ],
)
def test_reservation(body: dict, max_tokens: int, expected_tokens: int) -> None:
    m = API.meter("/v1/chat/completions", body, 300)
    assert m is not None
    assert API.reservation(SETTINGS, m) == (
        usd("gpt-4o-mini", input_tokens=256, output_tokens=max_tokens),
        expected_tokens,
    )


def test_embeddings_reserve_no_output() -> None:
    m = API.meter("/v1/embeddings", {"model": "text-embedding-3-small"}, 3000)
    assert m is not None and API.reservation(SETTINGS, m)[1] == 1024


def test_an_openai_compatible_api_is_priced_as_its_own_provider() -> None:
    m = providers.meter(
        "openai", "/openai/v1/chat/completions", {"model": "llama-3.1-8b-instant", "max_tokens": 10}, 300, "groq"
    )
    assert m is not None and (m.api, m.pricing) == ("openai", "groq")
    assert API.reservation(SETTINGS, m) == (
        usd("llama-3.1-8b-instant", "groq", input_tokens=256, output_tokens=10),
        266,
    )
    response = {"model": "llama-3.1-8b-instant", "usage": {"prompt_tokens": 40, "completion_tokens": 9}}
    cost = API.cost(SETTINGS, m, response)
    assert cost is not None and (cost.usd, cost.input_tokens, cost.output_tokens, cost.model) == (
        usd("llama-3.1-8b-instant", "groq", input_tokens=40, output_tokens=9),
        40,
        9,
        "llama-3.1-8b-instant",
    )
    assert providers.meter("openai", "/v1/chat/completions", {}, 1, "openai").price_as == ""  # its own: not named


# --- request rewrites -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "sent"),
    [
        (
            "/v1/chat/completions",
            {"model": "m", "stream": True},
            {"model": "m", "stream": True, "stream_options": {"include_usage": True}},
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "stream": True, "stream_options": {"x": 1}},
            {"model": "m", "stream": True, "stream_options": {"x": 1, "include_usage": True}},
        ),
        ("/v1/chat/completions", {"model": "m", "stream": True, "stream_options": {"include_usage": True}}, None),
        ("/v1/chat/completions", {"model": "m"}, None),  # not a stream: the JSON has its usage
        ("/v1/responses", {"model": "m", "stream": True}, None),  # response.completed has it
    ],
)
def test_rewrite_asks_a_chat_stream_for_its_usage(path: str, body: dict, sent: dict | None) -> None:
    m = API.meter(path, body, 10)
    assert m is not None
    before = json.loads(json.dumps(body))
    assert API.rewrite(m, body) is (sent is not None)
    assert body == (sent or before)


@pytest.mark.parametrize(
    ("event", "added"),
    [
        ({"choices": [], "usage": {"prompt_tokens": 1}}, True),
        ({"choices": [{"delta": {}}], "usage": {"prompt_tokens": 1}}, False),
        ({"choices": []}, False),
    ],
)
def test_added_is_only_the_usage_chunk(event: dict, added: bool) -> None:
    assert API.added(event) is added


# --- response -> usage --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "response", "expected"),
    [
        (
            "/v1/chat/completions",
            {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 100, "completion_tokens": 20}},
            (100, 20, 0, usd("gpt-4o-mini", input_tokens=100, output_tokens=20)),
        ),
        (
            "/v1/chat/completions",
            {
                "model": "gpt-4o-mini",
                "usage": {
                    "prompt_tokens": 100,
                    "completion_tokens": 20,
                    "prompt_tokens_details": {"cached_tokens": 64},
                },
            },
            (100, 20, 64, usd("gpt-4o-mini", input_tokens=100, output_tokens=20, cache_read_tokens=64)),
        ),
        (
            "/v1/responses",
            {"model": "gpt-4o-mini", "usage": {"input_tokens": 13, "output_tokens": 5}},
            (13, 5, 0, usd("gpt-4o-mini", input_tokens=13, output_tokens=5)),
        ),
        (
            "/v1/embeddings",
            {"model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}},
            (8, 0, 0, usd("text-embedding-3-small", input_tokens=8)),
        ),
        ("/v1/chat/completions", {"model": "gpt-4o-mini"}, None),  # no usage
        ("/v1/chat/completions", {"model": "no-such-model", "usage": {"prompt_tokens": 1}}, None),  # unpriced
    ],
)
def test_cost_of_a_json_response(path: str, response: dict, expected: tuple | None) -> None:
    m = API.meter(path, {"model": response["model"]}, 10)
    assert m is not None
    cost = API.cost(SETTINGS, m, response)
    assert (None if cost is None else (cost.input_tokens, cost.output_tokens, cost.cached_tokens, cost.usd)) == expected


@pytest.mark.parametrize(
    ("flavor", "events", "expected"),
    [
        (
            "chat",
            [
                {"model": "gpt-4o-mini", "choices": [{"delta": {"content": "x"}}]},
                {"model": "gpt-4o-mini", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
            ],
            {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
        ),
        ("chat", [{"model": "gpt-4o-mini", "choices": [{"delta": {"content": "x"}}]}], None),
        (
            "responses",
            [
                {"type": "response.output_text.delta", "delta": "x"},
                {"type": "response.completed", "response": {"model": "gpt-4o", "usage": {"input_tokens": 1}}},
            ],
            {"model": "gpt-4o", "usage": {"input_tokens": 1}},
        ),
    ],
)
def test_usage_from_a_stream(flavor: str, events: list[dict], expected: dict | None) -> None:
    usage = API.stream_usage(flavor)
    reported = [usage.observe(e) for e in events]
    assert usage.response == expected and reported[-1] is (expected is not None)


@pytest.mark.parametrize(
    ("flavor", "event", "chars"),
    [
        ("chat", {"choices": [{"delta": {"content": "abcd"}}]}, 4),
        ("chat", {"choices": [{"delta": {"refusal": "no", "reasoning_content": "hmm"}}]}, 5),
        ("chat", {"choices": [{"delta": {"tool_calls": [{"function": {"arguments": '{"a":1}'}}]}}]}, 7),
        ("chat", {"choices": [{"delta": {"content": "ab"}}, {"delta": {"content": "cd"}}]}, 4),  # n > 1
        ("chat", {"choices": ["x", {"delta": None}]}, 0),
        ("chat", {"choices": [], "usage": {}}, 0),
        ("responses", {"type": "response.output_text.delta", "delta": "abc"}, 3),
        ("responses", {"type": "response.function_call_arguments.delta", "delta": "{}"}, 2),
        ("responses", {"type": "response.output_text.done", "text": "abc"}, 0),
    ],
)
def test_streamed_text(flavor: str, event: dict, chars: int) -> None:
    assert API.streamed_text(flavor, event) == chars


def _events(raw: bytes) -> list[str]:
    return [e for e in raw.decode().split("\n\n") if e]


def test_a_chat_stream_ends_with_finish_reason_length_and_done() -> None:
    end = API.stream_end("chat")
    end.observe({"id": "c1", "created": 5, "model": "gpt-4o-mini", "choices": [{"delta": {"content": "x"}}]})
    note, chunk, done = _events(end.events("stream ended: why", 9))
    assert note == ": egress-guard: stream ended: why" and done == "data: [DONE]"
    assert json.loads(chunk.removeprefix("data: ")) == {
        "object": "chat.completion.chunk",
        "id": "c1",
        "created": 5,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
    }


def test_a_responses_stream_ends_incomplete_in_sequence() -> None:
    end = API.stream_end("responses")
    end.observe({"type": "response.created", "sequence_number": 0, "response": {"id": "r1", "status": "in_progress"}})
    end.observe({"type": "response.output_text.delta", "sequence_number": 4, "delta": "x"})
    _, event = _events(end.events("why", 9))
    name, data = event.split("\n")
    assert name == "event: response.incomplete"
    assert json.loads(data.removeprefix("data: ")) == {
        "type": "response.incomplete",
        "sequence_number": 5,
        "response": {"id": "r1", "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}},
    }


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, "invalid_api_key"), (429, "rate_limit_exceeded"), (403, "egress_denied"), (502, "egress_denied")],
)
def test_error_body(status: int, code: str) -> None:
    ours = {"type": "egress_denied", "message": "egress-guard: no", "rule": "r", "request_id": "id"}
    assert API.error_body(ours, status) == {"error": {**ours, "code": code, "param": None}}


def test_websocket_error_event() -> None:
    event = json.loads(openai_ws.error_event(429, "rate_limit_exceeded", "egress-guard: slow down", 7))
    assert event == {
        "type": "error",
        "status": 429,
        "error": {
            "type": "egress_denied",
            "code": "rate_limit_exceeded",
            "message": "egress-guard: slow down",
            "param": None,
        },
        "headers": {"x-egress-guard-decision": "deny", "retry-after": "7"},
    }
    assert json.loads(openai_ws.error_event(503, "egress_error", "m", None))["headers"] == {
        "x-egress-guard-decision": "error"
    }
