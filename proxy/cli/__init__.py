"""The `egress-guard` command line. Each command's docstring is its --help, with an example.

Library errors become `click.ClickException`s that name the problem and the fix; a bad
config exits 2 before anything listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import functools
import io
import json
import logging
import os
import shlex
import shutil
import signal
import sqlite3
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from egress_guard import audit as audit_db
from egress_guard import ca
from egress_guard import keys as keys_mod
from egress_guard import spend_report as spend_mod
from egress_guard import status as status_mod
from egress_guard.bootstrap import init as do_init
from egress_guard.config import DEFAULT_CONFIG_NAME, Config, ConfigError, load_config, parse_listen
from egress_guard.envvars import agent_env, render

CONFIG_HELP = f"Config file (default: ./{DEFAULT_CONFIG_NAME}, or $EGRESS_GUARD_CONFIG)."


class ConfigProblem(click.ClickException):
    exit_code = 2


def _load(path: Path | None) -> Config:
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="egress-guard")
def main() -> None:
    """egress-guard: a default-deny, auditing TLS egress proxy for AI agents.

    \b
    Quick start:
      egress-guard up                      # creates config, CA, DB if missing; runs the proxy
      egress-guard run -- python agent.py  # runs an agent through it
      egress-guard audit --since 1h        # what did it do?
    """


# --- init / up -----------------------------------------------------------------------------


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("."),
    show_default=True,
    help="Where to put egress-guard.yaml, certs/ and the audit DB.",
)
def init(directory: Path) -> None:
    """Create the config, the CA and the audit DB, keeping any that exist.

    Never overwrites an existing CA, config or database; says what it kept.

    \b
    Example:
      egress-guard init --dir ~/.egress-guard
    """
    _init(directory, err=False)


def _init(directory: Path, *, err: bool) -> None:
    try:
        report = do_init(directory)
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write to {directory}: {exc}. Fix: choose a writable --dir") from None
    for item in report.created:
        click.echo(f"created {item}", err=err)
    for item in report.kept:
        click.echo(f"kept    {item}", err=err)


@main.command()
@config_option
@click.option("--listen", help="HOST:PORT to listen on, overriding the config (default 127.0.0.1:8080).")
@click.option("-v", "--verbose", is_flag=True, help="Log every decision, not only denials and errors.")
def up(config_path: Path | None, listen: str | None, verbose: bool) -> None:
    """Run the proxy in the foreground until Ctrl-C or SIGTERM.

    With no --config and no ./egress-guard.yaml, it first creates the default config, CA
    and audit DB in the current directory. A bad config exits with status 2 before
    listening. Real secrets come from this shell's environment (env backend): export them
    first; `up` warns about each service whose secret does not resolve. It keeps a status
    file next to the audit DB (pid, address, secrets resolve yes/no; never a value) that
    `doctor`, `env` and `run` read. On shutdown every pending audit row is written.

    \b
    Example:
      egress-guard up --listen 127.0.0.1:8080
    """
    if config_path is None and not Path(DEFAULT_CONFIG_NAME).exists():
        click.echo("no egress-guard.yaml here: creating the defaults", err=True)
        _init(Path("."), err=True)
    config = _load(config_path)
    address = None
    if listen:
        try:
            address = parse_listen(listen)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--listen") from None
    if not ca.CAFiles(config.ca_dir).exists():
        ca.create_ca(config.ca_dir)
        click.echo(f"created CA {ca.CAFiles(config.ca_dir).cert}", err=True)
    ca.write_bundle(config.ca_dir)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("egress_guard").setLevel(logging.DEBUG if verbose else logging.INFO)
    sys.exit(asyncio.run(_serve(config, address)))


async def _serve(config: Config, listen: tuple[str, int] | None) -> int:
    from egress_guard.server import EgressProxy, StartupError

    proxy = EgressProxy(config, listen=listen)
    try:
        host, port = await proxy.start()
    except StartupError as exc:
        click.echo(f"Error: {exc}", err=True)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown_host = f"[{host}]" if ":" in host else host
    sources = ", ".join(config.presets) or "no presets"
    click.echo(
        f"egress-guard listening on http://{shown_host}:{port}\n"
        f"  config:   {config.path} ({len(config.rules)} allow rules: {sources}"
        f"{', inline' if any(r.id.startswith('inline') for r in config.rules) else ''})\n"
        f"  CA:       {ca.CAFiles(config.ca_dir).cert} (agents must trust it)\n"
        f"  audit DB: {config.audit_path}\n" + _next_steps(config),
        err=False,
    )
    sys.stdout.flush()
    status = status_mod.Status(
        pid=os.getpid(),
        started_at=status_mod.now(),
        listen=f"{shown_host}:{port}",
        config=str(config.path),
        checked_at=status_mod.now(),
    )
    watch = asyncio.create_task(_watch(proxy, config, status))
    await stop.wait()
    watch.cancel()
    status_mod.remove(status_mod.status_path(config), status.pid)
    click.echo("shutting down: closing listener, flushing audit log", err=True)
    lost = await proxy.stop()
    click.echo(f"stopped; {proxy.audit.written} audit rows written, {lost} lost", err=True)
    return 0 if lost == 0 else 1


def _prog() -> str:
    """How the user can run egress-guard from another shell: `./dev eg` when `./dev` says so
    (EGRESS_GUARD_PROG), `egress-guard` when that is this program on PATH, else its path."""
    given = os.environ.get("EGRESS_GUARD_PROG", "").strip()
    if given:
        return given
    argv0 = sys.argv[0]
    if argv0.endswith("__main__.py") or argv0 == "-m":
        return f"{shlex.quote(sys.executable)} -m egress_guard"
    on_path = shutil.which("egress-guard")
    with contextlib.suppress(OSError):
        if on_path and os.path.samefile(on_path, argv0):
            return "egress-guard"
    return shlex.quote(os.path.abspath(argv0))


def _next_steps(config: Config) -> str:
    """The banner's commands for agents, as they work when pasted into another shell."""
    prog = _prog()
    default = (Path.cwd() / DEFAULT_CONFIG_NAME).resolve()
    # ./dev runs egress-guard from the directory it lives in, so it finds the default config;
    # anywhere else the other shell may be in another directory (the agent's own).
    config_arg = ""
    if not (os.environ.get("EGRESS_GUARD_PROG") and config.path == default):
        config_arg = f" --config {shlex.quote(str(config.path))}"
    if not config.agents:
        return (
            "  agents:   none configured: add an agents: section to give agents fake keys\n"
            f"  run:      {prog} run{config_arg} -- CMD        (proxy and CA only, no keys)\n"
        )
    names = ", ".join(f"{name} ({', '.join(a.services) or 'no services'})" for name, a in config.agents.items())
    first = next(iter(config.agents))
    return (
        f"  agents:   {names}\n"
        f"  run:      {prog} run{config_arg} --agent {first} -- CMD\n"
        f'  or:       eval "$({prog} env{config_arg} --agent {first})"   (then start the agent in that shell)\n'
    )


