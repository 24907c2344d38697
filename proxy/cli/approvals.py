"""`pending`, `approve` and `deny`: answer the requests a running proxy holds for a human
(`action: escalate`, `unknown_hosts: escalate`, a frozen session).

A command writes the answer into the store (DecideApproval, conditional on the approval still
being pending); the proxy holding the request reads it within a quarter of a second, lets the
request through or refuses it, and writes the audit row (`kind = event`, method approve |
deny, rule = the approval id). `--scope session|always` also stores a grant: the same rule
for this agent's session (or for this agent, any session) no longer asks.

An id is 16 hex characters; `pending` shows its first SHOWN, and `approve`/`deny` take any
prefix of at least MIN_PREFIX that names one approval (as git takes a commit's).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from egress_guard.cli.common import config_option, format_option, open_db
from egress_guard.cli.output import emit
from egress_guard.escalation import past_expiry, scope_problem
from egress_guard.store import Approval, DecideApproval, Freeze, GrantRecord, LiftFreeze, RevokeGrant, Store
from egress_guard.timeutil import now_iso

MIN_PREFIX = 6  # characters of an id that approve/deny accept
SHOWN = 8  # characters of an id a table shows (--format json: all of them)
PENDING_COLUMNS = ["id", "created", "expires", "agent", "session", "method", "host", "port", "path", "rule", "reason"]
HISTORY_COLUMNS = [
    "id",
    "created",
    "agent",
    "session",
    "method",
    "host",
    "port",
    "status",
    "scope",
    "decided_by",
    "note",
]
GRANT_COLUMNS = ["id", "created", "rule", "host", "port", "agent", "session", "by", "approval_id", "note"]
FREEZE_COLUMNS = ["id", "created", "agent", "session", "lifted", "lifted_by", "trigger"]


def default_by() -> str:
    """Who answers: the user sudo ran as, else the login name."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def by_option(fn: Any) -> Any:
    return click.option(
        "--by", default=None, help="Who answers, for the audit row (default: $SUDO_USER, else your login name)."
    )(fn)


def note_option(fn: Any) -> Any:
    return click.option("--note", help="Why, for the audit row and the agent's refusal/approval reason.")(fn)


@click.command()
@config_option
@click.option(
    "--history", is_flag=True, help="Every approval (answered ones too), the grants they added, and the freezes."
)
@click.option("--limit", default=200, show_default=True, help="At most this many approvals (the newest).")
@format_option("table", "json")
def pending(config_path: Path | None, history: bool, limit: int, fmt: str) -> None:
    """List the requests waiting for a human's answer (newest last).

    Each line's id (its first 8 characters: --format json has them all) is what `approve`
    and `deny` take. A request waits until its `expires`
    time (escalation.timeout), then it is refused. With --history: every approval with who
    answered it, how and when; the grants (scope session|always), revoked ones marked; and
    the sessions frozen for diverging from their baseline, lifted ones with who lifted them.

    \b
    Example:
      egress-guard pending
      egress-guard pending --history --format json
    """
    with open_db(config_path) as db:
        approvals, grants, freezes = listing(db, history, limit)
    shown = [asdict(a) for a in approvals]
    if fmt == "json":
        out: Any = (
            {"approvals": shown, "grants": [asdict(g) for g in grants], "freezes": [asdict(f) for f in freezes]}
            if history
            else shown
        )
        click.echo(json.dumps(out, indent=2))
        return
    shown = [a | {"id": a["id"][:SHOWN]} for a in shown]
    grants_shown = [asdict(g) | {"approval_id": (g.approval_id or "")[:SHOWN] or None} for g in grants]
    if not history:
        if not shown:
            click.echo("no requests are waiting for an answer", err=True)
            return
        emit(shown, "table", PENDING_COLUMNS)
        return
    emit(shown, "table", HISTORY_COLUMNS)
    if grants:
        click.echo("\ngrants (scope session|always):")
        emit(
            [g | {"id": f"{g['id']}{' (revoked)' if g['revoked'] else ''}"} for g in grants_shown],
            "table",
            GRANT_COLUMNS,
        )
    if freezes:
        click.echo("\nfreezes:")
        emit([asdict(f) for f in freezes], "table", FREEZE_COLUMNS)


