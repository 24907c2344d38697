"""`pending`, `approve` and `deny`: answer the requests a running proxy holds for a human
(`action: escalate`, `unknown_hosts: escalate`, a frozen session).

A command writes the answer into the store (DecideApproval, conditional on the approval still
being pending); the proxy holding the request reads it within a quarter of a second, lets the
request through or refuses it, and writes the audit row (`kind = event`, method approve |
deny, rule = the approval id). `--scope session|always` also stores a grant: the same rule
for this agent's session (or for this agent, any session) no longer asks.
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from egress_guard.cli.common import config_option, format_option, open_db
from egress_guard.cli.output import emit
from egress_guard.store import Approval, DecideApproval, Store
from egress_guard.timeutil import now_iso

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
@click.option("--history", is_flag=True, help="Every approval (answered ones too) and the grants they added.")
@click.option("--limit", default=200, show_default=True, help="At most this many approvals (the newest).")
@format_option("table", "json")
def pending(config_path: Path | None, history: bool, limit: int, fmt: str) -> None:
    """List the requests waiting for a human's answer (newest last).

    Each line's id is what `approve` and `deny` take. A request waits until its `expires`
    time (escalation.timeout), then it is refused. With --history: every approval with who
    answered it, how and when, and the grants (scope session|always) in force.

    \b
    Example:
      egress-guard pending
      egress-guard pending --history --format json
    """
    with open_db(config_path) as db:
        if history:
            approvals = db.approvals(limit=limit)
            grants = db.grants(active_only=False)
        else:
            now = now_iso()
            approvals = [a for a in db.approvals(status="pending", limit=limit) if a.expires > now]
            grants = []
    shown = [asdict(a) for a in approvals]
    if fmt == "json":
        out: Any = {"approvals": shown, "grants": [asdict(g) for g in grants]} if history else shown
        click.echo(json.dumps(out, indent=2))
        return
    if not history:
        if not shown:
            click.echo("no requests are waiting for an answer", err=True)
            return
        emit(shown, "table", PENDING_COLUMNS)
        return
    emit(shown, "table", HISTORY_COLUMNS)
    if grants:
        click.echo("\ngrants (scope session|always):")
        emit([asdict(g) | {"id": f"{g.id}{' (revoked)' if g.revoked else ''}"} for g in grants], "table", GRANT_COLUMNS)


def _decide(config_path: Path | None, approval_id: str, op: DecideApproval) -> Approval:
    """Write the decision; the approval as it now stands. ClickException naming the problem:
    unknown id, no longer pending (who answered, when), scope session without a session."""
    with open_db(config_path, write=True) as db:
        found = _pending(db, approval_id, op)
        if db.write(op) == 0:  # answered (or expired) between the read and the write
            after = db.approval(found.id)
            raise click.ClickException(_not_pending(after or found))
        after = db.approval(found.id)
    assert after is not None
    return after


def _pending(db: Store, approval_id: str, op: DecideApproval) -> Approval:
    found = db.approval(approval_id)
    if found is None:
        raise click.ClickException(
            f"no escalation {approval_id!r}. Fix: copy an id from `egress-guard pending` (8 hex characters)"
        )
    if found.status != "pending":
        raise click.ClickException(_not_pending(found))
    if found.expires <= op.ts:
        raise click.ClickException(
            f"escalation {found.id} expired at {found.expires}: its request was refused (nobody holds it any more)"
        )
    if op.scope == "session" and found.session is None:
        raise click.ClickException(
            f"escalation {found.id} has no session (the agent's key names none): --scope session would cover "
            "every session. Fix: --scope once, or --scope always (this agent, any session)"
        )
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
    """Let a held request through (ID from `egress-guard pending`).

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
    """Refuse a held request (ID from `egress-guard pending`).

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
