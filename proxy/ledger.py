"""The ledger: every budget and rate limit kept honest under concurrency.

Pure in-memory accounting; what it starts from (spend so far, budget overrides) is read from
the store, and what it holds (open reservations) is written to it, by BudgetFollower. It lives
on the event loop, so check-and-reserve is atomic: concurrent requests together can overshoot
a budget by at most what one request's real cost exceeds its reservation.
"""

from __future__ import annotations

import datetime
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from egress_guard.spend import Limits, SpendSettings
from egress_guard.timeutil import day_start

SCOPES = ("session", "day", "total")  # the budgets every call counts against


@dataclass
class Hold:
    """One admitted request: what it reserved, against which budgets."""

    agent: str
    session: str
    day: str
    usd: Decimal
    tokens: int
    settled: bool = False
    window_entry: list[float] | None = None  # [time, tokens] in the agent's tokens-per-minute window
    shared: bool = False  # reserved in the store, shared by replicas (shared_ledger.SharedLedger)


class Amounts(dict[tuple[str, str], Decimal]):
    """Dollars by budget key ("session"|"day"|"total", key). A key holding nothing is absent
    (reads as 0): the ledger keeps only what is spent or reserved, not every key ever seen."""

    def __missing__(self, key: tuple[str, str]) -> Decimal:
        return Decimal(0)

    def add(self, key: tuple[str, str], usd: Decimal) -> None:
        total = self.get(key, Decimal(0)) + usd
        if total:
            self[key] = total
        else:
            self.pop(key, None)


class Refusal(Exception):
    def __init__(self, reason: str, retry_after: int, status: int = 429) -> None:
        super().__init__(reason)
        self.reason, self.retry_after, self.status = reason, retry_after, status


