"""`policy`: commands about the policy itself — `suggest` writes, from the audit log, the allow
rules that would have admitted what agents did (after a run in `mode: observe`), for review.

Reads the store the config names, read-only; never changes the config file.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from egress_guard.cli.common import config_option, open_db
from egress_guard.store import Filters, Store
from egress_guard.suggest import suggest as suggest_rules
from egress_guard.timeutil import iso, parse_iso, parse_when, utcnow

SLICE = datetime.timedelta(hours=1)


def _rows(db: Store, agent: str | None, since: str, until: str | None) -> Iterator[dict[str, Any]]:
    """The audit rows from `since` to `until` (default: now), an hour at a time: a day of a
    busy proxy's rows never sits in memory at once (suggest keeps only what it counts)."""
    start, end = parse_iso(since), parse_iso(until) if until else utcnow()
    while start < end:
        stop = min(start + SLICE, end)
        yield from db.rows(Filters(agent=agent, since=iso(start), until=iso(stop)), None)
        start = stop


def _when(value: str | None, param: str) -> str | None:
    if value is None:
        return None
    try:
        return parse_when(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=param) from None


@click.group()
def policy() -> None:
    """Work with the policy: `suggest` allow rules from what the audit log saw.

    \b
    Example:
      egress-guard policy suggest --since 1d --out suggested.yaml
    """


@policy.command()
@config_option
@click.option(
    "--since",
    default="1d",
    show_default=True,
    help="From this time: ISO (2026-11-22T09:00, UTC if no zone) or 15m, 2h, 3d ago.",
)
@click.option("--until", help="Before this time (same forms as --since).")
@click.option("--agent", help="Only this agent's requests.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Write the rules to this file.")
@click.option("--force", is_flag=True, help="With --out: replace the file if it exists.")
def suggest(
    config_path: Path | None, since: str, until: str | None, agent: str | None, out: Path | None, force: bool
) -> None:
    """Allow rules that would have admitted the requests the audit log saw: each host and
    port with the methods used and its paths (exact when few, `/<first>/*` when many), a
    comment per rule with how many requests it covers. Uses request rows that were allowed
    or, in `mode: observe`, would have been denied or escalated; never errors or refusals by
    the structural guards. Review the output, then paste it under `allow:`.

    \b
    Example:
      egress-guard policy suggest --since 1d --agent researcher --out suggested.yaml
    """
    start, end = _when(since, "--since"), _when(until, "--until")
    assert start is not None  # --since has a default
    with open_db(config_path) as db:
        found = suggest_rules(_rows(db, agent, start, end))
    if not found.rules:
        raise click.ClickException(
            f"no allowed or observed request rows since {since}"
            + (f" for agent {agent!r}" if agent else "")
            + ". Fix: widen --since, or run the workload with `mode: observe` first"
        )
    if out is None:
        click.echo(found.text, nl=False)
        return
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists. Fix: choose another --out, or add --force to replace it")
    try:
        out.write_text(found.text)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out} ({exc.strerror}). Fix: check the path") from None
    click.echo(f"wrote {len(found.rules)} rule(s) from {found.used} request(s) to {out}", err=True)
