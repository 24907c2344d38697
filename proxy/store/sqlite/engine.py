"""`SQLiteEngine`: the SQLite store as the running proxy sees it (`interface.Engine`).

Where a commit runs: with synchronous=NORMAL a commit of a few rows is a write into the
WAL, i.e. the OS page cache (≈ 0.1 ms), cheaper than the two thread switches it would take
to run it elsewhere, so such a batch is committed on the event loop with a busy timeout of
0 (`commit_now`). Anything that could wait goes to the engine's own thread (`commit`): a
batch another connection holds the lock against (SQLITE_BUSY), a large batch (a backlog),
every retry after an error, FULL's fsync, and the upkeep: WAL checkpoints (their fsyncs),
which the engine runs itself every CHECKPOINT_EVERY commits instead of SQLite's in-commit
autocheckpoint, and fresh planner statistics when the table has outgrown them.

Durability: WAL with synchronous=NORMAL (the default) survives the process being killed
(kill -9, OOM): a commit is in the OS's hands before the response completes. It does not
survive losing power or the OS; synchronous=FULL (an fsync per commit) does.

Reads (keys, revocations, budget overrides, totals) go through a read-only connection of
their own, so a key lookup never waits behind a commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiosqlite

from egress_guard.fakekeys import KeyRecord
from egress_guard.store import chain
from egress_guard.store.interface import Batch
from egress_guard.store.records import Approval, Freeze, GrantRecord, Revocation, Spent
from egress_guard.store.sqlite import queries, schema, writes

log = logging.getLogger("egress_guard.audit")


class SQLiteEngine:
    INLINE_MAX = 64  # items in a batch committed on the event loop
    CHECKPOINT_EVERY = 200  # commits between two (passive) WAL checkpoints, in the thread
    WAL_RESTART_FRAMES = 50_000  # a WAL this long (~200 MB) is restarted, whatever waits for it
    STATISTICS_EVERY = 50  # checkpoints between two checks that the planner's statistics still fit

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path, self.name = path, str(path)
        self.chain = chain.LOCAL
        self.head: tuple[int, str] = (0, "")  # read by open()
        self.synchronous = synchronous.upper()
        self._conn: sqlite3.Connection | None = None  # the thread's: waits on locks, runs the upkeep
        self._fast: sqlite3.Connection | None = None  # the event loop's: never waits (NORMAL only)
        self._reader: aiosqlite.Connection | None = None
        self._lock: int | None = None  # the writer lock's descriptor
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._since_checkpoint = 0
        self._checkpoints = 0
        self._upkeep: asyncio.Future[None] | None = None
        self.read_failures = 0  # reads that raised

    # --- opening and closing ---------------------------------------------------------------

    async def open(self) -> int:
        await asyncio.to_thread(schema.migrate, self.path)
        # One thread owns the writing connection: every commit is one hop to it and back.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="egress-guard-audit")
        try:
            settled: int = await self._in_thread(self._open_sync)
            self._reader = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True, timeout=2.0)
        except BaseException:
            await self.close()
            raise
        return settled

    def _open_sync(self) -> int:
        # One writing proxy per DB: a second one would settle the first one's calls in flight
        # (billing them twice). flock, on a file of its own (closing any descriptor of the DB
        # would drop SQLite's own POSIX locks); the kernel releases it if the process dies.
        lock = os.open(f"{self.path}-writer", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise OSError(
                f"another egress-guard proxy is writing {self.path}: run one proxy per audit DB "
                "(give each its own audit.path)"
            ) from None
        self._lock = lock
        conn = self._conn = self._connect(timeout=1.0)
        conn.execute("PRAGMA journal_mode=WAL")
        if self.synchronous == "NORMAL":
            self._fast = self._connect(timeout=0)
        with schema.transaction(conn):  # takes the write lock: fails if we cannot write
            settled, self.head = writes.settle_intents(conn, self.chain)
            conn.execute("DELETE FROM budget_reserved")  # a previous run's: this one writes its own
        if schema.statistics_stale(conn):
            schema.analyze(conn)
        return settled

    def _connect(self, timeout: float) -> sqlite3.Connection:
        # check_same_thread=False: the loop's connection is made here, in the thread, to keep
        # the file I/O of opening it off the loop; each is then used by one thread only.
        conn = schema.connect(self.path, timeout=timeout, check_same_thread=False)
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run in the thread (_upkeep_sync)
        conn.execute("PRAGMA journal_size_limit=67108864")  # a restarted WAL shrinks back to 64 MiB
        return conn

    async def close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.close()
            self._reader = None
        if self._thread is not None:
            with contextlib.suppress(TimeoutError):  # behind a commit that hangs: leave it to exit
                await asyncio.wait_for(self._in_thread(self._close_sync), 1.0)
            self._thread.shutdown(wait=False)
            self._thread = None

    def _close_sync(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA optimize")
            self._conn.close()
            self._conn = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _in_thread(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        assert self._thread is not None
        return asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # --- commits ---------------------------------------------------------------------------

    def commit_now(self, batch: Batch) -> bool:
        if self._fast is None or len(batch) > self.INLINE_MAX:
            return False
        try:
            writes.commit(self._fast, writes.bind(batch))
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            return False  # another connection holds the write lock: wait for it in the thread
        return True

    def commit(self, batch: Batch) -> asyncio.Future[None]:
        return self._in_thread(writes.commit, self._conn, writes.bind(batch))

    def committed(self) -> None:
        self._since_checkpoint += 1
        if self._since_checkpoint < self.CHECKPOINT_EVERY or self._upkeep is not None:
            return
        self._since_checkpoint = 0
        self._checkpoints += 1
        self._upkeep = self._in_thread(self._upkeep_sync, self._checkpoints % self.STATISTICS_EVERY == 0)
        self._upkeep.add_done_callback(self._upkept)

    def _upkeep_sync(self, statistics: bool) -> None:
        assert self._conn is not None
        _busy, frames, _done = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames > self.WAL_RESTART_FRAMES:  # writes never paused long enough for a passive one to finish
            self._conn.execute("PRAGMA wal_checkpoint(RESTART)")
        if statistics and schema.statistics_stale(self._conn):
            schema.analyze(self._conn)

    def _upkept(self, done: asyncio.Future[None]) -> None:
        self._upkeep = None
        if not done.cancelled() and done.exception() is not None:  # the next one tries again
            log.warning("audit log %s: upkeep failed (%s)", self.path, done.exception())

    # --- what the proxy reads ----------------------------------------------------------------

    def _read(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError(f"audit DB {self.path} is not open")
        return self._reader

    async def _all(self, sql: str, *args: Any) -> list[Any]:
        # One call in aiosqlite's thread: the statement runs to its end there. (execute, then
        # fetchall, let another read start between them on this one connection, inside the
        # read transaction the first statement holds open: it saw no commit after that one's
        # start — an expiry read back as still pending.)
        try:
            return list(await self._read().execute_fetchall(sql, args))
        except Exception:
            self.read_failures += 1  # for the metrics (store errors, op="read")
            raise

    async def key(self, key_id: str) -> KeyRecord | None:
        rows = await self._all(queries.SELECT_KEYS + " WHERE key_id = ?", key_id)
        return queries.key_record(rows[0]) if rows else None

    async def revocations(self, after: int) -> list[Revocation]:
        return [Revocation(*r) for r in await self._all(queries.SELECT_REVOCATIONS, after)]

    async def last_revocation(self) -> int:
        (row,) = await self._all("SELECT COALESCE(MAX(id), 0) FROM revocations")
        return int(row[0])

    async def overrides(self) -> dict[tuple[str, str], Decimal]:
        return queries.overrides(await self._all(queries.SELECT_OVERRIDES))

    async def totals(self) -> list[Spent]:
        return queries.totals(await self._all(queries.SELECT_TOTALS))

    async def spent_since(self, since: str) -> dict[str, Decimal]:
        return queries.per_agent(await self._all(queries.SELECT_SPENT_SINCE, since))

    async def approvals_by_id(self, ids: list[str]) -> list[Approval]:
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        return [queries.approval(r) for r in await self._all(f"{queries.SELECT_APPROVALS} WHERE id IN ({marks})", *ids)]

    async def active_grants(self) -> list[GrantRecord]:
        return [queries.grant(r) for r in await self._all(queries.SELECT_GRANTS + " WHERE revoked IS NULL ORDER BY id")]

    async def active_freezes(self) -> list[Freeze]:
        return [
            queries.freeze(r) for r in await self._all(queries.SELECT_FREEZES + " WHERE lifted IS NULL ORDER BY id")
        ]

    async def grants_by_id(self, ids: list[int]) -> list[GrantRecord]:
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        return [queries.grant(r) for r in await self._all(f"{queries.SELECT_GRANTS} WHERE id IN ({marks})", *ids)]

    async def freezes_by_id(self, ids: list[int]) -> list[Freeze]:
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        return [queries.freeze(r) for r in await self._all(f"{queries.SELECT_FREEZES} WHERE id IN ({marks})", *ids)]
