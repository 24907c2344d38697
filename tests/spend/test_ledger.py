"""The ledger keeps only what is spent or reserved: a key that holds nothing is dropped (a
proxy serving many sessions does not keep a zero for each forever), and reads as 0."""

from __future__ import annotations

from decimal import Decimal

from egress_guard.ledger import Ledger
from egress_guard.spend import Limits, SpendSettings


def test_zeroed_keys_are_dropped() -> None:
    ledger = Ledger(SpendSettings())
    limits = Limits(budget_session=Decimal(1))
    for i in range(100):  # unmetered requests: nothing to reserve, nothing spent
        ledger.settle(ledger.admit(limits, "bot", f"s{i}", Decimal(0), 0), Decimal(0), 0)
    assert ledger.reserved == {} and ledger.spent == {}
    hold = ledger.admit(limits, "bot", "s1", Decimal("0.25"), 100)
    assert ledger.reserved[("session", "bot/s1")] == Decimal("0.25") and len(ledger.reserved) == 3
    ledger.settle(hold, Decimal("0.10"), 90)
    assert ledger.reserved == {} and ledger.reserved[("total", "bot")] == 0  # absent reads as 0
    assert ledger.spent == {
        ("session", "bot/s1"): Decimal("0.10"),
        ("day", f"bot/{ledger.day()}"): Decimal("0.10"),
        ("total", "bot"): Decimal("0.10"),
    }


def test_load_starts_from_the_sessions_and_the_day() -> None:
    ledger = Ledger(SpendSettings())
    ledger.load(
        [("bot", "s1", Decimal("1")), ("bot", "s2", Decimal("2")), ("bot", "s1", Decimal("0.5"))],
        {"bot": Decimal("0.5")},
    )
    assert ledger.spent == {
        ("session", "bot/s1"): Decimal("1.5"),
        ("session", "bot/s2"): Decimal("2"),
        ("total", "bot"): Decimal("3.5"),
        ("day", f"bot/{ledger.day()}"): Decimal("0.5"),
    }
    assert ledger.day_start().isoformat().endswith("00:00:00+00:00")
