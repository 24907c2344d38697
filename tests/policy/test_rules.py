"""The per-request verdict (`verdicts.Policy.evaluate`): a table of configs and requests
with the outcome each must get, read through `load_config` as the proxy reads them.

deny beats escalate beats allow; nothing (no approval, no grant) lifts a deny; a rule that
cannot be evaluated fails closed; observe mode records what it would have done.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from egress_guard import cel_rules
from egress_guard.config import load_config
from egress_guard.hosts import normalize_host
from egress_guard.verdicts import (
    NO_GRANTS,
    Action,
    BodyFacts,
    Facts,
    Grant,
    Outcome,
    Policy,
    PolicyHolder,
    body_facts,
    request_facts,
)

BASE = """version: 1
allow:
  - {host: api.openai.com, methods: [GET, POST]}
  - {host: pypi.org, methods: [GET]}
"""

RULES = """
agents:
  bot: {}
  intern: {}
rules:
  - name: no-gpt4-stream
    hosts: [api.openai.com]
    match: "model.startsWith('gpt-4') && stream"
    action: deny
    reason: no streamed gpt-4
  - name: interns-ask
    match: "agent == 'intern' && method != 'GET'"
    action: escalate
    reason: an intern's writes need a human
  - name: big-outputs-ask
    hosts: [api.openai.com]
    match: "max_tokens > 10000"
    action: escalate
  - name: github-read
    hosts: [api.github.com, "*.githubusercontent.com.example"]
    match: "method == 'GET' && path.startsWith('/repos/')"
    action: allow
  - name: no-delete-tool
    hosts: [mcp.example.com]
    match: "rpc_tool == 'delete_everything'"
    action: deny
  - name: mcp-tools
    hosts: [mcp.example.com]
    match: "rpc_method == 'tools/call' || rpc_method == 'tools/list'"
    action: allow
  - name: no-admin-query
    match: "'admin' in query"
    action: deny
  - name: broken
    hosts: [div.example.com]
    match: "body_size / 0 == 1"
    action: deny
  - name: broken-allow
    hosts: [divallow.example.com]
    match: "body_size / 0 == 1"
    action: allow
