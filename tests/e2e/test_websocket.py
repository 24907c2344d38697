"""WebSocket end to end: a real client (the `websockets` package, through the proxy as an
HTTP proxy) talks to a local TLS WebSocket API (tests/support/ws_upstream.py) through the real
proxy. Secrets echoed back are masked in every shape a frame can carry them; fake keys sent
to an unbound host close the connection; model calls over WebSocket are refused, reserved
and priced like HTTP calls; the kill switch cuts an open connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
import time
from decimal import Decimal
from typing import Any

import pytest
import websockets
from click.testing import CliRunner
from genai_prices import Usage, calc_price
from support.clients import raw_connect
from support.llm.common import REAL
from support.proxy import RunningProxy
from support.upstream import Upstream
from test_credentials import assert_no_real_secret, mint
from websockets.asyncio.client import ClientConnection, connect

from egress_guard.cli import main
from egress_guard.forms import SecretForms

SECRET = REAL["openai"]
MASK = b"[REDACTED-by-egress-guard]"


@pytest.fixture
def ws_config(ws_up: Upstream, test_ca) -> dict[str, Any]:
    hosts = ["api.openai.com", "api.test.local"]
    return {
        "allowlists": ["openai"],
        "allow": [{"host": h, "ports": [ws_up.port]} for h in hosts],
        "services": ["openai"],
        "agents": {
            "researcher": {"services": ["openai"]},
            "writer": {"services": ["openai"], "limits": {"models": {"openai": ["gpt-5-mini", "gpt-realtime"]}}},
        },
        "network": {"hosts": {h: ["127.0.0.1"] for h in hosts}, "upstream_ca": str(test_ca[1])},
    }


@pytest.fixture
def ws_proxy(make_proxy, ws_config, real_env) -> RunningProxy:
    return make_proxy(**ws_config)


def ws(proxy: RunningProxy, url: str, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return connect(
        url, proxy=proxy.url, ssl=proxy.client_context(), additional_headers=headers, open_timeout=10, max_size=None
    )


async def recv(conn: ClientConnection, timeout: float = 5) -> str | bytes:
    return await asyncio.wait_for(conn.recv(), timeout)


def raw(message: str | bytes) -> bytes:
    return message.encode() if isinstance(message, str) else message


def rows_of(proxy: RunningProxy, n: int) -> list[dict[str, Any]]:
    return [r for r in proxy.rows(expect=n) if r["kind"] == "request"]


def assert_no_form(data: bytes) -> None:
    """No form of the real key egress-guard recognises (raw, base64 at any offset, hex, escapes)."""
    assert SecretForms(SECRET).scrub(data) == data, "a form of the real key reached the agent"
    assert SECRET.encode() not in data


# --- to the agent: the real secret never arrives ------------------------------------------------


@pytest.mark.parametrize("command", ["text", "binary", "fragmented", "base64"])
async def test_secret_echoed_in_a_message_is_masked(ws_proxy: RunningProxy, ws_up: Upstream, command: str) -> None:
    key = mint(ws_proxy).env["OPENAI_API_KEY"]
    async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/echo", key) as conn:
        await conn.send(f"secret:{command}")
        message = await recv(conn)
    assert isinstance(message, bytes if command == "binary" else str)  # the frame type is kept
    got = raw(message)
    assert_no_form(got)
    assert MASK[:20] in got  # masked, not dropped
    upgrade = next(r for r in ws_up.state.requests if r.get("path") == "/echo" and "headers" in r)
    assert upgrade["headers"]["authorization"] == f"Bearer {SECRET}"  # the upstream did get the real key


@pytest.mark.parametrize("k", [1, 3, 4, 10, 40, len(SECRET) - 1])
async def test_secret_split_across_two_messages_is_masked(ws_proxy: RunningProxy, ws_up: Upstream, k: int) -> None:
    """The upstream ends one message with the key's first k characters and starts the next
    with the rest: the agent never holds the whole key, and both messages still arrive."""
    key = mint(ws_proxy).env["OPENAI_API_KEY"]
    async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/echo", key) as conn:
        await conn.send(f"secret:split:{k}")
        first, second = raw(await recv(conn)), raw(await recv(conn))
    assert first.startswith(b"first part ") and second.endswith(b" second part")
    assert len(first) == len("first part ") + k and len(second) == len(SECRET) - k + len(" second part")
    assert_no_form(first + second)
    if k >= 4:  # held until the rest came: the first message's tail is masked too
        assert SECRET[:k].encode() not in first


async def test_secret_split_across_messages_a_second_apart(ws_proxy: RunningProxy, ws_up: Upstream) -> None:
    """The hold is short: the first message goes on after it, and the rest of the key is
    masked in the message that completes it."""
    key = mint(ws_proxy).env["OPENAI_API_KEY"]
    async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/echo", key) as conn:
        await conn.send("secret:split-slow:40")
        t0 = time.monotonic()
        first = raw(await recv(conn))
        held_for = time.monotonic() - t0
        second = raw(await recv(conn))
    assert held_for < 0.9  # released after the hold, not when the rest came (1 s later)
    assert first == b"first part " + SECRET[:40].encode()
    assert_no_form(first + second)
    assert second.endswith(b" second part") and SECRET[40:].encode() not in second


async def test_ordinary_messages_pass_unchanged_and_unheld(ws_proxy: RunningProxy, ws_up: Upstream) -> None:
    key = mint(ws_proxy).env["OPENAI_API_KEY"]
    async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/echo", key) as conn:
        t0 = time.monotonic()
        await conn.send("secret:json:50")
        got = [await recv(conn) for _ in range(50)]
        elapsed = time.monotonic() - t0
        await conn.send(b"\x00binary stays binary")
        assert await recv(conn) == b"\x00binary stays binary"
    assert got == [json.dumps({"type": "ordinary", "i": i, "text": "sk-proj- is how keys start"}) for i in range(50)]
    assert elapsed < 2


# --- from the agent: no key leaves for a host it is not bound to -----------------------------------


@pytest.mark.parametrize(
    "encode",
    [
        lambda k: json.dumps({"note": k}),
        lambda k: base64.b64encode(f"Bearer {k}".encode()).decode(),
        lambda k: "".join(f"%{b:02X}" for b in k.encode()),
    ],
    ids=["plain", "base64", "percent"],
)
async def test_fake_key_in_a_message_to_an_unbound_host_closes_it(
    ws_proxy: RunningProxy, ws_up: Upstream, encode
) -> None:
    key = mint(ws_proxy).env["OPENAI_API_KEY"]
    async with ws(ws_proxy, f"wss://api.test.local:{ws_up.port}/echo") as conn:
        await conn.send("hello")
        assert await recv(conn) == "hello"
        await conn.send(encode(key))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv(conn)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert "egress-guard" in closed.value.rcvd.reason
    seen = [r["ws_message"] for r in ws_up.state.requests if "ws_message" in r]
    assert seen == ["hello"]  # the key never reached the upstream
    # the upstream's thread records the close frame it got; the agent may see its own first
    closing = {"ws_close": 1008, "reason": closed.value.rcvd.reason}
    deadline = time.monotonic() + 5
    while closing not in ws_up.state.requests and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert closing in ws_up.state.requests
    rows = rows_of(ws_proxy, 4)  # CONNECT, the upgrade, the refusal, the end
    leak = next(r for r in rows if r["request_id"].endswith(":ws-leak"))
    assert (leak["decision"], leak["credential"], leak["status"]) == ("deny", "denied-unbound-host", 403)
    assert "an egress-guard key for openai was sent to api.test.local in a WebSocket message" in leak["reason"]
    end = next(r for r in rows if r["request_id"].endswith(":close"))
    assert end["decision"] == "deny" and "closed by egress-guard (1008)" in end["reason"]


async def test_fake_key_split_across_messages_never_arrives_whole(ws_proxy: RunningProxy, ws_up: Upstream) -> None:
    key = mint(ws_proxy).env["OPENAI_API_KEY"]
    async with ws(ws_proxy, f"wss://api.test.local:{ws_up.port}/echo") as conn:
        await conn.send("start " + key[:50])
        assert await recv(conn) == "start " + key[:50]
        await conn.send(key[50:] + " end")
        with pytest.raises(websockets.ConnectionClosed):
            await recv(conn)
    seen = "".join(r["ws_message"] for r in ws_up.state.requests if "ws_message" in r)
    assert key not in seen and key[50:] not in seen


# --- the upgrade -------------------------------------------------------------------------------


async def test_service_with_websocket_false_refuses_the_upgrade(make_proxy, ws_config, real_env, ws_up) -> None:
    ws_config["services"] = [{"preset": "openai", "websocket": False}]
    proxy = make_proxy(**ws_config)
    key = mint(proxy).env["OPENAI_API_KEY"]
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with ws(proxy, f"wss://api.openai.com:{ws_up.port}/v1/responses", key):
            pass
    assert refused.value.response.status_code == 426  # "use HTTP": Codex CLI falls back to it at once
    assert b"WebSocket is turned off for openai (services.openai.websocket: false)" in refused.value.response.body
    assert not [r for r in ws_up.state.requests if r.get("path") == "/v1/responses"]
    row = rows_of(proxy, 2)[-1]
    assert (row["decision"], row["status"], row["path"]) == ("deny", 426, "/v1/responses")


def test_a_websocket_the_request_did_not_announce_is_closed(make_proxy, ws_config, real_env, ws_up) -> None:
    """mitmproxy takes a 101 with Upgrade: websocket as a WebSocket whatever the request said:
    one opened without an Upgrade header still meets `websocket: false`, closed at once."""
    ws_config["services"] = [{"preset": "openai", "websocket": False}]
    proxy = make_proxy(**ws_config)
    key = mint(proxy).env["OPENAI_API_KEY"]
    sock, head = raw_connect(proxy.port, f"api.openai.com:{ws_up.port}")
    assert head.startswith(b"HTTP/1.1 200")
    tls = proxy.client_context().wrap_socket(sock, server_hostname="api.openai.com")
    tls.sendall(
        f"GET /sneaky-upgrade HTTP/1.1\r\nHost: api.openai.com:{ws_up.port}\r\nAuthorization: Bearer {key}\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
    )
    data = b""
    with contextlib.suppress(OSError):
        while chunk := tls.recv(65536):
            data += chunk
    tls.close()
    head, _, frames = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    assert frames[:1] == b"\x88" and frames[2:4] == (1008).to_bytes(2, "big")  # a close frame, 1008
    assert b"WebSocket is turned off for openai" in frames
    end = next(r for r in rows_of(proxy, 3) if r["request_id"].endswith(":close"))
    assert end["decision"] == "deny" and "closed by egress-guard (1008)" in end["reason"]


async def test_unmeterable_endpoint_of_a_metered_service_is_refused_to_a_limited_agent(
    ws_proxy: RunningProxy, ws_up: Upstream
) -> None:
    key = mint(ws_proxy, agent="writer").env["OPENAI_API_KEY"]
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/echo", key):
            pass
    assert refused.value.response.status_code == 403
    assert b"egress-guard cannot meter WebSocket calls to /echo of openai, and agent writer has limits there" in (
        refused.value.response.body
    )


# --- metered calls -----------------------------------------------------------------------------


def create(model: str, **fields: Any) -> str:
    return json.dumps(
        {"type": "response.create", "model": model, "input": [{"role": "user", "content": "hi"}], **fields}
    )


async def until(conn: ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Events up to and including the first of type `kind`."""
    events = []
    while True:
        event = json.loads(await recv(conn))
        events.append(event)
        if event["type"] == kind:
            return events


