"""`AuditLog`: the proxy's one writer. Everything the running proxy writes goes through it:
audit rows, metered calls' intents, amendments, and typed writes (the open reservations).

One row per decision, many to a commit. A response waits for its row (`durable`) —
mitmproxy sends the end of the response only after the `response` hook returns — so no
agent holds a complete answer whose row a crash could lose. A metered call's reservation
(`intent`) is committed before the call is forwarded and removed in the transaction that
writes its row; opening settles the intents a stopped proxy left behind at their
reservation, so budgets never undercount. Whatever cannot be written yet stays queued (never
dropped) and the log reports itself unhealthy, so the proxy refuses new requests until it
can record them again. Never stores bodies or header values.

Tamper-evident: every row is chained (`store.chain`) when its batch is formed, from the head
of the last successful commit (a retried batch is chained the same way); the head is logged
as an anchor (`audit anchor: chain=... seq=... hash=... ts=...`) every ANCHOR_EVERY seconds of
writing and at close, so `audit verify --anchors LOG` can tell a rewritten or truncated table.

Engine-neutral: where and how a batch is committed is the engine's (`interface.Engine`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egress_guard.store import chain
from egress_guard.store.interface import Batch, Engine
from egress_guard.store.records import (
    AddFreeze,
    AuditRow,
    AuditUnavailable,
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
)
from egress_guard.store.sqlite import SQLiteEngine
from egress_guard.timeutil import now_iso

log = logging.getLogger("egress_guard.audit")
WRITES = (
    InsertKey,
    RevokeKeys,
    SetBudget,
    ResetBudget,
    Reservations,
    CreateApproval,
    DecideApproval,
    ExpireApproval,
    ExpireLeftovers,
    AddFreeze,
    LiftFreeze,
    RevokeGrant,
)


@dataclass(slots=True)
class _Amend:
    """A note for a row already on its way to the DB (see `AuditLog.amend`)."""

    request_id: str
    note: str


class AuditLog:
    """`record` never blocks; `durable` waits for a row's commit; `intent` commits a metered
    call's reservation; `submit` queues a typed write; `healthy` says whether to accept traffic.

    Group commit: the writer commits whatever is queued as soon as it has work, and while
    one commit runs the next batch gathers. Items nobody waits on (CONNECTs, errors) may
    wait `batch_delay` for company; a waiter never does. A commit the engine runs off the
    event loop has a watchdog: if it takes longer than `wait_timeout` its waiters fail and
    the log turns unhealthy until it returns.
    """

    ANCHOR_EVERY = 60.0  # seconds of writing between two anchors in the log

    def __init__(
        self,
        engine: Engine | Path,
        *,
        batch_delay: float = 0.02,
        max_backlog: int = 50_000,
        max_batch: int = 2000,
        wait_timeout: float = 5.0,
        synchronous: str = "NORMAL",
    ) -> None:
        if isinstance(engine, Path):  # the default engine
            engine = SQLiteEngine(engine, synchronous=synchronous)
        self.engine = engine
        self.path = engine.name
        self.batch_delay = batch_delay
        self.max_backlog = max_backlog
        self.max_batch = max_batch
        self.wait_timeout = wait_timeout
        self.error: str | None = None
        self.written = 0  # audit rows committed
        self.settled_at_start = 0  # intents a previous run left, billed at their reservation
        self.failures = 0  # commits that failed (each retry counts)
        # Called after each commit with what it wrote and how long it took (seconds): metrics.
        self.listeners: list[Callable[[Batch, float], None]] = []
        # Queued items, oldest first: AuditRow, Intent, _Amend or a typed write. Item number
        # n (1-based, counted since open) is _pending[n - _committed - 1].
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
        self._task: asyncio.Task[None] | None = None
        self._head: chain.Head = (0, "")  # the chain's last committed row (engine.head at open)
        self._anchored: chain.Head = (0, "")  # the head last logged as an anchor
        self._anchored_at = 0.0  # time.monotonic() of that

    @property
    def healthy(self) -> bool:
        return self.error is None and len(self._pending) < self.max_backlog

    @property
    def backlog(self) -> int:
        """Items queued and not yet committed."""
        return len(self._pending)

    @property
    def unhealthy_reason(self) -> str:
        if self.error is not None:
            return f"audit log {self.path} cannot be written ({self.error})"
        return f"audit log {self.path} is {len(self._pending)} rows behind"

    async def open(self) -> None:
        """Open the engine (migrate, prove the DB writable, settle the intents a stopped
        proxy left, before anyone loads budgets); raises OSError/the engine's error if not."""
        self.settled_at_start = await self.engine.open()
        self._head = self.engine.head
        self._anchor()  # the head as found: what this run's rows follow
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

    def _enqueue(self, item: Any) -> int:
        self._pending.append(item)
        self._queued += 1
        self._wake.set()
        return self._queued

    def record(self, row: AuditRow) -> int:
        """Queue a row; returns its number, for `durable`. Never blocks."""
        return self._enqueue(row)

    def submit(self, write: Write) -> int:
        """Queue a typed write; returns its number, for `durable`. Never blocks."""
        return self._enqueue(write)

    async def intent(self, intent: Intent) -> None:
        """Commit a metered call's reservation; the call's own row will remove it. Raises
        AuditUnavailable if it cannot be committed (it stays queued: the call's row, when it
        is written, still removes it)."""
        self._open_intents.add(intent.request_id)
        await self.durable(self._enqueue(intent))

    def track_intent(self, request_id: str) -> None:
        """An intent the engine committed itself (the shared ledger's reservation, PostgreSQL):
        the call's row removes it, in the row's transaction."""
        self._open_intents.add(request_id)

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

    def _resolve_waiters(self, error: str | None) -> None:
        """After a commit: wake the waiters it covered; after a failure, fail them all."""
        while self._waiters and (error is not None or self._waiters[0][0] <= self._committed):
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(AuditUnavailable(error))

    def _anchor(self) -> None:
        """Log the chain's head (not again if unchanged): a copy outside the DB, for verify."""
        self._anchored_at = time.monotonic()
        if self._head[0] and self._head != self._anchored:
            self._anchored = self._head
            log.info("%s", chain.anchor_line(self.engine.chain, self._head, now_iso()))

    def _batch(self, items: list[Any]) -> tuple[Batch, chain.Head]:
        """The items as a batch, its rows chained after the committed head; and the head after it."""
        batch = Batch()
        for item in items:
            if isinstance(item, AuditRow):
                batch.rows.append(item)
                if item.request_id in self._open_intents:
                    batch.settles.append(item.request_id)
            elif isinstance(item, Intent):
                batch.intents.append(item)
            elif isinstance(item, _Amend):
                batch.amends.append((item.request_id, item.note))
            elif isinstance(item, WRITES):
                batch.writes.append(item)
            else:
                raise TypeError(f"not a store item: {item!r}")
        batch.links, head = chain.link(self.engine.chain, self._head, batch.rows)
        return batch, head

    async def _run(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if not self._closing and not self._waiters and self.batch_delay > 0:
                    # nobody waits on these items: let a burst gather into one commit, unless a waiter comes
                    self._hurry.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), self.batch_delay)
            items = self._pending[: self.max_batch]
            batch, head = self._batch(items)
            first = self._committed + 1
            self._writing = (first, first + len(items) - 1)
            started = time.perf_counter()
            try:
                await self._commit(batch)
            except Exception as exc:
                self._writing = None
                self.failures += 1
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
            self._head = self.engine.head = head
            del self._pending[: len(items)]
            self._committed += len(items)
            self.written += len(batch.rows)
            for request_id in batch.settles:
                self._open_intents.discard(request_id)
            self._resolve_waiters(None)
            if self.error is not None:
                log.warning("audit log %s: writable again; accepting requests", self.path)
                self.error = None
            self.engine.committed()
            if batch.rows and time.monotonic() - self._anchored_at >= self.ANCHOR_EVERY:
                self._anchor()
            elapsed = time.perf_counter() - started
            for listener in self.listeners:
                try:
                    listener(batch, elapsed)
                except Exception:  # an observer never stops the writer
                    log.exception("audit log %s: a commit listener failed", self.path)

    async def _commit(self, batch: Batch) -> None:
        if self.error is None and self.engine.commit_now(batch):
            return
        commit = self.engine.commit(batch)
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
        """Flush every pending item, then close. Returns the number of items it could not write."""
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
        self._anchor()
        await self.engine.close()
        return lost
