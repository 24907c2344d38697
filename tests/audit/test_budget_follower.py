"""BudgetFollower on a real store: it starts the ledger from the running totals and the open
day's rows, follows run-time overrides, and hands the writer only what changed in the open
reservations — through the store's engine and its one writer, no connection of its own."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from test_audit_log import row
from test_durable import select

from egress_guard.addons.budget_follower import BudgetFollower
from egress_guard.ledger import Ledger
from egress_guard.spend import Limits, SpendSettings
from egress_guard.store import AuditLog, SetBudget, SQLiteEngine, SQLiteStore
from egress_guard.timeutil import now_iso

LONG_AGO = "2026-01-02T03:04:05.678Z"


async def test_the_follower_loads_follows_and_writes_only_changes(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    engine = SQLiteEngine(db)
    log = AuditLog(engine)
    await log.open()
    for i, (ts, session, usd) in enumerate([(LONG_AGO, "s1", "2"), (now_iso(), "s1", "0.5"), (now_iso(), "s2", "1")]):
        log.record(row(i, agent="bot", session=session, cost_usd=usd, ts=ts))
    await log.durable(log.record(row(9)))
    ledger = Ledger(SpendSettings())
    follower = BudgetFollower(engine, log, ledger)
    await follower.load_spent()
    assert ledger.spent == {
        ("session", "bot/s1"): Decimal("2.5"),
        ("session", "bot/s2"): Decimal("1"),
        ("total", "bot"): Decimal("3.5"),
        ("day", f"bot/{ledger.day()}"): Decimal("1.5"),  # today's rows only
    }

    with SQLiteStore(db, readonly=False) as store:
        store.write(SetBudget("bot", "day", Decimal(7), now_iso()))
    limits = Limits(budget_day=Decimal(100))
    a = ledger.admit(limits, "bot", "s1", Decimal("0.25"), 10)
    ledger.admit(limits, "bot", "s2", Decimal("0.5"), 10)
    queued = log._queued
    await follower.poll()
    assert ledger.overrides == {("bot", "day"): Decimal(7)}
    assert log._queued == queued + 1  # one write, of every key that changed
    await follower.poll()
    assert log._queued == queued + 1  # nothing changed: nothing written
    ledger.settle(a, Decimal("0.2"), 10)
    await follower.poll()
    await log.durable(log._queued)
    day = f"day:bot/{ledger.day()}"
    assert sorted(select(db, "SELECT key, usd FROM budget_reserved")) == [
        (day, "0.50"),
        ("session:bot/s2", "0.5"),
        ("total:bot", "0.50"),
    ]  # bot/s1's reservation is settled: its key is gone
    await log.close()
