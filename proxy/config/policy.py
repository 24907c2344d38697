"""The policy keys of a config: `mode`, `unknown_hosts`, `rules`, `escalation` and `freeze`,
checked and turned into the `verdicts.Policy` the proxy evaluates.

Every CEL expression is compiled here, at load: a bad one is a ConfigError on the line of
its `match` with the compiler's own message, never a failure on a live request.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

from egress_guard.cel_rules import CelCompileError, compile_expression
from egress_guard.config.errors import ConfigError
from egress_guard.config.rules import to_rule
from egress_guard.config.wire import ConfigWire, EscalationWire, FreezeWire, PolicyRuleWire, RuleWire
from egress_guard.policy import Rule
from egress_guard.timeutil import parse_duration
from egress_guard.verdicts import Action, CelRule, EscalationSettings, FreezeSettings, HostPattern, Policy

_RULE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FACTOR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[xX]?\s*$")


def to_policy(file: Path, base: Path, wire: ConfigWire, allowlist: tuple[Rule, ...]) -> Policy:
    """The Policy of a config whose allowlist (`allow:` and presets) is `allowlist`."""
    return Policy(
        mode=wire.mode,
        unknown_hosts=wire.unknown_hosts,
        escalation=_escalation(file, base, wire.escalation),
        freeze=_freeze(file, wire.freeze),
        allowlist=allowlist,
        rules=to_cel_rules(file, wire.rules),
    )


def to_cel_rules(file: Path | str, wires: list[PolicyRuleWire]) -> tuple[CelRule, ...]:
    rules: list[CelRule] = []
    seen: dict[str, int] = {}
    for i, w in enumerate(wires):
        key = f"rules[{i}]"
        if w.name is not None:
            if not _RULE_NAME.match(w.name):
                raise ConfigError(
                    file, f"{key}.name", f"{w.name!r} is not a valid rule name", "use letters, digits, '-', '_', '.'"
                )
            if w.name in seen:
                raise ConfigError(
                    file,
                    f"{key}.name",
                    f"rule name {w.name!r} is already used by rules[{seen[w.name]}]",
                    "give each rule its own name (audit rows and grants name rules by it)",
                )
            seen[w.name] = i
        rule_id = f"rule:{w.name}" if w.name is not None else f"rules#{i}"
        action = Action(w.action)
        if w.name is None and action is Action.ESCALATE:
            raise ConfigError(
                file,
                f"{key}.name",
                "an escalate rule needs a name: approvals and grants (--scope session|always) name the rule, "
                "and a position would point at another rule once rules are added",
                "add name: <letters, digits, '-', '_', '.'>, e.g. name: writes-need-a-human",
                at=key,
            )
        if w.hosts is not None and not w.hosts:
            raise ConfigError(file, f"{key}.hosts", "an empty list names no host", "list hosts, or remove hosts:")
        if w.hosts is None and action is Action.ALLOW:
            raise ConfigError(
                file,
                f"{key}.hosts",
                "an allow rule needs hosts: without them it could open every host on the internet",
                "add hosts: [api.example.com] (exact names, or *.example.com)",
                at=key,
            )
        hosts = tuple(_host(file, f"{key}.hosts[{j}]", h) for j, h in enumerate(w.hosts or ()))
        try:
            compiled = compile_expression(w.match)
        except CelCompileError as exc:
            where = ""
            if exc.column is not None:
                where = (
                    f" (line {exc.line}, column {exc.column} of the expression)"
                    if "\n" in w.match.strip()
                    else (f" (column {exc.column} of the expression)")
                )
            raise ConfigError(
                file,
                f"{key}.match",
                f"CEL: {exc}{where}",
                "write a CEL expression that returns true or false over the request variables "
                "(see docs/policy.md#cel-variables), e.g. model.startsWith('gpt-4') && stream",
            ) from None
        rules.append(CelRule(rule_id, action, compiled, w.reason, hosts))
    return tuple(rules)


def _host(file: Path | str, key: str, raw: str) -> HostPattern:
    """A `hosts:` entry, checked exactly as an `allow:` rule's host is."""
    try:
        rule = to_rule(file, key, "", RuleWire(host=raw))
    except ConfigError as err:
        err.key = key  # to_rule names `KEY.host`: here the entry is the host
        raise
    return HostPattern(rule.host, rule.wildcard)


def _seconds(file: Path | str, key: str, value: str | int, low: int, high: int, example: str) -> int:
    try:
        seconds = value if isinstance(value, int) else parse_duration(str(value), bare_seconds=True)
    except ValueError as exc:
        raise ConfigError(file, key, str(exc), f"write a duration, e.g. {example}") from None
    if not low <= seconds <= high:
        raise ConfigError(file, key, f"{value!r} is out of range", f"use {low}s to {high}s, e.g. {example}")
    return seconds


def _escalation(file: Path, base: Path, wire: EscalationWire) -> EscalationSettings:
    timeout = _seconds(file, "escalation.timeout", wire.timeout, 1, 3600, "120s")
    hook = wire.webhook
    if hook is None:
        return EscalationSettings(timeout=float(timeout))
    if not hook.url.startswith(("http://", "https://")):
        raise ConfigError(
            file,
            "escalation.webhook.url",
            f"{hook.url!r} is not an http(s) URL",
            "write e.g. https://hooks.example/egress",
        )
    secret = (base / hook.secret_file).resolve()
    if not secret.is_file():
        raise ConfigError(
            file,
            "escalation.webhook.secret_file",
            f"{secret} does not exist",
            "create it with a random key (e.g. 'openssl rand -hex 32 > webhook.secret; chmod 600 webhook.secret')",
        )
    listen = None
    if hook.callback_listen is not None:
        from egress_guard.config.build import parse_listen

        listen = parse_listen(hook.callback_listen, file, "escalation.webhook.callback_listen")
    return EscalationSettings(float(timeout), hook.url, secret, listen)


def _factor(file: Path | str, key: str, value: str | float | None) -> float | None:
    if value is None:
        return None
    m = _FACTOR.match(str(value))
    factor = float(m.group(1)) if m else 0.0
    if factor <= 1:
        raise ConfigError(file, key, f"{value!r} is not a factor above 1", "write e.g. 5x (five times the baseline)")
    return factor


def _freeze(file: Path | str, wire: FreezeWire | None) -> FreezeSettings | None:
    if wire is None:
        return None
    rates = {k: _factor(file, f"freeze.{k}", getattr(wire, k)) for k in ("requests_rate", "spend_rate", "hosts_rate")}
    if wire.refusals is None and all(v is None for v in rates.values()):
        raise ConfigError(
            file,
            "freeze",
            "nothing to watch: no rate and no refusals threshold",
            "set one or more of requests_rate, spend_rate, hosts_rate (e.g. 5x) or refusals (e.g. 20)",
        )
    return FreezeSettings(
        window=float(_seconds(file, "freeze.window", wire.window, 1, 86400, "60s")),
        warmup=wire.warmup,
        requests_rate=rates["requests_rate"],
        spend_rate=rates["spend_rate"],
        hosts_rate=rates["hosts_rate"],
        refusals=wire.refusals,
        min_requests=wire.min_requests,
        min_usd=Decimal(wire.min_usd),
        action=wire.action,
    )