"""


@dataclass
class FakeGrants:
    """Grants as the store hands them to the policy: (rule, host, port, agent, session)."""

    held: list[Grant] = field(default_factory=list)

    def covers(self, rule: str, facts: Facts) -> Grant | None:
        for g in self.held:
            if (
                g.rule == rule
                and g.host == facts.host.name
                and g.port == facts.port
                and g.agent in (None, facts.agent)
                and g.session in (None, facts.session)
            ):
                return g
        return None


def grant(rule: str, host: str = "api.openai.com", agent: str | None = None, session: str | None = None) -> FakeGrants:
    return FakeGrants([Grant(1, rule, host, 443, agent, session)])


def policy_of(tmp_path: Path, text: str) -> Policy:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(text)
    return load_config(path).policy


def facts(url: str, method: str = "GET", body: Any = b"", **kw: Any) -> Facts:
    scheme, rest = url.split("://", 1)
    authority, _, target = rest.partition("/")
    name, _, port = authority.partition(":")
    raw = body if isinstance(body, bytes) else __import__("json").dumps(body).encode()
    return request_facts(
        normalize_host(name),
        int(port) if port else (443 if scheme == "https" else 80),
        method,
        "/" + target,
        kw.pop("headers", ()),
        body_size=len(raw),
        body=body_facts("application/json", raw) if kw.pop("read", True) else None,
        **kw,
    )


GPT4_STREAM = {"model": "gpt-4o", "stream": True}
OPENAI = "https://api.openai.com/v1/chat/completions"
MCP = "https://mcp.example.com/mcp"

# (id, extra config, request, grants, frozen, verdict, rule)
TABLE: list[tuple[str, str, Facts, Any, str | None, str, str | None]] = [
    ("allowlist allows", RULES, facts(OPENAI, "POST", {"model": "gpt-4o-mini"}), NO_GRANTS, None, "allow", "inline#0"),
    ("deny rule beats the allowlist", RULES, facts(OPENAI, "POST", GPT4_STREAM), NO_GRANTS, None, "deny",
     "rule:no-gpt4-stream"),
    ("deny beats escalate", RULES, facts(OPENAI, "POST", GPT4_STREAM, agent="intern"), NO_GRANTS, None, "deny",
     "rule:no-gpt4-stream"),
    ("a grant cannot lift a deny", RULES, facts(OPENAI, "POST", GPT4_STREAM), grant("rule:no-gpt4-stream"), None,
     "deny", "rule:no-gpt4-stream"),
    ("a grant for the escalation beside a deny cannot lift it", RULES,
     facts(OPENAI, "POST", GPT4_STREAM, agent="intern"), grant("rule:interns-ask"), None, "deny",
     "rule:no-gpt4-stream"),
    ("escalate beats the allowlist", RULES, facts(OPENAI, "POST", {"model": "o3"}, agent="intern"), NO_GRANTS, None,
     "escalate", "rule:interns-ask"),
    ("escalate: the first such rule in file order", RULES,
     facts(OPENAI, "POST", {"model": "o3", "max_tokens": 20000}, agent="intern"), NO_GRANTS, None, "escalate",
     "rule:interns-ask"),
    ("a granted escalation goes on to the next", RULES,
     facts(OPENAI, "POST", {"model": "o3", "max_tokens": 20000}, agent="intern"), grant("rule:interns-ask"), None,
     "escalate", "rule:big-outputs-ask"),
    ("a grant covers an escalation", RULES, facts(OPENAI, "POST", {"model": "o3"}, agent="intern"),
     grant("rule:interns-ask", agent="intern"), None, "allow", "inline#0"),
    ("a grant for another agent does not", RULES, facts(OPENAI, "POST", {"model": "o3"}, agent="intern"),
     grant("rule:interns-ask", agent="bot"), None, "escalate", "rule:interns-ask"),
    ("a grant for a session only covers that session", RULES,
     facts(OPENAI, "POST", {"model": "o3"}, agent="intern", session="s2"),
     grant("rule:interns-ask", session="s1"), None, "escalate", "rule:interns-ask"),
    ("a granted escalation allows where the allowlist does not", RULES,
     facts("https://pypi.org/upload", "POST", agent="intern"), grant("rule:interns-ask", host="pypi.org"), None,
     "allow", "rule:interns-ask"),
    ("the allowlist still refuses what no rule allows", RULES, facts("https://pypi.org/upload", "POST"), NO_GRANTS,
     None, "deny", "inline#1"),
    ("unscoped escalate on a host nothing allows", RULES, facts("https://pypi.org/upload", "POST", agent="intern"),
     NO_GRANTS, None, "escalate", "rule:interns-ask"),
    ("allow rule", RULES, facts("https://api.github.com/repos/a/b"), NO_GRANTS, None, "allow", "rule:github-read"),
    ("allow rule not matching: default deny", RULES, facts("https://api.github.com/user"), NO_GRANTS, None, "deny",
     None),
    ("JSON-RPC tool deny beats the allow", RULES,
     facts(MCP, "POST", {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete_everything"}}),
     NO_GRANTS, None, "deny", "rule:no-delete-tool"),
    ("JSON-RPC tool allowed", RULES,
     facts(MCP, "POST", {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search"}}),
     NO_GRANTS, None, "allow", "rule:mcp-tools"),
    ("JSON-RPC other method: default deny", RULES,
     facts(MCP, "POST", {"jsonrpc": "2.0", "id": 1, "method": "resources/read"}), NO_GRANTS, None, "deny", None),
    ("query keys", RULES, facts("https://pypi.org/simple/?admin=1"), NO_GRANTS, None, "deny", "rule:no-admin-query"),
    ("an evaluation error counts as a deny match", RULES, facts("https://div.example.com/"), NO_GRANTS, None, "deny",
     "rule:broken"),
    ("an evaluation error is no allow match", RULES, facts("https://divallow.example.com/"), NO_GRANTS, None, "deny",
     None),
    ("a body rule on an unread (streamed) body fails closed", RULES,
     facts(OPENAI, "POST", {"model": "gpt-4o-mini"}, read=False), NO_GRANTS, None, "deny", "rule:no-gpt4-stream"),
    ("an unread body fails closed even on a GET", RULES + "unknown_hosts: deny\n",
     facts("https://api.openai.com/v1/models", "GET", read=False), NO_GRANTS, None, "deny", "rule:no-gpt4-stream"),
    ("frozen: escalates", RULES, facts(OPENAI, "POST", {"model": "o3"}), NO_GRANTS, "spend 10x baseline",
     "escalate", "freeze"),
    ("frozen: a deny rule still wins", RULES, facts(OPENAI, "POST", GPT4_STREAM), NO_GRANTS, "spend", "deny",
     "rule:no-gpt4-stream"),
    ("frozen with freeze.action deny", RULES + "freeze: {refusals: 5, action: deny}\n",
     facts(OPENAI, "POST", {"model": "o3"}), NO_GRANTS, "refusals", "deny", "freeze"),
    ("a freeze grant lifts the freeze", RULES, facts(OPENAI, "POST", {"model": "o3"}), grant("freeze"), "spend",
     "allow", "inline#0"),
    ("unknown host: deny", RULES, facts("https://new.example.org/x"), NO_GRANTS, None, "deny", None),
    ("unknown host: escalate", RULES + "unknown_hosts: escalate\n", facts("https://new.example.org/x"), NO_GRANTS,
     None, "escalate", "unknown_hosts"),
    ("unknown host granted", RULES + "unknown_hosts: escalate\n", facts("https://new.example.org/x"),
     grant("unknown_hosts", host="new.example.org"), None, "allow", "unknown_hosts"),
    ("a covered host is refused, not escalated", RULES + "unknown_hosts: escalate\n",
     facts("https://pypi.org/upload", "POST"), NO_GRANTS, None, "deny", "inline#1"),
    ("a host an allow rule names is covered", RULES + "unknown_hosts: escalate\n", facts("https://api.github.com/user"),
     NO_GRANTS, None, "deny", None),
    ("observe: would-deny", RULES + "mode: observe\n", facts(OPENAI, "POST", GPT4_STREAM), NO_GRANTS, None,
     "would-deny", "rule:no-gpt4-stream"),
    ("observe: would-escalate", RULES + "mode: observe\n", facts(OPENAI, "POST", {"model": "o3"}, agent="intern"),
     NO_GRANTS, None, "would-escalate", "rule:interns-ask"),
    ("observe: unknown host would-deny", RULES + "mode: observe\n", facts("https://new.example.org/"), NO_GRANTS, None,
     "would-deny", None),
    ("observe: allow stays allow", RULES + "mode: observe\n", facts("https://pypi.org/simple/"), NO_GRANTS, None,
     "allow", "inline#1"),
    ("no rules at all: the allowlist alone", "", facts("https://pypi.org/simple/"), NO_GRANTS, None, "allow",
     "inline#1"),
    ("no rules at all: default deny", "", facts("https://pypi.org/simple/", "POST"), NO_GRANTS, None, "deny",
     "inline#1"),
]  # fmt: skip


@pytest.fixture(params=["one-program", "rule-by-rule"])
def judged(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every case twice: as the proxy runs it (a host's rules as one CEL program), and rule
    by rule (the path taken on an error, an unread body or a grant) — they must agree."""
    if request.param == "rule-by-rule":
        monkeypatch.setattr(cel_rules, "first_match", lambda expressions: None)
    return str(request.param)


