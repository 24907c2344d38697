"""The console's JSON API: the same answers as the CLI's query commands, and the same writes
as its action commands, over the store the config names.

Each answer is computed by a function over a `Store` (testable without a server) that calls
what the CLI calls: `Store.rows` (audit query), `spend_report.spend_by` (audit spend),
`spend_report.budget_rows` (budget show), `cli.approvals` (pending, approve, deny),
`cli.keys.kill_now` (kill). Store calls run in a worker thread, one store
opened per call (SQLite read-only for queries), so the event loop never waits on the disk and
a running proxy's writer is never disturbed. Never returns a key: the key table holds ids.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import getpass
import json
import os
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

import click
from aiohttp import web

from egress_guard import keys as keys_mod
from egress_guard import spend_report as spend_mod
from egress_guard import store
from egress_guard.cli import approvals as approvals_cli
from egress_guard.cli import keys as keys_cli
from egress_guard.config import Config
from egress_guard.credential_verdict import FLAG
from egress_guard.credentials import Credential
from egress_guard.escalation import scope_problem
from egress_guard.ledger import Ledger
from egress_guard.spend import SpendSettings
from egress_guard.store import DecideApproval, Filters, Store
from egress_guard.timeutil import DayOf, day_start, iso, now_iso, parse_iso, parse_when

T = TypeVar("T")

# What the audit log's decision column holds: `audit query --decision` takes the first three;
# observe mode records would-deny / would-escalate (verdicts.Outcome.verdict_text).
DECISIONS = ("allow", "deny", "error", "escalate", "would-deny", "would-escalate")
MAX_LIMIT = 1000
MAX_INT = 2**63 - 1  # the stores' integers (SQLite, PostgreSQL BIGINT): larger ids overflow them
DENIALS_SCANNED = 50_000  # the newest refusals a /api/denials answer reads
FLAGGED_SHOWN = 50
# The credential outcomes that can be flagged as a possible exfiltration attempt
# (credential_verdict.py); whether a row was flagged is in its reason's words (FLAG).
FLAGGABLE = frozenset(
    {Credential.FORGED, Credential.FOREIGN, Credential.WRONG_SERVICE, Credential.NOT_PERMITTED, Credential.UNBOUND_HOST}
)
FLAG_WORDS = FLAG.removeprefix("; ")


class ApiError(Exception):
    """An answer other than 200: the status and the message (which names the fix)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def console_by() -> str:
    """Who answers from the console, for the audit row: console:<os user>."""
    try:
        user = os.environ.get("SUDO_USER") or getpass.getuser()
    except OSError:  # no login name (a container's uid without a passwd entry)
        user = str(os.getuid())
    return f"console:{user}"


def usd(value: Decimal) -> str:
    return f"{value:f}"


# --- parameters ---------------------------------------------------------------------------


def int_param(request: web.Request, name: str, default: int, low: int = 0, high: int | None = None) -> int:
    text = request.query.get(name, "")
    if text == "":
        return default
    high = MAX_INT if high is None else high
    try:
        value = int(text) if len(text) <= 40 else None  # int() of a huge string is slow; none fits anyway
    except ValueError:
        raise ApiError(400, f"{name}={text[:40]!r} is not a whole number") from None
    if value is None or value < low or value > high:
        raise ApiError(400, f"{name}={text[:40]} is out of range ({low}..{high})")
    return value


def when_param(request: web.Request, name: str, default: str | None) -> str | None:
    text = request.query.get(name) or default
    if text is None:
        return None
    try:
        return parse_when(text)
    except ValueError as exc:
        raise ApiError(400, f"{name}: {exc}") from None
    except OverflowError:  # 999999d: before the year 1
        raise ApiError(400, f"{name}={text[:40]!r} is too far back. Fix: a shorter duration or an ISO time") from None


def choice_param(request: web.Request, name: str, choices: tuple[str, ...], default: str) -> str:
    value = request.query.get(name) or default
    if value not in choices:
        raise ApiError(400, f"{name}={value!r}: use one of {', '.join(choices)}")
    return value


