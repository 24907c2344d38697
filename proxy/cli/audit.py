"""`audit`: ask the audit log what agents did — `query` (the default), `tail`, `stats`, `spend` —
keep its size in check (`prune`), and check nobody changed it (`verify`).

Every query command takes the same filters (`filter_options`) and output formats; the store
is opened read-only, so these never disturb a running proxy's writer.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from egress_guard import spend_report as spend_mod
from egress_guard.cli.browse import browse
from egress_guard.cli.common import config_option, format_option, load, open_db
from egress_guard.cli.output import emit, table
from egress_guard.store import Filters, Store
from egress_guard.store.chain import Verifier, parse_anchors
from egress_guard.timeutil import parse_duration, parse_when

TABLE_COLUMNS = ["id", "ts", "decision", "method", "host", "port", "path", "status", "reason"]


def _when(value: str | None, param: str) -> str | None:
    if value is None:
        return None
    try:
        return parse_when(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=param) from None


def filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The filters every audit query shares, turned into one `filters` argument."""

    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        agent: str | None,
        host: str | None,
        decision: str | None,
        since: str | None,
        until: str | None,
        **kwargs: Any,
    ) -> Any:
        filters = Filters(
            agent,
            host.lower().rstrip(".") if host else None,
            decision,
            _when(since, "--since"),
            _when(until, "--until"),
        )
        return fn(*args, filters=filters, **kwargs)

    for option in reversed(
        [
            click.option("--agent", help="Only this agent."),
            click.option("--host", help="Only this destination host."),
            click.option("--decision", type=click.Choice(["allow", "deny", "error"])),
            click.option("--since", help="From this time: ISO (2026-11-22T09:00, UTC if no zone) or 15m, 2h, 3d ago."),
            click.option("--until", help="Before this time (same forms as --since)."),
        ]
    ):
        wrapper = option(wrapper)
    return config_option(wrapper)


