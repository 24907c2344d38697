"""Benchmark: direct vs plain mitmdump vs egress-guard (every addon on), on this machine.

Measures, over keep-alive HTTPS (CONNECT + TLS through the proxies):
  * small JSON POSTs at concurrency 1 and 8: requests/s, p50/p90/p99 latency;
  * SSE first-byte time (request sent -> first event received) at p50/p90;
  * metered OpenAI chat streams as the SDKs send them by default, 8 kept-alive connections,
    each event split across HTTP chunks: how many broke (target 0), first byte p50;
  * the proxy's resident memory after the run.
Prints a table and the ratios against the targets (egress-guard >= 1.0x mitmdump
throughput, <= 1.0x its p50; SSE first byte <= direct + 3 ms at p50).

Everything runs on 127.0.0.1: a local asyncio TLS upstream with its own test CA,
mitmdump and `egress-guard up` as subprocesses, and the load generator in this process.
Run: ./dev bench   (options: --seconds N, --sse N, --streams N, --rounds N)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme
import yaml

HOST = "localhost"  # resolvable without DNS for mitmdump; pinned to 127.0.0.1 for egress-guard
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello " * 20}]}).encode()
REPLY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"message": {"content": "hi"}}],
        "usage": {"prompt_tokens": 25, "completion_tokens": 1},
    }
).encode()
SSE_EVENTS, SSE_GAP = 5, 0.02
FAKE_KEY = "sk-bench-unset"  # minted by start_egress_guard; sent to every target alike
AUDIT_DBS: list[Path] = []  # egress-guard's audit log: proof that the run went through every addon


# --- upstream (own process) -----------------------------------------------------------------


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            path = lines[0].split()[1]
            length = 0
            for line in lines[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            if path == b"/v1/chat/completions" and b'"stream": true' in body:
                await _chat_stream(writer, b'"include_usage": true' in body)
            elif path.startswith(b"/sse"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                for i in range(SSE_EVENTS):
                    if i:
                        await asyncio.sleep(SSE_GAP)
                    data = f'data: {{"i": {i}}}\n\n'.encode()
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(REPLY), REPLY)
                )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def _chat_stream(writer: asyncio.StreamWriter, usage: bool) -> None:
    """An OpenAI chat stream, each event split in two HTTP chunks at a random offset (real
    providers' TCP segments split events all the time), with the usage-only chunk only if
    the request asked for it."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    base = '"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini"'
    events = [
        f'{{{base},"choices":[{{"index":0,"delta":{{"content":"{piece}"}},"finish_reason":null}}]}}'
        for piece in ("hel", "lo ", "there")
    ]
    events.append(f'{{{base},"choices":[{{"index":0,"delta":{{}},"finish_reason":"stop"}}]}}')
    if usage:
        events.append(f'{{{base},"choices":[],"usage":{{"prompt_tokens":25,"completion_tokens":3}}}}')
    events.append("[DONE]")
    for event in events:
        data = f"data: {event}\n\n".encode()
        cut = random.randint(1, len(data) - 1)
        for piece in (data[:cut], data[cut:]):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
    writer.write(b"0\r\n\r\n")


def _upstream_main(cert_pem: bytes, key_pem: bytes, port_queue: multiprocessing.Queue) -> None:
    async def main() -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.NamedTemporaryFile(suffix=".pem") as f:
            f.write(cert_pem + key_pem)
            f.flush()
            ctx.load_cert_chain(f.name)
        server = await asyncio.start_server(_handle, "127.0.0.1", 0, ssl=ctx)
        port_queue.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


# --- load generator -------------------------------------------------------------------------


async def _open(proxy_port: int | None, port: int, ctx: ssl.SSLContext):
    if proxy_port is None:
        return await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=HOST)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(f"CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n")[0] + b" ":
        raise RuntimeError(f"CONNECT refused: {head[:200]!r}")
    await writer.start_tls(ctx, server_hostname=HOST)
    return reader, writer


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            await reader.readexactly(int(line[15:]))
    return status


