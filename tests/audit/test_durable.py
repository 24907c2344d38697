"""Group commit on real SQLite files: a waiter is woken only once its row is committed, and
at once (no batch delay); many waiters share commits; a metered call's intent is committed
before it is forwarded, removed with its row, and settled at its reservation by the next
start; a failing DB fails the waiters (rows stay queued) instead of acknowledging them."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.small_disk import fill, small_disk
from test_audit_log import row

from egress_guard.store import SETTLED_AT_RESERVATION, AuditLog, AuditUnavailable, Intent
from egress_guard.store.sqlite import writes


def intent(request_id: str = "r1", usd: str = "0.25") -> Intent:
    return Intent(
        request_id=request_id,
        ts="2026-11-22T10:00:00.000Z",
        agent="bot",
        session="s1",
        service="openai",
        model="gpt-4o-mini",
        day="2026-11-22",
        reserved_usd=usd,
        method="POST",
        host="api.openai.com",
        port=443,
        path="/v1/chat/completions",
    )


async def healthy_again(log: AuditLog) -> None:
    """The writer retries every 0.25 s: wait (bounded) until a retry succeeded."""
    for _ in range(100):
        if log.healthy:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still unhealthy: {log.unhealthy_reason}")


def select(db: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_durable_returns_once_the_row_is_committed_and_without_the_batch_delay(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db", batch_delay=2.0)  # rows nobody waits on may wait 2 s
    await log.open()
    started = time.monotonic()
    await log.durable(log.record(row(1)))
    assert time.monotonic() - started < 0.5
    assert select(tmp_path / "a.db", "SELECT request_id FROM audit") == [("r1",)]  # another connection sees it
    await log.close()


async def test_waiters_share_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "a.db")
    await log.open()
    commits = 0
    inner = writes.commit

    def counted(*args):  # the real commit, counted
        nonlocal commits
        commits += 1
        inner(*args)

    monkeypatch.setattr(writes, "commit", counted)

    async def one(i: int) -> None:
        await asyncio.sleep(0)
        await log.durable(log.record(row(i)))

    await asyncio.gather(*(one(i) for i in range(500)))
    assert select(tmp_path / "a.db", "SELECT COUNT(*) FROM audit") == [(500,)]
    assert commits < 50, commits  # 500 waiters, a handful of commits
    await log.close()


async def test_intent_is_committed_then_removed_with_its_row(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db)
    await log.open()
    await log.intent(intent("r1"))
    assert select(db, "SELECT request_id, reserved_usd FROM spend_intents") == [("r1", "0.25")]
    log.record(row(2))  # another request's row leaves it alone
    await log.durable(log.record(row(1, cost_usd="0.01")))
    assert select(db, "SELECT request_id FROM spend_intents") == []
    assert select(db, "SELECT request_id, cost_usd FROM audit ORDER BY id") == [("r2", None), ("r1", "0.01")]
    await log.close()


KILLED_WRITER = """
import asyncio, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_durable import intent
from egress_guard.store import AuditLog

async def main():
    log = AuditLog(Path(sys.argv[1]))
    await log.open()
    await log.intent(intent("r-unfinished", "0.5"))
    await log.intent(intent("r-finished", "0.5"))
    await log.durable(log.record(__import__("test_audit_log").row(0, request_id="r-finished", cost_usd="0.02")))
    os.kill(os.getpid(), 9)  # the proxy dies with one call in flight

