"""Every write to the PostgreSQL store: a writer's batch (one transaction: intents, audit rows
with their running totals, settles, amendments, typed writes) and each typed write alone.

The SQL of a typed write is planned once (`plan`) and run by either face: the engine's async
cursor in a batch, or a command's sync cursor in a transaction of its own. `Reservations`
is nothing here: on PostgreSQL the open reservations are shared rows of their own (fleet.py).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from egress_guard.store.interface import Batch
from egress_guard.store.postgres import fleet
from egress_guard.store.postgres.schema import ADD_TOTAL
from egress_guard.store.records import (
    ANY_HOST,
    APPROVAL_COLUMNS,
    COLUMNS,
    INTENT_COLUMNS,
    AddFreeze,
    AuditRow,
    CreateApproval,
    DecideApproval,
    ExpireApproval,
    ExpireLeftovers,
    InsertKey,
    Intent,
    LiftFreeze,
    Reservations,
    ResetBudget,
    RevokeGrant,
    RevokeKeys,
    SetBudget,
    Write,
    settled_row,
)
from egress_guard.store.sqlite.schema import sum_totals, totals_rows
from egress_guard.store.sqlite.writes import priced

ROW_COLUMNS = [*COLUMNS[1:], "chain", "chain_seq", "hash"]  # a row's fields, then its link
INSERT_ROW = f"INSERT INTO audit ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join(['%s'] * len(ROW_COLUMNS))})"  # noqa: S608
INSERT_INTENT = (
    f"INSERT INTO spend_intents ({', '.join(INTENT_COLUMNS)}, replica) "  # noqa: S608
    f"VALUES ({', '.join(['%s'] * (len(INTENT_COLUMNS) + 1))}) "
    f"ON CONFLICT (request_id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in INTENT_COLUMNS[1:])}"
)
# The original decision and reason are kept (once) in amended_from: `audit verify` hashes them.
AMEND = (
    "UPDATE audit SET "
    "amended_from = COALESCE(amended_from, json_build_object('decision', decision, 'reason', reason)::text), "
    "decision = 'error', reason = COALESCE(reason || '; ', '') || %s "
    "WHERE request_id = %s AND kind = 'request'"
)
# An id taken already inserts nothing, rather than failing the writer's whole batch for ever:
# the proxy reads the row back and refuses its request if it is not its own.
INSERT_APPROVAL = (
    f"INSERT INTO approvals ({', '.join(APPROVAL_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join(['%s'] * len(APPROVAL_COLUMNS))}) ON CONFLICT (id) DO NOTHING"
)
# One statement (data-modifying CTEs: no round trip between its parts, so it runs in the
# writer's pipeline as in a command's transaction): the decision if still pending, the
# freeze it lifts and the grant it adds (see records.DecideApproval). Its rows: the decided
# approval's id, or none.
DECIDE = """
WITH decided AS (
    UPDATE approvals SET status = %s, scope = %s, note = %s, decided_by = %s, decided_at = %s
    WHERE id = %s AND status = 'pending' AND NOT (%s AND session IS NULL)
    RETURNING id, agent, session, rule, host, port, status, scope
), lifted AS (
    UPDATE freezes f SET lifted = %s, lifted_by = %s, note = %s FROM decided d
    WHERE d.rule = 'freeze' AND d.status = 'approved' AND d.scope IN ('session', 'always')
      AND f.agent = d.agent AND f.session = COALESCE(d.session, '') AND f.lifted IS NULL
    RETURNING f.id
), granted AS (
    INSERT INTO grants (created, approval_id, rule, host, port, agent, session, granted_by, note)
    SELECT %s, d.id, d.rule, CASE WHEN d.rule = 'freeze' THEN %s ELSE d.host END,
           CASE WHEN d.rule = 'freeze' THEN 0 ELSE d.port END, d.agent,
           CASE WHEN d.scope = 'session' THEN d.session END, %s, %s
    FROM decided d WHERE d.status = 'approved' AND d.scope IN ('session', 'always')
    RETURNING id
)
SELECT id FROM decided
"""
NO_LINK: tuple[Any, ...] = (None, None, None)
_row_fields = operator.attrgetter(*COLUMNS[1:])
_intent_fields = operator.attrgetter(*INTENT_COLUMNS)
_approval_fields = operator.attrgetter(*APPROVAL_COLUMNS)


def text(v: Any) -> Any:
    """A value PostgreSQL can hold: text with a lone surrogate (mitmproxy decodes wire bytes
    with surrogateescape) or a NUL byte would fail its batch again and again, stopping the
    log. ASCII without NUL, nearly every value, costs two checks."""
    if not isinstance(v, str):
        return v
    if not v.isascii():
        v = v.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return v.replace("\x00", "\ufffd") if "\x00" in v else v


def bindable(values: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(text(v) for v in values)


@dataclass
class Bound:
    """A batch as SQL parameters (bound on the event loop: values only, cheap)."""

    batch: Batch
    intents: list[tuple[Any, ...]]
    rows: list[tuple[Any, ...]]
    totals: list[tuple[str, str, str, str]]
    amends: list[tuple[Any, ...]]
    writes: list[Write]


def bind(batch: Batch, replica: str) -> Bound:
    return Bound(
        batch,
        [(*bindable(_intent_fields(i)), replica) for i in batch.intents],
        [
            (*bindable(_row_fields(r)), *link)
            for r, link in zip(
                batch.rows, list[tuple[Any, ...]](batch.links) or [NO_LINK] * len(batch.rows), strict=True
            )
        ],
        # sorted: replicas' transactions take the rows' locks in one order (no deadlock)
        sorted(
            totals_rows(sum_totals(bindable((r.agent, r.session, r.ts, r.cost_usd)) for r in batch.rows if priced(r)))
        ),
        [bindable((note, request_id)) for request_id, note in batch.amends],
        [w for w in batch.writes if not isinstance(w, Reservations)],
    )


async def apply(cur: psycopg.AsyncCursor[Any], b: Bound) -> None:
    """A batch, inside the caller's transaction."""
    await apply_own(cur, b)
    await apply_shared(cur, b)


