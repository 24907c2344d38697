"""The per-request verdict: allow, deny or escalate to a human, from the allowlist, the
CEL `rules:`, grants (approvals that outlive their request) and the session's freeze.

Pure: no sockets, no flows, no store. The addons build `Facts` from a flow, read the grants
and the freeze from the store's caches, call `Policy.evaluate` and act on the `Outcome`;
`egress-guard check` calls the very same method. Structural checks (Host/SNI agreement,
SSRF, the credential guard) are not here and no rule can relax them.

Never raises for a request: an expression that errors counts as matched for deny and
escalate rules and as not matched for allow rules (fail closed), and the reason says so.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, unquote

from egress_guard import cel_rules
from egress_guard.hosts import Host, normalize_host
from egress_guard.policy import Destination, Rule, decide, path_is_ambiguous
from egress_guard.timeutil import now_iso

if TYPE_CHECKING:
    from egress_guard.config import Config


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ESCALATE = "escalate"


# Rule ids that are not a `rules:` entry: what a grant or an outcome names instead.
UNKNOWN_HOSTS = "unknown_hosts"
FREEZE = "freeze"


@dataclass(frozen=True, slots=True)
class BodyFacts:
    """What a rule can see of a JSON request body (absent: "", 0, False, ())."""

    model: str = ""
    max_tokens: int = 0
    stream: bool = False
    tools: tuple[str, ...] = ()
    rpc_method: str = ""
    rpc_tool: str = ""


@dataclass(frozen=True, slots=True)
class Facts:
    """One request as rules see it. `method`/`path` are None for a CONNECT; `path` has no
    query (its keys are `query`); `headers` are lowercase names, never values."""

    host: Host
    port: int
    method: str | None = None
    path: str | None = None
    agent: str | None = None
    session: str | None = None
    service: str | None = None
    query: tuple[str, ...] = ()
    headers: tuple[str, ...] = ()
    body_size: int | None = 0  # None: not known (a streamed body without a Content-Length)
    body: BodyFacts | None = None  # None: not read (streamed, or no rule needs it)
    now: datetime | None = None  # None: now


def request_facts(
    host: Host,
    port: int,
    method: str,
    target: str,
    header_names: Iterable[str] = (),
    *,
    agent: str | None = None,
    session: str | None = None,
    service: str | None = None,
    body_size: int | None = 0,
    body: BodyFacts | None = None,
    now: datetime | None = None,
) -> Facts:
    """The Facts of one request from its request target (`/path?query`, as sent): the path
    without the query, the query's keys (values never), header names lowercased, each once.
    The proxy and `egress-guard check` both build Facts here, so they judge alike."""
    path, _, query = target.partition("?")
    keys = tuple(dict.fromkeys(k for k, _ in parse_qsl(query, keep_blank_values=True))) if query else ()
    names = tuple(dict.fromkeys(h.lower() for h in header_names))
    return Facts(host, port, method.upper(), path or "/", agent, session, service, keys, names, body_size, body, now)


@dataclass(frozen=True, slots=True)
class Grant:
    """A standing approval: requests to host:port that `rule` would escalate go through.
    `agent`/`session` None: any."""

    id: int
    rule: str
    host: str
    port: int
    agent: str | None
    session: str | None


class Grants(Protocol):
    def covers(self, rule: str, facts: Facts) -> Grant | None: ...


class _NoGrants:
    def covers(self, rule: str, facts: Facts) -> Grant | None:
        return None

    def __repr__(self) -> str:
        return "NO_GRANTS"


NO_GRANTS: Grants = _NoGrants()


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdict. In observe mode (`observed`) `action` is what WOULD have happened and
    the request goes on anyway."""

    action: Action
    reason: str
    rule: str | None
    observed: bool = False

    @property
    def verdict_text(self) -> str:
        """As the audit log records it: allow, deny, escalate, would-deny, would-escalate."""
        if self.observed and self.action is not Action.ALLOW:
            return f"would-{self.action.value}"
        return self.action.value


