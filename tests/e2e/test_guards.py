"""The proxy's refusals, end to end: CONNECT-level denial, fronting, IP literals, SSRF,
non-HTTP bytes, crashed hooks and an unwritable audit log all fail closed."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from support.clients import curl, plain_proxy_request, raw_connect, read_http_response, tunnel_request
from support.proxy import RunningProxy
from support.upstream import Upstream

import egress_guard.addons.connect_guard as connect_guard
import egress_guard.addons.request_guard as request_guard


def test_denied_connect_is_refused_before_tls_and_upstream(proxy: RunningProxy, upstream: Upstream) -> None:
    sock, response = raw_connect(proxy.port, f"other.test.local:{upstream.port}")
    sock.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403")  # plain HTTP right after CONNECT: no TLS began
    assert b"X-Egress-Guard-Decision: deny" in head
    error = json.loads(body)["error"]
    assert error["type"] == "egress_denied" and "other.test.local" in error["message"]
    assert upstream.state.connections == 0
    row = proxy.row_for(error["request_id"])
    assert (row["kind"], row["decision"], row["status"]) == ("connect", "deny", 403)


@pytest.mark.parametrize(
    ("sni", "host_header", "expect"),
    [
        ("other.test.local", "api.test.local:{port}", "TLS SNI 'other.test.local' does not match"),
        ("api.test.local", "other.test.local:{port}", "Host 'other.test.local:{port}' does not match"),
        ("other.test.local", "other.test.local:{port}", "does not match the CONNECT target"),
        (None, "api.test.local:{port}", "sent no SNI"),
        ("api.test.local", "api.test.local:1", "does not match the CONNECT target"),
    ],
)
def test_host_sni_and_connect_must_agree(proxy: RunningProxy, upstream: Upstream, sni, host_header, expect) -> None:
    port = upstream.port
    status, headers, body = tunnel_request(
        proxy, f"api.test.local:{port}", sni=sni, host_header=host_header.format(port=port)
    )
    assert status == 403, body
    assert expect.format(port=port) in json.loads(body)["error"]["message"]
    assert headers["x-egress-guard-decision"] == "deny"
    assert upstream.state.requests == []
    row = proxy.row_for(headers["x-egress-guard-request-id"])
    assert row["decision"] == "deny" and row["host"] == "api.test.local"
    assert row["response_bytes"] == len(body)


def test_http2_authority_must_match_connect(proxy: RunningProxy, upstream: Upstream) -> None:
    status, _headers, body = curl(
        proxy,
        f"https://api.test.local:{upstream.port}/json",
        "--http2",
        "-H",
        f"Host: other.test.local:{upstream.port}",
    )
    assert status == 403 and "does not match the CONNECT target" in body
    assert upstream.state.requests == []


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:{port}",
        "2130706433:{port}",
        "0x7f000001:{port}",
        "0177.0.0.1:{port}",
        "127.1:{port}",
        "[::1]:{port}",
        "[::ffff:127.0.0.1]:{port}",
        "[::ffff:7f00:1]:{port}",
        "10.0.0.1:443",
        "192.168.1.1:443",
        "100.64.0.1:443",
        "169.254.169.254:80",
        "[fd00:ec2::254]:80",
        "[64:ff9b::a00:1]:443",
        "0.0.0.0:{port}",
    ],
)
def test_ip_literal_targets_are_denied_at_connect(proxy: RunningProxy, upstream: Upstream, target: str) -> None:
    sock, response = raw_connect(proxy.port, target.format(port=upstream.port))
    sock.close()
    assert response.startswith(b"HTTP/1.1 403"), response[:200]
    assert b"X-Egress-Guard-Decision: deny" in response
    assert b"is not on the allowlist" in response
    assert upstream.state.connections == 0


def test_named_ip_passes_allowlist_but_not_ssrf_guard(make_proxy, plain_upstream: Upstream) -> None:
    allow = [{"host": "127.0.0.1", "ports": [plain_upstream.port]}]
    proxy = make_proxy(allow=allow)
    for form in ("127.0.0.1", "2130706433", "0x7f.0.0.1", "0177.1"):
        status, headers, body = plain_proxy_request(proxy, f"{form}:{plain_upstream.port}")
        assert status == 403, body
        assert "127.0.0.1 is loopback" in headers["x-egress-guard-reason"]
    assert plain_upstream.state.connections == 0


def test_allow_private_permits_a_named_private_address(make_proxy, plain_upstream: Upstream) -> None:
    proxy = make_proxy(
        allow=[{"host": "127.0.0.1", "ports": [plain_upstream.port]}], network={"allow_private": ["127.0.0.0/8"]}
    )
    status, _, body = plain_proxy_request(proxy, f"2130706433:{plain_upstream.port}")
    assert status == 200, body
    assert json.loads(body)["host"] == f"2130706433:{plain_upstream.port}"


def test_allowed_name_resolving_to_private_address_is_refused(make_proxy, upstream: Upstream) -> None:
    proxy = make_proxy(allow=[{"host": "localhost", "ports": [upstream.port]}])
    status, headers, body = curl(proxy, f"https://localhost:{upstream.port}/json")
    assert status == 403
    assert "localhost resolves to" in headers["x-egress-guard-reason"] and "loopback" in body
    assert upstream.state.connections == 0
    row = proxy.row_for(headers["x-egress-guard-request-id"])
    assert row["decision"] == "deny" and row["rule"] == "inline#0"


@pytest.mark.parametrize("payload", [b"SSH-2.0-OpenSSH_9.2\r\n", b"\x00\x01\x02\x03 binary\r\n\r\n"])
def test_non_http_bytes_in_a_tunnel_are_not_relayed(proxy: RunningProxy, upstream: Upstream, payload: bytes) -> None:
    sock, head = raw_connect(proxy.port, f"api.test.local:{upstream.port}")
    assert head.startswith(b"HTTP/1.1 200")
    sock.sendall(payload)
    sock.settimeout(5)
    status, _, _ = read_http_response(sock)
    sock.close()
    assert status in (0, 400)
    assert upstream.state.connections == 0


def test_upstream_certificate_is_verified_and_the_refusal_names_the_fix(make_proxy, upstream: Upstream) -> None:
    proxy = make_proxy(network={"upstream_ca": None})  # the test CA is no longer trusted
    status, headers, body = curl(proxy, f"https://api.test.local:{upstream.port}/json")
    assert status == 502 and headers["x-egress-guard-decision"] == "error"
    message = json.loads(body)["error"]["message"]
    assert "TLS certificate of api.test.local is not trusted" in message and "network.upstream_ca" in message
    row = proxy.row_for(headers["x-egress-guard-request-id"])
    assert (row["decision"], row["status"], row["rule"]) == ("error", 502, "inline#0")
    assert "network.upstream_ca" in row["reason"]
    assert upstream.state.requests == []


def test_crash_in_request_hook_fails_closed(proxy: RunningProxy, upstream: Upstream, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("policy exploded")

    monkeypatch.setattr(request_guard, "decide", broken)
    status, headers, body = curl(proxy, f"https://api.test.local:{upstream.port}/json")
    assert status == 502
    assert headers["x-egress-guard-decision"] == "error"
    assert "internal error in RequestGuard.requestheaders (RuntimeError)" in json.loads(body)["error"]["message"]
    assert upstream.state.requests == []
    row = proxy.row_for(headers["x-egress-guard-request-id"])
    assert row["decision"] == "error" and row["status"] == 502


def test_crash_in_connect_hook_fails_closed(proxy: RunningProxy, upstream: Upstream, monkeypatch) -> None:
    monkeypatch.setattr(connect_guard, "flow_policy", lambda *a: 1 / 0)
    sock, response = raw_connect(proxy.port, f"api.test.local:{upstream.port}")
    sock.close()
    assert response.startswith(b"HTTP/1.1 502") and b"ZeroDivisionError" in response
    assert upstream.state.connections == 0


def test_unwritable_audit_log_refuses_requests_then_recovers(proxy: RunningProxy, upstream: Upstream) -> None:
    url = f"https://api.test.local:{upstream.port}/json"
    assert curl(proxy, url)[0] == 200
    lock = sqlite3.connect(proxy.config.audit_path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another writer holds the DB: the proxy cannot write
    answers = []
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                status, headers, _body = curl(proxy, url)
            except AssertionError:  # forwarded, then cut: its row could not be committed
                status, headers = 0, {}
            answers.append((status, headers.get("x-egress-guard-request-id")))
            if status == 503:  # refused at CONNECT or inside the tunnel, whichever came first
                assert headers["x-egress-guard-decision"] == "error"
                assert "audit log" in headers["x-egress-guard-reason"]
                assert "cannot be written (database is locked)" in headers["x-egress-guard-reason"]
                break
            time.sleep(0.1)
        assert answers[-1][0] == 503, answers
        upstream_seen = len(upstream.state.requests)
        assert curl(proxy, url)[0] == 503  # still refused while locked, nothing forwarded
        assert len(upstream.state.requests) == upstream_seen
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    deadline = time.monotonic() + 10
    while curl(proxy, url)[0] != 200:
        assert time.monotonic() < deadline, "proxy did not recover after the lock was released"
        time.sleep(0.1)
    row = proxy.row_for(answers[-1][1])  # the refusal was queued, then written after recovery
    assert row["decision"] == "error" and row["status"] == 503
    deadline = time.monotonic() + 5
    while True:  # every forwarded request has its row (the writer may still be flushing the last)
        forwarded = [r for r in proxy.rows() if r["kind"] == "request" and r["status"] == 200]
        if len(forwarded) == len(upstream.state.requests) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(forwarded) == len(upstream.state.requests)
