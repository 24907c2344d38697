"""What every command family shares: loading the config (a bad one exits 2), the --config
and --format options, opening the store (read-only unless told), minting an agent's fake keys.

Library errors become `click.ClickException`s that name the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from egress_guard import keys as keys_mod
from egress_guard import store
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


def open_db(config_path: Path | None, *, write: bool = False) -> store.Store:
    """The config's store, to use in a `with` block (which closes it)."""
    config = load(config_path)
    if config.store is None and not config.audit_path.exists():
        raise click.ClickException(
            f"no audit DB at {config.audit_path}. Fix: run 'egress-guard init', or pass the --config that names it"
        )
    try:
        return store.open_store(config, write=write)
    except store.StoreError as exc:
        raise click.ClickException(str(exc)) from None


def mint(config: Config, agent: str, ttl: str, services: str | None, session: str | None) -> keys_mod.Minted:
    try:
        return keys_mod.mint(
            config,
            agent,
            ttl=ttl,
            session=session,
            services=[s.strip() for s in services.split(",") if s.strip()] if services else None,
        )
    except (keys_mod.KeyCommandError, store.StoreError) as exc:
        raise click.ClickException(str(exc)) from None