def price(model: str, usage: dict[str, Any]) -> Decimal:
    cached = usage["input_tokens_details"]["cached_tokens"]
    u = Usage(input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"], cache_read_tokens=cached)
    return Decimal(calc_price(u, model, provider_id="openai").total_price)


async def test_responses_calls_over_websocket_are_priced_exactly(ws_proxy: RunningProxy, ws_up: Upstream) -> None:
    minted = mint(ws_proxy)
    async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/v1/responses", minted.env["OPENAI_API_KEY"]) as conn:
        await conn.send(create("gpt-5.1-codex-mini", generate=False))  # Codex's warm-up
        await until(conn, "response.completed")
        await conn.send(create("gpt-5.1-codex-mini", previous_response_id="resp_ws_1", max_output_tokens=77))
        events = await until(conn, "response.completed")
        assert "".join(e.get("delta", "") for e in events if e["type"] == "response.output_text.delta") == "pong"
        await conn.send(create("gpt-5-mini", max_output_tokens=5))
        await until(conn, "response.completed")
    reported = ws_up.state.reported
    assert [r["usage"]["output_tokens"] for r in reported] == [0, 77, 5]
    rows = rows_of(ws_proxy, 6)
    calls = [r for r in rows if r["method"] == "WS" and ":ws" in r["request_id"]]
    assert len(calls) == 3
    for row, rep in zip(calls, reported, strict=True):
        assert (row["model"], row["decision"], row["status"]) == (rep["model"], "allow", 200)
        assert (row["input_tokens"], row["output_tokens"]) == (
            rep["usage"]["input_tokens"],
            rep["usage"]["output_tokens"],
        )
        assert row["cached_tokens"] == 1024
        assert Decimal(row["cost_usd"]) == price(rep["model"], rep["usage"])
        assert (row["agent"], row["session"], row["credential"]) == ("researcher", minted.record.session, "swapped")
    end = next(r for r in rows if r["request_id"].endswith(":close"))
    assert (
        "3 messages" in end["reason"]
        and "3 model calls" in end["reason"]
        and "closed by the agent (1000)" in end["reason"]
    )
    assert (end["ws_messages_out"], end["ws_close_code"], end["status"]) == (3, 1000, None)
    assert end["ws_messages_in"] >= 3 and end["request_bytes"] > 0 and end["response_bytes"] > 0
    total = sum((Decimal(r["cost_usd"]) for r in calls), Decimal(0))
    assert f"${total:f} billed" in end["reason"]
    # `audit spend` counts them as it counts HTTP calls
    out = CliRunner().invoke(
        main, ["audit", "spend", "--config", str(ws_proxy.config.path), "--by", "model", "--format", "json"]
    )
    assert out.exit_code == 0, out.output
    by_model = {r["model"]: r for r in json.loads(out.output)}
    assert by_model["gpt-5.1-codex-mini"]["requests"] == 2
    assert Decimal(by_model["gpt-5-mini"]["cost_usd"]) == Decimal(calls[2]["cost_usd"])
    assert_no_real_secret(ws_proxy)


async def test_model_allowlist_applies_to_each_response_create(ws_proxy: RunningProxy, ws_up: Upstream) -> None:
    key = mint(ws_proxy, agent="writer").env["OPENAI_API_KEY"]
    async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/v1/responses", key) as conn:
        await conn.send(create("gpt-5.1-codex-mini"))
        error = json.loads(await recv(conn))
        assert error["type"] == "error" and error["status"] == 403
        assert error["error"]["code"] == "model_not_allowed"
        assert (
            "model 'gpt-5.1-codex-mini' is not allowed for agent writer on openai (allowed: gpt-5-mini, gpt-realtime)"
            in (error["error"]["message"])
        )
        await conn.send(create("gpt-5-mini"))  # the connection is still good for an allowed model
        await until(conn, "response.completed")
    assert [r["model"] for r in ws_up.state.reported] == ["gpt-5-mini"]
    denied = [r for r in rows_of(ws_proxy, 5) if r["decision"] == "deny"]
    assert [(r["method"], r["status"], r["model"]) for r in denied] == [("WS", 403, "gpt-5.1-codex-mini")]


async def test_budget_is_checked_per_response_create(make_proxy, ws_config, real_env, ws_up) -> None:
    ws_config["agents"]["researcher"]["limits"] = {"budget_usd": {"day": 0.01}}
    proxy = make_proxy(**ws_config)
    key = mint(proxy).env["OPENAI_API_KEY"]
    async with ws(proxy, f"wss://api.openai.com:{ws_up.port}/v1/responses", key) as conn:
        await conn.send(create("gpt-5-mini", max_output_tokens=10))  # fits
        await until(conn, "response.completed")
        await conn.send(create("gpt-5-mini", max_output_tokens=100_000))  # may cost more than what is left
        error = json.loads(await recv(conn))
    assert error["type"] == "error" and error["status"] == 429 and "day budget of $0.01" in error["error"]["message"]
    assert error["headers"]["retry-after"].isdigit()
    assert len(ws_up.state.reported) == 1


async def test_messages_the_api_could_read_differently_are_refused(ws_proxy: RunningProxy, ws_up: Upstream) -> None:
    """A metered API's messages are read strictly: what egress-guard cannot be sure it reads
    as the server will (a repeated key, not JSON, binary) is refused, not forwarded unmetered."""
    key = mint(ws_proxy, agent="writer").env["OPENAI_API_KEY"]
    sneaky = '{"type": "response.create", "model": "gpt-5-mini", "model": "gpt-5-pro", "input": []}'
    async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/v1/responses", key) as conn:
        for message, why in [
            (sneaky, "the key 'model' appears twice"),
            ('{"type": "response.create", "model": "gpt-5-pro",}', "not JSON"),
            (create("gpt-5-pro").encode(), "binary messages are not part of this API"),
        ]:
            await conn.send(message)
            error = json.loads(await recv(conn))
            assert (error["type"], error["status"], error["error"]["code"]) == ("error", 400, "invalid_request")
            assert why in error["error"]["message"]
        # an escaped type is still a response.create, and judged as one
        await conn.send('{"type": "response\\u002ecreate", "model": "gpt-5\\u002dpro", "input": []}')
        error = json.loads(await recv(conn))
        assert error["error"]["code"] == "model_not_allowed" and "'gpt-5-pro'" in error["error"]["message"]
    assert not [r for r in ws_up.state.requests if "ws_message" in r]  # none reached the API


async def test_a_call_refused_by_the_api_costs_nothing_and_one_cut_short_its_reservation(
    ws_proxy: RunningProxy, ws_up: Upstream
) -> None:
    key = mint(ws_proxy).env["OPENAI_API_KEY"]
    async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/v1/responses", key) as conn:
        await conn.send(create("gpt-5-mini", metadata={"x_test": "refuse"}))
        assert json.loads(await recv(conn))["status"] == 400
        await conn.send(create("gpt-5-mini", max_output_tokens=1000, metadata={"x_test": "hang"}))
        assert json.loads(await recv(conn))["type"] == "response.created"
        # the reservation is committed before the call goes out: a crash now still bills it
        db = sqlite3.connect(ws_proxy.config.audit_path)
        intents = db.execute("SELECT request_id, model, reserved_usd FROM spend_intents").fetchall()
        db.close()
        assert [(i[0].endswith(":ws2"), i[1]) for i in intents] == [(True, "gpt-5-mini")]
    calls = [r for r in rows_of(ws_proxy, 5) if ":ws" in r["request_id"]]
    refused, cut = calls
    assert (refused["status"], refused["cost_usd"], refused["decision"]) == (400, None, "allow")  # as over HTTP
    assert "the upstream answered with an error event (status 400)" in refused["reason"]
    assert Decimal(cut["cost_usd"]) == Decimal(intents[0][2]) > 0  # billed at what it reserved
    assert "the connection closed before the response completed: billed at its reservation" in cut["reason"]


async def test_kill_switch_cuts_an_open_websocket(ws_proxy: RunningProxy, ws_up: Upstream) -> None:
    minted = mint(ws_proxy)
    async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/echo", minted.env["OPENAI_API_KEY"]) as conn:
        await conn.send("ping")
        assert await recv(conn) == "ping"
        killed = time.monotonic()
        result = await asyncio.to_thread(
            CliRunner().invoke, main, ["kill", "--config", str(ws_proxy.config.path), "--agent", "researcher"]
        )
        assert result.exit_code == 0, result.output
        with pytest.raises(websockets.ConnectionClosed):
            await recv(conn, timeout=3)
        assert time.monotonic() - killed < 1.5
    end = next(r for r in rows_of(ws_proxy, 3) if r["request_id"].endswith(":close"))
    assert (
        end["decision"] == "deny" and f"cut: its key {minted.record.key_id} was revoked (kill switch)" in end["reason"]
    )
    assert "1 messages (4 bytes) from the agent, 1 messages (4 bytes) from the upstream" in end["reason"]


# --- the Realtime API ------------------------------------------------------------------------------


async def test_realtime_usage_is_priced_with_its_audio_tokens(ws_proxy: RunningProxy, ws_up: Upstream) -> None:
    key = mint(ws_proxy, agent="writer").env["OPENAI_API_KEY"]
    async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/v1/realtime?model=gpt-realtime", key) as conn:
        assert json.loads(await recv(conn))["type"] == "session.created"
        await conn.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 500}}))
        await until(conn, "response.done")
        await conn.send(json.dumps({"type": "input_audio_buffer.commit"}))  # server VAD answers by itself
        await until(conn, "response.done")
    calls = [r for r in rows_of(ws_proxy, 5) if ":ws" in r["request_id"]]
    assert len(calls) == 2
    from genai_prices import data_snapshot

    provider = data_snapshot.get_snapshot().find_provider(None, "openai", None)
    for row, rep in zip(calls, ws_up.state.reported, strict=True):
        _, usage = provider.extract_usage(
            {"model": "gpt-realtime", "response": {"usage": rep["usage"]}}, api_flavor="realtime"
        )
        assert usage.input_audio_tokens == 200 and usage.output_audio_tokens == 100
        assert Decimal(row["cost_usd"]) == Decimal(calc_price(usage, "gpt-realtime", provider_id="openai").total_price)
        assert (row["model"], row["input_tokens"], row["output_tokens"], row["cached_tokens"]) == (
            "gpt-realtime",
            300,
            120,
            64,
        )