async def load(proxy_port: int | None, port: int, ctx: ssl.SSLContext, concurrency: int, seconds: float) -> dict:
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {FAKE_KEY}\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    latencies: list[float] = []
    errors = requests = 0
    warmup_end = time.perf_counter() + 1.0
    end = warmup_end + seconds

    async def worker() -> None:
        nonlocal errors, requests
        reader, writer = await _open(proxy_port, port, ctx)
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            writer.write(request)
            status = await _read_response(reader)
            t1 = time.perf_counter()
            requests += 1
            if status != 200:
                errors += 1
            if t0 >= warmup_end:
                latencies.append(t1 - t0)
        writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {
        "rps": len(latencies) / seconds,
        "p50": q[49] * 1000,
        "p90": q[89] * 1000,
        "p99": q[98] * 1000,
        "n": len(latencies),
        "requests": requests,  # warm-up included
        "errors": errors,
    }


STREAM_BODY = json.dumps(
    {"model": "gpt-4o-mini", "stream": True, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
).encode()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        data = await reader.readexactly(size + 2)
        if size == 0:
            return body
        body += data[:-2]


async def metered_streams(proxy_port: int | None, port: int, ctx: ssl.SSLContext, concurrency: int, n: int) -> dict:
    """`n` metered OpenAI chat streams as the SDKs send them by default (no include_usage:
    egress-guard adds it and drops the usage chunk on the way back), `concurrency` kept-alive
    connections. A stream is broken if its body does not end with `data: [DONE]`, carries a
    usage chunk the client did not ask for, or its framing fails (then the connection is
    replaced)."""
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {FAKE_KEY}\r\nContent-Length: {len(STREAM_BODY)}\r\n\r\n"
    ).encode() + STREAM_BODY
    firsts: list[float] = []
    broken = 0
    left = n

    async def worker() -> None:
        nonlocal broken, left
        reader, writer = await _open(proxy_port, port, ctx)
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                first = await reader.readuntil(b"\r\n")  # the first chunk's size line: bytes are here
                firsts.append(time.perf_counter() - t0)
                size = int(first.strip(), 16)
                body = (await reader.readexactly(size + 2))[:-2] + await _read_chunked(reader)
                ok = head.startswith(b"HTTP/1.1 200") and body.endswith(b"data: [DONE]\n\n") and b'"usage"' not in body
            except (ValueError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                ok = False
            if not ok:
                broken += 1
                writer.close()
                reader, writer = await _open(proxy_port, port, ctx)
        writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"n": n, "broken": broken, "first_p50": statistics.median(firsts) * 1000 if firsts else float("nan")}


async def sse_first_byte(proxy_port: int | None, port: int, ctx: ssl.SSLContext, samples: int) -> dict:
    request = f"GET /sse HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {FAKE_KEY}\r\n\r\n".encode()
    reader, writer = await _open(proxy_port, port, ctx)
    firsts, totals = [], []
    for _ in range(samples):
        t0 = time.perf_counter()
        writer.write(request)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"data: ")
        firsts.append(time.perf_counter() - t0)
        await reader.readuntil(b"0\r\n\r\n")
        totals.append(time.perf_counter() - t0)
    writer.close()
    return {
        "first_p50": statistics.median(firsts) * 1000,
        "first_p90": statistics.quantiles(firsts, n=10)[8] * 1000,
        "total_p50": statistics.median(totals) * 1000,
    }


