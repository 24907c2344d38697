"""Store benchmark: what the size of the audit log costs the commands that read it.

For audit logs of 10k, 100k and 1M rows (a realistic mix at ≈ 600 B a row: metered LLM
calls with tokens and cost, other allowed requests, CONNECTs, denials, errors; twelve agents
in sessions of ~250 calls; one busy fleet's rate, ≈ 33k rows a day, so 1M rows is a month of
history) it times:
  * `up`, as a user starts it: from exec to the listener accepting connections (migrations,
    intent settlement, loading the budgets' spend so far, then mitmproxy). A 0-row log is
    the baseline (interpreter, imports, mitmproxy); `first up` is the first start on the log,
    which applies any pending migration (an older log's upgrade);
  * `budget show`, `audit stats --since 1d` and `audit --since 1h` (the newest 100 rows of
    the last hour), each run in this process (the command's own work, without the ~0.5 s
    of imports a fresh process adds).
Each figure is the median of --repeat runs.

The rows are written through the store's own writer (as the proxy writes them), so whatever
the store keeps beside them (running totals) is kept too. Generating 1M rows takes a minute
or two: `--keep DIR` keeps the generated logs for the next run.
Run: .venv/bin/python bench/store.py   (options: --rows, --repeat, --keep)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

ROWS_PER_DAY = 33_000
AGENTS = ["agent", "researcher", "coder", "reviewer", "planner", "tester", "triage", "docs", "ops", "data", "qa", "sre"]
SESSION_ROWS = 250
LLM = [  # host, path, service, model, $ per MTok in, out
    ("api.openai.com", "/v1/chat/completions", "openai", "gpt-4o-mini", "0.15", "0.6"),
    ("api.openai.com", "/v1/responses", "openai", "gpt-4.1", "2", "8"),
    ("api.anthropic.com", "/v1/messages", "anthropic", "claude-sonnet-4-5", "3", "15"),
    (
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        "google-gemini",
        "gemini-2.5-flash",
        "0.3",
        "2.5",
    ),
]
OTHER = [
    ("pypi.org", "/simple/{}/"),
    ("files.pythonhosted.org", "/packages/{}/{}-1.2.3-py3-none-any.whl"),
    ("api.github.com", "/repos/example-org/{}/pulls"),
    ("registry.npmjs.org", "/{}"),
]
PACKAGES = ["requests", "numpy", "httpx", "pydantic", "rich", "click", "pytest", "anyio", "attrs", "idna"]
DENIED = ["example.net", "paste.example.org", "telemetry.example.com", "203.0.113.9", "metadata.google.internal"]


def _api() -> tuple[Any, Any]:
    """The store's writer and row type (egress_guard.store; egress_guard.audit before it)."""
    try:
        from egress_guard.store import AuditLog, AuditRow
    except ImportError:
        from egress_guard.audit import AuditLog, AuditRow  # type: ignore[no-redef]
    return AuditLog, AuditRow


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def rows(n: int, end: float, seed: int = 9) -> Any:
    """`n` audit rows ending at `end`, oldest first, and the sessions they belong to."""
    _, AuditRow = _api()
    rnd = random.Random(seed)
    step = 86400 / ROWS_PER_DAY
    start = end - n * step
    sessions: dict[str, tuple[str, float]] = {}  # agent -> (session, started)
    left = dict.fromkeys(AGENTS, 0)
    for i in range(n):
        t = start + i * step + rnd.random() * step
        agent = rnd.choice(AGENTS)
        if left[agent] <= 0:
            sessions[agent] = (f"s-{rnd.getrandbits(48):012x}", t)
            left[agent] = rnd.randint(SESSION_ROWS // 2, SESSION_ROWS * 3 // 2)
            yield ("session", agent, sessions[agent][0], t)
        left[agent] -= 1
        session = sessions[agent][0]
        base: dict[str, Any] = {
            "ts": _iso(t),
            "request_id": f"{rnd.getrandbits(128):032x}",
            "kind": "request",
            "agent": agent,
            "session": session,
            "client": f"127.0.0.1:{rnd.randint(30000, 60000)}",
            "scheme": "https",
            "port": 443,
            "duration_ms": round(rnd.uniform(20, 9000), 1),
        }
        r = rnd.random()
        if r < 0.55:
            host, path, service, model, pin, pout = rnd.choice(LLM)
            tin, tout = rnd.randint(200, 30000), rnd.randint(20, 2000)
            cost = (Decimal(pin) * tin + Decimal(pout) * tout) / 1_000_000
            base |= {
                "decision": "allow",
                "reason": f"allowed by rule {service} (credentialed service); key swapped for {service}",
                "rule": f"preset:{service}",
                "method": "POST",
                "host": host,
                "path": path,
                "status": 200,
                "request_bytes": tin * 4,
                "response_bytes": tout * 4 + 400,
                "service": service,
                "credential": "swapped",
                "model": model,
                "input_tokens": tin,
                "output_tokens": tout,
                "cached_tokens": rnd.choice([0, 0, 0, tin // 2]),
                "cost_usd": f"{cost:f}",
            }
        elif r < 0.75:
            host, pattern = rnd.choice(OTHER)
            pkg = rnd.choice(PACKAGES)
            base |= {
                "decision": "allow",
                "reason": f"allowed by rule {host} (allowlist preset)",
                "rule": f"preset:{host}",
                "method": "GET",
                "host": host,
                "path": pattern.format(pkg, pkg),
                "status": rnd.choice([200, 200, 200, 304, 404]),
                "request_bytes": 0,
                "response_bytes": rnd.randint(500, 400_000),
            }
        elif r < 0.85:
            host = rnd.choice([h for h, *_ in LLM] + [h for h, _ in OTHER])
            base |= {
                "kind": "connect",
                "decision": "allow",
                "reason": f"CONNECT {host}:443 allowed by the allowlist",
                "method": "CONNECT",
                "host": host,
                "path": None,
                "duration_ms": None,
            }
        elif r < 0.95:
            host = rnd.choice(DENIED)
            base |= {
                "decision": "deny",
                "reason": f"host {host} is not in the allowlist (default deny): add a rule to allow it",
                "method": rnd.choice(["GET", "POST", "CONNECT"]),
                "host": host,
                "path": "/collect",
                "status": 403,
                "request_bytes": rnd.randint(0, 4000),
                "response_bytes": 180,
            }
        else:
            host, path, service, model, *_ = rnd.choice(LLM)
            base |= {
                "decision": "error",
                "reason": "upstream connection failed: [Errno 111] Connect call failed; answered 502",
                "method": "POST",
                "host": host,
                "path": path,
                "status": 502,
                "service": service,
                "credential": "swapped",
                "model": model,
                "request_bytes": rnd.randint(800, 40_000),
                "response_bytes": 120,
            }
        yield AuditRow(**base)


async def _generate(db: Path, n: int, end: float, seed: int) -> list[tuple[str, str, float]]:
    AuditLog, _ = _api()
    log = AuditLog(db)
    await log.open()
    sessions: list[tuple[str, str, float]] = []
    last = 0
    try:
        for item in rows(n, end, seed):
            if isinstance(item, tuple):
                sessions.append(item[1:])
                continue
            last = log.record(item)
            if last % 20_000 == 0:
                await log.durable(last)
        if last:
            await log.durable(last)
    finally:
        await log.close()
    return sessions


def _keys(db: Path, sessions: list[tuple[str, str, float]], end: float, first_id: int) -> None:
    """One fake key per session (the table's schema has not changed): each expired 8 h after
    its session began, except each agent's last, which is live."""
    last = {agent: session for agent, session, _ in sessions}
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "INSERT INTO fake_keys (key_id, agent, session, services, created_at, expires_at) VALUES (?,?,?,?,?,?)",
            [
                (
                    f"{first_id:010x}{i:010x}",
                    agent,
                    session,
                    "openai,anthropic,google-gemini",
                    _iso(t),
                    _iso(end + 8 * 3600 if last[agent] == session else t + 8 * 3600),
                )
                for i, (agent, session, t) in enumerate(sessions)
            ],
        )


def _egress_guard(*args: str) -> list[str]:
    return [sys.executable, "-m", "egress_guard", *args]


def _add_rows(db: Path, n: int, end: float, seed: int) -> None:
    started = time.monotonic()
    sessions = asyncio.run(_generate(db, n, end, seed))
    _keys(db, sessions, end, first_id=int(end))
    print(f"  wrote {n:,} rows in {time.monotonic() - started:.1f} s", file=sys.stderr)


def prepare(directory: Path, n: int) -> Path:
    """A config and an audit log of `n` rows ending now in `directory`. A log kept from an
    earlier run is topped up to now at the same rate, so the last hour and day hold what
    they would."""
    config, ready = directory / "egress-guard.yaml", directory / "ready"
    if ready.exists():
        end, now = float(ready.read_text() or time.time()), time.time()
        extra = int((now - end) * ROWS_PER_DAY / 86400)
        if n and extra:
            _add_rows(directory / "egress-guard.db", extra, now, seed=int(end))
            ready.write_text(str(now))
        return config
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    subprocess.run(_egress_guard("init", "--dir", str(directory)), check=True, capture_output=True)
    data = yaml.safe_load(config.read_text())
    limits = {"budget_usd": {"session": 5, "day": 200, "total": 100_000}}
    data["agents"] = {a: {"services": ["openai", "anthropic", "google-gemini"], "limits": limits} for a in AGENTS}
    config.write_text(yaml.safe_dump(data))
    end = time.time()
    if n:
        _add_rows(directory / "egress-guard.db", n, end, seed=9)
    ready.write_text(str(end))
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_up(config: Path) -> float:
    """Seconds from exec to `up` accepting a connection."""
    port = _free_port()
    log = (config.parent / "up.log").open("w")
    started = time.monotonic()
    proc = subprocess.Popen(
        _egress_guard("up", "--config", str(config), "--listen", f"127.0.0.1:{port}"),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return time.monotonic() - started
            if proc.poll() is not None:
                raise RuntimeError(f"up exited ({proc.returncode}): see {log.name}")
            if time.monotonic() - started > 120:
                raise RuntimeError("up did not listen within 120 s")
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def time_command(config: Path, *args: str) -> float:
    from click.testing import CliRunner

    from egress_guard.cli import main

    started = time.monotonic()
    result = CliRunner().invoke(main, [*args, "--config", str(config)])
    elapsed = time.monotonic() - started
    if result.exit_code != 0:
        raise RuntimeError(f"egress-guard {' '.join(args)} failed: {result.output}")
    return elapsed


COMMANDS = {
    "budget show": ("budget", "show", "--format", "json"),
    "audit stats --since 1d": ("audit", "stats", "--since", "1d", "--format", "json"),
    "audit --since 1h": ("audit", "--since", "1h", "--format", "json"),
}


def measure(config: Path, repeat: int) -> dict[str, float]:
    import egress_guard.cli  # noqa: F401 - imported before the clock starts

    out = {"up": statistics.median(time_up(config) for _ in range(repeat))}
    for name, args in COMMANDS.items():
        out[name] = statistics.median(time_command(config, *args) for _ in range(repeat))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,100000,1000000", help="log sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is shown (default 3)")
    parser.add_argument("--keep", type=Path, help="keep the generated logs here (and reuse them)")
    args = parser.parse_args()
    sizes = [0, *(int(s.replace("_", "")) for s in args.rows.split(",") if s.strip())]
    work = args.keep or Path(tempfile.mkdtemp(prefix="egress-guard-bench-store-"))
    results = []
    try:
        for n in sizes:
            print(f"{n:,} rows", file=sys.stderr)
            config = prepare(work / f"rows-{n}", n)
            db = config.parent / "egress-guard.db"
            first = time_up(config)  # a log of an older schema is migrated here, once
            size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                count = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
            figures = measure(config, args.repeat)
            results.append((count, size, first, figures))
            print(f"  {figures}", file=sys.stderr)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    names = ["up", *COMMANDS]
    print(
        f"\n{datetime.date.today()}, SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs; median of {args.repeat} runs, seconds\n"
    )
    header = f"{'rows':>9}  {'DB MB':>6}  {'B/row':>5}  {'first up':>8}  " + "  ".join(f"{n:>22}" for n in names)
    print(header)
    for n, size, first, figures in results:
        per_row = f"{size / n:5.0f}" if n else "    -"
        print(
            f"{n:>9,}  {size / 1e6:6.1f}  {per_row}  {first:8.2f}  " + "  ".join(f"{figures[k]:22.3f}" for k in names)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
