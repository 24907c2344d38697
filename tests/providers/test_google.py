"""Google's Gemini API as tables: metered requests, usage from JSON, SSE and a JSON array,
the end of a stream at a budget, refusals."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price

from egress_guard import providers
from egress_guard.spend import SpendSettings

SETTINGS = SpendSettings()
API = providers.get("google")


def usd(model: str, **usage: int) -> Decimal:
    return Decimal(calc_price(Usage(**usage), model, provider_id="google").total_price)


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        # (flavor, model, max_output, stream, choices)
        (
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            {"generationConfig": {"maxOutputTokens": 3}},
            ("default", "gemini-2.5-flash", 3, True, 1),
        ),
        (
            "/v1beta/models/gemini-2.5-flash:generateContent",
            {"generationConfig": {"maxOutputTokens": 50, "candidateCount": 3}},
            ("default", "gemini-2.5-flash", 50, False, 3),
        ),
        ("/v1beta/models/text-embedding-004:embedContent", {}, ("default", "text-embedding-004", None, False, 1)),
        # Vertex AI's path
        (
            "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-flash:generateContent",
            {"generationConfig": "nonsense"},
            ("default", "gemini-2.5-flash", None, False, 1),
        ),
        ("/v1beta/models/gemini-2.5-flash:countTokens", {}, None),
        ("/v1beta/models", None, None),
        ("/v1beta/models/gemini-2.5-flash:generateContent/x", {}, None),
    ],
)
def test_meter(path: str, body: Any, expected: tuple | None) -> None:
    m = API.meter(path, body, 100)
    assert (None if m is None else (m.flavor, m.model, m.max_output, m.stream, m.choices)) == expected


def test_reservation_covers_every_candidate() -> None:
    m = API.meter(
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {"generationConfig": {"maxOutputTokens": 50, "candidateCount": 3}},
        300,
    )
    assert m is not None
    assert API.reservation(SETTINGS, m) == (usd("gemini-2.5-flash", input_tokens=256, output_tokens=150), 256 + 150)


def test_cost_of_a_json_response() -> None:
    m = API.meter("/v1beta/models/gemini-2.5-flash:generateContent", {}, 10)
    assert m is not None
    response = {"modelVersion": "gemini-2.5-flash", "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3}}
    cost = API.cost(SETTINGS, m, response)
    assert cost is not None and (cost.input_tokens, cost.output_tokens, cost.usd) == (
        7,
        3,
        usd("gemini-2.5-flash", input_tokens=7, output_tokens=3),
    )
    assert API.cost(SETTINGS, m, {"candidates": []}) is None


def test_usage_from_a_stream_is_the_last_chunks() -> None:
    usage = API.stream_usage("default")
    assert not usage.observe({"candidates": []})
    assert usage.observe({"usageMetadata": {"promptTokenCount": 1}, "modelVersion": "g"})
    assert usage.observe({"usageMetadata": {"promptTokenCount": 2}, "modelVersion": "g"})
    assert usage.response == {"modelVersion": "g", "usageMetadata": {"promptTokenCount": 2}}


@pytest.mark.parametrize(
    ("event", "chars"),
    [
        ({"candidates": [{"content": {"parts": [{"text": "abcd"}, {"text": "ef"}]}}]}, 6),
        ({"candidates": [{"content": {"parts": [{"text": "ab"}]}}, {"content": {"parts": [{"text": "cd"}]}}]}, 4),
        ({"candidates": [{"content": {"parts": [{"functionCall": {}}]}}]}, 0),
        ({"candidates": ["x"]}, 0),
        ({"usageMetadata": {}}, 0),
    ],
)
def test_streamed_text(event: dict, chars: int) -> None:
    assert API.streamed_text("default", event) == chars


def test_a_stream_ends_with_finish_reason_max_tokens() -> None:
    end = API.stream_end("default")
    end.observe({"candidates": [], "modelVersion": "gemini-2.5-flash"})
    _, event = [e for e in end.events("why", 3).decode().split("\n\n") if e]
    assert json.loads(event.removeprefix("data: ")) == {
        "candidates": [
            {"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": "MAX_TOKENS", "index": 0}
        ],
        "modelVersion": "gemini-2.5-flash",
    }


@pytest.mark.parametrize(
    ("status", "text"),
    [(401, "UNAUTHENTICATED"), (403, "PERMISSION_DENIED"), (429, "RESOURCE_EXHAUSTED"), (502, "UNAVAILABLE")],
)
def test_error_body(status: int, text: str) -> None:
    ours = {"type": "egress_denied", "message": "egress-guard: no", "rule": None, "request_id": "id"}
    assert API.error_body(ours, status) == {
        "error": {"code": status, "message": "egress-guard: no", "status": text, "egress_guard": ours}
    }
