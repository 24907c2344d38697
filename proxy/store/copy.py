"""Copy a SQLite store into an empty PostgreSQL store (`egress-guard store copy`), for a
deployment that outgrows one machine.

What is copied, exactly as it is: every audit row (ids, hash-chain columns and all: `audit
verify` passes on the copy), the fake keys, the revocations, the run-time budget overrides, the
running spend totals, where each pruned chain starts, and the approvals, grants and freezes.
What is not: a stopped proxy's unfinished metered calls are first settled at their
reservation, as the proxy's next start would (so no intent is left to copy); the SQLite-only
snapshot of reservations. PostgreSQL's
shared budget counters fill themselves from the copied totals and rows on first use, so a
proxy on the copy enforces the same remaining budget.

The source must not be in use: the copy holds the SQLite writer lock (no proxy can start on
it meanwhile). The destination must hold no egress-guard data yet. One transaction on the
destination: a copy that fails leaves it as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from egress_guard.store.postgres import queries as pg_queries
from egress_guard.store.postgres import schema as pg_schema
from egress_guard.store.records import StoreError
from egress_guard.store.sqlite import schema as sqlite_schema
from egress_guard.store.sqlite.engine import SQLiteEngine

if TYPE_CHECKING:
    from egress_guard.config import StoreSettings

# (table, its sequence-backed id column or None), in an order that satisfies nothing but
# readability: the destination has no foreign keys.
TABLES: list[tuple[str, str | None]] = [
    ("audit", "id"),
    ("fake_keys", None),
    ("revocations", "id"),
    ("budgets", None),
    ("spend_totals", None),
    ("audit_pruned", None),
    ("audit_chain_floor", None),  # replaces the destination's own (0: a new store has no pre-chain rows)
    ("approvals", None),  # a pending one is held by no proxy any more: it cannot be approved past `expires`
    ("grants", "id"),  # what approvals with scope session|always allow: kept
    ("freezes", "id"),
]
# Destination tables that must be empty: a copy never merges two histories.
MUST_BE_EMPTY = (
    "audit",
    "fake_keys",
    "revocations",
    "budgets",
    "spend_totals",
    "spend_intents",
    "approvals",
    "grants",
    "freezes",
)


@dataclass
class CopyReport:
    source: str
    destination: str
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows copied
    settled: int = 0  # unfinished calls settled at their reservation before the copy
    cost_usd: str = "0"  # the copied audit rows' total cost, read back from the destination


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def _settle_source(source: Path) -> int:
    """Migrate the SQLite store and settle what a stopped proxy left (as `up` would), by
    opening and closing its engine; raises OSError if a proxy is writing it."""

    async def run() -> int:
        engine = SQLiteEngine(source)
        try:
            return await engine.open()
        finally:
            await engine.close()

    return asyncio.run(run())


def copy_sqlite_to_postgres(
    source: Path, settings: StoreSettings, progress: Callable[[str], None] | None = None
) -> CopyReport:
    """Copy the SQLite store at `source` into the (empty) PostgreSQL store `settings` names.
    Raises StoreError saying what is wrong and how to fix it."""
    say = progress or (lambda _text: None)
    if not source.is_file():
        raise StoreError(f"no SQLite store at {source}. Fix: pass --from the audit.path of the old config")
    try:
        settled = _settle_source(source)
    except OSError as exc:
        raise StoreError(f"{exc}. Fix: stop the proxy that uses {source} first") from None
    # Hold the writer lock for the whole copy: no proxy starts on the source meanwhile.
    lock = os.open(f"{source}-writer", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"a proxy is writing {source}. Fix: stop it first") from None
        with contextlib.closing(sqlite_schema.connect(source, readonly=True)) as src:
            report = _copy(src, source, settings, say)
    finally:
        os.close(lock)
    report.settled = settled
    return report


def _copy(src: sqlite3.Connection, source: Path, settings: StoreSettings, say: Callable[[str], None]) -> CopyReport:
    left = src.execute("SELECT COUNT(*) FROM spend_intents").fetchone()[0]
    if left:
        raise StoreError(f"{source} still has {left} unfinished metered calls. Fix: stop the proxy that uses it")
    # Migrate the destination (its own connection, committed), then copy in one transaction.
    with pg_queries.PGStore(settings, readonly=False) as dest:
        name = dest.name
    target = pg_schema.Target(settings)
    report = CopyReport(source=str(source), destination=name)
    try:
        with psycopg.connect(target.command_conninfo, autocommit=True) as conn, conn.transaction():
            conn.execute("LOCK TABLE audit, fake_keys, revocations, budgets, spend_totals, spend_intents")
            for table in MUST_BE_EMPTY:
                row = conn.execute(sql.SQL("SELECT COUNT(*) FROM {}").format(sql.Identifier(table))).fetchone()
                if row and row[0]:
                    raise StoreError(
                        f"store {name} already holds data ({row[0]} rows in {table}). "
                        "Fix: copy into an empty database (createdb a new one), never over a fleet's"
                    )
            conn.execute("DELETE FROM audit_chain_floor")
            for table, id_column in TABLES:
                report.rows[table] = _copy_table(src, conn, table, id_column, name)
                say(f"{table}: {report.rows[table]} rows")
            row = conn.execute("SELECT COALESCE(SUM(eg_num(cost_usd)), 0)::text FROM audit").fetchone()
            report.cost_usd = str(row[0]) if row else "0"
    except psycopg.Error as exc:
        raise target.error(exc) from None
    return report


def _copy_table(
    src: sqlite3.Connection, conn: psycopg.Connection[Any], table: str, id_column: str | None, name: str
) -> int:
    columns = _columns(src, table)
    dest_columns = [
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = %s",
            (table,),
        ).fetchall()
    ]
    missing = [c for c in columns if c not in dest_columns]
    if missing:
        raise StoreError(
            f"store {name}: table {table} lacks {', '.join(missing)}. "
            "Fix: run the same egress-guard version on both sides"
        )
    quoted = ", ".join(f'"{c}"' for c in columns)
    names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    n = 0
    with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(table), names)) as copy:
        # the names are the source's own columns (PRAGMA table_info) of a table named in TABLES
        order = f" ORDER BY {id_column}" if id_column else ""
        for row in src.execute(f"SELECT {quoted} FROM {table}{order}"):  # noqa: S608
            copy.write_row(tuple(row))
            n += 1
    if id_column is not None:  # the next row the fleet writes gets the next id
        conn.execute(
            sql.SQL(
                "SELECT setval(pg_get_serial_sequence({t}, {c}), COALESCE((SELECT MAX({i}) FROM {tab}), 1), "
                "(SELECT MAX({i}) FROM {tab}) IS NOT NULL)"
            ).format(
                t=sql.Literal(table), c=sql.Literal(id_column), i=sql.Identifier(id_column), tab=sql.Identifier(table)
            )
        )
    return n
