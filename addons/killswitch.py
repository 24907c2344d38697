"""KillSwitch: follows the revocations table and cuts the connections of revoked keys.

`egress-guard kill --agent A` (or `--session S`, or `keys revoke`) writes a revocation row;
within one poll interval this addon marks the keys revoked in the proxy's cache — the next
request is refused — and aborts every agent connection that used them, open streams
included (mitmproxy cannot kill a flow in transit, so the transport itself is aborted).
A revocation of an agent or a session also kills that agent's (or session's) isolated
sandboxes (`run --isolate`): their PID 1 gets SIGKILL, from the host, no cooperation asked,
and the audit log records it (addons/sandboxes.py).

On a store shared by replicas (PostgreSQL) the kill switch also runs the store's listener
(`KeyCache.listener`): a NOTIFY from the revocations trigger wakes the poll at once, so a
kill written on any host reaches every replica in milliseconds; the poll every `interval`
stays the backstop. `last_lag` is how late the newest revocation was applied here (from its
`ts`, the CLI's clock), for the metrics. While the replica cannot confirm its revocations
are current (`KeyCache.stale`), it also cuts every open connection that uses a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from egress_guard.addons._background import Poller
from egress_guard.keycache import KeyCache
from egress_guard.timeutil import parse_iso, utcnow

if TYPE_CHECKING:
    from egress_guard.addons.sandboxes import Sandboxes

log = logging.getLogger("egress_guard")


def cut_client(proxyserver: Any, client_id: str) -> bool:
    """Abort an agent's connection and the upstream connections it holds. True if it was open."""
    handler = proxyserver.connections.get(client_id)
    if handler is None:
        return False
    for io in list(handler.transports.values()):
        transport = getattr(io.writer, "transport", None)
        if transport is not None:
            transport.abort()
        elif io.handler is not None:
            io.handler.cancel()
    return True


def cut_server(proxyserver: Any, client_id: str, server: Any) -> bool:
    """Abort one upstream connection of an agent's connection. True if it was open."""
    handler = proxyserver.connections.get(client_id)
    io = handler.transports.get(server) if handler is not None else None
    transport = getattr(io.writer, "transport", None) if io is not None else None
    if transport is None:
        return False
    transport.abort()
    return True


class KillSwitch(Poller):
    name = "kill switch"

    def __init__(
        self,
        keys: KeyCache,
        clients: dict[str, set[str]],
        proxyserver: Any,
        interval: float = 0.25,
        sandboxes: Sandboxes | None = None,
    ) -> None:
        super().__init__(interval)
        self.keys = keys
        self.clients = clients  # key id -> client connection ids (kept by CredentialGuard)
        self.proxyserver = proxyserver
        self.sandboxes = sandboxes
        # The last revocation the sandboxes followed: from the first (once), since a sandbox is
        # killed only by a revocation written after it opened (Sandboxes.kill_matching).
        self._after = 0
        self.last_lag: float | None = None  # seconds from the newest revocation's ts to its application here
        self.applied = 0  # revocations applied since start
        self.on_lag: list[Callable[[float], None]] = []  # called with each applied revocation's lag (metrics)
        self._wake = asyncio.Event()
        self._listening: asyncio.Task[None] | None = None

    @property
    def current(self) -> bool:
        """Revocations are known current here (always, on the embedded store)."""
        return self.keys.stale() is None

    def wake(self, payload: str = "") -> None:
        """Poll now (a store notification: something was revoked, or the listener reconnected)."""
        self._wake.set()

    def running(self) -> None:
        listener = self.keys.listener
        if listener is not None:
            listener.on_notify.append(self.wake)
            self._listening = asyncio.create_task(listener.start(), name="egress-guard store listener start")
        super().running()

    async def done(self) -> None:
        await super().done()
        listener = self.keys.listener
        if listener is not None:
            await listener.close()

    async def _loop(self) -> None:
        failing = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.poll()
            except Exception as exc:
                if not failing:
                    log.error("%s failed: %r (retrying)", self.name, exc)
                failing = True
                self._cut_if_deaf()
                await asyncio.sleep(self.interval)  # a wake-up storm never turns into a busy loop
                continue
            self._cut_if_deaf()
            if failing:
                log.warning("%s works again", self.name)
            failing = False

    def _cut_if_deaf(self) -> None:
        """While revocations cannot be confirmed current (a shared store out of reach), no key
        keeps a connection open: new requests are refused 503 (CredentialGuard), and open
        streams and WebSockets are cut, as a revocation this replica cannot hear would."""
        if not self.clients:
            return
        stale = self.keys.stale()
        if stale is None:
            return
        cut = [c for ids in self.clients.values() for c in ids if cut_client(self.proxyserver, c)]
        self.clients.clear()
        if cut:
            log.warning("%s: cut %d open connection(s) that use keys", stale, len(cut))

    async def poll(self) -> None:
        if self.sandboxes is not None:  # first: a sandbox's processes die within one interval
            await self._kill_sandboxes(self.sandboxes)
        for key_id in await self.keys.poll():
            cut = [c for c in self.clients.pop(key_id, set()) if cut_client(self.proxyserver, c)]
            log.warning("key %s revoked: refusing its requests; cut %d open connection(s)", key_id, len(cut))
        now = utcnow()
        for rev in self.keys.fresh:  # each revocation this poll applied: how late, for the metrics
            self.applied += 1
            try:
                lag = max(0.0, (now - parse_iso(rev.ts)).total_seconds())
            except ValueError:
                continue
            self.last_lag = lag
            log.info("revocation %d applied %.3f s after it was written", rev.id, lag)
            for callback in self.on_lag:
                callback(lag)

    async def _kill_sandboxes(self, sandboxes: Sandboxes) -> None:
        if not sandboxes.by_tun:
            return  # nothing to kill; older revocations are skipped by their time later
        revocations = await self.keys.store.revocations(self._after)
        for rev in revocations:
            self._after = rev.id
            if rev.agent is not None or rev.session is not None:
                sandboxes.kill_matching(rev.agent, rev.session, rev.ts, rev.reason)
