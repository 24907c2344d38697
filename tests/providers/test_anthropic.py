"""Anthropic's Messages API as tables: metered requests, usage from JSON and SSE, the end of
a stream at a budget, refusals."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price

from egress_guard import providers
from egress_guard.spend import SpendSettings

SETTINGS = SpendSettings()
API = providers.get("anthropic")


def usd(model: str, **usage: int) -> Decimal:
    return Decimal(calc_price(Usage(**usage), model, provider_id="anthropic").total_price)


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 9}, ("default", "claude-haiku-4-5", 9, False)),
        ("/v1/messages?beta=true", {"model": "m", "max_tokens": 1, "stream": True}, ("default", "m", 1, True)),
        ("/v1/messages", None, ("default", "", None, False)),
        ("/v1/messages/count_tokens", {}, None),
        ("/v1/messages/batches", {}, None),
        ("/v1/models", None, None),
        ("/v1/complete", {"model": "m"}, None),
    ],
)
def test_meter(path: str, body: Any, expected: tuple | None) -> None:
    m = API.meter(path, body, 100)
    assert (None if m is None else (m.flavor, m.model, m.max_output, m.stream)) == expected


def test_reservation() -> None:
    m = API.meter("/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 50}, 900)
    assert m is not None
    assert API.reservation(SETTINGS, m) == (usd("claude-haiku-4-5", input_tokens=512, output_tokens=50), 562)
    assert not API.rewrite(m, {"model": "claude-haiku-4-5", "stream": True})


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (
            {
                "model": "claude-haiku-4-5",
                "usage": {
                    "input_tokens": 5,  # not counting the cached ones: genai-prices adds them
                    "output_tokens": 6,
                    "cache_read_input_tokens": 2,
                    "cache_creation_input_tokens": 3,
                },
            },
            (
                10,
                6,
                5,
                usd("claude-haiku-4-5", input_tokens=10, output_tokens=6, cache_read_tokens=2, cache_write_tokens=3),
            ),
        ),
        ({"model": "claude-haiku-4-5", "content": []}, None),
    ],
)
def test_cost_of_a_json_response(response: dict, expected: tuple | None) -> None:
    m = API.meter("/v1/messages", {"model": "claude-haiku-4-5"}, 10)
    assert m is not None
    cost = API.cost(SETTINGS, m, response)
    assert (None if cost is None else (cost.input_tokens, cost.output_tokens, cost.cached_tokens, cost.usd)) == expected


def test_usage_from_a_stream() -> None:
    usage = API.stream_usage("default")
    assert not usage.observe({"type": "message_delta", "usage": {"output_tokens": 1}})  # before message_start: nothing
    start = {"type": "message_start", "message": {"model": "m", "usage": {"input_tokens": 4, "output_tokens": 1}}}
    assert usage.observe(start)
    assert not usage.observe({"type": "content_block_delta", "delta": {"text": "x"}})
    assert usage.observe({"type": "message_delta", "usage": {"output_tokens": 9, "input_tokens": None}})
    assert usage.response == {"model": "m", "usage": {"input_tokens": 4, "output_tokens": 9}}


@pytest.mark.parametrize(
    ("event", "chars"),
    [
        ({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "abcd"}}, 4),
        ({"type": "content_block_delta", "delta": {"type": "input_json_delta", "partial_json": '{"a"'}}, 4),
        ({"type": "content_block_delta", "delta": {"type": "thinking_delta", "thinking": "hm"}}, 2),
        ({"type": "message_delta", "delta": {"text": "abcd"}}, 0),
        ({"type": "content_block_delta", "delta": "abcd"}, 0),
    ],
)
def test_streamed_text(event: dict, chars: int) -> None:
    assert API.streamed_text("default", event) == chars


def _events(raw: bytes) -> list[tuple[str, dict]]:
    out = []
    for event in raw.decode().split("\n\n")[1:]:
        if event:
            name, data = event.split("\n")
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_a_stream_ends_its_open_block_then_stops_at_max_tokens() -> None:
    end = API.stream_end("default")
    end.observe({"type": "content_block_start", "index": 2, "content_block": {"type": "text", "text": ""}})
    assert _events(end.events("why", 7)) == [
        ("content_block_stop", {"type": "content_block_stop", "index": 2}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                "usage": {"output_tokens": 7},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    end.observe({"type": "content_block_stop", "index": 2})
    assert [name for name, _ in _events(end.events("why", 7))] == ["message_delta", "message_stop"]


@pytest.mark.parametrize(
    ("status", "api_type"),
    [(401, "authentication_error"), (403, "permission_error"), (429, "rate_limit_error"), (502, "api_error")],
)
def test_error_body(status: int, api_type: str) -> None:
    ours = {"type": "egress_denied", "message": "egress-guard: no", "rule": None, "request_id": "id"}
    assert API.error_body(ours, status) == {
        "type": "error",
        "error": {**ours, "type": api_type, "egress_guard": "egress_denied"},
    }
