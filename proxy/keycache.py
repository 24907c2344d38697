"""The proxy's view of the fake-key table: key records by id, cached, and the revocations
the CLI writes (`egress-guard kill`, `keys revoke`), followed by polling.

Reads only (its own read-only connection); the CLI is the writer. A key minted while the
proxy runs is found on first use; a revocation reaches the cache within one poll interval.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import aiosqlite

from egress_guard.fakekeys import SELECT_KEYS, KeyRecord


class KeyCache:
    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._db: aiosqlite.Connection | None = None
        self._records: dict[str, KeyRecord] = {}
        self._last_revocation = 0

    async def open(self) -> None:
        self._db = await aiosqlite.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=2.0)
        async with self._db.execute("SELECT COALESCE(MAX(id), 0) FROM revocations") as cur:
            row = await cur.fetchone()
            self._last_revocation = row[0] if row else 0

    async def lookup(self, key_id: str) -> KeyRecord | None:
        record = self._records.get(key_id)
        if record is not None:
            return record
        assert self._db is not None
        async with self._db.execute(SELECT_KEYS + " WHERE key_id = ?", (key_id,)) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        record = KeyRecord.from_row(row)
        if len(self._records) > 100_000:
            self._records.clear()
        self._records[key_id] = record
        return record

    async def poll(self) -> set[str]:
        """Apply new revocations to the cache; return the ids of cached keys they revoked."""
        assert self._db is not None
        async with self._db.execute(
            "SELECT id, ts, agent, session, key_id, reason FROM revocations WHERE id > ? ORDER BY id",
            (self._last_revocation,),
        ) as cur:
            rows = list(await cur.fetchall())
        hit: set[str] = set()
        for rid, ts, agent, session, key_id, reason in rows:
            self._last_revocation = rid
            for kid, rec in list(self._records.items()):
                if (agent and rec.agent == agent) or (session and rec.session == session) or kid == key_id:
                    if rec.revoked_at is None:
                        self._records[kid] = dataclasses.replace(rec, revoked_at=ts, revoked_reason=reason)
                    hit.add(kid)
        return hit

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
