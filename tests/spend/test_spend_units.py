"""The ledger's arithmetic (budgets, rate limits, reservations) and SpendGuard settling a
buffered response. The API shapes, prices and the stream tap: tests/providers/."""

from __future__ import annotations

import gzip
import json
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price
from mitmproxy.test import tflow

from egress_guard import providers
from egress_guard.addons.flow import state
from egress_guard.addons.spend_guard import SpendGuard
from egress_guard.ledger import Ledger, Refusal
from egress_guard.spend import Limits, SessionLimits, SpendSettings, model_allowed

SETTINGS = SpendSettings()


def test_ledger_reserves_settles_and_refuses_with_the_numbers() -> None:
    ledger = Ledger(SETTINGS)
    limits = Limits(budget_session=Decimal("1.00"), concurrent=2)
    a = ledger.admit(limits, "ag", "s", Decimal("0.40"), 10)
    b = ledger.admit(limits, "ag", "s", Decimal("0.40"), 10)
    with pytest.raises(Refusal, match="concurrency limit: 2"):
        ledger.admit(limits, "ag", "s", Decimal("0.01"), 1)
    ledger.settle(a, Decimal("0.10"), 5)
    with pytest.raises(Refusal) as info:
        ledger.admit(limits, "ag", "s", Decimal("0.60"), 1)
    assert "session budget of $1.00" in info.value.reason and "spent $0.1" in info.value.reason
    assert "reserved $0.4" in info.value.reason
    ledger.settle(b, Decimal("0.20"), 5)
    ledger.admit(limits, "ag", "s", Decimal("0.60"), 1)  # 0.30 spent + 0.60 fits in 1.00
    assert ledger.spent[("session", "ag/s")] == Decimal("0.30")


def test_compressed_json_response_is_priced() -> None:
    flow = tflow.tflow(resp=True)
    body = {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 100, "completion_tokens": 20}}
    flow.response.headers["content-encoding"] = "gzip"
    flow.response.raw_content = gzip.compress(json.dumps(body).encode())
    ledger = Ledger(SETTINGS)
    m = providers.meter("openai", "/v1/chat/completions", {"model": "gpt-4o-mini"}, 10)
    assert m is not None
    usd, tokens = providers.reservation(SETTINGS, m)
    state(flow).hold = ledger.admit(Limits(), "ag", "s", usd, tokens)
    state(flow).metered = m
    spend = SpendGuard.__new__(SpendGuard)
    spend.settings, spend.ledger = SETTINGS, ledger
    spend.response(flow)
    expected = Decimal(
        calc_price(Usage(input_tokens=100, output_tokens=20), "gpt-4o-mini", provider_id="openai").total_price
    )
    usage = state(flow).usage
    assert usage is not None and usage.usd == expected
    assert ledger.spent[("total", "ag")] == expected and ledger.reserved[("total", "ag")] == 0


def test_tokens_per_minute_counts_real_tokens_after_settling() -> None:
    ledger = Ledger(SETTINGS)
    limits = Limits(tokens_per_minute=1000)
    a = ledger.admit(limits, "ag", "s", Decimal(0), 900)  # estimated 900
    with pytest.raises(Refusal, match="1000 tokens per minute"):
        ledger.admit(limits, "ag", "s", Decimal(0), 200)
    ledger.settle(a, Decimal(0), 100)  # really used 100
    ledger.admit(limits, "ag", "s", Decimal(0), 850)  # 100 + 850 fits
    with pytest.raises(Refusal) as info:
        ledger.admit(limits, "ag", "s", Decimal(0), 100)
    assert "(950 used" in info.value.reason and 1 <= info.value.retry_after <= 60


def test_session_budget_precedence_most_specific_wins_and_run_time_beats_config() -> None:
    limits = Limits(
        budget_session=Decimal(1),
        models={"openai": ("gpt-4o-mini",)},
        sessions=(
            SessionLimits("ci-nightly", Decimal(9), {"openai": ("gpt-4o",)}),
            SessionLimits("ci-*", Decimal(3)),
        ),
    )
    ledger = Ledger(SETTINGS)
    assert ledger.limit(limits, "ag", "session", "dev") == 1
    assert ledger.limit(limits, "ag", "session", "ci-nightly") == 9  # first match wins
    assert ledger.limit(limits, "ag", "session", "ci-7") == 3
    ledger.overrides = {("ag", "session"): Decimal(5)}  # run time, agent-wide: below a session's config entry
    assert ledger.limit(limits, "ag", "session", "dev") == 5
    assert ledger.limit(limits, "ag", "session", "ci-7") == 3
    ledger.overrides[("ag", "session:ci-7")] = Decimal("0.5")  # run time, this session: above everything
    assert ledger.limit(limits, "ag", "session", "ci-7") == Decimal("0.5")
    assert ledger.limit(limits, "ag", "day", "ci-7") is None  # other scopes are untouched
    with pytest.raises(Refusal, match=r"session budget of \$0.5"):
        ledger.admit(limits, "ag", "ci-7", Decimal("0.6"), 1)
    ledger.admit(limits, "ag", "ci-nightly", Decimal("8"), 1)
    # a session's model allowlist replaces the agent's for that service only
    assert model_allowed(limits, "openai", "gpt-4o", "ci-nightly")
    assert not model_allowed(limits, "openai", "gpt-4o-mini", "ci-nightly")
    assert model_allowed(limits, "openai", "gpt-4o-mini", "ci-7") and not model_allowed(
        limits, "openai", "gpt-4o", "ci-7"
    )


def test_overrun_counts_what_others_hold_and_spent() -> None:
    ledger = Ledger(SETTINGS)
    limits = Limits(budget_day=Decimal("1.00"))
    a = ledger.admit(limits, "ag", "s", Decimal("0.30"), 1)
    b = ledger.admit(limits, "ag", "s", Decimal("0.30"), 1)
    assert ledger.overrun(limits, a, Decimal("0.70")) is None  # 0.70 + b's 0.30 = 1.00
    assert "day budget of $1.00" in (ledger.overrun(limits, a, Decimal("0.71")) or "")
    ledger.settle(b, Decimal("0.10"), 1)
    assert ledger.overrun(limits, a, Decimal("0.90")) is None
    assert ledger.overrun(Limits(), a, Decimal("100")) is None  # no budget: nothing to cut at
