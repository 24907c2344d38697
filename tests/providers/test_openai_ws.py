"""OpenAI's model calls over WebSocket (Responses WebSocket mode, Realtime): which messages
start and end calls, and what they cost. Tables of messages, no sockets."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price

from egress_guard import providers
from egress_guard.providers import openai_ws
from egress_guard.providers.base import reservation
from egress_guard.providers.ws import Create, Failed, Finished, SetModel, Started, Unreadable
from egress_guard.spend import SpendSettings

SETTINGS = SpendSettings()
OPENAI = providers.get("openai")


def msg(obj: object) -> bytes:
    return json.dumps(obj).encode()


def client(kind: str, data: bytes, session_model: str = "", price_as: str = "") -> object:
    path = "/v1/responses" if kind == "responses" else "/v1/realtime"
    return openai_ws.client_message(kind, path, session_model, data, OPENAI.meter, price_as)


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
        ("github", "/v1/responses", None),
    ],
)
def test_which_websockets_are_metered(api: str, path: str, expected: str | None) -> None:
    reader = providers.get(api).websocket(path, "")
    assert (None if reader is None else reader.flavor) == expected


def test_response_create_is_a_call_with_its_model_and_cap() -> None:
    event = client("responses", msg({"type": "response.create", "model": "gpt-5-mini", "max_output_tokens": 55}))
    assert isinstance(event, Create) and not event.carried
    m = event.metered
    assert (m.api, m.flavor, m.model, m.max_output, m.stream) == ("openai", "responses", "gpt-5-mini", 55, True)


def test_response_create_nested_and_continued() -> None:
    data = msg({"type": "response.create", "previous_response_id": "r1", "response": {"model": "gpt-5", "input": []}})
    event = client("responses", data, price_as="azure")
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
    assert client("responses", data) is None


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
    event = client("responses", data)
    assert isinstance(event, Unreadable) and why in event.reason


def test_an_escaped_call_is_still_a_call() -> None:
    event = client("responses", b'{"type": "response\\u002ecreate", "model": "gpt-5\\u002dpro"}')
    assert isinstance(event, Create) and event.metered.model == "gpt-5-pro"


def test_realtime_messages() -> None:
    create = client("realtime", msg({"type": "response.create", "response": {"max_output_tokens": 9}}), "gpt-realtime")
    assert isinstance(create, Create) and create.carried
    assert (create.metered.flavor, create.metered.model, create.metered.max_output) == ("realtime", "gpt-realtime", 9)
    update = client("realtime", msg({"type": "session.update", "session": {"model": "gpt-realtime-mini"}}))
    assert update == SetModel("gpt-realtime-mini")
    assert openai_ws.url_model("/v1/realtime?model=gpt-realtime&x=1") == "gpt-realtime"
    assert openai_ws.url_model("/v1/realtime") == ""


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
        ("responses", {"type": "error", "status_code": 429, "error": {"code": "slow"}}, Failed(429, "slow")),
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
    assert openai_ws.server_message(api, msg(obj)) == expected


def test_a_realtime_reader_keeps_the_sessions_model_and_the_input_it_was_given() -> None:
    reader = OPENAI.websocket("/v1/realtime?model=gpt-realtime", "")
    assert reader is not None and reader.server_starts_calls and reader.model == "gpt-realtime"
    audio = msg({"type": "input_audio_buffer.append", "audio": "A" * 6400})
    text = msg({"type": "conversation.item.create", "item": {"text": "x" * 300}})
    reader.from_agent(audio)
    reader.from_agent(text)
    # base64 PCM at about 3200 bytes a token (rounded up), text at one token per 3 bytes
    assert reader.pending_tokens() == 3 + len(text) // 3
    assert reader.from_upstream(msg({"type": "session.updated", "session": {"model": "gpt-realtime-mini"}}))
    assert reader.model == "gpt-realtime-mini" and reader.unasked().model == "gpt-realtime-mini"
    assert isinstance(reader.from_upstream(msg({"type": "response.done", "response": {"usage": USAGE}})), Finished)
    assert reader.pending_tokens() == 0  # billed with that response
    responses = OPENAI.websocket("/v1/responses", "")
    assert responses is not None and not responses.server_starts_calls
    responses.from_agent(msg({"type": "response.create", "model": "gpt-5"}))
    assert responses.pending_tokens() == 0  # the message itself is the prompt


def test_realtime_reservation_is_priced_as_audio() -> None:
    event = client(
        "realtime", msg({"type": "response.create", "response": {"max_output_tokens": 1000}}), "gpt-realtime"
    )
    assert isinstance(event, Create)
    usd, tokens = OPENAI.reservation(SETTINGS, event.metered)
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
    reader = OPENAI.websocket("/v1/realtime?model=gpt-realtime", "")
    assert reader is not None
    c = OPENAI.cost(SETTINGS, reader.unasked(), {"response": {"usage": usage}})
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
    assert openai_ws.realtime_cost(SETTINGS, "no-such-model", {"response": {"usage": usage}}) is None  # deny: unpriced
