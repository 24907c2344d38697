"""`keys` (mint, list, revoke agents' fake keys) and `kill` (revoke every key of an agent, a
session or one agent's session at once, and SIGKILL its containers; the console's kill is
the same function, `kill_now`). A key is printed once, when minted; lists
show ids, never keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from egress_guard import keys as keys_mod
from egress_guard.cli.common import config_option, format_option, load, mint
from egress_guard.cli.output import emit
from egress_guard.config import Config
from egress_guard.docker_kill import ContainerKill, kill_containers
from egress_guard.envvars import render


@click.group()
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
    minted = mint(load(config_path), agent, ttl, services, session)
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
    rows = keys_mod.list_keys(load(config_path), agent, include_all)
    emit(rows, fmt, ["key_id", "agent", "session", "services", "expires_at", "status", "revoked_reason"])


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
    config = load(config_path)
    for key_id in key_ids:
        n = keys_mod.revoke_keys(config, key_id=key_id, reason=reason)
        click.echo(f"{'revoked' if n else 'no active key'} {key_id}")


@dataclass(frozen=True)
class Killed:
    """What a kill did: the keys revoked, and the containers (docker_kill.ContainerKill)."""

    revoked: int
    containers: ContainerKill
    session_agents: tuple[str, ...]  # with only a session: the agents that had keys in it

    def problems(self) -> list[str]:
        out = [f"could not kill container {f}" for f in self.containers.failed]
        return out + ([f"containers not killed: {self.containers.error}"] if self.containers.error else [])


def kill_now(config: Config, agent: str | None, session: str | None, reason: str) -> Killed:
    """The kill switch, for the CLI and the console alike: revoke the keys of the agent, the
    session (of every agent that has it) or, with both, that agent's session only — two
    agents may share a session name — then SIGKILL the matching labelled containers; the
    kill record notes what happened to them. The keys are always revoked first."""
    if agent is None and session is None:
        raise ValueError("kill names an agent, a session or both")
    n = keys_mod.revoke_keys(config, agent=agent, session=session, reason=reason)
    session_agents: tuple[str, ...] = ()
    if session:
        rows = keys_mod.list_keys(config, agent, True)
        session_agents = tuple(sorted({r["agent"] for r in rows if r["session"] == session}))
    containers = kill_containers(agent=agent, session=session, session_agents=session_agents)
    if containers.note():  # the kill record says what happened to the containers too
        keys_mod.revoke_keys(config, agent=agent, session=session, reason=f"{reason}: {containers.note()}")
    return Killed(n, containers, session_agents)


@click.command()
@config_option
@click.option("--agent", help="Revoke every key of this agent and kill its containers.")
@click.option(
    "--session",
    help="Revoke every key of this session and kill its containers; with --agent, only that agent's session.",
)
@click.option("--reason", default="kill switch", show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Also say when no container was found.")
def kill(config_path: Path | None, agent: str | None, session: str | None, reason: str, verbose: bool) -> None:
    """Kill switch: revoke every key of an agent, a session, or one agent's session (--agent
    and --session: two agents may share a session name; the other's keys stay valid), and
    SIGKILL its containers.

    A running proxy refuses their next request within a second and cuts their open
    connections, streams included. Revocations are stored and survive restarts. Then every
    running container labelled egress-guard.agent=A (with --session: egress-guard.session=S;
    with both, both labels) is killed with SIGKILL, on the Docker engine DOCKER_HOST names
    (else the current docker context's, else /var/run/docker.sock; unix:// or plain tcp://);
    the kill record notes which. The keys are always revoked first. Exit status 1 if a
    labelled container could not be killed, or the engine named cannot be asked (none there,
    ssh://, TLS). Nothing named and no engine at the default socket: only the keys, and a
    line says so. Under sudo, pass DOCKER_HOST on (sudo drops it): sudo DOCKER_HOST=…
    egress-guard kill ….

    \b
    Examples:
      egress-guard kill --agent researcher --reason "runaway loop"
      egress-guard kill --agent researcher --session 7f3a…
    """
    if not agent and not session:
        raise click.UsageError("name --agent, --session, or both")
    config = load(config_path)
    done = kill_now(config, agent or None, session or None, reason)
    containers = done.containers
    who = (
        f"session {session} of agent {agent}"
        if agent and session
        else f"agent {agent}"
        if agent
        else f"session {session}"
    )
    click.echo(f"revoked {done.revoked} key(s) of {who}")
    for shown in containers.killed:
        click.echo(f"killed container {shown} (SIGKILL)")
    if containers.unreachable:
        click.echo(
            f"containers: no Docker engine was asked ({containers.unreachable}; DOCKER_HOST unset, no docker "
            "context): keys only",
            err=True,
        )
    elif containers.unlabelled:
        click.echo(
            f"containers: none labelled {containers.selector}; running container(s) of "
            f"{', '.join(done.session_agents)} without it were NOT killed: {', '.join(containers.unlabelled)} "
            f"(set the session label, or kill --agent)",
            err=True,
        )
    elif verbose and not containers.killed and not containers.failed and not containers.error:
        click.echo(f"containers: none running with label {containers.selector} at {containers.engine}", err=True)
    problems = done.problems()
    if problems:
        for line in problems:
            click.echo(f"egress-guard: {line}", err=True)
        raise SystemExit(1)