@pytest.mark.parametrize(
    ("extra", "request_", "grants", "frozen", "verdict", "rule"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE]
)
def test_combining(
    tmp_path: Path,
    judged: str,
    extra: str,
    request_: Facts,
    grants: Any,
    frozen: str | None,
    verdict: str,
    rule: str | None,
) -> None:
    policy = policy_of(tmp_path, BASE + extra)
    if judged == "one-program" and policy.rules:
        assert policy._index.candidates(request_.host).first is not None
    outcome = policy.evaluate(request_, grants, frozen)
    assert (outcome.verdict_text, outcome.rule) == (verdict, rule), outcome
    assert outcome.reason


def test_reasons_say_what_happened(tmp_path: Path, judged: str) -> None:
    policy = policy_of(tmp_path, BASE + RULES)
    assert policy.evaluate(facts(OPENAI, "POST", GPT4_STREAM)).reason == "no streamed gpt-4"
    broken = policy.evaluate(facts("https://div.example.com/"))
    assert "could not be evaluated" in broken.reason and "divide by zero" in broken.reason
    unread = policy.evaluate(facts(OPENAI, "POST", {}, read=False))
    assert "not read" in unread.reason
    assert policy.evaluate(facts("https://new.example.org/")).reason == "host new.example.org is not on the allowlist"
    assert "frozen: spend 9x" in policy.evaluate(facts(OPENAI, "POST", {}), frozen="spend 9x").reason


