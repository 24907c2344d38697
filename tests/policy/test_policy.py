"""decide() as a table: destination in, verdict + reason + rule out. No proxy involved."""

from __future__ import annotations

import fnmatch
import random

import pytest

from egress_guard.hosts import normalize_host
from egress_guard.policy import Decision, Destination, Rule, Verdict, decide, path_is_ambiguous

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


# --- the indexed host lookup decides exactly as the scan it replaced ------------------------


def scan_decide(rules: tuple[Rule, ...], dest: Destination) -> Decision:
    """decide() as it was before step 1 was indexed: every rule's matches_host, in file order.
    The oracle for the table below; keep it as it is."""
    by_host = [r for r in rules if r.matches_host(dest.host)]
    if not by_host:
        kind = "IP address" if dest.host.ip is not None else "host"
        return Decision(Verdict.DENY, f"{kind} {dest.host} is not on the allowlist")
    by_port = [r for r in by_host if dest.port in r.ports]
    if not by_port:
        allowed = sorted({p for r in by_host for p in r.ports})
        return Decision(
            Verdict.DENY, f"port {dest.port} is not allowed for {dest.host} (allowed: {allowed})", by_host[0].id
        )
    if dest.method is None:
        return Decision(Verdict.ALLOW, f"{dest.host}:{dest.port} is allowed", by_port[0].id)
    by_method = [r for r in by_port if r.methods is None or dest.method in r.methods]
    if not by_method:
        allowed_m = sorted({m for r in by_port for m in (r.methods or ())})
        return Decision(
            Verdict.DENY,
            f"method {dest.method} is not allowed for {dest.host} (allowed: {allowed_m})",
            by_port[0].id,
        )
    path = (dest.path or "/").split("?", 1)[0]
    for rule in by_method:
        if rule.paths is None:
            return Decision(Verdict.ALLOW, f"{dest.method} {dest.host} is allowed", rule.id)
        if not path_is_ambiguous(path) and any(fnmatch.fnmatchcase(path, g) for g in rule.paths):
            return Decision(Verdict.ALLOW, f"{dest.method} {dest.host}{path} is allowed", rule.id)
    if path_is_ambiguous(path):
        reason = f"path {path!r} is ambiguous (dot segments or encoded slashes) for {dest.host}"
    else:
        reason = f"path {path} is not allowed for {dest.method} {dest.host}"
    return Decision(Verdict.DENY, reason, by_method[0].id)


# Few labels, so that random names often share parents, repeat across rules (an exact rule
# and wildcards over the same name, duplicates in different order) and nest wildcards.
LABELS = ["a", "b", "api", "x-1", "com"]
IPS = ["10.0.0.1", "10.0.0.2", "::1", "fe80::1"]
UNLISTED_IPS = ["10.0.0.3", "10.0.1.1"]  # never named by a rule
PORTS = [80, 443, 8080]
METHODS = ["GET", "POST", "DELETE"]
GLOBS = ["/v1/*", "/a", "/*", "/v1/chat*"]
PATHS = ["/", "/a", "/v1/chat", "/v1/x?q=1", "/v1/../a", "/v1//x", None]


def random_name(rng: random.Random) -> str:
    return ".".join(rng.choice(LABELS) for _ in range(rng.randint(1, 4)))


IP_TAILS = ["0.0.1", "0.1", "1", "0.3", "3"]  # a wildcard over these would match an IP's text, were IPs not exempt


def random_rule(rng: random.Random, i: int) -> Rule:
    wildcard = rng.random() < 0.4
    host = random_name(rng) if wildcard or rng.random() < 0.8 else rng.choice(IPS)
    host = normalize_host(host).name
    if wildcard and rng.random() < 0.1:
        host = rng.choice(IP_TAILS)
    return Rule(
        f"r{i}",
        host,
        wildcard=wildcard,
        ports=frozenset(rng.sample(PORTS, rng.randint(1, 2))),
        methods=frozenset(rng.sample(METHODS, rng.randint(1, 2))) if rng.random() < 0.4 else None,
        paths=tuple(rng.sample(GLOBS, rng.randint(1, 2))) if rng.random() < 0.4 else None,
    )


def random_destination(rng: random.Random) -> Destination:
    host = normalize_host(rng.choice(IPS + UNLISTED_IPS) if rng.random() < 0.2 else random_name(rng))
    if rng.random() < 0.3:  # a CONNECT
        return Destination(host, rng.choice(PORTS))
    return Destination(host, rng.choice(PORTS), rng.choice(METHODS), rng.choice(PATHS))


@pytest.mark.parametrize("seed", range(40))
def test_indexed_decide_equals_the_scan(seed: int) -> None:
    rng = random.Random(seed)
    rules = tuple(random_rule(rng, i) for i in range(rng.choice([0, 1, 3, 10, 40, 150])))
    verdicts = set()
    for _ in range(300):
        dest = random_destination(rng)
        expected = scan_decide(rules, dest)
        assert decide(rules, dest) == expected, (rules, dest)
        verdicts.add((expected.verdict, expected.reason.split(" ", 1)[0]))
    if len(rules) >= 40:  # the table reaches every step, not only "not on the allowlist"
        assert {v for v, _ in verdicts} == {Verdict.ALLOW, Verdict.DENY}
        assert {"port", "method", "path"} <= {word for _, word in verdicts}


def test_first_match_wins_across_exact_and_wildcard_rules() -> None:
    rules = (
        Rule("deep-wild", "b.example", wildcard=True, paths=("/deep/*",)),
        Rule("exact", "a.b.example", paths=("/exact/*",)),
        Rule("shallow-wild", "example", wildcard=True),
        Rule("exact-again", "a.b.example", ports=frozenset({8080})),
    )
    host = normalize_host("a.b.example")
    assert decide(rules, Destination(host, 443, "GET", "/deep/x")).rule == "deep-wild"
    assert decide(rules, Destination(host, 443, "GET", "/exact/x")).rule == "exact"
    assert decide(rules, Destination(host, 443, "GET", "/other")).rule == "shallow-wild"
    assert decide(rules, Destination(host, 443)).rule == "deep-wild"
    assert decide(rules, Destination(host, 8080)).rule == "exact-again"
    denied = decide(rules, Destination(host, 22))
    assert (denied.rule, denied.reason) == (
        "deep-wild",
        "port 22 is not allowed for a.b.example (allowed: [443, 8080])",
    )


def test_rules_given_as_a_list_or_rebuilt_are_indexed_afresh() -> None:
    dest = Destination(normalize_host("api.example"), 443)
    assert decide((Rule("one", "api.example"),), dest).rule == "one"
    assert decide((Rule("two", "api.example"),), dest).rule == "two"  # a new tuple, a new index
    rules = [Rule("three", "other.example")]
    assert not decide(rules, dest).allowed  # type: ignore[arg-type]
    rules.append(Rule("four", "api.example"))  # a list can change: never served from the cache
    assert decide(rules, dest).rule == "four"  # type: ignore[arg-type]
