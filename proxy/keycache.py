"""The proxy's view of the fake keys: key records by id, cached, and the revocations the
CLI writes (`egress-guard kill`, `keys revoke`), followed by polling.

Reads only, through the store's engine; the CLI is the writer. A key minted while the
proxy runs is found on first use; a revocation reaches the cache within one poll interval
(on PostgreSQL sooner: a NOTIFY wakes the poll, addons/killswitch.py).

Currency (a store shared by replicas): revocations written by another host reach this
replica only through the store, so the cache is trusted only while the replica can confirm
it is current — its listener (`store.postgres.listen.Listener`) connected, or down for less
than `CURRENT_WITHIN` seconds, and its last successful revocations poll less than
`CURRENT_WITHIN` seconds old. `stale()` says why not; a key is then refused 503, never
served from a possibly stale cache. The embedded SQLite store has no listener and no such
gate (one proxy, one file).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Protocol

from egress_guard.fakekeys import KeyRecord
from egress_guard.store import Engine, Revocation

CURRENT_WITHIN = 3.0  # seconds
FAIL_FAST = 1.0  # seconds after a failed key lookup during which the next fail at once


class Hearing(Protocol):
    """What the cache needs of a store listener (store.postgres.listen.Listener)."""

    name: str
    on_notify: list[Callable[[str], None]]

    def down_for(self) -> float: ...

    @property
    def reason(self) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class KeyCache:
    def __init__(self, store: Engine, listener: Hearing | None = None, current_within: float = CURRENT_WITHIN) -> None:
        self.store = store
        self.listener = listener  # a shared store's listener: the currency gate applies
        self.current_within = current_within
        self.polled: float | None = None  # monotonic start of the last successful poll
        self.poll_error: str | None = None  # why the last poll failed (None: it succeeded)
        self.fresh: list[Revocation] = []  # the revocations the last poll applied, oldest first
        self._records: dict[str, KeyRecord] = {}
        self._lookup_failed: tuple[float, Exception] | None = None  # (when, what) of the last failed lookup
        self._last_revocation = 0

    async def open(self) -> None:
        """Follow revocations from now on (the store is open)."""
        started = time.monotonic()
        self._last_revocation = await self.store.last_revocation()
        self.polled = started

    def stale(self) -> str | None:
        """None while revocations are known current; else why they cannot be confirmed
        (naming the store). Always None without a listener (the embedded store)."""
        if self.listener is None:
            return None
        within = self.current_within
        if self.listener.down_for() > within:
            return f"cannot confirm revocations are current: {self.listener.reason}"
        age = time.monotonic() - self.polled if self.polled is not None else None
        if age is None or age > within:
            last = "never" if age is None else f"{age:.1f} s ago"
            why = f" ({self.poll_error})" if self.poll_error else ""
            return (
                f"cannot confirm revocations are current: store {self.listener.name}: "
                f"last successful revocations poll {last}{why}"
            )
        return None

    async def lookup(self, key_id: str) -> KeyRecord | None:
        """The key's record (cached), None if the store has none; raises if the store cannot
        be read — at once, for `FAIL_FAST` seconds after a lookup failed: one request's
        refusal (and the audit row's attribution of it) waits for one store timeout, not one
        per lookup."""
        record = self._records.get(key_id)
        if record is not None:
            return record
        failed = self._lookup_failed
        if failed is not None and time.monotonic() - failed[0] < FAIL_FAST:
            raise failed[1]
        try:
            # A poll that applies a revocation while the record is being read cannot mark it
            # (it is not cached yet): read again until no poll applied any meanwhile — the
            # CLI commits a revocation and its keys' revoked_at together.
            for _ in range(3):
                seen = self._last_revocation
                record = await self.store.key(key_id)
                if self._last_revocation == seen:
                    break
            else:
                return record  # revocations keep arriving: use this read, cache none
        except Exception as exc:
            self._lookup_failed = (time.monotonic(), exc)
            raise
        self._lookup_failed = None
        if record is None:
            return None
        if len(self._records) > 100_000:
            self._records.clear()
        self._records[key_id] = record
        return record

    async def poll(self) -> set[str]:
        """Apply new revocations to the cache; return the ids of cached keys they revoked."""
        started = time.monotonic()
        try:
            revocations = await self.store.revocations(self._last_revocation)
        except Exception as exc:
            self.poll_error = str(exc) or type(exc).__name__
            raise
        self.polled, self.poll_error = started, None
        hit: set[str] = set()
        self.fresh = revocations
        for rev in revocations:
            self._last_revocation = rev.id
            for kid, rec in list(self._records.items()):
                if rev.covers(rec.agent, rec.session, kid):
                    if rec.revoked_at is None:
                        self._records[kid] = dataclasses.replace(rec, revoked_at=rev.ts, revoked_reason=rev.reason)
                    hit.add(kid)
        return hit
