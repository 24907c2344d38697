"""Budgets and rate limits across replicas (proxy/shared_ledger.py, store/postgres/fleet.py),
on a real PostgreSQL: the admission statement under concurrency, its refusals worded as one
process words them, spend recorded before counted on first use, a gone replica's calls taken
over; and three real replica processes (`egress-guard up`) on one database, with 64
concurrent priced calls spread over them against a small budget, and a shared rate limit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from support.llm.common import REAL_ENV
from support.proxy import write_config

from egress_guard import keys
from egress_guard.config import StoreSettings
from egress_guard.ledger import Ledger, Refusal
from egress_guard.shared_ledger import SharedLedger
from egress_guard.spend import Limits, SpendSettings
from egress_guard.store import AuditLog, AuditRow, Batch, Intent, SetBudget, StoreError, open_store
from egress_guard.store.postgres import PGEngine
from egress_guard.timeutil import now_iso

EG = [sys.executable, "-m", "egress_guard"]


def intent(request_id: str) -> Intent:
    return Intent(
        request_id=request_id,
        ts=now_iso(),
        agent="",
        session=None,
        service="openai",
        model="gpt-4o-mini",
        day="",
        reserved_usd="0",
        method="POST",
        host="api.openai.com",
        port=443,
        path="/v1/chat/completions",
    )


async def engines(url: str, n: int) -> list[PGEngine]:
    out = []
    for i in range(n):
        engine = PGEngine(StoreSettings(url=url, replica=f"r{i}", timeout=5))
        await engine.open()
        out.append(engine)
    return out


def rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchall()


async def test_concurrent_admissions_on_three_replicas_never_exceed_the_budget(pg_url: str) -> None:
    fleet = await engines(pg_url, 3)
    try:
        ledgers = [SharedLedger(SpendSettings(), e) for e in fleet]
        limits = Limits(budget_total=Decimal("1.00"))
        admitted: list[str] = []
        refusals: list[str] = []

        async def call(n: int) -> None:
            try:
                await ledgers[n % 3].reserve(limits, "a", "s", Decimal("0.15"), 10, intent(f"q{n}"))
            except Refusal as exc:
                refusals.append(exc.reason)
                return
            admitted.append(f"q{n}")

        await asyncio.gather(*(call(n) for n in range(64)))
        assert len(admitted) == 6 and len(refusals) == 58  # 6 x 0.15 <= 1.00 < 7 x 0.15
        assert rows(pg_url, "SELECT scope, reserved FROM budget_usage ORDER BY scope") == [
            ("day", Decimal("0.90")),
            ("session", Decimal("0.90")),
            ("total", Decimal("0.90")),
        ]
        assert rows(pg_url, "SELECT inflight FROM agent_usage") == [(6,)]
        assert rows(pg_url, "SELECT count(*) FROM spend_intents WHERE held") == [(6,)]
        # the rows settle them: the reservation goes, the real cost stays, nothing in flight
        batch = Batch(
            rows=[
                AuditRow(
                    ts=now_iso(), request_id=r, kind="request", agent="a", session="s", decision="allow", cost_usd="0.1"
                )
                for r in admitted
            ],
            settles=list(admitted),
        )
        await fleet[0].commit(batch)
        assert rows(pg_url, "SELECT scope, spent, reserved FROM budget_usage ORDER BY scope") == [
            ("day", Decimal("0.6"), Decimal("0.00")),
            ("session", Decimal("0.6"), Decimal("0.00")),
            ("total", Decimal("0.6"), Decimal("0.00")),
        ]
        assert rows(pg_url, "SELECT inflight FROM agent_usage") == [(0,)]
        assert rows(pg_url, "SELECT count(*) FROM spend_intents") == [(0,)]
    finally:
        for e in fleet:
            await e.close()


async def test_refusals_are_worded_as_one_process_words_them(pg_url: str) -> None:
    (engine,) = await engines(pg_url, 1)
    try:
        shared, local = SharedLedger(SpendSettings(), engine), Ledger(SpendSettings())
        for limits, usd, n in [
            (Limits(budget_day=Decimal("0.5")), Decimal("0.2"), 3),
            (Limits(requests_per_minute=2), Decimal(0), 3),
            (Limits(tokens_per_minute=100), Decimal(0), 3),
            (Limits(concurrent=2), Decimal(0), 3),
        ]:
            agent = f"agent{id(limits)}"
            got = []
            for ledger in (shared, local):
                try:
                    for i in range(n):
                        if isinstance(ledger, SharedLedger):
                            await ledger.reserve(limits, agent, "s", usd, 40, intent(f"{agent}-{i}"))
                        else:
                            ledger.admit(limits, agent, "s", usd, 40)
                except Refusal as exc:
                    got.append((exc.reason, exc.status))
            assert len(got) == 2 and got[0] == got[1], got
    finally:
        await engine.close()


async def test_a_budget_key_starts_from_the_spend_recorded_before(pg_url: str) -> None:
    (engine,) = await engines(pg_url, 1)
    try:
        today = now_iso()
        old = AuditRow(
            ts="2020-01-01T00:00:00.000Z", request_id="old", kind="request", agent="a", session="s", decision="allow"
        )
        old.cost_usd = "0.40"
        new = AuditRow(ts=today, request_id="new", kind="request", agent="a", session="t", decision="allow")
        new.cost_usd = "0.25"
        await engine.commit(Batch(rows=[old, new]))
        ledger = SharedLedger(SpendSettings(), engine)
        with pytest.raises(Refusal) as refused:
            await ledger.reserve(Limits(budget_total=Decimal("0.70")), "a", "s", Decimal("0.1"), 1, intent("x"))
        assert "total budget of $0.70 for agent a would be exceeded (spent $0.65, reserved $0" in refused.value.reason
        with pytest.raises(Refusal) as refused:
            await ledger.reserve(Limits(budget_day=Decimal("0.30")), "a", "t", Decimal("0.1"), 1, intent("y"))
        assert "day budget of $0.30 for agent a would be exceeded (spent $0.25," in refused.value.reason
        await ledger.reserve(Limits(budget_session=Decimal("0.45")), "a", "s", Decimal("0.05"), 1, intent("z"))
    finally:
        await engine.close()


async def test_a_priced_row_without_an_intent_counts_in_the_shared_budgets(pg_url: str) -> None:
    """A WebSocket call's row (its intent not held in the shared budgets) is spent all the same."""
    (engine,) = await engines(pg_url, 1)
    try:
        ledger = SharedLedger(SpendSettings(timezone="Europe/Paris"), engine)
        await ledger.open(AuditLog(engine))  # the replica's heartbeat names the budget day's time zone
        limits = Limits(budget_day=Decimal("1"))
        await ledger.reserve(limits, "a", "s", Decimal("0.1"), 1, intent("first"))  # the keys exist
        ws = AuditRow(ts="2026-01-01T23:30:00.000Z", request_id="ws", kind="request", agent="a", decision="allow")
        ws.session, ws.cost_usd = "s", "0.2"
        await engine.commit(Batch(rows=[ws]))
        got = dict(rows(pg_url, "SELECT scope, spent FROM budget_usage WHERE scope <> 'day'"))
        assert got == {"session": Decimal("0.2"), "total": Decimal("0.2")}
        # its day is 2 January in Paris (23:30 UTC on the 1st): not today's key
        assert rows(pg_url, "SELECT spent FROM budget_usage WHERE scope = 'day'") == [(Decimal(0),)]
    finally:
        await engine.close()


