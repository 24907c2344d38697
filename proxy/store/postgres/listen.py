"""The replica's ear on the store: one dedicated connection that `LISTEN`s on `egress_guard`.

A trigger on `revocations` (and on `budgets`) in migration 0008_fleet sends
`pg_notify('egress_guard', '<table>:<id>')` when a write commits; `Listener` hands each
payload to its callbacks at once (the KillSwitch wakes and polls then, instead of at its
next tick). The payload is a hint, never the data: the poll reads what changed, and polling
stays the backstop for a notification lost with a connection.

The listener also says whether it can be trusted: `connected` while its connection is up
and answers a heartbeat (a `SELECT 1` every `heartbeat` seconds, bounded by `timeout`) —
a server that stops answering (SIGSTOP, a dead host, a cut network) is noticed within
`heartbeat + timeout`, not at a TCP timeout. Down, it reconnects every `retry` seconds,
and calls its callbacks once on reconnecting (whatever was missed meanwhile is read by the
poll they wake).

Every wait on the server is bounded by `bounded()`: `asyncio.wait_for` around a psycopg call
is not (cancelling it makes psycopg send a server-side cancel and wait up to 10 s more for
a server that does not answer); `bounded` closes the connection under the call instead.
Messages name the store (`Listener.name`, never a password).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

log = logging.getLogger("egress_guard")

CHANNEL = "egress_guard"


async def bounded[T](conn: psycopg.AsyncConnection[Any], call: Awaitable[T], timeout: float) -> T:
    """`call` (an operation on `conn`), or TimeoutError after `timeout` seconds — then `conn`
    is closed (its state is unknown) and the call abandoned at once."""
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        conn.pgconn.finish()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    if not done:
        conn.pgconn.finish()  # nothing left to cancel server-side: the task ends at once
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise TimeoutError(f"no answer within {timeout:g} s")
    return task.result()


def listener_conninfo(conninfo: str, timeout: float, application_name: str) -> str:
    """`conninfo` with a connect timeout and TCP keepalives (a dead peer is noticed)."""
    return make_conninfo(
        conninfo,
        connect_timeout=max(2, int(timeout + 0.999)),  # libpq's minimum is 2 s
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=2,
        application_name=application_name,
    )


class Listener:
    """`LISTEN egress_guard` on a connection of its own, reconnecting while the proxy runs."""

    @classmethod
    def for_store(cls, settings: Any) -> Listener:
        """The listener of a `store:` config (config.fleet.StoreSettings)."""
        return cls(
            settings.conninfo,
            settings.name,
            settings.timeout,
            application_name=f"egress-guard listener {settings.replica}"[:63],
        )

    def __init__(
        self,
        conninfo: Callable[[], str],
        name: str,
        timeout: float = 2.0,
        *,
        heartbeat: float = 1.0,
        retry: float = 0.5,
        application_name: str = "egress-guard listener",
    ) -> None:
        self.conninfo = conninfo  # called at each connect: a password file is re-read
        self.name = name  # the store, as messages name it
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.retry = retry
        self.application_name = application_name
        self.on_notify: list[Callable[[str], None]] = []
        self.connected = False
        self.since = time.monotonic()  # when `connected` last changed
        self.error: str | None = "not connected yet"
        self.notifications = 0
        self._task: asyncio.Task[None] | None = None

    def down_for(self) -> float:
        """Seconds since the listener was last connected (0 while it is)."""
        return 0.0 if self.connected else time.monotonic() - self.since

    @property
    def reason(self) -> str:
        """Why the listener is down, naming the store (never a password)."""
        return f"store {self.name}: listener down for {self.down_for():.1f} s ({self.error})"

    async def start(self, wait: float | None = None) -> None:
        """Start listening in the background; with `wait`, wait up to that long to be connected."""
        self.since = time.monotonic()  # down (not yet connected) from now, not from construction
        self._task = asyncio.create_task(self._run(), name="egress-guard store listener")
        if wait:
            deadline = time.monotonic() + wait
            while not self.connected and time.monotonic() < deadline and not self._task.done():
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _set(self, connected: bool, error: str | None = None) -> None:
        if connected != self.connected:
            self.since = time.monotonic()
        self.connected = connected
        self.error = error

    def _fire(self, payload: str) -> None:
        for callback in self.on_notify:
            try:
                callback(payload)
            except Exception:
                log.exception("a store notification's callback failed")

    async def _run(self) -> None:
        failing = False
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                info = listener_conninfo(self.conninfo(), self.timeout, self.application_name)
                # connect_timeout bounds the connect; wait_for only adds a margin (a connect
                # has no server-side query to cancel)
                connecting = psycopg.AsyncConnection.connect(info, autocommit=True)
                conn = live = await asyncio.wait_for(connecting, self.timeout + 3)
                await bounded(live, live.execute(f"LISTEN {CHANNEL}"), self.timeout)
                self._set(True)
                if failing:
                    log.warning("store %s: listener connected again", self.name)
                failing = False
                self._fire("")  # catch up: whatever was written while it was down
                await self._listen(live)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self._set(False, why)
                if not failing:
                    log.error("store %s: listener down (%s); reconnecting every %g s", self.name, why, self.retry)
                failing = True
            finally:
                self._set(False, self.error or "stopped")
                if conn is not None:
                    conn.pgconn.finish()  # never waits on the server
            await asyncio.sleep(self.retry)

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            async for note in conn.notifies(timeout=self.heartbeat):
                self.notifications += 1
                self._fire(note.payload)
            await bounded(conn, conn.execute("SELECT 1"), self.timeout)  # still there?