def listing(db: Store, history: bool, limit: int) -> tuple[list[Approval], list[GrantRecord], list[Freeze]]:
    """What `pending` lists (the console's too): the approvals still waiting (the newest
    `limit`); with `history`, every approval, grant and freeze."""
    if history:
        return db.approvals(limit=limit), db.grants(active_only=False), db.freezes(active_only=False)
    now = now_iso()
    return [a for a in db.approvals(status="pending", limit=limit) if a.expires > now], [], []


def _decide(config_path: Path | None, approval_id: str, op: DecideApproval) -> Approval:
    """Write the decision; the approval as it now stands. ClickException naming the problem:
    unknown id, no longer pending (who answered, when), scope session without a session."""
    with open_db(config_path, write=True) as db:
        found = _pending(db, _resolve(db, approval_id), op)
        op = dataclasses.replace(op, id=found.id)
        if db.write(op) == 0:  # answered (or expired) between the read and the write
            after = db.approval(found.id)
            raise click.ClickException(_not_pending(after or found))
        after = db.approval(found.id)
    assert after is not None
    return after


def _resolve(db: Store, given: str) -> Approval:
    """The approval `given` names: its id, or a prefix of at least MIN_PREFIX characters that
    starts exactly one id. ClickException if it names none, or several."""
    found = db.approval(given)
    if found is not None:
        return found
    prefix = given.strip().lower()
    fix = f"Fix: copy an id from `egress-guard pending` (at least {MIN_PREFIX} of its characters)"
    if len(prefix) < MIN_PREFIX:
        raise click.ClickException(f"no escalation {given!r}: give at least {MIN_PREFIX} characters of its id. {fix}")
    ids = db.approval_ids(prefix, limit=5)
    if not ids:
        raise click.ClickException(f"no escalation {given!r}. {fix}")
    if len(ids) > 1:
        more = ", …" if len(ids) == 5 else ""
        raise click.ClickException(
            f"{given!r} is ambiguous: it starts the ids {', '.join(ids)}{more}. "
            "Fix: give more characters (`egress-guard pending --format json` shows the whole id)"
        )
    found = db.approval(ids[0])
    if found is None:  # (deleted between the two reads: a prune)
        raise click.ClickException(f"no escalation {given!r}. {fix}")
    return found


def _pending(db: Store, found: Approval, op: DecideApproval) -> Approval:
    if found.status != "pending":
        raise click.ClickException(_not_pending(found))
    if found.expires <= op.ts:
        raise click.ClickException(past_expiry(found))
    problem = scope_problem(found, op.scope)
    if problem is not None:
        raise click.ClickException(problem)
    return found


def _not_pending(a: Approval) -> str:
    how = f" (scope {a.scope})" if a.scope else ""
    note = f": {a.note}" if a.note else ""
    if a.status == "expired":
        return f"escalation {a.id} is not pending: it expired at {a.decided_at} ({a.decided_by}){note}"
    return f"escalation {a.id} is not pending: {a.status}{how} by {a.decided_by} at {a.decided_at}{note}"


