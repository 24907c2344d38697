"""`policy suggest`: the allow rules that would have admitted what the audit log saw, for a
person to review before they paste them under `allow:`.

Pure: audit rows in (dicts as `Store.rows` returns them), rule dicts and YAML text out. Only
request rows the *policy* let through or would have refused are used (`allow`, `would-deny`,
`would-escalate`): an `error` or a `deny` is a structural refusal (SSRF, credentials, Host/SNI)
or an enforced one, and no allow rule should be written from it.

Paths become globs the way a person would write them: the exact paths when a host saw few
(`FEW`), else one `/<first segment>/*` per first segment that saw several paths. A path an
allowlist glob can never match (dot segments, encoded slashes) and a method the allowlist
cannot name are left out and counted in the comments.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from egress_guard.policy import path_is_ambiguous

USED_DECISIONS = frozenset({"allow", "would-deny", "would-escalate"})
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")  # what `allow:` accepts
FEW = 5  # up to this many distinct paths on a host: listed exactly


@dataclass
class _Seen:
    requests: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    methods: set[str] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Suggestion:
    """`rules`: allow entries as dicts (host, ports, methods, paths), sorted by host and
    port; `text`: the same as YAML list items with a comment each, to paste under `allow:`;
    `used`: request rows they come from; `skipped`: rows left out, by why."""

    rules: list[dict[str, Any]]
    text: str
    used: int
    skipped: dict[str, int]


def suggest(rows: Iterable[Mapping[str, Any]]) -> Suggestion:
    """The allow rules for `rows` (any order; rows of other kinds and decisions are ignored)."""
    seen: dict[tuple[str, int], _Seen] = {}
    skipped: dict[str, int] = {}
    used = 0
    for row in rows:
        if row.get("kind") != "request" or row.get("decision") not in USED_DECISIONS:
            continue
        host, port, method = row.get("host"), row.get("port"), row.get("method")
        if not host or not port or not method:
            _count(skipped, "no host, port or method")
            continue
        entry = seen.setdefault((str(host), int(port)), _Seen())
        path = (row.get("path") or "/").split("?", 1)[0] or "/"
        method = str(method).upper()
        if method not in METHODS:
            _count(entry.skipped, f"method {method}")
            _count(skipped, "method the allowlist cannot name")
            continue
        if not path.startswith("/") or path_is_ambiguous(path):
            _count(entry.skipped, "ambiguous path")
            _count(skipped, "ambiguous path (dot segments or encoded slashes)")
            continue
        used += 1
        entry.requests += 1
        _count(entry.decisions, str(row["decision"]))
        entry.methods.add(method)
        entry.paths.add(path)
    rules: list[dict[str, Any]] = []
    blocks: list[str] = []
    for (host, port), entry in sorted(seen.items()):
        if not entry.requests:
            continue
        rule = {
            "host": host,
            "ports": [port],
            "methods": [m for m in METHODS if m in entry.methods],
            "paths": globs(entry.paths),
        }
        rules.append(rule)
        blocks.append(_render(rule, entry))
    header = (
        f"# egress-guard policy suggest: {len(rules)} rule(s) from {used} request(s)"
        + (f"; left out: {_counts(skipped)}" if skipped else "")
        + "\n# Review before use, then paste under `allow:` in egress-guard.yaml.\n"
    )
    return Suggestion(rules, header + "".join(blocks), used, skipped)


def globs(paths: Iterable[str]) -> list[str]:
    """Path globs covering `paths`: the exact paths when there are at most FEW, else each
    first segment seen with several paths becomes `/<first>/*` (plus `/<first>` itself when
    it was seen: `*` needs the slash before it)."""
    distinct = sorted(set(paths))
    if len(distinct) <= FEW:
        return [_literal(p) for p in distinct]
    groups: dict[str, list[str]] = {}
    for p in distinct:
        groups.setdefault(p.split("/", 2)[1], []).append(p)
    out: list[str] = []
    for first, members in sorted(groups.items()):
        if len(members) == 1 or not first:
            out.extend(_literal(p) for p in members)
            continue
        stem = "/" + _literal(first)
        if f"/{first}" in members:
            out.append(stem)
        out.append(stem + "/*")
    return out


def _literal(path: str) -> str:
    """`path` as a glob matching only itself (fnmatch has no escape but a one-char class)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def _render(rule: dict[str, Any], entry: _Seen) -> str:
    decisions = ", ".join(f"{n} {d}" for d, n in sorted(entry.decisions.items()))
    note = f"  # {rule['host']}:{rule['ports'][0]}: {entry.requests} request(s) ({decisions})"
    if entry.skipped:
        note += f"; left out: {_counts(entry.skipped)}"
    lines = [
        note,
        f"  - host: {json.dumps(rule['host'])}",
        f"    ports: [{rule['ports'][0]}]",
        f"    methods: [{', '.join(rule['methods'])}]",
        "    paths:",
        *(f"      - {json.dumps(p)}" for p in rule["paths"]),
    ]
    return "\n".join(lines) + "\n"


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))
