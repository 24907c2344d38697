"""BudgetFollower: keeps the proxy's ledger in step with the audit database.

A background task (`Poller`), not a chain member: at start it loads the spend recorded
before (`load_spent`), then every interval it reads the budget overrides set at run time
(`budget set/reset`) and writes the open reservations for `budget show`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from pathlib import Path

import aiosqlite

from egress_guard.addons._background import Poller
from egress_guard.audit import now_iso
from egress_guard.ledger import Ledger


class BudgetFollower(Poller):
    """Keeps the ledger in step with the DB: spend recorded before this start, budget
    overrides set at run time (`budget set/reset`), and the open reservations for `budget show`."""

    name = "budget follower"

    def __init__(self, db_path: Path, ledger: Ledger, interval: float = 0.5) -> None:
        super().__init__(interval)
        self.db_path, self.ledger = db_path, ledger
        self._written: dict[str, str] = {}

    async def load_spent(self) -> None:
        from datetime import datetime

        async with (
            aiosqlite.connect(f"file:{self.db_path}?mode=ro", uri=True) as db,
            db.execute(
                "SELECT agent, session, ts, cost_usd FROM audit WHERE cost_usd IS NOT NULL AND agent IS NOT NULL"
            ) as cur,
        ):
            async for agent, session, ts, cost in cur:
                day = self.ledger.day(datetime.fromisoformat(ts.replace("Z", "+00:00")))
                self.ledger.add_spent(agent, session or "", day, Decimal(cost))
        await self._read_overrides()

    async def _read_overrides(self) -> None:
        async with (
            aiosqlite.connect(f"file:{self.db_path}?mode=ro", uri=True) as db,
            db.execute("SELECT agent, scope, limit_usd FROM budgets") as cur,
        ):
            self.ledger.overrides = {(a, s): Decimal(v) async for a, s, v in cur}

    async def _write_reserved(self) -> None:
        now = {f"{scope}:{key}": str(v) for (scope, key), v in self.ledger.reserved.items()}
        if now == self._written:
            return
        ts = now_iso()
        await asyncio.to_thread(self._replace_reserved, [(k, v, ts) for k, v in now.items()])
        self._written = now

    def _replace_reserved(self, rows: list[tuple[str, str, str]]) -> None:
        # One transaction in one thread hop: the DB's write lock is held for microseconds, not
        # across event-loop turns while the audit writer (and every response) waits on it.
        conn = sqlite3.connect(self.db_path, timeout=1.0, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM budget_reserved")
            conn.executemany("INSERT INTO budget_reserved VALUES (?, ?, ?)", rows)
            conn.execute("COMMIT")
        finally:
            conn.close()

    async def poll(self) -> None:
        await self._read_overrides()
        await self._write_reserved()
