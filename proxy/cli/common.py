"""What every command family shares: loading the config (a bad one exits 2), the --config
and --format options, opening the audit DB read-only, minting an agent's fake keys.

Library errors become `click.ClickException`s that name the problem and the fix.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from egress_guard import audit as audit_db
from egress_guard import keys as keys_mod
from egress_guard.config import DEFAULT_CONFIG_NAME, Config, ConfigError, load_config

CONFIG_HELP = f"Config file (default: ./{DEFAULT_CONFIG_NAME}, or $EGRESS_GUARD_CONFIG)."


class ConfigProblem(click.ClickException):
    exit_code = 2


def load(path: Path | None) -> Config:
    try:
        return load_config(path or Path(DEFAULT_CONFIG_NAME))
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from None


def config_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar="EGRESS_GUARD_CONFIG",
        help=CONFIG_HELP,
    )(fn)


def format_option(*choices: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--format", "fmt", type=click.Choice(list(choices)), default=choices[0], show_default=True)


def open_db(config_path: Path | None) -> sqlite3.Connection:
    config = load(config_path)
    if not config.audit_path.exists():
        raise click.ClickException(
            f"no audit DB at {config.audit_path}. Fix: run 'egress-guard init', or pass the --config that names it"
        )
    try:
        return audit_db.connect(config.audit_path, readonly=True)
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot open {config.audit_path}: {exc}") from None


def mint(config: Config, agent: str, ttl: str, services: str | None, session: str | None) -> keys_mod.Minted:
    try:
        return keys_mod.mint(
            config,
            agent,
            ttl=ttl,
            session=session,
            services=[s.strip() for s in services.split(",") if s.strip()] if services else None,
        )
    except keys_mod.KeyError_ as exc:
        raise click.ClickException(str(exc)) from None
