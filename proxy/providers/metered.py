"""What a metered request is (`Metered`: what egress-guard knows of a call before it is
sent) and what it may cost at most (`reservation`). Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from decimal import Decimal

from egress_guard.pricing import price
from egress_guard.spend import SpendSettings


@dataclass(frozen=True)
class Metered:
    """A metered call: what egress-guard knows of it before it is sent."""

    api: str  # the API's shape (a Provider's name): how its usage is read
    flavor: str  # genai-prices api_flavor
    model: str
    max_output: int | None  # what the client capped the output at, if it did
    stream: bool
    input_bytes: int
    price_as: str = ""  # the genai-prices provider id that prices it ("": the API's own)
    choices: int = 1  # completions asked for (OpenAI n / best_of, Gemini candidateCount)

    @property
    def pricing(self) -> str:
        return self.price_as or self.api

    def priced_as(self, provider: str) -> Metered:
        """This call priced by genai-prices provider `provider` (named only when it is not the API's own)."""
        return self if not provider or provider == self.api else replace(self, price_as=provider)


def input_estimate(m: Metered) -> int:
    """The prompt's tokens at most: one per 3 bytes of body (an overestimate for text),
    rounded up to a multiple of 256 (even safer, and the price cache can reuse it)."""
    return math.ceil((m.input_bytes / 3 + 16) / 256) * 256


def reservation(settings: SpendSettings, m: Metered) -> tuple[Decimal, int]:
    """Worst-case cost and tokens of a request before it is sent: the prompt estimated at one
    token per 3 bytes of body (an overestimate for text), the output at the client's cap or
    the configured default, for each of the completions it asks for. Raises Unpriced."""
    input_tokens = input_estimate(m)
    output_tokens = 0 if m.flavor == "embeddings" else (m.max_output or settings.default_max_output_tokens) * m.choices
    return price(settings, m.pricing, m.model, input_tokens, output_tokens), input_tokens + output_tokens
