"""Every write to the SQLite store: a writer's batch (intents, audit rows with their running
totals, settled intents, amendments, typed writes) and each typed write alone.

A batch is bound on the event loop (`bind`: values only, cheap) and committed wherever the
engine decides (`commit`). Called inside a transaction unless the name says it makes one.
"""

from __future__ import annotations

import operator
import sqlite3
from dataclasses import dataclass

from egress_guard.store import chain as chainmod
from egress_guard.store.interface import Batch
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
from egress_guard.store.sqlite.schema import ADD_TOTAL, sum_totals, totals_rows, transaction

_INSERTED = [*COLUMNS[1:], "chain", "chain_seq", "hash"]
INSERT_ROW = f"INSERT INTO audit ({', '.join(_INSERTED)}) VALUES ({', '.join('?' * len(_INSERTED))})"
INSERT_INTENT = "INSERT OR REPLACE INTO spend_intents ({}) VALUES ({})".format(
    ", ".join(INTENT_COLUMNS), ", ".join("?" * len(INTENT_COLUMNS))
)
SETTLE_INTENT = "DELETE FROM spend_intents WHERE request_id = ?"
AMEND = (  # the right-hand sides see the row as it was: amended_from keeps the first original
    "UPDATE audit SET amended_from = COALESCE(amended_from, json_object('decision', decision, 'reason', reason)), "
    "decision = 'error', reason = COALESCE(reason || '; ', '') || ? "
    "WHERE request_id = ? AND kind = 'request'"
)
UNCHAINED = (None, None, None)
# An id taken already inserts nothing (0), rather than failing the writer's whole batch for
# ever: the proxy reads the row back and refuses its request if it is not its own.
INSERT_APPROVAL = (
    f"INSERT INTO approvals ({', '.join(APPROVAL_COLUMNS)}) VALUES ({', '.join('?' * len(APPROVAL_COLUMNS))}) "
    "ON CONFLICT (id) DO NOTHING"
)
_approval_fields = operator.attrgetter(*APPROVAL_COLUMNS)
_row_fields = operator.attrgetter(*COLUMNS[1:])  # a row's values in column order (astuple copies deeply)
_intent_fields = operator.attrgetter(*INTENT_COLUMNS)


def bindable(values: tuple) -> tuple:
    """The values with every text made encodable: mitmproxy decodes wire bytes with
    surrogateescape (an HTTP/2 :path of b"/a\\xff"), and one lone surrogate that sqlite3
    cannot bind would fail its batch again and again, stopping the log (every request then
    refused). ASCII, nearly every value, costs one check."""
    return tuple(
        v.encode("utf-8", "surrogatepass").decode("utf-8", "replace") if isinstance(v, str) and not v.isascii() else v
        for v in values
    )


@dataclass
class Bound:
    """A batch as SQL parameters."""

    intents: list[tuple]
    rows: list[tuple]
    totals: list[tuple[str, str, str, str]]  # (agent, session, day, usd) to add to the running totals
    settles: list[tuple[str]]
    amends: list[tuple]
    writes: list[Write]

    def __len__(self) -> int:
        return len(self.intents) + len(self.rows) + len(self.amends) + len(self.writes)


def _unchained(batch: Batch) -> list[tuple[None, None, None]]:
    return [UNCHAINED] * len(batch.rows)


def priced(r: AuditRow) -> bool:
    """Whether a row counts in a budget: it has a cost and an agent to charge it to."""
    return r.cost_usd is not None and r.agent is not None


def bind(batch: Batch) -> Bound:
    """The batch as parameters; running totals summed here, on the event loop."""
    return Bound(
        [bindable(_intent_fields(i)) for i in batch.intents],
        [
            bindable((*_row_fields(r), *link))
            for r, link in zip(batch.rows, batch.links or _unchained(batch), strict=True)
        ],
        totals_rows(sum_totals(bindable((r.agent, r.session, r.ts, r.cost_usd)) for r in batch.rows if priced(r))),
        [(request_id,) for request_id in batch.settles],
        [bindable((note, request_id)) for request_id, note in batch.amends],
        batch.writes,
    )


def apply(conn: sqlite3.Connection, b: Bound) -> None:
    if b.intents:
        conn.executemany(INSERT_INTENT, b.intents)
    if b.rows:
        conn.executemany(INSERT_ROW, b.rows)
    if b.totals:
        conn.executemany(ADD_TOTAL, b.totals)
    if b.settles:
        conn.executemany(SETTLE_INTENT, b.settles)
    if b.amends:
        conn.executemany(AMEND, b.amends)
    for op in b.writes:
        apply_write(conn, op)


def commit(conn: sqlite3.Connection, b: Bound) -> None:
    """One transaction (DEFERRED: the first insert takes the write lock)."""
    with transaction(conn, "DEFERRED"):
        apply(conn, b)


