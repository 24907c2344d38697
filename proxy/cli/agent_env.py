"""`env` and `run`: the environment an agent needs (proxy, CA, with --agent fresh fake keys),
printed for a shell or container, or given to a local command.

The agent never inherits the host's real-secret variables: `env` unsets them, `run` drops them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from egress_guard import ca
from egress_guard import keys as keys_mod
from egress_guard import status as status_mod
from egress_guard.cli.common import config_option, load, mint
from egress_guard.envvars import agent_env, render
from egress_guard.timeutil import parse_duration


@dataclasses.dataclass(frozen=True)
class AgentEnvRequest:
    """What `env` and `run` were asked for: the config, how agents reach the proxy, and
    (with `agent`) whose fake keys to mint, for how long, for which services."""

    config_path: Path | None
    proxy_host: str | None
    no_proxy: str | None
    agent: str | None
    ttl: str
    services: str | None


def env_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options `env` and `run` share, turned into one `wanted: AgentEnvRequest` argument."""

    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        config_path: Path | None,
        proxy_host: str | None,
        no_proxy: str | None,
        agent: str | None,
        ttl: str,
        services: str | None,
        **kwargs: Any,
    ) -> Any:
        wanted = AgentEnvRequest(config_path, proxy_host, no_proxy, agent, ttl, services)
        return fn(*args, wanted=wanted, **kwargs)

    for option in reversed(
        [
            click.option("--proxy-host", help="Address agents reach the proxy at (default: the listen host)."),
            click.option("--no-proxy", help="NO_PROXY value (default: localhost,127.0.0.1,::1)."),
            click.option("--agent", help="Mint fake keys for this agent (a new session) and include them."),
            click.option("--ttl", default="8h", show_default=True, help="With --agent: how long the keys live."),
            click.option("--services", help="With --agent: only these services (comma-separated)."),
        ]
    ):
        wrapper = option(wrapper)
    return config_option(wrapper)


def _agent_env(wanted: AgentEnvRequest) -> tuple[dict[str, str], set[str]]:
    """The agent's variables (with fresh fake keys when an agent is named), and the names of
    the host's real-secret variables the agent must not inherit."""
    config = load(wanted.config_path)
    if not ca.CAFiles(config.ca_dir).exists():
        raise click.ClickException(f"no CA in {config.ca_dir}. Fix: run 'egress-guard init' (or 'egress-guard up')")
    bundle = ca.write_bundle(config.ca_dir)
    running = status_mod.read(config)  # `up --listen` may listen elsewhere than the config says
    listen = running.listen_host_port if running is not None else None
    out = agent_env(config, bundle=bundle, proxy_host=wanted.proxy_host, no_proxy=wanted.no_proxy, listen=listen)
    agent = wanted.agent
    if agent and agent in config.agents and not config.agents[agent].services and not wanted.services:
        # Still the proxy variables: without them `eval` would leave the agent going direct.
        click.echo(
            f"egress-guard: agent {agent!r} has no credentialed services (agents.{agent}.services): "
            "no keys minted; proxy and CA variables only",
            err=True,
        )
        out["EGRESS_GUARD_AGENT"] = agent
    elif agent:
        minted = mint(config, agent, wanted.ttl, wanted.services, None)
        out |= minted.env
        out["EGRESS_GUARD_AGENT"], out["EGRESS_GUARD_SESSION"] = agent, minted.record.session
    return out, keys_mod.secret_env_names(config) - set(out)


@click.command()
@env_options
@click.option("--format", "fmt", type=click.Choice(["sh", "dotenv", "json"]), default="sh", show_default=True)
def env(wanted: AgentEnvRequest, fmt: str) -> None:
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
    variables, hidden = _agent_env(wanted)
    text = render(variables, fmt)
    if fmt == "sh" and hidden:
        text += "".join(f"unset {name}\n" for name in sorted(hidden))
    click.echo(text, nl=False)


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@env_options
@click.option(
    "--isolate",
    is_flag=True,
    help="Linux, root: run in a sandbox whose only way out is the running `up` (no other network).",
)
@click.option(
    "--max-time",
    metavar="DURATION",
    help="With --isolate: hard window (90s, 30m, 8h): the keys expire and the sandbox is killed at its end.",
)
@click.option(
    "--user",
    help="With --isolate: run the command as this user (default: nobody/65534; as your own user it can act "
    "through your files and sockets).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    wanted: AgentEnvRequest, isolate: bool, max_time: str | None, user: str | None, command: tuple[str, ...]
) -> None:
    """Run a local command with the agent environment (see `env`).

    The command never inherits the host's real secrets (the variables the config's env:
    secrets and vault credentials name); with --agent it gets fresh fake keys instead.

    With --isolate (Linux, as root, while `egress-guard up` runs) the command runs in its
    own network, mount, IPC and PID namespaces, as nobody (or --user), with no way out
    but egress-guard: TCP to any address is captured and checked, DNS is answered by
    egress-guard, nothing else leaves. Its exit status is the command's; ^C works; when it
    ends, every process in the sandbox ends with it.

    \b
    Examples:
      egress-guard run --agent researcher -- python my_agent.py --task "summarise the repo"
      sudo egress-guard run --isolate --agent researcher --max-time 30m -- node agent.js
    """
    if not isolate:
        if max_time is not None or user is not None:
            raise click.UsageError("--max-time and --user go with --isolate")
        variables, hidden = _agent_env(wanted)
        environment = {k: v for k, v in os.environ.items() if k not in hidden} | variables
        try:
            os.execvpe(command[0], list(command), environment)  # noqa: S606 - the user's own command
        except OSError as exc:
            raise click.ClickException(
                f"cannot run {command[0]!r}: {exc.strerror}. Fix: check the command and PATH"
            ) from None
    sys.exit(_run_isolated(wanted, max_time, user, list(command)))


def _run_isolated(wanted: AgentEnvRequest, max_time: str | None, user: str | None, command: list[str]) -> int:
    from egress_guard import sandbox
    from egress_guard.sandbox import control as control_mod
    from egress_guard.sandbox import isolate

    window = None
    if max_time is not None:
        try:
            window = parse_duration(max_time)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--max-time") from None
        if window == 0:
            raise click.BadParameter("must be longer than 0s", param_hint="--max-time")
        wanted = dataclasses.replace(wanted, ttl=max_time)  # the keys expire with the window
    config = load(wanted.config_path)
    try:
        sandbox.preflight()
        who = isolate.sandbox_user(user)
        control = control_mod.ControlClient(control_mod.socket_path(config.ca_dir))
    except sandbox.SandboxError as exc:
        raise click.ClickException(str(exc)) from None
    with control, isolate.run_dir() as directory:
        t_start = time.monotonic()  # t_exp = t_start + window, for the keys and the kill
        variables, hidden = _agent_env(wanted)
        try:
            opened = control.open(variables.get("EGRESS_GUARD_AGENT"), variables.get("EGRESS_GUARD_SESSION"))
            base = {k: v for k, v in os.environ.items() if k not in hidden}  # sandbox_env: allowlist
            return isolate.run_isolated(
                control,
                opened,
                command,
                isolate.sandbox_env(base, variables, opened, directory, who),
                who,
                resolv_conf=isolate.write_resolv_conf(directory, opened.dns),
                hide=isolate.hidden_dirs(config.ca_dir, Path.cwd()),
                deadline=None if window is None else t_start + window,
                max_time=max_time or "",
            )
        except sandbox.SandboxError as exc:
            raise click.ClickException(str(exc)) from None
