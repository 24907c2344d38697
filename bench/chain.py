"""Audit hash chain benchmark: what chaining costs the proxy's writer, and what `audit verify`
costs on a big log.

  * writer: rows/s of `AuditLog` on a fresh SQLite file (WAL, synchronous=NORMAL, the
    default), the rows recorded in bursts of 64 each waited on (`durable`, as responses
    wait), with the chain (the shipped writer) and without it (`chain.link` replaced by a
    no-op: rows unchained), alternating, median of --rounds;
  * hashing alone: microseconds per row of `chain.link` (normalize + JSON + sha256);
  * verify: `egress-guard audit verify` in a fresh process on logs of 100k and --big rows
    (rows/s, and its peak RSS: flat if it streams).
Run: .venv/bin/python bench/chain.py   (options: --rows, --rounds, --big)
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

from egress_guard.store import AuditLog, AuditRow, chain
from egress_guard.timeutil import now_iso

BURST = 64


def make_row(i: int) -> AuditRow:
    return AuditRow(
        ts=now_iso(),
        request_id=f"5f4307e3-0f08-4083-b483-{i:012d}",
        kind="request",
        agent=f"agent{i % 12}",
        session=f"s{i // 250}",
        client="127.0.0.1:54732",
        decision="allow",
        reason="api.openai.com:443 is allowed",
        rule="allowlists.llm#0",
        method="POST",
        scheme="https",
        host="api.openai.com",
        port=443,
        path="/v1/chat/completions",
        status=200,
        request_bytes=1800 + i % 500,
        response_bytes=900 + i % 700,
        duration_ms=812.25 + i % 100,
        service="openai",
        credential="openai",
        model="gpt-4o-mini",
        input_tokens=1200 + i % 300,
        output_tokens=240 + i % 90,
        cost_usd="0.000324",
    )


async def write(db: Path, rows: int) -> float:
    log = AuditLog(db)
    await log.open()
    started = time.perf_counter()
    for start in range(0, rows, BURST):
        last = 0
        for i in range(start, min(start + BURST, rows)):
            last = log.record(make_row(i))
        await log.durable(last)
    elapsed = time.perf_counter() - started
    await log.close()
    return rows / elapsed


def writer_rate(rows: int, hashing: bool) -> float:
    real = chain.link
    if not hashing:
        chain.link = lambda name, head, batch: ([], head)  # type: ignore[assignment,misc]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return asyncio.run(write(Path(tmp) / "a.db", rows))
    finally:
        chain.link = real  # type: ignore[misc]


def hash_cost(rows: int) -> float:
    batch = [make_row(i) for i in range(rows)]
    started = time.perf_counter()
    chain.link("local", (0, ""), batch)
    return (time.perf_counter() - started) / rows * 1e6


def verify(db: Path) -> tuple[float, float, str]:
    """Seconds and peak RSS (MB) of `audit verify` in a fresh process, and its verdict line."""
    config = db.parent / "egress-guard.yaml"  # written by `init`, naming this DB
    code = (
        "import resource, sys, time; from click.testing import CliRunner; from egress_guard.cli import main;"
        "t = time.perf_counter();"
        f"r = CliRunner().invoke(main, ['audit', 'verify', '--config', {str(config)!r}]);"
        "t = time.perf_counter() - t;"
        "print(t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, r.exit_code);"
        "print(r.output.splitlines()[0] if r.output else '', file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"verify failed: {out.stdout}{out.stderr}")
    seconds, rss, exit_code = out.stdout.split()
    assert exit_code == "0", out.stderr
    return float(seconds), float(rss), out.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows per writer run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--big", type=int, default=1_000_000, help="rows of the big log verify reads")
    args = parser.parse_args()

    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for hashing in (False, True):
            rates[hashing].append(writer_rate(args.rows, hashing))
    plain, chained = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"writer, {args.rows} rows in bursts of {BURST}, median of {args.rounds}:")
    print(f"  without the chain {plain:,.0f} rows/s, with it {chained:,.0f} rows/s ({chained / plain:.2f}x)")
    print(f"  all rounds: without {[round(r) for r in rates[False]]}, with {[round(r) for r in rates[True]]}")
    print(f"hashing alone (chain.link): {statistics.median(hash_cost(20_000) for _ in range(3)):.1f} us/row")

    for n in (100_000, args.big):
        with tempfile.TemporaryDirectory() as tmp:
            init = [sys.executable, "-m", "egress_guard", "init", "--dir", tmp]
            subprocess.run(init, capture_output=True, check=True)
            db = Path(tmp) / "egress-guard.db"
            asyncio.run(write(db, n))
            with closing(sqlite3.connect(db, timeout=120)) as conn:  # wait for the writer thread's last checkpoint
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            seconds, rss, verdict = verify(db)
            print(f"verify {n:,} rows: {seconds:.1f} s ({n / seconds:,.0f} rows/s), peak RSS {rss:.0f} MB: {verdict}")


if __name__ == "__main__":
    main()