def apply_write(conn: sqlite3.Connection, op: Write) -> int:
    """One typed write; returns the rows it changed."""
    match op:
        case InsertKey(record=r):
            return conn.execute(
                "INSERT INTO fake_keys (key_id, agent, session, services, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (r.key_id, r.agent, r.session, ",".join(r.services), r.created_at, r.expires_at),
            ).rowcount
        case RevokeKeys():
            where = op.where()  # fixed column names; the values are bound
            match = " AND ".join(f"{column} = ?" for column, _ in where)
            count = conn.execute(
                f"UPDATE fake_keys SET revoked_at = ?, revoked_reason = ? WHERE {match} AND revoked_at IS NULL",
                (op.ts, op.reason, *(value for _, value in where)),
            ).rowcount
            conn.execute(
                "INSERT INTO revocations (ts, agent, session, key_id, reason) VALUES (?, ?, ?, ?, ?)",
                (op.ts, op.agent, op.session, op.key_id, op.reason),
            )
            return count
        case SetBudget():
            return conn.execute(
                "INSERT INTO budgets VALUES (?, ?, ?, ?) ON CONFLICT (agent, scope) DO UPDATE SET "
                "limit_usd = excluded.limit_usd, updated_at = excluded.updated_at",
                (op.agent, op.scope, f"{op.limit_usd:f}", op.ts),
            ).rowcount
        case ResetBudget():
            return conn.execute("DELETE FROM budgets WHERE agent = ? AND scope = ?", (op.agent, op.scope)).rowcount
        case Reservations():
            conn.executemany(
                "INSERT INTO budget_reserved VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "usd = excluded.usd, updated_at = excluded.updated_at",
                [(key, f"{usd:f}", op.ts) for key, usd in op.changed],
            )
            conn.executemany("DELETE FROM budget_reserved WHERE key = ?", [(key,) for key in op.removed])
            return len(op.changed) + len(op.removed)
        case CreateApproval(approval=a):
            return conn.execute(INSERT_APPROVAL, bindable(_approval_fields(a))).rowcount
        case DecideApproval():
            return _decide(conn, op)
        case ExpireApproval():
            return conn.execute(
                "UPDATE approvals SET status = 'expired', decided_by = ?, decided_at = ? "
                "WHERE id = ? AND status = 'pending'",
                (op.by, op.ts, op.id),
            ).rowcount
        case ExpireLeftovers():
            return conn.execute(
                "UPDATE approvals SET status = 'expired', decided_by = ?, decided_at = ? "
                "WHERE replica = ? AND status = 'pending' AND created < ?",
                bindable((op.by, op.ts, op.replica, op.before)),
            ).rowcount
        case AddFreeze():
            return conn.execute(
                "INSERT INTO freezes (created, agent, session, trigger_text, baseline) VALUES (?, ?, ?, ?, ?)",
                bindable((op.ts, op.agent, op.session, op.trigger, op.baseline)),
            ).rowcount
        case LiftFreeze():
            return conn.execute(
                "UPDATE freezes SET lifted = ?, lifted_by = ?, note = ? "
                "WHERE agent = ? AND session = ? AND lifted IS NULL",
                bindable((op.ts, op.by, op.note, op.agent, op.session)),
            ).rowcount
        case RevokeGrant():
            return conn.execute(
                "UPDATE grants SET revoked = ? WHERE id = ? AND revoked IS NULL", (op.ts, op.id)
            ).rowcount
    raise TypeError(f"not a store write: {op!r}")


def _decide(conn: sqlite3.Connection, op: DecideApproval) -> int:
    """The decision, if the approval is still pending; with its grant and lifted freeze (see
    `DecideApproval`), in the caller's transaction."""
    found = conn.execute(
        "SELECT agent, session, rule, host, port FROM approvals WHERE id = ? AND status = 'pending'", (op.id,)
    ).fetchone()
    if found is None:
        return 0
    agent, session, rule, host, port = found
    if op.scope == "session" and session is None:
        return 0  # a session grant without a session would cover every session
    changed = conn.execute(
        "UPDATE approvals SET status = ?, scope = ?, note = ?, decided_by = ?, decided_at = ? "
        "WHERE id = ? AND status = 'pending'",
        bindable((op.status, op.scope, op.note, op.by, op.ts, op.id)),
    ).rowcount
    if changed and op.grants:
        if rule == "freeze":  # a freeze holds every host of the session
            host, port = ANY_HOST, 0
            conn.execute(
                "UPDATE freezes SET lifted = ?, lifted_by = ?, note = ? "
                "WHERE agent = ? AND session = ? AND lifted IS NULL",
                bindable((op.ts, op.by, op.note, agent, session or "")),
            )
        conn.execute(
            "INSERT INTO grants (created, approval_id, rule, host, port, agent, session, granted_by, note) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            bindable(
                (op.ts, op.id, rule, host, port, agent, session if op.scope == "session" else None, op.by, op.note)
            ),
        )
    return changed


def head(conn: sqlite3.Connection, chain: str) -> tuple[int, str]:
    """(chain_seq, hash) of the chain's last row; after a prune that left none, of the last
    pruned one; (0, "") for a new chain."""
    row = (
        conn.execute(
            "SELECT chain_seq, hash FROM audit WHERE chain = ? ORDER BY chain_seq DESC LIMIT 1", (chain,)
        ).fetchone()
        or conn.execute("SELECT seq, hash FROM audit_pruned WHERE chain = ?", (chain,)).fetchone()
    )
    return (int(row[0]), str(row[1])) if row is not None else (0, "")


def settle_intents(conn: sqlite3.Connection, chain: str) -> tuple[int, tuple[int, str]]:
    """Bill every unfinished metered call at its reservation: one audit row each (on the
    chain), written with the intent's removal. Only the proxy's own writer may run this, at
    start (a running proxy's intents are its calls in flight). Returns how many were settled,
    and the chain's head after them."""
    found = conn.execute(f"SELECT {', '.join(INTENT_COLUMNS)} FROM spend_intents ORDER BY ts").fetchall()
    batch = Batch()
    for r in found:
        i = Intent(**{k: r[k] for k in INTENT_COLUMNS})
        batch.rows.append(settled_row(i))
        batch.settles.append(i.request_id)
    batch.links, new_head = chainmod.link(chain, head(conn, chain), batch.rows)
    apply(conn, bind(batch))
    return len(found), new_head


def write_now(conn: sqlite3.Connection, op: Write) -> int:
    """One typed write in a transaction of its own."""
    with transaction(conn):
        return apply_write(conn, op)
