"""The SQLite audit log: schema migrations, the group-committing writer, and the queries the CLI runs.

One row per decision. Rows are written by one writer task, many to a commit. A response
waits for its row (`durable`) — mitmproxy sends the end of the response only after the
`response` hook returns — so no agent holds a complete answer whose row a crash could lose.
A metered call's reservation (`intent`) is committed before the call is forwarded and
removed in the transaction that writes its row; `open()` settles the intents a stopped
proxy left behind at their reservation, so budgets rebuilt from the log never undercount.
A row that cannot be written yet stays queued (never dropped) and the log reports itself
unhealthy, so the proxy refuses new requests until it can record them again. Never stores
bodies or header values.

Durability: WAL with synchronous=NORMAL (the default) survives the process being killed
(kill -9, OOM): a commit is in the OS's hands before the response completes. It does not
survive losing power or the OS; `synchronous="FULL"` (an fsync per commit) does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import fcntl
import logging
import operator
import os
import re
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("egress_guard.audit")

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_audit",
        """
        CREATE TABLE audit (
            id             INTEGER PRIMARY KEY,
            ts             TEXT    NOT NULL,  -- UTC, ISO 8601 with milliseconds and Z
            request_id     TEXT    NOT NULL,
            kind           TEXT    NOT NULL CHECK (kind IN ('connect', 'request')),
            agent          TEXT,
            session        TEXT,
            client         TEXT,
            decision       TEXT    NOT NULL CHECK (decision IN ('allow', 'deny', 'error')),
            reason         TEXT,
            rule           TEXT,
            method         TEXT,
            scheme         TEXT,
            host           TEXT,
            port           INTEGER,
            path           TEXT,
            status         INTEGER,
            request_bytes  INTEGER,
            response_bytes INTEGER,
            duration_ms    REAL,
            service        TEXT,
            credential     TEXT,
            model          TEXT,
            input_tokens   INTEGER,
            output_tokens  INTEGER,
            cost_usd       TEXT     -- exact decimal as text, never a float
        );
        CREATE INDEX audit_ts ON audit (ts);
        CREATE INDEX audit_agent_ts ON audit (agent, ts);
        CREATE INDEX audit_host_ts ON audit (host, ts);
        CREATE INDEX audit_decision_ts ON audit (decision, ts);
        """,
    ),
    (
        "0002_fake_keys",
        """
        CREATE TABLE fake_keys (
            key_id         TEXT PRIMARY KEY,  -- names the key; the key itself is never stored
            agent          TEXT NOT NULL,
            session        TEXT NOT NULL,
            services       TEXT NOT NULL,     -- comma-separated service names
            created_at     TEXT NOT NULL,
            expires_at     TEXT NOT NULL,
            revoked_at     TEXT,
            revoked_reason TEXT
        );
        CREATE INDEX fake_keys_agent ON fake_keys (agent);
        CREATE INDEX fake_keys_session ON fake_keys (session);
        CREATE TABLE revocations (           -- the running proxy follows this table (kill switch)
            id      INTEGER PRIMARY KEY,
            ts      TEXT NOT NULL,
            agent   TEXT,
            session TEXT,
            key_id  TEXT,
            reason  TEXT
        );
        CREATE INDEX audit_session_ts ON audit (session, ts);
        """,
    ),
    (
        "0003_spend",
        """
        ALTER TABLE audit ADD COLUMN cached_tokens INTEGER;
        CREATE INDEX audit_agent_cost ON audit (agent, ts) WHERE cost_usd IS NOT NULL;
        CREATE TABLE budgets (                -- run-time overrides of the config's budgets
            agent      TEXT NOT NULL,
            scope      TEXT NOT NULL,         -- session | day | total | session:<id>
            limit_usd  TEXT NOT NULL,         -- exact decimal
            updated_at TEXT NOT NULL,
            PRIMARY KEY (agent, scope)
        );
        CREATE TABLE budget_reserved (        -- the running proxy's open reservations, for `budget show`
            key        TEXT PRIMARY KEY,      -- session:<agent>/<id> | day:<agent>/<date> | total:<agent>
            usd        TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        """,
    ),
    (
        "0004_spend_intents",
        """
        CREATE TABLE spend_intents (          -- metered calls forwarded and not yet recorded
            request_id   TEXT PRIMARY KEY,    -- the audit row that settles it has the same id
            ts           TEXT NOT NULL,
            agent        TEXT NOT NULL,
            session      TEXT,
            service      TEXT,
            model        TEXT,
            day          TEXT NOT NULL,       -- the budget day the reservation was made against
            reserved_usd TEXT NOT NULL,       -- exact decimal: what it is billed if never settled
            method       TEXT,
            host         TEXT,
            port         INTEGER,
            path         TEXT
        ) WITHOUT ROWID;                      -- one b-tree: an insert or delete touches one page
        """,
    ),
    (
        "0005_websocket",
        """
        ALTER TABLE audit ADD COLUMN ws_messages_out INTEGER;  -- WebSocket: messages agent -> upstream
        ALTER TABLE audit ADD COLUMN ws_messages_in INTEGER;   -- WebSocket: messages upstream -> agent
        ALTER TABLE audit ADD COLUMN ws_close_code INTEGER;    -- WebSocket: the close code (1006: no close frame)
        """,
    ),
]


@dataclass(slots=True, kw_only=True)
class AuditRow:
    """One audit row; fields in the table's column order."""

    ts: str
    request_id: str
    kind: str
    agent: str | None = None
    session: str | None = None
    client: str | None = None
    decision: str
    reason: str | None = None
    rule: str | None = None
    method: str | None = None
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    status: int | None = None
    request_bytes: int | None = None
    response_bytes: int | None = None
    duration_ms: float | None = None
    service: str | None = None
    credential: str | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: str | None = None
    cached_tokens: int | None = None
    ws_messages_out: int | None = None
    ws_messages_in: int | None = None
    ws_close_code: int | None = None


COLUMNS = ["id", *(f.name for f in dataclasses.fields(AuditRow))]
_INSERT = f"INSERT INTO audit ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * (len(COLUMNS) - 1))})"
_row_fields = operator.attrgetter(*COLUMNS[1:])  # a row's values in column order (astuple copies deeply)


def _bindable(values: tuple) -> tuple:
    """The values with every text made encodable: mitmproxy decodes wire bytes with
    surrogateescape (an HTTP/2 :path of b"/a\\xff"), and one lone surrogate that sqlite3
    cannot bind would fail its batch again and again, stopping the log (every request then
    refused). ASCII, nearly every value, costs one check."""
    return tuple(
        v.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if isinstance(v, str) and not v.isascii() else v
        for v in values
    )


def _row_values(row: AuditRow) -> tuple:
    return _bindable(_row_fields(row))


@dataclass(slots=True, kw_only=True)
class Intent:
    """A metered call's reservation, committed before the call is forwarded: if the proxy
    stops before the call's own row is written, the next start bills the reservation."""

    request_id: str
    ts: str
    agent: str
    session: str | None
    service: str | None
    model: str | None
    day: str
    reserved_usd: str
    method: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None


INTENT_COLUMNS = [f.name for f in dataclasses.fields(Intent)]
_INSERT_INTENT = "INSERT OR REPLACE INTO spend_intents ({}) VALUES ({})".format(
    ", ".join(INTENT_COLUMNS), ", ".join("?" * len(INTENT_COLUMNS))
)
_intent_fields = operator.attrgetter(*INTENT_COLUMNS)


def _intent_values(intent: Intent) -> tuple:
    return _bindable(_intent_fields(intent))


_SETTLE_INTENT = "DELETE FROM spend_intents WHERE request_id = ?"
_AMEND = (
    "UPDATE audit SET decision = 'error', reason = COALESCE(reason || '; ', '') || ? "
    "WHERE request_id = ? AND kind = 'request'"
)
SETTLED_AT_RESERVATION = (
    "settled at its reservation: the proxy stopped before the call finished (the provider may have charged for it)"
)


@dataclass(slots=True)
class _Amend:
    """A note for a row already on its way to the DB (see `AuditLog.amend`)."""

    request_id: str
    note: str


class AuditUnavailable(Exception):
    """The audit log could not commit a row (or intent) someone was waiting on."""


_second: tuple[int, str] = (0, "")


def now_iso() -> str:
    """Now in UTC as 2026-01-31T12:00:00.123Z (the audit log's format; sorts as text)."""
    global _second
    t = time.time()
    sec = int(t)
    if sec != _second[0]:  # formatting is most of the cost: once a second
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_second[1]}.{int((t - sec) * 1000):03d}Z"


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    else:
        conn = sqlite3.connect(path, timeout=5)
    conn.row_factory = sqlite3.Row
    return conn


