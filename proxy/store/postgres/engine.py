"""`PGEngine`: the PostgreSQL store as the running proxy sees it (`interface.Engine`): async
psycopg over a connection pool, one of many replicas writing the same database.

Every call has a client-side deadline (`store.timeout`): a call that has not finished by
then fails with a StoreError naming the store, whatever the server is doing (stopped,
unreachable, slow). The call itself is left to finish or be cancelled in the background —
psycopg's own cancellation of a query can take seconds against a stopped server, and no
caller waits for it. A connection that failed is discarded by the pool; the next call opens
a new one, so service resumes by itself when the server is back.

Many replicas write: no lock, no "one writer" check. Each batch is one transaction; opening
settles only this replica's own leftover intents (another replica's are its, or the fleet's
once it is gone: fleet.py). Each replica writes its own audit chain, named by `replica`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from psycopg_pool.base import AttemptWithBackoff

from egress_guard.fakekeys import KeyRecord
from egress_guard.store import chain as chainmod
from egress_guard.store.interface import Batch
from egress_guard.store.postgres import queries, schema, writes
from egress_guard.store.records import INTENT_COLUMNS, Approval, Freeze, GrantRecord, Revocation, Spent, StoreError

log = logging.getLogger("egress_guard.audit")
T = TypeVar("T")


def _in_daemon_thread(fn: Callable[[], None]) -> asyncio.Future[None]:
    """`fn()` in a thread of its own that never holds up the process's exit (sync psycopg
    has no deadline of its own: a stopped server would keep it waiting)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def target() -> None:
        outcome: BaseException | None = None
        try:
            fn()
        except BaseException as exc:
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=target, name="egress-guard store migrate", daemon=True).start()
    return done


class _Attempt(AttemptWithBackoff):
    """psycopg_pool's reconnection backoff, capped: its own doubles without bound, so after an
    outage of T seconds the pool would try again only up to ~T seconds after the server is
    back (minutes of 503s after a long outage). Capped, it tries about once a second."""

    MAX_DELAY = 1.0

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, self.MAX_DELAY)


class _Pool(AsyncConnectionPool):
    async def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        await super()._add_connection(attempt or _Attempt(timeout=self.reconnect_timeout), growing)


class _Broken(StoreError):
    """A call failed on its connection (not for want of time): a read may be retried."""