def test_an_observed_outcome_keeps_the_action(tmp_path: Path) -> None:
    outcome = policy_of(tmp_path, BASE + RULES + "mode: observe\n").evaluate(facts(OPENAI, "POST", GPT4_STREAM))
    assert outcome == Outcome(Action.DENY, "no streamed gpt-4", "rule:no-gpt4-stream", observed=True)


def test_time_and_headers_are_variables(tmp_path: Path) -> None:
    policy = policy_of(
        tmp_path,
        BASE
        + """rules:
  - {hosts: [pypi.org], match: "now.getHours('UTC') < 6", action: deny, reason: night}
  - {name: debug-asks, hosts: [pypi.org], match: "'x-debug' in headers && body_size > 3", action: escalate}
""",
    )
    night = datetime.datetime(2026, 1, 1, 3, tzinfo=datetime.UTC)
    day = datetime.datetime(2026, 1, 1, 12, tzinfo=datetime.UTC)
    assert policy.evaluate(facts("https://pypi.org/", now=night)).rule == "rules#0"
    assert policy.evaluate(facts("https://pypi.org/", now=day)).action is Action.ALLOW
    asks = facts("https://pypi.org/", body=b"12345", headers=("X-Debug",), now=day)
    assert policy.evaluate(asks).rule == "rule:debug-asks"


def test_connect_admits_covered_hosts_and_escalations(tmp_path: Path) -> None:
    host = normalize_host
    deny = policy_of(tmp_path, BASE + RULES)
    assert deny.connect(host("api.openai.com"), 443).action is Action.ALLOW
    assert deny.connect(host("api.github.com"), 443).action is Action.ALLOW  # an allow rule names it
    assert deny.connect(host("mcp.example.com"), 443).action is Action.ALLOW
    assert deny.connect(host("div.example.com"), 443).action is Action.DENY  # only a deny rule names it
    refused = deny.connect(host("new.example.org"), 443)
    assert (refused.action, refused.observed) == (Action.DENY, False)
    assert deny.connect(host("pypi.org"), 8443).action is Action.DENY  # the allowlist's port
    # a rule's hosts: have no port (its expression may test `port`): each request decides
    assert deny.connect(host("api.openai.com"), 8443).action is Action.ALLOW
    assert deny.evaluate(facts("https://api.openai.com:8443/v1/models")).action is Action.DENY
    escalate = policy_of(tmp_path, BASE + RULES + "unknown_hosts: escalate\n")
    assert escalate.connect(host("new.example.org"), 443) == Outcome(
        Action.ALLOW, "new.example.org:443 is unknown: its requests escalate", "unknown_hosts"
    )
    observe = policy_of(tmp_path, BASE + RULES + "mode: observe\n").connect(host("new.example.org"), 443)
    assert observe.verdict_text == "would-deny"
    assert deny.covers(host("api.github.com"), 443) and not deny.covers(host("new.example.org"), 443)


def test_needs_body_follows_the_rules_for_the_host(tmp_path: Path) -> None:
    policy = policy_of(tmp_path, BASE + RULES)
    assert policy.needs_body(normalize_host("api.openai.com"), 443)  # model, stream, max_tokens
    assert policy.needs_body(normalize_host("mcp.example.com"), 443)  # rpc_tool
    assert not policy.needs_body(normalize_host("pypi.org"), 443)  # agent, method, query: no body
    plain = policy_of(tmp_path, BASE + "rules: [{match: \"'model' in headers\", action: deny}]\n")
    assert not plain.needs_body(normalize_host("api.openai.com"), 443)  # 'model' is a string there, not the variable


def test_the_host_index_picks_exactly_the_rules_a_scan_would(tmp_path: Path) -> None:
    text = BASE + "rules:\n"
    hosts = ["a.example.com", "*.example.com", "*.b.example.com", "c.example.net", "10.0.0.1"]
    for i, h in enumerate(hosts):
        text += f'  - {{name: r{i}, hosts: ["{h}"], match: "true", action: escalate}}\n'
        if i == 2:
            text += '  - {name: unscoped, match: "true", action: escalate}\n'
    policy = policy_of(tmp_path, text)
    for name in ["a.example.com", "x.b.example.com", "example.com", "c.example.net", "10.0.0.1", "z.org"]:
        host = normalize_host(name)
        want = [
            r.id
            for r in policy.rules
            if not r.hosts
            or any((host.ip is None and host.name.endswith("." + h.name)) if h.wildcard else h.name == host.name
                   for h in r.hosts)
        ]  # fmt: skip
        got = policy.evaluate(facts(f"https://{name}/")).rule
        assert got == want[0], (name, got, want)
        index = policy._index.candidates(host)
        assert [r.id for r in index.ordered] == want, name


