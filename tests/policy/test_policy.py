"""decide() as a table: destination in, verdict + reason + rule out. No proxy involved."""

from __future__ import annotations

import pytest

from egress_guard.hosts import normalize_host
from egress_guard.policy import Destination, Rule, Verdict, decide, path_is_ambiguous

RULES = (
    Rule("openai#0", "api.openai.com", ports=frozenset({443}), methods=frozenset({"GET", "POST"}), paths=("/v1/*",)),
    Rule("gh#0", "githubusercontent.com", wildcard=True, ports=frozenset({443}), methods=frozenset({"GET"})),
    Rule("inline#0", "10.0.0.5", ports=frozenset({8080})),
    Rule("inline#1", "api.github.com"),  # no ports given: 443 only
    Rule("inline#2", "plain.example", ports=frozenset({80, 443})),
)

CASES = [
    # host, port, method, path -> verdict, rule, reason fragment
    ("api.openai.com", 443, None, None, Verdict.ALLOW, "openai#0", "is allowed"),
    ("API.OPENAI.COM.", 443, "POST", "/v1/chat/completions", Verdict.ALLOW, "openai#0", "is allowed"),
    ("api.openai.com", 443, "POST", "/v1/chat/completions?x=1", Verdict.ALLOW, "openai#0", "is allowed"),
    ("api.openai.com", 80, None, None, Verdict.DENY, "openai#0", "port 80 is not allowed"),
    ("api.openai.com", 443, "DELETE", "/v1/files/x", Verdict.DENY, "openai#0", "method DELETE is not allowed"),
    ("api.openai.com", 443, "GET", "/admin", Verdict.DENY, "openai#0", "path /admin is not allowed"),
    ("api.openai.com", 443, "GET", "/v1/../admin", Verdict.DENY, "openai#0", "ambiguous"),
    ("api.openai.com", 443, "GET", "/v1/%2e%2e/admin", Verdict.DENY, "openai#0", "ambiguous"),
    ("api.openai.com", 443, "GET", "/v1/a%2fb", Verdict.DENY, "openai#0", "ambiguous"),
    ("openai.com", 443, None, None, Verdict.DENY, None, "host openai.com is not on the allowlist"),
    ("evil-api.openai.com", 443, None, None, Verdict.DENY, None, "not on the allowlist"),
    ("raw.githubusercontent.com", 443, "GET", "/x", Verdict.ALLOW, "gh#0", "is allowed"),
    ("a.b.githubusercontent.com", 443, "GET", "/x", Verdict.ALLOW, "gh#0", "is allowed"),
    ("githubusercontent.com", 443, None, None, Verdict.DENY, None, "not on the allowlist"),
    ("evilgithubusercontent.com", 443, None, None, Verdict.DENY, None, "not on the allowlist"),
    ("10.0.0.5", 8080, "GET", "/", Verdict.ALLOW, "inline#0", "is allowed"),
    ("167772165", 8080, "GET", "/", Verdict.ALLOW, "inline#0", "is allowed"),  # 10.0.0.5 in decimal
    ("10.0.0.6", 8080, None, None, Verdict.DENY, None, "IP address 10.0.0.6 is not on the allowlist"),
    ("api.github.com", 443, "PATCH", "/repos/x", Verdict.ALLOW, "inline#1", "is allowed"),
    (
        "api.github.com",
        80,
        "GET",
        "/",
        Verdict.DENY,
        "inline#1",
        "port 80 is not allowed for api.github.com (allowed: [443])",
    ),
    ("plain.example", 80, "GET", "/", Verdict.ALLOW, "inline#2", "is allowed"),
    ("api.github.com", 8443, None, None, Verdict.DENY, "inline#1", "port 8443"),
]


@pytest.mark.parametrize(("host", "port", "method", "path", "verdict", "rule", "reason"), CASES)
def test_decide(host, port, method, path, verdict, rule, reason) -> None:
    decision = decide(RULES, Destination(normalize_host(host), port, method, path))
    assert decision.verdict is verdict
    assert decision.rule == rule
    assert reason in decision.reason


def test_no_rules_means_deny() -> None:
    decision = decide((), Destination(normalize_host("api.openai.com"), 443))
    assert decision.verdict is Verdict.DENY


def test_wildcard_never_matches_an_ip() -> None:
    rules = (Rule("w", "0.0.1", wildcard=True),)
    assert decide(rules, Destination(normalize_host("10.0.0.1"), 443)).verdict is Verdict.DENY


@pytest.mark.parametrize("path", ["/v1/./x", "/v1//x", "/v1\\x", "/v1/%2E%2E/x", "/v1/%5c"])
def test_ambiguous_paths(path: str) -> None:
    assert path_is_ambiguous(path)


def test_plain_paths_are_not_ambiguous() -> None:
    assert not path_is_ambiguous("/v1/chat/completions")
