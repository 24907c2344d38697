"""`doctor`: check the config, CA, key material, audit DB and every service's secret."""

from __future__ import annotations

from pathlib import Path

import click

from egress_guard.cli.common import config_option, load


@click.command()
@config_option
def doctor(config_path: Path | None) -> None:
    """Check config, CA, key material, audit DB, secret backend and every service's secret.

    Prints yes/no for each; never a secret value. Exits 1 if anything is wrong. Secrets
    are checked where `up` reads them: while a proxy for this config runs, its own answers
    (from its status file); otherwise in this shell's environment, and it says which.

    \b
    Example:
      egress-guard doctor --config /etc/egress-guard/egress-guard.yaml
    """
    from egress_guard.doctor import run_checks

    config = load(config_path)
    click.echo(
        f"ok    config {config.path} ({len(config.rules)} rules, {len(config.services)} services, "
        f"{len(config.agents)} agents)"
    )
    failed = 0
    for ok, text in run_checks(config):
        click.echo(f"{'ok  ' if ok else 'FAIL'}  {text}")
        failed += not ok
    if failed:
        raise click.ClickException(f"{failed} check(s) failed")
