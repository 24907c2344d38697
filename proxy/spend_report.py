"""What the CLI reports and changes about spend: sums from the audit log (exact decimals),
budget overrides in the DB (followed by the running proxy), and budget status."""

from __future__ import annotations

import datetime
import sqlite3
from decimal import Decimal, InvalidOperation
from typing import Any

from egress_guard.audit import Filters
from egress_guard.config import Config
from egress_guard.fakekeys import iso, utcnow
from egress_guard.keys import connect_rw
from egress_guard.ledger import Ledger
from egress_guard.spend import SpendSettings


def spend_by(conn: sqlite3.Connection, filters: Filters, by: str, settings: SpendSettings) -> list[dict[str, Any]]:
    where, args = filters.where()
    where = (where + " AND" if where else " WHERE") + " cost_usd IS NOT NULL"
    sql = (
        "SELECT agent, session, model, service, ts, input_tokens, output_tokens, cached_tokens, cost_usd "
        f"FROM audit{where}"
    )
    groups: dict[str, dict[str, Any]] = {}
    ledger = Ledger(settings)
    for r in conn.execute(sql, args):
        key = {
            "agent": r["agent"],
            "session": f"{r['agent']}/{r['session']}",
            "model": r["model"],
            "service": r["service"],
            "day": ledger.day(datetime.datetime.fromisoformat(r["ts"].replace("Z", "+00:00"))),
        }[by] or "-"
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
    conn = connect_rw(config)
    with conn:
        conn.execute(
            "INSERT INTO budgets VALUES (?, ?, ?, ?) ON CONFLICT (agent, scope) DO UPDATE SET "
            "limit_usd = excluded.limit_usd, updated_at = excluded.updated_at",
            (agent, key, f"{value:f}", iso(utcnow())),
        )
    conn.close()


def reset_budget(config: Config, agent: str, scope: str, session: str | None) -> int:
    key = _scope_key(config, agent, scope, session)
    conn = connect_rw(config)
    with conn:
        n = conn.execute("DELETE FROM budgets WHERE agent = ? AND scope = ?", (agent, key)).rowcount
    conn.close()
    return n


def budget_rows(conn: sqlite3.Connection, config: Config, only: str | None) -> list[dict[str, Any]]:
    ledger = Ledger(config.spend)
    ledger.overrides = {(a, s): Decimal(v) for a, s, v in conn.execute("SELECT agent, scope, limit_usd FROM budgets")}
    reserved = {k: Decimal(v) for k, v in conn.execute("SELECT key, usd FROM budget_reserved")}
    today = ledger.day()
    spent: dict[str, Decimal] = {}
    for agent, session, ts, cost in conn.execute(
        "SELECT agent, session, ts, cost_usd FROM audit WHERE cost_usd IS NOT NULL AND agent IS NOT NULL"
    ):
        day = ledger.day(datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")))
        for _, (scope, key) in Ledger.keys(agent, session or "", day):
            spent[f"{scope}:{key}"] = spent.get(f"{scope}:{key}", Decimal(0)) + Decimal(cost)
    now = iso(utcnow())
    sessions: dict[str, list[str]] = {}
    for agent, session in conn.execute(
        "SELECT DISTINCT agent, session FROM fake_keys WHERE revoked_at IS NULL AND expires_at > ?", (now,)
    ):
        sessions.setdefault(agent, []).append(session)
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
