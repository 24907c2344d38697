"""What the CLI reports and changes about spend: sums from the audit log (exact decimals),
budget overrides in the store (followed by the running proxy), and budget status."""

from __future__ import annotations

import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from egress_guard import store
from egress_guard.config import Config
from egress_guard.ledger import Ledger
from egress_guard.spend import SpendSettings
from egress_guard.store import Filters, Store
from egress_guard.timeutil import DayOf, day_start, iso, now_iso, utcnow


def spend_by(db: Store, filters: Filters, by: str, settings: SpendSettings) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    day_of = DayOf(settings.zone)
    for r in db.costed(filters):
        if by == "day":
            key = day_of(r["ts"])
        elif by == "session":
            key = f"{r['agent']}/{r['session']}"
        else:
            key = r[by] or "-"
        g = groups.setdefault(
            key,
            {by: key, "requests": 0, "input_tokens": 0, "output_tokens": 0, "cached_tokens": 0, "cost_usd": Decimal(0)},
        )
        g["requests"] += 1
        for col in ("input_tokens", "output_tokens", "cached_tokens"):
            g[col] += r[col] or 0
        g["cost_usd"] += Decimal(r["cost_usd"])
    rows = sorted(groups.values(), key=lambda g: g["cost_usd"], reverse=True)
    for g in rows:
        g["cost_usd"] = f"{g['cost_usd']:f}"
    return rows


def _scope_key(config: Config, agent: str, scope: str, session: str | None) -> str:
    if agent not in config.agents:
        raise ValueError(f"no agent named {agent!r}; use one of {', '.join(sorted(config.agents))}")
    if session and scope != "session":
        raise ValueError("--session goes with --scope session")
    return f"session:{session}" if session else scope


def set_budget(config: Config, agent: str, scope: str, session: str | None, usd: str) -> None:
    key = _scope_key(config, agent, scope, session)
    try:
        value = Decimal(usd)
    except InvalidOperation:
        raise ValueError(f"{usd!r} is not an amount: write e.g. 5 or 0.25") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"{usd!r} is not an amount: write a number of dollars, 0 or more")
    with store.open_store(config, write=True) as db:
        db.write(store.SetBudget(agent, key, value, now_iso()))


def reset_budget(config: Config, agent: str, scope: str, session: str | None) -> int:
    key = _scope_key(config, agent, scope, session)
    with store.open_store(config, write=True) as db:
        return db.write(store.ResetBudget(agent, key))


def budget_rows(db: Store, config: Config, only: str | None) -> list[dict[str, Any]]:
    """Each budget of each agent (of `only`): limit, spent, reserved, remaining, reset. The
    session and total scopes read the running totals; the day scope reads the day's rows."""
    ledger = Ledger(config.spend)
    ledger.overrides = db.overrides()
    reserved = db.reserved()
    today = ledger.day()
    spent: dict[str, Decimal] = {}
    for t in db.totals():
        for key in (f"session:{t.agent}/{t.session}", f"total:{t.agent}"):
            spent[key] = spent.get(key, Decimal(0)) + t.usd
    since = iso(day_start(datetime.date.fromisoformat(today), config.spend.zone))
    for name, usd in db.spent_since(since).items():
        spent[f"day:{name}/{today}"] = usd
    sessions: dict[str, list[str]] = {}
    for name, live in db.live_sessions(now_iso()):
        sessions.setdefault(name, []).append(live)
    rows = []
    for name, agent in sorted(config.agents.items()):
        if only and name != only:
            continue
        entries: list[tuple[str, str, str | None]] = [("day", f"{name}/{today}", None), ("total", name, None)]
        entries += [("session", f"{name}/{s}", s) for s in sorted(sessions.get(name, []))]
        for scope, key, session in entries:
            limit = ledger.limit(agent.limits, name, scope, session or "")
            s, r = spent.get(f"{scope}:{key}", Decimal(0)), reserved.get(f"{scope}:{key}", Decimal(0))
            rows.append(
                {
                    "agent": name,
                    "scope": scope,
                    "key": key.split("/", 1)[1] if "/" in key else key,
                    "limit_usd": f"{limit:f}" if limit is not None else "-",
                    "spent_usd": f"{s:f}",
                    "reserved_usd": f"{r:f}",
                    "remaining_usd": f"{max(limit - s - r, Decimal(0)):f}" if limit is not None else "-",
                    "resets_at": {
                        "day": ledger.next_day_start().isoformat(timespec="seconds"),
                        "total": "never",
                        "session": "new session",
                    }[scope],
                }
            )
    return rows


def prune_before(settings: SpendSettings, older_than: int, now: datetime.datetime | None = None) -> tuple[str, bool]:
    """The instant before which `audit prune --older-than` deletes rows: `older_than` seconds
    ago, but never inside the budget day still open (its day budget reads its rows). Returns
    it, and whether the open day moved it back."""
    now = now or utcnow()
    wanted = now - datetime.timedelta(seconds=older_than)
    today = day_start(now.astimezone(settings.zone).date(), settings.zone)
    return iso(min(wanted, today)), today < wanted