async def test_realtime_model_outside_the_allowlist_is_refused_at_the_upgrade(ws_proxy: RunningProxy, ws_up) -> None:
    key = mint(ws_proxy, agent="writer").env["OPENAI_API_KEY"]
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/v1/realtime?model=gpt-realtime-mini", key):
            pass
    assert refused.value.response.status_code == 403
    assert b"model 'gpt-realtime-mini' is not allowed for agent writer" in refused.value.response.body


# --- control frames: ping/pong payloads and close reasons pass no message hook ---------------


async def test_the_secret_in_an_upstream_close_reason_is_masked(ws_proxy: RunningProxy, ws_up: Upstream) -> None:
    key = mint(ws_proxy).env["OPENAI_API_KEY"]
    async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/echo", key) as conn:
        await conn.send("secret:close")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv(conn)
    reason = closed.value.rcvd.reason if closed.value.rcvd else ""
    assert SECRET not in reason and reason.startswith(MASK.decode()[:10])


@pytest.mark.parametrize("frame", ["ping", "pong"])
async def test_the_secret_in_an_upstream_ping_or_pong_is_masked(
    ws_proxy: RunningProxy, ws_up: Upstream, frame: str
) -> None:
    key = mint(ws_proxy).env["OPENAI_API_KEY"]
    payloads: list[bytes] = []
    async with ws(ws_proxy, f"wss://api.openai.com:{ws_up.port}/echo", key) as conn:
        receive = conn.protocol.receive_data

        def spy(data: bytes) -> None:  # every byte the agent's side receives, frames included
            payloads.append(bytes(data))
            receive(data)

        conn.protocol.receive_data = spy  # type: ignore[method-assign]
        await conn.send(f"secret:{frame}")
        await conn.send("hello")
        assert await recv(conn) == "hello"
    assert not any(SECRET.encode() in p for p in payloads)
    assert any(MASK[:10] in p for p in payloads)


