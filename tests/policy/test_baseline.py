"""The freeze baselines: a steady agent never freezes, a runaway one does on the metric it
ran away on, with a text an operator can read; warmup, floors and memory bounds hold.
The clock is the `now` each call is given: every case is deterministic."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from egress_guard import baseline as baseline_mod
from egress_guard.baseline import Baselines
from egress_guard.verdicts import FreezeSettings

W = 60.0


def settings(**over: object) -> FreezeSettings:
    base: dict[str, object] = {
        "window": W,
        "warmup": 10,
        "requests_rate": 5.0,
        "spend_rate": 5.0,
        "hosts_rate": 5.0,
        "refusals": 20,
        "min_requests": 20,
        "min_usd": Decimal("0.01"),
        "action": "escalate",
    }
    base.update(over)
    return FreezeSettings(**base)  # type: ignore[arg-type]


def steady(
    b: Baselines, windows: int, per_window: int = 30, usd: str = "0.001", hosts: int = 2, start: int = 0
) -> None:
    """`per_window` requests in each of `windows` windows, spread over `hosts` hosts."""
    for w in range(start, start + windows):
        for i in range(per_window):
            now = w * W + i * (W / per_window)
            b.observe("bot", "s1", f"h{i % hosts}.example", Decimal(usd), False, now)
            assert b.check("bot", "s1", now) is None, f"steady agent froze in window {w}"


def test_a_steady_agent_never_freezes_over_hours() -> None:
    b = Baselines(settings())
    steady(b, 180)  # three hours of the same work
    mean = b.mean("bot", 180 * W)
    assert mean is not None
    assert (mean.windows, mean.requests, mean.hosts) == (60, 30.0, 2.0)  # the last 60 windows only


def test_a_runaway_agent_freezes_on_requests_with_a_readable_trigger() -> None:
    b = Baselines(settings())
    steady(b, 12, per_window=30)
    start = 12 * W
    trigger = None
    sent = 0
    while trigger is None and sent < 1000:
        b.observe("bot", "s1", "h0.example", Decimal(0), False, start + sent * 0.01)
        sent += 1
        trigger = b.check("bot", "s1", start + sent * 0.01)
    assert trigger is not None
    assert sent == 150  # 5x the baseline of 30
    assert trigger.metric == "requests"
    assert (trigger.value, trigger.baseline, trigger.threshold) == (150, 30.0, 5.0)
    assert trigger.text == "requests 150/window is 5.0x the baseline 30 (freeze.requests_rate 5x)"
    data = json.loads(trigger.baseline_json())
    assert data["agent"] == "bot" and data["session"] == "s1" and data["metric"] == "requests"
    assert data["windows"] == 12 and data["window_s"] == W
    assert data["baseline"]["requests"] == 30.0 and data["current"]["requests"] == 150


def test_spend_runaway_text_names_value_ratio_baseline_and_setting() -> None:
    b = Baselines(settings())
    steady(b, 10, per_window=25, usd="0.002")  # 0.05 USD per window
    now = 10 * W + 1
    for _ in range(21):
        b.observe("bot", "s1", "api.openai.com", Decimal("0.02"), False, now)
    trigger = b.check("bot", "s1", now)
    assert trigger is not None and trigger.metric == "spend"
    assert trigger.value == Decimal("0.42")
    assert trigger.text == "spend 0.42 USD/window is 8.4x the baseline 0.05 (freeze.spend_rate 5x)"
    assert json.loads(trigger.baseline_json())["baseline"]["usd"] == "0.05"


def test_few_expensive_calls_freeze_on_spend_below_the_request_floor() -> None:
    b = Baselines(settings())
    steady(b, 10, per_window=25, usd="0.0004")  # 0.01 USD per window
    now = 10 * W
    for _ in range(3):  # three huge calls: far below min_requests, far above the spend rate
        b.observe("bot", None, "api.openai.com", Decimal("2.5"), False, now)
    trigger = b.check("bot", None, now)
    assert trigger is not None and trigger.metric == "spend" and trigger.session is None


def test_hosts_runaway() -> None:
    b = Baselines(settings())
    steady(b, 10, per_window=30, hosts=2)
    now = 10 * W
    for i in range(30):
        b.observe("bot", "s1", f"scan{i}.example", Decimal(0), False, now)
    trigger = b.check("bot", "s1", now)
    assert trigger is not None and trigger.metric == "hosts"
    assert trigger.text == "hosts 30/window is 15.0x the baseline 2 (freeze.hosts_rate 5x)"


def test_refusals_are_absolute() -> None:
    b = Baselines(settings(requests_rate=None, hosts_rate=None))
    steady(b, 10, per_window=30)
    now = 10 * W
    for i in range(20):
        b.observe("bot", "s1", "h0.example", Decimal(0), True, now + i)
        trigger = b.check("bot", "s1", now + i)
    assert trigger is not None and trigger.metric == "refusals"
    assert trigger.text == "refusals 20/window reached freeze.refusals 20 (baseline 0)"


def test_nothing_freezes_during_warmup() -> None:
    b = Baselines(settings())
    steady(b, 9, per_window=5)
    now = 9 * W
    for _ in range(500):  # a storm in the 10th window: only 9 completed windows behind it
        b.observe("bot", "s1", "h.example", Decimal("1"), True, now)
    assert b.check("bot", "s1", now) is None
    assert b.check("bot", "s1", 10 * W) is None  # the storm window is history now; nothing in the new one


def test_floors_keep_a_quiet_agent_from_freezing() -> None:
    b = Baselines(settings())
    steady(b, 10, per_window=1, usd="0")
    now = 10 * W
    for _ in range(19):  # 19x the baseline, but below min_requests
        b.observe("bot", "s1", "h0.example", Decimal("0.0005"), False, now)
    assert b.check("bot", "s1", now) is None  # spend 0.0095 < min_usd 0.01 too
    b.observe("bot", "s1", "h0.example", Decimal("0.0005"), False, now)
    trigger = b.check("bot", "s1", now)
    assert trigger is not None and trigger.metric == "spend"  # now at both floors; spend is tried first
    assert "with a baseline of 0" in trigger.text


def test_idle_windows_are_not_history() -> None:
    """A bursty agent: a task of 30 requests every hour. Its baseline is 30 per active
    window, so the next task is not a divergence."""
    b = Baselines(settings(warmup=3))
    for hour in range(5):
        steady(b, 1, per_window=30, start=hour * 60)
    mean = b.mean("bot", 5 * 60 * W)
    assert mean is not None and (mean.windows, mean.requests) == (5, 30.0)


def test_agents_are_independent() -> None:
    b = Baselines(settings())
    steady(b, 10, per_window=30)
    now = 10 * W
    for _ in range(200):
        b.observe("other", "s9", "h.example", Decimal(0), False, now)
    assert b.check("other", "s9", now) is None  # no history of its own
    assert b.check("bot", "s1", now) is None
    assert b.check("nobody", None, now) is None


def test_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baseline_mod, "MAX_AGENTS", 50)
    monkeypatch.setattr(baseline_mod, "MAX_HOSTS", 10)
    b = Baselines(settings())
    for i in range(200):
        b.observe(f"a{i}", None, "h.example", Decimal(0), False, float(i))
    assert len(b) == 50 and b.mean("a0", 200.0) is None and b.mean("a199", 200.0) is not None
    for i in range(1000):
        b.observe("wide", None, f"h{i}.example", Decimal(0), False, 300.0)
    for w in range(100):
        b.observe("wide", None, "h.example", Decimal(0), False, 400.0 + w * W)
    mean = b.mean("wide", 400.0 + 100 * W)
    assert mean is not None and mean.windows == baseline_mod.HISTORY
    # the 1000-host window counted 11 (saturated), and it has rolled out of the 60 kept
    state = b._agents["wide"]
    assert len(state.history) == baseline_mod.HISTORY
    # the running sums `check` reads agree with the buckets kept
    assert (state.requests, state.hosts, state.usd) == (
        sum(x.requests for x in state.history),
        sum(x.hosts for x in state.history),
        sum((x.usd for x in state.history), Decimal(0)),
    )


def test_idle_agents_are_forgotten() -> None:
    b = Baselines(settings())
    steady(b, 10)
    later = 10 * W + baseline_mod.FORGET_AFTER + 1
    b.observe("fresh", None, "h.example", Decimal(0), False, later)
    assert b.mean("bot", later) is None and len(b) == 1


def test_add_spend_counts_in_the_current_window() -> None:
    b = Baselines(settings())
    steady(b, 10, per_window=25, usd="0.002")
    now = 10 * W
    b.observe("bot", "s1", "api.openai.com", Decimal(0), False, now)
    assert b.check("bot", "s1", now) is None
    b.add_spend("bot", Decimal("1"), now + 1)  # the call settled at 1 USD
    trigger = b.check("bot", "s1", now + 1)
    assert trigger is not None and trigger.metric == "spend"


def test_a_reload_keeps_baselines_unless_the_window_changes() -> None:
    b = Baselines(settings())
    steady(b, 10, per_window=30)
    b.reconfigure(settings(requests_rate=2.0))  # new thresholds: the history stays and they apply
    now = 10 * W
    for _ in range(60):
        b.observe("bot", "s1", "h0.example", Decimal(0), False, now)
    trigger = b.check("bot", "s1", now)
    assert trigger is not None and trigger.text.endswith("(freeze.requests_rate 2x)")
    b.reconfigure(settings(window=30.0))
    assert len(b) == 0 and b.check("bot", "s1", now) is None