async def _watch(proxy: Any, config: Config, status: status_mod.Status) -> None:
    """Say on the console when a service's secret does not resolve (and when that changes),
    keep the status file `doctor` reads current, and say when the audit log goes down
    (requests are then refused) and back."""
    path = status_mod.status_path(config)
    secrets: dict[str, status_mod.SecretStatus] = {}
    down = False
    last_check = -1e9
    while True:
        if loop_time() - last_check >= SECRET_RECHECK:
            last_check = loop_time()
            now = await status_mod.check_secrets(config, proxy.secrets)
            for name, st in now.items():
                before = secrets.get(name)
                if not st.resolves and (before is None or before.resolves):
                    click.echo(_secret_warning(config, name, st), err=True)
                elif st.resolves and before is not None and not before.resolves:
                    click.echo(f"egress-guard: service {name}: its secret {st.secret} resolves now", err=True)
            if now != secrets or not path.exists():
                secrets = now
                status = dataclasses.replace(status, services=secrets, checked_at=status_mod.now())
                try:
                    status_mod.write(path, status)
                except OSError as exc:
                    click.echo(f"egress-guard: cannot write {path} ({exc.strerror}): doctor will not see it", err=True)
        if not proxy.audit.healthy and not down:
            click.echo(f"egress-guard: REFUSING REQUESTS: {proxy.audit.unhealthy_reason}", err=True)
            down = True
        elif proxy.audit.healthy and down:
            click.echo("egress-guard: audit log recovered; accepting requests", err=True)
            down = False
        await asyncio.sleep(0.5)