@dataclass(frozen=True)
class EscalationSettings:
    timeout: float = 120.0  # seconds a held request waits for a decision
    webhook_url: str | None = field(default=None, repr=False)  # its path may hold a token (Slack's does)
    webhook_secret_file: Path | None = None
    callback_listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class FreezeSettings:
    window: float  # seconds per bucket; thresholds are per window
    warmup: int  # windows of history before anything can freeze
    requests_rate: float | None  # factors over the baseline; None: not watched
    spend_rate: float | None
    hosts_rate: float | None
    refusals: int | None  # absolute refusals per window
    min_requests: int
    min_usd: Decimal
    action: str  # escalate | deny


@dataclass(frozen=True, slots=True)
class HostPattern:
    """A `hosts:` entry of a rule: exact, or any name below `name` when `wildcard`."""

    name: str
    wildcard: bool = False

    def __str__(self) -> str:
        return ("*." if self.wildcard else "") + self.name


@dataclass(frozen=True, slots=True)
class CelRule:
    """One `rules:` entry, compiled. `hosts` empty: any host (deny/escalate only)."""

    id: str  # "rule:<name>" or "rules#<i>"
    action: Action
    expression: cel_rules.Compiled
    reason: str = ""
    hosts: tuple[HostPattern, ...] = ()

    @property
    def needs_body(self) -> bool:
        return self.expression.needs_body

    def describe(self) -> str:
        return self.reason or f"{self.id} matched ({self.expression.source})"


@dataclass(frozen=True, slots=True)
class _Candidates:
    """The rules that can apply to one host: `ordered` is the deny rules, then the escalate
    rules, then the allow rules, each in file order; `first` evaluates them as one program."""

    ordered: tuple[CelRule, ...]
    first: cel_rules.FirstMatch | None
    needs_body: bool
    variables: frozenset[str]


_NONE = _Candidates((), None, False, frozenset())
_CACHE_MAX = 4096  # host names seen per policy; agents choose them, so bounded
_ACTION_ORDER = {Action.DENY: 0, Action.ESCALATE: 1, Action.ALLOW: 2}


class _RuleIndex:
    """The `rules:` that can apply to a host: those naming it (exact, or a `*.` parent),
    plus the unscoped ones. Looked up once per host name and cached; hosts with the same
    rules share one compiled FirstMatch, compiled at load for every host a rule names."""

    def __init__(self, rules: tuple[CelRule, ...]) -> None:
        self.rules = rules
        self.exact: dict[str, list[int]] = {}
        self.wildcard: dict[str, list[int]] = {}
        self.unscoped: list[int] = []
        for i, rule in enumerate(rules):
            if not rule.hosts:
                self.unscoped.append(i)
            for h in rule.hosts:
                (self.wildcard if h.wildcard else self.exact).setdefault(h.name, []).append(i)
        self.cache: dict[str, _Candidates] = {}
        self.sets: dict[tuple[int, ...], _Candidates] = {}
        self.lock = threading.Lock()
        if rules:
            # compiled now, not on a first request: every set of rules a named host gets
            for name in self.exact:
                self.candidates(normalize_host(name))
            for name in [*(f"_.{suffix}" for suffix in self.wildcard), "_.unscoped.invalid"]:
                self.candidates(Host(name))

    def scoped(self, host: Host) -> set[int]:
        found = set(self.exact.get(host.name, ()))
        if host.ip is None:
            name = host.name
            dot = name.find(".")
            while dot >= 0:
                found.update(self.wildcard.get(name[dot + 1 :], ()))
                dot = name.find(".", dot + 1)
        return found

    def candidates(self, host: Host) -> _Candidates:
        if not self.rules:
            return _NONE
        hit = self.cache.get(host.name)
        if hit is not None:
            return hit
        key = tuple(
            sorted(self.scoped(host).union(self.unscoped), key=lambda i: (_ACTION_ORDER[self.rules[i].action], i))
        )
        made = self.sets.get(key)
        if made is None:
            ordered = tuple(self.rules[i] for i in key)
            made = _Candidates(
                ordered,
                cel_rules.first_match([r.expression for r in ordered]) if ordered else None,
                any(r.needs_body for r in ordered),
                frozenset().union(*(r.expression.variables for r in ordered)),
            )
        with self.lock:
            self.sets.setdefault(key, made)
            if len(self.cache) >= _CACHE_MAX:
                self.cache.clear()
            self.cache[host.name] = made
        return made


