"""kill -9 under load: the real proxy (`egress-guard up`, its own process) in front of the
LLM upstream, 16 clients over kept-alive connections making metered OpenAI calls (JSON and
SSE), or unmetered ones (model lists: no reservation is committed, so nothing else hurries
the writer), then SIGKILL. After a restart, which settles the calls left in flight:

* every request whose client got a complete 2xx response has its audit row;
* every metered call the upstream received (it may have charged for it) is in spend, once.

Each call carries a marker in its query string (recorded: `audit.query_strings: true`) so
the client's view, the upstream's and the audit log's can be matched call by call."""

from __future__ import annotations

import os
import select
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import openai
import pytest
from support.llm.common import REAL_ENV
from support.proxy import RunningProxy, write_config
from support.small_disk import fill, small_disk
from support.upstream import Upstream
from test_credentials import http_client, openai_client

from egress_guard import keys
from egress_guard.store import SETTLED_AT_RESERVATION

EG = [sys.executable, "-m", "egress_guard"]
CLIENTS = 16
LOAD_SECONDS = 1.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_up(config: Path, port: int, log: Path) -> subprocess.Popen[str]:
    """`egress-guard up` with the real keys in its environment; returns once it listens."""
    proc = subprocess.Popen(
        [*EG, "up", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=log.open("a"),
        text=True,
        env={**os.environ, **REAL_ENV},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("egress-guard listening on"):
                return proc
            if not line and proc.poll() is not None:
                break
    proc.kill()
    raise AssertionError(f"egress-guard up did not start:\n{log.read_text()}")


def marker(path: str) -> str | None:
    return parse_qs(urlsplit(path).query).get("m", [None])[0]


@pytest.mark.parametrize("kind", ["metered", "unmetered"])
def test_kill_9_under_load_loses_no_acknowledged_row_and_no_charged_call(
    kind: str, tmp_path: Path, llm_upstream: Upstream, cred_config: dict[str, Any]
) -> None:
    cred_config["audit"] = {"query_strings": True}
    config = write_config(tmp_path, cred_config)
    key = keys.mint(config, "researcher").env["OPENAI_API_KEY"]
    port, log = free_port(), tmp_path / "up.log"
    proc = start_up(config.path, port, log)
    ctx = ssl.create_default_context(cafile=str(config.ca_dir / "egress-guard-ca.pem"))
    base = f"https://api.openai.com:{llm_upstream.port}/v1"

    acked: set[str] = set()  # markers of calls whose client got a complete 2xx response
    sent = 0
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[tuple[float, str]] = []  # (when, what): none expected before the kill

    def client(worker: int) -> None:
        nonlocal sent
        with httpx.Client(proxy=f"http://127.0.0.1:{port}", verify=ctx, trust_env=False, timeout=10) as http:
            for n in range(100_000):
                if stop.is_set():
                    return
                m = f"w{worker}-{n}"
                body = {
                    "model": "gpt-4o-mini",
                    "max_tokens": 5,
                    "stream": n % 2 == 1,  # the SDK's default: no stream_options
                    "messages": [{"role": "user", "content": "hi"}],
                }
                call = (
                    ("POST", f"{base}/chat/completions", {"json": body})
                    if kind == "metered"
                    else ("GET", f"{base}/models", {})
                )
                with lock:
                    sent += 1
                try:
                    with http.stream(
                        call[0], call[1], params={"m": m}, headers={"Authorization": f"Bearer {key}"}, **call[2]
                    ) as r:
                        r.read()  # raises unless the response is complete
                        complete = 200 <= r.status_code < 300
                except httpx.HTTPError as exc:
                    if stop.is_set():
                        return
                    with lock:
                        failures.append((time.monotonic(), repr(exc)))
                    time.sleep(0.01)  # the proxy is gone: wait for the test to notice
                    continue
                with lock:
                    if complete:
                        acked.add(m)
                    else:
                        failures.append((time.monotonic(), f"status {r.status_code}"))

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    # The clients and the upstream share this process's GIL: switch often, so a client notes
    # its complete response soon after it arrives, as a real agent would.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    for w in workers:
        w.start()
    try:
        # at least LOAD_SECONDS, and enough calls to mean something on a slow machine
        started = time.monotonic()
        while time.monotonic() - started < LOAD_SECONDS or (len(acked) < 100 and time.monotonic() - started < 15):
            time.sleep(0.05)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        stop.set()
        proc.kill()
        for w in workers:
            w.join(15)
        sys.setswitchinterval(interval)
    assert not any(w.is_alive() for w in workers)
    time.sleep(0.3)  # requests already on the wire to the upstream are read and recorded
    with llm_upstream.state.lock:
        forwarded = {marker(f"?{r['query']}") for r in llm_upstream.state.requests} - {None}
    assert len(acked) >= 100, f"too little load to mean anything: {len(acked)} acknowledged of {sent}"
    assert [what for when, what in failures if when < killed_at] == []

    left = sqlite3.connect(config.audit_path).execute("SELECT COUNT(*) FROM spend_intents").fetchone()[0]
    restarted = start_up(config.path, port, log)  # settles the intents before loading budgets
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(30) == 0, log.read_text()

    conn = sqlite3.connect(config.audit_path)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM audit WHERE kind = 'request' ORDER BY id")]
    assert conn.execute("SELECT COUNT(*) FROM spend_intents").fetchone()[0] == 0
    final = {marker(r["path"]) for r in rows if r["status"] and 200 <= r["status"] < 300}
    billed: dict[str, int] = {}
    for r in rows:
        if r["cost_usd"] is not None and Decimal(r["cost_usd"]) > 0:
            billed[marker(r["path"]) or ""] = billed.get(marker(r["path"]) or "", 0) + 1
    settled = [r for r in rows if r["reason"] == SETTLED_AT_RESERVATION]

    print(
        f"{kind}: sent {sent}, acknowledged {len(acked)} ({len(acked - final)} without a row), "
        f"forwarded {len(forwarded)} ({len(forwarded - acked)} in flight at the kill"
        + (f", {len(forwarded - set(billed))} not in spend" if kind == "metered" else "")
        + f"), settled at their reservation: {len(settled)}"
    )
    assert acked - final == set(), "acknowledged requests without their audit row"
    if kind == "metered":
        assert forwarded - set(billed) == set(), "calls the upstream received that are not in spend"
    assert [m for m, times in billed.items() if times > 1] == [], "calls billed twice"
    assert len(settled) == left
    if left:
        assert f"{left} metered calls were unfinished when the proxy last stopped" in log.read_text()


def test_a_full_audit_disk_cuts_the_unrecorded_response_and_refuses_until_it_recovers(
    tmp_path: Path,
    make_proxy: Callable[..., RunningProxy],
    llm_upstream: Upstream,
    cred_config: dict[str, Any],
    real_env: dict[str, str],
) -> None:
    def chat_calls() -> int:
        return sum(r["path"] == "/v1/chat/completions" for r in llm_upstream.state.requests)

    with small_disk(tmp_path) as disk:
        proxy = make_proxy(**cred_config, audit={"path": str(disk / "audit.db")})
        key = keys.mint(proxy.config, "researcher").env["OPENAI_API_KEY"]
        port = llm_upstream.port
        client = openai_client(proxy, port, key)
        models = f"https://api.openai.com:{port}/v1/models"
        auth = {"Authorization": f"Bearer {key}"}
        with http_client(proxy) as http:
            assert http.get(models, headers=auth).status_code == 200
            # the SDK's connection is up before the disk fills: no CONNECT row fails first
            assert client.models.list().data
            filler = fill(disk)
            # a metered call: its reservation cannot be committed, so it is not forwarded
            calls = chat_calls()
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(model="gpt-4o-mini", max_tokens=3, messages=[])
            assert refused.value.status_code == 503
            assert "reservation could not be recorded, so it was not forwarded" in str(refused.value)
            assert chat_calls() == calls
            assert wait_until(lambda: not proxy.proxy.audit.healthy)
        filler.unlink()
        assert wait_until(lambda: proxy.proxy.audit.healthy)
        with http_client(proxy) as http:
            assert http.get(models, headers=auth).status_code == 200  # connected (and recorded) first
            # a response whose row cannot be committed is cut, never completed
            fill(disk)
            with pytest.raises(httpx.RemoteProtocolError):
                http.get(models, headers=auth)
            # and while the log cannot be written, everything is refused (the cut connection's
            # successor at its CONNECT)
            assert wait_until(lambda: not proxy.proxy.audit.healthy)
            with pytest.raises(httpx.ProxyError, match="503"):
                http.get(models, headers=auth)
        (disk / "filler").unlink()
        assert wait_until(lambda: proxy.proxy.audit.healthy)
        proxy.stop()
        assert proxy.lost == 0
        conn = sqlite3.connect(disk / "audit.db")
        rows = conn.execute("SELECT kind, path, status, decision, reason FROM audit ORDER BY id").fetchall()
        assert [r[:4] for r in rows if r[0] == "request"] == [
            ("request", "/v1/models", 200, "allow"),
            ("request", "/v1/models", 200, "allow"),
            ("request", "/v1/chat/completions", 503, "error"),
            ("request", "/v1/models", 200, "allow"),
            ("request", "/v1/models", 200, "error"),  # the agent got a broken response: the row says so
        ]
        cut = [r[4] for r in rows if r[0] == "request"][4]
        assert "response cut off: its audit row could not be committed (audit log" in cut
        assert "database or disk is full" in cut
        assert rows[-1][0] == "connect" and rows[-1][2:4] == (503, "error") and "cannot be written" in rows[-1][4]
        assert conn.execute("SELECT COUNT(*) FROM spend_intents").fetchone()[0] == 0


def wait_until(check: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False