SECRET_RECHECK = 15.0  # seconds; a cached secret answers at once, so this costs nothing


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def _secret_warning(config: Config, name: str, st: status_mod.SecretStatus) -> str:
    if st.secret.startswith("env:"):
        var = st.secret.removeprefix("env:")
        fix = f"export {var} in the shell you start 'up' from, then restart it"
    else:
        fix = "check that secret in vault and the token's policy; egress-guard retries by itself"
    return (
        f"egress-guard: WARNING: service {name}: its secret {st.secret} does not resolve ({st.problem}); "
        f"its requests get 503 until it does. Fix: {fix}"
    )


# --- env / run -----------------------------------------------------------------------------


def _agent_env(
    config_path: Path | None,
    proxy_host: str | None,
    no_proxy: str | None,
    agent: str | None,
    ttl: str,
    services: str | None,
) -> tuple[dict[str, str], set[str]]:
    """The agent's variables (with fresh fake keys when `agent` is given), and the names of
    the host's real-secret variables the agent must not inherit."""
    config = _load(config_path)
    if not ca.CAFiles(config.ca_dir).exists():
        raise click.ClickException(f"no CA in {config.ca_dir}. Fix: run 'egress-guard init' (or 'egress-guard up')")
    bundle = ca.write_bundle(config.ca_dir)
    running = status_mod.read(config)  # `up --listen` may listen elsewhere than the config says
    listen = running.listen_host_port if running is not None else None
    out = agent_env(config, bundle=bundle, proxy_host=proxy_host, no_proxy=no_proxy, listen=listen)
    if agent and agent in config.agents and not config.agents[agent].services and not services:
        # Still the proxy variables: without them `eval` would leave the agent going direct.
        click.echo(
            f"egress-guard: agent {agent!r} has no credentialed services (agents.{agent}.services): "
            "no keys minted; proxy and CA variables only",
            err=True,
        )
        out["EGRESS_GUARD_AGENT"] = agent
    elif agent:
        minted = _mint(config, agent, ttl, services, None)
        out |= minted.env
        out["EGRESS_GUARD_AGENT"], out["EGRESS_GUARD_SESSION"] = agent, minted.record.session
    return out, keys_mod.secret_env_names(config) - set(out)


def _mint(config: Config, agent: str, ttl: str, services: str | None, session: str | None) -> keys_mod.Minted:
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


def env_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--services", help="With --agent: only these services (comma-separated).")(fn)
    fn = click.option("--ttl", default="8h", show_default=True, help="With --agent: how long the keys live.")(fn)
    fn = click.option("--agent", help="Mint fake keys for this agent (a new session) and include them.")(fn)
    fn = click.option("--no-proxy", help="NO_PROXY value (default: localhost,127.0.0.1,::1).")(fn)
    fn = click.option("--proxy-host", help="Address agents reach the proxy at (default: the listen host).")(fn)
    return config_option(fn)


