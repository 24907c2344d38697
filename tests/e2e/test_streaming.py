"""Responses stream through: the agent sees an SSE event while upstream is still sending."""

from __future__ import annotations

import subprocess

import httpx
import pytest
from support.clients import curl
from support.proxy import RunningProxy
from support.upstream import Upstream


def test_sse_first_event_arrives_before_upstream_sends_the_rest(proxy: RunningProxy, upstream: Upstream) -> None:
    url = f"https://api.test.local:{upstream.port}/sse?n=4"
    events = []
    with (
        httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=20) as client,
        client.stream("GET", url) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(line)
                # Upstream holds the remaining events until this gate opens: a buffering
                # proxy would never deliver the first event, and the gate would time out.
                upstream.state.sse_gate.set()
    assert not upstream.state.sse_gate_timed_out
    assert events == ["data: first", "data: event 1", "data: event 2", "data: event 3"]
    row = next(r for r in proxy.rows(expect=2) if r["kind"] == "request")
    assert row["status"] == 200 and row["path"] == "/sse" and row["response_bytes"] > 0


def test_sse_streams_through_to_curl(proxy: RunningProxy, upstream: Upstream) -> None:
    cmd = [
        "curl",
        "-sSN",
        "--http1.1",
        "--proxy",
        proxy.url,
        "--cacert",
        str(proxy.ca_cert),
        "--max-time",
        "20",
        f"https://api.test.local:{upstream.port}/sse?n=2",
    ]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as curl:
        assert curl.stdout is not None
        first = curl.stdout.readline()
        upstream.state.sse_gate.set()
        rest = curl.stdout.read()
    assert first == b"data: first\n"
    assert not upstream.state.sse_gate_timed_out
    assert b"data: event 1" in rest


@pytest.mark.parametrize("size", [1024, 300 * 1024])
def test_a_response_is_complete_only_once_its_row_is_committed(proxy, upstream, monkeypatch, size: int) -> None:
    """A streamed response of known length used to be complete for the agent at its last
    byte, before its audit row was committed; its framing is now chunked, so its end waits."""
    import asyncio
    import time

    from egress_guard.store import AuditLog

    durable = AuditLog.durable

    async def slow(self, n):
        await asyncio.sleep(1.0)
        return await durable(self, n)

    monkeypatch.setattr(AuditLog, "durable", slow)
    with httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False) as client:
        started = time.monotonic()
        r = client.get(f"https://api.test.local:{upstream.port}/sized?size={size}")
        assert r.status_code == 200 and len(r.content) == size
        assert time.monotonic() - started >= 0.9  # the end waited for the (slowed) commit
    started = time.monotonic()
    status, headers, body = curl(proxy, f"https://api.test.local:{upstream.port}/sized?size={size}")
    assert status == 200 and len(body) == size
    assert time.monotonic() - started >= 0.9, headers