def _activation(facts: Facts, variables: frozenset[str]) -> dict[str, Any]:
    """The CEL variables the candidate rules name, and only those."""
    body = facts.body or _EMPTY_BODY
    out: dict[str, Any] = {}
    for name in variables:
        if name == "now":
            out[name] = facts.now or cel_rules.utc_now()
        elif name in _FROM_BODY:
            out[name] = _FROM_BODY[name](body)
        else:
            out[name] = _FROM_FACTS[name](facts)
    return out


_EMPTY_BODY = BodyFacts()
_FROM_FACTS: dict[str, Any] = {
    "agent": lambda f: f.agent or "",
    "session": lambda f: f.session or "",
    "service": lambda f: f.service or "",
    "host": lambda f: f.host.name,
    "port": lambda f: f.port,
    "method": lambda f: f.method or "",
    "query": lambda f: list(f.query),
    "headers": lambda f: list(f.headers),
    "body_size": lambda f: f.body_size or 0,  # unknown: `_judge` refuses to judge it
    "path": lambda f: unquote(f.path or ""),  # as an upstream reads it: /%61dmin is /admin
}
_FROM_BODY: dict[str, Any] = {
    "model": lambda b: b.model,
    "max_tokens": lambda b: b.max_tokens,
    "stream": lambda b: b.stream,
    "tools": lambda b: list(b.tools),
    "rpc_method": lambda b: b.rpc_method,
    "rpc_tool": lambda b: b.rpc_tool,
}
_BODY_NOT_READ = "the rule reads the body, which was not read (streamed: over 1 MiB)"
_SIZE_UNKNOWN = "the rule reads body_size, which is not known (a streamed body without a Content-Length)"


def _unjudgeable(facts: Facts, needs_body: bool, variables: frozenset[str]) -> str | None:
    """Why rules naming `variables` cannot judge this request (fail closed), or None."""
    if needs_body and facts.body is None:
        return _BODY_NOT_READ
    if facts.body_size is None and "body_size" in variables:
        return _SIZE_UNKNOWN
    return None


def _judge(rule: CelRule, facts: Facts, data: dict[str, Any]) -> bool | str:
    """True/False, or why the rule could not be evaluated."""
    why = _unjudgeable(facts, rule.needs_body, rule.expression.variables)
    if why is not None:
        return why
    return cel_rules.evaluate(rule.expression, data)


