"""SharedLedger: the ledger of one replica in a fleet whose budgets and rate limits live in
PostgreSQL (`store:`), shared by every replica.

A call is admitted by one atomic statement in the store (`fleet.py`, `eg_admit`): rate limits,
calls in flight and the three budgets are checked and the reservation and the call's intent
committed together, before the call is forwarded. The call's audit row settles it, in the
row's transaction (`fleet.settle`). So N replicas enforce one budget, not N, and overshoot it
by at most one reservation, as one process does. An agent with no limit making a call that
costs nothing never touches the store.

If the store cannot answer within its timeout, the call is refused (503, naming the store):
there is never a per-replica fallback. What this replica knows locally — `spent`/`reserved`, a
snapshot of the shared rows refreshed by BudgetFollower (`tick`) — only serves the mid-stream
overrun check, `budget show`-like reads and closing a Realtime connection whose
server-started responses spent the budget (calls an agent starts, HTTP or WebSocket, are
admitted by `reserve`, in the store).

Each replica heartbeats (1 s); one unseen for 30 s is gone: another takes over its unfinished
calls and records them at their reservation through its own writer (`reap`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from decimal import Decimal
from typing import Any

from egress_guard.ledger import (
    SCOPES,
    Hold,
    Ledger,
    Refusal,
    concurrency_refusal,
    rpm_refusal,
    tpm_refusal,
)
from egress_guard.spend import Limits, SpendSettings
from egress_guard.store import AuditLog, Intent, StoreError
from egress_guard.store.postgres.fleet import STALE_SECONDS
from egress_guard.store.records import INTENT_COLUMNS, settled_row
from egress_guard.timeutil import iso

log = logging.getLogger("egress_guard")

ADMIT = "SELECT * FROM eg_admit(%s, %s, %s, %s, %s, %s::numeric[], %s, %s, %s, %s, %s, %s::jsonb)"
HEARTBEAT = (
    "INSERT INTO replicas (id, seen_at, timezone) VALUES (%s, clock_timestamp(), %s) "
    "ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at, timezone = excluded.timezone"
)
CLAIM = f"SELECT {', '.join(INTENT_COLUMNS)} FROM eg_claim(%s, make_interval(secs => %s), %s)"  # noqa: S608
SNAPSHOT = (
    "SELECT scope, key, spent, reserved FROM budget_usage "
    "WHERE %s::timestamptz IS NULL OR updated_at >= %s::timestamptz - interval '5 seconds'"
)
RELEASE = "SELECT eg_settle(%s::jsonb)"


UNSURE_MAX = 100_000  # admissions with a lost answer tracked for release
UNSURE_REPEAT = 10.0  # seconds a release is repeated after it first succeeded


class SharedLedger(Ledger):
    HEARTBEAT_EVERY = 1.0
    REAP_EVERY = 5.0

    def __init__(self, settings: SpendSettings, engine: Any) -> None:
        super().__init__(settings)
        self.engine = engine  # PGEngine: run(fn) within the store's timeout, replica
        self.replica: str = engine.replica
        self.audit: AuditLog | None = None
        self.reaped = 0  # calls of gone replicas this one recorded at their reservation
        self._beat = 0.0
        self._reap = 0.0
        self._since: Any = None  # the store's time of the last snapshot
        # admissions whose answer was lost (the store may have committed them when it came back):
        # request id -> None, or once a release of it has succeeded, until when to repeat it
        self._unsure: dict[str, float | None] = {}
        # since when this replica's heartbeats have succeeded without a gap (None: never yet);
        # it takes over other replicas' calls only after STALE_SECONDS of that (see `reap`)
        self._beating_since: float | None = None

    # --- the hot path --------------------------------------------------------------------------

    def limited(self, limits: Limits, agent: str, session: str) -> bool:
        """Whether the agent has any rate limit or budget (else a free call skips the store)."""
        return (
            limits.requests_per_minute is not None
            or limits.tokens_per_minute is not None
            or limits.concurrent is not None
            or any(self.limit(limits, agent, scope, session) is not None for scope in SCOPES)
        )

    async def reserve(
        self, limits: Limits, agent: str, session: str, usd: Decimal, tokens: int, intent: Intent
    ) -> Hold:
        """Check every rate limit and budget across the fleet for one more call and reserve, or
        raise Refusal (429, or 503 if the store cannot answer). The call's intent (`intent`:
        its request id, what and where) is committed with the reservation; its row settles it."""
        day = self.day()
        if not usd and not self.limited(limits, agent, session):
            return Hold(agent, session, day, usd, tokens)  # nothing to share: never waits on the store
        caps = [self.limit(limits, agent, scope, session) for scope in SCOPES]
        record = dataclasses.asdict(intent) | {
            "agent": agent,
            "session": session,
            "day": day,
            "reserved_usd": f"{usd:f}",
        }
        args = (
            self.replica,
            agent,
            session,
            day,
            iso(self.day_start()),
            [None if c is None else str(c) for c in caps],
            usd,
            tokens,
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.concurrent,
            json.dumps(record),
        )

        async def admit(conn: Any) -> tuple[Any, ...]:
            cur = await conn.execute(ADMIT, args)
            return tuple(await cur.fetchone())

        try:
            refused, limit, used, held, wait = await self.engine.run(admit)
        except (StoreError, OSError) as exc:
            # it may have been admitted after all: released by `tick` once the store answers
            if len(self._unsure) < UNSURE_MAX:
                self._unsure[intent.request_id] = None
            else:  # bounded: a store down for ever must not grow this; reaped if the replica stops
                log.warning("store %s: too many unconfirmed admissions to track; not releasing", self.engine.name)
            raise Refusal(f"budgets and rate limits cannot be checked: {exc}", 1, status=503) from None
        if refused is None:
            for _, key in self.keys(agent, session, day):
                self.reserved.add(key, usd)
            return Hold(agent, session, day, usd, tokens, shared=True)
        if refused == "rpm":
            raise rpm_refusal(int(limit), agent, float(wait))
        if refused == "tpm":
            raise tpm_refusal(int(limit), agent, float(used), tokens, float(wait))
        if refused == "concurrent":
            raise concurrency_refusal(int(limit), agent)
        raise self.budget_refusal(refused, Decimal(limit), agent, Decimal(used), Decimal(held), usd)

    def settle(self, hold: Hold, usd: Decimal, tokens: int | None) -> None:
        """Local only: the call's row settles it in the store. Until the next snapshot this
        replica counts it as settled."""
        if not hold.shared:
            super().settle(hold, usd, tokens)
            return
        if hold.settled:
            return
        hold.settled = True
        for _, key in self.keys(hold.agent, hold.session, hold.day):
            self.reserved.add(key, -hold.usd)
            self.spent.add(key, usd)

    # --- upkeep ------------------------------------------------------------------------------

    async def open(self, audit: AuditLog) -> None:
        """Before the first call: announce this replica, take over the calls a previous run of
        it (or a gone replica) left unfinished, read the shared budgets."""
        self.audit = audit
        await self._heartbeat()
        await self.reap(own=True)
        await self.refresh()

    async def tick(self) -> None:
        """BudgetFollower's poll: heartbeat, take over gone replicas' calls, refresh."""
        now = time.monotonic()
        if now - self._beat >= self.HEARTBEAT_EVERY - 0.05:
            await self._heartbeat()
        beating = self._beating_since is not None and now - self._beating_since >= STALE_SECONDS
        if now - self._reap >= self.REAP_EVERY and beating:
            await self.reap()
        if self._unsure:
            await self._release_unsure()
        await self.refresh()

    async def _heartbeat(self) -> None:
        async def beat(conn: Any) -> None:
            await conn.execute(HEARTBEAT, (self.replica, self.settings.timezone))

        await self.engine.run(beat)
        now = time.monotonic()
        gap = now - self._beat  # since the last heartbeat that succeeded
        if self._beating_since is None or gap > 3 * self.HEARTBEAT_EVERY + self.engine.timeout:
            # the first, or after an outage (of the store, or of this replica: frozen): the other
            # replicas' heartbeats are as stale as ours were; give them time to come back
            self._beating_since = now
        self._beat = now

    async def reap(self, *, own: bool = False) -> int:
        """Take over the unfinished calls of replicas unseen for STALE_SECONDS (or, `own`, only
        this one's own, left by its previous run: at open); record each at its reservation
        through this replica's writer: the row settles the call's intent like any row."""
        self._reap = time.monotonic()

        # At open, only its own: after an outage of the store every heartbeat is stale, and
        # the others' calls may well be alive (tick reaps them once this one has beaten
        # without a gap for STALE_SECONDS: so could they).
        stale = 10**9 if own else STALE_SECONDS

        async def claim(conn: Any) -> list[tuple[Any, ...]]:
            cur = await conn.execute(CLAIM, (self.replica, stale, own))
            return list(await cur.fetchall())

        found = await self.engine.run(claim)
        if not found:
            return 0
        if self.audit is None:
            raise RuntimeError("SharedLedger.reap before open")
        for values in found:
            i = Intent(**dict(zip(INTENT_COLUMNS, values, strict=True)))
            self.audit.track_intent(i.request_id)
            self.audit.record(settled_row(i))
        self.reaped += len(found)
        log.warning(
            "store %s: %d metered calls of stopped replicas were unfinished; billed at their reservation",
            self.engine.name,
            len(found),
        )
        return len(found)

    async def _release_unsure(self) -> None:
        """Release the admissions whose answer was lost. An id is dropped only after releases
        of it have succeeded for UNSURE_REPEAT seconds: the store may commit an abandoned
        admission when it comes back, just after a release already ran."""
        now = time.monotonic()
        self._unsure = {r: until for r, until in self._unsure.items() if until is None or until > now}
        ids = list(self._unsure)
        if not ids:
            return
        rows = json.dumps(
            [{"request_id": r, "agent": None, "cost": None, "tokens": None, "settles": True} for r in ids]
        )

        async def release(conn: Any) -> None:
            await conn.execute(RELEASE, (rows,))

        try:
            await self.engine.run(release)
        except (StoreError, OSError):
            return  # kept: released on a later tick
        for r in ids:
            if self._unsure.get(r, 0.0) is None:
                self._unsure[r] = now + UNSURE_REPEAT

    async def refresh(self) -> None:
        """Read what changed in the shared budgets since the last snapshot (all of it, first)."""
        since = self._since

        async def read(conn: Any) -> tuple[Any, list[tuple[Any, ...]]]:
            cur = await conn.execute("SELECT clock_timestamp()")
            now = (await cur.fetchone())[0]
            cur = await conn.execute(SNAPSHOT, (since, since))
            return now, list(await cur.fetchall())

        now, rows = await self.engine.run(read)
        if since is None:
            self.spent.clear()
            self.reserved.clear()
        for scope, key, spent, reserved in rows:
            for amounts, value in ((self.spent, spent), (self.reserved, reserved)):
                if value:
                    amounts[(scope, key)] = Decimal(value)
                else:
                    amounts.pop((scope, key), None)
        self._since = now
