"""`store`: move a deployment's state between store engines."""

from __future__ import annotations

from pathlib import Path

import click

from egress_guard.cli.common import config_option, format_option, load
from egress_guard.cli.output import emit
from egress_guard.store import StoreError


@click.group()
def store() -> None:
    """The store: where keys, budgets and the audit log live (SQLite or PostgreSQL).

    \b
    Example:
      egress-guard store copy --from ./egress-guard.db --config fleet.yaml
    """


@store.command("copy")
@config_option
@click.option(
    "--from",
    "source",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The SQLite store to copy (default: the config's audit.path).",
)
@format_option("table", "json")
def copy(config_path: Path | None, source: Path | None, fmt: str) -> None:
    """Copy a SQLite store (audit history, keys, revocations, budgets, spend) into the
    PostgreSQL store the config names (`store: postgresql://…`), which must be empty.

    Stop the proxy that uses the SQLite file first. Its unfinished metered calls are settled
    at their reservation (as its next start would). The copy is one transaction: if it fails,
    the PostgreSQL store is left as it was. Afterwards `audit verify` passes on the copy and
    replicas on it enforce the same remaining budgets.

    \b
    Example:
      egress-guard store copy --from ./egress-guard.db --config fleet.yaml
    """
    config = load(config_path)
    if config.store is None:
        raise click.ClickException(
            f"{config.path} names no PostgreSQL store. Fix: add `store: postgresql://USER@HOST:PORT/DB` "
            "to it (the destination), and pass the SQLite file with --from"
        )
    path = (source or config.audit_path).resolve()
    from egress_guard.store.copy import copy_sqlite_to_postgres  # psycopg: only for this command

    try:
        report = copy_sqlite_to_postgres(path, config.store, progress=lambda text: click.echo(text, err=True))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    rows = [{"table": table, "rows": n} for table, n in report.rows.items()]
    if fmt == "json":
        import json

        click.echo(
            json.dumps(
                {
                    "from": report.source,
                    "to": report.destination,
                    "rows": report.rows,
                    "settled_at_reservation": report.settled,
                    "cost_usd": report.cost_usd,
                },
                indent=2,
            )
        )
        return
    emit(rows, "table", ["table", "rows"])
    if report.settled:
        click.echo(f"{report.settled} unfinished metered calls were settled at their reservation first")
    click.echo(f"copied {report.source} into {report.destination}; check it with: egress-guard audit verify")