@dataclass(frozen=True)
class Policy:
    """One immutable snapshot of the policy (`Config.policy`). `allowlist` is `allow:` and
    the presets (`policy.decide`), `rules` the CEL rules in file order."""

    mode: str = "enforce"  # enforce | observe
    unknown_hosts: str = "deny"  # deny | escalate
    escalation: EscalationSettings = field(default_factory=EscalationSettings)
    freeze: FreezeSettings | None = None
    allowlist: tuple[Rule, ...] = ()
    rules: tuple[CelRule, ...] = ()
    _index: _RuleIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", _RuleIndex(self.rules))

    def covers(self, host: Host, port: int) -> bool:
        """Whether anything could allow a request to host:port: an allowlist rule for it, or
        an allow or escalate rule scoped to the host."""
        if decide(self.allowlist, Destination(host, port)).allowed:
            return True
        index = self._index
        return any(index.rules[i].action is not Action.DENY for i in index.scoped(host))

    @property
    def plain(self) -> bool:
        """The allowlist alone decides: no rules, enforcing, unknown hosts refused (the
        proxy's fast path skips `evaluate`; a frozen session is still judged)."""
        return not self.rules and self.mode == "enforce" and self.unknown_hosts == "deny"

    def may_admit(self, host: Host, port: int) -> bool:
        """Whether a request to host:port the allowlist refuses could still be admitted (or
        held for a human): a non-deny rule that can apply to the host, unknown hosts
        escalated, or observe mode. False: the allowlist's refusal is the verdict, given at
        once without resolving the name (RequestGuard)."""
        if self.mode == "observe" or self.unknown_hosts == "escalate":
            return True
        return any(rule.action is not Action.DENY for rule in self._index.candidates(host).ordered)

    def covers_name(self, host: Host) -> bool:
        """Whether a sandbox's DNS should answer for `host` (any port): an allowlist rule or a
        non-deny rule names it, or unknown hosts escalate, or observe mode (else NXDOMAIN)."""
        if self.mode == "observe" or self.unknown_hosts == "escalate":
            return True
        if any(rule.matches_host(host) for rule in self.allowlist):
            return True
        index = self._index
        return any(index.rules[i].action is not Action.DENY for i in index.scoped(host))

    def connect(self, host: Host, port: int) -> Outcome:
        """Whether a tunnel to host:port is admitted. Method, path and agent are only known
        per request inside it: that is where rules, grants and escalations are decided."""
        decision = decide(self.allowlist, Destination(host, port))
        if decision.allowed:
            return Outcome(Action.ALLOW, decision.reason, decision.rule)
        if self.covers(host, port):
            return Outcome(Action.ALLOW, f"{host}:{port} is named by a rule", None)
        if self.unknown_hosts == "escalate":
            return Outcome(Action.ALLOW, f"{host}:{port} is unknown: its requests escalate", UNKNOWN_HOSTS)
        return Outcome(Action.DENY, decision.reason, decision.rule, observed=self.mode == "observe")

    def needs_body(self, host: Host, port: int) -> bool:
        """Whether a rule that can apply to this host reads the body (model, tools, ...)."""
        return self._index.candidates(host).needs_body

    def evaluate(self, facts: Facts, grants: Grants = NO_GRANTS, frozen: str | None = None) -> Outcome:
        """The verdict for one request. Order (the first that applies decides):

        1. A matched `deny` rule → DENY. Nothing lifts it: no approval, no grant.
        2. The session is frozen (`frozen` says why) and no grant for `freeze` covers it →
           ESCALATE, or DENY with `freeze.action: deny`.
        3. A matched `escalate` rule no grant covers → ESCALATE (the first in file order).
        4. The allowlist allows, or an `allow` rule matches, or a matched escalate rule is
           covered by a grant, or a grant for `unknown_hosts` covers host:port → ALLOW.
        5. Otherwise: a host nothing covers, with `unknown_hosts: escalate` → ESCALATE;
           else DENY with the allowlist's reason.

        A rule whose evaluation errors counts as matched for deny and escalate and as not
        matched for allow. In observe mode the outcome is `observed`: recorded, not enforced.
        """
        try:
            outcome = self._evaluate(facts, grants, frozen)
        except Exception as exc:  # a bug here, or in a Grants view: refuse, and say so
            return Outcome(Action.DENY, f"the policy could not decide ({type(exc).__name__}): denied", None)
        if self.mode == "observe" and outcome.action is not Action.ALLOW:
            return replace(outcome, observed=True)
        return outcome

    def _evaluate(self, facts: Facts, grants: Grants, frozen: str | None) -> Outcome:
        cands = self._index.candidates(facts.host)
        allowed_by: CelRule | None = None  # an allow rule that matched
        granted: CelRule | None = None  # a matched escalate rule a grant covers
        if cands.ordered and facts.path is not None and "path" in cands.variables and path_is_ambiguous(facts.path):
            # an upstream may read /repos/%2e%2e/admin as /admin: no rule on the path can judge it
            return Outcome(
                Action.DENY,
                f"path {facts.path!r} is ambiguous (dot segments, encoded slashes or empty segments): "
                "rules on the path cannot judge it",
                None,
            )
        if cands.ordered:
            data = _activation(facts, cands.variables)
            first = None
            if cands.first is not None and _unjudgeable(facts, cands.needs_body, cands.variables) is None:
                first = cands.first(data)  # one evaluation for the common case
            hit = cands.ordered[first] if first is not None and first >= 0 else None
            if first is not None and not (
                hit is not None and hit.action is Action.ESCALATE and grants.covers(hit.id, facts) is not None
            ):
                if hit is not None and hit.action is Action.DENY:
                    return Outcome(Action.DENY, hit.describe(), hit.id)
                if frozen is not None:
                    frozen_outcome = self._frozen(facts, grants, frozen)
                    if frozen_outcome is not None:
                        return frozen_outcome
                if hit is not None and hit.action is Action.ESCALATE:
                    return Outcome(Action.ESCALATE, hit.describe(), hit.id)
                allowed_by = hit
            else:  # an error, an unread body or a grant: rule by rule
                outcome, allowed_by, granted = self._rule_by_rule(cands, facts, data, grants, frozen)
                if outcome is not None:
                    return outcome
        elif frozen is not None:
            frozen_outcome = self._frozen(facts, grants, frozen)
            if frozen_outcome is not None:
                return frozen_outcome
        decision = decide(self.allowlist, Destination(facts.host, facts.port, facts.method, facts.path))
        if decision.allowed:
            return Outcome(Action.ALLOW, decision.reason, decision.rule)
        if allowed_by is not None:
            return Outcome(Action.ALLOW, allowed_by.reason or f"{allowed_by.id} allows it", allowed_by.id)
        if granted is not None:
            return Outcome(Action.ALLOW, f"{granted.id}: approved earlier (a grant covers it)", granted.id)
        # An unknown host's grant stands only while the host is unknown and such hosts
        # escalate: once the config names it (with methods and paths) or refuses unknown
        # hosts, the config decides, not an old approval.
        if self.unknown_hosts == "escalate" and not self.covers(facts.host, facts.port):
            grant = grants.covers(UNKNOWN_HOSTS, facts)
            if grant is not None:
                return Outcome(
                    Action.ALLOW, f"{facts.host}:{facts.port}: approved earlier (grant {grant.id})", UNKNOWN_HOSTS
                )
            return Outcome(
                Action.ESCALATE, f"{facts.host}:{facts.port} is not on the allowlist: needs approval", UNKNOWN_HOSTS
            )
        return Outcome(Action.DENY, decision.reason, decision.rule)

    def _frozen(self, facts: Facts, grants: Grants, frozen: str) -> Outcome | None:
        if grants.covers(FREEZE, facts) is not None:
            return None
        deny = self.freeze is not None and self.freeze.action == "deny"
        return Outcome(Action.DENY if deny else Action.ESCALATE, f"frozen: {frozen}", FREEZE)

    def _rule_by_rule(
        self, cands: _Candidates, facts: Facts, data: dict[str, Any], grants: Grants, frozen: str | None
    ) -> tuple[Outcome | None, CelRule | None, CelRule | None]:
        """Steps 1-3 one rule at a time: (the outcome if they decide, else the allow rule
        that matched and the granted escalate rule, for step 4)."""
        for rule in cands.ordered:
            if rule.action is not Action.DENY:
                break
            hit = _judge(rule, facts, data)
            if hit is True:
                return Outcome(Action.DENY, rule.describe(), rule.id), None, None
            if hit is not False:
                return Outcome(Action.DENY, f"{rule.id} could not be evaluated ({hit}): denied", rule.id), None, None
        if frozen is not None:
            frozen_outcome = self._frozen(facts, grants, frozen)
            if frozen_outcome is not None:
                return frozen_outcome, None, None
        granted: CelRule | None = None
        allowed_by: CelRule | None = None
        for rule in cands.ordered:
            if rule.action is Action.ESCALATE:
                hit = _judge(rule, facts, data)
                if hit is False:
                    continue
                if grants.covers(rule.id, facts) is not None:
                    granted = granted or rule
                    continue
                if hit is True:
                    return Outcome(Action.ESCALATE, rule.describe(), rule.id), None, None
                reason = f"{rule.id} could not be evaluated ({hit}): needs approval"
                return Outcome(Action.ESCALATE, reason, rule.id), None, None
            if rule.action is Action.ALLOW and allowed_by is None and _judge(rule, facts, data) is True:
                allowed_by = rule
        return None, allowed_by, granted


