"""The PostgreSQL schema: the same named migrations as SQLite's (`store.sqlite.schema`), in
PostgreSQL's dialect, applied in order under an advisory lock (N replicas starting at once
migrate once), each in one transaction; and the connection settings every part uses.

Differences from SQLite, by intent: `id BIGSERIAL`; `duration_ms DOUBLE PRECISION` (a float
round-trips exactly, which the audit chain's hashes need); amounts stay exact decimals as
TEXT (`cost_usd`, `usd`, `limit_usd`) so both engines hold the same values; an index on
`audit.request_id` (an amend finds its row without a scan); `spend_intents.replica` (whose
call it is: a replica settles only its own, see fleet.py). 0008_fleet is `fleet.MIGRATION`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from egress_guard.store.postgres import fleet
from egress_guard.store.records import StoreError
from egress_guard.store.sqlite.schema import SELECT_PRICED, sum_totals, totals_rows
from egress_guard.timeutil import now_iso

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_audit",
        """
        CREATE TABLE audit (
            id             BIGSERIAL PRIMARY KEY,
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
            request_bytes  BIGINT,
            response_bytes BIGINT,
            duration_ms    DOUBLE PRECISION,
            service        TEXT,
            credential     TEXT,
            model          TEXT,
            input_tokens   BIGINT,
            output_tokens  BIGINT,
            cost_usd       TEXT     -- exact decimal as text, never a float
        );
        CREATE INDEX audit_ts ON audit (ts);
        CREATE INDEX audit_agent_ts ON audit (agent, ts);
        CREATE INDEX audit_host_ts ON audit (host, ts);
        CREATE INDEX audit_decision_ts ON audit (decision, ts);
        CREATE INDEX audit_request_id ON audit (request_id);
        """,
    ),
    (
        "0002_fake_keys",
        """
        CREATE TABLE fake_keys (
            key_id         TEXT PRIMARY KEY,
            agent          TEXT NOT NULL,
            session        TEXT NOT NULL,
            services       TEXT NOT NULL,
            created_at     TEXT NOT NULL,
            expires_at     TEXT NOT NULL,
            revoked_at     TEXT,
            revoked_reason TEXT
        );
        CREATE INDEX fake_keys_agent ON fake_keys (agent);
        CREATE INDEX fake_keys_session ON fake_keys (session);
        CREATE TABLE revocations (
            id      BIGSERIAL PRIMARY KEY,
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
        ALTER TABLE audit ADD COLUMN cached_tokens BIGINT;
        CREATE INDEX audit_agent_cost ON audit (agent, ts) WHERE cost_usd IS NOT NULL;
        CREATE TABLE budgets (
            agent      TEXT NOT NULL,
            scope      TEXT NOT NULL,
            limit_usd  TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (agent, scope)
        );
        CREATE TABLE budget_reserved (        -- SQLite's; on PostgreSQL reservations are shared (fleet.py)
            key        TEXT PRIMARY KEY,
            usd        TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        """,
    ),
    (
        "0004_spend_intents",
        """
        CREATE TABLE spend_intents (
            request_id   TEXT PRIMARY KEY,
            ts           TEXT NOT NULL,
            agent        TEXT NOT NULL,
            session      TEXT,
            service      TEXT,
            model        TEXT,
            day          TEXT NOT NULL,
            reserved_usd TEXT NOT NULL,
            method       TEXT,
            host         TEXT,
            port         INTEGER,
            path         TEXT,
            replica      TEXT                 -- the replica whose call it is
        );
        CREATE INDEX spend_intents_replica ON spend_intents (replica);
        """,
    ),
    (
        "0005_websocket",
        """
        ALTER TABLE audit ADD COLUMN ws_messages_out BIGINT;
        ALTER TABLE audit ADD COLUMN ws_messages_in BIGINT;
        ALTER TABLE audit ADD COLUMN ws_close_code INTEGER;
        """,
    ),
    (
        "0006_spend_totals",
        """
        CREATE TABLE spend_totals (
            agent   TEXT NOT NULL,
            session TEXT NOT NULL,
            day     TEXT NOT NULL,
            usd     TEXT NOT NULL,            -- exact decimal, updated in the transaction of each priced row
            PRIMARY KEY (agent, session, day)
        );
        """,
    ),
    (
        "0007_hash_chain",
        """
        ALTER TABLE audit ADD COLUMN chain TEXT;
        ALTER TABLE audit ADD COLUMN chain_seq BIGINT;
        ALTER TABLE audit ADD COLUMN hash TEXT;
        ALTER TABLE audit ADD COLUMN amended_from TEXT;
        CREATE UNIQUE INDEX audit_chain_seq ON audit (chain, chain_seq);  -- the head lookup; one writer a chain
        CREATE TABLE audit_pruned (           -- where each chain now starts, after `audit prune`
            chain TEXT PRIMARY KEY,
            seq   BIGINT NOT NULL,            -- the last pruned row's chain_seq
            hash  TEXT   NOT NULL,            -- and its hash: the next row's prev
            ts    TEXT   NOT NULL
        );
        """,
    ),
    ("0008_fleet", fleet.MIGRATION),
    (
        "0009_order_and_floor",
        """
        -- Revocation ids in commit order: an id is drawn when a row is inserted, not when it
        -- commits, so two concurrent `kill`s could commit ids 2 then 1 and a replica that had
        -- read id 2 would never read id 1 (it polls `id > last`). Every INSERT into
        -- revocations first takes one lock, held to its commit: ids commit in order.
        CREATE FUNCTION eg_revocations_in_order() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock(1701307610);  -- 0x6567_7264 ("egrd") + 0x7276 ("rv")
            RETURN NULL;
        END $$;
        CREATE TRIGGER eg_revocations_in_order BEFORE INSERT ON revocations
            FOR EACH STATEMENT EXECUTE FUNCTION eg_revocations_in_order();
        -- Rows from before the hash chain end here: an unchained row above it was inserted
        -- by hand (`audit verify` fails on it).
        CREATE TABLE audit_chain_floor (max_unchained_id BIGINT NOT NULL);
        INSERT INTO audit_chain_floor SELECT COALESCE(MAX(id), 0) FROM audit WHERE chain IS NULL;
        """,
    ),
    (
        "0010_policy",
        """
        -- The audit table's checks, widened: event rows (approvals, freezes, reloads) and
        -- observe mode's decisions. 0001 declared them inline; PostgreSQL named them
        -- audit_<column>_check. Dropped and added again under those names, NOT VALID: no
        -- scan of the audit table under this ACCESS EXCLUSIVE lock (which would stop every
        -- replica's writes for as long); new rows are checked at once, and the stored rows
        -- (which met the narrower check) are proven after the commit by VALIDATE CONSTRAINT,
        -- which lets writes go on (see validate_checks).
        ALTER TABLE audit DROP CONSTRAINT audit_kind_check,
            ADD CONSTRAINT audit_kind_check CHECK (kind IN ('connect', 'request', 'event')) NOT VALID,
            DROP CONSTRAINT audit_decision_check,
            ADD CONSTRAINT audit_decision_check
                CHECK (decision IN ('allow', 'deny', 'error', 'would-deny', 'would-escalate')) NOT VALID;
        CREATE TABLE approvals (
            id         TEXT PRIMARY KEY,
            created    TEXT NOT NULL,
            expires    TEXT NOT NULL,
            replica    TEXT NOT NULL,
            request_id TEXT NOT NULL,
            agent      TEXT,
            session    TEXT,
            method     TEXT,
            scheme     TEXT,
            host       TEXT NOT NULL,
            port       INTEGER NOT NULL,
            path       TEXT,
            rule       TEXT NOT NULL,
            reason     TEXT NOT NULL,
            status     TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
            scope      TEXT CHECK (scope IN ('once', 'session', 'always')),
            note       TEXT,
            decided_by TEXT,
            decided_at TEXT
        );
        CREATE INDEX approvals_status ON approvals (status, created);
        CREATE TABLE grants (
            id          BIGSERIAL PRIMARY KEY,
            created     TEXT NOT NULL,
            approval_id TEXT,
            rule        TEXT NOT NULL,
            host        TEXT NOT NULL,        -- '*' (port 0): every host (a freeze's grant)
            port        INTEGER NOT NULL,
            agent       TEXT,                 -- NULL: any
            session     TEXT,                 -- NULL: any
            granted_by  TEXT NOT NULL,
            note        TEXT,
            revoked     TEXT
        );
        CREATE TABLE freezes (
            id           BIGSERIAL PRIMARY KEY,
            created      TEXT NOT NULL,
            agent        TEXT NOT NULL,
            session      TEXT NOT NULL,       -- '' outside a session
            trigger_text TEXT NOT NULL,
            baseline     TEXT NOT NULL,       -- JSON
            lifted       TEXT,
            lifted_by    TEXT,
            note         TEXT
        );
        CREATE INDEX freezes_active ON freezes (agent, session) WHERE lifted IS NULL;
        """,
    ),
]

ADD_TOTAL = (
    "INSERT INTO spend_totals AS t (agent, session, day, usd) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (agent, session, day) DO UPDATE SET usd = (t.usd::numeric + excluded.usd::numeric)::text"
)
MIGRATION_LOCK = 0x6567_7264  # pg_advisory_xact_lock key: "egrd"


def _fill_totals(cur: psycopg.Cursor[Any]) -> None:
    cur.execute(SELECT_PRICED)
    rows = cur.fetchall()
    if rows:
        cur.executemany(ADD_TOTAL, sorted(totals_rows(sum_totals(rows))))


STEPS: dict[str, Callable[[psycopg.Cursor[Any]], None]] = {"0006_spend_totals": _fill_totals}


def migrate_conn(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply pending named migrations (conn in autocommit). Each in a transaction holding an
    advisory lock: replicas that start together wait for each other, then skip what is done."""
    applied: list[str] = []
    with conn.cursor() as cur:
        _create_ledger(cur)
        for name, sql in MIGRATIONS:
            with conn.transaction():
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                cur.execute("SELECT 1 FROM schema_migrations WHERE name = %s", (name,))
                if cur.fetchone():
                    continue
                if sql.strip():
                    cur.execute(sql.encode())  # bytes: a script, sent as one simple query
                if name in STEPS:
                    STEPS[name](cur)
                cur.execute("INSERT INTO schema_migrations VALUES (%s, %s)", (name, now_iso()))
            applied.append(name)
    validate_checks(conn)
    return applied


def validate_checks(conn: psycopg.Connection[Any]) -> list[str]:
    """VALIDATE the audit table's checks a migration added NOT VALID (0010), each in a
    transaction of its own: it scans the table under SHARE UPDATE EXCLUSIVE, which does not
    block reads or writes. Run at every migrate, so a run stopped between the migration's
    commit and this finishes it next time. Returns the constraints it validated."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass('audit') AND contype = 'c' "
            "AND NOT convalidated ORDER BY conname"
        )
        names = [str(r[0]) for r in cur.fetchall()]
        for name in names:
            with conn.transaction():
                cur.execute(pgsql.SQL("ALTER TABLE audit VALIDATE CONSTRAINT {}").format(pgsql.Identifier(name)))
    return names


def _create_ledger(cur: psycopg.Cursor[Any]) -> None:
    cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = cur.fetchone()
    if row and row[0]:
        return
    with cur.connection.transaction():  # two replicas creating it at once: one waits for the other
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        cur.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")


def pending(conn: psycopg.Connection[Any]) -> list[str]:
    """The migrations not applied yet (all of them on an empty database)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        row = cur.fetchone()
        if not (row and row[0]):
            return [name for name, _ in MIGRATIONS]
        cur.execute("SELECT name FROM schema_migrations")
        done = {r[0] for r in cur.fetchall()}
    return [name for name, _ in MIGRATIONS if name not in done]


# --- connecting ---------------------------------------------------------------------------


class Target:
    """Where the store is and how to reach it: the conninfo (with the password, if a file
    gives one: never shown), the name messages use, and the client-side timeout."""

    def __init__(self, settings: Any) -> None:
        self.name: str = settings.name
        self.timeout: float = float(settings.timeout)
        self.replica: str = settings.replica
        try:
            base = settings.conninfo()
        except OSError as exc:
            raise StoreError(f"store {self.name}: {exc}") from None
        given = conninfo_to_dict(base)
        self._password = str(given.get("password") or "")
        # A command's connection (the CLI, `store copy`): long statements are its business.
        self.command_conninfo = make_conninfo(
            base,
            connect_timeout=max(1, round(self.timeout)),
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=2,
            tcp_user_timeout=int(self.timeout * 1000) + 1000,
            application_name=f"egress-guard {self.replica}"[:63],
        )
        # The proxy's: work it has given up on (the client-side deadline) dies on the server
        # too, rather than queue behind a lock and commit later, or hold an agent's lock: a
        # statement or lock wait past the deadline is cancelled there, and a transaction left
        # open by a replica that stopped mid-commit is ended (its locks released).
        ms = int(self.timeout * 1000)
        server_side = (
            f"-c statement_timeout={max(3 * ms, 5000)} -c lock_timeout={ms} "
            f"-c idle_in_transaction_session_timeout={max(5 * ms, 10000)}"
        )
        options = f"{given['options']} {server_side}" if given.get("options") else server_side
        self.conninfo = make_conninfo(self.command_conninfo, options=options)

    def __repr__(self) -> str:
        return f"Target({self.name!r})"

    def scrub(self, text: str) -> str:
        """A message with the password (if one is known) taken out: never shown anywhere."""
        return text.replace(self._password, "***") if self._password else text

    def error(self, exc: BaseException) -> StoreError:
        """The StoreError a failure becomes: names the store, never holds the password."""
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, TimeoutError):
            detail = f"no answer within {self.timeout:g} s"
        else:
            detail = " ".join(str(exc).split()) or type(exc).__name__
        return StoreError(self.scrub(f"store {self.name} is unreachable: {detail}"))
