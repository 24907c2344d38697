"""The addons on mitmproxy's own test flows (tflow): the guarantees no end-to-end test can
reach, because a correct chain never gets there."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import tflow
from support.policy import FixedPolicy

from egress_guard.addons import Chain
from egress_guard.addons._flow import fail_closed, rejection, safe_text
from egress_guard.addons.connect_guard import ConnectGuard
from egress_guard.addons.failures import refused_head, upstream_reason
from egress_guard.addons.flow import state
from egress_guard.addons.recorder import AuditRecorder
from egress_guard.addons.request_guard import RequestGuard
from egress_guard.policy import Decision, Rule, Verdict
from egress_guard.resolve import Resolver
from egress_guard.store import AuditLog


async def test_recorder_refuses_a_request_no_guard_decided_on(tmp_path: Path) -> None:
    flow = tflow.tflow()
    await AuditRecorder(AuditLog(tmp_path / "a.db")).requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 502
    assert flow.response.headers["X-Egress-Guard-Decision"] == "error"
    assert "no egress-guard decision" in flow.response.headers["X-Egress-Guard-Reason"]


async def test_recorder_refuses_an_undecided_connect_and_records_it(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    flow = tflow.tflow()
    flow.request.method = "CONNECT"
    await AuditRecorder(log).http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 502
    assert [r.decision for r in log._pending] == ["error"]


async def test_recorder_leaves_a_decided_request_alone(tmp_path: Path) -> None:
    flow = tflow.tflow()
    state(flow).decision = Decision(Verdict.ALLOW, "ok", "inline#0")
    await AuditRecorder(AuditLog(tmp_path / "a.db")).requestheaders(flow)
    assert flow.response is None


def _dial(guard: RequestGuard, client: Any, address: tuple[str, int]) -> ServerConnectionHookData:
    data = ServerConnectionHookData(server=tflow.tserver_conn(), client=client)
    data.server.address = address
    data.server.sni = address[0]
    guard.server_connect(data)
    return data


async def test_server_connect_dials_only_what_was_vetted_for_a_request_in_progress_on_that_connection() -> None:
    resolver = Resolver(pinned={"api.openai.com": (ipaddress.ip_address("203.0.113.7"),)})
    guard = RequestGuard(FixedPolicy([Rule("r", "api.openai.com", ports=frozenset({443}))]), {}, resolver)
    flow = tflow.tflow()
    flow.request.host, flow.request.port, flow.request.scheme = "api.openai.com", 443, "https"
    flow.request.headers["host"] = "api.openai.com"
    await guard.requestheaders(flow)
    assert flow.response is None and flow.request.host == "203.0.113.7"
    other = tflow.tclient_conn()  # another agent connection: the address was not vetted for it
    assert "did not vet" in (_dial(guard, other, ("203.0.113.7", 443)).server.error or "")
    assert "did not vet" in (_dial(guard, flow.client_conn, ("203.0.113.7", 80)).server.error or "")
    assert "did not vet" in (_dial(guard, flow.client_conn, ("api.openai.com", 443)).server.error or "")
    assert _dial(guard, flow.client_conn, ("203.0.113.7", 443)).server.error is None
    guard.response(flow)  # the request is over: what was vetted for it is forgotten
    assert "did not vet" in (_dial(guard, flow.client_conn, ("203.0.113.7", 443)).server.error or "")
    assert guard.vetted == {flow.client_conn.id: {}}
    guard.client_disconnected(flow.client_conn)
    assert guard.vetted == {}  # nothing outlives the connection


def test_server_connect_verifies_against_the_agents_name() -> None:
    guard = RequestGuard(FixedPolicy(), {}, Resolver())
    client = tflow.tclient_conn()
    guard.vetted[client.id] = {"f1": ("203.0.113.7", 443)}
    client.sni = "api.openai.com"
    data = _dial(guard, client, ("203.0.113.7", 443))
    assert data.server.error is None and data.server.sni == "api.openai.com"


async def test_pinned_hosts_skip_dns_and_are_vetted() -> None:
    from egress_guard.hosts import normalize_host

    resolver = Resolver(pinned={"llm.internal": (ipaddress.ip_address("10.0.0.5"),)})
    assert str(await resolver.vet(normalize_host("llm.internal"), 443)) == "10.0.0.5"
    assert not hasattr(resolver, "vetted")  # no global, ever-growing set of dialled addresses


def test_connect_guard_rejects_unparseable_target() -> None:
    flow = tflow.tflow()
    flow.request.method = "CONNECT"
    flow.request.host = "bad host"
    ConnectGuard(FixedPolicy([Rule("r", "api.openai.com")]), {}).http_connect(flow)
    assert flow.response is not None and flow.response.status_code == 403
    assert "invalid CONNECT target" in flow.response.headers["X-Egress-Guard-Reason"]


def test_response_phase_crash_kills_the_flow() -> None:
    class Broken:
        @fail_closed("response")
        def responseheaders(self, flow):
            raise ValueError("boom")

    flow = tflow.tflow(resp=True)
    Broken().responseheaders(flow)
    assert flow.error is not None and flow.error.msg == "Connection killed."
    assert (decision := state(flow).decision) is not None and decision.verdict is Verdict.ERROR


def test_rejection_shape() -> None:
    response = rejection(Decision(Verdict.DENY, "host x is not on the allowlist\r\nInjected: 1", "inline#3"), "rid-1")
    assert response.status_code == 403
    assert json.loads(response.content) == {
        "error": {
            "type": "egress_denied",
            "message": "egress-guard: host x is not on the allowlist\r\nInjected: 1",
            "rule": "inline#3",
            "request_id": "rid-1",
        }
    }
    assert response.headers["X-Egress-Guard-Reason"] == "host x is not on the allowlist  Injected: 1"
    assert "Injected" not in response.headers
    error = rejection(Decision(Verdict.ERROR, "audit log down"), "rid-2", 503)
    assert error.status_code == 503 and json.loads(error.content)["error"]["type"] == "egress_error"


def test_chain_refuses_a_member_whose_hook_it_would_not_relay() -> None:
    from egress_guard.addons import Chain

    class Member:
        def tcp_message(self, flow):  # a hook Chain does not relay
            pass

    with pytest.raises(TypeError, match=r"Member defines \['tcp_message'\]"):
        Chain([Member()])


def test_chain_relays_hooks_in_member_order() -> None:
    from egress_guard.addons import Chain

    calls: list[str] = []

    class A:
        def response(self, flow):
            calls.append("a")

    class B:
        def response(self, flow):
            calls.append("b")

    Chain([A(), B()]).response(None)  # type: ignore[attr-defined]
    assert calls == ["a", "b"] and not hasattr(Chain([A()]), "request")


def test_a_member_that_raises_in_error_never_stops_the_others() -> None:
    calls: list[str] = []

    class Spend:
        def error(self, flow):
            raise RuntimeError("settle failed")

    class Recorder:
        def error(self, flow):
            calls.append("recorded")

    Chain([Spend(), Recorder()]).error(tflow.tflow(err=True))  # type: ignore[attr-defined]
    assert calls == ["recorded"]


async def test_a_member_that_raises_in_a_request_hook_refuses_and_the_others_still_run() -> None:
    seen: list[int | None] = []

    class Broken:
        async def requestheaders(self, flow):
            raise RuntimeError("guard exploded")  # a hook without fail_closed

    class Last:
        def requestheaders(self, flow):
            seen.append(flow.response.status_code if flow.response else None)

    flow = tflow.tflow()
    await Chain([Broken(), Last()]).requestheaders(flow)  # type: ignore[attr-defined]
    assert seen == [502]
    decision = state(flow).decision
    assert decision is not None and decision.verdict is Verdict.ERROR
    assert "internal error in" in decision.reason and "Broken.requestheaders" in flow.response.text


def test_a_member_that_raises_while_the_response_is_under_way_kills_the_flow() -> None:
    calls: list[str] = []

    class Broken:
        def responseheaders(self, flow):
            raise ValueError("scrubber missing")

    class Last:
        def responseheaders(self, flow):
            calls.append(flow.error.msg if flow.error else "")

    flow = tflow.tflow(resp=True)
    Chain([Broken(), Last()]).responseheaders(flow)  # type: ignore[attr-defined]
    assert calls == ["Connection killed."]


def test_a_member_that_raises_in_server_connect_stops_the_dial() -> None:
    calls: list[str] = []

    class Broken:
        def server_connect(self, data):
            raise KeyError("x")

    class Last:
        def server_connect(self, data):
            calls.append(data.server.error)

    data = ServerConnectionHookData(server=tflow.tserver_conn(), client=tflow.tclient_conn())
    Chain([Broken(), Last()]).server_connect(data)  # type: ignore[attr-defined]
    assert calls == [
        "egress-guard: test_a_member_that_raises_in_server_connect_stops_the_dial.<locals>.Broken."
        "server_connect failed (KeyError)"
    ]


def test_safe_text_never_quotes_wire_bytes() -> None:
    assert safe_text("HTTP/1 protocol error: Invalid status line: b'HTTP/1.1 2OO sk-secret'") == (
        "HTTP/1 protocol error: Invalid status line (bytes omitted)"
    )
    assert safe_text("a\r\nInjected: 1\x00") == "a  Injected: 1 "
    assert len(safe_text("x" * 1000)) == 200


def test_failure_reasons_name_the_fix() -> None:
    cert = upstream_reason("Certificate verify failed: unable to get local issuer certificate", "reg.corp", 443)
    assert "not trusted (unable to get local issuer certificate)" in cert and "network.upstream_ca" in cert
    assert refused_head("Bad HTTP request line: b'GET http://u:p@api.x.com/ HTTP/1.1'").endswith(
        "a URL with user:password@ (userinfo) is not accepted"
    )
    assert refused_head("Bad HTTP request line: b'GET http://api.%78.com/ HTTP/1.1'").endswith(
        "a percent-encoded host is not accepted"
    )