EMPTY_POLICY = Policy()


class PolicyHolder:
    """The policy in force, swapped whole on a reload. Addons read `.current` once per flow
    and keep it on the flow, so a request in flight finishes under the policy it began with."""

    def __init__(self, config: Config) -> None:
        # Any: under `mypy proxy` the config's Policy is egress_guard.verdicts', not this module's
        self._state: tuple[Config, Any, str] = (config, config.policy, now_iso())

    @property
    def current(self) -> Policy:
        return self._state[1]

    @property
    def config(self) -> Config:
        return self._state[0]

    @property
    def loaded_at(self) -> str:
        return self._state[2]

    def swap(self, config: Config) -> None:
        self._state = (config, config.policy, now_iso())  # one assignment: readers never see half


# Where the shapes of the metered APIs keep the output cap.
_MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def body_facts(content_type: str, body: bytes) -> BodyFacts:
    """What rules can see of a JSON body: OpenAI (chat, responses), Anthropic, Google
    (generationConfig, functionDeclarations) and JSON-RPC (MCP: `tools/call`'s tool). The
    body is parsed when it says it is JSON or looks like it (a client cannot hide a model
    behind `text/plain`). Anything else, or invalid JSON: empty facts. Never raises."""
    try:
        start = body.lstrip()[:1]
        if "json" not in content_type.lower() and start not in (b"{", b"["):
            return _EMPTY_BODY
        data = json.loads(body)
        return _body_facts(data)
    except Exception:  # any body at all: facts are a help to rules, never a reason to crash
        return _EMPTY_BODY


