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
import logging
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from egress_guard.fakekeys import KeyRecord
from egress_guard.store.interface import Batch
from egress_guard.store.postgres import queries, schema, writes
from egress_guard.store.records import INTENT_COLUMNS, Revocation, Spent, StoreError

log = logging.getLogger("egress_guard.audit")
T = TypeVar("T")


class _Broken(StoreError):
    """A call failed on its connection (not for want of time): a read may be retried."""


class PGEngine:
    POOL_MIN = 2
    POOL_MAX = 8

    def __init__(self, settings: Any) -> None:
        self.target = schema.Target(settings)
        self.name = self.target.name
        self.timeout = self.target.timeout
        self.replica = self.chain = self.target.replica
        self.conninfo = self.target.conninfo  # for a dedicated connection (LISTEN); holds the password
        self.head: tuple[int, str] = (0, "")  # this replica's chain head (seq, hash), read at open
        self._pool: AsyncConnectionPool | None = None
        self._orphans: set[asyncio.Task[Any]] = set()  # calls past their deadline, finishing in the background
        self._failed = False  # the last commit failed: the next may be a retry of a batch that did commit

    def __repr__(self) -> str:
        return f"PGEngine({self.name!r}, replica={self.replica!r})"

    # --- calls with a deadline -----------------------------------------------------------------

    async def run(
        self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], *, timeout: float | None = None
    ) -> T:
        """`await fn(conn)` on a pooled connection (autocommit) within the store's timeout;
        raises StoreError naming the store (never the password) if it fails or is late."""
        task = asyncio.ensure_future(self._on_connection(fn))
        try:
            done, _ = await asyncio.wait([task], timeout=self.timeout if timeout is None else timeout)
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if not done:
            self._abandon(task)
            raise self.target.error(TimeoutError())
        return task.result()

    async def _on_connection(self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        if self._pool is None:
            raise StoreError(f"store {self.name} is not open")
        try:
            async with self._pool.connection(timeout=self.timeout) as conn:
                return await fn(conn)
        except PoolTimeout as exc:
            raise self.target.error(exc) from None
        except psycopg.OperationalError as exc:  # e.g. a pooled connection the server closed
            raise _Broken(str(self.target.error(exc))) from None
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise self.target.error(exc) from None

    def _abandon(self, task: asyncio.Task[Any]) -> None:
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
            return await self.run(fetch)
        except _Broken:
            # a pooled connection the server closed (a restart) fails once: a read is safe to retry
            return await self.run(fetch)

    # --- opening and closing ---------------------------------------------------------------

    async def open(self) -> int:
        await asyncio.to_thread(self._migrate)
        self._pool = AsyncConnectionPool(
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
        """Read this replica's chain head; settle its own calls a previous run left unfinished."""
        async with conn.cursor() as cur:
            await cur.execute(
                "SELECT chain_seq, hash FROM audit WHERE chain = %s ORDER BY chain_seq DESC LIMIT 1", (self.chain,)
            )
            row = await cur.fetchone()
            self.head = (int(row[0]), str(row[1])) if row else (0, "")
            await cur.execute(
                f"SELECT {', '.join(INTENT_COLUMNS)} FROM spend_intents WHERE replica = %s ORDER BY ts",  # noqa: S608
                (self.replica,),
            )
            found = await cur.fetchall()
        if not found:
            return 0
        batch = Batch()
        batch.rows, batch.settles = writes.settled_rows(found)
        self.prepare(batch)
        async with conn.transaction(), conn.cursor() as cur:
            await writes.apply(cur, writes.bind(batch, self.replica))
        self.advance(batch)
        return len(found)

    def prepare(self, batch: Batch) -> None:
        """Give rows the engine writes itself their chain columns (the writer does its own)."""

    def advance(self, batch: Batch) -> None:
        """After a commit of rows `prepare` chained: the head moves."""

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
        return asyncio.ensure_future(self._commit(writes.bind(batch, self.replica)))

    async def _commit(self, bound: writes.Bound) -> None:
        async def transact(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                await writes.apply(cur, bound)

        try:
            await self.run(transact)
        except StoreError:
            self._failed = True
            raise
        self._failed = False

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
