"""The PostgreSQL store on a real PostgreSQL 15 cluster: migrations (once, under a lock, by
many replicas at once), the engine's batch commit and reads, the proxy end to end."""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support.clients import curl
from support.pg import PGCluster, pg_rows
from support.proxy import RunningProxy
from support.upstream import Upstream

from egress_guard.config.fleet import StoreSettings
from egress_guard.store import AuditRow, Batch, Intent, StoreError
from egress_guard.store.postgres import MIGRATIONS, PGEngine, PGStore


def settings(url: str, replica: str = "r1", timeout: float = 2.0) -> StoreSettings:
    return StoreSettings(url=url, replica=replica, timeout=timeout)


def row(request_id: str, **kw: Any) -> AuditRow:
    return AuditRow(
        ts=kw.pop("ts", "2026-01-02T03:04:05.678Z"), request_id=request_id, kind="request", decision="allow", **kw
    )


def test_migrations_run_once_when_many_replicas_start_together(pg_url: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            with PGStore(settings(pg_url), readonly=False) as store:
                results.append(store.migrate())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with psycopg.connect(pg_url) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
    assert names == [name for name, _ in MIGRATIONS]
    assert names[:8] == [
        "0001_audit",
        "0002_fake_keys",
        "0003_spend",
        "0004_spend_intents",
        "0005_websocket",
        "0006_spend_totals",
        "0007_hash_chain",
        "0008_fleet",
    ]


def test_readonly_store_on_an_empty_database_says_so(pg_url: str) -> None:
    with pytest.raises(StoreError, match=r"store postgresql://eg@.* has no egress-guard tables"):
        PGStore(settings(pg_url))


def test_engine_commits_a_batch_in_one_transaction_and_reads_back(pg_url: str) -> None:
    async def main() -> None:
        engine = PGEngine(settings(pg_url))
        assert await engine.open() == 0
        try:
            batch = Batch(
                intents=[
                    Intent(
                        request_id="q1",
                        ts="2026-01-02T03:04:05.000Z",
                        agent="a",
                        session="s",
                        service="openai",
                        model="m",
                        day="2026-01-02",
                        reserved_usd="0.5",
                    )
                ],
                rows=[row("r1", agent="a", session="s", cost_usd="0.0030", duration_ms=1 / 3, path="/\udcff\x00")],
            )
            await engine.commit(batch)
            settle = Batch(
                rows=[row("q1", agent="a", session="s", cost_usd="0.001")], settles=["q1"], amends=[("r1", "cut")]
            )
            await engine.commit(settle)
            totals = await engine.totals()
            assert [(t.agent, t.session, t.day, t.usd) for t in totals] == [("a", "s", "2026-01-02", Decimal("0.0040"))]
            assert await engine.spent_since("2026-01-01T00:00:00.000Z") == {"a": Decimal("0.0040")}
        finally:
            await engine.close()

    asyncio.run(main())
    with PGStore(settings(pg_url)) as store:
        rows = store.rows(store_filters(), None)
        assert [r["request_id"] for r in rows] == ["r1", "q1"]
        assert rows[0]["duration_ms"] == 1 / 3  # exact round trip (the chain's hashes need it)
        assert rows[0]["path"] == "/" + "\ufffd" * 4  # a lone surrogate and a NUL cannot stop the log
        assert (rows[0]["decision"], rows[0]["reason"]) == ("error", "cut")
        assert store.totals()[0].usd == Decimal("0.0040")
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM spend_intents").fetchone() == (0,)


def store_filters() -> Any:
    from egress_guard.store import Filters

    return Filters()


def test_open_settles_only_this_replicas_leftover_intents(pg_url: str) -> None:
    async def main() -> None:
        for replica in ("r1", "r2"):
            engine = PGEngine(settings(pg_url, replica))
            await engine.open()
            intent = Intent(
                request_id=f"left-{replica}",
                ts="2026-01-02T03:04:05.000Z",
                agent="a",
                session=None,
                service="openai",
                model="m",
                day="2026-01-02",
                reserved_usd="0.25",
            )
            await engine.commit(Batch(intents=[intent]))
            await engine.close()
        again = PGEngine(settings(pg_url, "r1"))
        assert await again.open() == 1
        await again.close()

    asyncio.run(main())
    rows = pg_rows(pg_url)
    assert [(r["request_id"], r["cost_usd"]) for r in rows] == [("left-r1", "0.25")]
    assert rows[0]["reason"].startswith("settled at its reservation")
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT request_id, replica FROM spend_intents").fetchall() == [("left-r2", "r2")]


def test_unreachable_store_fails_naming_it_without_the_password(tmp_path: Path, pg_cluster: PGCluster) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2-very-secret\n")
    dead = f"postgresql://eg@127.0.0.1:{free_port()}/egress_guard"
    store = StoreSettings(url=dead, password_file=secret, replica="r1", timeout=1.0)
    with pytest.raises(StoreError) as caught:
        PGStore(store)
    assert str(caught.value).startswith(f"store {dead} is unreachable: ")
    assert "hunter2" not in str(caught.value) and "hunter2" not in repr(store)

    async def main() -> str:
        engine = PGEngine(store)
        assert "hunter2" not in repr(engine)
        try:
            await engine.open()
        except StoreError as exc:
            return str(exc)
        raise AssertionError("opened a dead store")

    message = asyncio.run(main())
    assert message.startswith(f"store {dead} is unreachable") and "hunter2" not in message


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_proxy_on_postgresql_serves_and_records(make_proxy: Any, upstream: Upstream, pg_url: str) -> None:
    proxy: RunningProxy = make_proxy(store=pg_url)
    status, _, _ = curl(proxy, f"https://api.test.local:{upstream.port}/json")
    assert status == 200
    status, _, _ = curl(proxy, f"https://other.test.local:{upstream.port}/json")
    assert status == 403
    rows = pg_rows(pg_url, expect=3)
    assert [(r["kind"], r["decision"], r["host"]) for r in rows] == [
        ("connect", "allow", "api.test.local"),
        ("request", "allow", "api.test.local"),
        ("connect", "deny", "other.test.local"),
    ]
    assert not (proxy.config.audit_path.exists() and sqlite_rows(proxy.config.audit_path))  # nothing went to SQLite


def sqlite_rows(path: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()
