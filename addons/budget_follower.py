"""BudgetFollower: keeps the proxy's ledger in step with the store.

A background task (`Poller`), not a chain member: at start it loads the spend recorded
before (`load_spent`: the running totals, and the open budget day's rows), then every
interval it reads the budget overrides set at run time (`budget set/reset`) and hands the
audit log's writer what changed in the open reservations, for `budget show`. It opens no
connection of its own: reads go through the store's engine, writes through the one writer.
With a shared ledger (a fleet on PostgreSQL) the store holds spend and reservations itself:
each poll is the ledger's `tick` (heartbeat, gone replicas' calls, a fresh snapshot).
"""

from __future__ import annotations

from decimal import Decimal

from egress_guard.addons._background import Poller
from egress_guard.ledger import Ledger
from egress_guard.shared_ledger import SharedLedger
from egress_guard.store import AuditLog, Engine, Reservations
from egress_guard.timeutil import iso, now_iso


class BudgetFollower(Poller):
    name = "budget follower"

    def __init__(self, store: Engine, audit: AuditLog, ledger: Ledger, interval: float = 0.5) -> None:
        super().__init__(interval)
        self.store, self.audit, self.ledger = store, audit, ledger
        self._written: dict[str, Decimal] = {}  # the reservations as last handed to the writer

    async def load_spent(self) -> None:
        """Budgets survive restarts: each session's spend so far, and each agent's today."""
        if isinstance(self.ledger, SharedLedger):  # a fleet's are in the store (read by its open)
            self.ledger.overrides = await self.store.overrides()
            return
        totals = await self.store.totals()
        today = await self.store.spent_since(iso(self.ledger.day_start()))
        self.ledger.load(((t.agent, t.session, t.usd) for t in totals), today)
        self.ledger.overrides = await self.store.overrides()

    def _write_reserved(self) -> None:
        now = {f"{scope}:{key}": usd for (scope, key), usd in self.ledger.reserved.items()}
        changed = tuple((k, v) for k, v in now.items() if self._written.get(k) != v)
        removed = tuple(k for k in self._written if k not in now)
        if changed or removed:
            self.audit.submit(Reservations(changed, removed, now_iso()))  # queued, never dropped
            self._written = now

    async def poll(self) -> None:
        if isinstance(self.ledger, SharedLedger):  # heartbeat first: a failing read must not stop it
            await self.ledger.tick()
            self.ledger.overrides = await self.store.overrides()
            return
        self.ledger.overrides = await self.store.overrides()
        self._write_reserved()
