"""`PGStore`: the PostgreSQL store as a command sees it (the CLI, the bench), sync psycopg;
and the SQL of the reads the running proxy shares with it.

Times are instants as text (as in SQLite): ISO 8601 UTC with a Z compares in time order.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg.rows import dict_row

from egress_guard.fakekeys import KeyRecord
from egress_guard.store import chain
from egress_guard.store.postgres import fleet, schema, writes
from egress_guard.store.records import COLUMNS, Approval, Filters, Freeze, GrantRecord, Spent, StoreError, Write
from egress_guard.store.sqlite import queries as sq
from egress_guard.timeutil import now_iso

SELECT_KEYS = sq.SELECT_KEYS
SELECT_REVOCATIONS = "SELECT id, ts, agent, session, key_id, reason FROM revocations WHERE id > %s ORDER BY id"
SELECT_OVERRIDES = sq.SELECT_OVERRIDES
SELECT_TOTALS = sq.SELECT_TOTALS
SELECT_SPENT_SINCE = "SELECT agent, cost_usd FROM audit WHERE ts >= %s AND cost_usd IS NOT NULL AND agent IS NOT NULL"
SELECT_RESERVED = fleet.SELECT_RESERVED  # the open reservations for `budget show`: shared ones (budget_usage)
SELECT_APPROVALS = sq.SELECT_APPROVALS
SELECT_GRANTS = sq.SELECT_GRANTS
SELECT_FREEZES = sq.SELECT_FREEZES
ROW_COLUMNS = ", ".join(COLUMNS)  # what a query shows: not the chain's columns
PRUNE_CHUNK = 5000


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
            clauses.append(f"{column} {op} %s")
            args.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def connect(target: schema.Target) -> psycopg.Connection[Any]:
    """A command's connection (autocommit: transactions are explicit); StoreError if not."""
    try:
        return psycopg.connect(target.command_conninfo, autocommit=True)
    except psycopg.Error as exc:
        raise target.error(exc) from None