@main.command()
@env_options
@click.option("--format", "fmt", type=click.Choice(["sh", "dotenv", "json"]), default="sh", show_default=True)
def env(
    config_path: Path | None,
    proxy_host: str | None,
    no_proxy: str | None,
    agent: str | None,
    ttl: str,
    services: str | None,
    fmt: str,
) -> None:
    """Print the environment an agent process or container needs.

    HTTP(S)_PROXY in both cases, NO_PROXY, and the CA for every common runtime: variables
    that *replace* the trust store (SSL_CERT_FILE, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, ...)
    point at a bundle of the system roots plus the egress-guard CA. With --agent, also a new
    session's fake keys, in every variable popular agent CLIs read (OPENAI_API_KEY and
    CODEX_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY and GOOGLE_API_KEY, GH_TOKEN and
    GITHUB_TOKEN); an agent with no services gets the proxy variables alone. In sh format,
    `unset` lines for the host's real-secret variables. When `up` runs, its real address.

    \b
    Examples:
      eval "$(egress-guard env --agent researcher)"
      egress-guard env --format dotenv --proxy-host 172.17.0.1 --agent ci > agent.env
    """
    variables, hidden = _agent_env(config_path, proxy_host, no_proxy, agent, ttl, services)
    text = render(variables, fmt)
    if fmt == "sh" and hidden:
        text += "".join(f"unset {name}\n" for name in sorted(hidden))
    click.echo(text, nl=False)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@env_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    config_path: Path | None,
    proxy_host: str | None,
    no_proxy: str | None,
    agent: str | None,
    ttl: str,
    services: str | None,
    command: tuple[str, ...],
) -> None:
    """Run a local command with the agent environment (see `env`).

    The command never inherits the host's real secrets (the variables the config's env:
    secrets and vault credentials name); with --agent it gets fresh fake keys instead.

    \b
    Example:
      egress-guard run --agent researcher -- python my_agent.py --task "summarise the repo"
    """
    variables, hidden = _agent_env(config_path, proxy_host, no_proxy, agent, ttl, services)
    environment = {k: v for k, v in os.environ.items() if k not in hidden} | variables
    try:
        os.execvpe(command[0], list(command), environment)  # noqa: S606 - the user's own command
    except OSError as exc:
        raise click.ClickException(
            f"cannot run {command[0]!r}: {exc.strerror}. Fix: check the command and PATH"
        ) from None


# --- audit ---------------------------------------------------------------------------------

TABLE_COLUMNS = ["id", "ts", "decision", "method", "host", "port", "path", "status", "reason"]


def _emit(rows: list[dict[str, Any]], fmt: str, columns: list[str] | None = None) -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
    elif fmt == "jsonl":
        for row in rows:
            click.echo(json.dumps(row))
    elif fmt == "csv":
        out = io.StringIO()
        fields = list(rows[0]) if rows else (columns or audit_db.COLUMNS)
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        click.echo(out.getvalue(), nl=False)
    else:
        click.echo(_table(rows, columns or (list(rows[0]) if rows else [])), nl=False)


CELL_MAX = 80  # a column other than the last is cut here (with …)
LAST_MIN = 30  # the last column (reason) wraps beside the others if it gets this much room