def _body_facts(data: Any) -> BodyFacts:
    if isinstance(data, list):  # a JSON-RPC batch: every call's tool, the method "batch"
        calls = [_body_facts(item) for item in data if isinstance(item, dict)]
        tools = tuple(c.rpc_tool for c in calls if c.rpc_tool)
        return BodyFacts(rpc_method="batch" if calls else "", rpc_tool=tools[0] if len(tools) == 1 else "", tools=tools)
    if not isinstance(data, dict):
        return _EMPTY_BODY
    model = data.get("model")
    stream = data.get("stream") is True
    max_tokens: int = next((data[k] for k in _MAX_TOKEN_KEYS if _is_int(data.get(k))), 0)
    gen = data.get("generationConfig")
    if not max_tokens and isinstance(gen, dict) and _is_int(gen.get("maxOutputTokens")):
        max_tokens = gen["maxOutputTokens"]
    method = data.get("method")
    rpc_method = method if "jsonrpc" in data and isinstance(method, str) else ""
    rpc_tool = ""
    params = data.get("params")
    if rpc_method == "tools/call" and isinstance(params, dict) and isinstance(params.get("name"), str):
        rpc_tool = params["name"]
    return BodyFacts(
        model=model if isinstance(model, str) else "",
        max_tokens=max_tokens,
        stream=stream,
        tools=_tool_names(data.get("tools")),
        rpc_method=rpc_method,
        rpc_tool=rpc_tool,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tool_names(tools: Any) -> tuple[str, ...]:
    """Tool names in each API's shape: OpenAI chat `{function: {name}}`, OpenAI responses
    and Anthropic `{name}`, a built-in tool by its `type` (web_search, code_interpreter),
    Google `{functionDeclarations: [{name}]}` or a built-in by its key (googleSearch)."""
    if not isinstance(tools, list):
        return ()
    out: list[str] = []
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out.append(fn["name"])
        elif isinstance(tool.get("name"), str):
            out.append(tool["name"])
        elif isinstance(tool.get("functionDeclarations"), list):
            out.extend(
                d["name"]
                for d in tool["functionDeclarations"]
                if isinstance(d, dict) and isinstance(d.get("name"), str)
            )
        elif isinstance(tool.get("type"), str):
            out.append(tool["type"])
        else:
            out.extend(k for k in tool if isinstance(k, str))
    return tuple(out)
