"""Prices: what a number of tokens of a model costs, and what a provider's response cost.

Pure except for genai-prices' bundled price snapshot (no network). Knows nothing of any API's
shape: genai-prices' extractors read a response's usage, named by the genai-prices provider
whose extractor applies (egress_guard.providers says which).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
from dataclasses import dataclass
from decimal import Decimal

from egress_guard.spend import SpendSettings

log = logging.getLogger("egress_guard")
MTOK = Decimal(1_000_000)


class Unpriced(Exception):
    """No price is known for the model (and the config says deny)."""


@dataclass(frozen=True)
class Cost:
    usd: Decimal
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    model: str


@functools.lru_cache(maxsize=8192)
def _calc(
    provider: str, model: str, input_tokens: int, output_tokens: int, cache_read: int, cache_write: int, day: str
) -> Decimal | None:
    """genai-prices for one usage, memoised: a pure function of its arguments for a given day
    (the snapshot is bundled; `day` keeps date-dependent prices right). None: unknown model."""
    from genai_prices import Usage, calc_price

    usage = Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read or None,
        cache_write_tokens=cache_write or None,
    )
    try:
        return Decimal(calc_price(usage, model, provider_id=provider).total_price)
    except LookupError:
        return None


_FALLBACK_LOGGED: set[tuple[str, str]] = set()


def price(
    settings: SpendSettings,
    provider: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_read: int = 0,
    cache_write: int = 0,
) -> Decimal:
    day = datetime.datetime.now(datetime.UTC).date().isoformat()
    usd = _calc(provider, model, input_tokens, output_tokens, cache_read, cache_write, day)
    if usd is not None:
        return usd
    if settings.unknown_model != "fallback":
        raise Unpriced(f"no price is known for model {model!r} at {provider} (spend.unknown_model: deny)")
    if (provider, model) not in _FALLBACK_LOGGED:  # once per model: it repeats on every call
        _FALLBACK_LOGGED.add((provider, model))
        log.warning(
            "no price is known for model %r at %s: pricing it at spend.fallback_price (%s in, %s out per MTok)",
            model,
            provider,
            settings.fallback_input_per_mtok,
            settings.fallback_output_per_mtok,
        )
    return (settings.fallback_input_per_mtok * input_tokens + settings.fallback_output_per_mtok * output_tokens) / MTOK


@functools.lru_cache(maxsize=64)
def _usage_keys(provider: str, flavor: str) -> tuple[str, ...] | None:
    """The top-level keys of a response that genai-prices' extractor reads (its usage root and
    model path), or None if it has no extractor for this flavor."""
    from genai_prices import data_snapshot

    found = data_snapshot.get_snapshot().find_provider(None, provider, None)
    for e in found.extractors or ():
        if e.api_flavor == flavor:
            root = e.root if isinstance(e.root, str) else e.root[0]
            model = e.model_path if isinstance(e.model_path, str) else e.model_path[0]
            return (root, model) if isinstance(root, str) and isinstance(model, str) else None
    return None


def cost_of(settings: SpendSettings, provider: str, flavor: str, response: dict, price_as: str = "") -> Cost | None:
    """The real cost of a provider response (or of the response object a stream assembled):
    usage read by genai-prices provider `provider`'s extractor for `flavor`, priced as
    `price_as` (default: that provider).

    Memoised on the part of the response genai-prices reads: usage blocks repeat (the same
    model, the same token counts), and extraction is most of what pricing a call costs."""
    keys = _usage_keys(provider, flavor)
    if keys is None:
        return _cost_of(settings, provider, flavor, response, price_as)
    try:
        seen = json.dumps([response.get(k) for k in keys], sort_keys=True)
    except (TypeError, ValueError):
        return _cost_of(settings, provider, flavor, response, price_as)
    day = datetime.datetime.now(datetime.UTC).date().isoformat()
    return _cost_of_seen(settings, provider, flavor, seen, price_as, day)


@functools.lru_cache(maxsize=4096)
def _cost_of_seen(
    settings: SpendSettings, provider: str, flavor: str, seen: str, price_as: str, day: str
) -> Cost | None:
    keys = _usage_keys(provider, flavor)
    assert keys is not None
    response = {k: v for k, v in zip(keys, json.loads(seen), strict=True) if v is not None}
    return _cost_of(settings, provider, flavor, response, price_as)


def _cost_of(settings: SpendSettings, provider: str, flavor: str, response: dict, price_as: str) -> Cost | None:
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    try:
        # the provider's extractor alone: it reads the usage even of a model it does not list
        model_ref, u = snapshot.find_provider(None, provider, None).extract_usage(response, api_flavor=flavor)
    except (ValueError, KeyError, TypeError, LookupError):
        return None
    tokens = {
        k: int(getattr(u, k) or 0) for k in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
    }
    pid = price_as or provider
    model = model_ref or str(response.get("model") or response.get("modelVersion") or "")
    with contextlib.suppress(LookupError, ValueError):  # the model's id as the price list names it
        model = snapshot.find_provider_model(model, None, pid, None)[1].id
    try:
        usd = price(
            settings,
            pid,
            model,
            tokens["input_tokens"],
            tokens["output_tokens"],
            tokens["cache_read_tokens"],
            tokens["cache_write_tokens"],
        )
    except Unpriced:
        return None  # the response names a model with no price: billed at its reservation
    return Cost(
        usd,
        tokens["input_tokens"],
        tokens["output_tokens"],
        tokens["cache_read_tokens"] + tokens["cache_write_tokens"],
        model,
    )
