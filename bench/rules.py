"""Micro-benchmark: the policy step's own time per request (#12) with 50 CEL rules across 20
hosts — what PolicyGuard adds to a request: its facts (`request_facts`), the JSON body's
fields when a rule of its host reads them (`body_facts`), and `Policy.evaluate`.

No proxy, no sockets: the rules are those `bench/run.py --rules 50` gives egress-guard (deny,
escalate and allow rules on path, method, query, headers, model, max_tokens and stream; a few
unscoped), loaded through `load_config` as a user's file would be. Requests: a metered POST
on a host with body-reading rules (the bench's load), a GET on a host whose rules need no
body, a request a rule denies, and one to a host no rule names. Each figure is the best of
several timeit repeats, in microseconds per request.

Run: .venv/bin/python bench/rules.py [--rules 50] [--hosts 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import timeit
from pathlib import Path
from typing import Any

import yaml

from egress_guard.config import load_config
from egress_guard.hosts import normalize_host
from egress_guard.verdicts import BodyFacts, body_facts, request_facts

BENCH_HOST = "localhost"


def make_rules(n: int = 50, hosts: int = 20, first_host: str = BENCH_HOST) -> list[dict[str, Any]]:
    """`n` rules over `hosts` hosts (the first is `first_host`, the bench's upstream), none of
    which refuses the bench's own requests (POST /v1/chat/completions, model gpt-4o-mini)."""
    names = [first_host] + [f"api{i}.bench{i % 7}.example.com" for i in range(1, hosts)]
    shapes = [
        ("deny", "path.startsWith('/admin/{i}')"),
        ("escalate", "model == 'o1-pro-{i}' && max_tokens > 100000"),
        ("deny", "method == 'DELETE' && path.startsWith('/v1/files/{i}')"),
        ("escalate", "'x-debug-{i}' in headers"),
        ("allow", "method == 'GET' && path.startsWith('/v{i}/')"),
        ("deny", "stream && model.startsWith('banned-{i}')"),
        ("escalate", "'dump{i}' in query"),
    ]
    rules: list[dict[str, Any]] = []
    for i in range(n):
        action, match = shapes[i % len(shapes)]
        rule: dict[str, Any] = {"name": f"r{i}", "match": match.format(i=i), "action": action, "reason": f"rule {i}"}
        if action == "allow" or i % 10 != 9:  # every tenth deny/escalate rule is unscoped
            rule["hosts"] = [names[i % hosts]]
        rules.append(rule)
    return rules


def per_call_us(fn: Any, repeat: int) -> float:
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=50)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rules = make_rules(args.rules, args.hosts)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "egress-guard.yaml"
        allow = [{"host": BENCH_HOST, "ports": [443]}, {"host": "quiet.example.org"}]
        path.write_text(yaml.safe_dump({"version": 1, "allow": allow, "rules": rules}))
        policy = load_config(path).policy
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]})
    raw = body.encode()
    headers = ["host", "content-type", "content-length", "authorization", "user-agent", "accept"]
    bench, quiet = normalize_host(BENCH_HOST), normalize_host("quiet.example.org")
    other = normalize_host("api4.bench4.example.com")  # rule r4 allows its GET /v4/

    def metered() -> object:
        b = body_facts("application/json", raw) if policy.needs_body(bench, 443) else None
        target = "/v1/chat/completions"
        facts = request_facts(bench, 443, "POST", target, headers, agent="a", body_size=len(raw), body=b)
        return policy.evaluate(facts)

    empty = BodyFacts()  # a GET's empty body, as PolicyGuard gives it

    def no_body() -> object:
        facts = request_facts(other, 443, "GET", "/v4/items?page=2", headers, agent="a", body=empty)
        return policy.evaluate(facts)

    def denied() -> object:
        facts = request_facts(bench, 443, "GET", "/admin/0/users", headers, agent="a", body=empty)
        return policy.evaluate(facts)

    def unnamed() -> object:
        facts = request_facts(quiet, 443, "GET", "/", headers, agent="a", body=empty)
        return policy.evaluate(facts)

    checks = {
        "metered POST, body rules": (metered, "allow"),
        "GET, no body rules": (no_body, "allow"),
        "denied by a rule": (denied, "deny"),
        "host no rule names": (unnamed, "allow"),
    }
    print(f"{args.rules} rules across {args.hosts} hosts; µs per request (best of {args.repeat})")
    for name, (fn, expected) in checks.items():
        got = fn().action.value  # type: ignore[attr-defined]
        assert got == expected, (name, got)
        print(f"  {name:<28} {per_call_us(fn, args.repeat):7.1f} µs   ({got})")


if __name__ == "__main__":
    main()