class PGEngine:
    POOL_MIN = 2
    POOL_MAX = 8
    MIGRATE_TIMEOUT = 120.0  # seconds the schema check and migrations may take at start

    def __init__(self, settings: Any) -> None:
        self.target = schema.Target(settings)
        self.name = self.target.name
        self.timeout = self.target.timeout
        self.replica = self.chain = self.target.replica
        self.conninfo = self.target.conninfo  # for a dedicated connection (LISTEN); holds the password
        self.head: tuple[int, str] = (0, "")  # this replica's chain head (seq, hash), read at open
        self._pool: AsyncConnectionPool | None = None
        self._orphans: set[asyncio.Task[Any]] = set()  # calls past their deadline, finishing in the background
        self.read_failures = 0  # reads that failed (metrics)
        # A batch whose COMMIT was sent and never answered (the server stopped, the link broke):
        # it may have been committed. The writer retries it, with more items after it.
        # Several, if retries go unanswered too: each holds the one before it, and more.
        self._unsure: list[Batch] = []

    def __repr__(self) -> str:
        return f"PGEngine({self.name!r}, replica={self.replica!r})"

    # --- calls with a deadline -----------------------------------------------------------------

    async def run(
        self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], *, timeout: float | None = None
    ) -> T:
        """`await fn(conn)` on a pooled connection (autocommit) within the store's timeout;
        raises StoreError naming the store (never the password) if it fails or is late."""
        held: list[psycopg.AsyncConnection[Any]] = []
        task = asyncio.ensure_future(self._on_connection(fn, held))
        try:
            done, _ = await asyncio.wait([task], timeout=self.timeout if timeout is None else timeout)
        except asyncio.CancelledError:
            self._abandon(task, held)
            raise
        if not done:
            self._abandon(task, held)
            raise self.target.error(TimeoutError())
        return task.result()

    async def _on_connection(
        self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], held: list[psycopg.AsyncConnection[Any]]
    ) -> T:
        if self._pool is None:
            raise StoreError(f"store {self.name} is not open")
        try:
            async with self._pool.connection(timeout=self.timeout) as conn:
                held.append(conn)
                return await fn(conn)
        except PoolTimeout as exc:
            raise self.target.error(exc) from None
        except psycopg.OperationalError as exc:  # e.g. a pooled connection the server closed
            raise _Broken(str(self.target.error(exc))) from None
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise self.target.error(exc) from None

    def _abandon(self, task: asyncio.Task[Any], held: list[psycopg.AsyncConnection[Any]]) -> None:
        """Give up on a call at once. Its connection is closed first: cancelled mid-query,
        psycopg would ask the (stopped) server to cancel it and wait for that, ~10 s holding a
        pool slot; closed, the server rolls back whatever it had begun, and the pool drops it."""
        for conn in held:
            with contextlib.suppress(Exception):
                conn.pgconn.finish()
        task.cancel()
        self._orphans.add(task)
        task.add_done_callback(self._orphan_done)

    def _orphan_done(self, task: asyncio.Task[Any]) -> None:
        self._orphans.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a late failure was already reported as the timeout

    async def _read(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        async def fetch(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            cur = await conn.execute(sql, args)
            return await cur.fetchall()

        try:
            try:
                return await self.run(fetch)
            except _Broken:
                # a pooled connection the server closed (a restart) fails once: a read is safe to retry
                return await self.run(fetch)
        except StoreError:
            self.read_failures += 1
            raise

    # --- opening and closing ---------------------------------------------------------------

    async def open(self) -> int:
        try:  # generous: a migration may build an index on a large table, or wait for another replica's
            await asyncio.wait_for(_in_daemon_thread(self._migrate), self.MIGRATE_TIMEOUT)
        except TimeoutError:
            raise StoreError(
                f"store {self.name} did not finish migrating within {self.MIGRATE_TIMEOUT:g} s (is it stopped?)"
            ) from None
        self._pool = _Pool(
            self.conninfo,
            min_size=self.POOL_MIN,
            max_size=self.POOL_MAX,
            timeout=self.timeout,
            open=False,
            kwargs={"autocommit": True},
            name=f"egress-guard {self.replica}",
            reconnect_timeout=24 * 3600,  # keep trying while the server is away: never give up
        )
        try:
            await asyncio.wait_for(self._pool.open(wait=True, timeout=self.timeout), self.timeout + 1)
            return await self.run(self._open_replica, timeout=max(self.timeout, 30.0))
        except BaseException as exc:
            await self.close()
            if isinstance(exc, Exception):
                raise self.target.error(exc) from None
            raise

    def _migrate(self) -> None:
        with queries.connect(self.target) as conn:
            try:
                schema.migrate_conn(conn)
            except psycopg.Error as exc:
                raise self.target.error(exc) from None

    async def _open_replica(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Settle this replica's own calls a previous run left unfinished (chained, as the
        rows of this replica's chain they are), then read the chain's head for the writer."""
        async with conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                # a metered call's (model given); an unmetered one is released by SharedLedger.open, without a row
                f"SELECT {', '.join(INTENT_COLUMNS)} FROM spend_intents "  # noqa: S608
                "WHERE replica = %s AND model IS NOT NULL ORDER BY ts FOR UPDATE",
                (self.replica,),
            )
            found = await cur.fetchall()
            head = await self._head(cur)
            if found:
                batch = Batch()
                batch.rows, batch.settles = writes.settled_rows(found)
                batch.links, head = chainmod.link(self.chain, head, batch.rows)
                await writes.apply(cur, writes.bind(batch, self.replica))
        self.head = head
        return len(found)

    async def _head(self, cur: psycopg.AsyncCursor[Any]) -> tuple[int, str]:
        await cur.execute(
            "SELECT chain_seq, hash FROM audit WHERE chain = %s ORDER BY chain_seq DESC LIMIT 1", (self.chain,)
        )
        row = await cur.fetchone()
        if row is None:  # a new chain, or every row of it pruned
            await cur.execute("SELECT seq, hash FROM audit_pruned WHERE chain = %s", (self.chain,))
            row = await cur.fetchone()
        return (int(row[0]), str(row[1])) if row else (0, "")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        for task in list(self._orphans):
            task.cancel()
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(timeout=1.0), 2.0)
            except Exception as exc:  # closing never fails a stop
                log.warning("store %s: closing the pool: %s", self.name, self.target.scrub(str(exc)))

    # --- commits ---------------------------------------------------------------------------

    def commit_now(self, batch: Batch) -> bool:
        return False  # every commit is a round trip to the server

    def commit(self, batch: Batch) -> asyncio.Future[None]:
        return asyncio.ensure_future(self._commit(batch))

    async def _commit(self, batch: Batch) -> None:
        unsure = list(self._unsure)
        sent = False  # COMMIT sent: from then on the batch may be committed whatever we hear

        async def transact(conn: psycopg.AsyncConnection[Any]) -> None:
            nonlocal sent
            # Pipeline mode, two round trips: BEGIN and the statements only this replica's
            # writer touches (its rows, intents, amendments, typed writes); then, once they have
            # all succeeded, the shared part (running totals, budgets: `apply_shared`) with the
            # COMMIT. So a server that stops or a link that breaks before the COMMIT is sent
            # never commits a batch the writer was told failed, and the rows other replicas and
            # the agents' admissions wait on are locked for the server's time only, not for a
            # round trip through a busy event loop. A shared statement that fails aborts the
            # pipeline: the server skips the COMMIT, the transaction is rolled back below.
            try:
                async with conn.pipeline() as pipeline, conn.cursor() as cur:
                    await cur.execute("BEGIN")
                    todo = batch
                    for sent_before in reversed(unsure):  # the largest that landed holds the others
                        if await self._landed(cur, sent_before):
                            todo = await self._beyond(cur, batch, sent_before)
                            break
                    bound = writes.bind(todo, self.replica)
                    await writes.apply_own(cur, bound)
                    await pipeline.sync()
                    sent = True
                    await writes.apply_shared(cur, bound)
                    await cur.execute("COMMIT")
            except BaseException:
                if conn.pgconn.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                    sent = False  # the transaction is still open: its COMMIT never ran
                    await conn.rollback()
                raise

        try:
            await self.run(transact)
        except StoreError as exc:
            if sent:
                self._unsure.append(batch)
            if "audit_chain_seq" in str(exc):
                raise StoreError(
                    f"store {self.name}: chain {self.chain} already has these rows: do two replicas write "
                    f"chain {self.chain}? give each its own `replica:` ({exc})"
                ) from None
            raise
        self._unsure.clear()

    async def _landed(self, cur: psycopg.AsyncCursor[Any], batch: Batch) -> bool:
        """Whether `batch` (its COMMIT unanswered) was committed after all: its last row is
        there, same hash (a batch is all or nothing). A batch without rows: taken as not
        (its intents are upserts; an amend may then be applied twice)."""
        if not batch.links:
            return False
        chain, seq, digest = batch.links[-1]
        await cur.execute("SELECT hash FROM audit WHERE chain = %s AND chain_seq = %s", (chain, seq))
        row = await cur.fetchone()
        return row is not None and row[0] == digest

    async def _beyond(self, cur: psycopg.AsyncCursor[Any], batch: Batch, done: Batch) -> Batch:
        """What `batch` (the writer's retry: the same first items, maybe more) holds beyond
        `done`, committed already. A row of `done` the writer amended since (its response was
        cut when the commit seemed to fail) is stored as the writer now chains it: its
        decision, reason and hash, and so every hash after it."""
        n = len(done.rows)
        if len(batch.rows) < n or any(a is not b for a, b in zip(batch.rows, done.rows, strict=False)):
            raise StoreError(f"store {self.name}: the writer's retry is not the batch that was sent")
        for row, now, then in zip(batch.rows, batch.links, done.links, strict=False):
            if now != then:
                await cur.execute(
                    "UPDATE audit SET decision = %s, reason = %s, hash = %s "
                    "WHERE chain = %s AND chain_seq = %s AND hash = %s",
                    (row.decision, writes.text(row.reason), now[2], then[0], then[1], then[2]),
                )
        return Batch(
            intents=batch.intents[len(done.intents) :],
            rows=batch.rows[n:],
            settles=batch.settles[len(done.settles) :],
            amends=batch.amends[len(done.amends) :],
            writes=batch.writes[len(done.writes) :],
            links=batch.links[n:],
        )

    def committed(self) -> None:
        pass

    # --- what the proxy reads ----------------------------------------------------------------

    async def key(self, key_id: str) -> KeyRecord | None:
        rows = await self._read(queries.SELECT_KEYS + " WHERE key_id = %s", key_id)
        return queries.sq.key_record(rows[0]) if rows else None

    async def revocations(self, after: int) -> list[Revocation]:
        return [Revocation(*r) for r in await self._read(queries.SELECT_REVOCATIONS, after)]

    async def last_revocation(self) -> int:
        (row,) = await self._read("SELECT COALESCE(MAX(id), 0) FROM revocations")
        return int(row[0])

    async def overrides(self) -> dict[tuple[str, str], Decimal]:
        return queries.sq.overrides(await self._read(queries.SELECT_OVERRIDES))

    async def totals(self) -> list[Spent]:
        return queries.sq.totals(await self._read(queries.SELECT_TOTALS))

    async def spent_since(self, since: str) -> dict[str, Decimal]:
        return queries.sq.per_agent(await self._read(queries.SELECT_SPENT_SINCE, since))

    async def approvals_by_id(self, ids: list[str]) -> list[Approval]:
        if not ids:
            return []
        return [queries.sq.approval(r) for r in await self._read(queries.SELECT_APPROVALS + " WHERE id = ANY(%s)", ids)]

    async def active_grants(self) -> list[GrantRecord]:
        return [
            queries.sq.grant(r) for r in await self._read(queries.SELECT_GRANTS + " WHERE revoked IS NULL ORDER BY id")
        ]

    async def active_freezes(self) -> list[Freeze]:
        return [
            queries.sq.freeze(r) for r in await self._read(queries.SELECT_FREEZES + " WHERE lifted IS NULL ORDER BY id")
        ]

    async def grants_by_id(self, ids: list[int]) -> list[GrantRecord]:
        if not ids:
            return []
        return [queries.sq.grant(r) for r in await self._read(queries.SELECT_GRANTS + " WHERE id = ANY(%s)", ids)]

    async def freezes_by_id(self, ids: list[int]) -> list[Freeze]:
        if not ids:
            return []
        return [queries.sq.freeze(r) for r in await self._read(queries.SELECT_FREEZES + " WHERE id = ANY(%s)", ids)]
