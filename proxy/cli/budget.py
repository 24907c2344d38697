"""`budget`: show agents' USD budgets (limit, spent, reserved, remaining) and change them
while the proxy runs."""

from __future__ import annotations

from pathlib import Path

import click

from egress_guard import spend_report as spend_mod
from egress_guard.cli.common import config_option, format_option, load, open_db
from egress_guard.cli.output import emit


@click.group()
def budget() -> None:
    """Show and change agents' USD budgets while the proxy runs.

    \b
    Examples:
      egress-guard budget show --agent researcher
      egress-guard budget set --agent researcher --scope day --usd 20
      egress-guard budget reset --agent researcher --scope day
    """


_SCOPE = click.Choice(["session", "day", "total"])


@budget.command("show")
@config_option
@click.option("--agent", help="Only this agent.")
@format_option("table", "json", "csv")
def budget_show(config_path: Path | None, agent: str | None, fmt: str) -> None:
    """Limit, spent, reserved (by the running proxy), remaining and reset time per budget.

    \b
    Example:
      egress-guard budget show --agent researcher --format json
    """
    config = load(config_path)
    if agent and agent not in config.agents:
        raise click.ClickException(f"no agent named {agent!r}. Fix: use one of {', '.join(sorted(config.agents))}")
    if config.store is None and not config.audit_path.exists():
        raise click.ClickException(f"no audit DB at {config.audit_path}. Fix: run 'egress-guard init'")
    with open_db(config_path) as db:
        rows = spend_mod.budget_rows(db, config, agent)
    emit(rows, fmt, ["agent", "scope", "key", "limit_usd", "spent_usd", "reserved_usd", "remaining_usd", "resets_at"])


@budget.command("set")
@config_option
@click.option("--agent", required=True)
@click.option("--scope", type=_SCOPE, required=True)
@click.option("--session", help="With --scope session: only this session (default: every session of the agent).")
@click.option("--usd", required=True, help="The new limit in USD, e.g. 5 or 0.25.")
def budget_set(config_path: Path | None, agent: str, scope: str, session: str | None, usd: str) -> None:
    """Set a budget; the running proxy applies it to the next request (no restart).

    \b
    Example:
      egress-guard budget set --agent researcher --scope session --session run-42 --usd 2.50
    """
    config = load(config_path)
    try:
        spend_mod.set_budget(config, agent, scope, session, usd)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"budget {scope}{':' + session if session else ''} of agent {agent} set to ${usd}")


@budget.command("reset")
@config_option
@click.option("--agent", required=True)
@click.option("--scope", type=_SCOPE, required=True)
@click.option("--session", help="With --scope session: that session's override.")
def budget_reset(config_path: Path | None, agent: str, scope: str, session: str | None) -> None:
    """Drop a run-time budget override: the config's limit applies again.

    \b
    Example:
      egress-guard budget reset --agent researcher --scope day
    """
    config = load(config_path)
    n = spend_mod.reset_budget(config, agent, scope, session)
    click.echo(f"{'reset' if n else 'no override for'} {scope}{':' + session if session else ''} of agent {agent}")
