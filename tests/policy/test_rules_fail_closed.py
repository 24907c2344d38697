"""What the review of #12 found open, each closed: a streamed body of unknown size, paths an
upstream reads differently than a rule does, grants that outlive what was approved, an escalate
rule without a name, the webhook URL in a repr."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_rules import BASE, FakeGrants, facts, policy_of

from egress_guard.config import ConfigError
from egress_guard.hosts import normalize_host
from egress_guard.verdicts import UNKNOWN_HOSTS, Action, EscalationSettings, Grant, request_facts

SIZE_RULES = (
    BASE
    + """rules:
  - {name: no-uploads, hosts: [api.openai.com], match: "body_size > 1000", action: deny, reason: too big}
"""
)


@pytest.mark.parametrize("size", [None])
def test_body_size_unknown_fails_closed(tmp_path: Path, size: int | None) -> None:
    policy = policy_of(tmp_path, SIZE_RULES)
    streamed = request_facts(normalize_host("api.openai.com"), 443, "POST", "/v1/files", body_size=size)
    outcome = policy.evaluate(streamed)
    assert (outcome.action, outcome.rule) == (Action.DENY, "rule:no-uploads")
    assert "not known" in outcome.reason
    # known (a Content-Length), it is judged
    small = request_facts(normalize_host("api.openai.com"), 443, "POST", "/v1/files", body_size=10)
    assert policy.evaluate(small).action is Action.ALLOW


PATH_RULES = (
    BASE
    + """rules:
  - {name: no-admin, match: "path.startsWith('/admin')", action: deny, reason: no admin}
  - {name: repos, hosts: [api.github.com], match: "method == 'GET' && path.startsWith('/repos/')", action: allow}
"""
)


@pytest.mark.parametrize(
    "url",
    [
        "https://api.github.com/repos/../user/keys",
        "https://api.github.com/repos/%2e%2e/user/keys",
        "https://api.github.com/repos/..%2fuser",
        "https://api.openai.com//admin/x",
        "https://api.openai.com/./admin",
        "https://api.openai.com/v1/%2e%2e/admin",
    ],
)
def test_an_ambiguous_path_is_refused_where_a_rule_reads_the_path(tmp_path: Path, url: str) -> None:
    outcome = policy_of(tmp_path, PATH_RULES).evaluate(facts(url))
    assert outcome.action is Action.DENY and "ambiguous" in outcome.reason, outcome


def test_rules_read_the_path_percent_decoded_as_an_upstream_does(tmp_path: Path) -> None:
    policy = policy_of(tmp_path, PATH_RULES)
    outcome = policy.evaluate(facts("https://api.openai.com/%61dmin/x"))
    assert (outcome.action, outcome.rule) == (Action.DENY, "rule:no-admin")
    assert policy.evaluate(facts("https://api.github.com/repos/a/b")).rule == "rule:repos"


def _unknown_host_grant() -> FakeGrants:
    return FakeGrants([Grant(1, UNKNOWN_HOSTS, "pypi.org", 443, None, None)])


def test_an_unknown_hosts_grant_stands_only_while_the_host_is_unknown_and_such_hosts_escalate(tmp_path: Path) -> None:
    escalating = policy_of(tmp_path, "version: 1\nunknown_hosts: escalate\n")
    assert escalating.evaluate(facts("https://pypi.org/x", "POST"), _unknown_host_grant()).action is Action.ALLOW
    # unknown hosts refused again: the old approval no longer admits
    refusing = policy_of(tmp_path, "version: 1\n")
    assert refusing.evaluate(facts("https://pypi.org/x", "POST"), _unknown_host_grant()).action is Action.DENY
    # the config now names the host, read-only: the config decides, not the grant
    named = policy_of(tmp_path, "version: 1\nunknown_hosts: escalate\nallow: [{host: pypi.org, methods: [GET]}]\n")
    assert named.evaluate(facts("https://pypi.org/x", "POST"), _unknown_host_grant()).action is Action.DENY
    assert named.evaluate(facts("https://pypi.org/x", "GET"), _unknown_host_grant()).action is Action.ALLOW


def test_an_escalate_rule_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rules\[0\].name: an escalate rule needs a name") as info:
        policy_of(tmp_path, BASE + 'rules:\n  - {match: "true", action: escalate}\n')
    assert "name: " in str(info.value)


def test_the_webhook_url_is_not_in_a_repr() -> None:
    settings = EscalationSettings(webhook_url="https://hooks.slack.com/services/T0/B0/SECRETTOKEN")
    assert "SECRETTOKEN" not in repr(settings)
