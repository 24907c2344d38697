"""Failing closed on a fleet: PostgreSQL frozen (SIGSTOP) or crashed (SIGKILL) → every
replica answers 503 naming the store, nothing is forwarded unrecorded, and service resumes
when PostgreSQL is back, without restarting a replica; kill -9 of one replica under load →
no acknowledged request without its row.

Real PostgreSQL (tests/fleet/conftest.py), real `egress-guard up` processes, the real LLM
upstream; every call carries a marker (`?m=…`, recorded) to match the client's view, the
upstream's and the audit log's."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from support.pg import PGCluster
from support.replicas import Replica, fleet_config, marker, pg_rows
from support.upstream import Upstream

from egress_guard import keys

TIMEOUT = 1.0  # store.timeout in these tests
# how long PostgreSQL stays down: the store's timeout, the currency window (3 s), and some
OUTAGE = float(os.environ.get("EG_TEST_OUTAGE", "6"))


class Calls:
    """Sequential credentialed calls through one replica, each on a kept-alive connection,
    noting what each got: (sent at, seconds taken, status or error, body, marker)."""

    def __init__(self, replica: Replica, url: str, key: str, name: str, body: dict[str, Any] | None = None) -> None:
        self.replica, self.url, self.key, self.name = replica, url, key, name
        self.body = body  # a JSON body: POSTed (a metered call), else GET
        self.seen: list[tuple[float, float, int | str, str, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.n = 0

    def _run(self) -> None:
        client = self.replica.client(timeout=15)
        while not self.stop.is_set():
            self.n += 1
            m = f"{self.name}-{self.n}"
            sent = time.monotonic()
            try:
                auth = {"Authorization": f"Bearer {self.key}"}
                if self.body is not None:
                    r = client.post(self.url, params={"m": m}, headers=auth, json=self.body)
                else:
                    r = client.get(self.url, params={"m": m}, headers=auth)
                got: int | str = r.status_code
                body = f"X-Egress-Guard-Reason: {r.headers.get('x-egress-guard-reason', '')}\r\n\r\n{r.text}"
            except httpx.ProxyError as exc:  # the CONNECT was refused: read its reason
                got, body = type(exc).__name__, str(exc)
                if "503" in body:
                    got, body = connect_refusal(self.replica, self.url)
            except httpx.HTTPError as exc:
                got, body = type(exc).__name__, str(exc)
                client.close()
                client = self.replica.client(timeout=15)
            self.seen.append((sent, time.monotonic() - sent, got, body[:2000], m))
            time.sleep(0.05)
        client.close()

    def acked(self) -> set[str]:
        return {m for _, _, got, _, m in self.seen if isinstance(got, int) and 200 <= got < 300}


def connect_refusal(replica: Replica, url: str) -> tuple[int | str, str]:
    """A CONNECT to `url`'s host as a client sends it: (the status, the whole answer)."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(("127.0.0.1", replica.port), timeout=15) as sock:
            sock.sendall(f"CONNECT {parts.hostname}:{parts.port} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
            answer = b""
            while b"\r\n\r\n" not in answer:  # the head (the reason is in a header)
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except OSError as exc:
        return type(exc).__name__, str(exc)
    text = answer.decode(errors="replace")
    status = text.split(" ", 2)[1] if text.startswith("HTTP/") else "?"
    return (int(status) if status.isdigit() and status != "200" else f"CONNECT {status}"), text


def reason(answer: str) -> str:
    """The refusal's reason: its X-Egress-Guard-Reason header."""
    for line in answer.split("\r\n\r\n", 1)[0].split("\r\n"):
        if line.lower().startswith("x-egress-guard-reason:"):
            return line.split(":", 1)[1].strip()
    return answer[:120]


def until(check: Any, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["sigstop", "sigkill"])
def test_postgres_down_every_replica_answers_503_naming_the_store_then_recovers(
    how: str,
    tmp_path: Path,
    pg_cluster: PGCluster,
    pg_url: str,
    llm_upstream: Upstream,
    cred_config: dict[str, Any],
) -> None:
    password = "pg-Pa55-of-the-store-7c1e"  # given (trust auth ignores it): never in a message
    (tmp_path / "pg-password").write_text(password + "\n")
    config = fleet_config(tmp_path, cred_config, pg_url, timeout=TIMEOUT, password_file=str(tmp_path / "pg-password"))
    assert config.store is not None
    store = config.store.name  # as messages name it: no password
    key = keys.mint(config, "researcher").env["OPENAI_API_KEY"]
    replicas = [Replica.start(config), Replica.start(config)]
    models = f"https://api.openai.com:{llm_upstream.port}/v1/models"
    calls = [Calls(r, models, key, f"r{i}") for i, r in enumerate(replicas)]
    try:
        for c in calls:
            c.thread.start()
        assert until(lambda: all(c.acked() for c in calls)), [c.seen[-3:] for c in calls]
        down_at = time.monotonic()
        if how == "sigstop":
            pg_cluster.sigstop()
        else:
            pg_cluster.kill9()
        time.sleep(OUTAGE)
        up_at = time.monotonic()
        if how == "sigstop":
            pg_cluster.sigcont()
        else:
            pg_cluster.restart()
        served = [
            until(lambda c=c: any(s > up_at and got == 200 for s, _, got, _, _ in c.seen), 30)  # type: ignore[misc]
            for c in calls
        ]
    finally:
        if how == "sigstop":
            pg_cluster.sigcont()
        for c in calls:
            c.stop.set()
        for c in calls:
            c.thread.join(20)
        for r in replicas:
            r.stop()
    assert served == [True, True], "a replica did not serve again once PostgreSQL was back"

    report = []
    for c in calls:
        during = [(s - down_at, took, got, body) for s, took, got, body, _ in c.seen if down_at <= s < up_at]
        refused = [d for d in during if d[2] == 503]
        assert refused, during
        first = min(s + took for s, took, _, _ in refused)
        # every answer that began a second after the store stopped answering is a 503 naming it
        late = [d for d in during if d[0] > TIMEOUT + 1.0]
        assert late and all(d[2] == 503 and store in d[3] for d in late), late
        # and comes at once, or within the store's timeout (a call under way when it stopped)
        slowest = max(took for _, took, _, _ in late)
        assert slowest < TIMEOUT + 1.0, late
        back_at = min(s for s, _, got, _, _ in c.seen if s > up_at and got == 200)
        back = back_at - up_at
        meanwhile = sorted({f"{got}: {reason(body)[:160]}" for s, _, got, body, _ in c.seen if up_at <= s < back_at})
        reasons = sorted({reason(d[3]) for d in refused})
        report.append(
            f"{c.name}: {len(during)} calls while down; first 503 at +{first:.2f} s; "
            f"503s after +{TIMEOUT + 1:.0f} s answered within {slowest * 1000:.0f} ms (max); "
            f"served again {back:.2f} s after PostgreSQL was back (meanwhile: {meanwhile}); reasons: {reasons}"
        )
    print(f"\nPostgreSQL {how}, store.timeout {TIMEOUT:g} s:\n  " + "\n  ".join(report))

    # nothing forwarded unrecorded, nothing acknowledged without its row
    with llm_upstream.state.lock:
        forwarded = {marker(f"?{r['query']}") for r in llm_upstream.state.requests} - {None}
    acked = set().union(*(c.acked() for c in calls))

    def recorded() -> set[str | None]:
        return {marker(r["path"]) for r in pg_rows(pg_url, "kind = 'request'")}

    assert until(lambda: forwarded <= recorded(), 10), forwarded - recorded()
    assert acked <= recorded()
    seen = [body for c in calls for _, _, _, body, _ in c.seen] + [r.log.read_text() for r in replicas]
    seen += [str(row) for row in pg_rows(pg_url)]
    assert not [text for text in seen if password in text]


@pytest.mark.parametrize("kind", ["metered", "unmetered"])
def test_kill_9_of_one_replica_under_load_loses_no_acknowledged_row(
    kind: str, tmp_path: Path, pg_url: str, llm_upstream: Upstream, cred_config: dict[str, Any]
) -> None:
    config = fleet_config(tmp_path, cred_config, pg_url, timeout=TIMEOUT)
    key = keys.mint(config, "researcher").env["OPENAI_API_KEY"]
    victim, survivor = Replica.start(config), Replica.start(config)
    base = f"https://api.openai.com:{llm_upstream.port}/v1"
    url, body = (
        (
            f"{base}/chat/completions",
            {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        )
        if kind == "metered"
        else (f"{base}/models", None)
    )
    calls = [Calls(r, url, key, f"{name}{i}", body) for name, r in (("v", victim), ("s", survivor)) for i in range(4)]
    try:
        for c in calls:
            c.thread.start()
        assert until(lambda: sum(len(c.acked()) for c in calls) >= 100, 30)
        killed_at = time.monotonic()
        victim.kill9()
        assert until(
            lambda: all(any(s > killed_at + 0.2 and got == 200 for s, _, got, _, _ in c.seen) for c in calls[4:])
        )
    finally:
        for c in calls:
            c.stop.set()
        for c in calls:
            c.thread.join(20)
        victim.kill9() if victim.proc.poll() is None else None
        survivor.stop()
    acked = set().union(*(c.acked() for c in calls))
    rows = pg_rows(pg_url, "kind = 'request'")
    final = {marker(r["path"]) for r in rows if r["status"] and 200 <= r["status"] < 300}
    print(f"\nkill -9 of one replica ({kind}): {len(acked)} acknowledged, {len(acked - final)} without a row")
    assert acked - final == set(), "acknowledged requests without their audit row"


def test_an_idle_replica_refuses_a_key_it_has_not_cached_503_within_the_store_timeout(
    tmp_path: Path, pg_cluster: PGCluster, pg_url: str, llm_upstream: Upstream, cred_config: dict[str, Any]
) -> None:
    config = fleet_config(tmp_path, cred_config, pg_url, timeout=TIMEOUT)
    assert config.store is not None
    key = keys.mint(config, "researcher").env["OPENAI_API_KEY"]  # never used: not in the replica's cache
    replica = Replica.start(config)
    models = f"https://api.openai.com:{llm_upstream.port}/v1/models"
    try:
        with replica.client(timeout=15) as client:
            pg_cluster.sigstop()
            try:
                started = time.monotonic()
                try:
                    r = client.get(models, headers={"Authorization": f"Bearer {key}"})
                    got, text = r.status_code, r.headers.get("x-egress-guard-reason", "")
                except httpx.ProxyError:  # the CONNECT's row failed first: refused there
                    got, text = connect_refusal(replica, models)
                    text = reason(text)
                took = time.monotonic() - started
            finally:
                pg_cluster.sigcont()
    finally:
        replica.stop()
    print(f"\nan uncached key, PostgreSQL frozen: {got} after {took * 1000:.0f} ms: {text}")
    assert got == 503 and config.store.name in text
    assert took < TIMEOUT + 1.0  # one store timeout: the lookup's (the row's attribution fails fast after it)
    with llm_upstream.state.lock:
        assert llm_upstream.state.requests == []