# --- proxies --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_mitmdump(work: Path, test_ca: Path, *extra: str) -> tuple[subprocess.Popen, int, Path]:
    port = _free_port()
    confdir = work / f"mitmdump{len(extra)}"
    exe = shutil.which("mitmdump", path=str(Path(sys.executable).parent)) or "mitmdump"
    proc = subprocess.Popen(
        [
            exe,
            "-q",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(port),
            "--set",
            f"confdir={confdir}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={test_ca}",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_port(port, proc)
    return proc, port, confdir / "mitmproxy-ca-cert.pem"


def start_egress_guard(
    work: Path,
    test_ca: Path,
    upstream_port: int,
    spend: bool = True,
    extra: dict | None = None,
    name: str = "egress-guard",
    mint: bool = True,
    rules: int = 0,
) -> tuple[subprocess.Popen, int, Path]:
    """egress-guard in a directory of its own under `work` (`name`), with every addon on;
    `extra` is merged into its config (e.g. a `store:` and the `ca_dir` of a replica that
    shares another's CA and fake-key HMAC key; then `mint=False` keeps that one's key)."""
    port = _free_port()
    directory = work / name
    directory.mkdir()
    # Every addon on: allowlist with method/path rules, SSRF pinning, and a credentialed service
    # metered as OpenAI (`meter: {api: openai}`), so that every request is a fake-key check and
    # swap, every response is scrubbed, and every POST is priced before (reservation) and after
    # (real usage, via genai-prices) against the agent's rate limits, model allowlist and budgets.
    config = {
        "version": 1,
        "listen": f"127.0.0.1:{port}",
        "allow": [{"host": HOST, "ports": [upstream_port], "methods": ["GET", "POST"], "paths": ["/v1/*", "/sse"]}],
        "network": {"hosts": {HOST: ["127.0.0.1"]}, "upstream_ca": str(test_ca)},
        "services": [
            {
                "name": "bench",
                "hosts": [HOST],
                "credential": [{"header": "Authorization", "scheme": "Bearer"}],
                "fake_key": {"prefix": "sk-bench-", "length": 48},
                "env_var": "BENCH_API_KEY",
                "secret": "env:BENCH_REAL_KEY",
                **({"meter": {"api": "openai"}} if spend else {}),
            }
        ],
        "agents": {
            "bench": {
                "services": ["bench"],
                "limits": {
                    "requests_per_minute": 1_000_000,
                    "tokens_per_minute": 1_000_000_000,
                    "concurrent": 64,
                    "budget_usd": {"session": 1_000_000, "day": 1_000_000, "total": 1_000_000},
                    "models": {"bench": ["gpt-4o-*"]} if spend else {},
                },
            }
        },
    }
    if rules:  # `rules:` (#12): N CEL rules across 20 hosts, the bench's own among them
        from rules import make_rules  # bench/rules.py

        config["rules"] = make_rules(rules, 20, HOST)
    config.update(extra or {})
    (directory / "egress-guard.yaml").write_text(yaml.safe_dump(config))
    exe = shutil.which("egress-guard", path=str(Path(sys.executable).parent)) or "egress-guard"
    subprocess.run([exe, "init", "--dir", str(directory)], check=True, capture_output=True)
    if mint:
        config_file = str(directory / "egress-guard.yaml")
        minted = subprocess.run(
            [exe, "keys", "mint", "--config", config_file, "--agent", "bench", "--format", "json"],
            check=True,
            capture_output=True,
            text=True,
        )
        global FAKE_KEY
        FAKE_KEY = json.loads(minted.stdout)["BENCH_API_KEY"]
    env = os.environ | {"BENCH_REAL_KEY": "sk-real-bench-secret-0123456789abcdef"}
    proc = subprocess.Popen(  # its log goes to a file: an unread pipe would fill and stall it
        [exe, "up", "--config", str(directory / "egress-guard.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=(directory / "egress-guard.log").open("w"),
        text=True,
        env=env,
    )
    _wait_port(port, proc)
    if not extra:
        AUDIT_DBS.append(directory / "egress-guard.db")
    return proc, port, Path(config.get("ca_dir", directory / "certs")) / "egress-guard-ca.pem"


def _proof() -> str:
    import sqlite3

    if not AUDIT_DBS or not AUDIT_DBS[0].exists():
        return "no audit log"
    conn = sqlite3.connect(AUDIT_DBS[0])
    total, swapped, priced = conn.execute(
        "SELECT COUNT(*), SUM(credential = 'swapped'), SUM(cost_usd IS NOT NULL) FROM audit WHERE kind = 'request'"
    ).fetchone()
    conn.close()
    return f"egress-guard audit log: {total} requests, {swapped} with the key swapped, {priced} priced"


def _median_cpu(rounds: dict[str, list[dict]]) -> float:
    """The median of a target's CPU ms per request over its c=8 rounds."""
    return statistics.median(r["cpu_ms"] for r in rounds["c8"])


def _median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (its latencies belong to it)."""
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per c=8 run (default 5)")
    parser.add_argument("--sse", type=int, default=30, help="SSE samples per target (default 30)")
    parser.add_argument("--streams", type=int, default=250, help="metered SSE streams at c=8 (default 250)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per target (default 3)")
    parser.add_argument(
        "--no-spend",
        action="store_true",
        help="egress-guard without usage accounting (credential swap and the rest stay on)",
    )
    parser.add_argument(
        "--rules",
        type=int,
        default=0,
        help="give egress-guard N CEL rules across 20 hosts, its own among them (bench/rules.py; default none)",
    )
    args = parser.parse_args()

    ca = trustme.CA()
    leaf = ca.issue_cert(HOST)
    work = Path(tempfile.mkdtemp(prefix="egress-guard-bench-"))
    test_ca = work / "test-ca.pem"
    ca.cert_pem.write_to_path(str(test_ca))
    ports: multiprocessing.Queue = multiprocessing.Queue()
    upstream = multiprocessing.Process(
        target=_upstream_main,
        args=(b"".join(b.bytes() for b in leaf.cert_chain_pems), leaf.private_key_pem.bytes(), ports),
        daemon=True,
    )
    upstream.start()
    upstream_port = ports.get(timeout=10)

    results: dict[str, dict] = {}
    procs: list[subprocess.Popen] = []
    try:
        targets: list[tuple[str, int | None, Path, subprocess.Popen | None]] = [("direct", None, test_ca, None)]
        md, md_port, md_ca = start_mitmdump(work, test_ca)
        procs.append(md)
        targets.append(("mitmdump", md_port, md_ca, md))
        # mitmdump told to stream every body: the floor for first-byte time through mitmproxy
        ms, ms_port, ms_ca = start_mitmdump(work, test_ca, "--set", "stream_large_bodies=1")
        procs.append(ms)
        targets.append(("mitmdump-strm", ms_port, ms_ca, ms))
        eg, eg_port, eg_ca = start_egress_guard(work, test_ca, upstream_port, spend=not args.no_spend, rules=args.rules)
        procs.append(eg)
        targets.append(("egress-guard", eg_port, eg_ca, eg))
        # Rounds alternate between the targets so that drift on a shared machine hits all alike;
        # each figure is the median round.
        contexts = {name: ssl.create_default_context(cafile=str(cafile)) for name, _, cafile, _ in targets}
        rounds: dict[str, dict[str, list[dict]]] = {name: {"c1": [], "c8": []} for name, *_ in targets}
        for i in range(args.rounds):
            for name, proxy_port, _, proc in targets:
                print(f"round {i + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                ctx = contexts[name]
                rounds[name]["c1"].append(asyncio.run(load(proxy_port, upstream_port, ctx, 1, args.seconds / 2)))
                cpu = _cpu_seconds(proc.pid) if proc else 0.0
                run = asyncio.run(load(proxy_port, upstream_port, ctx, 8, args.seconds))
                # CPU per request (warm-up included on both sides): steadier than req/s when the
                # machine's speed drifts, since it does not depend on who else gets the cores
                run["cpu_ms"] = (_cpu_seconds(proc.pid) - cpu) * 1000 / max(run["requests"], 1) if proc else None
                rounds[name]["c8"].append(run)
        for name, proxy_port, _, proc in targets:
            r: dict = {c: _median_run(rounds[name][c]) for c in ("c1", "c8")}
            r["sse"] = asyncio.run(sse_first_byte(proxy_port, upstream_port, contexts[name], args.sse))
            r["metered"] = asyncio.run(metered_streams(proxy_port, upstream_port, contexts[name], 8, args.streams))
            r["rss"] = _rss_mb(proc.pid) if proc else None
            results[name] = r
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        upstream.terminate()
        proof = _proof()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\negress-guard benchmark ({os.cpu_count()} cores, loopback, keep-alive HTTPS, median of {args.rounds} "
        f"alternating rounds of {args.seconds:.0f} s)\n"
    )
    print(f"{'target':<14}{'c':>3}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'errors':>8}{'CPU ms/req':>12}")
    for name, r in results.items():
        for c in ("c1", "c8"):
            x = r[c]
            cpu = f"{x['cpu_ms']:.2f}" if x.get("cpu_ms") is not None else "-"
            print(
                f"{name:<14}{c[1:]:>3}{x['rps']:>9.0f}{x['p50']:>9.2f}{x['p90']:>9.2f}{x['p99']:>9.2f}{x['errors']:>8}"
                f"{cpu:>12}"
            )
    print(f"\n{'target':<14}{'SSE first byte p50':>20}{'p90':>8}{'whole stream p50':>18}{'RSS MB':>8}")
    for name, r in results.items():
        s = r["sse"]
        rss = f"{r['rss']:.0f}" if r["rss"] else "-"
        print(f"{name:<14}{s['first_p50']:>18.2f}ms{s['first_p90']:>6.2f}ms{s['total_p50']:>16.2f}ms{rss:>8}")
    print(f"\n{'target':<14}{'metered streams':>16}{'broken':>8}{'first byte p50':>16}")
    for name, r in results.items():
        x = r["metered"]
        print(f"{name:<14}{x['n']:>16}{x['broken']:>8}{x['first_p50']:>14.2f}ms")
    eg, md, direct, ms = results["egress-guard"], results["mitmdump"], results["direct"], results["mitmdump-strm"]
    checks = [
        (
            "throughput c=8 vs mitmdump",
            eg["c8"]["rps"] / md["c8"]["rps"],
            ">= 1.00x",
            eg["c8"]["rps"] >= md["c8"]["rps"],
        ),
        (
            "p50 latency c=8 vs mitmdump",
            eg["c8"]["p50"] / md["c8"]["p50"],
            "<= 1.00x",
            eg["c8"]["p50"] <= md["c8"]["p50"],
        ),
        ("throughput c=1 vs mitmdump", eg["c1"]["rps"] / md["c1"]["rps"], "(info)", True),
        (
            "proxy CPU per request vs mitmdump",
            _median_cpu(rounds["egress-guard"]) / _median_cpu(rounds["mitmdump"]),
            "(info)",
            True,
        ),
        (
            "SSE first byte - direct (ms)",
            eg["sse"]["first_p50"] - direct["sse"]["first_p50"],
            "<= 3 ms",
            eg["sse"]["first_p50"] - direct["sse"]["first_p50"] <= 3.0,
        ),
        ("SSE 1st byte - mitmdump-strm (ms)", eg["sse"]["first_p50"] - ms["sse"]["first_p50"], "(info, ms)", True),
        ("metered streams broken", eg["metered"]["broken"], "== 0", eg["metered"]["broken"] == 0),
    ]
    print(f"\n{proof}")
    print()
    for label, value, target, ok in checks:
        unit = "" if "ms" in label else "x"
        print(f"{label:<32}{value:>8.2f}{unit:<2} target {target:<10} {'ok' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
