"""The audit log on real SQLite files: migrations, batching, flush on close, fail-closed
health while the DB cannot be written, and the queries the CLI runs."""

from __future__ import annotations

import asyncio
import datetime
import sqlite3
from pathlib import Path

import pytest

from egress_guard import audit
from egress_guard.audit import AuditLog, AuditRow, Filters, parse_when


def row(i: int = 0, **kw) -> AuditRow:
    base = {
        "ts": audit.now_iso(),
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
    names = ["0001_audit", "0002_fake_keys", "0003_spend", "0004_spend_intents", "0005_websocket"]
    assert audit.migrate(db) == names
    assert audit.migrate(db) == []
    conn = sqlite3.connect(db)
    assert [r[0] for r in conn.execute("SELECT name FROM schema_migrations")] == names
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    columns = [r[1] for r in conn.execute("PRAGMA table_info(audit)")]
    assert columns == audit.COLUMNS


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


def test_parse_when() -> None:
    now = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)
    assert parse_when("15m", now) == "2026-11-22T11:45:00.000Z"
    assert parse_when("2h", now) == "2026-11-22T10:00:00.000Z"
    assert parse_when("3d", now) == "2026-11-19T12:00:00.000Z"
    assert parse_when("2026-11-22T09:30", now) == "2026-11-22T09:30:00.000Z"
    assert parse_when("2026-11-22T09:30+01:00", now) == "2026-11-22T08:30:00.000Z"
    assert parse_when("2026-11-22T09:30:00Z", now) == "2026-11-22T09:30:00.000Z"
    with pytest.raises(ValueError, match="15m, 2h, 3d"):
        parse_when("yesterday")


async def test_queries_filter_and_count(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    await log.open()
    log.record(row(1, ts="2026-11-20T10:00:00.000Z", agent="a"))
    log.record(row(2, ts="2026-11-21T10:00:00.000Z", agent="b", decision="deny", host="evil.test"))
    log.record(row(3, ts="2026-11-22T10:00:00.000Z", agent="a", request_bytes=10, response_bytes=20))
    await log.close()
    conn = audit.connect(tmp_path / "a.db", readonly=True)
    assert [r["request_id"] for r in audit.query(conn, Filters(agent="a"), None)] == ["r1", "r3"]
    assert [r["request_id"] for r in audit.query(conn, Filters(), 2)] == ["r2", "r3"]
    assert [
        r["request_id"]
        for r in audit.query(conn, Filters(since="2026-11-21T00:00:00.000Z", until="2026-11-22T00:00:00.000Z"), None)
    ] == ["r2"]
    assert [r["request_id"] for r in audit.query(conn, Filters(decision="deny"), None)] == ["r2"]
    stats = audit.stats(conn, Filters())
    assert [(s["host"], s["decision"], s["requests"]) for s in stats] == [
        ("api.test.local", "allow", 2),
        ("evil.test", "deny", 1),
    ]
    assert stats[0]["response_bytes"] == 20