class _DefaultQueryGroup(click.Group):
    """`egress-guard audit --host x` means `egress-guard audit query --host x`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["query", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultQueryGroup)
def audit() -> None:
    """Ask the audit log what agents did: `query` (the default), `tail`, `stats`; `prune` old
    rows; `verify` the hash chain; `browse` it in Datasette (ad-hoc SQL, read-only).

    \b
    Examples:
      egress-guard audit --agent researcher --since 1d
      egress-guard audit --decision deny --since 2h --format json
      egress-guard audit stats --since 1d
      egress-guard audit prune --older-than 30d
      egress-guard audit verify --anchors /var/log/egress-guard.log
      egress-guard audit browse
    """


@audit.command()
@filter_options
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="The newest N rows.")
@format_option("table", "json", "csv")
def query(config_path: Path | None, filters: Filters, limit: int, fmt: str) -> None:
    """Rows matching the filters, oldest first (the newest --limit of them).

    \b
    Example:
      egress-guard audit query --host api.openai.com --since 2026-11-22T00:00 --format csv
    """
    with open_db(config_path) as db:
        rows = db.rows(filters, limit)
    emit(rows, fmt, None if fmt != "table" else TABLE_COLUMNS)


@audit.command()
@filter_options
@click.option("-n", "--lines", type=click.IntRange(0), default=10, show_default=True, help="Rows to show first.")
@click.option("--follow/--no-follow", default=True, show_default=True, help="Keep printing new rows.")
@click.option("--interval", type=click.FloatRange(0.05), default=0.5, show_default=True, help="Poll interval, seconds.")
@format_option("table", "jsonl")
def tail(config_path: Path | None, filters: Filters, lines: int, follow: bool, interval: float, fmt: str) -> None:
    """Show the newest rows, then follow new ones as the proxy writes them (Ctrl-C stops).

    \b
    Example:
      egress-guard audit tail --decision deny
    """
    with open_db(config_path) as db:
        first = db.rows(filters, lines) if lines else []
        last_id = first[-1]["id"] if first else db.last_id()
        printer = (
            (lambda rows, header: click.echo(table(rows, TABLE_COLUMNS, header=header), nl=False))
            if fmt == "table"
            else (lambda rows, header: emit(rows, "jsonl"))
        )
        printer(first, True)
        if not follow:
            return
        try:
            for row in _follow(db, filters, last_id, interval):
                printer([row], False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


def _follow(db: Store, filters: Filters, after_id: int, interval: float) -> Iterator[dict[str, Any]]:
    while True:
        rows = db.rows(filters, None, after_id=after_id)
        for row in rows:
            after_id = row["id"]
            yield row
        if not rows:
            time.sleep(interval)


@audit.command()
@filter_options
@format_option("table", "json", "csv")
def stats(config_path: Path | None, filters: Filters, fmt: str) -> None:
    """Counts and bytes by host and decision.

    \b
    Example:
      egress-guard audit stats --since 1d --agent researcher
    """
    with open_db(config_path) as db:
        rows = db.stats(filters)
    emit(rows, fmt, ["host", "decision", "requests", "request_bytes", "response_bytes", "first", "last"])


@audit.command()
@filter_options
@click.option(
    "--by", "by", type=click.Choice(["agent", "session", "model", "day", "service"]), default="agent", show_default=True
)
@format_option("table", "json", "csv")
def spend(config_path: Path | None, filters: Filters, by: str, fmt: str) -> None:
    """What agents spent, from the real token usage of each call (exact decimals).

    \b
    Example:
      egress-guard audit spend --by model --since 1d
    """
    config = load(config_path)
    with open_db(config_path) as db:
        rows = spend_mod.spend_by(db, filters, by, config.spend)
    emit(rows, fmt, [by, "requests", "input_tokens", "output_tokens", "cached_tokens", "cost_usd"])


@audit.command()
@config_option
@click.option("--older-than", "older_than", required=True, help="Delete rows older than this: 30d, 12w, 36h.")
@click.option("--yes", is_flag=True, help="Delete without asking.")
def prune(config_path: Path | None, older_than: str, yes: bool) -> None:
    """Delete audit rows older than an age, to keep the log's size in check.

    Budgets are unaffected: they read running totals kept beside the rows, and the rows of
    the budget day still open are never deleted. Intents of calls in flight, keys and
    budget overrides are kept. Safe while the proxy runs (rows go a few thousand at a time).

    \b
    Example:
      egress-guard audit prune --older-than 30d --yes
    """
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    config = load(config_path)
    before, clamped = spend_mod.prune_before(config.spend, seconds)
    kept = " (the open budget day's rows are kept)" if clamped else ""
    with open_db(config_path, write=True) as db:
        n = db.count(Filters(until=before))
        if not n:
            click.echo(f"nothing to prune: no audit rows before {before}{kept}")
            return
        if not yes:
            click.confirm(f"delete {n} audit rows before {before} from {config.store_name}{kept}?", abort=True)
        deleted = db.prune(before)
    click.echo(f"pruned {deleted} audit rows before {before}{kept}")


@audit.command()
@config_option
@click.option(
    "--anchors",
    "anchors_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="A log of the proxy's (or several, concatenated): check each 'audit anchor:' line against the DB.",
)
@format_option("text", "json")
def verify(config_path: Path | None, anchors_path: Path | None, fmt: str) -> None:
    """Check the audit log's hash chains: exit 1 naming the first row edited, inserted or
    deleted; else exit 0 with the rows and head of each chain.

    Each writer (the proxy; each replica on PostgreSQL) chains its rows: a row's hash covers
    the one before it. An edited row, a row inserted by hand and a gap (deleted rows) show.
    Rewriting the whole table, or deleting its newest rows, shows only against the anchors
    the proxy logs (`audit anchor: chain=... seq=... hash=...`, every minute and at stop):
    keep its log elsewhere and pass it as --anchors. Rows from before the chain (schema
    0007) are counted as unverifiable. Reads the DB only; safe while the proxy runs.

    \b
    Example:
      egress-guard audit verify --anchors /var/log/egress-guard.log
    """
    anchors = []
    if anchors_path is not None:
        with anchors_path.open(encoding="utf-8", errors="replace") as log_file:
            anchors = parse_anchors(log_file)
    with open_db(config_path) as db:
        checker = Verifier(starts=db.chain_starts(), anchors=anchors, floor=db.chain_floor())
        for record in db.audit_chain():
            checker.feed(record)
        checker.finish()
        name = db.name
    if anchors_path is not None and not anchors:
        checker.problem_count += 1
        checker.problems.append(f"no 'audit anchor:' lines in {anchors_path} (is it the proxy's log, at INFO?)")
    report = checker.report()
    if fmt == "json":
        click.echo(json.dumps({"store": name, **report}, indent=2))
    else:
        click.echo(_verify_text(name, report, anchors_path))
    if not checker.ok:
        sys.exit(1)


def _verify_text(name: str, report: dict[str, Any], anchors_path: Path | None) -> str:
    lines = []
    for problem in report["first_problems"]:
        lines.append(f"FAILED: {problem}")
    if report["problems"] > len(report["first_problems"]):
        lines.append(f"... {report['problems'] - len(report['first_problems'])} more problems")
    verdict = "FAILED" if report["problems"] else "ok"
    lines.append(f"{name}: {verdict}: {report['rows']} rows in {len(report['chains'])} chains")
    for chain_name, c in report["chains"].items():
        pruned = f", starts after seq {c['starts_after_seq']} (pruned)" if c["starts_after_seq"] else ""
        amended = f", {c['amended']} amended (responses cut after their row was written)" if c["amended"] else ""
        lines.append(
            f"  chain {chain_name}: {c['rows']} rows, head seq {c['head_seq']} hash {c['head_hash']}{pruned}{amended}"
        )
    if report["amended_ids"]:
        lines.append(f"  amended rows: ids {', '.join(map(str, report['amended_ids']))}")
    if report["unchained_rows"]:
        lines.append(f"  {report['unchained_rows']} rows from before the hash chain (schema 0007): unverifiable")
    if anchors_path is not None:
        a = report["anchors"]
        lines.append(
            f"  anchors in {anchors_path}: {a['found']} found, {a['checked']} checked, "
            f"{a['pruned']} of pruned rows (unchecked)"
        )
    return "\n".join(lines)


audit.add_command(browse)
