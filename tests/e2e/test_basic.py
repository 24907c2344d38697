"""The real proxy in front of a real TLS upstream, driven by curl and httpx."""

from __future__ import annotations

import json

import httpx
from support.clients import curl
from support.proxy import RunningProxy
from support.upstream import Upstream


def test_allowed_request_reaches_upstream_with_curl(proxy: RunningProxy, upstream: Upstream) -> None:
    status, _headers, body = curl(
        proxy, f"https://api.test.local:{upstream.port}/json?token=abc", "-X", "POST", "-d", '{"hello": "world"}'
    )
    assert status == 200
    seen = json.loads(body)
    assert seen["host"] == f"api.test.local:{upstream.port}"  # Host kept as the agent sent it
    assert seen["query"] == "token=abc"
    assert seen["body_bytes"] == 18
    rows = proxy.rows(expect=2)
    connect, request = rows[-2], rows[-1]
    assert (connect["kind"], connect["decision"], connect["method"], connect["status"]) == (
        "connect",
        "allow",
        "CONNECT",
        200,
    )
    assert (request["kind"], request["decision"], request["method"], request["host"], request["port"]) == (
        "request",
        "allow",
        "POST",
        "api.test.local",
        upstream.port,
    )
    assert request["path"] == "/json"  # query string dropped by default
    assert request["status"] == 200 and request["request_bytes"] == 18 and request["response_bytes"] == len(body)
    assert request["rule"] == "inline#0" and request["scheme"] == "https" and request["duration_ms"] > 0


def test_allowed_request_with_httpx_keepalive(proxy: RunningProxy, upstream: Upstream) -> None:
    with httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False) as client:
        for i in range(5):
            r = client.get(f"https://api.test.local:{upstream.port}/json", params={"i": i})
            assert r.status_code == 200 and r.json()["query"] == f"i={i}"
    assert upstream.state.connections == 1  # one upstream connection, kept alive
    rows = [r for r in proxy.rows(expect=6) if r["kind"] == "request"]
    assert len(rows) == 5 and all(r["decision"] == "allow" for r in rows)


def test_denied_host_gets_403_at_connect(proxy: RunningProxy, upstream: Upstream) -> None:
    status, headers, _ = curl(proxy, f"https://other.test.local:{upstream.port}/json")
    assert status == 403
    assert headers["x-egress-guard-decision"] == "deny"
    assert "other.test.local is not on the allowlist" in headers["x-egress-guard-reason"]
    assert upstream.state.connections == 0
    row = proxy.row_for(headers["x-egress-guard-request-id"])
    assert (row["kind"], row["decision"], row["host"], row["status"]) == ("connect", "deny", "other.test.local", 403)


def test_denied_method_and_path_get_json_403_inside_tunnel(make_proxy, upstream: Upstream) -> None:
    proxy = make_proxy(
        allow=[{"host": "api.test.local", "ports": [upstream.port], "methods": ["GET"], "paths": ["/json", "/v1/*"]}]
    )
    url = f"https://api.test.local:{upstream.port}"
    assert curl(proxy, f"{url}/v1/models")[0] == 200
    status, headers, body = curl(proxy, f"{url}/json", "-X", "POST", "-d", "x")
    assert status == 403
    error = json.loads(body)["error"]
    assert error["type"] == "egress_denied"
    assert "method POST is not allowed" in error["message"]
    assert error["rule"] == "inline#0" and error["request_id"] == headers["x-egress-guard-request-id"]
    status, _, body = curl(proxy, f"{url}/admin")
    assert status == 403 and "path /admin is not allowed" in body
    status, _, body = curl(proxy, f"{url}/v1/%2e%2e/admin", "--path-as-is")
    assert status == 403 and "ambiguous" in body
    assert [r["path"] for r in upstream.state.requests] == ["/v1/models"]
    denied = [r for r in proxy.rows(expect=8) if r["decision"] == "deny"]
    assert {r["method"] for r in denied} == {"POST", "GET"} and len(denied) == 3


def test_plain_http_proxy_request(make_proxy, plain_upstream: Upstream) -> None:
    proxy = make_proxy(allow=[{"host": "api.test.local", "ports": [plain_upstream.port]}])
    status, _, body = curl(proxy, f"http://api.test.local:{plain_upstream.port}/json")
    assert status == 200 and json.loads(body)["host"] == f"api.test.local:{plain_upstream.port}"
    status, headers, _ = curl(proxy, f"http://other.test.local:{plain_upstream.port}/json")
    assert status == 403 and headers["x-egress-guard-decision"] == "deny"
    assert len(plain_upstream.state.requests) == 1
    row = proxy.row_for(headers["x-egress-guard-request-id"])
    assert (row["kind"], row["scheme"], row["host"]) == ("request", "http", "other.test.local")


def test_large_download_and_upload_stream_through(proxy: RunningProxy, upstream: Upstream) -> None:
    size = 8 * 1024 * 1024
    with httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False) as client:
        r = client.get(f"https://api.test.local:{upstream.port}/big", params={"size": size})
        assert r.status_code == 200 and len(r.content) == size
        upload = b"y" * (3 * 1024 * 1024)
        r = client.post(f"https://api.test.local:{upstream.port}/json", content=upload)
        assert r.status_code == 200 and r.json()["body_bytes"] == len(upload)
    rows = [r for r in proxy.rows(expect=3) if r["kind"] == "request"]
    assert rows[0]["response_bytes"] >= size  # chunked framing counted as it passed
    assert rows[1]["request_bytes"] == len(upload)


def test_audit_cli_reads_the_live_db_while_the_proxy_runs(proxy: RunningProxy, upstream: Upstream) -> None:
    from click.testing import CliRunner

    from egress_guard.cli import main
    from egress_guard.store import COLUMNS

    curl(proxy, f"https://api.test.local:{upstream.port}/json")
    curl(proxy, f"https://other.test.local:{upstream.port}/json")
    expected = [{k: r[k] for k in COLUMNS} for r in proxy.rows(expect=3)]  # the CLI shows no chain columns
    result = CliRunner().invoke(main, ["audit", "--config", str(proxy.config.path), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == expected
    stats = CliRunner().invoke(main, ["audit", "stats", "--config", str(proxy.config.path), "--format", "json"])
    counts = {(s["host"], s["decision"]): s["requests"] for s in json.loads(stats.output)}
    assert counts == {("api.test.local", "allow"): 2, ("other.test.local", "deny"): 1}
