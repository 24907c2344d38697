"""`init` and `up`: create the config, CA and audit DB, and run the proxy in the foreground.

`up` is the only command that starts the proxy (through `egress_guard.server`, imported
when it runs); it keeps the status file `doctor`, `env` and `run` read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import click

from egress_guard import ca
from egress_guard import status as status_mod
from egress_guard.bootstrap import init as do_init
from egress_guard.cli.common import ConfigProblem, config_option, load
from egress_guard.config import DEFAULT_CONFIG_NAME, Config, ConfigError, parse_listen


@click.command()
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


@click.command()
@config_option
@click.option("--listen", help="HOST:PORT to listen on, overriding the config (default 127.0.0.1:8080).")
@click.option(
    "--listen-unix",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also accept agents on this Unix socket (mode 0666), e.g. /run/egress-guard/proxy.sock "
    "mounted into a network-less container.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every decision, not only denials and errors.")
def up(config_path: Path | None, listen: str | None, listen_unix: Path | None, verbose: bool) -> None:
    """Run the proxy in the foreground until Ctrl-C or SIGTERM.

    With no --config and no ./egress-guard.yaml, it first creates the default config, CA
    and audit DB in the current directory. A bad config exits with status 2 before
    listening. Real secrets come from this shell's environment (env backend): export them
    first; `up` warns about each service whose secret does not resolve. It keeps a status
    file next to the audit DB (pid, address, secrets resolve yes/no; never a value) that
    `doctor`, `env` and `run` read. On shutdown every pending audit row is written.
    SIGHUP (or an edit of the config file or a preset file it reads) reloads the policy:
    see docs/reload.md.

    \b
    Example:
      egress-guard up --listen 127.0.0.1:8080
    """
    if config_path is None and not Path(DEFAULT_CONFIG_NAME).exists():
        click.echo("no egress-guard.yaml here: creating the defaults", err=True)
        _init(Path("."), err=True)
    config = load(config_path)
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
    code = asyncio.run(_serve(config, address, listen_unix))
    if _USED_TUN:
        # mitmproxy_rs's threads crash now and then during interpreter finalization once a TUN
        # existed (exit 139): everything is flushed and closed, so leave without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


_USED_TUN = False  # set by _serve when the proxy had a TUN (a `run --isolate` sandbox)


async def _serve(config: Config, listen: tuple[str, int] | None, listen_unix: Path | None = None) -> int:
    from egress_guard.server import EgressProxy, StartupError

    proxy = EgressProxy(config, listen=listen, listen_unix=listen_unix)
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
        + (f"  and on:   unix:{listen_unix} (relayed to it)\n" if listen_unix else "")
        + f"  config:   {config.path} ({len(config.rules)} allow rules: {sources}"
        f"{', inline' if any(r.id.startswith('inline') for r in config.rules) else ''})\n"
        + _policy_line(config)
        + f"  CA:       {ca.CAFiles(config.ca_dir).cert} (agents must trust it)\n"
        + (
            f"  audit DB: {config.audit_path}\n"
            if config.store is None
            else f"  store:    {config.store_name} (replica {config.store.replica})\n"
        )
        + (
            f"  metrics:  http://{config.metrics_listen[0]}:{config.metrics_listen[1]}/metrics\n"
            if config.metrics_listen
            else ""
        )
        + _next_steps(config),
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
    global _USED_TUN
    _USED_TUN = proxy.used_tun
    click.echo(f"stopped; {proxy.audit.written} audit rows written, {lost} lost", err=True)
    return 0 if lost == 0 else 1


def _policy_line(config: Config) -> str:
    """The banner's policy line, when there is more than the allowlist (docs/policy.md)."""
    policy = config.policy
    if policy.plain and policy.freeze is None:
        return ""
    parts = [f"{len(policy.rules)} rules", f"mode {policy.mode}", f"unknown hosts {policy.unknown_hosts}"]
    if policy.freeze is not None:
        parts.append("freeze on")
    return f"  policy:   {', '.join(parts)} (pending approvals: egress-guard pending)\n"


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
    keeper = status_mod.StatusFile(path)
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
            if now != secrets:
                secrets = now
                status = dataclasses.replace(status, services=secrets, checked_at=status_mod.now())
        status = status_mod.refresh(status, proxy.holder, proxy.open_connections(), proxy.watcher.last)
        try:
            status = keeper.update(status)  # writes at once on a change, the connection count at most every 2 s
        except OSError as exc:  # said once; quiet until a write succeeds again
            click.echo(f"egress-guard: cannot write {path} ({exc.strerror}): doctor and status won't see it", err=True)
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