async def test_a_fake_key_in_an_agent_close_reason_or_ping_does_not_reach_an_unbound_host(
    make_proxy, ws_config: dict[str, Any], real_env, ws_up: Upstream
) -> None:
    ws_config["allowlists"].append("github")
    ws_config["services"].append("github")
    ws_config["agents"]["researcher"]["services"].append("github")
    ws_proxy = make_proxy(**ws_config)
    key = mint(ws_proxy).env["GH_TOKEN"]  # short enough for one control frame (125 bytes)
    async with ws(ws_proxy, f"wss://api.test.local:{ws_up.port}/echo") as conn:
        pong = await conn.ping(key.encode())
        with contextlib.suppress(asyncio.TimeoutError, websockets.ConnectionClosed):
            await asyncio.wait_for(pong, 3)
    async with ws(ws_proxy, f"wss://api.test.local:{ws_up.port}/echo") as conn:
        await conn.send("hello")
        assert await recv(conn) == "hello"
        await conn.close(code=1000, reason=key)
    await asyncio.sleep(0.3)
    closes = [r for r in ws_up.state.requests if "ws_close" in r]
    assert not any(key in (r["reason"] or "") for r in closes)
    leaks = [r for r in rows_of(ws_proxy, 4) if r["request_id"].endswith(":ws-leak")]
    assert len(leaks) == 2 and all(r["credential"] == "denied-unbound-host" for r in leaks)