def filters_param(request: web.Request, since_default: str | None = None) -> Filters:
    """The filters `audit query` takes (agent, host, decision, since, until), from the query."""
    host = request.query.get("host") or None
    decision = request.query.get("decision") or None
    if decision is not None and decision not in DECISIONS:
        raise ApiError(400, f"decision={decision!r}: use one of {', '.join(DECISIONS)}")
    return Filters(
        request.query.get("agent") or None,
        host.lower().rstrip(".") if host else None,
        decision,
        when_param(request, "since", since_default),
        when_param(request, "until", None),
    )


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.can_read_body else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body is a JSON object")
    return body


def text_field(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"{name!r} is a string")
    return value or None


# --- answers (functions over a Store) -----------------------------------------------------


def decisions(db: Store, filters: Filters, after: int, limit: int) -> dict[str, Any]:
    """`audit query`'s rows with an id above `after` (the newest `limit`), oldest first, and
    the id to ask after next: the last row's, or the head's read before the query (no
    matching row up to it was missed)."""
    head = db.last_id()
    rows = db.rows(filters, limit, after_id=after)
    return {"rows": rows, "last": rows[-1]["id"] if rows else max(after, head)}


LOOKUP_SPAN = 20_000  # rows: how far back from the newest GET /api/decisions/{id} reads


def decision(db: Store, row_id: int) -> dict[str, Any] | None:
    """One audit row by id. Store has no lookup by id yet: the rows after the one before it,
    if it is among the newest LOOKUP_SPAN (the live page opens recent rows); an older one is
    ApiError 404 naming `audit query`, so that a request never reads the whole table."""
    lookup = getattr(db, "row", None)  # a Store with a lookup by id (proposed)
    if callable(lookup):
        found: dict[str, Any] | None = lookup(row_id)
        return found
    if row_id <= 0:
        return None
    if db.last_id() - row_id > LOOKUP_SPAN:
        raise ApiError(
            404,
            f"audit row {row_id} is older than the newest {LOOKUP_SPAN} rows the console looks up. "
            "Fix: egress-guard audit query --format json (with --since/--until around its time)",
        )
    rows = db.rows(Filters(), None, after_id=row_id - 1)
    return rows[0] if rows and rows[0]["id"] == row_id else None


def bucketer(bucket: str, settings: SpendSettings) -> Callable[[str], str]:
    """An instant -> the start of its bucket, as an instant: the budget day (in spend.timezone,
    as `audit spend --by day` counts days) or the UTC hour."""
    if bucket == "hour":

        def hour(ts: str) -> str:
            if len(ts) == 24 and ts.endswith("Z"):
                return ts[:13] + ":00:00.000Z"
            return iso(parse_iso(ts).replace(minute=0, second=0, microsecond=0))

        return hour
    day_of = DayOf(settings.zone)
    starts: dict[str, str] = {}

    def day(ts: str) -> str:
        d = day_of(ts)
        if d not in starts:
            starts[d] = iso(day_start(datetime.date.fromisoformat(d), settings.zone))
        return starts[d]

    return day


def spend(db: Store, config: Config, filters: Filters, bucket: str) -> dict[str, Any]:
    """USD by bucket, agent and model; by agent and by model as `audit spend --by agent|model`
    reports them (the same function); the total is the sum of `audit spend`'s rows."""
    by_agent = spend_mod.spend_by(db, filters, "agent", config.spend)
    by_model = spend_mod.spend_by(db, filters, "model", config.spend)
    of = bucketer(bucket, config.spend)
    series: dict[tuple[str, str, str], Decimal] = {}
    for r in db.costed(filters):
        key = (of(r["ts"]), r["agent"] or "-", r["model"] or "-")
        series[key] = series.get(key, Decimal(0)) + Decimal(r["cost_usd"])
    return {
        "since": filters.since,
        "until": filters.until,
        "bucket": bucket,
        "series": [{"bucket": b, "agent": a, "model": m, "usd": usd(v)} for (b, a, m), v in sorted(series.items())],
        "by_agent": {g["agent"]: g["cost_usd"] for g in by_agent},
        "by_model": {g["model"]: g["cost_usd"] for g in by_model},
        "total": usd(sum((Decimal(g["cost_usd"]) for g in by_agent), Decimal(0))),
    }


