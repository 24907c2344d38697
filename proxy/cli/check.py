"""`check`: would the proxy allow this request? And `config check`: is this config valid?

Both are offline: nothing is sent, no store is opened. `check` builds the request's Facts
the way the proxy does (`verdicts.request_facts`, `body_facts`) and asks the very same
`Policy.evaluate`, so its answer is the proxy's (before grants and freezes, which live in
the store). Exit codes are the answer, for scripts: 0 allow, 3 deny, 4 escalate.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import click

from egress_guard.cli.common import ConfigProblem, config_option, format_option, load
from egress_guard.config import DEFAULT_CONFIG_NAME, ConfigError, load_config
from egress_guard.hosts import HostError, normalize_host
from egress_guard.policy import Destination, decide
from egress_guard.verdicts import Action, BodyFacts, Facts, Outcome, Policy, body_facts, request_facts

EXIT = {Action.ALLOW: 0, Action.DENY: 3, Action.ESCALATE: 4}


@click.command()
@config_option
@click.option("--agent", help="The agent making the request (as its fake key would say).")
@click.option("--session", help="The agent's session id.")
@click.option("--json", "json_body", metavar="BODY", help="A JSON request body, or @FILE to read it from a file.")
@click.option("--header", "headers", multiple=True, metavar="NAME", help="A header the request sends (repeatable).")
@format_option("text", "json")
@click.argument("method")
@click.argument("url")
def check(
    config_path: Path | None,
    agent: str | None,
    session: str | None,
    json_body: str | None,
    headers: tuple[str, ...],
    fmt: str,
    method: str,
    url: str,
) -> None:
    """Would the proxy allow METHOD URL? Prints the decision, the rule and the reason.

    Nothing is sent. The request is judged by the config's allowlist, presets and rules
    exactly as the proxy judges it; earlier approvals (grants) and frozen sessions live in
    the store and are not consulted. Exit status: 0 allow (also a would-deny or
    would-escalate in observe mode, which the proxy lets through), 3 deny, 4 escalate,
    2 a bad config or argument.

    \b
    Example:
      egress-guard check --agent researcher POST https://api.openai.com/v1/chat/completions \\
          --json '{"model": "gpt-4o", "stream": true}'
      egress-guard check GET https://pypi.org/simple/requests/ --format json
    """
    config = load(config_path)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="URL")
    try:
        host = normalize_host(parts.hostname)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except (HostError, ValueError) as exc:
        raise click.BadParameter(f"{url!r}: {exc}", param_hint="URL") from None
    if agent is not None and agent not in config.agents:
        raise click.BadParameter(
            f"no agent named {agent!r} in {config.path} (use one of: {', '.join(sorted(config.agents)) or 'none'})",
            param_hint="--agent",
        )
    names = [h.split(":", 1)[0].strip() for h in headers]
    body, size = BodyFacts(), 0
    if json_body is not None:
        raw = _read_body(json_body)
        body, size = body_facts("application/json", raw), len(raw)
        names.append("content-type")
    service = config.service_for(host.name)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    facts = request_facts(
        host,
        port,
        method,
        target or "/",
        names,
        agent=agent,
        session=session,
        service=service.name if service else None,
        body_size=size,
        body=body,
    )
    outcome = proxy_outcome(config.policy, facts, parts.scheme == "https", target or "/")
    _print(outcome, fmt, method.upper(), url)
    click.get_current_context().exit(0 if outcome.observed else EXIT[outcome.action])


def proxy_outcome(policy: Policy, facts: Facts, tunnel: bool, target: str) -> Outcome:
    """What the proxy answers, in the order it decides: an https request's CONNECT first
    (ConnectGuard: a host nothing names is refused there), then the allowlist where nothing
    else could admit the request (RequestGuard refuses it before resolving the name), then
    `Policy.evaluate` (PolicyGuard)."""
    if tunnel:
        opened = policy.connect(facts.host, facts.port)
        if opened.action is Action.DENY and not opened.observed:
            return opened
    listed = decide(policy.allowlist, Destination(facts.host, facts.port, facts.method, target))
    if not listed.allowed and not policy.may_admit(facts.host, facts.port):
        return Outcome(Action.DENY, listed.reason, listed.rule)
    return policy.evaluate(facts)


def _read_body(value: str) -> bytes:
    if value.startswith("@"):
        try:
            raw = Path(value[1:]).read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {value[1:]} ({exc.strerror})", param_hint="--json") from None
    else:
        raw = value.encode()
    try:
        json.loads(raw)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON ({exc})", param_hint="--json") from None
    return raw


def _print(outcome: Outcome, fmt: str, method: str, url: str) -> None:
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "decision": outcome.verdict_text,
                    "action": outcome.action.value,
                    "observed": outcome.observed,
                    "rule": outcome.rule,
                    "reason": outcome.reason,
                    "request": f"{method} {url}",
                }
            )
        )
        return
    click.echo(f"decision  {outcome.verdict_text}")
    click.echo(f"rule      {outcome.rule or '-'}")
    click.echo(f"reason    {outcome.reason}")


@click.group()
def config() -> None:
    """Work with the config file without running the proxy.

    \b
    Example:
      egress-guard config check /etc/egress-guard/egress-guard.yaml
    """


@config.command(name="check")
@click.argument("file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@config_option
def config_check(file: Path | None, config_path: Path | None) -> None:
    """Validate a config file offline: its shape, presets, services and every rule's CEL.

    FILE defaults to --config, $EGRESS_GUARD_CONFIG or ./egress-guard.yaml. Prints what it
    holds and its digest; exits 0 when it is valid, 2 with the error `up` would print
    (file, line, key and fix) when it is not. Nothing is contacted: secrets are not read.

    \b
    Example:
      egress-guard config check new.yaml && mv new.yaml egress-guard.yaml   # then it reloads
    """
    path = file or config_path or Path(DEFAULT_CONFIG_NAME)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from None
    policy = cfg.policy
    click.echo(
        f"ok  {cfg.path}: {len(cfg.rules)} allow rules, {len(policy.rules)} CEL rules, "
        f"{len(cfg.services)} services, {len(cfg.agents)} agents; mode {policy.mode}, "
        f"unknown_hosts {policy.unknown_hosts}; sha256 {cfg.digest[:16]}"
    )
