"""The proxy's view of the fake keys: key records by id, cached, and the revocations the
CLI writes (`egress-guard kill`, `keys revoke`), followed by polling.

Reads only, through the store's engine; the CLI is the writer. A key minted while the
proxy runs is found on first use; a revocation reaches the cache within one poll interval.
"""

from __future__ import annotations

import dataclasses

from egress_guard.fakekeys import KeyRecord
from egress_guard.store import Engine


class KeyCache:
    def __init__(self, store: Engine) -> None:
        self.store = store
        self._records: dict[str, KeyRecord] = {}
        self._last_revocation = 0

    async def open(self) -> None:
        """Follow revocations from now on (the store is open)."""
        self._last_revocation = await self.store.last_revocation()

    async def lookup(self, key_id: str) -> KeyRecord | None:
        record = self._records.get(key_id)
        if record is not None:
            return record
        record = await self.store.key(key_id)
        if record is None:
            return None
        if len(self._records) > 100_000:
            self._records.clear()
        self._records[key_id] = record
        return record

    async def poll(self) -> set[str]:
        """Apply new revocations to the cache; return the ids of cached keys they revoked."""
        hit: set[str] = set()
        for rev in await self.store.revocations(self._last_revocation):
            self._last_revocation = rev.id
            for kid, rec in list(self._records.items()):
                if (
                    (rev.agent and rec.agent == rev.agent)
                    or (rev.session and rec.session == rev.session)
                    or (kid == rev.key_id)
                ):
                    if rec.revoked_at is None:
                        self._records[kid] = dataclasses.replace(rec, revoked_at=rev.ts, revoked_reason=rev.reason)
                    hit.add(kid)
        return hit
