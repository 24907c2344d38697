"""Prices: genai-prices' numbers, and the config's rule for a model it does not know."""

from __future__ import annotations

from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price

from egress_guard.pricing import Unpriced, cost_of, price
from egress_guard.spend import SpendSettings

SETTINGS = SpendSettings()


def test_prices_come_from_genai_prices_and_unknown_models_follow_the_config(caplog) -> None:
    assert price(SETTINGS, "openai", "gpt-4o-mini", 1000, 10) == Decimal(
        calc_price(Usage(input_tokens=1000, output_tokens=10), "gpt-4o-mini", provider_id="openai").total_price
    )
    with pytest.raises(Unpriced, match="no price is known for model 'my-model'"):
        price(SETTINGS, "openai", "my-model", 1, 1)
    fallback = SpendSettings(
        unknown_model="fallback", fallback_input_per_mtok=Decimal(2), fallback_output_per_mtok=Decimal(8)
    )
    assert price(fallback, "openai", "my-model", 500_000, 250_000) == Decimal(3)
    assert price(fallback, "openai", "my-model", 1_000_000, 0) == Decimal(2)
    logged = [r.getMessage() for r in caplog.records if "fallback_price" in r.getMessage()]
    assert logged == [
        "no price is known for model 'my-model' at openai: pricing it at spend.fallback_price (2 in, 8 out per MTok)"
    ]


def test_a_response_is_read_by_one_provider_and_priced_by_another() -> None:
    response = {"model": "llama-3.1-8b-instant", "usage": {"prompt_tokens": 40, "completion_tokens": 9}}
    cost = cost_of(SETTINGS, "openai", "chat", response, "groq")
    expected = calc_price(Usage(input_tokens=40, output_tokens=9), "llama-3.1-8b-instant", provider_id="groq")
    assert cost is not None and cost.usd == Decimal(expected.total_price) and cost.model == "llama-3.1-8b-instant"
    # the same usage again is the memoised answer, not a second extraction
    assert cost_of(SETTINGS, "openai", "chat", dict(response), "groq") is cost
    assert cost_of(SETTINGS, "openai", "chat", {"model": "x"}) is None