def _statements(sql: str) -> list[str]:
    """Split a script into statements (';' inside comments or strings does not split)."""
    out, buf = [], ""
    for piece in sql.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n;"):
                out.append(buf)
            buf = ""
    return out


def migrate(path: Path) -> list[str]:
    """Create the DB if needed and apply pending named migrations. Returns those applied."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        done = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
        applied = []
        for name, sql in MIGRATIONS:
            if name in done:
                continue
            with conn:  # one transaction per migration
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (name, now_iso()))
            applied.append(name)
        return applied
    finally:
        conn.close()


def settle_intents(conn: sqlite3.Connection) -> int:
    """Bill every unfinished metered call at its reservation: one audit row each, written
    with the intent's removal. Only the proxy's own writer may run this, at start (a
    running proxy's intents are its calls in flight). Returns how many were settled."""
    rows = conn.execute(f"SELECT {', '.join(INTENT_COLUMNS)} FROM spend_intents ORDER BY ts").fetchall()
    for r in rows:
        i = Intent(**{k: r[k] for k in INTENT_COLUMNS})
        row = AuditRow(
            ts=i.ts,  # when the call was made: it counts against that day's budget
            request_id=i.request_id,
            kind="request",
            agent=i.agent,
            session=i.session,
            decision="allow",
            reason=SETTLED_AT_RESERVATION,
            method=i.method,
            scheme="https",
            host=i.host,
            port=i.port,
            path=i.path,
            service=i.service,
            model=i.model,
            cost_usd=i.reserved_usd,
        )
        conn.execute(_INSERT, _row_values(row))
        conn.execute(_SETTLE_INTENT, (i.request_id,))
    return len(rows)


class AuditLog:
    """The proxy's writer. `record` never blocks; `durable` waits for a row's commit;
    `intent` commits a metered call's reservation; `healthy` says whether to accept traffic.

    Group commit: the writer commits whatever is queued as soon as it has work, and while
    one commit runs the next batch gathers. Rows nobody waits on (CONNECTs, errors) may wait
    `batch_delay` for company; a waiter never does.

    Where a commit runs: with synchronous=NORMAL a commit of a few rows is a write into the
    WAL, i.e. the OS page cache (≈ 0.1 ms), cheaper than the two thread switches it would
    take to run it elsewhere, so such a batch is committed on the event loop with a busy
    timeout of 0. Anything that could wait goes to the writer's own thread: a batch another
    connection holds the lock against (SQLITE_BUSY), a large batch (a backlog), every retry
    after an error, FULL's fsync, and the WAL checkpoints (their fsyncs), which the log runs
    itself every CHECKPOINT_EVERY commits instead of SQLite's in-commit autocheckpoint.
    """

    INLINE_MAX = 64  # items in a batch committed on the event loop
    CHECKPOINT_EVERY = 200  # commits between two (passive) WAL checkpoints, in the thread
    WAL_RESTART_FRAMES = 50_000  # a WAL this long (~200 MB) is restarted, whatever waits for it

    def __init__(
        self,
        path: Path,
        *,
        batch_delay: float = 0.02,
        max_backlog: int = 50_000,
        max_batch: int = 2000,
        wait_timeout: float = 5.0,
        synchronous: str = "NORMAL",
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = path
        self.batch_delay = batch_delay
        self.max_backlog = max_backlog
        self.max_batch = max_batch
        self.wait_timeout = wait_timeout
        self.synchronous = synchronous.upper()
        self.error: str | None = None
        self.written = 0  # audit rows committed
        self.settled_at_start = 0  # intents a previous run left, billed at their reservation
        # Queued items, oldest first: AuditRow, Intent or _Amend. Item number n (1-based,
        # counted since open) is _pending[n - _committed - 1].
        self._pending: list[Any] = []
        self._queued = 0
        self._committed = 0
        self._writing: tuple[int, int] | None = None  # the item numbers of the commit under way
        self._stalled = False  # that commit has taken longer than wait_timeout
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()  # in item order
        self._open_intents: set[str] = set()  # request ids whose row must remove their intent
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()  # a waiter arrived: skip batch_delay
        self._closing = False
        self._give_up = False
        self._conn: sqlite3.Connection | None = None  # the thread's: waits on locks, checkpoints
        self._fast: sqlite3.Connection | None = None  # the event loop's: never waits (NORMAL only)
        self._since_checkpoint = 0
        self._checkpointing: asyncio.Future[None] | None = None
        self._lock: int | None = None  # the writer lock's descriptor
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self.error is None and len(self._pending) < self.max_backlog

    @property
    def unhealthy_reason(self) -> str:
        if self.error is not None:
            return f"audit log {self.path} cannot be written ({self.error})"
        return f"audit log {self.path} is {len(self._pending)} rows behind"

    async def open(self) -> None:
        """Migrate, open and prove the DB writable, and settle the intents a stopped proxy
        left (before anyone loads budgets from the log); raises OSError/sqlite3.Error if not."""
        await asyncio.to_thread(migrate, self.path)
        # One thread owns the connection: every commit is one hop to it and back.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="egress-guard-audit")
        try:
            self.settled_at_start = await self._in_thread(self._open_sync)
        except BaseException:
            await self._in_thread(self._close_sync)
            self._thread.shutdown(wait=False)
            self._thread = None
            raise
        if self.settled_at_start:
            log.warning(
                "audit log %s: %d metered calls were unfinished when the proxy last stopped; "
                "billed at their reservation",
                self.path,
                self.settled_at_start,
            )
        self._task = asyncio.create_task(self._run(), name="egress-guard audit writer")
        self._task.add_done_callback(self._writer_stopped)

    def _writer_stopped(self, task: asyncio.Task[None]) -> None:
        """A writer that died (a bug, not a DB error: those are retried) leaves the log unhealthy."""
        if task.cancelled() or task.exception() is None:
            return
        self.error = f"the writer stopped ({task.exception()!r})"
        log.error("audit log %s: %s; refusing requests", self.path, self.error)
        self._resolve_waiters(self.unhealthy_reason)

    def _in_thread(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        assert self._thread is not None
        return asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

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
        conn.execute("BEGIN IMMEDIATE")  # takes the write lock: fails if we cannot write
        try:
            settled = settle_intents(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return settled

    def _connect(self, timeout: float) -> sqlite3.Connection:
        # check_same_thread=False: the loop's connection is made here, in the thread, to keep
        # the file I/O of opening it off the loop; each is then used by one thread only.
        conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run in the thread (_checkpoint_sync)
        conn.execute("PRAGMA journal_size_limit=67108864")  # a restarted WAL shrinks back to 64 MiB
        return conn

    def _checkpoint_sync(self) -> None:
        assert self._conn is not None
        _busy, frames, _done = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames > self.WAL_RESTART_FRAMES:  # writes never paused long enough for a passive one to finish
            self._conn.execute("PRAGMA wal_checkpoint(RESTART)")

    def _close_sync(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _enqueue(self, item: Any) -> int:
        self._pending.append(item)
        self._queued += 1
        self._wake.set()
        return self._queued

    def record(self, row: AuditRow) -> int:
        """Queue a row; returns its number, for `durable`. Never blocks."""
        return self._enqueue(row)

    async def intent(self, intent: Intent) -> None:
        """Commit a metered call's reservation; the call's own row will remove it. Raises
        AuditUnavailable if it cannot be committed (it stays queued: the call's row, when it
        is written, still removes it)."""
        self._open_intents.add(intent.request_id)
        await self.durable(self._enqueue(intent))

    async def durable(self, n: int) -> None:
        """Wait until item `n` (from `record`) is committed. Raises AuditUnavailable if a
        commit fails, if the log is already failing, or after `wait_timeout`; the item stays
        queued and is written when the DB recovers."""
        if n <= self._committed:
            return
        if self._task is None or self._task.done():
            raise AuditUnavailable(f"audit log {self.path} is not open")
        if self.error is not None and (self._writing is None or self._stalled):
            raise AuditUnavailable(self.unhealthy_reason)  # retrying or stuck: don't hold a response for it
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((n, waiter))
        self._hurry.set()
        await waiter  # the writer resolves it, fails it, or (a commit stuck for wait_timeout) fails it

    def amend(self, n: int, request_id: str, note: str) -> None:
        """Mark row `n` as an error and add `note` to its reason (a response cut because the
        row could not be committed). Changes the queued row in place unless it is already in
        a commit; then an UPDATE follows it."""
        index = n - self._committed - 1
        writing = self._writing is not None and self._writing[0] <= n <= self._writing[1]
        if 0 <= index < len(self._pending) and not writing:
            row = self._pending[index]
            if isinstance(row, AuditRow) and row.request_id == request_id:
                row.decision = "error"
                row.reason = f"{row.reason}; {note}" if row.reason else note
                return
        self._enqueue(_Amend(request_id, note))

    @staticmethod
    def _commit_sync(
        conn: sqlite3.Connection,
        intents: list[tuple],
        rows: list[tuple],
        settles: list[tuple[str]],
        amends: list[tuple[str, str]],
    ) -> None:
        """One transaction: new intents, rows, the intents those rows settle, amendments."""
        try:
            conn.execute("BEGIN")
            if intents:
                conn.executemany(_INSERT_INTENT, intents)
            if rows:
                conn.executemany(_INSERT, rows)
            if settles:
                conn.executemany(_SETTLE_INTENT, settles)
            if amends:
                conn.executemany(_AMEND, amends)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _resolve_waiters(self, error: str | None) -> None:
        """After a commit: wake the waiters it covered; after a failure, fail them all."""
        while self._waiters and (error is not None or self._waiters[0][0] <= self._committed):
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(AuditUnavailable(error))

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if not self._closing and not self._waiters and self.batch_delay > 0:
                    # nobody waits on these rows: let a burst gather into one commit, unless a waiter comes
                    self._hurry.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), self.batch_delay)
            batch = self._pending[: self.max_batch]
            intents, rows, settles, amends = [], [], [], []
            for item in batch:
                if isinstance(item, AuditRow):
                    rows.append(_row_values(item))
                    if item.request_id in self._open_intents:
                        settles.append((item.request_id,))
                elif isinstance(item, Intent):
                    intents.append(_intent_values(item))
                else:
                    amends.append(_bindable((item.note, item.request_id)))
            first = self._committed + 1
            self._writing = (first, first + len(batch) - 1)
            try:
                await self._commit(intents, rows, settles, amends)
            except Exception as exc:
                self._writing = None
                if self.error is None or self.error.startswith("a commit has not finished"):
                    log.error(
                        "audit log %s: write failed (%s); refusing new requests until it recovers", self.path, exc
                    )
                self.error = str(exc)
                self._resolve_waiters(self.unhealthy_reason)
                if self._closing and self._give_up:
                    return
                await asyncio.sleep(0.25)
                continue
            self._writing = None
            del self._pending[: len(batch)]
            self._committed += len(batch)
            self.written += len(rows)
            for (request_id,) in settles:
                self._open_intents.discard(request_id)
            self._resolve_waiters(None)
            if self.error is not None:
                log.warning("audit log %s: writable again; accepting requests", self.path)
                self.error = None
            self._since_checkpoint += 1
            if self._since_checkpoint >= self.CHECKPOINT_EVERY and self._checkpointing is None:
                self._since_checkpoint = 0
                self._checkpointing = self._in_thread(self._checkpoint_sync)
                self._checkpointing.add_done_callback(self._checkpointed)

    def _checkpointed(self, done: asyncio.Future[None]) -> None:
        self._checkpointing = None
        if not done.cancelled() and done.exception() is not None:  # the next one tries again
            log.warning("audit log %s: WAL checkpoint failed (%s)", self.path, done.exception())

    async def _commit(
        self, intents: list[tuple], rows: list[tuple], settles: list[tuple[str]], amends: list[tuple[str, str]]
    ) -> None:
        if self._fast is not None and self.error is None and len(intents) + len(rows) + len(amends) <= self.INLINE_MAX:
            try:
                self._commit_sync(self._fast, intents, rows, settles, amends)
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                # another connection holds the write lock: wait for it in the thread
        commit = self._in_thread(self._commit_sync, self._conn, intents, rows, settles, amends)
        # one watchdog per commit (not one timer per waiter): a commit that hangs (a stuck
        # disk) fails its waiters after wait_timeout and turns the gate red until it returns
        done, _ = await asyncio.wait([commit], timeout=self.wait_timeout)
        if not done:
            self._stalled = True
            self.error = f"a commit has not finished in {self.wait_timeout:g} s"
            log.error("audit log %s: %s; refusing requests until it does", self.path, self.error)
            self._resolve_waiters(self.unhealthy_reason)
            await asyncio.wait([commit])
            self._stalled = False
        commit.result()

    async def close(self, timeout: float = 10.0) -> int:
        """Flush every pending row, then close. Returns the number of items it could not write."""
        self._closing = True
        self._wake.set()
        self._hurry.set()
        if self._task is not None:
            done, _ = await asyncio.wait([self._task], timeout=timeout)  # a dead writer raises nothing here
            if not done:
                self._give_up = True  # the DB is failing: the writer returns after its next try
                done, _ = await asyncio.wait([self._task], timeout=1.0)
                if not done:
                    self._task.cancel()
        lost = len(self._pending)
        if lost:
            log.error("audit log %s: %d rows could not be written before shutdown", self.path, lost)
        self._resolve_waiters(f"audit log {self.path} closed with {lost} rows unwritten")
        if self._thread is not None:
            with contextlib.suppress(TimeoutError):  # behind a commit that hangs: leave it to exit
                await asyncio.wait_for(self._in_thread(self._close_sync), 1.0)
            self._thread.shutdown(wait=False)
            self._thread = None
        return lost


# --- queries (the CLI; plain sqlite3, read-only) ------------------------------------------

_RELATIVE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: datetime.datetime | None = None) -> str:
    """`15m`, `2h`, `3d` (ago) or an ISO time (naive = UTC) → the DB's ts format."""
    now = now or datetime.datetime.now(datetime.UTC)
    m = _RELATIVE.match(text.strip())
    if m:
        when = now - datetime.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])
    else:
        try:
            when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{text!r} is not a time: use an ISO time (2026-11-22T09:00) or 15m, 2h, 3d") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
    return when.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Filters:
    agent: str | None = None
    host: str | None = None
    decision: str | None = None
    since: str | None = None
    until: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for column, value, op in [
            ("agent", self.agent, "="),
            ("host", self.host, "="),
            ("decision", self.decision, "="),
            ("ts", self.since, ">="),
            ("ts", self.until, "<"),
        ]:
            if value is not None:
                clauses.append(f"{column} {op} ?")
                args.append(value)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def query(conn: sqlite3.Connection, filters: Filters, limit: int | None, *, after_id: int = 0) -> list[dict[str, Any]]:
    """Rows matching `filters`, newest last. `limit` keeps the newest N."""
    where, args = filters.where()
    where = (where + " AND" if where else " WHERE") + " id > ?"
    args.append(after_id)
    sql = f"SELECT * FROM audit{where} ORDER BY id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    rows = [dict(r) for r in conn.execute(sql, args)]
    rows.reverse()
    return rows


def stats(conn: sqlite3.Connection, filters: Filters) -> list[dict[str, Any]]:
    where, args = filters.where()
    sql = (
        "SELECT host, decision, COUNT(*) AS requests, COALESCE(SUM(request_bytes), 0) AS request_bytes, "
        "COALESCE(SUM(response_bytes), 0) AS response_bytes, MIN(ts) AS first, MAX(ts) AS last "
        f"FROM audit{where} GROUP BY host, decision ORDER BY requests DESC, host, decision"
    )
    return [dict(r) for r in conn.execute(sql, args)]


def follow(conn: sqlite3.Connection, filters: Filters, after_id: int, interval: float) -> Iterator[dict[str, Any]]:
    import time

    while True:
        rows = query(conn, filters, None, after_id=after_id)
        for row in rows:
            after_id = row["id"]
            yield row
        if not rows:
            time.sleep(interval)
