"""The audit log on real SQLite files: migrations, batching, flush on close, fail-closed
health while the DB cannot be written, and the queries the CLI runs."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from egress_guard.store import COLUMNS, AuditLog, AuditRow, Filters, SQLiteStore, migrate
from egress_guard.timeutil import now_iso


def row(i: int = 0, **kw) -> AuditRow:
    base = {
        "ts": now_iso(),
        "request_id": f"r{i}",
        "kind": "request",
        "decision": "allow",
        "method": "GET",
        "host": "api.test.local",
        "port": 443,
        "path": "/x",
        "status": 200,
    }
    return AuditRow(**(base | kw))


def test_migrate_is_idempotent_and_named(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    names = [
        "0001_audit",
        "0002_fake_keys",
        "0003_spend",
        "0004_spend_intents",
        "0005_websocket",
        "0006_spend_totals",
        "0007_hash_chain",
        "0008_fleet",
        "0009_order_and_floor",
        "0010_policy",
    ]
    assert migrate(db) == names
    assert migrate(db) == []
    conn = sqlite3.connect(db)
    assert [r[0] for r in conn.execute("SELECT name FROM schema_migrations")] == names
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    columns = [r[1] for r in conn.execute("PRAGMA table_info(audit)")]
    assert columns == [*COLUMNS, "chain", "chain_seq", "hash", "amended_from"]
    conn.close()


async def test_every_row_is_written_by_close(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    await log.open()
    for i in range(5000):
        log.record(row(i))
    assert await log.close() == 0
    conn = sqlite3.connect(tmp_path / "a.db")
    assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM audit").fetchone() == (5000, 5000)


async def test_locked_db_makes_log_unhealthy_and_keeps_rows(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    await log.open()
    lock = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    log.record(row(1))
    for _ in range(100):
        if not log.healthy:
            break
        await asyncio.sleep(0.05)
    assert not log.healthy
    assert "database is locked" in log.unhealthy_reason
    log.record(row(2))
    lock.execute("ROLLBACK")
    for _ in range(100):
        if log.healthy:
            break
        await asyncio.sleep(0.05)
    assert log.healthy
    assert await log.close() == 0
    ids = [r[0] for r in lock.execute("SELECT request_id FROM audit ORDER BY id")]
    assert ids == ["r1", "r2"]


async def test_backlog_limit_makes_log_unhealthy(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db", max_backlog=3)
    for i in range(3):
        log.record(row(i))  # not opened: nothing drains the queue
    assert not log.healthy and "rows behind" in log.unhealthy_reason


async def test_open_fails_on_unwritable_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    log = AuditLog(tmp_path / "file" / "a.db")
    with pytest.raises(OSError):
        await log.open()


async def test_queries_filter_and_count(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    await log.open()
    log.record(row(1, ts="2026-11-20T10:00:00.000Z", agent="a"))
    log.record(row(2, ts="2026-11-21T10:00:00.000Z", agent="b", decision="deny", host="evil.test"))
    log.record(row(3, ts="2026-11-22T10:00:00.000Z", agent="a", request_bytes=10, response_bytes=20))
    await log.close()
    with SQLiteStore(tmp_path / "a.db") as db:
        assert [r["request_id"] for r in db.rows(Filters(agent="a"), None)] == ["r1", "r3"]
        assert [r["request_id"] for r in db.rows(Filters(), 2)] == ["r2", "r3"]
        assert [r["request_id"] for r in db.rows(Filters(), None, after_id=2)] == ["r3"]
        window = Filters(since="2026-11-21T00:00:00.000Z", until="2026-11-22T00:00:00.000Z")
        assert [r["request_id"] for r in db.rows(window, None)] == ["r2"]
        assert [r["request_id"] for r in db.rows(Filters(decision="deny"), None)] == ["r2"]
        assert db.count(window) == 1 and db.last_id() == 3
        stats = db.stats(Filters())
    assert [(s["host"], s["decision"], s["requests"]) for s in stats] == [
        ("api.test.local", "allow", 2),
        ("evil.test", "deny", 1),
    ]
    assert stats[0]["response_bytes"] == 20