@dataclass
class Ledger:
    settings: SpendSettings
    spent: Amounts = field(default_factory=Amounts)
    reserved: Amounts = field(default_factory=Amounts)
    overrides: dict[tuple[str, str], Decimal] = field(default_factory=dict)  # (agent, scope[:session]) -> limit
    _requests: dict[str, deque[float]] = field(default_factory=dict)
    _tokens: dict[str, deque[list[float]]] = field(default_factory=dict)  # [time, tokens], oldest first
    _token_sums: dict[str, float] = field(default_factory=dict)  # running sum of each window
    _inflight: dict[str, int] = field(default_factory=dict)
    _today: tuple[float, str] = (0.0, "")  # (valid until, day): `day()` for now, cached

    def day(self, when: datetime.datetime | None = None) -> str:
        """The budget day (in the configured time zone) of `when`, or of now."""
        if when is None:
            until, today = self._today
            if time.time() < until:
                return today
            today = datetime.datetime.now(self.settings.zone).date().isoformat()
            self._today = (self.next_day_start().timestamp(), today)
            return today
        return when.astimezone(self.settings.zone).date().isoformat()

    def day_start(self) -> datetime.datetime:
        """When the current budget day began, in UTC."""
        return day_start(datetime.date.fromisoformat(self.day()), self.settings.zone)

    def next_day_start(self) -> datetime.datetime:
        now = datetime.datetime.now(self.settings.zone)
        start = datetime.datetime.combine(now.date() + datetime.timedelta(days=1), datetime.time(), now.tzinfo)
        return start.astimezone(datetime.UTC)

    @staticmethod
    def keys(agent: str, session: str, day: str) -> list[tuple[str, tuple[str, str]]]:
        """Each budget scope and its key in `spent` / `reserved` (in SCOPES' order)."""
        return [
            ("session", ("session", f"{agent}/{session}")),
            ("day", ("day", f"{agent}/{day}")),
            ("total", ("total", agent)),
        ]

    def limit(self, limits: Limits, agent: str, scope: str, session: str) -> Decimal | None:
        """The budget in force; the most specific wins, and at equal specificity a run-time
        override (`budget set`) beats the config: this session's run-time override, the
        config's `sessions` entry matching it, the agent's run-time override, the config."""
        if scope == "session":
            if (agent, f"session:{session}") in self.overrides:
                return self.overrides[(agent, f"session:{session}")]
            override = limits.session(session)
            if override is not None and override.budget_usd is not None:
                return override.budget_usd
        if (agent, scope) in self.overrides:
            return self.overrides[(agent, scope)]
        return {"session": limits.budget_session, "day": limits.budget_day, "total": limits.budget_total}[scope]

    def admit(self, limits: Limits, agent: str, session: str, usd: Decimal, tokens: int) -> Hold:
        """Check every rate limit and budget for one more request; reserve or raise Refusal."""
        now = time.monotonic()
        window = self._requests.setdefault(agent, deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if limits.requests_per_minute is not None and len(window) >= limits.requests_per_minute:
            raise rpm_refusal(limits.requests_per_minute, agent, window[0] + 60 - now)
        tok = self._tokens.setdefault(agent, deque())
        used = self._token_sums.get(agent, 0.0)
        while tok and tok[0][0] <= now - 60:
            used -= tok.popleft()[1]
        self._token_sums[agent] = used
        if limits.tokens_per_minute is not None and used + tokens > limits.tokens_per_minute:
            raise tpm_refusal(limits.tokens_per_minute, agent, used, tokens, 60 - (now - tok[0][0]) if tok else 60)
        inflight = self._inflight.get(agent, 0)
        if limits.concurrent is not None and inflight >= limits.concurrent:
            raise concurrency_refusal(limits.concurrent, agent)
        day = self.day()
        for scope, key in self.keys(agent, session, day):
            cap = self.limit(limits, agent, scope, session)
            if cap is None:
                continue
            spent, held = self.spent.get(key, Decimal(0)), self.reserved.get(key, Decimal(0))
            if spent + held + usd > cap:
                raise self.budget_refusal(scope, cap, agent, spent, held, usd)
        for _, key in self.keys(agent, session, day):
            self.reserved.add(key, usd)
        window.append(now)
        entry = [now, float(tokens)]
        tok.append(entry)
        self._token_sums[agent] = used + tokens
        self._inflight[agent] = inflight + 1
        return Hold(agent, session, day, usd, tokens, window_entry=entry)

    def budget_refusal(
        self, scope: str, cap: Decimal, agent: str, spent: Decimal, held: Decimal, usd: Decimal
    ) -> Refusal:
        """A request refused because `scope`'s budget `cap` would be exceeded (the wording
        both ledgers use: this one and the shared one, egress_guard.shared_ledger)."""
        resets = {
            "session": "when a new session starts",
            "total": "never (raise it with budget set)",
            "day": f"at {self.next_day_start().isoformat(timespec='seconds')}",
        }[scope]
        retry = (
            math.ceil((self.next_day_start() - datetime.datetime.now(datetime.UTC)).total_seconds())
            if scope == "day"
            else 3600
        )
        return Refusal(
            f"budget: {scope} budget of ${cap} for agent {agent} would be exceeded "
            f"(spent ${_fmt(spent)}, reserved ${_fmt(held)}, this request may cost up to ${_fmt(usd)}); "
            f"resets {resets}",
            max(1, retry),
        )

    def overrun(self, limits: Limits, hold: Hold, usd: Decimal) -> str | None:
        """Which budget an admitted request would break if it cost `usd` (rather than what it
        reserved), given what is spent and held by the others now; None if all still fit."""
        for scope, key in self.keys(hold.agent, hold.session, hold.day):
            cap = self.limit(limits, hold.agent, scope, hold.session)
            if cap is None:
                continue
            spent = self.spent.get(key, Decimal(0))
            others = self.reserved.get(key, Decimal(0)) - (Decimal(0) if hold.settled else hold.usd)
            if spent + others + usd > cap:
                return (
                    f"{scope} budget of ${cap} for agent {hold.agent} reached mid-stream "
                    f"(spent ${_fmt(spent)}, reserved by others ${_fmt(others)}, this stream about ${_fmt(usd)})"
                )
        return None

    def settle(self, hold: Hold, usd: Decimal, tokens: int | None) -> None:
        """Replace the reservation by the real cost (and the token estimate by the real count)."""
        if hold.settled:
            return
        hold.settled = True
        for _, key in self.keys(hold.agent, hold.session, hold.day):
            self.reserved.add(key, -hold.usd)
            self.spent.add(key, usd)
        self._inflight[hold.agent] = max(0, self._inflight.get(hold.agent, 1) - 1)
        entry = hold.window_entry
        if tokens is not None and entry is not None and entry[0] > time.monotonic() - 60:  # still in the window
            self._token_sums[hold.agent] = self._token_sums.get(hold.agent, 0.0) + tokens - entry[1]
            entry[1] = float(tokens)

    def add_spent(self, agent: str, session: str, day: str, usd: Decimal) -> None:
        for _, key in self.keys(agent, session, day):
            self.spent.add(key, usd)

    def load(self, sessions: Iterable[tuple[str, str, Decimal]], today: Mapping[str, Decimal]) -> None:
        """Start from the spend recorded before: (agent, session, dollars) for the session and
        total budgets, and each agent's spend on the current budget day."""
        for agent, session, usd in sessions:
            self.spent.add(("session", f"{agent}/{session}"), usd)
            self.spent.add(("total", agent), usd)
        day = self.day()
        for agent, usd in today.items():
            self.spent.add(("day", f"{agent}/{day}"), usd)


def rpm_refusal(limit: int, agent: str, wait: float) -> Refusal:
    """Refused by a requests-per-minute limit; `wait`: seconds until the oldest call leaves the window."""
    return Refusal(f"rate limit: {limit} requests per minute for agent {agent}", max(1, math.ceil(wait)))


def tpm_refusal(limit: int, agent: str, used: float, tokens: int, wait: float) -> Refusal:
    return Refusal(
        f"rate limit: {limit} tokens per minute for agent {agent} ({int(used)} used, this request may use {tokens})",
        max(1, math.ceil(wait)),
    )


def concurrency_refusal(limit: int, agent: str) -> Refusal:
    return Refusal(f"concurrency limit: {limit} requests at a time for agent {agent}", 1)


def _fmt(value: Decimal) -> str:
    return f"{value.quantize(Decimal('0.000001')).normalize():f}"