async def test_a_gone_replicas_calls_are_billed_at_their_reservation_by_another(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone, alive = await engines(pg_url, 2)
    audit = AuditLog(alive)
    await audit.open()
    try:
        dead = SharedLedger(SpendSettings(), gone)
        await dead.open(AuditLog(gone))
        await dead.reserve(Limits(concurrent=5), "a", "s", Decimal("0.3"), 1, intent("left"))
        await gone.close()
        monkeypatch.setattr("egress_guard.shared_ledger.STALE_SECONDS", 1)
        monkeypatch.setattr(SharedLedger, "REAP_EVERY", 0.0)
        time.sleep(1.2)
        ledger = SharedLedger(SpendSettings(), alive)
        await ledger.open(audit)
        assert ledger.reaped == 0  # at open only its own: the others may just be back from an outage too
        time.sleep(1.1)  # this replica has beaten for STALE_SECONDS without a gap; the gone one has not
        await ledger.tick()
        assert ledger.reaped == 1
        await audit.close()
        (row,) = rows(pg_url, "SELECT request_id, cost_usd, reason FROM audit")
        assert row[:2] == ("left", "0.3") and "settled at its reservation" in row[2]
        assert rows(pg_url, "SELECT scope, spent, reserved FROM budget_usage ORDER BY scope") == [
            ("day", Decimal("0.3"), Decimal("0.0")),
            ("session", Decimal("0.3"), Decimal("0.0")),
            ("total", Decimal("0.3"), Decimal("0.0")),
        ]
        assert rows(pg_url, "SELECT inflight FROM agent_usage") == [(0,)]
        assert rows(pg_url, "SELECT id FROM replicas") == [("r1",)]
    finally:
        await audit.close()
        await alive.close()


async def test_after_an_outage_a_replica_takes_over_no_calls_until_the_others_could_beat(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store was down longer than STALE_SECONDS: every heartbeat is stale, the other
    # replica's calls are alive. The first replica back must not bill them (they would be
    # recorded twice, and spend_totals double-counted).
    other_engine, engine = await engines(pg_url, 2)
    audit = AuditLog(engine)
    await audit.open()
    try:
        other = SharedLedger(SpendSettings(), other_engine)
        await other.open(AuditLog(other_engine))
        await other.reserve(Limits(concurrent=5), "a", "s", Decimal("0.3"), 1, intent("alive"))
        monkeypatch.setattr("egress_guard.shared_ledger.STALE_SECONDS", 1)
        monkeypatch.setattr(SharedLedger, "REAP_EVERY", 0.0)
        ledger = SharedLedger(SpendSettings(), engine)
        await ledger.open(audit)
        time.sleep(1.2)  # both heartbeats now stale, as after an outage
        ledger._beat -= 60  # and this replica's own last good heartbeat a minute ago: the outage
        await ledger.tick()
        assert ledger.reaped == 0 and rows(pg_url, "SELECT request_id FROM spend_intents") == [("alive",)]
    finally:
        await audit.close()
        await engine.close()
        await other_engine.close()


async def test_an_admission_whose_answer_was_lost_is_released_once_the_store_answers(
    pg_url: str, pg_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = PGEngine(StoreSettings(url=pg_url, replica="r0", timeout=1))
    await engine.open()
    try:
        ledger = SharedLedger(SpendSettings(), engine)
        await ledger.open(AuditLog(engine))
        # admitted in the store, but as if its answer had been lost to the timeout
        await ledger.reserve(Limits(concurrent=1), "a", "s", Decimal("0.2"), 1, intent("lost"))
        ledger._unsure["lost"] = None
        pg_cluster.sigstop()
        try:
            for _ in range(2):  # however long the store is away, the id is kept
                with pytest.raises(StoreError):
                    await ledger.tick()
        finally:
            pg_cluster.sigcont()
        assert ledger._unsure == {"lost": None}
        monkeypatch.setattr("egress_guard.shared_ledger.UNSURE_REPEAT", 0.0)
        await ledger.tick()  # released (the agent's one place in flight, its reservation)
        assert rows(pg_url, "SELECT count(*) FROM spend_intents") == [(0,)]
        assert rows(pg_url, "SELECT inflight FROM agent_usage") == [(0,)]
        await ledger.tick()  # repeated for UNSURE_REPEAT after it first succeeded, then dropped
        assert ledger._unsure == {}
    finally:
        await engine.close()


async def test_admission_fails_closed_while_the_store_does_not_answer(pg_url: str, pg_cluster: Any) -> None:
    engine = PGEngine(StoreSettings(url=pg_url, replica="r0", timeout=1))
    await engine.open()
    try:
        ledger = SharedLedger(SpendSettings(), engine)
        limits = Limits(requests_per_minute=100)
        await ledger.reserve(limits, "a", "s", Decimal(0), 1, intent("before"))
        pg_cluster.sigstop()
        try:
            started = time.monotonic()
            with pytest.raises(Refusal) as refused:
                await ledger.reserve(limits, "a", "s", Decimal(0), 1, intent("during"))
            waited = time.monotonic() - started
        finally:
            pg_cluster.sigcont()
        assert refused.value.status == 503 and waited < 2.0
        assert refused.value.reason == (
            f"budgets and rate limits cannot be checked: store {pg_url} is unreachable: no answer within 1 s"
        )
        # back: admitted again, without a restart; and a free call of an agent without limits never waited
        await ledger.reserve(limits, "a", "s", Decimal(0), 1, intent("after"))
        assert not (await ledger.reserve(Limits(), "b", "s", Decimal(0), 1, intent("free"))).shared
        # the answer lost to the timeout, if the store admitted it after all, is released: the
        # resumed server may commit it just after a release ran, so ticks repeat the release
        # (for UNSURE_REPEAT seconds), as the proxy's ticks do
        deadline = time.monotonic() + 10
        while True:
            await ledger.tick()
            left = rows(pg_url, "SELECT request_id FROM spend_intents ORDER BY request_id")
            if left == [("after",), ("before",)] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert left == [("after",), ("before",)]
    finally:
        await engine.close()


# --- three replica processes on one database ---------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_up(config: Path, port: int, log: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*EG, "up", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=log.open("a"),
        text=True,
        env={**os.environ, **REAL_ENV},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("egress-guard listening on"):
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"egress-guard up did not start:\n{log.read_text()}")


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str, cred_config: dict[str, Any]) -> Any:
    cred_config["store"] = pg_url
    cred_config["agents"]["researcher"]["limits"] = {"budget_usd": {"total": 1000}}
    cred_config["agents"]["writer"]["limits"] = {"requests_per_minute": 10}
    config = write_config(tmp_path, cred_config)
    log = tmp_path / "up.log"
    procs: list[subprocess.Popen[str]] = []
    ports: list[int] = []
    try:
        for _ in range(3):
            ports.append(free_port())
            procs.append(start_up(config.path, ports[-1], log))
        yield config, ports, procs
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def spread(ports: list[int], ctx: ssl.SSLContext, calls: list[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response]:
    """Every call at once (one thread each, released together), call i through replica i % 3."""
    results: list[Any] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        method, url, kw = calls[i]
        with httpx.Client(
            proxy=f"http://127.0.0.1:{ports[i % len(ports)]}", verify=ctx, trust_env=False, timeout=30
        ) as c:
            barrier.wait()
            try:
                results[i] = c.request(method, url, **kw)
            except httpx.HTTPError as exc:
                results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_three_replicas_share_one_budget_and_one_rate_limit(replicas: Any, pg_url: str, llm_upstream: Any) -> None:
    config, ports, _ = replicas
    ctx = ssl.create_default_context(cafile=str(config.ca_dir / "egress-guard-ca.pem"))
    base = f"https://api.openai.com:{llm_upstream.port}/v1"
    key = keys.mint(config, "researcher").env["OPENAI_API_KEY"]
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "gpt-4o-mini", "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]}

    # what one call reserves, as the proxy words it: a budget below it refuses the call
    with open_store(config, write=True) as store:
        store.write(SetBudget("researcher", "total", Decimal("0.000001"), now_iso()))
    time.sleep(1.5)  # every replica's follower reads the override (0.5 s)
    (probe,) = spread(ports[:1], ctx, [("POST", f"{base}/chat/completions", {"json": body, "headers": auth})])
    assert probe.status_code == 429, probe.text
    reason = probe.json()["error"]["message"]
    reservation = Decimal(reason.split("may cost up to $")[1].split(")")[0])
    budget = (reservation * Decimal("6.5")).quantize(Decimal("0.000001"))
    with open_store(config, write=True) as store:
        store.write(SetBudget("researcher", "total", budget, now_iso()))
    time.sleep(1.5)

    calls = [
        ("POST", f"{base}/chat/completions", {"json": body, "headers": auth, "params": {"n": str(i)}})
        for i in range(64)
    ]
    results = spread(ports, ctx, calls)
    codes = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in results]
    ok = codes.count(200)
    assert set(codes) <= {200, 429}, codes
    assert ok >= 6, codes  # 6 reservations fit at once; more as the first ones settle below them

    time.sleep(1.0)  # the last rows commit
    (settled,) = rows(
        pg_url, "SELECT coalesce(sum(cost_usd::numeric), 0) FROM audit WHERE agent = 'researcher' AND kind = 'request'"
    )[0]
    by_replica = rows(
        pg_url,
        "SELECT chain, count(*) FROM audit WHERE agent = 'researcher' AND status = 200 GROUP BY chain ORDER BY chain",
    )
    (spent, reserved) = rows(pg_url, "SELECT spent, reserved FROM budget_usage WHERE scope = 'total'")[0]
    print(
        f"\n3 replicas, 64 concurrent calls: {ok} answered 200, {codes.count(429)} refused 429 "
        f"(per replica {[n for _, n in by_replica]}); budget ${budget}, one reservation ${reservation}; "
        f"settled ${settled} ({(settled - budget) / reservation:+.2f} reservations vs the budget); "
        f"budget_usage spent ${spent}, reserved ${reserved}"
    )
    if settled > budget:
        for r in rows(
            pg_url,
            "SELECT id, request_id, status, cost_usd, chain, reason, decision, duration_ms FROM audit WHERE cost_usd IS NOT NULL ORDER BY id",
        ):
            print("DEBUG", r)
    assert settled <= budget + reservation
    # no replica stopped: none took over another's (or its own) calls in flight
    assert rows(pg_url, "SELECT count(*) FROM audit WHERE reason LIKE 'settled at its reservation%%'") == [(0,)]
    assert spent == settled and reserved == 0
    assert rows(pg_url, "SELECT count(*) FROM spend_intents") == [(0,)]
    assert rows(pg_url, "SELECT inflight FROM agent_usage WHERE agent = 'researcher'") == [(0,)]

    # a rate limit is the fleet's: 10 requests per minute for writer, whichever replica they reach
    wkey = keys.mint(config, "writer").env["ANTHROPIC_API_KEY"]
    got = spread(
        ports,
        ctx,
        [("GET", f"https://api.anthropic.com:{llm_upstream.port}/v1/models", {"headers": {"x-api-key": wkey}})] * 30,
    )
    wcodes = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in got]
    print(
        f"rate limit 10/min over 3 replicas, 30 concurrent requests: {wcodes.count(200)} passed, {wcodes.count(429)} refused"
    )
    assert wcodes.count(200) == 10 and wcodes.count(429) == 20, wcodes
    assert json.loads(next(r for r in got if r.status_code == 429).text)  # the provider's error shape
    time.sleep(0.5)  # the rows settle the passed calls' places in flight
    assert rows(pg_url, "SELECT inflight FROM agent_usage WHERE agent = 'writer'") == [(0,)]
    assert rows(pg_url, "SELECT count(*) FROM spend_intents") == [(0,)]
