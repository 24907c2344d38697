"""`SQLiteStore`: the SQLite store as a command sees it (the CLI, the bench), and the reads
the running proxy makes, as plain functions of a connection so both faces share them.

A query with a time window reads the window: `ts` is indexed, and the planner has the
statistics to prefer that index (`schema.analyze`).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from egress_guard.fakekeys import KeyRecord
from egress_guard.store import chain
from egress_guard.store.records import (
    APPROVAL_COLUMNS,
    COLUMNS,
    Approval,
    Filters,
    Freeze,
    GrantRecord,
    Spent,
    StoreError,
    Write,
)
from egress_guard.store.sqlite import schema, writes
from egress_guard.timeutil import now_iso

SELECT_KEYS = (
    "SELECT key_id, agent, session, services, created_at, expires_at, revoked_at, revoked_reason FROM fake_keys"
)
SELECT_REVOCATIONS = "SELECT id, ts, agent, session, key_id, reason FROM revocations WHERE id > ? ORDER BY id"
SELECT_OVERRIDES = "SELECT agent, scope, limit_usd FROM budgets"
SELECT_TOTALS = "SELECT agent, session, day, usd FROM spend_totals"
SELECT_SPENT_SINCE = "SELECT agent, cost_usd FROM audit WHERE ts >= ? AND cost_usd IS NOT NULL AND agent IS NOT NULL"
HEX = re.compile(r"[0-9a-f]+")  # what an approval id (or a prefix of one) is made of
SELECT_APPROVALS = f"SELECT {', '.join(APPROVAL_COLUMNS)} FROM approvals"
SELECT_GRANTS = (
    "SELECT id, created, approval_id, rule, host, port, agent, session, granted_by, note, revoked FROM grants"
)
SELECT_FREEZES = "SELECT id, created, agent, session, trigger_text, baseline, lifted, lifted_by, note FROM freezes"
ROW_COLUMNS = ", ".join(COLUMNS)  # what a query shows: not the chain's columns
PRUNE_CHUNK = 5000  # rows a prune deletes per transaction: the proxy's writer never waits long


def key_record(row: sqlite3.Row | tuple) -> KeyRecord:
    r = tuple(row)
    return KeyRecord(r[0], r[1], r[2], tuple(s for s in r[3].split(",") if s), r[4], r[5], r[6], r[7])


def overrides(rows: Any) -> dict[tuple[str, str], Decimal]:
    return {(agent, scope): Decimal(usd) for agent, scope, usd in rows}


def totals(rows: Any) -> list[Spent]:
    return [Spent(agent, session, day, Decimal(usd)) for agent, session, day, usd in rows]


def per_agent(rows: Any) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for agent, usd in rows:
        out[agent] = out.get(agent, Decimal(0)) + Decimal(usd)
    return out


def approval(row: Any) -> Approval:
    return Approval(*tuple(row))


def grant(row: Any) -> GrantRecord:
    return GrantRecord(*tuple(row))


def freeze(row: Any) -> Freeze:
    return Freeze(*tuple(row))


def where(f: Filters, *more: str) -> tuple[str, list[Any]]:
    clauses, args = list(more), []
    for column, value, op in [
        ("agent", f.agent, "="),
        ("host", f.host, "="),
        ("decision", f.decision, "="),
        ("ts", f.since, ">="),
        ("ts", f.until, "<"),
    ]:
        if value is not None:
            clauses.append(f"{column} {op} ?")
            args.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


class SQLiteStore:
    """One SQLite audit DB, opened by a command: read-only, or migrated and writable."""

    def __init__(self, path: Path, *, readonly: bool = True) -> None:
        self.path, self.name = path, str(path)
        try:
            if not readonly:
                schema.migrate(path)
            self._conn = schema.connect(path, readonly=readonly)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open {path}: {exc}") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def migrate(self) -> list[str]:
        return schema.migrate(self.path)

    def write(self, op: Write) -> int:
        return writes.write_now(self._conn, op)

    # --- the audit rows ------------------------------------------------------------------

    def rows(self, filters: Filters, limit: int | None, *, after_id: int = 0) -> list[dict[str, Any]]:
        clause, args = where(filters, "id > ?")
        sql = f"SELECT {ROW_COLUMNS} FROM audit{clause} ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = [dict(r) for r in self._conn.execute(sql, [after_id, *args])]
        rows.reverse()
        return rows

    def last_id(self) -> int:
        return int(self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM audit").fetchone()[0])

    def _chained(self) -> bool:
        """Whether the DB has the chain's columns (a read-only DB may predate 0007)."""
        return any(r[1] == "chain" for r in self._conn.execute("PRAGMA table_info(audit)"))

    def audit_chain(self) -> Iterator[tuple[Any, ...]]:
        if self._chained():
            sql = chain.select_sql("audit")
        else:  # every row is from before the chain
            sql = f"SELECT id, NULL, NULL, NULL, NULL, {', '.join(chain.FIELDS)} FROM audit ORDER BY id"
        cursor = self._conn.execute(sql)  # one read transaction: one snapshot, fetched as it goes
        try:
            while batch := cursor.fetchmany(2000):
                for r in batch:
                    yield tuple(r)
        finally:
            cursor.close()

    def chain_floor(self) -> int | None:
        if not self._conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'audit_chain_floor'").fetchone():
            return None  # a read-only DB from before migration 0009
        row = self._conn.execute("SELECT MAX(max_unchained_id) FROM audit_chain_floor").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def chain_starts(self) -> dict[str, tuple[int, str]]:
        if not self._chained():
            return {}
        return {c: (int(seq), str(h)) for c, seq, h in self._conn.execute("SELECT chain, seq, hash FROM audit_pruned")}

    def count(self, filters: Filters) -> int:
        clause, args = where(filters)
        return int(self._conn.execute(f"SELECT COUNT(*) FROM audit{clause}", args).fetchone()[0])

    def stats(self, filters: Filters) -> list[dict[str, Any]]:
        clause, args = where(filters)
        sql = (
            "SELECT host, decision, COUNT(*) AS requests, COALESCE(SUM(request_bytes), 0) AS request_bytes, "
            "COALESCE(SUM(response_bytes), 0) AS response_bytes, MIN(ts) AS first, MAX(ts) AS last "
            f"FROM audit{clause} GROUP BY host, decision ORDER BY requests DESC, host, decision"
        )
        return [dict(r) for r in self._conn.execute(sql, args)]

    def costed(self, filters: Filters) -> Iterator[dict[str, Any]]:
        clause, args = where(filters, "cost_usd IS NOT NULL")
        sql = (
            "SELECT agent, session, model, service, ts, input_tokens, output_tokens, cached_tokens, cost_usd "
            f"FROM audit{clause}"
        )
        for r in self._conn.execute(sql, args):
            yield dict(r)

    def prune(self, before: str) -> int:
        """A chain loses a prefix only (`audit verify` must not see a gap): the rows of each
        chain up to the first one at or after `before`; where it now starts is kept in
        audit_pruned, in the transaction of each deletion. Unchained rows go by `ts`."""
        deleted = 0
        conn = self._conn
        chains = [r[0] for r in conn.execute("SELECT DISTINCT chain FROM audit WHERE chain IS NOT NULL")]
        for name in chains:
            kept = conn.execute(
                "SELECT MIN(chain_seq) FROM audit WHERE chain = ? AND ts >= ?", (name, before)
            ).fetchone()[0]
            last = conn.execute("SELECT MAX(chain_seq) FROM audit WHERE chain = ?", (name,)).fetchone()[0]
            upto = int(kept) - 1 if kept is not None else int(last)
            while True:
                with schema.transaction(conn):
                    chunk = conn.execute(
                        "SELECT id, chain_seq, hash FROM audit WHERE chain = ? AND chain_seq <= ? "
                        "ORDER BY chain_seq LIMIT ?",
                        (name, upto, PRUNE_CHUNK),
                    ).fetchall()
                    if not chunk:
                        break
                    conn.executemany("DELETE FROM audit WHERE id = ?", [(r[0],) for r in chunk])
                    conn.execute(
                        "INSERT INTO audit_pruned VALUES (?, ?, ?, ?) ON CONFLICT (chain) DO UPDATE SET "
                        "seq = excluded.seq, hash = excluded.hash, ts = excluded.ts",
                        (name, chunk[-1][1], chunk[-1][2], now_iso()),
                    )
                deleted += len(chunk)
        while True:
            with schema.transaction(conn):
                n = conn.execute(
                    "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE chain IS NULL AND ts < ? LIMIT ?)",
                    (before, PRUNE_CHUNK),
                ).rowcount
            deleted += n
            if n < PRUNE_CHUNK:
                break
        if deleted:
            schema.analyze(self._conn)
        return deleted

    # --- keys and budgets ----------------------------------------------------------------

    def keys(self, agent: str | None = None) -> list[KeyRecord]:
        sql, args = SELECT_KEYS, []
        if agent:
            sql += " WHERE agent = ?"
            args.append(agent)
        return [key_record(r) for r in self._conn.execute(sql + " ORDER BY created_at", args)]

    def live_sessions(self, now: str) -> list[tuple[str, str]]:
        return [
            (agent, session)
            for agent, session in self._conn.execute(
                "SELECT DISTINCT agent, session FROM fake_keys WHERE revoked_at IS NULL AND expires_at > ?", (now,)
            )
        ]

    def overrides(self) -> dict[tuple[str, str], Decimal]:
        return overrides(self._conn.execute(SELECT_OVERRIDES))

    def reserved(self) -> dict[str, Decimal]:
        return {key: Decimal(usd) for key, usd in self._conn.execute("SELECT key, usd FROM budget_reserved")}

    def totals(self) -> list[Spent]:
        try:
            return totals(self._conn.execute(SELECT_TOTALS))
        except sqlite3.OperationalError:  # a DB from before 0006 that nothing has migrated yet: count the rows
            found = schema.sum_totals(self._conn.execute(schema.SELECT_PRICED))
            return [Spent(*key, usd) for key, usd in found.items()]

    def spent_since(self, since: str) -> dict[str, Decimal]:
        return per_agent(self._conn.execute(SELECT_SPENT_SINCE, (since,)))

    # --- escalations -------------------------------------------------------------------

    def _has_policy(self) -> bool:
        """Whether the DB has 0010's tables (a read-only DB may predate it: nothing to show)."""
        return self._conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'approvals'").fetchone() is not None

    def approval(self, approval_id: str) -> Approval | None:
        if not self._has_policy():
            return None
        row = self._conn.execute(SELECT_APPROVALS + " WHERE id = ?", (approval_id,)).fetchone()
        return approval(row) if row is not None else None

    def approval_ids(self, prefix: str, limit: int = 5) -> list[str]:
        if not self._has_policy() or not HEX.fullmatch(prefix):
            return []
        sql = "SELECT id FROM approvals WHERE id LIKE ? ORDER BY id LIMIT ?"
        return [r[0] for r in self._conn.execute(sql, (prefix + "%", limit))]

    def approvals(self, status: str | None = None, limit: int | None = None) -> list[Approval]:
        if not self._has_policy():
            return []
        sql, args = SELECT_APPROVALS, list[Any]()
        if status is not None:
            sql += " WHERE status = ?"
            args.append(status)
        sql += " ORDER BY created DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [approval(r) for r in self._conn.execute(sql, args)][::-1]

    def grants(self, active_only: bool = True) -> list[GrantRecord]:
        if not self._has_policy():
            return []
        where = " WHERE revoked IS NULL" if active_only else ""
        return [grant(r) for r in self._conn.execute(SELECT_GRANTS + where + " ORDER BY id")]

    def freezes(self, active_only: bool = True) -> list[Freeze]:
        if not self._has_policy():
            return []
        where = " WHERE lifted IS NULL" if active_only else ""
        return [freeze(r) for r in self._conn.execute(SELECT_FREEZES + where + " ORDER BY id")]
