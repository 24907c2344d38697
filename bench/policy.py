"""Micro-benchmark: the cost of one allowlist decision (`policy.decide`) at 10, 100 and 1,000 rules.

No proxy, no sockets: a seeded rule set shaped like real allowlists (exact API hosts, some with
method and path lists, and `*.zone` wildcards), and destinations that hit the first exact
rule, the last one, a wildcard three labels deep, and miss (the default deny, by name and by
IP address). Each figure is the best of several timeit repeats, in microseconds per call.
The `scan` column is the old step 1 alone (every rule's `matches_host`, in file order): what
each decision cost before exact hosts and wildcard parents were indexed.

Run: .venv/bin/python bench/policy.py [--sizes 10,100,1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import timeit

from egress_guard.hosts import normalize_host
from egress_guard.policy import Destination, Rule, decide


def make_rules(n: int, rng: random.Random) -> tuple[Rule, ...]:
    """`n` rules in file order: about 70% exact hosts, 30% wildcards; some carry methods/paths."""
    rules: list[Rule] = []
    for i in range(n):
        if i % 10 < 7:
            methods = frozenset({"GET", "POST"}) if rng.random() < 0.5 else None
            paths = ("/v1/*", "/v2/*") if rng.random() < 0.3 else None
            rules.append(Rule(f"r{i}", f"api{i}.service{i % 37}.example.com", methods=methods, paths=paths))
        else:
            rules.append(Rule(f"r{i}", f"zone{i}.example.net", wildcard=True, ports=frozenset({443, 8443})))
    return tuple(rules)


def destinations(rules: tuple[Rule, ...]) -> dict[str, Destination]:
    exact = [r for r in rules if not r.wildcard]
    wild = [r for r in rules if r.wildcard]
    out = {
        "first exact": Destination(normalize_host(exact[0].host), 443, "POST", "/v1/chat"),
        "last exact": Destination(normalize_host(exact[-1].host), 443, "POST", "/v1/chat"),
        "unlisted name": Destination(normalize_host("api.nowhere.example.org"), 443, "GET", "/"),
        "IP literal": Destination(normalize_host("10.1.2.3"), 443, "GET", "/"),
    }
    if wild:
        out["wildcard, deep"] = Destination(normalize_host(f"a.b.c.{wild[-1].host}"), 8443, "GET", "/x")
    return out


def per_call_us(fn: object, repeat: int) -> float:
    timer = timeit.Timer(fn)  # type: ignore[arg-type]
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(9)
    print(f"{'rules':>6}  {'destination':<16} {'decide µs':>10} {'scan µs':>9}  verdict")
    for n in (int(s) for s in args.sizes.split(",")):
        rules = make_rules(n, rng)
        for name, dest in destinations(rules).items():
            decision = decide(rules, dest)
            fast = per_call_us(lambda rules=rules, dest=dest: decide(rules, dest), args.repeat)
            scan = per_call_us(
                lambda rules=rules, dest=dest: [r for r in rules if r.matches_host(dest.host)], args.repeat
            )
            print(f"{n:>6}  {name:<16} {fast:>10.2f} {scan:>9.2f}  {decision.verdict} {decision.rule or ''}")


if __name__ == "__main__":
    main()