def _table(rows: Iterable[dict[str, Any]], columns: list[str], *, header: bool = True) -> str:
    """Columns padded to their widest cell; the last one (the reason, which says what to
    fix) is never cut: it wraps within the terminal's width, continuing under itself, or
    on indented lines below its row when the terminal is too narrow for that."""

    def cell(value: Any, last: bool) -> str:
        text = "" if value is None else " ".join(str(value).split())
        return text if last or len(text) <= CELL_MAX else text[: CELL_MAX - 1] + "…"

    cells = [[cell(r.get(c), i == len(columns) - 1) for i, c in enumerate(columns)] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    total = shutil.get_terminal_size().columns
    indent = sum(widths[:-1]) + 2 * (len(columns) - 1)
    beside = total - indent >= min(LAST_MIN, widths[-1])
    room = total - indent if beside else max(total - 4, LAST_MIN)
    if beside:
        widths[-1] = min(widths[-1], room)
    lines = [("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))).rstrip()] if header else []
    for row in cells:
        last = textwrap.wrap(row[-1], room, break_on_hyphens=False) or [""]
        if beside:
            lines.append("  ".join(v.ljust(w) for v, w in zip([*row[:-1], last[0]], widths, strict=True)).rstrip())
            lines += [" " * indent + more for more in last[1:]]
        else:
            lines.append("  ".join(v.ljust(w) for v, w in zip(row[:-1], widths, strict=False)).rstrip())
            lines += ["    " + more for more in last if more]
    return "\n".join(lines) + ("\n" if lines else "")


def _when(value: str | None, param: str) -> str | None:
    if value is None:
        return None
    try:
        return audit_db.parse_when(value)
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
        filters = audit_db.Filters(
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


def format_option(*choices: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--format", "fmt", type=click.Choice(list(choices)), default=choices[0], show_default=True)


def _open_db(config_path: Path | None) -> sqlite3.Connection:
    config = _load(config_path)
    if not config.audit_path.exists():
        raise click.ClickException(
            f"no audit DB at {config.audit_path}. Fix: run 'egress-guard init', or pass the --config that names it"
        )
    try:
        return audit_db.connect(config.audit_path, readonly=True)
    except sqlite3.Error as exc:
        raise click.ClickException(f"cannot open {config.audit_path}: {exc}") from None


class _DefaultQueryGroup(click.Group):
    """`egress-guard audit --host x` means `egress-guard audit query --host x`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["query", *args]
        return super().parse_args(ctx, args)


@main.group(cls=_DefaultQueryGroup)
def audit() -> None:
    """Ask the audit log what agents did: `query` (the default), `tail`, `stats`.

    \b
    Examples:
      egress-guard audit --agent researcher --since 1d
      egress-guard audit --decision deny --since 2h --format json
      egress-guard audit stats --since 1d
    """


@audit.command()
@filter_options
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="The newest N rows.")
@format_option("table", "json", "csv")
def query(config_path: Path | None, filters: audit_db.Filters, limit: int, fmt: str) -> None:
    """Rows matching the filters, oldest first (the newest --limit of them).

    \b
    Example:
      egress-guard audit query --host api.openai.com --since 2026-11-22T00:00 --format csv
    """
    with _open_db(config_path) as conn:
        rows = audit_db.query(conn, filters, limit)
    _emit(rows, fmt, None if fmt != "table" else TABLE_COLUMNS)


@audit.command()
@filter_options
@click.option("-n", "--lines", type=click.IntRange(0), default=10, show_default=True, help="Rows to show first.")
@click.option("--follow/--no-follow", default=True, show_default=True, help="Keep printing new rows.")
@click.option("--interval", type=click.FloatRange(0.05), default=0.5, show_default=True, help="Poll interval, seconds.")
@format_option("table", "jsonl")
def tail(
    config_path: Path | None, filters: audit_db.Filters, lines: int, follow: bool, interval: float, fmt: str
) -> None:
    """Show the newest rows, then follow new ones as the proxy writes them (Ctrl-C stops).

    \b
    Example:
      egress-guard audit tail --decision deny
    """
    with _open_db(config_path) as conn:
        first = audit_db.query(conn, filters, lines) if lines else []
        last_id = first[-1]["id"] if first else (conn.execute("SELECT COALESCE(MAX(id), 0) FROM audit").fetchone()[0])
        printer = (
            (lambda rows, header: click.echo(_table(rows, TABLE_COLUMNS, header=header), nl=False))
            if fmt == "table"
            else (lambda rows, header: _emit(rows, "jsonl"))
        )
        printer(first, True)
        if not follow:
            return
        try:
            for row in audit_db.follow(conn, filters, last_id, interval):
                printer([row], False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


@audit.command()
@filter_options
@format_option("table", "json", "csv")
def stats(config_path: Path | None, filters: audit_db.Filters, fmt: str) -> None:
    """Counts and bytes by host and decision.

    \b
    Example:
      egress-guard audit stats --since 1d --agent researcher
    """
    with _open_db(config_path) as conn:
        rows = audit_db.stats(conn, filters)
    _emit(rows, fmt, ["host", "decision", "requests", "request_bytes", "response_bytes", "first", "last"])


# --- keys / kill ---------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Mint, list and revoke agents' fake keys (the only credentials agents hold).

    \b
    Examples:
      egress-guard keys mint --agent researcher --ttl 2h --services openai
      egress-guard keys list --all
      egress-guard keys revoke 3f2a…
    """


@keys.command("mint")
@config_option
@click.option("--agent", required=True, help="The agent (from the config's agents:).")
@click.option("--ttl", default="8h", show_default=True, help="Lifetime: 90s, 30m, 8h, 7d (at most 90d).")
@click.option("--services", help="Comma-separated subset of the agent's services (default: all of them).")
@click.option("--session", help="Session id to mint for (default: a new one).")
@click.option("--format", "fmt", type=click.Choice(["sh", "dotenv", "json"]), default="sh", show_default=True)
def keys_mint(
    config_path: Path | None, agent: str, ttl: str, services: str | None, session: str | None, fmt: str
) -> None:
    """Mint fake keys for an agent's session; prints them once as variables.

    \b
    Example:
      eval "$(egress-guard keys mint --agent researcher --ttl 2h)"
    """
    minted = _mint(_load(config_path), agent, ttl, services, session)
    r = minted.record
    click.echo(
        f"minted key {r.key_id} for agent {r.agent}, session {r.session}, "
        f"services {', '.join(r.services)}, expires {r.expires_at}",
        err=True,
    )
    variables = minted.env | {"EGRESS_GUARD_AGENT": r.agent, "EGRESS_GUARD_SESSION": r.session}
    click.echo(render(variables, fmt), nl=False)


@keys.command("list")
@config_option
@click.option("--agent", help="Only this agent's keys.")
@click.option("--all", "include_all", is_flag=True, help="Include expired and revoked keys.")
@format_option("table", "json", "csv")
def keys_list(config_path: Path | None, agent: str | None, include_all: bool, fmt: str) -> None:
    """List keys (ids, agent, session, services, expiry, status) — never the keys themselves.

    \b
    Example:
      egress-guard keys list --agent researcher --all
    """
    rows = keys_mod.list_keys(_load(config_path), agent, include_all)
    _emit(rows, fmt, ["key_id", "agent", "session", "services", "expires_at", "status", "revoked_reason"])


@keys.command("revoke")
@config_option
@click.argument("key_ids", nargs=-1, required=True)
@click.option("--reason", default="revoked by operator", show_default=True)
def keys_revoke(config_path: Path | None, key_ids: tuple[str, ...], reason: str) -> None:
    """Revoke keys by id (from `keys list`); a running proxy refuses them within a second.

    \b
    Example:
      egress-guard keys revoke 3f2a9c01d4e5b6a7c8d9 --reason "leaked in a log"
    """
    config = _load(config_path)
    for key_id in key_ids:
        n = keys_mod.revoke_keys(config, key_id=key_id, reason=reason)
        click.echo(f"{'revoked' if n else 'no active key'} {key_id}")


@main.command()
@config_option
@click.option("--agent", help="Revoke every key of this agent.")
@click.option("--session", help="Revoke every key of this session.")
@click.option("--reason", default="kill switch", show_default=True)
def kill(config_path: Path | None, agent: str | None, session: str | None, reason: str) -> None:
    """Kill switch: revoke every key of an agent or session at once.

    A running proxy refuses their next request within a second and cuts their open
    connections, streams included. Revocations are stored and survive restarts.

    \b
    Example:
      egress-guard kill --agent researcher --reason "runaway loop"
    """
    if bool(agent) == bool(session):
        raise click.UsageError("name exactly one of --agent or --session")
    n = keys_mod.revoke_keys(_load(config_path), agent=agent, session=session, reason=reason)
    click.echo(f"revoked {n} key(s) of {'agent ' + agent if agent else 'session ' + str(session)}")


@main.command()
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

    config = _load(config_path)
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


# --- spend ---------------------------------------------------------------------------------


@audit.command()
@filter_options
@click.option(
    "--by", "by", type=click.Choice(["agent", "session", "model", "day", "service"]), default="agent", show_default=True
)
@format_option("table", "json", "csv")
def spend(config_path: Path | None, filters: audit_db.Filters, by: str, fmt: str) -> None:
    """What agents spent, from the real token usage of each call (exact decimals).

    \b
    Example:
      egress-guard audit spend --by model --since 1d
    """
    config = _load(config_path)
    with _open_db(config_path) as conn:
        rows = spend_mod.spend_by(conn, filters, by, config.spend)
    _emit(rows, fmt, [by, "requests", "input_tokens", "output_tokens", "cached_tokens", "cost_usd"])


@main.group()
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
    config = _load(config_path)
    if agent and agent not in config.agents:
        raise click.ClickException(f"no agent named {agent!r}. Fix: use one of {', '.join(sorted(config.agents))}")
    if not config.audit_path.exists():
        raise click.ClickException(f"no audit DB at {config.audit_path}. Fix: run 'egress-guard init'")
    with audit_db.connect(config.audit_path, readonly=True) as conn:
        rows = spend_mod.budget_rows(conn, config, agent)
    _emit(rows, fmt, ["agent", "scope", "key", "limit_usd", "spent_usd", "reserved_usd", "remaining_usd", "resets_at"])


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
    config = _load(config_path)
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
    config = _load(config_path)
    n = spend_mod.reset_budget(config, agent, scope, session)
    click.echo(f"{'reset' if n else 'no override for'} {scope}{':' + session if session else ''} of agent {agent}")