def test_body_facts_shapes() -> None:
    openai = body_facts(
        "application/json",
        b'{"model": "gpt-4o", "max_completion_tokens": 99, "stream": true,'
        b' "tools": [{"type": "function", "function": {"name": "get_weather"}}, {"type": "web_search"}]}',
    )
    assert openai == BodyFacts("gpt-4o", 99, True, ("get_weather", "web_search"))
    anthropic = body_facts(
        "application/json; charset=utf-8",
        b'{"model": "claude-sonnet-4", "max_tokens": 1024, "tools": [{"name": "bash", "input_schema": {}}]}',
    )
    assert anthropic == BodyFacts("claude-sonnet-4", 1024, False, ("bash",))
    google = body_facts(
        "application/json",
        b'{"generationConfig": {"maxOutputTokens": 50}, "tools": [{"functionDeclarations": [{"name": "f"}]},'
        b' {"googleSearch": {}}]}',
    )
    assert google == BodyFacts("", 50, False, ("f", "googleSearch"))
    rpc = body_facts(
        "application/json", b'{"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "x"}}'
    )
    assert (rpc.rpc_method, rpc.rpc_tool) == ("tools/call", "x")
    batch = body_facts(
        "application/json",
        b'[{"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "a"}},'
        b' {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "b"}}]',
    )
    assert (batch.rpc_method, batch.rpc_tool, batch.tools) == ("batch", "", ("a", "b"))
    assert body_facts("text/plain", b' {"model": "m"}').model == "m"  # JSON under another name is still read
    for junk in (b"", b"not json", b"{", b'{"model": 5, "stream": "yes", "max_tokens": true}', b"\xff\xfe", b"[1, 2]"):
        assert body_facts("application/json", junk) == BodyFacts(), junk
    assert body_facts("application/octet-stream", b"\x00model") == BodyFacts()


def test_policy_holder_swaps_whole(tmp_path: Path) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(BASE)
    first = load_config(path)
    holder = PolicyHolder(first)
    assert holder.current is first.policy and holder.config is first and holder.loaded_at.endswith("Z")
    path.write_text(BASE + "mode: observe\n")
    second = load_config(path)
    held = holder.current
    holder.swap(second)
    assert holder.current.mode == "observe" and held.mode == "enforce"  # a flow keeps the one it read
    assert first.digest != second.digest and len(second.digest) == 64


def test_an_empty_policy_denies(tmp_path: Path) -> None:
    outcome = Policy().evaluate(facts("https://pypi.org/"))
    assert (outcome.action, outcome.rule) == (Action.DENY, None)
    assert policy_of(tmp_path, BASE).rules == ()


def test_a_failing_grants_view_refuses(tmp_path: Path) -> None:
    class Broken:
        def covers(self, rule: str, facts: Facts) -> Grant | None:
            raise RuntimeError("store gone")

    outcome = policy_of(tmp_path, BASE + RULES).evaluate(
        facts(OPENAI, "POST", {"model": "o3"}, agent="intern"), Broken()
    )
    assert (outcome.action, outcome.rule) == (Action.DENY, None)
    assert outcome.reason == "the policy could not decide (RuntimeError): denied"


def test_a_comment_in_an_expression_stays_in_its_rule(tmp_path: Path) -> None:
    """A host's rules are evaluated as one program: a `//` comment must not swallow the rules
    after it."""
    policy = policy_of(
        tmp_path,
        BASE
        + """rules:
  - {hosts: [pypi.org], match: "method == 'PUT' // writes", action: deny}
  - {hosts: [pypi.org], match: "method == 'DELETE'", action: deny, reason: no deletes}
  - {name: patch, hosts: [pypi.org], match: ".method == 'PATCH'", action: escalate}
""",
    )
    assert policy._index.candidates(normalize_host("pypi.org")).first is not None
    assert policy.evaluate(facts("https://pypi.org/x", "DELETE")).reason == "no deletes"
    assert policy.evaluate(facts("https://pypi.org/x", "PUT")).rule == "rules#0"
    assert policy.evaluate(facts("https://pypi.org/x", "PATCH")).rule == "rule:patch"
    assert policy.evaluate(facts("https://pypi.org/x")).action is Action.ALLOW
