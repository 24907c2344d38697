"""Benchmark: one egress-guard on PostgreSQL vs on SQLite, and two replicas on one PostgreSQL
vs one, on this machine.

The same workload as bench/run.py's c=1 / c=8 runs (small priced JSON POSTs over keep-alive
HTTPS, every addon on, an agent with rate limits and budgets, so every call is admitted
against the shared budgets and rate windows in PostgreSQL and settled in the row's
transaction), against:
  * `sqlite`: the embedded default;
  * `pg`: one replica on a throwaway PostgreSQL 15 cluster (fsync off: the database's disk is
    not what is measured; the round trips are);
  * `pg x2`: two replicas on that one database, sharing the CA and fake keys, the load split
    evenly between them by one load generator.
Targets: pg >= 0.9x sqlite (throughput), and the scaling of pg x2 over pg, reported as is:
on 2 cores the proxies, PostgreSQL and the load generator all share them.

With --statements N, PostgreSQL runs with pg_stat_statements (statements inside functions
too) and the N statements that took the most server time are printed at the end (all targets
summed; postgresql-contrib needed).

Run: ./dev bench fleet   (options: --seconds N, --rounds N, --statements N)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import trustme

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

import run  # bench/run.py: the upstream, the load generator, the config
from support.pg import PGCluster


async def load_split(ports: list[int], upstream_port: int, ctxs: list[ssl.SSLContext], c: int, s: float) -> dict:
    """`c` connections spread evenly over the proxies at `ports`, at once; summed."""
    parts = await asyncio.gather(
        *(run.load(port, upstream_port, ctx, max(1, c // len(ports)), s) for port, ctx in zip(ports, ctxs, strict=True))
    )
    total = sum(p["rps"] for p in parts)
    return {
        "rps": total,
        # the latency of the median part (each part's p50 weighted alike: the loads are even)
        "p50": sorted(p["p50"] for p in parts)[len(parts) // 2],
        "p99": max(p["p99"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "requests": sum(p["requests"] for p in parts),
    }


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per target (default 3)")
    parser.add_argument(
        "--statements", type=int, default=0, help="print the N statements taking the most server time (default 0)"
    )
    args = parser.parse_args()
    if PGCluster.binaries() is None:
        print("PostgreSQL's binaries (initdb, pg_ctl, postgres) are missing: apt-get install postgresql")
        return 1

    ca = trustme.CA()
    leaf = ca.issue_cert(run.HOST)
    work = Path(tempfile.mkdtemp(prefix="egress-guard-bench-fleet-"))
    test_ca = work / "test-ca.pem"
    ca.cert_pem.write_to_path(str(test_ca))
    ports: multiprocessing.Queue = multiprocessing.Queue()
    upstream = multiprocessing.Process(
        target=run._upstream_main,
        args=(b"".join(b.bytes() for b in leaf.cert_chain_pems), leaf.private_key_pem.bytes(), ports),
        daemon=True,
    )
    upstream.start()
    upstream_port = ports.get(timeout=10)
    cluster = PGCluster.start(Path("/tmp"))
    if args.statements:
        with cluster.admin() as conn:
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        cluster._run(str(cluster.bindir / "pg_ctl"), "-D", str(cluster.data), "-m", "fast", "-w", "stop")
        cluster.restart()
        with cluster.admin() as conn:  # known once the library is loaded
            conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'all'")
            conn.execute("SELECT pg_reload_conf()")
    top: list[tuple] = []
    procs: list[subprocess.Popen] = []
    results: dict[str, dict[str, list[dict]]] = {}
    try:
        sq, sq_port, sq_ca = run.start_egress_guard(work, test_ca, upstream_port, name="sqlite")
        sq_key = run.FAKE_KEY
        procs.append(sq)
        url = cluster.new_database()
        if args.statements:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
        pg1, pg1_port, pg_ca = run.start_egress_guard(
            work, test_ca, upstream_port, name="pg1", extra={"store": {"url": url, "replica": "bench-1"}}
        )
        pg_key = run.FAKE_KEY
        procs.append(pg1)
        pg2, pg2_port, _ = run.start_egress_guard(
            work,
            test_ca,
            upstream_port,
            name="pg2",
            mint=False,
            extra={"store": {"url": url, "replica": "bench-2"}, "ca_dir": str(work / "pg1" / "certs")},
        )
        procs.append(pg2)
        ctx_sq = ssl.create_default_context(cafile=str(sq_ca))
        ctx_pg = ssl.create_default_context(cafile=str(pg_ca))
        targets = [
            ("sqlite", sq_key, [sq_port], [ctx_sq], [sq]),
            ("pg", pg_key, [pg1_port], [ctx_pg], [pg1]),
            ("pg x2", pg_key, [pg1_port, pg2_port], [ctx_pg, ctx_pg], [pg1, pg2]),
        ]

        def postgres_cpu() -> float:
            return sum(_cpu(pid) for pid in [cluster.pid, *cluster._children()])

        results = {name: {"c1": [], "c8": [], "c16": []} for name, *_ in targets}
        for i in range(args.rounds):
            for name, key, target_ports, ctxs, target_procs in targets:
                print(f"round {i + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                run.FAKE_KEY = key
                for c, seconds in (("c1", args.seconds / 2), ("c8", args.seconds), ("c16", args.seconds)):
                    n = int(c[1:])
                    if n < len(target_ports):
                        continue
                    proxy_cpu, db_cpu = sum(_cpu(p.pid) for p in target_procs), postgres_cpu()
                    r = asyncio.run(load_split(target_ports, upstream_port, ctxs, n, seconds))
                    # CPU per request (warm-up included): the proxies', and PostgreSQL's (same cores)
                    r["proxy_ms"] = (sum(_cpu(p.pid) for p in target_procs) - proxy_cpu) * 1000 / max(r["requests"], 1)
                    r["db_ms"] = (postgres_cpu() - db_cpu) * 1000 / max(r["requests"], 1)
                    results[name][c].append(r)
        if args.statements:
            with psycopg.connect(url) as conn:
                top = conn.execute(
                    "SELECT total_exec_time, calls, mean_exec_time, rows, "
                    "regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements "
                    "ORDER BY total_exec_time DESC LIMIT %s",
                    (args.statements,),
                ).fetchall()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        upstream.terminate()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\negress-guard fleet benchmark ({os.cpu_count()} cores, loopback, keep-alive HTTPS, priced POSTs, "
        f"median of {args.rounds} alternating rounds of {args.seconds:.0f} s)\n"
    )
    print(
        f"{'target':<10}{'c':>4}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'proxy CPU ms/req':>18}{'PostgreSQL CPU ms/req':>23}"
    )
    median: dict[tuple[str, str], dict] = {}
    for name, by_c in results.items():
        for c, runs in by_c.items():
            if not runs:
                continue
            m = median[(name, c)] = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
            print(
                f"{name:<10}{c[1:]:>4}{m['rps']:>9.0f}{m['p50']:>9.2f}{m['p99']:>9.2f}{m['errors']:>8}"
                f"{m['proxy_ms']:>18.2f}{m['db_ms']:>23.2f}"
            )
    print()
    for c in ("c1", "c8", "c16"):
        if ("pg", c) in median and ("sqlite", c) in median:
            ratio = median[("pg", c)]["rps"] / median[("sqlite", c)]["rps"]
            target = "  (target >= 0.90x)" if c == "c8" else ""
            print(f"pg / sqlite throughput, c={c[1:]}: {ratio:.2f}x{target}")
    for c in ("c8", "c16"):
        if ("pg x2", c) in median and ("pg", c) in median:
            print(
                f"two replicas / one, c={c[1:]}: {median[('pg x2', c)]['rps'] / median[('pg', c)]['rps']:.2f}x "
                "(2 cores shared by both replicas, PostgreSQL and the load generator)"
            )
    if top:
        print("\nserver time by statement (all targets, warm-up included; nested ones also in their caller)")
        print(f"{'total ms':>10}{'calls':>9}{'mean ms':>9}{'rows':>9}  statement")
        for total, calls, mean, nrows, query in top:
            print(f"{total:>10.0f}{calls:>9}{mean:>9.3f}{nrows:>9}  {query[:110]}")
    errors = sum(m["errors"] for m in median.values())
    print(f"errors: {errors}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
