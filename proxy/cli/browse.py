"""`audit browse`: ad-hoc SQL over the SQLite audit log in Datasette, read-only, with canned
queries for the common questions (proxy/console/browse.yaml).

It must never write to the audit DB and never serve it to anyone but the person who started
it: Datasette opens a file it serves without --immutable read-only (`mode=ro`), and only
the root actor (the sign-in link Datasette prints, with a token new each start) may see
anything; its cookies are made HttpOnly and SameSite=Strict (`strict_cookies`: browsers do
not separate cookies by port, so a page on any other 127.0.0.1 port could read a plain
one). Not --immutable: SQLite then ignores the WAL, so a running proxy's newest rows
(and, before the first checkpoint, the tables themselves) would be missing.
"""

from __future__ import annotations

import importlib.resources
import json
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import yaml

from egress_guard.cli.common import config_option, load

PLUGIN_NAME = "egress_guard_browse"


def canned_queries() -> dict[str, Any]:
    text = (importlib.resources.files("egress_guard.console") / "browse.yaml").read_text(encoding="utf-8")
    queries: dict[str, Any] = yaml.safe_load(text)
    return queries


def metadata(db_name: str) -> dict[str, Any]:
    """Datasette's metadata: the canned queries on the audit DB; everything for the root actor only."""
    return {
        "title": "egress-guard audit log",
        "description": "Read-only. Canned queries below the tables; `egress-guard audit --help` for the CLI's answers.",
        "allow": {"id": "root"},
        "databases": {db_name: {"queries": canned_queries()}},
    }


class DecimalSum:
    """`decimal_sum(cost_usd)`: the exact sum of amounts stored as text (SQL's SUM adds floats)."""

    def __init__(self) -> None:
        self.total = Decimal(0)
        self.seen = False

    def step(self, value: object) -> None:
        if value is None:
            return
        try:
            self.total += Decimal(str(value))
        except InvalidOperation:
            raise ValueError(f"decimal_sum: {value!r} is not an amount") from None
        self.seen = True

    def finalize(self) -> str | None:
        return f"{self.total:f}" if self.seen else None


def strict_cookie(value: bytes) -> bytes:
    """A Set-Cookie value with `HttpOnly; SameSite=Strict` (whatever it said of either)."""
    parts = [p.strip() for p in value.split(b";")]
    kept = [p for p in parts[1:] if p and p.split(b"=", 1)[0].strip().lower() not in (b"httponly", b"samesite")]
    return b"; ".join([parts[0], *kept, b"HttpOnly", b"SameSite=Strict"])


Receive = Callable[[], Awaitable[Any]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


def strict_cookies(app: ASGIApp) -> ASGIApp:
    """Wrap an ASGI app: every cookie it sets is HttpOnly and SameSite=Strict. Datasette's
    sign-in cookie (ds_actor) is neither by default, and browsers do not separate cookies by
    port: any page served on another 127.0.0.1 port could read it with document.cookie, or
    have a browser send it along."""

    async def wrapped(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        async def send_strict(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                headers = [
                    (name, strict_cookie(value) if name.lower() == b"set-cookie" else value)
                    for name, value in message.get("headers") or []
                ]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_strict)

    return wrapped


def _register_plugin() -> None:
    from datasette import hookimpl
    from datasette.plugins import pm

    def prepare_connection(conn: sqlite3.Connection) -> None:
        conn.create_aggregate("decimal_sum", 1, DecimalSum)  # type: ignore[arg-type]  # (typeshed: ints only)

    def asgi_wrapper(datasette: Any) -> Callable[[ASGIApp], ASGIApp]:
        return strict_cookies

    if pm.get_plugin(PLUGIN_NAME) is None:
        plugin = ModuleType(PLUGIN_NAME)  # Datasette lists plugins by __name__
        plugin.prepare_connection = hookimpl(prepare_connection)  # type: ignore[attr-defined]
        plugin.asgi_wrapper = hookimpl(asgi_wrapper)  # type: ignore[attr-defined]
        pm.register(plugin, name=PLUGIN_NAME)


@click.command()
@config_option
@click.option("--port", type=click.IntRange(1, 65535), default=8001, show_default=True, help="Port on 127.0.0.1.")
@click.option("--open", "open_browser", is_flag=True, help="Open it in your web browser.")
def browse(config_path: Path | None, port: int, open_browser: bool) -> None:
    """Browse the audit log in Datasette (read-only): tables, ad-hoc SQL, canned queries.

    Serves on 127.0.0.1 and prints a sign-in link (a token new each start): only that link's
    holder sees the data. Canned queries: denials by host and by reason, flagged refusals,
    spend by agent and day and by model (exact decimals: decimal_sum()), an agent's last
    decisions, escalations and approvals, grants, kills, the hash chain's last rows. Reads
    the SQLite audit DB only (safe while the proxy runs). Browsers send the sign-in cookie
    (HttpOnly, SameSite=Strict) to every port on 127.0.0.1, not only this one: stop audit
    browse (Ctrl-C) when done. Needs the browse
    extra: pip install 'egress-guard[browse]'.

    \b
    Example:
      egress-guard audit browse --port 8001
    """
    config = load(config_path)
    if config.store is not None:
        raise click.ClickException(
            "audit browse reads a SQLite audit DB; this config's store is PostgreSQL. "
            "Fix: query it with psql (the store's url in the config), or `egress-guard audit query`"
        )
    db = config.audit_path
    if not db.exists():
        raise click.ClickException(
            f"no audit DB at {db}. Fix: run 'egress-guard init', or pass the --config that names it"
        )
    try:
        from datasette.cli import cli as datasette
    except ImportError:
        raise click.ClickException("Datasette is not installed. Fix: pip install 'egress-guard[browse]'") from None
    _register_plugin()

    with tempfile.TemporaryDirectory(prefix="egress-guard-browse-") as tmp:
        meta = Path(tmp) / "metadata.json"
        meta.write_text(json.dumps(metadata(db.stem)), encoding="utf-8")
        args = ["serve", str(db), "--metadata", str(meta), "--host", "127.0.0.1", "--port", str(port), "--root"]
        args += ["--setting", "sql_time_limit_ms", "5000", *(["--open"] if open_browser else [])]
        click.echo(f"audit browse: {db} (read-only); open the link below, Ctrl-C stops", err=True)
        datasette.main(args=args, prog_name="datasette", standalone_mode=False)
