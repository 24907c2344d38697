"""`console`: the web console — live decisions, spend, denials, approvals and the kill
switch in a browser on the operator's machine (egress_guard.console)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import stat
from pathlib import Path

import click

from egress_guard.cli.common import config_option, load
from egress_guard.config import Config, ConfigError, parse_listen
from egress_guard.console.auth import is_loopback

DEFAULT_LISTEN = "127.0.0.1:8081"
TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")  # secrets.token_urlsafe's alphabet


def _token(token_file: Path | None) -> str:
    if token_file is None:
        return secrets.token_urlsafe(32)
    try:
        with token_file.open(encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            token = f.read().strip()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {token_file}: {exc.strerror}", param_hint="--token-file") from None
    if mode & 0o077:
        raise click.BadParameter(
            f"{token_file} can be read or written by other users (mode {stat.S_IMODE(mode):04o}): whoever reads "
            f"it can use the console. Fix: chmod 600 {token_file}",
            param_hint="--token-file",
        )
    if len(token) < 16 or not TOKEN_CHARS.fullmatch(token):
        raise click.BadParameter(
            f"the token in {token_file} is too short or has characters other than letters, digits, '-' and "
            "'_' (it travels in an address and a header). Fix: write one line of at least 16 of them, e.g. "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'",
            param_hint="--token-file",
        )
    return token


@click.command()
@config_option
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT to serve the console on.")
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow a --listen address other than loopback (plain HTTP, no TLS: only on a network you trust).",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Read the access token from this file, readable by you only (chmod 600); default: a new one at each start.",
)
def console(config_path: Path | None, listen: str, allow_remote: bool, token_file: Path | None) -> None:
    """Serve the web console: live decisions, spend, denials, approvals, agents.

    A process of its own (not the proxy's listener: agents cannot reach it), reading the
    store the config names; its approve, deny and kill buttons make the same writes as
    `approve`, `deny` and `kill`, and a running proxy follows them within a second. It
    prints an address with an access token after #token=: open it in a browser (the part
    after # never leaves the browser; the page keeps the token in the tab and sends it as a
    header). Every API request needs the token, so other local users, other pages and other
    local servers cannot use the console. Loopback only unless --allow-remote; the token is
    new at each start unless --token-file (mode 600; then it is not printed). Ctrl-C stops it.

    \b
    Example:
      egress-guard console --listen 127.0.0.1:8081
    """
    config = load(config_path)
    try:
        host, port = parse_listen(listen)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    if not is_loopback(host):
        if not allow_remote:
            raise click.BadParameter(
                f"{listen} is not a loopback address: the console has no TLS. Fix: use 127.0.0.1:PORT and an "
                "SSH tunnel, or pass --allow-remote on a network you trust",
                param_hint="--listen",
            )
        if host in ("0.0.0.0", "::"):  # noqa: S104 (refused: the Host check needs the address)
            raise click.BadParameter(
                f"{listen}: name the address to serve on (e.g. 192.168.1.10:8081): the console answers "
                "only to the Host it listens as",
                param_hint="--listen",
            )
        click.echo(
            f"egress-guard console: WARNING: serving on {host} without TLS: the token travels in clear", err=True
        )
    if config.store is None and not config.audit_path.exists():
        raise click.ClickException(
            f"no audit DB at {config.audit_path}. Fix: run 'egress-guard init', or pass the --config that names it"
        )
    token = _token(token_file)
    asyncio.run(_run(config, host, port, token, token_file))


async def _run(config: Config, host: str, port: int, token: str, token_file: Path | None) -> None:
    from egress_guard.console.server import serve

    try:
        runner, url = await serve(config, host, port, token)
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port} ({exc.strerror}). Fix: pick another --listen port"
        ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if token_file is None:
        click.echo(f"console: {url}/#token={token}")
        click.echo("  open it in a browser on this machine; Ctrl-C stops the console", err=True)
    else:  # the file is the secret's place: not the terminal's scrollback too
        click.echo(f"console: {url}/")
        click.echo(
            f"  the token is in {token_file}: open {url}/#token=<its contents> in a browser on this machine; "
            "Ctrl-C stops the console",
            err=True,
        )
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