async def apply_own(cur: psycopg.AsyncCursor[Any], b: Bound) -> None:
    """What of a batch only this replica's writer touches: its intents, rows (its own chain),
    amendments and typed writes."""
    if b.intents:
        await cur.executemany(INSERT_INTENT, b.intents)
    if b.rows:
        await cur.executemany(INSERT_ROW, b.rows)
    if b.amends:
        await cur.executemany(AMEND, b.amends)
    for op in b.writes:
        for sql, args, _counts in plan(op):
            await cur.execute(sql, args)


async def apply_shared(cur: psycopg.AsyncCursor[Any], b: Bound) -> None:
    """What of a batch locks rows other replicas and admissions wait on: the running totals
    and the shared budgets (an agent's row and budget keys, which its next admission needs).
    Last, so that the engine can send it with the COMMIT: those locks are then held for the
    server's time only."""
    if b.totals:
        await cur.executemany(ADD_TOTAL, b.totals)
    # shared budgets: priced rows, and the settled intents, which it deletes (no SQL if neither)
    await fleet.settle(cur, b.batch)


def plan(op: Write) -> list[tuple[str, tuple[Any, ...], bool]]:
    """A typed write's statements: (sql, args, whether its rowcount is the write's count)."""
    match op:
        case InsertKey(record=r):
            return [
                (
                    "INSERT INTO fake_keys (key_id, agent, session, services, created_at, expires_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    bindable((r.key_id, r.agent, r.session, ",".join(r.services), r.created_at, r.expires_at)),
                    True,
                )
            ]
        case RevokeKeys():
            where = op.where()  # fixed column names; the values are bound
            match = " AND ".join(f"{column} = %s" for column, _ in where)
            return [
                (
                    "UPDATE fake_keys SET revoked_at = %s, revoked_reason = %s "  # noqa: S608
                    f"WHERE {match} AND revoked_at IS NULL",
                    bindable((op.ts, op.reason, *(value for _, value in where))),
                    True,
                ),
                (
                    "INSERT INTO revocations (ts, agent, session, key_id, reason) VALUES (%s, %s, %s, %s, %s)",
                    bindable((op.ts, op.agent, op.session, op.key_id, op.reason)),
                    False,
                ),
            ]
        case SetBudget():
            return [
                (
                    "INSERT INTO budgets VALUES (%s, %s, %s, %s) ON CONFLICT (agent, scope) DO UPDATE SET "
                    "limit_usd = excluded.limit_usd, updated_at = excluded.updated_at",
                    bindable((op.agent, op.scope, f"{op.limit_usd:f}", op.ts)),
                    True,
                )
            ]
        case ResetBudget():
            return [("DELETE FROM budgets WHERE agent = %s AND scope = %s", bindable((op.agent, op.scope)), True)]
        case Reservations():
            return []
        case CreateApproval(approval=a):
            return [(INSERT_APPROVAL, bindable(_approval_fields(a)), True)]
        case DecideApproval():
            note = text(op.note)
            return [
                (
                    DECIDE,
                    (
                        *bindable((op.status, op.scope, note, op.by, op.ts, op.id)),
                        op.scope == "session",
                        *bindable((op.ts, op.by, note, op.ts, ANY_HOST, op.by, note)),
                    ),
                    True,
                )
            ]
        case ExpireApproval():
            return [
                (
                    "UPDATE approvals SET status = 'expired', decided_by = %s, decided_at = %s "
                    "WHERE id = %s AND status = 'pending'",
                    bindable((op.by, op.ts, op.id)),
                    True,
                )
            ]
        case ExpireLeftovers():
            return [
                (
                    "UPDATE approvals SET status = 'expired', decided_by = %s, decided_at = %s "
                    "WHERE replica = %s AND status = 'pending' AND created < %s",
                    bindable((op.by, op.ts, op.replica, op.before)),
                    True,
                )
            ]
        case AddFreeze():
            return [
                (
                    "INSERT INTO freezes (created, agent, session, trigger_text, baseline) VALUES (%s, %s, %s, %s, %s)",
                    bindable((op.ts, op.agent, op.session, op.trigger, op.baseline)),
                    True,
                )
            ]
        case LiftFreeze():
            return [
                (
                    "UPDATE freezes SET lifted = %s, lifted_by = %s, note = %s "
                    "WHERE agent = %s AND session = %s AND lifted IS NULL",
                    bindable((op.ts, op.by, op.note, op.agent, op.session)),
                    True,
                )
            ]
        case RevokeGrant():
            return [("UPDATE grants SET revoked = %s WHERE id = %s AND revoked IS NULL", (op.ts, op.id), True)]
    raise TypeError(f"not a store write: {op!r}")


def write_now(conn: psycopg.Connection[Any], op: Write) -> int:
    """One typed write in a transaction of its own (conn in autocommit)."""
    count = 0
    with conn.transaction(), conn.cursor() as cur:
        for sql, args, counts in plan(op):
            cur.execute(sql, args)
            if counts:
                count += max(cur.rowcount, 0)
    return count


def settled_rows(found: list[tuple[Any, ...]]) -> tuple[list[AuditRow], list[str]]:
    """Rows billing unfinished calls (intent rows, INTENT_COLUMNS order) at their reservation."""
    rows, ids = [], []
    for r in found:
        i = Intent(**dict(zip(INTENT_COLUMNS, r, strict=True)))
        rows.append(settled_row(i))
        ids.append(i.request_id)
    return rows, ids
