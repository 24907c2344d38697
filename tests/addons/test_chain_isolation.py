"""Chain isolates its members, on the real proxy: a member that raises, first in the chain
(so before every guard and the recorder), never costs the audit row or another member's
work. In a request-phase hook it refuses the flow (502); in a response hook it kills the
flow; in `server_connect` the connection is not dialled; in `error` and
`client_disconnected` it is only logged. Every other member still runs."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from support.clients import curl, raw_connect
from support.proxy import RunningProxy
from support.upstream import Upstream

from egress_guard import addons
from egress_guard.addons.connect_guard import ConnectGuard
from egress_guard.addons.recorder import AuditRecorder
from egress_guard.addons.request_guard import RequestGuard
from egress_guard.addons.timeouts import TimeoutWatch

Start = Callable[..., tuple[RunningProxy, list[Any]]]


def raiser(hook: str) -> Any:
    """A chain member whose only hook, `hook`, raises."""

    def fail(self: Any, *args: Any) -> None:
        raise RuntimeError(f"{hook} exploded")

    fail.__qualname__ = f"Raiser.{hook}"
    return type("Raiser", (), {hook: fail})()


@pytest.fixture
def start(monkeypatch: pytest.MonkeyPatch, make_proxy: Callable[..., RunningProxy]) -> Start:
    """Start the real proxy with a member first in its chain that raises in `hook`; returns
    the proxy and the chain's members."""

    def run(hook: str, **config: Any) -> tuple[RunningProxy, list[Any]]:
        members: list[Any] = []
        original = addons.chain

        def chain(rt: addons.Runtime) -> tuple[list[Any], list[Any]]:
            flow_addons, background = original(rt)
            members.extend([raiser(hook), *flow_addons])
            return members, background

        monkeypatch.setattr(addons, "chain", chain)  # EgressProxy calls addons.chain
        proxy = make_proxy(**config)
        assert isinstance(members[-1], AuditRecorder)
        return proxy, members

    return run


def request_rows(proxy: RunningProxy) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        rows = [r for r in proxy.rows() if r["kind"] == "request"]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


@pytest.mark.parametrize("hook", ["requestheaders", "request"])
def test_a_raise_in_a_request_hook_refuses_with_502_and_is_recorded(
    start: Start, upstream: Upstream, hook: str
) -> None:
    proxy, _ = start(hook)
    status, headers, body = curl(proxy, f"https://api.test.local:{upstream.port}/json")
    assert status == 502 and headers["x-egress-guard-decision"] == "error"
    assert f"internal error in Raiser.{hook} (RuntimeError)" in body
    assert upstream.state.requests == []
    row = proxy.row_for(headers["x-egress-guard-request-id"])
    assert (row["decision"], row["status"]) == ("error", 502)
    assert f"Raiser.{hook}" in row["reason"]


def test_a_raise_in_http_connect_refuses_the_tunnel_and_is_recorded(start: Start, upstream: Upstream) -> None:
    proxy, _ = start("http_connect")
    sock, response = raw_connect(proxy.port, f"api.test.local:{upstream.port}")
    sock.close()
    assert response.startswith(b"HTTP/1.1 502") and b"Raiser.http_connect" in response
    assert upstream.state.connections == 0
    rows = proxy.rows(expect=1)
    assert [(r["kind"], r["decision"], r["status"]) for r in rows] == [("connect", "error", 502)]


@pytest.mark.parametrize("hook", ["responseheaders", "response"])
def test_a_raise_in_a_response_hook_kills_the_flow_and_is_recorded(start: Start, upstream: Upstream, hook: str) -> None:
    proxy, _ = start(hook)
    try:
        status = curl(proxy, f"https://api.test.local:{upstream.port}/json")[0]
    except AssertionError:  # curl: the connection was cut with no response
        status = 0
    assert status != 200  # the response may be unscrubbed: it never reaches the agent whole
    rows = request_rows(proxy)
    assert len(rows) == 1 and rows[0]["decision"] == "error", rows
    assert f"internal error in Raiser.{hook} (RuntimeError)" in rows[0]["reason"]


def test_a_raise_in_error_is_logged_and_the_failure_still_answered_and_recorded(start: Start) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the flow fails, and `error` runs
    proxy, _ = start("error", allow=[{"host": "api.test.local", "ports": [port]}])
    status, headers, _ = curl(proxy, f"https://api.test.local:{port}/v1/x")
    assert status == 502  # FailureAnswers, after the member that raised, still answered
    row = proxy.row_for(headers["x-egress-guard-request-id"])  # and AuditRecorder still wrote the row
    assert (row["decision"], row["status"]) == ("error", 502)
    assert "failed" in row["reason"], row["reason"]


def test_a_raise_in_server_connect_is_not_dialled_and_is_recorded(start: Start, upstream: Upstream) -> None:
    proxy, _ = start("server_connect")
    status, headers, body = curl(proxy, f"https://api.test.local:{upstream.port}/json")
    assert status == 502 and "Raiser.server_connect failed (RuntimeError)" in body
    assert upstream.state.connections == 0
    row = proxy.row_for(headers["x-egress-guard-request-id"])
    assert (row["decision"], row["status"]) == ("error", 502)


def test_a_raise_in_client_disconnected_leaves_the_others_to_forget_the_connection(
    start: Start, upstream: Upstream
) -> None:
    proxy, members = start("client_disconnected")
    assert curl(proxy, f"https://api.test.local:{upstream.port}/json")[0] == 200
    (connect,) = [m for m in members if isinstance(m, ConnectGuard)]
    (request,) = [m for m in members if isinstance(m, RequestGuard)]
    (watch,) = [m for m in members if isinstance(m, TimeoutWatch)]

    def remembered() -> list[Any]:
        return [x for x in (connect.tunnels, request.vetted, watch._idle, watch._live) if x]

    deadline = time.monotonic() + 5
    while remembered() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert remembered() == []  # every member after the one that raised forgot the closed connection
    assert proxy.rows(expect=2)[-1]["status"] == 200
