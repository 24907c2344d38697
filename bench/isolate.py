"""Benchmark: what capture costs in a `run --isolate` sandbox, on this machine.

Measures, over kept-alive HTTPS to a local upstream that answers in one write:
  * captured (no proxy variables: the TUN takes the connection) in a sandbox, p50/p90 ms;
  * explicit proxy (CONNECT to 198.18.255.254:3128) in the same sandbox, p50/p90 ms;
  * the regular listener on the host (CONNECT to 127.0.0.1), p50/p90 ms;
  * sandbox start time (control socket `open` -> netns with the TUN, address and route), ms;
  * kill latency: `egress-guard kill --agent` started -> the sandbox's PID 1 gone, ms.

`egress-guard up` runs as a subprocess with its own config; sandboxes are made the way the
tests make them (tests/containment/test_isolate.py, Box): the TUN `up` hands out over its
control socket is moved into an `ip netns` of ours, default route into it with quickack 1.
Needs Linux, root, /dev/net/tun, iproute2, setpriv.
Run: .venv/bin/python bench/isolate.py [--requests N] [--boxes N]
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import secrets
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trustme
import yaml

HOST = "other.test.local"
PY = "/usr/bin/python3"  # readable by the sandbox's unprivileged user
NOBODY = "65534"
AGENT = "bench"

BENCH = """
import http.client, json, ssl, time
ctx = ssl.create_default_context(cafile={ca!r})
def run(conn, n={n}):
    times = []
    for i in range(n + 10):
        t = time.perf_counter()
        conn.request('GET', '/bench', headers={{'Host': '{host}:{port}'}})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
        times.append((time.perf_counter() - t) * 1000)
    return times[10:]  # the first ones pay for the handshakes
out = {{}}
if {proxy!r}:
    regular = http.client.HTTPSConnection('127.0.0.1', {proxy!r}, context=ctx)
    regular.set_tunnel('{host}', {port})
    out['regular'] = run(regular)
else:
    captured = http.client.HTTPSConnection('{host}', {port}, context=ctx)
    explicit = http.client.HTTPSConnection('198.18.255.254', 3128, context=ctx)
    explicit.set_tunnel('{host}', {port})
    out.update(captured=run(captured), explicit=run(explicit))
print(json.dumps(out))
"""


class OneWrite(http.server.BaseHTTPRequestHandler):
    """Answers every GET in one write (two writes would stall on Nagle + delayed ACKs)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = b'{"ok": true}'
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        self.wfile.write(head.encode() + body)


def start_upstream(ca: trustme.CA) -> tuple[http.server.ThreadingHTTPServer, int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OneWrite)
    server.daemon_threads = True
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(ctx)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_egress_guard(work: Path, test_ca: Path, upstream_port: int) -> tuple[subprocess.Popen, int, Path]:
    port = _free_port()
    directory = work / "egress-guard"
    directory.mkdir()
    config = {
        "version": 1,
        "listen": f"127.0.0.1:{port}",
        "allow": [{"host": HOST, "ports": [upstream_port]}, {"host": "api.bench.local"}],
        "network": {"hosts": {HOST: ["127.0.0.1"]}, "upstream_ca": str(test_ca)},
        "services": [
            {
                "name": "bench",
                "hosts": ["api.bench.local"],  # not the measured host: no key check on it
                "credential": [{"header": "Authorization", "scheme": "Bearer"}],
                "fake_key": {"prefix": "sk-bench-", "length": 48},
                "env_var": "BENCH_API_KEY",
                "secret": "env:BENCH_REAL_KEY",
            }
        ],
        "agents": {AGENT: {"services": ["bench"]}},
    }
    path = directory / "egress-guard.yaml"
    path.write_text(yaml.safe_dump(config))
    exe = shutil.which("egress-guard", path=str(Path(sys.executable).parent)) or "egress-guard"
    subprocess.run([exe, "init", "--dir", str(directory)], check=True, capture_output=True)
    env = os.environ | {"BENCH_REAL_KEY": "sk-real-bench-secret-0123456789abcdef"}
    proc = subprocess.Popen(  # its log goes to a file: an unread pipe would fill and stall it
        [exe, "up", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=(directory / "egress-guard.log").open("w"),
        env=env,
    )
    sock = directory / "certs" / "control.sock"
    deadline = time.monotonic() + 30
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not sock.exists():
        raise RuntimeError("egress-guard up did not start: " + (directory / "egress-guard.log").read_text())
    return proc, port, directory


class Box:
    """A sandbox as `run --isolate` makes it, with `ip netns` instead of its launcher."""

    def __init__(self, control_path: Path, ca: str) -> None:
        self.ca = ca
        self.ns = ""
        self.etc: Path | None = None
        t0 = time.monotonic()
        self.control = socket.socket(socket.AF_UNIX)
        self.control.connect(str(control_path))
        self.lines = self.control.makefile("rb")
        try:
            reply = self.ask({"op": "open", "agent": AGENT, "session": f"s-{secrets.token_hex(4)}"})
            if not reply.get("ok"):
                raise RuntimeError(f"open refused: {reply}")
            self.ns = f"egb-{reply['sandbox']}"
            self.etc = Path("/etc/netns") / self.ns
            tun, addr = reply["tun"], reply["addr"]
            subprocess.run(["ip", "netns", "add", self.ns], check=True)
            self.etc.mkdir(parents=True)
            (self.etc / "resolv.conf").write_text(f"nameserver {reply['dns']}\noptions attempts:1 timeout:2\n")
            subprocess.run(["ip", "link", "set", tun, "netns", self.ns], check=True)
            setup = (
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && "
                "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6 && "
                f"ip link set lo up && ip link set {tun} up && ip addr add {addr}/32 dev {tun} && "
                f"ip route add default dev {tun} src {addr} quickack 1"
            )
            subprocess.run(["ip", "netns", "exec", self.ns, "sh", "-c", setup], check=True)
        except BaseException:
            self.close()
            raise
        self.start_ms = (time.monotonic() - t0) * 1000

    def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.control.sendall(json.dumps(msg).encode() + b"\n")
        return dict(json.loads(self.lines.readline()))

    def argv(self, cmd: list[str], pidns: bool = False) -> list[str]:
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs", "--"]
        pid = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"] if pidns else []
        return ["ip", "netns", "exec", self.ns, *pid, *drop, *cmd]

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "SSL_CERT_FILE": self.ca}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.control.close()
        if self.ns:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        if self.etc:
            shutil.rmtree(self.etc, ignore_errors=True)


