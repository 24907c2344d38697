"""Budgets and rate limits shared by the replicas of a fleet (PostgreSQL): migration
0008_fleet and what a batch commit settles. Owned by C1 (a stub until then).

`settle(cur, batch)` runs inside the writer's batch transaction, after the batch's rows are
inserted: for each request id in `batch.settles`, release the shared reservation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from egress_guard.store.interface import Batch

MIGRATION = ""


async def settle(cur: Any, batch: Batch) -> None:
    """Settle the reservations of `batch.settles` (cur: the batch transaction's AsyncCursor)."""
