"""The allowlist decision: a pure function from a request's destination to a verdict.

Importable and testable without mitmproxy: no sockets, no flows, no I/O. The addons turn a
flow into a `Destination`, call `decide`, and turn the `Decision` back into the flow.
"""

from __future__ import annotations

import fnmatch
import re
import threading
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote

from egress_guard.hosts import Host


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Rule:
    """One allowlist entry, normalised. `host` is exact, or a suffix when `wildcard`."""

    id: str
    host: str
    wildcard: bool = False
    ports: frozenset[int] = frozenset({443})  # plain HTTP (80) only where a rule lists it
    methods: frozenset[str] | None = None  # None: any method
    paths: tuple[str, ...] | None = None  # None: any path

    def matches_host(self, host: Host) -> bool:
        # The definition `_HostIndex` must agree with (tests/policy compares the two).
        if host.ip is not None:
            return not self.wildcard and self.host == host.name
        if self.wildcard:
            return host.name.endswith("." + self.host)
        return host.name == self.host

    def describe(self) -> str:
        return ("*." if self.wildcard else "") + self.host


@dataclass(frozen=True, slots=True)
class Destination:
    """What a request wants to reach. `method`/`path` are None for a CONNECT."""

    host: Host
    port: int
    method: str | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str
    rule: str | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW


_AMBIGUOUS_PATH = re.compile(r"%2f|%5c|\\", re.IGNORECASE)


def path_is_ambiguous(path: str) -> bool:
    """True for paths an upstream might read differently than a glob does:
    dot segments (also percent-encoded), encoded slashes or backslashes, empty segments."""
    if _AMBIGUOUS_PATH.search(path) or "//" in path:
        return True
    return any(seg in (".", "..") for seg in unquote(path).split("/"))


def decide(rules: tuple[Rule, ...], dest: Destination) -> Decision:
    """Decide whether `dest` may be reached. Evaluation order:

    1. Host: rules whose host matches (exact, or `*.suffix` for any deeper name; an IP
       literal only matches a rule naming that very address), in file order. None → deny.
       (Found through an index, not a scan: see `_HostIndex`.)
    2. Port: of those, rules listing the port. None → deny.
    3. A CONNECT (no method) is allowed here: method and path are checked per request
       inside the tunnel.
    4. Method: rules without a method list, or listing it. None → deny.
    5. Path: rules without path globs, or with a glob matching the path (query dropped).
       A path with dot segments or encoded slashes never matches a glob. None → deny.
    6. Allow, naming the first rule that matched every step.

    Default deny: no rules, no access.
    """
    by_host = _host_index(rules).matching(dest.host)
    if not by_host:
        kind = "IP address" if dest.host.ip is not None else "host"
        return Decision(Verdict.DENY, f"{kind} {dest.host} is not on the allowlist")
    by_port = [r for r in by_host if dest.port in r.ports]
    if not by_port:
        allowed = sorted({p for r in by_host for p in r.ports})
        return Decision(
            Verdict.DENY,
            f"port {dest.port} is not allowed for {dest.host} (allowed: {allowed})",
            by_host[0].id,
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


@dataclass(frozen=True, slots=True)
class _HostIndex:
    """Step 1 without a scan: the rules naming each exact host, and the wildcard rules under
    each suffix, with their positions in file order.

    A name matches `*.suffix` exactly when some `.` in it is followed by `suffix`, so walking
    the name's dots (its parent domains) finds every wildcard rule a scan of
    `Rule.matches_host` would; an IP literal looks up exact rules only. The result is the
    same list, in the same order, at a cost that follows the name's labels, not the rules.
    """

    exact: dict[str, list[tuple[int, Rule]]]
    wildcard: dict[str, list[tuple[int, Rule]]]

    @classmethod
    def build(cls, rules: tuple[Rule, ...]) -> _HostIndex:
        exact: dict[str, list[tuple[int, Rule]]] = {}
        wildcard: dict[str, list[tuple[int, Rule]]] = {}
        for position, rule in enumerate(rules):
            (wildcard if rule.wildcard else exact).setdefault(rule.host, []).append((position, rule))
        return cls(exact, wildcard)

    def matching(self, host: Host) -> list[Rule]:
        name = host.name
        found = self.exact.get(name)
        if host.ip is not None:
            return [rule for _, rule in found] if found else []
        groups = [found] if found else []
        dot = name.find(".")
        while dot >= 0:
            under = self.wildcard.get(name[dot + 1 :])
            if under:
                groups.append(under)
            dot = name.find(".", dot + 1)
        if len(groups) == 1:
            return [rule for _, rule in groups[0]]
        return [rule for _, rule in sorted(entry for group in groups for entry in group)]


# The config's rules are one tuple that lives as long as the proxy: its index is built on
# the first decision and found again by identity (a tuple's hash would cost a scan). The
# entry holds the tuple, so its id cannot be reused while cached.
_INDEXES: dict[int, tuple[tuple[Rule, ...], _HostIndex]] = {}
_INDEXES_MAX = 16
_INDEXES_LOCK = threading.Lock()


def _host_index(rules: tuple[Rule, ...]) -> _HostIndex:
    entry = _INDEXES.get(id(rules))
    if entry is not None and entry[0] is rules:
        return entry[1]
    index = _HostIndex.build(rules)
    if type(rules) is tuple:  # immutable: safe to keep; anything else is indexed per call
        with _INDEXES_LOCK:
            while len(_INDEXES) >= _INDEXES_MAX:
                del _INDEXES[next(iter(_INDEXES))]
            _INDEXES[id(rules)] = (rules, index)
    return index
