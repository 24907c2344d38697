"""KillSwitch: follows the revocations table and cuts the connections of revoked keys.

`egress-guard kill --agent A` (or `--session S`, or `keys revoke`) writes a revocation row;
within one poll interval this addon marks the keys revoked in the proxy's cache — the next
request is refused — and aborts every agent connection that used them, open streams
included (mitmproxy cannot kill a flow in transit, so the transport itself is aborted).
A revocation of an agent or a session also kills that agent's (or session's) isolated
sandboxes (`run --isolate`): their PID 1 gets SIGKILL, from the host, no cooperation asked,
and the audit log records it (addons/sandboxes.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from egress_guard.addons._background import Poller
from egress_guard.keycache import KeyCache

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

    async def poll(self) -> None:
        if self.sandboxes is not None:  # first: a sandbox's processes die within one interval
            await self._kill_sandboxes(self.sandboxes)
        for key_id in await self.keys.poll():
            cut = [c for c in self.clients.pop(key_id, set()) if cut_client(self.proxyserver, c)]
            log.warning("key %s revoked: refusing its requests; cut %d open connection(s)", key_id, len(cut))

    async def _kill_sandboxes(self, sandboxes: Sandboxes) -> None:
        if not sandboxes.by_tun:
            return  # nothing to kill; older revocations are skipped by their time later
        revocations = await self.keys.store.revocations(self._after)
        for rev in revocations:
            self._after = rev.id
            if rev.agent is not None or rev.session is not None:
                sandboxes.kill_matching(rev.agent, rev.session, rev.ts, rev.reason)