class PGStore:
    """A PostgreSQL store, opened by a command: read-only, or migrated and writable."""

    def __init__(self, settings: Any, *, readonly: bool = True) -> None:
        self.target = schema.Target(settings)
        self.name = self.target.name
        self._conn = connect(self.target)
        try:
            if readonly:
                self._conn.execute("SET default_transaction_read_only = on")
                missing = schema.pending(self._conn)
                if "0001_audit" in missing:
                    raise StoreError(f"store {self.name} has no egress-guard tables yet (run the proxy, or `init`)")
            else:
                schema.migrate_conn(self._conn)
        except psycopg.Error as exc:
            self._conn.close()
            raise self.target.error(exc) from None
        except BaseException:
            self._conn.close()
            raise

    def __repr__(self) -> str:
        return f"PGStore({self.name!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    def _all(self, sql: str, args: Any = (), *, dicts: bool = False) -> list[Any]:
        try:
            with self._conn.cursor(row_factory=dict_row) if dicts else self._conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        except psycopg.Error as exc:
            raise self.target.error(exc) from None

    def migrate(self) -> list[str]:
        try:
            return schema.migrate_conn(self._conn)
        except psycopg.Error as exc:
            raise self.target.error(exc) from None

    def write(self, op: Write) -> int:
        try:
            return writes.write_now(self._conn, op)
        except psycopg.Error as exc:
            raise self.target.error(exc) from None

    # --- the audit rows ------------------------------------------------------------------

    def rows(self, filters: Filters, limit: int | None, *, after_id: int = 0) -> list[dict[str, Any]]:
        clause, args = where(filters, "id > %s")
        sql = f"SELECT {ROW_COLUMNS} FROM audit{clause} ORDER BY id DESC"  # noqa: S608
        if limit is not None:
            sql += " LIMIT %s"
            args.append(limit)
        rows = self._all(sql, [after_id, *args], dicts=True)
        rows.reverse()
        return rows

    def last_id(self) -> int:
        return int(self._all("SELECT COALESCE(MAX(id), 0) FROM audit")[0][0])

    def count(self, filters: Filters) -> int:
        clause, args = where(filters)
        return int(self._all(f"SELECT COUNT(*) FROM audit{clause}", args)[0][0])  # noqa: S608

    def stats(self, filters: Filters) -> list[dict[str, Any]]:
        clause, args = where(filters)
        sql = (
            "SELECT host, decision, COUNT(*) AS requests, COALESCE(SUM(request_bytes), 0) AS request_bytes, "  # noqa: S608
            "COALESCE(SUM(response_bytes), 0) AS response_bytes, MIN(ts) AS first, MAX(ts) AS last "
            f"FROM audit{clause} GROUP BY host, decision ORDER BY requests DESC, host, decision"
        )
        return [
            {**r, "request_bytes": int(r["request_bytes"]), "response_bytes": int(r["response_bytes"])}
            for r in self._all(sql, args, dicts=True)
        ]

    def _stream(self, sql: str, args: Any = ()) -> Iterator[dict[str, Any]]:
        try:
            with self._conn.cursor(row_factory=dict_row) as cur:
                yield from cur.stream(sql, args, size=2000)
        except psycopg.Error as exc:
            raise self.target.error(exc) from None

    def costed(self, filters: Filters) -> Iterator[dict[str, Any]]:
        clause, args = where(filters, "cost_usd IS NOT NULL")
        sql = (
            "SELECT agent, session, model, service, ts, input_tokens, output_tokens, cached_tokens, cost_usd "  # noqa: S608
            f"FROM audit{clause}"
        )
        yield from self._stream(sql, args)

    def audit_chain(self) -> Iterator[tuple[Any, ...]]:
        """Every audit row as a `chain.CHAIN_SELECT` tuple, by id: a server-side cursor in one
        read-only snapshot (REPEATABLE READ), fetched 5000 at a time: memory stays flat."""
        try:
            with self._conn.transaction(), self._conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                with self._conn.cursor("egress_guard_audit_chain") as named:
                    named.itersize = 5000
                    named.execute(chain.select_sql("audit"))
                    yield from named
        except psycopg.Error as exc:
            raise self.target.error(exc) from None

    def chain_floor(self) -> int | None:
        if self._all("SELECT to_regclass('audit_chain_floor')")[0][0] is None:
            return None
        value = self._all("SELECT MAX(max_unchained_id) FROM audit_chain_floor")[0][0]
        return None if value is None else int(value)

    def chain_starts(self) -> dict[str, tuple[int, str]]:
        return {c: (int(seq), str(h)) for c, seq, h in self._all("SELECT chain, seq, hash FROM audit_pruned")}

    def prune(self, before: str) -> int:
        """A chain loses a prefix only (`audit verify` must not see a gap): the rows of each
        chain up to the first one at or after `before`; where it now starts is kept in
        audit_pruned, in the transaction of each deletion. Unchained rows go by `ts`."""
        deleted = 0
        conn = self._conn
        try:
            for (name,) in self._all("SELECT DISTINCT chain FROM audit WHERE chain IS NOT NULL"):
                ((kept, last),) = self._all(
                    "SELECT MIN(chain_seq) FILTER (WHERE ts >= %s), MAX(chain_seq) FROM audit WHERE chain = %s",
                    (before, name),
                )
                upto = int(kept) - 1 if kept is not None else int(last)
                while True:
                    with conn.transaction(), conn.cursor() as cur:
                        cur.execute(
                            "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE chain = %s AND chain_seq <= %s "
                            "ORDER BY chain_seq LIMIT %s) RETURNING chain_seq, hash",
                            (name, upto, PRUNE_CHUNK),
                        )
                        chunk = cur.fetchall()
                        if not chunk:
                            break
                        seq, digest = max(chunk)
                        cur.execute(
                            "INSERT INTO audit_pruned VALUES (%s, %s, %s, %s) ON CONFLICT (chain) DO UPDATE SET "
                            "seq = excluded.seq, hash = excluded.hash, ts = excluded.ts "
                            "WHERE audit_pruned.seq < excluded.seq",
                            (name, seq, digest, now_iso()),
                        )
                    deleted += len(chunk)
            while True:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(
                        "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE chain IS NULL AND ts < %s LIMIT %s)",
                        (before, PRUNE_CHUNK),
                    )
                    n = cur.rowcount
                deleted += n
                if n < PRUNE_CHUNK:
                    break
            if deleted:
                conn.execute("ANALYZE audit")
        except psycopg.Error as exc:
            raise self.target.error(exc) from None
        return deleted

    # --- keys and budgets ----------------------------------------------------------------

    def keys(self, agent: str | None = None) -> list[KeyRecord]:
        sql, args = SELECT_KEYS, []
        if agent:
            sql += " WHERE agent = %s"
            args.append(agent)
        return [sq.key_record(r) for r in self._all(sql + " ORDER BY created_at", args)]

    def live_sessions(self, now: str) -> list[tuple[str, str]]:
        return [
            (agent, session)
            for agent, session in self._all(
                "SELECT DISTINCT agent, session FROM fake_keys WHERE revoked_at IS NULL AND expires_at > %s", (now,)
            )
        ]

    def overrides(self) -> dict[tuple[str, str], Decimal]:
        return sq.overrides(self._all(SELECT_OVERRIDES))

    def reserved(self) -> dict[str, Decimal]:
        return {key: Decimal(usd) for key, usd in self._all(SELECT_RESERVED) if Decimal(usd)}

    def totals(self) -> list[Spent]:
        return sq.totals(self._all(SELECT_TOTALS))

    def spent_since(self, since: str) -> dict[str, Decimal]:
        return sq.per_agent(self._all(SELECT_SPENT_SINCE, (since,)))

    # --- escalations -------------------------------------------------------------------

    def _has_policy(self) -> bool:
        """Whether the store has 0010's tables (a read-only one may predate it: nothing to show)."""
        return bool(self._all("SELECT to_regclass('approvals') IS NOT NULL")[0][0])

    def approval(self, approval_id: str) -> Approval | None:
        if not self._has_policy():
            return None
        found = self._all(SELECT_APPROVALS + " WHERE id = %s", (approval_id,))
        return sq.approval(found[0]) if found else None

    def approval_ids(self, prefix: str, limit: int = 5) -> list[str]:
        if not self._has_policy() or not sq.HEX.fullmatch(prefix):
            return []
        return [
            r[0]
            for r in self._all("SELECT id FROM approvals WHERE id LIKE %s ORDER BY id LIMIT %s", (prefix + "%", limit))
        ]

    def approvals(self, status: str | None = None, limit: int | None = None) -> list[Approval]:
        if not self._has_policy():
            return []
        sql, args = SELECT_APPROVALS, list[Any]()
        if status is not None:
            sql += " WHERE status = %s"
            args.append(status)
        sql += " ORDER BY created DESC, id DESC"
        if limit is not None:
            sql += " LIMIT %s"
            args.append(limit)
        return [sq.approval(r) for r in self._all(sql, args)][::-1]

    def grants(self, active_only: bool = True) -> list[GrantRecord]:
        if not self._has_policy():
            return []
        where = " WHERE revoked IS NULL" if active_only else ""
        return [sq.grant(r) for r in self._all(SELECT_GRANTS + where + " ORDER BY id")]

    def freezes(self, active_only: bool = True) -> list[Freeze]:
        if not self._has_policy():
            return []
        where = " WHERE lifted IS NULL" if active_only else ""
        return [sq.freeze(r) for r in self._all(SELECT_FREEZES + where + " ORDER BY id")]
