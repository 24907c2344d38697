"""KillSwitch: follows the revocations table and cuts the connections of revoked keys.

`egress-guard kill --agent A` (or `--session S`, or `keys revoke`) writes a revocation row;
within one poll interval this addon marks the keys revoked in the proxy's cache — the next
request is refused — and aborts every agent connection that used them, open streams
included (mitmproxy cannot kill a flow in transit, so the transport itself is aborted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from egress_guard.keycache import KeyCache

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


class KillSwitch:
    def __init__(self, keys: KeyCache, clients: dict[str, set[str]], proxyserver: Any, interval: float = 0.25) -> None:
        self.keys = keys
        self.clients = clients  # key id -> client connection ids (kept by CredentialGuard)
        self.proxyserver = proxyserver
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="egress-guard kill switch")

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                revoked = await self.keys.poll()
            except Exception as exc:
                if not failing:
                    log.error("kill switch cannot read revocations: %r", exc)
                failing = True
                continue
            failing = False
            for key_id in revoked:
                cut = [c for c in self.clients.pop(key_id, set()) if cut_client(self.proxyserver, c)]
                log.warning("key %s revoked: refusing its requests; cut %d open connection(s)", key_id, len(cut))
