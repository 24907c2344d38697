"""The policy keys of a config (`rules`, `mode`, `unknown_hosts`, `escalation`, `freeze`):
what loads, and every broken file refused with the file, the line, the key and the fix —
for a CEL expression, the compiler's own message."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from egress_guard.config import ConfigError, load_config
from egress_guard.verdicts import Action, EscalationSettings, FreezeSettings

HEAD = "version: 1\nallow: [{host: api.openai.com}]\n"

BROKEN = [
    # (yaml after HEAD, line, key path, fragment of the problem, fragment of the fix)
    (
        'rules:\n  - action: deny\n    match: "model +"\n',
        5,
        "rules[0].match",
        "CEL: Syntax error: mismatched input '<EOF>'",
        "returns true or false",
    ),
    (
        "rules:\n  - {match: \"modle == 'x'\", action: deny}\n",
        4,
        "rules[0].match",
        "CEL: undeclared reference to 'modle'",
        "docs/policy.md#cel-variables",
    ),
    ("rules:\n  - {match: 'port + 1', action: deny}\n", 4, "rules[0].match", "returns int, not bool", "true or false"),
    ("rules:\n  - {match: 'model', action: deny}\n", 4, "rules[0].match", "returns string, not bool", "true or false"),
    (
        "rules:\n  - {match: 'true', action: deny}\n  - {match: 'stream', action: allow}\n",
        5,
        "rules[1].hosts",
        "an allow rule needs hosts",
        "hosts: [api.example.com]",
    ),
    ("rules:\n  - {hosts: [], match: 'true', action: deny}\n", 4, "rules[0].hosts", "names no host", "remove hosts"),
    (
        "rules:\n  - match: 'true'\n    action: allow\n    hosts: [ok.example.com, '*.github.io']\n",
        6,
        "rules[0].hosts[1]",
        "public suffix",
        "name the exact hosts",
    ),
    (
        "rules:\n  - {hosts: ['https://x.com/'], match: 'true', action: deny}\n",
        4,
        "rules[0].hosts[0]",
        "is a URL",
        "'x.com'",
    ),
    (
        "rules:\n  - {name: a, match: 'true', action: deny}\n  - {name: a, match: 'true', action: deny}\n",
        5,
        "rules[1].name",
        "already used by rules[0]",
        "its own name",
    ),
    (
        "rules:\n  - {name: 'a b', match: 'true', action: deny}\n",
        4,
        "rules[0].name",
        "not a valid rule name",
        "letters",
    ),
    ("rules:\n  - {match: 'true', action: block}\n", 4, "rules[0].action", "'allow', 'deny' or 'escalate'", "#rules"),
    ("rules:\n  - {match: 'true', action: deny, when: x}\n", 4, "rules[0]", "unknown key 'when'", "match"),
    ("rules:\n  - {action: deny}\n", 4, "rules[0].match", "required key is missing", "add match:"),
    ("mode: audit\n", 3, "mode", "'enforce' or 'observe'", "#mode"),
    ("unknown_hosts: ask\n", 3, "unknown_hosts", "'deny' or 'escalate'", "#unknown_hosts"),
    ("escalation: {timeout: soon}\n", 3, "escalation.timeout", "is not a duration", "120s"),
    ("escalation: {timeout: 2h}\n", 3, "escalation.timeout", "out of range", "1s to 3600s"),
    (
        "escalation:\n  webhook: {url: 'ftp://x', secret_file: s}\n",
        4,
        "escalation.webhook.url",
        "not an http(s) URL",
        "https://",
    ),
    (
        "escalation:\n  webhook: {url: 'https://hooks.example/x', secret_file: ./missing.secret}\n",
        4,
        "escalation.webhook.secret_file",
        "does not exist",
        "openssl rand",
    ),
    ("freeze: {window: 60s}\n", 3, "freeze", "nothing to watch", "requests_rate"),
    ("freeze:\n  spend_rate: 0.5x\n", 4, "freeze.spend_rate", "not a factor above 1", "5x"),
    ("freeze:\n  refusals: 5\n  window: 0s\n", 5, "freeze.window", "out of range", "60s"),
    ("freeze:\n  refusals: 5\n  action: allow\n", 5, "freeze.action", "'escalate' or 'deny'", "#freeze"),
]


@pytest.mark.parametrize(("text", "line", "key", "problem", "fix"), BROKEN, ids=[b[2] + ":" + b[3] for b in BROKEN])
def test_broken_policy_configs(tmp_path: Path, text: str, line: int, key: str, problem: str, fix: str) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(HEAD + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert problem in message, message
    assert "Fix: " in message and fix in message.split("Fix: ", 1)[1], message


def test_a_multiline_expression_names_its_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(HEAD + "rules:\n  - action: deny\n    match: |\n      stream &&\n        model.sw('x')\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert re.match(rf"{re.escape(str(path))}:5: rules\[0\]\.match: CEL: ", message), message
    assert "(line 2, column" in message and "sw" in message, message


def test_the_documented_policy_loads(tmp_path: Path) -> None:
    (tmp_path / "webhook.secret").write_text("k" * 32)
    path = tmp_path / "egress-guard.yaml"
    path.write_text(
        HEAD
        + """mode: observe
