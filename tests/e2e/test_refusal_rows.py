"""Every refusal has an audit row, with the agent wherever it is known: the refusals
mitmproxy's own parser makes (no flow, or a flow no guard decided on), and guard refusals
of requests that carried a genuine fake key but were refused before the credential swap."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
from click.testing import CliRunner
from support.clients import raw_connect, read_http_response
from support.proxy import RunningProxy
from support.upstream import Upstream

from egress_guard import keys
from egress_guard.cli import main


def rows_matching(proxy: RunningProxy, text: str, expect: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        rows = [r for r in proxy.rows() if text in (r["reason"] or "")]
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def plain(proxy: RunningProxy, raw: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(raw)
        status, _, body = read_http_response(sock)
    return status, body


def tunneled(proxy: RunningProxy, target: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    sock, head = raw_connect(proxy.port, target)
    assert head.startswith(b"HTTP/1.1 200"), head
    tls = proxy.client_context().wrap_socket(sock, server_hostname=target.rsplit(":", 1)[0])
    tls.settimeout(10)
    tls.sendall(raw)
    try:
        return read_http_response(tls)
    finally:
        tls.close()


def test_heads_the_parser_refuses_before_any_flow_have_rows(proxy: RunningProxy, upstream: Upstream) -> None:
    port = upstream.port
    cases = [
        (f"GET http://api.test.%6cocal:{port}/json HTTP/1.1\r\nHost: api.test.local\r\n\r\n", "percent-encoded host"),
        (f"GET http://u:p@api.test.local:{port}/json HTTP/1.1\r\nHost: api.test.local\r\n\r\n", "user:password@"),
    ]
    for raw, why in cases:
        status, body = plain(proxy, raw.encode())
        assert status == 400, body
        [row] = rows_matching(proxy, why)
        assert (row["kind"], row["decision"], row["status"]) == ("request", "deny", 400)
        assert "HTTP parser refused" in row["reason"] and "b'" not in row["reason"]
    status, _, _ = tunneled(proxy, f"api.test.local:{port}", b"GET /json HTTP/1.1\r\nHost api.test.local\r\n\r\n")
    assert status == 400
    [row] = rows_matching(proxy, "Invalid header line")
    assert (row["decision"], row["status"], row["host"], row["port"]) == ("deny", 400, "api.test.local", port)
    assert upstream.state.requests == []


def test_requests_the_parser_refuses_inside_a_flow_are_answered_and_recorded(
    proxy: RunningProxy, upstream: Upstream
) -> None:
    port = upstream.port
    target = f"api.test.local:{port}"
    status, headers, body = tunneled(proxy, target, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert status == 400 and headers["x-egress-guard-decision"] == "deny"
    assert "a CONNECT inside a tunnel" in json.loads(body)["error"]["message"]
    row = proxy.row_for(headers["x-egress-guard-request-id"])
    assert (row["decision"], row["status"], row["host"]) == ("deny", 400, "api.test.local")
    smuggle = (
        f"POST /json HTTP/1.1\r\nHost: {target}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    status, headers, body = tunneled(proxy, target, smuggle.encode())
    assert status == 400 and "request smuggling" in json.loads(body)["error"]["message"]
    assert "validate_inbound_headers" not in body.decode()  # mitmproxy's advice is not for our users
    row = proxy.row_for(headers["x-egress-guard-request-id"])
    assert (row["decision"], row["status"]) == ("deny", 400)
    assert upstream.state.requests == []


def test_http2_host_that_differs_from_authority_is_recorded(proxy: RunningProxy, upstream: Upstream) -> None:
    target = f"api.test.local:{upstream.port}"
    sock, head = raw_connect(proxy.port, target)
    assert head.startswith(b"HTTP/1.1 200")
    ctx = proxy.client_context()
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(sock, server_hostname="api.test.local")
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False)
    )
    conn.initiate_connection()
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", target), (":path", "/json")]
    conn.send_headers(1, [*headers, ("host", f"other.test.local:{upstream.port}")], end_stream=True)
    tls.sendall(conn.data_to_send())
    tls.settimeout(10)
    events: list[Any] = []
    while not any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
        data = tls.recv(65536)
        if not data:
            break
        events += conn.receive_data(data)
    tls.close()
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
    [row] = rows_matching(proxy, "HTTP/2")
    assert (row["decision"], row["status"], row["host"]) == ("deny", None, "api.test.local")
    assert upstream.state.requests == []


def _client(proxy: RunningProxy) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=10)


def test_refusals_of_requests_with_a_genuine_key_name_the_agent(
    cred_proxy: RunningProxy, llm_upstream: Upstream, upstream: Upstream
) -> None:
    minted = keys.mint(cred_proxy.config, "researcher")
    fake = minted.env["OPENAI_API_KEY"]
    bearer = {"Authorization": f"Bearer {fake}"}
    openai = f"https://api.openai.com:{llm_upstream.port}"
    with _client(cred_proxy) as client:
        # refused by the request guard, before any credential check: Host fronting
        fronted = client.get(f"{openai}/v1/models", headers={**bearer, "Host": "api.anthropic.com"})
        assert fronted.status_code == 403
        # refused by the credential guard: the key sent to a host it is not bound to
        leaked = client.post(f"https://api.test.local:{upstream.port}/json", content=f'{{"k": "{fake}"}}')
        assert leaked.status_code == 403
    with _client(cred_proxy) as client:
        # a kept-alive connection that presented the key names the agent of its later refusals
        assert client.get(f"{openai}/v1/models", headers=bearer).status_code == 200
        assert client.get(f"{openai}/v1/models").status_code == 401  # no credential this time
    ids = [r.headers["x-egress-guard-request-id"] for r in (fronted, leaked)]
    rows = [cred_proxy.row_for(i) for i in ids] + rows_matching(cred_proxy, "no openai credential")
    assert [(r["decision"], r["agent"], r["session"]) for r in rows] == [
        ("deny", "researcher", minted.record.session)
    ] * 3
    shown = CliRunner().invoke(
        main, ["audit", "--config", str(cred_proxy.config.path), "--agent", "researcher", "--format", "json"]
    )
    assert shown.exit_code == 0, shown.output
    assert {r["request_id"] for r in json.loads(shown.output) if r["decision"] == "deny"} >= set(ids)


def test_a_parser_refusal_names_the_agent_whose_key_it_carried(
    cred_proxy: RunningProxy, llm_upstream: Upstream
) -> None:
    fake = keys.mint(cred_proxy.config, "researcher").env["OPENAI_API_KEY"]
    target = f"api.openai.com:{llm_upstream.port}"
    raw = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {fake}\r\nContent-Length: x\r\n\r\n"
    status, _, _ = tunneled(cred_proxy, target, raw.encode())
    assert status == 400
    [row] = rows_matching(cred_proxy, "HTTP parser refused")
    assert (row["decision"], row["status"], row["agent"], row["host"]) == ("deny", 400, "researcher", "api.openai.com")
    assert row["method"] == "POST" and row["path"] == "/v1/chat/completions"
    assert llm_upstream.state.requests == []
