"""The SQLite audit log: schema migrations, the batching writer, and the queries the CLI runs.

One row per decision. Rows are written off the hot path by one writer task; a row that
cannot be written yet stays queued (never dropped) and the log reports itself unhealthy, so
the proxy refuses new requests until it can record them again. Never stores bodies or
header values.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

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


COLUMNS = ["id", *(f.name for f in dataclasses.fields(AuditRow))]
_INSERT = f"INSERT INTO audit ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * (len(COLUMNS) - 1))})"


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


class AuditLog:
    """The proxy's writer. `record` never blocks; `healthy` says whether to accept traffic."""

    def __init__(self, path: Path, *, batch_delay: float = 0.02, max_backlog: int = 50_000) -> None:
        self.path = path
        self.batch_delay = batch_delay
        self.max_backlog = max_backlog
        self.error: str | None = None
        self.written = 0
        self._pending: list[AuditRow] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._db: aiosqlite.Connection | None = None
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
        """Migrate, open and prove the DB writable; raises OSError/sqlite3.Error if not."""
        await asyncio.to_thread(migrate, self.path)
        self._db = await aiosqlite.connect(self.path, timeout=1.0)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.execute("BEGIN IMMEDIATE")  # takes the write lock: fails if we cannot write
        await self._db.rollback()
        self._task = asyncio.create_task(self._run(), name="egress-guard audit writer")

    def record(self, row: AuditRow) -> None:
        self._pending.append(row)
        self._wake.set()

    async def _write(self, rows: list[AuditRow]) -> None:
        assert self._db is not None
        await self._db.executemany(_INSERT, [dataclasses.astuple(r) for r in rows])
        await self._db.commit()

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if not self._closing:
                    await asyncio.sleep(self.batch_delay)  # let a burst gather into one commit
            batch = self._pending[:2000]
            try:
                await self._write(batch)
            except Exception as exc:
                with contextlib.suppress(Exception):
                    assert self._db is not None
                    await self._db.rollback()
                if self.error is None:
                    log.error(
                        "audit log %s: write failed (%s); refusing new requests until it recovers", self.path, exc
                    )
                self.error = str(exc)
                if self._closing and self._give_up:
                    return
                await asyncio.sleep(0.25)
                continue
            del self._pending[: len(batch)]
            self.written += len(batch)
            if self.error is not None:
                log.warning("audit log %s: writable again; accepting requests", self.path)
                self.error = None

    _give_up = False

    async def close(self, timeout: float = 10.0) -> int:
        """Flush every pending row, then close. Returns the number of rows it could not write."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._give_up = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._task, 1.0)
        lost = len(self._pending)
        if lost:
            log.error("audit log %s: %d rows could not be written before shutdown", self.path, lost)
        if self._db is not None:
            await self._db.close()
            self._db = None
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
