"""The SQLite schema: named migrations, applied in order, each in one transaction, and the
connections every part of the SQLite store opens.

Migrations 0001-0007 are as they shipped (0008 is PostgreSQL's alone: no SQL here); a new
one goes at the end, under a new name.
A migration may have a Python step too (`STEPS`), run in its transaction after its SQL:
0006 fills the running totals from the rows already logged, once; 0010 widens the audit
table's CHECK constraints (`_widen_audit_checks`: SQLite cannot ALTER a constraint).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from egress_guard.timeutil import now_iso

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
    (
        "0006_spend_totals",
        """
        CREATE TABLE spend_totals (           -- what budgets read: spend per agent, session and UTC day
            agent   TEXT NOT NULL,
            session TEXT NOT NULL,            -- '' for calls made outside a session
            day     TEXT NOT NULL,            -- UTC date of the rows' ts
            usd     TEXT NOT NULL,            -- exact decimal, updated in the transaction of each priced row
            PRIMARY KEY (agent, session, day)
        ) WITHOUT ROWID;
        """,
    ),
    (
        "0007_hash_chain",
        """
        ALTER TABLE audit ADD COLUMN chain TEXT;         -- the writer's hash chain (store/chain.py): 'local'
        ALTER TABLE audit ADD COLUMN chain_seq INTEGER;  -- 1, 2, 3 ... within the chain
        ALTER TABLE audit ADD COLUMN hash TEXT;          -- hex sha256 over the previous hash and this row
        ALTER TABLE audit ADD COLUMN amended_from TEXT;  -- JSON {"decision", "reason"} as first written
        CREATE UNIQUE INDEX audit_chain_seq ON audit (chain, chain_seq);
        CREATE TABLE audit_pruned (           -- where each chain starts after `audit prune`
            chain TEXT PRIMARY KEY,
            seq   INTEGER NOT NULL,           -- the last pruned row's chain_seq
            hash  TEXT NOT NULL,              -- and its hash: the next row's predecessor
            ts    TEXT NOT NULL
        );
        """,
    ),
    ("0008_fleet", ""),  # PostgreSQL's fleet tables; recorded here so both engines' migrations match
    (
        "0009_order_and_floor",
        # (PostgreSQL also orders revocation ids by commit; one SQLite writer at a time does so already)
        """
        CREATE TABLE audit_chain_floor (      -- rows from before the hash chain end here
            max_unchained_id INTEGER NOT NULL
        );
        INSERT INTO audit_chain_floor SELECT COALESCE(MAX(id), 0) FROM audit WHERE chain IS NULL;
        """,
    ),
    (
        "0010_policy",
        # and, in its step, audit.kind may be 'event', audit.decision 'would-deny'/'would-escalate'
        """
        CREATE TABLE approvals (              -- held requests waiting for a human (proxy/escalation.py)
            id         TEXT PRIMARY KEY,      -- 8 random hex characters: `egress-guard approve ID`
            created    TEXT NOT NULL,
            expires    TEXT NOT NULL,         -- when the proxy stops waiting (escalation.timeout)
            replica    TEXT NOT NULL,         -- the proxy holding the request
            request_id TEXT NOT NULL,         -- its audit rows have the same id
            agent      TEXT,
            session    TEXT,
            method     TEXT,
            scheme     TEXT,
            host       TEXT NOT NULL,
            port       INTEGER NOT NULL,
            path       TEXT,                  -- as the audit row has it (no query string unless configured)
            rule       TEXT NOT NULL,         -- the escalating rule's id
            reason     TEXT NOT NULL,
            status     TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
            scope      TEXT CHECK (scope IN ('once', 'session', 'always')),
            note       TEXT,
            decided_by TEXT,
            decided_at TEXT
        );
        CREATE INDEX approvals_status ON approvals (status, created);
        CREATE TABLE grants (                 -- what approvals with scope session|always allow from then on
            id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: an event row names it
            created     TEXT NOT NULL,
            approval_id TEXT,
            rule        TEXT NOT NULL,
            host        TEXT NOT NULL,        -- '*' (port 0): every host (a freeze's grant)
            port        INTEGER NOT NULL,
            agent       TEXT,                 -- NULL: any
            session     TEXT,                 -- NULL: any
            granted_by  TEXT NOT NULL,
            note        TEXT,
            revoked     TEXT                  -- when (NULL: active)
        );
        CREATE TABLE freezes (                -- sessions frozen for diverging from their agent's baseline
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            created      TEXT NOT NULL,
            agent        TEXT NOT NULL,
            session      TEXT NOT NULL,       -- '' outside a session
            trigger_text TEXT NOT NULL,
            baseline     TEXT NOT NULL,       -- JSON
            lifted       TEXT,                -- when (NULL: frozen)
            lifted_by    TEXT,
            note         TEXT
        );
        CREATE INDEX freezes_active ON freezes (agent, session) WHERE lifted IS NULL;
        """,
    ),
]

# 0010: the audit table's CHECK constraints as 0001 wrote them, and as they become.
AUDIT_CHECKS = [
    ("CHECK (kind IN ('connect', 'request'))", "CHECK (kind IN ('connect', 'request', 'event'))"),
    (
        "CHECK (decision IN ('allow', 'deny', 'error'))",
        "CHECK (decision IN ('allow', 'deny', 'error', 'would-deny', 'would-escalate'))",
    ),
]


def dec_add(a: str, b: str) -> str:
    """Exact decimal addition of two amounts stored as text (SQL's SUM would use floats)."""
    return f"{Decimal(a) + Decimal(b):f}"


ADD_TOTAL = (
    "INSERT INTO spend_totals (agent, session, day, usd) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (agent, session, day) DO UPDATE SET usd = dec_add(usd, excluded.usd)"
)
SELECT_PRICED = "SELECT agent, session, ts, cost_usd FROM audit WHERE cost_usd IS NOT NULL AND agent IS NOT NULL"


def sum_totals(rows: Iterable[Sequence[Any]]) -> dict[tuple[str, str, str], Decimal]:
    """Priced rows (agent, session, ts, cost) summed by agent, session and UTC day. A cost
    that is not a finite number is no spend (and must not stop a commit or a migration)."""
    sums: dict[tuple[str, str, str], Decimal] = {}
    for agent, session, ts, cost in rows:
        try:
            usd = Decimal(cost)
        except (InvalidOperation, TypeError, ValueError):
            continue
        if usd.is_finite():
            key = (agent, session or "", ts[:10])  # an instant's first 10 characters are its UTC date
            sums[key] = sums.get(key, Decimal(0)) + usd
    return sums


def totals_rows(sums: dict[tuple[str, str, str], Decimal]) -> list[tuple[str, str, str, str]]:
    return [(*key, f"{usd:f}") for key, usd in sums.items()]


def add_totals(conn: sqlite3.Connection, rows: Iterable[Sequence[Any]]) -> None:
    """Add priced rows to the running totals: one upsert per (agent, session, day)."""
    conn.executemany(ADD_TOTAL, totals_rows(sum_totals(rows)))


def _fill_totals(conn: sqlite3.Connection) -> None:
    cursor = conn.execute(SELECT_PRICED)
    while chunk := cursor.fetchmany(50_000):
        add_totals(conn, chunk)


def _widen_audit_checks(conn: sqlite3.Connection) -> None:
    """Widen audit's CHECK constraints in place, by the procedure SQLite documents for a
    change that "does not affect the on-disk content in any way" (lang_altertable.html §7,
    the simpler procedure): edit the table's SQL in sqlite_schema under writable_schema and
    bump schema_version, in the migration's transaction. Every stored row met the narrower
    check, so it meets the wider one: no row is rewritten, ids and the hash chain are
    untouched (rebuilding the table, the general procedure, would copy every row)."""
    (version,) = conn.execute("PRAGMA schema_version").fetchone()
    (sql,) = conn.execute("SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'audit'").fetchone()
    for old, new in AUDIT_CHECKS:
        if sql.count(old) != 1:
            raise sqlite3.DatabaseError(f"migration 0010_policy: the audit table's schema lacks {old!r}")
        sql = sql.replace(old, new)
    conn.execute("PRAGMA writable_schema = ON")
    try:
        conn.execute("UPDATE sqlite_schema SET sql = ? WHERE type = 'table' AND name = 'audit'", (sql,))
        conn.execute(f"PRAGMA schema_version = {int(version) + 1}")  # every connection re-reads the schema
    finally:
        conn.execute("PRAGMA writable_schema = OFF")


STEPS: dict[str, Callable[[sqlite3.Connection], None]] = {
    "0006_spend_totals": _fill_totals,
    "0010_policy": _widen_audit_checks,
}


def connect(
    path: Path, *, readonly: bool = False, timeout: float = 5.0, check_same_thread: bool = True
) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit: `transaction`), rows as
    sqlite3.Row, and `dec_add` defined. Close it (contextlib.closing): `with conn` would not."""
    target, uri = (f"file:{path}?mode=ro", True) if readonly else (str(path), False)
    conn = sqlite3.connect(target, uri=uri, timeout=timeout, isolation_level=None, check_same_thread=check_same_thread)
    conn.row_factory = sqlite3.Row
    conn.create_function("dec_add", 2, dec_add, deterministic=True)
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, kind: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
    """BEGIN (IMMEDIATE: take the write lock now, or wait for it), COMMIT, or ROLLBACK on error."""
    conn.execute(f"BEGIN {kind}")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


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
    applied = []
    with contextlib.closing(connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        done = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
        for name, sql in MIGRATIONS:
            if name in done:
                continue
            with transaction(conn):
                if conn.execute("SELECT 1 FROM schema_migrations WHERE name = ?", (name,)).fetchone():
                    continue  # another process applied it while this one waited for the lock
                for statement in _statements(sql):
                    conn.execute(statement)
                if name in STEPS:
                    STEPS[name](conn)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (name, now_iso()))
            applied.append(name)
    return applied


def analyze(conn: sqlite3.Connection) -> None:
    """Give the query planner fresh statistics (sampled: milliseconds, whatever the size):
    without them it may walk a whole index to serve a one-hour window."""
    conn.execute("PRAGMA analysis_limit=1000")
    conn.execute("ANALYZE")


def statistics_stale(conn: sqlite3.Connection) -> bool:
    """Whether the audit table is not within a factor of 2 of the size its statistics say."""
    try:
        row = conn.execute("SELECT stat FROM sqlite_stat1 WHERE tbl = 'audit' AND idx = 'audit_ts'").fetchone()
    except sqlite3.OperationalError:  # never analyzed
        return True
    counted = int(str(row[0]).split()[0]) if row is not None else 0
    lo, hi = conn.execute("SELECT MIN(id), MAX(id) FROM audit").fetchone()
    rows = (hi - lo + 1) if lo is not None else 0
    return not (counted / 2 <= rows <= counted * 2) and abs(rows - counted) > 1000
