"""Attribution: which agent a refused request came from, so `audit --agent A` shows A's refusals.

A refusal often comes before (or instead of) the credential swap that names the agent: a
wrong host, a forbidden path, a key sent where it does not belong, a request mitmproxy's
parser refused. Such a request still names its agent when it carries a genuine egress-guard
key anywhere in its headers, URL or (buffered) body — identified by its HMAC, never swapped —
and a connection that once presented a key keeps naming that agent. A connection from an
isolated sandbox (`run --isolate`) is pinned to the sandbox's agent: it names that agent
whatever keys it carries. Used for refusal rows only: allowed requests are named by the
credential guard (or the sandbox), and the hot path pays nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy import http

from egress_guard.credentials import FakeKeyScanner, Service
from egress_guard.keycache import KeyCache

BODY_LIMIT = 1 << 20  # a body larger than this is not searched (the headers usually name the agent)

Who = tuple[str, str | None]  # (agent, session)


class Attribution:
    def __init__(self, hmac_key: bytes, services: Iterable[Service], keys: KeyCache) -> None:
        self.scanner = FakeKeyScanner(hmac_key, services)
        self.keys = keys
        self.by_client: dict[str, Who] = {}  # client connection id -> the agent it last presented
        self.pinned: dict[str, Who] = {}  # client connection id -> its sandbox's agent (addons/sandboxes.py)

    def pin(self, client_id: str, who: Who) -> None:
        self.pinned[client_id] = who

    def unpin(self, client_id: str) -> None:
        self.pinned.pop(client_id, None)

    def remember(self, client_id: str, agent: str, session: str | None) -> None:
        self.by_client[client_id] = (agent, session)

    def forget(self, client_id: str) -> None:
        self.by_client.pop(client_id, None)
        self.pinned.pop(client_id, None)

    def known(self, client_id: str) -> Who | None:
        return self.pinned.get(client_id) or self.by_client.get(client_id)

    async def identify(self, request: http.Request | None, client_id: str) -> Who | None:
        """The sandbox's agent for a connection from one; else the agent of the first genuine
        egress-guard key in `request`, else the one the client connection presented before,
        else None."""
        pinned = self.pinned.get(client_id)
        if pinned is not None:
            return pinned
        if request is not None and self.scanner.max_len:
            places = [value for _, value in request.headers.fields]
            places.append(request.path.encode("latin-1", "replace"))
            body = request.raw_content
            if body and len(body) <= BODY_LIMIT:
                places.append(body)
            for data in places:
                for _service, key_id in self.scanner.scan(data):
                    try:
                        record = await self.keys.lookup(key_id)
                    except Exception:  # the key table is unreadable: fall back to what is known
                        record = None
                    if record is not None:
                        return record.agent, record.session
        return self.known(client_id)