def _pid1(unshare_pid: int) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            kids = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
            if kids:
                return int(kids[0])
        time.sleep(0.01)
    raise RuntimeError("no PID 1 in the sandbox")


def kill_latency(box: Box, config: Path) -> tuple[float, float]:
    proc = subprocess.Popen(
        box.argv(["sleep", "60"], pidns=True), env=box.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        init = _pid1(proc.pid)
        pidns = os.stat(f"/proc/{init}/ns/pid").st_ino
        if box.ask({"op": "started", "pid": init, "pidns": pidns}) != {"ok": True}:
            raise RuntimeError("up refused the sandbox's PID 1")
        exe = shutil.which("egress-guard", path=str(Path(sys.executable).parent)) or "egress-guard"
        t0 = time.monotonic()
        subprocess.run([exe, "kill", "--config", str(config), "--agent", AGENT], check=True, capture_output=True)
        t_cli = time.monotonic()
        while os.path.exists(f"/proc/{init}") and time.monotonic() - t0 < 5:
            time.sleep(0.002)
        gone = time.monotonic()
        if os.path.exists(f"/proc/{init}"):
            raise RuntimeError("kill left the sandbox running")
        return (gone - t0) * 1000, (gone - t_cli) * 1000
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def pct(times: list[float]) -> str:
    s = sorted(times)
    return f"{s[len(s) // 2]:6.2f} / {s[int(len(s) * 0.9)]:6.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="kept-alive requests per path (default 300)")
    parser.add_argument("--boxes", type=int, default=5, help="sandboxes opened to time the start (default 5)")
    args = parser.parse_args()
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        print("needs Linux, root and /dev/net/tun", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="eg-bench-isolate-"))
    public = Path(tempfile.mkdtemp(prefix="eg-bench-public-"))
    public.chmod(0o755)
    ca = trustme.CA()
    test_ca = work / "test-ca.pem"
    ca.cert_pem.write_to_path(str(test_ca))
    upstream, upstream_port = start_upstream(ca)
    up: subprocess.Popen | None = None
    boxes: list[Box] = []
    try:
        up, listen, directory = start_egress_guard(work, test_ca, upstream_port)
        control = directory / "certs" / "control.sock"
        shutil.copy(directory / "certs" / "egress-guard-ca.pem", public / "ca.pem")
        (public / "ca.pem").chmod(0o644)
        eg_ca = str(public / "ca.pem")

        starts = []
        for _ in range(args.boxes):
            box = Box(control, eg_ca)
            boxes.append(box)
            starts.append(box.start_ms)
        for box in boxes[1:]:
            box.close()
        box = boxes[0]

        script = BENCH.format(ca=eg_ca, port=upstream_port, host=HOST, n=args.requests, proxy=None)
        out = subprocess.run(box.argv([PY, "-c", script]), env=box.env(), capture_output=True, text=True, timeout=300)
        if out.returncode:
            raise RuntimeError(f"sandbox run failed: {out.stderr}")
        inside = json.loads(out.stdout.strip().splitlines()[-1])
        script = BENCH.format(ca=eg_ca, port=upstream_port, host=HOST, n=args.requests, proxy=listen)
        out = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=300)
        if out.returncode:
            raise RuntimeError(f"host run failed: {out.stderr}")
        host = json.loads(out.stdout.strip().splitlines()[-1])
        kill_total, kill_after = kill_latency(box, directory / "egress-guard.yaml")

        print(f"kept-alive HTTPS GETs, {args.requests} per path, ms p50 / p90")
        print(f"  sandbox, captured (no proxy vars)   {pct(inside['captured'])}")
        print(f"  sandbox, explicit proxy             {pct(inside['explicit'])}")
        print(f"  host, regular listener              {pct(host['regular'])}")
        print(f"sandbox start (open -> netns ready), median of {len(starts)}: {statistics.median(starts):.0f} ms")
        print(
            f"kill latency (kill --agent -> PID 1 gone): {kill_total:.0f} ms ({kill_after:.0f} ms after kill returned)"
        )
        return 0
    finally:
        for box in boxes:
            box.close()
        if up is not None:
            up.terminate()
            try:
                up.wait(20)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        upstream.shutdown()
        upstream.server_close()
        shutil.rmtree(public, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
