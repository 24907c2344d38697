"""Spend limits as the config states them: each agent's rate limits, budgets and model
allowlists (and their per-session overrides), the spend settings, and how a service's calls
are metered (`Meter`).

Pure data and two lookups. What a request may cost and what it did cost: egress_guard.pricing
and egress_guard.providers; the ledger that holds budgets and rate limits against them:
egress_guard.ledger.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from decimal import Decimal
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class SessionLimits:
    """A config override for the sessions whose id matches `glob`: their session budget
    and/or their model allowlists (per service) replace the agent's."""

    glob: str
    budget_usd: Decimal | None = None
    models: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent: int | None = None
    budget_session: Decimal | None = None
    budget_day: Decimal | None = None
    budget_total: Decimal | None = None
    models: dict[str, tuple[str, ...]] = field(default_factory=dict)  # service -> globs
    sessions: tuple[SessionLimits, ...] = ()  # first match wins

    def session(self, session: str) -> SessionLimits | None:
        """The config override for this session id, if one matches."""
        return next((s for s in self.sessions if fnmatch.fnmatchcase(session, s.glob)), None)


@dataclass(frozen=True)
class SpendSettings:
    timezone: str = "UTC"
    unknown_model: str = "deny"  # or "fallback"
    fallback_input_per_mtok: Decimal = Decimal(0)
    fallback_output_per_mtok: Decimal = Decimal(0)
    default_max_output_tokens: int = 4096
    on_overrun: str = "finish"  # or "cut": end an SSE stream cleanly when it crosses a budget

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class Meter:
    """How a service's calls are metered: its API's shape (a module of egress_guard.providers:
    which endpoints, where usage is, its error shape) and the genai-prices provider id that
    prices them (an OpenAI-compatible API can be priced as groq, deepseek, azure, ...)."""

    api: str
    provider: str


def allowed_models(limits: Limits, service: str, session: str) -> tuple[str, ...] | None:
    """The model globs that apply to this service and session (None: any model)."""
    override = limits.session(session)
    if override is not None and service in override.models:
        return override.models[service]
    return limits.models.get(service)


def model_allowed(limits: Limits, service: str, model: str, session: str = "") -> bool:
    globs = allowed_models(limits, service, session)
    return globs is None or any(fnmatch.fnmatchcase(model, g) for g in globs)