asyncio.run(main())
"""


async def test_next_start_settles_unfinished_intents_at_their_reservation(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(db), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert done.returncode == -9, done.stderr
    assert select(db, "SELECT request_id FROM spend_intents") == [("r-unfinished",)]
    log = AuditLog(db)
    await log.open()
    assert log.settled_at_start == 1
    assert select(db, "SELECT request_id FROM spend_intents") == []
    (settled,) = select(
        db,
        "SELECT ts, agent, session, decision, reason, model, cost_usd, host, path FROM audit "
        "WHERE request_id = 'r-unfinished'",
    )
    assert settled == (
        "2026-11-22T10:00:00.000Z",  # the call's own time: it counts against that day
        "bot",
        "s1",
        "allow",
        SETTLED_AT_RESERVATION,
        "gpt-4o-mini",
        "0.5",
        "api.openai.com",
        "/v1/chat/completions",
    )
    await log.close()
    # settled once: a second start finds nothing
    again = AuditLog(db)
    await again.open()
    assert again.settled_at_start == 0
    await again.close()
    assert select(db, "SELECT COUNT(*) FROM audit WHERE request_id = 'r-unfinished'") == [(1,)]


async def test_a_locked_db_fails_the_waiter_keeps_the_row_and_amends_it(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db)
    await log.open()
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    n = log.record(row(1))
    started = time.monotonic()
    with pytest.raises(AuditUnavailable, match="database is locked"):
        await log.durable(n)
    assert time.monotonic() - started < 3  # bounded by the busy timeout, not a hang
    assert not log.healthy
    log.amend(n, "r1", "response cut off")
    # while it is failing, a waiter is refused at once rather than held
    started = time.monotonic()
    with pytest.raises(AuditUnavailable):
        await log.durable(log.record(row(2)))
    assert time.monotonic() - started < 0.1
    lock.execute("ROLLBACK")
    lock.close()
    await healthy_again(log)
    await log.durable(log.record(row(3)))
    assert select(db, "SELECT request_id, decision, reason FROM audit ORDER BY id") == [
        ("r1", "error", "response cut off"),
        ("r2", "allow", None),
        ("r3", "allow", None),
    ]
    await log.close()


async def test_amend_after_the_row_is_committed_updates_it(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    await log.open()
    n = log.record(row(1, reason="allowed"))
    await log.durable(n)
    log.amend(n, "r1", "cut")
    await log.durable(log.record(row(2)))
    assert select(tmp_path / "a.db", "SELECT decision, reason FROM audit WHERE request_id = 'r1'") == [
        ("error", "allowed; cut")
    ]
    await log.close()


async def test_durable_on_a_log_that_is_not_open_refuses() -> None:
    log = AuditLog(Path("/nonexistent/a.db"))
    with pytest.raises(AuditUnavailable, match="not open"):
        await log.durable(log.record(row(1)))


# --- a real full disk: a small tmpfs -------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_disk(tmp_path) as mnt:
        yield mnt


async def test_a_full_disk_fails_the_waiter_and_the_row_is_written_once_there_is_room(disk: Path) -> None:
    db = disk / "a.db"
    log = AuditLog(db)
    await log.open()
    await log.durable(log.record(row(0)))
    filler = fill(disk)
    n = log.record(row(1, reason="x" * 200_000))  # more than the WAL has room for
    with pytest.raises(AuditUnavailable, match="full"):
        await log.durable(n)
    assert not log.healthy and "full" in log.unhealthy_reason
    filler.unlink()
    await healthy_again(log)
    await log.durable(log.record(row(2)))
    assert [r for (r,) in select(db, "SELECT request_id FROM audit ORDER BY id")] == ["r0", "r1", "r2"]
    assert await log.close() == 0


async def test_a_writer_that_dies_leaves_the_log_unhealthy_and_fails_its_waiters(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db", batch_delay=0.5)
    await log.open()
    log.record(row(1))
    log._pending.append("not a row")  # a bug in the writer's own hands, not a DB error
    with pytest.raises(AuditUnavailable, match="writer stopped"):
        await log.durable(log.record(row(2)))
    assert not log.healthy and "writer stopped" in log.unhealthy_reason
    with pytest.raises(AuditUnavailable):
        await log.durable(log.record(row(3)))
    assert await log.close() == 4  # what the writer held when it died is reported lost


async def test_one_writing_proxy_per_db(tmp_path: Path) -> None:
    first = AuditLog(tmp_path / "a.db")
    await first.open()
    second = AuditLog(tmp_path / "a.db")
    with pytest.raises(OSError, match=r"another egress-guard proxy is writing .*a.db: run one proxy per audit DB"):
        await second.open()
    await first.close()
    await second.open()  # the first one is gone: the DB is free again
    await second.close()


async def test_a_commit_that_hangs_fails_its_waiters_after_wait_timeout(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db, wait_timeout=0.3)  # the DB's busy timeout is 1 s: the commit hangs longer than that
    await log.open()
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    started = time.monotonic()
    with pytest.raises(AuditUnavailable, match=r"a commit has not finished in 0\.3 s"):
        await log.durable(log.record(row(1)))
    assert 0.25 < time.monotonic() - started < 0.9
    assert not log.healthy
    started = time.monotonic()
    with pytest.raises(AuditUnavailable):  # while it is stuck, nobody else is held either
        await log.durable(log.record(row(2)))
    assert time.monotonic() - started < 0.1
    lock.execute("ROLLBACK")
    lock.close()
    await healthy_again(log)
    await log.durable(log.record(row(3)))
    assert select(db, "SELECT request_id FROM audit ORDER BY id") == [("r1",), ("r2",), ("r3",)]
    await log.close()


async def test_a_lock_held_briefly_elsewhere_delays_the_commit_instead_of_failing_it(tmp_path: Path) -> None:
    """The event loop's connection never waits on a lock: the batch goes to the writer's
    thread, which waits (up to the busy timeout) for the other connection to commit."""
    db = tmp_path / "a.db"
    log = AuditLog(db)
    await log.open()
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # e.g. `budget set` or the budget follower, mid-transaction
    asyncio.get_running_loop().call_later(0.2, other.execute, "COMMIT")
    started = time.monotonic()
    await log.durable(log.record(row(1)))
    assert 0.15 < time.monotonic() - started < 1.0
    assert log.healthy
    other.close()
    await log.close()


async def test_the_log_checkpoints_its_wal_itself(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db)
    log.engine.CHECKPOINT_EVERY = 10  # type: ignore[attr-defined]
    await log.open()
    before = db.stat().st_size
    for i in range(100):
        await log.durable(log.record(row(i, reason="x" * 500)))
    for _ in range(100):  # the last checkpoint runs in the background
        if log.engine._upkeep is None:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert db.stat().st_size > before  # pages were copied from the WAL into the DB file
    await log.close()