unknown_hosts: escalate
rules:
  - name: no-gpt4-stream
    hosts: [api.openai.com]
    match: "model.startsWith('gpt-4') && stream"
    action: deny
    reason: "no streamed gpt-4"
  - name: deploys
    match: "'deploy' in tools"
    action: escalate
escalation:
  timeout: 90s
  webhook:
    url: https://hooks.example/egress
    secret_file: ./webhook.secret
    callback_listen: 127.0.0.1:9470
freeze:
  window: 30s
  warmup: 5
  requests_rate: 5x
  spend_rate: 3
  refusals: 20
  min_usd: "0.05"
  action: deny
"""
    )
    config = load_config(path)
    policy = config.policy
    assert (policy.mode, policy.unknown_hosts) == ("observe", "escalate")
    assert [(r.id, r.action, r.needs_body) for r in policy.rules] == [
        ("rule:no-gpt4-stream", Action.DENY, True),
        ("rule:deploys", Action.ESCALATE, True),
    ]
    assert policy.rules[0].reason == "no streamed gpt-4" and policy.rules[0].hosts[0].name == "api.openai.com"
    assert policy.escalation == EscalationSettings(
        90.0, "https://hooks.example/egress", (tmp_path / "webhook.secret").resolve(), ("127.0.0.1", 9470)
    )
    assert policy.freeze == FreezeSettings(30.0, 5, 5.0, 3.0, None, 20, 20, Decimal("0.05"), "deny")
    assert policy.allowlist == config.rules


def test_defaults_and_digest(tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("version: 1\nname: mine\nallow: [{host: pypi.org}]\n")
    path = tmp_path / "egress-guard.yaml"
    path.write_text(HEAD + "allowlists: [openai, ./mine.yaml]\n")
    config = load_config(path)
    policy = config.policy
    assert (policy.mode, policy.unknown_hosts, policy.freeze, policy.rules) == ("enforce", "deny", None, ())
    assert policy.escalation == EscalationSettings()
    assert config.files == (path.resolve(), preset.resolve())
    before = config.digest
    assert load_config(path).digest == before  # the same bytes, the same digest
    preset.write_text("version: 1\nname: mine\nallow: [{host: pypi.org, methods: [GET]}]\n")
    assert load_config(path).digest != before  # a preset file is part of it


def test_the_same_file_loads_an_equal_policy(tmp_path: Path) -> None:
    """A reload compares what changed: two loads of one file give equal policies."""
    path = tmp_path / "egress-guard.yaml"
    path.write_text(HEAD + "rules:\n  - {match: 'stream', action: deny}\n")
    assert load_config(path).policy == load_config(path).policy
    path.write_text(HEAD + "rules:\n  - {match: '!stream', action: deny}\n")
    first = load_config(path).policy
    path.write_text(HEAD + "rules:\n  - {match: 'stream', action: deny}\n")
    assert load_config(path).policy != first
