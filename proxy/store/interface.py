"""The two faces of a store engine. SQLite implements both (`store.sqlite`); another engine
(PostgreSQL, for replicas) is one more implementation of these, and nothing above them
changes.

`Store` is the database as a command sees it (the CLI, the bench): queries, and typed writes
each committed in a transaction of its own. `Engine` is the database as the running proxy
sees it: the one writer (`AuditLog`, engine-neutral, batches what it is given and commits it
through `Engine`) and the few reads the proxy makes while it runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import Any, Protocol, Self

from egress_guard.fakekeys import KeyRecord
from egress_guard.store.records import (
    Approval,
    AuditRow,
    Filters,
    Freeze,
    GrantRecord,
    Intent,
    Revocation,
    Spent,
    Write,
)


@dataclass
class Batch:
    """What one commit writes, in this order, in one transaction."""

    intents: list[Intent] = field(default_factory=list)
    rows: list[AuditRow] = field(default_factory=list)
    settles: list[str] = field(default_factory=list)  # request ids whose intents those rows remove
    amends: list[tuple[str, str]] = field(default_factory=list)  # (request id, note): the row becomes an error
    writes: list[Write] = field(default_factory=list)
    # (chain, chain_seq, hash) of rows[i], from the writer (`chain.link`); empty: rows unchained
    links: list[tuple[str, int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.intents) + len(self.rows) + len(self.amends) + len(self.writes)


class Engine(Protocol):
    """What the proxy's writer needs of a database, and what the proxy reads from it."""

    name: str  # for messages: a path or an address, never a password
    chain: str  # the hash chain this writer extends (`store.chain`): SQLite "local", a replica its name
    head: tuple[int, str]  # (chain_seq, hash) of that chain's last row, (0, "") if none: set by `open`,
    # after any row the engine writes itself; then the writer keeps it (the only one to add rows)

    async def open(self) -> int:
        """Migrate, become the database's one writer (else raise OSError), settle the intents
        a stopped proxy left at their reservation. Returns how many were settled."""
        ...

    def commit_now(self, batch: Batch) -> bool:
        """Commit on the event loop if that cannot wait on anything (else False: use
        `commit`). Raises if the commit fails."""
        ...

    def commit(self, batch: Batch) -> asyncio.Future[None]:
        """Commit off the event loop; the future fails if the commit does."""
        ...

    def committed(self) -> None:
        """After each commit: the engine's own upkeep (in the background)."""
        ...

    async def close(self) -> None: ...

    async def key(self, key_id: str) -> KeyRecord | None: ...

    async def revocations(self, after: int) -> list[Revocation]:
        """Revocations newer than id `after` (0: all), oldest first."""
        ...

    async def last_revocation(self) -> int: ...

    async def overrides(self) -> dict[tuple[str, str], Decimal]:
        """Run-time budget overrides: (agent, scope) -> limit."""
        ...

    async def totals(self) -> list[Spent]:
        """Every running total: what each session has spent, by UTC day."""
        ...

    async def spent_since(self, since: str) -> dict[str, Decimal]:
        """What each agent has spent at or after instant `since` (a budget day's start)."""
        ...

    async def approvals_by_id(self, ids: list[str]) -> list[Approval]:
        """The approvals with these ids (any status; unknown ids are left out)."""
        ...

    async def active_grants(self) -> list[GrantRecord]:
        """Every grant not revoked, oldest first."""
        ...

    async def active_freezes(self) -> list[Freeze]:
        """Every freeze not lifted, oldest first."""
        ...

    async def grants_by_id(self, ids: list[int]) -> list[GrantRecord]:
        """The grants with these ids (revoked ones too; unknown ids are left out)."""
        ...

    async def freezes_by_id(self, ids: list[int]) -> list[Freeze]:
        """The freezes with these ids (lifted ones too; unknown ids are left out)."""
        ...


class Store(Protocol):
    """The database as a command sees it. Times are instants (`timeutil.iso`)."""

    name: str

    def migrate(self) -> list[str]:
        """Apply pending named migrations; returns their names."""
        ...

    def write(self, op: Write) -> int:
        """Commit one typed write; returns how many rows it changed."""
        ...

    def rows(self, filters: Filters, limit: int | None, *, after_id: int = 0) -> list[dict[str, Any]]:
        """Audit rows matching `filters` (with an id above `after_id`), oldest first; `limit`
        keeps the newest N."""
        ...

    def last_id(self) -> int: ...

    def audit_chain(self) -> Iterator[tuple[Any, ...]]:
        """Every audit row as a `chain.CHAIN_SELECT` tuple (id, chain, chain_seq, hash,
        amended_from, then the COLUMNS after id), by id, streamed: memory stays flat."""
        ...

    def chain_starts(self) -> dict[str, tuple[int, str]]:
        """Where each pruned chain now starts: chain -> (seq, hash) of its last pruned row."""
        ...

    def chain_floor(self) -> int | None:
        """The highest id of a row from before the hash chain (None: not recorded)."""
        ...

    def count(self, filters: Filters) -> int: ...

    def stats(self, filters: Filters) -> list[dict[str, Any]]:
        """Requests, bytes, first and last time by host and decision, most requests first."""
        ...

    def costed(self, filters: Filters) -> Iterator[dict[str, Any]]:
        """The priced rows matching `filters`: agent, session, model, service, ts, tokens, cost_usd."""
        ...

    def keys(self, agent: str | None = None) -> list[KeyRecord]:
        """Key records (all, or one agent's), oldest first."""
        ...

    def live_sessions(self, now: str) -> list[tuple[str, str]]:
        """(agent, session) of every key neither revoked nor expired at `now`."""
        ...

    def overrides(self) -> dict[tuple[str, str], Decimal]: ...

    def reserved(self) -> dict[str, Decimal]:
        """The running proxy's open reservations: budget key -> amount."""
        ...

    def totals(self) -> list[Spent]:
        """Every running total: what each session has spent, by UTC day."""
        ...

    def spent_since(self, since: str) -> dict[str, Decimal]:
        """What each agent has spent at or after instant `since` (a budget day's start)."""
        ...

    def prune(self, before: str) -> int:
        """Delete the audit rows older than `before`; returns how many. Running totals,
        intents, keys and budgets stay. A day budget reads its day's rows (`spent_since`):
        the caller keeps `before` at or before the start of the open budget day."""
        ...

    def approval(self, approval_id: str) -> Approval | None: ...

    def approval_ids(self, prefix: str, limit: int = 5) -> list[str]:
        """The ids (any status) that start with `prefix` (lowercase hex), at most `limit`."""
        ...

    def approvals(self, status: str | None = None, limit: int | None = None) -> list[Approval]:
        """Approvals (with `status`, else all), the newest `limit`, oldest first."""
        ...

    def grants(self, active_only: bool = True) -> list[GrantRecord]:
        """Grants (only those not revoked, unless told), oldest first."""
        ...

    def freezes(self, active_only: bool = True) -> list[Freeze]:
        """Freezes (only those not lifted, unless told), oldest first."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...