@click.command()
@config_option
@click.argument("approval_id", metavar="ID")
@click.option(
    "--scope",
    type=click.Choice(["once", "session", "always"]),
    default="once",
    show_default=True,
    help="once: this request; session: also this agent's later requests of this session that the same rule "
    "would escalate; always: this agent's, in any session (a stored grant, listed by `pending --history`).",
)
@note_option
@by_option
def approve(config_path: Path | None, approval_id: str, scope: str, note: str | None, by: str | None) -> None:
    """Let a held request through (ID, or its first 6+ characters, from `egress-guard pending`).

    The proxy holding it forwards it within a quarter of a second and records who approved
    it, the scope and the note in the audit log. An approval never lifts a `deny` rule.
    Approving a frozen session's request with --scope session also lifts the freeze.

    \b
    Example:
      egress-guard approve 1a2b3c4d --scope session --note "new API for the eval run"
    """
    op = DecideApproval(id=approval_id, status="approved", scope=scope, note=note, by=by or default_by(), ts=now_iso())
    a = _decide(config_path, approval_id, op)
    grant = {"session": f" and its session {a.session}", "always": ", any session"}.get(scope, "")
    click.echo(
        f"approved {a.id}: {a.method or 'CONNECT'} {a.host}:{a.port} for agent {a.agent or '?'}{grant} "
        f"(scope {scope}, by {a.decided_by})"
    )


@click.command()
@config_option
@click.argument("approval_id", metavar="ID")
@note_option
@by_option
def deny(config_path: Path | None, approval_id: str, note: str | None, by: str | None) -> None:
    """Refuse a held request (ID, or its first 6+ characters, from `egress-guard pending`).

    The agent gets a refusal naming the escalation, who denied it and the note; the audit
    log records the same.

    \b
    Example:
      egress-guard deny 1a2b3c4d --note "not needed for this task"
    """
    op = DecideApproval(id=approval_id, status="denied", scope=None, note=note, by=by or default_by(), ts=now_iso())
    a = _decide(config_path, approval_id, op)
    click.echo(
        f"denied {a.id}: {a.method or 'CONNECT'} {a.host}:{a.port} for agent {a.agent or '?'} (by {a.decided_by})"
    )


@click.command("revoke-grant")
@config_option
@click.argument("grant_id", metavar="ID", type=int)
def revoke_grant(config_path: Path | None, grant_id: int) -> None:
    """Revoke a grant (an approval's --scope session|always; ID from `pending --history`).

    Running proxies stop applying it within half a second: the same rule asks again.

    \b
    Example:
      egress-guard revoke-grant 7
    """
    with open_db(config_path, write=True) as db:
        known = {g.id: g for g in db.grants(active_only=False)}
        if grant_id not in known:
            raise click.ClickException(f"no grant {grant_id}. Fix: copy an id from `egress-guard pending --history`")
        if db.write(RevokeGrant(id=grant_id, ts=now_iso())) == 0:
            raise click.ClickException(f"grant {grant_id} was revoked already, at {known[grant_id].revoked}")
    g = known[grant_id]
    click.echo(f"revoked grant {g.id}: rule {g.rule} for {g.host}:{g.port}, agent {g.agent or 'any'}")


@click.command()
@config_option
@click.option("--agent", required=True, help="The frozen agent.")
@click.option("--session", default="", help="Its frozen session (default: its requests outside a session).")
@click.option("--note", help="Why, kept with the freeze (pending --history shows it).")
@click.option("--by", default=None, help="Who lifts it (default: $SUDO_USER, else your login name).")
def unfreeze(config_path: Path | None, agent: str, session: str, note: str | None, by: str | None) -> None:
    """Lift the freeze of an agent's session (frozen for diverging from its baseline).

    Running proxies let its requests through again within half a second (the policy still
    applies). With `freeze.action: escalate` you can also approve one of its held requests
    with --scope session, which lifts the freeze and keeps it from freezing again.

    \b
    Example:
      egress-guard unfreeze --agent researcher --session s1 --note "batch job, expected"
    """
    with open_db(config_path, write=True) as db:
        n = db.write(LiftFreeze(agent=agent, session=session, by=by or default_by(), ts=now_iso(), note=note))
    if n == 0:
        where = f"session {session!r}" if session else "outside a session"
        raise click.ClickException(
            f"agent {agent} is not frozen ({where}). Fix: see `egress-guard pending --history` for the freezes"
        )
    click.echo(f"lifted the freeze of agent {agent}{f', session {session}' if session else ''}")
