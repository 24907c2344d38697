"""ws_meter: which WebSocket messages start and end metered calls, and what they cost. Pure:
tables of messages, no sockets."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price

from egress_guard import ws_meter
from egress_guard.spend import SpendSettings, reservation
from egress_guard.ws_meter import Create, Failed, Finished, SetModel, Started

SETTINGS = SpendSettings()


@pytest.mark.parametrize(
    ("api", "path", "expected"),
    [
        ("openai", "/v1/responses", "responses"),
        ("openai", "/openai/v1/responses/", "responses"),
        ("openai", "/v1/realtime?model=gpt-realtime", "realtime"),
        ("openai", "/v1/chat/completions", None),
        ("openai", "/echo", None),
        ("anthropic", "/v1/responses", None),
        ("google", "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent", None),
    ],
)
def test_ws_api(api: str, path: str, expected: str | None) -> None:
    assert ws_meter.ws_api(api, path) == expected


def msg(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_response_create_is_a_call_with_its_model_and_cap() -> None:
    event = ws_meter.client_message(
        "responses",
        "/v1/responses",
        "",
        msg({"type": "response.create", "model": "gpt-5-mini", "max_output_tokens": 55, "input": []}),
    )
    assert isinstance(event, Create)
    m = event.metered
    assert (m.provider, m.flavor, m.model, m.max_output, m.stream) == ("openai", "responses", "gpt-5-mini", 55, True)
    assert not event.carried


def test_response_create_nested_and_continued() -> None:
    data = msg({"type": "response.create", "previous_response_id": "r1", "response": {"model": "gpt-5", "input": []}})
    event = ws_meter.client_message("responses", "/v1/responses", "", data, "azure")
    assert isinstance(event, Create) and event.carried
    assert (event.metered.model, event.metered.price_as, event.metered.input_bytes) == ("gpt-5", "azure", len(data))


@pytest.mark.parametrize(
    "data",
    [
        msg({"type": "response.processed", "response_id": "r1"}),
        msg({"type": "response.cancel"}),
        msg({"type": {"response.create": 1}}),
    ],
)
def test_other_messages_are_not_calls(data: bytes) -> None:
    assert ws_meter.client_message("responses", "/v1/responses", "", data) is None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "not JSON"),
        (b"not json", "not JSON"),
        (b'{"type": "response.create"', "not JSON"),  # cut short
        (b'{"type": "response.create", "model": "gpt-5",}', "not JSON"),  # a lenient parser's JSON
        (b"\xff\xfe", "not JSON"),
        (msg(["response.create"]), "not a JSON object"),
        # which "model" counts differs between parsers: neither is trusted
        (b'{"type": "response.create", "model": "gpt-5-mini", "model": "gpt-5-pro"}', "'model' appears twice"),
        (b'{"type": "x", "type": "response.create"}', "'type' appears twice"),
        (b'{"type": "response.create", "input": [{"a": 1, "a": 2}]}', "'a' appears twice"),
        (msg({"type": "response.create", "model": "gpt-5-mini", "response": {"model": "gpt-5-pro"}}), "two different"),
    ],
)
def test_messages_that_could_be_read_two_ways_are_refused(data: bytes, why: str) -> None:
    event = ws_meter.client_message("responses", "/v1/responses", "", data)
    assert isinstance(event, ws_meter.Unreadable) and why in event.reason


def test_an_escaped_call_is_still_a_call() -> None:
    data = b'{"type": "response\\u002ecreate", "model": "gpt-5\\u002dpro"}'
    event = ws_meter.client_message("responses", "/v1/responses", "", data)
    assert isinstance(event, Create) and event.metered.model == "gpt-5-pro"


def test_realtime_messages() -> None:
    create = ws_meter.client_message(
        "realtime",
        "/v1/realtime?model=x",
        "gpt-realtime",
        msg({"type": "response.create", "response": {"max_output_tokens": 9}}),
    )
    assert isinstance(create, Create) and create.carried
    assert (create.metered.flavor, create.metered.model, create.metered.max_output) == ("realtime", "gpt-realtime", 9)
    update = ws_meter.client_message(
        "realtime",
        "/v1/realtime",
        "gpt-realtime",
        msg({"type": "session.update", "session": {"model": "gpt-realtime-mini"}}),
    )
    assert update == SetModel("gpt-realtime-mini")
    assert ws_meter.url_model("/v1/realtime?model=gpt-realtime&x=1") == "gpt-realtime"
    assert ws_meter.url_model("/v1/realtime") == ""


USAGE = {"input_tokens": 10, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize(
    ("api", "obj", "expected"),
    [
        ("responses", {"type": "response.created", "response": {}}, Started()),
        (
            "responses",
            {"type": "response.completed", "response": {"model": "m", "usage": USAGE}},
            Finished("completed", {"model": "m", "usage": USAGE}),
        ),
        ("responses", {"type": "response.failed", "response": {"usage": None}}, Finished("failed", None)),
        ("responses", {"type": "error", "status": 400, "error": {"message": "bad"}}, Failed(400, "bad")),
        ("responses", {"type": "response.output_text.delta", "delta": "response.completed"}, None),
        ("responses", {"type": "response.done", "response": {"usage": USAGE}}, None),  # a Realtime event
        (
            "realtime",
            {"type": "response.done", "response": {"status": "cancelled", "usage": USAGE}},
            Finished("cancelled", {"response": {"status": "cancelled", "usage": USAGE}}),
        ),
        ("realtime", {"type": "session.created", "session": {"model": "gpt-realtime"}}, SetModel("gpt-realtime")),
    ],
)
def test_server_messages(api: str, obj: dict, expected: object) -> None:
    assert ws_meter.server_message(api, msg(obj)) == expected


def test_carry_adds_the_context_the_server_holds() -> None:
    event = ws_meter.client_message(
        "responses", "/v1/responses", "", msg({"type": "response.create", "model": "gpt-5-mini"})
    )
    assert isinstance(event, Create)
    alone = reservation(SETTINGS, event.metered)
    carried = reservation(SETTINGS, ws_meter.carry(event.metered, 50_000))
    assert carried[1] - alone[1] >= 50_000 - 256 and carried[0] > alone[0]  # the estimate rounds to 256


def test_realtime_reservation_is_priced_as_audio() -> None:
    event = ws_meter.client_message(
        "realtime",
        "/v1/realtime",
        "gpt-realtime",
        msg({"type": "response.create", "response": {"max_output_tokens": 1000}}),
    )
    assert isinstance(event, Create)
    usd, tokens = ws_meter.reserve(SETTINGS, event.metered)
    as_text, _ = reservation(SETTINGS, event.metered)
    inputs = tokens - 1000
    audio = calc_price(
        Usage(input_tokens=inputs, input_audio_tokens=inputs, output_tokens=1000, output_audio_tokens=1000),
        "gpt-realtime",
        provider_id="openai",
    ).total_price
    assert usd == Decimal(audio) > as_text


def test_realtime_cost_prices_audio_apart_from_text() -> None:
    usage = {
        "input_tokens": 300,
        "output_tokens": 120,
        "input_token_details": {"text_tokens": 100, "audio_tokens": 200, "cached_tokens": 64},
        "output_token_details": {"text_tokens": 20, "audio_tokens": 100},
    }
    c = ws_meter.realtime_cost(SETTINGS, "gpt-realtime", {"response": {"usage": usage}})
    assert c is not None
    expected = calc_price(  # the usage does not say which kind its cached tokens were: text
        Usage(
            input_tokens=300,
            output_tokens=120,
            cache_read_tokens=64,
            cache_text_read_tokens=64,
            cache_audio_read_tokens=0,
            input_text_tokens=100,
            input_audio_tokens=200,
            output_text_tokens=20,
            output_audio_tokens=100,
        ),
        "gpt-realtime",
        provider_id="openai",
    ).total_price
    assert (c.usd, c.input_tokens, c.output_tokens, c.cached_tokens) == (Decimal(expected), 300, 120, 64)
    assert ws_meter.realtime_cost(SETTINGS, "no-such-model", {"response": {"usage": usage}}) is None  # deny: unpriced
