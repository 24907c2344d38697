"""Per-agent baselines for the automatic freeze: how much an agent normally does per window,
and whether the window it is in now diverges from that (`freeze:` in the config).

Pure and clock-free: every call is given `now` (seconds, any monotonic-enough clock: the
proxy passes `time.time()`, tests a counter). No I/O, no mitmproxy. The proxy feeds it every
request (`observe`) and asks it before each one (`check`); a `Trigger` is what it freezes on,
with a text for the operator and the baseline as JSON for the `freezes` row.

What counts as the baseline: the mean per window over the agent's last `HISTORY` completed
windows *in which it made requests*. Idle windows are left out on purpose: agents work in
bursts (a task, then nothing for an hour), and counting the idle hour as zeros would make
every new task look like a divergence. The floors (`min_requests`, `min_usd`) keep a quiet
agent's noise from freezing it; `warmup` completed active windows are needed before anything
freezes, so a new agent is not judged on its first minutes.

Memory is bounded: `HISTORY` small buckets per agent, one open window per agent (its distinct
hosts capped at `MAX_HOSTS`), at most `MAX_AGENTS` agents (least recently seen dropped first),
and an agent idle for `FORGET_AFTER` seconds is forgotten (its baseline starts again).
Not thread-safe: the proxy calls it from its event loop only.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from egress_guard.verdicts import FreezeSettings

HISTORY = 60  # completed active windows a baseline is the mean of
MAX_HOSTS = 4096  # distinct hosts counted in one window (a larger count saturates)
MAX_AGENTS = 10_000
FORGET_AFTER = 86_400.0  # seconds without a request after which an agent's baseline is dropped

# The order triggers are tried in (the first that fires is reported): as in the config.
METRICS = ("spend", "requests", "hosts", "refusals")


@dataclass(frozen=True, slots=True)
class Bucket:
    """One completed window of one agent."""

    requests: int
    usd: Decimal
    hosts: int
    refusals: int


@dataclass(slots=True)
class _Open:
    """The window an agent is in now."""

    index: int
    requests: int = 0
    usd: Decimal = Decimal(0)
    hosts: set[str] = field(default_factory=set)
    hosts_over: bool = False
    refusals: int = 0

    def close(self) -> Bucket:
        return Bucket(self.requests, self.usd, self.host_count, self.refusals)

    @property
    def host_count(self) -> int:
        return len(self.hosts) + (1 if self.hosts_over else 0)


@dataclass(slots=True)
class _Agent:
    history: deque[Bucket]  # at most HISTORY, oldest first
    current: _Open
    last_seen: float
    # the sums over `history`, kept as buckets come and go: `check` runs before every
    # request and must not add up 60 buckets each time
    requests: int = 0
    usd: Decimal = Decimal(0)
    hosts: int = 0
    refusals: int = 0

    def push(self, bucket: Bucket) -> None:
        if len(self.history) == HISTORY:
            old = self.history.popleft()
            self.requests -= old.requests
            self.usd -= old.usd
            self.hosts -= old.hosts
            self.refusals -= old.refusals
        self.history.append(bucket)
        self.requests += bucket.requests
        self.usd += bucket.usd
        self.hosts += bucket.hosts
        self.refusals += bucket.refusals

    def mean(self) -> Mean:
        n = len(self.history)
        if n == 0:
            return Mean(0, 0.0, Decimal(0), 0.0, 0.0)
        return Mean(n, self.requests / n, self.usd / n, self.hosts / n, self.refusals / n)


@dataclass(frozen=True, slots=True)
class Mean:
    """The baseline: mean per window over `windows` completed active windows."""

    windows: int
    requests: float
    usd: Decimal
    hosts: float
    refusals: float


@dataclass(frozen=True, slots=True)
class Trigger:
    """Why a session freezes: `metric` ("spend" | "requests" | "hosts" | "refusals") reached
    `value` in the current window against `baseline` (the mean per window; for "refusals",
    which is absolute, the mean is reported but not compared), `threshold` the configured
    factor (or the absolute refusals count). `text` is what the operator reads."""

    agent: str
    session: str | None
    metric: str
    value: Decimal | int
    baseline: Decimal | float
    threshold: float | int
    text: str
    window: float
    mean: Mean
    current: Bucket

    def baseline_json(self) -> str:
        """The baseline and the window that tripped it, as the `freezes.baseline` column."""
        return json.dumps(
            {
                "agent": self.agent,
                "session": self.session,
                "metric": self.metric,
                "threshold": self.threshold,
                "window_s": self.window,
                "windows": self.mean.windows,
                "baseline": {
                    "requests": round(self.mean.requests, 3),
                    "usd": _num(self.mean.usd),
                    "hosts": round(self.mean.hosts, 3),
                    "refusals": round(self.mean.refusals, 3),
                },
                "current": {
                    "requests": self.current.requests,
                    "usd": _num(self.current.usd),
                    "hosts": self.current.hosts,
                    "refusals": self.current.refusals,
                },
            },
            sort_keys=True,
        )


class Baselines:
    """Every agent's rolling baseline under one `FreezeSettings`.

    `observe` records one request (after its decision: `refused` when the proxy refused it,
    `usd` what it cost, 0 when unmetered or not yet known); `check` answers whether the
    agent's current window diverges, before a request is let through.
    """

    def __init__(self, settings: FreezeSettings) -> None:
        if settings.window <= 0:
            raise ValueError("freeze.window must be positive")
        self.settings = settings
        self._agents: OrderedDict[str, _Agent] = OrderedDict()
        self._last_sweep = float("-inf")

    def reconfigure(self, settings: FreezeSettings) -> None:
        """New thresholds (a reload): the baselines are kept while the window length stays;
        a new length changes what a bucket means, so they start again."""
        if settings.window <= 0:
            raise ValueError("freeze.window must be positive")
        if settings.window != self.settings.window:
            self._agents.clear()
        self.settings = settings

    def __len__(self) -> int:
        return len(self._agents)

    def observe(self, agent: str, session: str | None, host: str, usd: Decimal, refused: bool, now: float) -> None:
        """Count one request of `agent` at `now` (session is accepted for symmetry with
        `check`: the baseline is the agent's, over all its sessions)."""
        state = self._state(agent, now)
        cur = state.current
        cur.requests += 1
        if usd > 0:
            cur.usd += usd
        if refused:
            cur.refusals += 1
        if host not in cur.hosts:
            if len(cur.hosts) < MAX_HOSTS:
                cur.hosts.add(host)
            else:
                cur.hosts_over = True

    def add_spend(self, agent: str, usd: Decimal, now: float) -> None:
        """Spend known only after the response (a metered call's settled cost): added to the
        window the agent is in now."""
        if usd > 0:
            self._state(agent, now).current.usd += usd

    def check(self, agent: str, session: str | None, now: float) -> Trigger | None:
        """The first trigger (spend, requests, hosts, refusals) the agent's current window
        fires, or None. Nothing fires before `warmup` completed active windows, nor below the
        floors (`min_requests` requests in the window; `min_usd` for spend)."""
        s = self.settings
        state = self._agents.get(agent)
        if state is None:
            return None
        self._roll(state, self._index(now))
        if len(state.history) < max(s.warmup, 1):
            return None
        cur = state.current.close()
        mean = state.mean()

        def fire(
            metric: str, value: Decimal | int, base: Decimal | float, threshold: float | int, text: str
        ) -> Trigger:
            return Trigger(agent, session, metric, value, base, threshold, text, s.window, mean, cur)

        if s.spend_rate is not None and cur.usd >= s.min_usd and cur.usd > 0:
            limit = Decimal(str(s.spend_rate)) * mean.usd
            if cur.usd >= limit:
                return fire(
                    "spend",
                    cur.usd,
                    mean.usd,
                    s.spend_rate,
                    _rate_text("spend", f"{_num(cur.usd)} USD", cur.usd, mean.usd, "spend_rate", s.spend_rate),
                )
        if cur.requests < s.min_requests:
            return None
        if s.requests_rate is not None and cur.requests >= s.requests_rate * mean.requests:
            return fire(
                "requests",
                cur.requests,
                mean.requests,
                s.requests_rate,
                _rate_text(
                    "requests", str(cur.requests), cur.requests, mean.requests, "requests_rate", s.requests_rate
                ),
            )
        if s.hosts_rate is not None and cur.hosts >= s.hosts_rate * mean.hosts:
            return fire(
                "hosts",
                cur.hosts,
                mean.hosts,
                s.hosts_rate,
                _rate_text("hosts", str(cur.hosts), cur.hosts, mean.hosts, "hosts_rate", s.hosts_rate),
            )
        if s.refusals is not None and cur.refusals >= s.refusals:
            return fire(
                "refusals",
                cur.refusals,
                mean.refusals,
                s.refusals,
                f"refusals {cur.refusals}/window reached freeze.refusals {s.refusals} (baseline {_num(mean.refusals)})",
            )
        return None

    def mean(self, agent: str, now: float) -> Mean | None:
        """The agent's baseline as of `now` (None: not seen, or forgotten)."""
        state = self._agents.get(agent)
        if state is None:
            return None
        self._roll(state, self._index(now))
        return state.mean()

    # --- bookkeeping -------------------------------------------------------------------

    def _index(self, now: float) -> int:
        return int(now // self.settings.window)

    def _state(self, agent: str, now: float) -> _Agent:
        self._sweep(now)
        index = self._index(now)
        state = self._agents.get(agent)
        if state is None:
            state = _Agent(deque(), _Open(index), now)
            self._agents[agent] = state
            while len(self._agents) > MAX_AGENTS:
                self._agents.popitem(last=False)
        else:
            self._agents.move_to_end(agent)
            self._roll(state, index)
        state.last_seen = max(state.last_seen, now)
        return state

    @staticmethod
    def _roll(state: _Agent, index: int) -> None:
        """Close the open window once `now` is past it; an empty one is not history."""
        if index > state.current.index:
            if state.current.requests:
                state.push(state.current.close())
            state.current = _Open(index)

    def _sweep(self, now: float) -> None:
        """Forget agents idle for FORGET_AFTER (at most once per window: the scan is cheap
        but not free)."""
        if now - self._last_sweep < self.settings.window:
            return
        self._last_sweep = now
        # least recently seen first: stop at the first one still active
        while self._agents:
            name, state = next(iter(self._agents.items()))
            if now - state.last_seen < FORGET_AFTER:
                break
            del self._agents[name]


def _num(x: Decimal | float) -> str:
    """A figure for people: up to 4 significant digits, no exponent for usual sizes."""
    return f"{float(x):.4g}"


def _rate_text(metric: str, shown: str, value: Decimal | int, base: Decimal | float, key: str, factor: float) -> str:
    if not base:
        return f"{metric} {shown}/window with a baseline of 0 (freeze.{key} {_num(factor)}x)"
    ratio = float(value) / float(base)
    return f"{metric} {shown}/window is {ratio:.1f}x the baseline {_num(base)} (freeze.{key} {_num(factor)}x)"