def top_sessions(db: Store, filters: Filters, limit: int) -> list[dict[str, Any]]:
    """The sessions that spent most (priced calls), with their request count and last call."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for r in db.costed(filters):
        key = (r["agent"] or "-", r["session"] or "")
        g = found.setdefault(key, {"agent": key[0], "session": key[1], "usd": Decimal(0), "requests": 0, "last": ""})
        g["usd"] += Decimal(r["cost_usd"])
        g["requests"] += 1
        g["last"] = max(g["last"], r["ts"])
    ranked = sorted(found.values(), key=lambda g: (g["usd"], g["last"]), reverse=True)[:limit]
    return [g | {"usd": usd(g["usd"])} for g in ranked]


def flagged(row: dict[str, Any]) -> bool:
    """A refusal flagged as a possible exfiltration attempt (a SECURITY log line)."""
    return row.get("credential") in FLAGGABLE and FLAG_WORDS in (row.get("reason") or "")


def reason_label(row: dict[str, Any]) -> str:
    """What a refusal is counted under: its credential outcome (denied-forged, …), else its
    rule, else its reason."""
    credential = row.get("credential") or ""
    if credential.startswith("denied-"):
        return credential
    if row.get("rule"):
        return f"rule {row['rule']}"
    return row.get("reason") or "-"


def denials(db: Store, config: Config, filters: Filters, bucket: str) -> dict[str, Any]:
    rows = db.rows(dataclasses.replace(filters, decision="deny"), DENIALS_SCANNED)
    rows.reverse()  # newest first
    of = bucketer(bucket, config.spend)
    by_reason = Counter(reason_label(r) for r in rows)
    by_host = Counter(r.get("host") or "-" for r in rows)
    series = Counter(of(r["ts"]) for r in rows)
    return {
        "since": filters.since,
        "bucket": bucket,
        "total": len(rows),
        "flagged": [r for r in rows if flagged(r)][:FLAGGED_SHOWN],
        "by_reason": [{"reason": k, "count": n} for k, n in by_reason.most_common()],
        "by_host": [{"host": k, "count": n} for k, n in by_host.most_common()],
        "series": [{"bucket": b, "count": series[b]} for b in sorted(series)],
    }


def approvals(db: Store, history: bool, limit: int) -> Any:
    """What `egress-guard pending --format json` prints (with --history: approvals, grants,
    freezes), from the function `pending` lists with."""
    found, grants, freezes = approvals_cli.listing(db, history, limit)
    shown = [dataclasses.asdict(a) for a in found]
    if not history:
        return shown
    return {
        "approvals": shown,
        "grants": [dataclasses.asdict(g) for g in grants],
        "freezes": [dataclasses.asdict(f) for f in freezes],
    }


KEYS_SHOWN = 50  # per agent: its newest keys (every active one is among them unless it has more)


def agents(db: Store, config: Config) -> list[dict[str, Any]]:
    """Each agent: its services, its keys (ids and state — the store holds no key), live
    sessions, frozen sessions, and what it spent in the open budget day."""
    now = now_iso()
    ledger = Ledger(config.spend)
    since = iso(day_start(datetime.date.fromisoformat(ledger.day()), config.spend.zone))
    spent = db.spent_since(since)
    records = db.keys()
    frozen = db.freezes()
    names = sorted(set(config.agents) | {r.agent for r in records})
    out = []
    for name in names:
        mine = [r for r in records if r.agent == name]
        mine.sort(key=lambda r: (r.status(now) == "active", r.created_at), reverse=True)
        agent = config.agents.get(name)
        out.append(
            {
                "agent": name,
                "configured": agent is not None,
                "services": list(agent.services) if agent else [],
                "keys": [
                    {
                        "key_id": r.key_id,
                        "session": r.session,
                        "services": list(r.services),
                        "created": r.created_at,
                        "expires": r.expires_at,
                        "status": r.status(now),
                        "revoked": r.revoked_at is not None,
                        "revoked_reason": r.revoked_reason,
                    }
                    for r in mine[:KEYS_SHOWN]
                ],
                "keys_total": len(mine),
                "sessions": sorted({r.session for r in mine if r.status(now) == "active"}),
                "frozen": sorted(f.session for f in frozen if f.agent == name),
                "spent_today": usd(spent.get(name, Decimal(0))),
            }
        )
    return out


# --- actions (the CLI's writes) -----------------------------------------------------------


def decide(db: Store, given: str, op: DecideApproval) -> store.Approval:
    """What `egress-guard approve|deny` writes, with the same checks and messages (the CLI's
    own functions); ApiError 404 (no such id), 409 (not pending, expired), 400 (a scope
    refused: `escalation.scope_problem`)."""
    try:
        found = approvals_cli._resolve(db, given)
    except click.ClickException as exc:
        raise ApiError(404, exc.message) from None
    try:
        approvals_cli._pending(db, found, op)
    except click.ClickException as exc:
        # A refused scope is a bad request (400); 409 is "not pending any more".
        refused = found.status == "pending" and found.expires > op.ts and scope_problem(found, op.scope) is not None
        status = 400 if refused else 409
        raise ApiError(status, exc.message) from None
    op = dataclasses.replace(op, id=found.id)
    if db.write(op) == 0:  # answered (or expired) between the read and the write
        raise ApiError(409, approvals_cli._not_pending(db.approval(found.id) or found))
    after = db.approval(found.id)
    assert after is not None
    return after


def kill(config: Config, agent: str, session: str | None, reason: str) -> dict[str, Any]:
    """What `egress-guard kill --agent A` (with a session: `--agent A --session S`, that
    agent's session only) does — the CLI's own function, `kill_now`: revoke the keys in the
    store (a running proxy refuses them and cuts their connections within a second), then
    SIGKILL the labelled containers; the kill record notes what happened to them."""
    listed = keys_mod.list_keys(config, None, True)
    if session:
        if not any(r["agent"] == agent and r["session"] == session for r in listed):
            raise ApiError(404, f"agent {agent} has no session {session!r}. Fix: pick one from its keys")
    elif agent not in config.agents and agent not in {r["agent"] for r in listed}:
        raise ApiError(404, f"no agent named {agent!r}. Fix: use one of {', '.join(sorted(config.agents))}")
    done = keys_cli.kill_now(config, agent, session, reason)
    containers = done.containers
    problems = done.problems()
    return {
        "agent": agent,
        "session": session,
        "revoked_keys": done.revoked,
        "containers": {
            "engine": containers.engine,
            "killed": containers.killed,
            "failed": containers.failed,
            "unlabelled": containers.unlabelled,
            "unreachable": containers.unreachable,
            "error": containers.error,
        },
        "ok": not problems,
        "problems": problems,
    }


# --- handlers -----------------------------------------------------------------------------


class Api:
    """The handlers: each parses its parameters, runs one function over the store in a
    worker thread, and answers JSON."""

    def __init__(self, config: Config) -> None:
        self.config = config

    async def run(self, fn: Callable[[Store], T], *, write: bool = False) -> T:
        def work() -> T:
            with store.open_store(self.config, write=write) as db:
                return fn(db)

        if self.config.store is None and not self.config.audit_path.exists():
            raise ApiError(503, f"no audit DB at {self.config.audit_path}. Fix: run 'egress-guard init'")
        try:
            return await asyncio.to_thread(work)
        except store.StoreError as exc:
            raise ApiError(503, str(exc)) from None

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/decisions", self.get_decisions),
            web.get("/api/decisions/{id:[0-9]+}", self.get_decision),
            web.get("/api/spend", self.get_spend),
            web.get("/api/budgets", self.get_budgets),
            web.get("/api/sessions/top", self.get_top_sessions),
            web.get("/api/denials", self.get_denials),
            web.get("/api/approvals", self.get_approvals),
            web.post("/api/approvals/{id}/approve", self.post_approve),
            web.post("/api/approvals/{id}/deny", self.post_deny),
            web.get("/api/agents", self.get_agents),
            web.post("/api/agents/{agent}/kill", self.post_kill),
        ]

    async def get_decisions(self, request: web.Request) -> web.Response:
        filters = filters_param(request)
        after = int_param(request, "after", 0)
        limit = int_param(request, "limit", 200, 1, MAX_LIMIT)
        return web.json_response(await self.run(lambda db: decisions(db, filters, after, limit)))

    async def get_decision(self, request: web.Request) -> web.Response:
        text = request.match_info["id"]
        row_id = int(text) if len(text) <= 19 else MAX_INT + 1
        if row_id > MAX_INT:
            raise ApiError(400, f"id={text[:40]} is out of range (0..{MAX_INT})")
        row = await self.run(lambda db: decision(db, row_id))
        if row is None:
            raise ApiError(404, f"no audit row {row_id} (pruned, or not written yet)")
        return web.json_response(row)

    async def get_spend(self, request: web.Request) -> web.Response:
        filters = filters_param(request, "7d")
        bucket = choice_param(request, "bucket", ("day", "hour"), "day")
        return web.json_response(await self.run(lambda db: spend(db, self.config, filters, bucket)))

    async def get_budgets(self, request: web.Request) -> web.Response:
        agent = request.query.get("agent") or None
        if agent and agent not in self.config.agents:
            raise ApiError(404, f"no agent named {agent!r}. Fix: use one of {', '.join(sorted(self.config.agents))}")
        return web.json_response(await self.run(lambda db: spend_mod.budget_rows(db, self.config, agent)))

    async def get_top_sessions(self, request: web.Request) -> web.Response:
        filters = filters_param(request, "7d")
        limit = int_param(request, "limit", 10, 1, MAX_LIMIT)
        return web.json_response(await self.run(lambda db: top_sessions(db, filters, limit)))

    async def get_denials(self, request: web.Request) -> web.Response:
        filters = filters_param(request, "1d")
        bucket = choice_param(request, "bucket", ("day", "hour"), "hour")
        return web.json_response(await self.run(lambda db: denials(db, self.config, filters, bucket)))

    async def get_approvals(self, request: web.Request) -> web.Response:
        history = choice_param(request, "history", ("0", "1"), "0") == "1"
        limit = int_param(request, "limit", 200, 1, 10_000)
        return web.json_response(await self.run(lambda db: approvals(db, history, limit)))

    async def post_approve(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        scope = body.get("scope", "once")
        if scope not in ("once", "session", "always"):
            raise ApiError(400, f"scope {scope!r}: use once, session or always")
        op = DecideApproval(
            id=request.match_info["id"],
            status="approved",
            scope=scope,
            note=text_field(body, "note"),
            by=console_by(),
            ts=now_iso(),
        )
        after = await self.run(lambda db: decide(db, op.id, op), write=True)
        return web.json_response(dataclasses.asdict(after))

    async def post_deny(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        op = DecideApproval(
            id=request.match_info["id"],
            status="denied",
            scope=None,
            note=text_field(body, "note"),
            by=console_by(),
            ts=now_iso(),
        )
        after = await self.run(lambda db: decide(db, op.id, op), write=True)
        return web.json_response(dataclasses.asdict(after))

    async def get_agents(self, request: web.Request) -> web.Response:
        return web.json_response(await self.run(lambda db: agents(db, self.config)))

    async def post_kill(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        session = text_field(body, "session")
        # Who killed, in the revocation's reason as in an approval's `by`.
        reason = f"{text_field(body, 'reason') or 'kill switch'} ({console_by()})"
        agent = request.match_info["agent"]
        await self.run(lambda db: None)  # the store is there (503 naming the fix, if not)
        try:
            done = await asyncio.to_thread(kill, self.config, agent, session, reason)
        except store.StoreError as exc:
            raise ApiError(503, str(exc)) from None
        return web.json_response(done)


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """ApiError -> its status and message as JSON."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)
