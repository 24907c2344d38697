"""The sandbox of `run --isolate` with real namespaces (Linux, root): the launcher on its
own (no TUN: loopback only), and the CLI against a fake control server that answers `up`'s
protocol and hands out a real (unattached) TUN device. `up`'s side is tested elsewhere."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from egress_guard import sandbox
from egress_guard.sandbox import SandboxSpec, isolate

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs Linux, root and /dev/net/tun",
)

PY = "/usr/bin/python3"  # readable by the sandbox's unprivileged user (the venv's may not be)
EG = [sys.executable, "-m", "egress_guard"]
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}


def host_address() -> str:
    """An address of this host other than loopback (where the sandbox must not reach)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        return line.split()[3].split("/")[0]
    return "127.0.0.1"


def pids_in(pidns: int) -> list[int]:
    """Live processes in the PID namespace (zombies are dead: a PID 1 whose parent died
    first is reparented to the host's init, which here does not reap)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/pid").st_ino == pidns:
                    state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state not in ("Z", "X"):
                        found.append(int(entry))
    return found


def run_in_sandbox(script: str, uid: int = 65534, timeout: float = 20) -> tuple[int, str]:
    out_r, out_w = os.pipe()
    env = dict(ENV)
    spec = SandboxSpec(command=[PY, "-c", script], env=env, uid=uid, gid=uid)
    # the command's stdout: a pipe we read (stage 1 passes its own fds on)
    saved = os.dup(1)
    os.dup2(out_w, 1)
    try:
        box = sandbox.start(spec)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(out_w)
    try:
        code = box.wait(timeout)
    finally:
        box.kill()
    with os.fdopen(out_r) as f:
        return code, f.read()


# --- the launcher, no TUN -----------------------------------------------------------------------

PROBE = r"""
import json, os, socket, sys
host, tcp_port, udp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
res = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
for name, addr in (("tcp_lo", ("127.0.0.1", tcp_port)), ("tcp_host", (host, tcp_port))):
    s = socket.socket(); s.settimeout(1)
    try:
        s.connect(addr); res[name] = "connected"
    except OSError as e:
        res[name] = type(e).__name__
for dst in ("127.0.0.1", host):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.sendto(b"leak", (dst, udp_port))
    except OSError:
        pass
try:
    s6 = socket.socket(socket.AF_INET6); s6.settimeout(1); s6.connect(("::1", tcp_port)); res["ipv6"] = "connected"
except OSError as e:
    res["ipv6"] = type(e).__name__
res["nnp"] = open("/proc/self/status").read().split("NoNewPrivs:")[1].split()[0]
print(json.dumps(res))
"""


def test_sandbox_has_no_network_but_its_own_loopback_and_sees_only_its_pids() -> None:
    tcp = socket.create_server(("0.0.0.0", 0))  # every host address: the sandbox must reach none
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 0))
    udp.settimeout(0.5)
    try:
        port, uport = tcp.getsockname()[1], udp.getsockname()[1]
        script = PROBE.replace(
            "sys.argv[1], int(sys.argv[2]), int(sys.argv[3])", f"{host_address()!r}, {port}, {uport}"
        )
        code, out = run_in_sandbox(script, uid=4321)
        res = json.loads(out)
        assert code == 0
        assert res["tcp_lo"] == "ConnectionRefusedError"  # its own loopback, not the host's
        assert res["tcp_host"] in ("OSError", "TimeoutError")  # no route
        assert res["ipv6"] in ("OSError", "TimeoutError") and res["ipv6"] != "connected"
        assert (res["uid"], res["gid"], res["groups"], res["nnp"]) == (4321, 4321, [], "1")
        assert res["pids"] == [1, 2]  # PID 1 and the command
        tcp.settimeout(0.2)
        with pytest.raises(TimeoutError):
            tcp.accept()
        with pytest.raises(TimeoutError):
            udp.recvfrom(100)
    finally:
        tcp.close()
        udp.close()


@pytest.mark.parametrize(("script", "status"), [("pass", 0), ("raise SystemExit(7)", 7)])
def test_exit_status_is_the_commands(script: str, status: int) -> None:
    assert run_in_sandbox(script)[0] == status


TREE = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(300)
    time.sleep(300)
time.sleep(300)
"""


def test_sigkill_of_pid1_ends_a_double_forked_sigterm_ignoring_tree_within_1s() -> None:
    box = sandbox.start(SandboxSpec(command=[PY, "-c", TREE], env=ENV))
    try:
        deadline = time.monotonic() + 5
        while len(pids_in(box.pidns)) < 4 and time.monotonic() < deadline:  # PID 1, CMD, child, grandchild
            time.sleep(0.02)
        assert len(pids_in(box.pidns)) == 4
        t0 = time.monotonic()
        box.kill()
        assert box.wait(1) == 137
        while pids_in(box.pidns) and time.monotonic() - t0 < 1:
            time.sleep(0.002)
        latency = time.monotonic() - t0
        assert pids_in(box.pidns) == []
        print(f"sandbox start {box.start_ms:.0f} ms; kill to all gone {latency * 1000:.1f} ms")
        assert latency < 1
    finally:
        box.kill()
        box.wait(5)


def test_root_and_tun_are_required_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(sandbox.SandboxError, match=r"needs root.*/dev/net/tun is 0600.*sudo"):
        sandbox.preflight()


def test_the_command_never_runs_as_root_and_by_default_as_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(sandbox.SandboxError, match="must not run as root"):
        isolate.sandbox_user("0")
    monkeypatch.setenv("SUDO_UID", "1234")  # the sudo caller only with an explicit --user
    monkeypatch.setenv("SUDO_GID", "99")
    nobody = isolate.sandbox_user(None)
    explicit = isolate.sandbox_user("1234")
    assert (nobody.uid, nobody.gid, nobody.home, explicit.uid) == (65534, 65534, "/tmp", 1234)


def start_in_sandbox(script: str, uid: int = 65534) -> tuple[sandbox.Sandbox, int]:
    """A running sandbox and the read end of its command's stdout."""
    out_r, out_w = os.pipe()
    saved = os.dup(1)
    os.dup2(out_w, 1)
    try:
        box = sandbox.start(SandboxSpec(command=[PY, "-c", script], env=ENV, uid=uid, gid=uid))
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(out_w)
    return box, out_r


SYSV = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def shm(key, flags):
    return libc.shmget(ctypes.c_int(key), ctypes.c_size_t(4096 if flags else 0), ctypes.c_int(flags))
"""

WRITER = (
    SYSV
    + """
import os, socket, sys, time
for d in ("/tmp", "/dev/shm", "/var/tmp", "/run"):
    try:
        open(f"{d}/eg-mark-MARK", "w").write("x")
    except OSError:
        pass
srv = socket.socket(socket.AF_UNIX); srv.bind("/tmp/eg-sock-MARK"); srv.listen()
assert shm(KEY, 0o1000 | 0o666) >= 0  # IPC_CREAT
print("ready", flush=True)
time.sleep(30)
"""
)

READER = (
    SYSV
    + """
import json, os, socket
res = {"files": [p for d in ("/tmp", "/dev/shm", "/var/tmp", "/run") for p in os.listdir(d) if "MARK" in p]}
for path in ("/tmp/eg-sock-MARK", "HOST_TMP", "HOST_RUN"):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path); res[path] = "connected"
    except OSError as e:
        res[path] = type(e).__name__
res["shm_other_sandbox"] = shm(KEY, 0)
res["shm_host"] = shm(HOST_KEY, 0)
print(json.dumps(res))
"""
)


def test_no_host_sockets_no_shared_tmp_shm_or_sysv_ipc_between_sandboxes(tmp_path: Path) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    mark = f"{os.getpid()}x{time.monotonic_ns()}"
    key, host_key = 0x4567000 + os.getpid() % 4096, 0x5678000 + os.getpid() % 4096
    host_tmp = f"/tmp/eg-host-{mark}.sock"  # where tmux, ssh-agent... put theirs
    host_run = f"/run/eg-host-{mark}.sock"
    listeners = []
    for path in (host_tmp, host_run):
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        os.chmod(path, 0o777)  # even a world-writable socket must be out of reach
        srv.listen()
        listeners.append(srv)
    host_shm = libc.shmget(ctypes.c_int(host_key), ctypes.c_size_t(4096), ctypes.c_int(0o1000 | 0o666))
    assert host_shm >= 0
    writer, out = start_in_sandbox(WRITER.replace("MARK", mark).replace("KEY", str(key)))
    try:
        with os.fdopen(out) as f:
            assert f.readline() == "ready\n"
            script = (
                READER.replace("HOST_TMP", host_tmp).replace("HOST_RUN", host_run).replace("HOST_KEY", str(host_key))
            )
            code, got = run_in_sandbox(script.replace("MARK", mark).replace("KEY", str(key)))
        res = json.loads(got)
        assert code == 0
        assert res["files"] == []  # nothing of the other sandbox's in /tmp, /dev/shm, /var/tmp, /run
        assert res[f"/tmp/eg-sock-{mark}"] == res[host_tmp] == res[host_run] == "FileNotFoundError"
        assert res["shm_other_sandbox"] == res["shm_host"] == -1
        assert not [p for d in ("/tmp", "/dev/shm", "/var/tmp") for p in os.listdir(d) if f"eg-mark-{mark}" in p]
        assert libc.shmget(ctypes.c_int(key), ctypes.c_size_t(0), ctypes.c_int(0)) == -1
    finally:
        writer.kill()
        writer.wait(5)
        for srv, path in zip(listeners, (host_tmp, host_run), strict=True):
            srv.close()
            os.unlink(path)
        libc.shmctl(ctypes.c_int(host_shm), ctypes.c_int(0), None)  # IPC_RMID


# --- `run --isolate` against a fake `up` control server -------------------------------------------


class FakeUp:
    """Answers the control protocol on <ca_dir>/control.sock and hands out a real TUN device
    (created with `ip tuntap`, attached to nothing: traffic into it goes nowhere)."""

    def __init__(self, ca_dir: Path) -> None:
        self.hang_up = False  # True: close the connection right after `started` (up gone)
        self.kill_at_start = False  # True: SIGKILL the sandbox's PID 1 on `started` (kill switch)
        self.path = ca_dir / "control.sock"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.server.listen()
        self.events: list[dict] = []
        self.tuns: list[str] = []
        self.started = threading.Event()
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                msg = json.loads(line)
                self.events.append(msg)
                if msg["op"] == "open":
                    n = len(self.tuns) + 1
                    tun = f"egs-t{os.getpid() % 10000}x{n}"
                    subprocess.run(["ip", "tuntap", "add", "dev", tun, "mode", "tun"], check=True)
                    self.tuns.append(tun)
                    reply = {
                        "ok": True,
                        "sandbox": f"sb{n}",
                        "tun": tun,
                        "addr": f"10.77.{n}.2",
                        "dns": "198.18.0.53",
                        "proxy": "198.18.255.254:3128",
                    }
                else:
                    msg["pidns_seen"] = os.stat(f"/proc/{msg['pid']}/ns/pid").st_ino
                    mounts = Path(f"/proc/{msg['pid']}/mountinfo").read_text().splitlines()
                    msg["ca_dir_covered"] = any(
                        m.split()[4] == str(self.path.parent) and " - tmpfs " in m for m in mounts
                    )
                    reply = {"ok": True}
                    self.started.set()
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()
                if msg["op"] == "started" and self.kill_at_start:
                    os.kill(msg["pid"], signal.SIGKILL)
                if msg["op"] == "started" and self.hang_up:
                    break
        self.closed.set()

    def stop(self) -> None:
        self.server.close()
        for tun in self.tuns:  # gone with the sandbox's netns already, normally
            subprocess.run(["ip", "link", "del", tun], capture_output=True)


@pytest.fixture
def cfg(tmp_path: Path) -> str:
    subprocess.run([*EG, "init", "--dir", str(tmp_path)], check=True, capture_output=True)
    return str(tmp_path / "egress-guard.yaml")


@pytest.fixture
def fake_up(cfg: str) -> Iterator[FakeUp]:
    import yaml

    ca_dir = (Path(cfg).parent / yaml.safe_load(Path(cfg).read_text()).get("ca_dir", "./certs")).resolve()
    up = FakeUp(ca_dir)
    yield up
    up.stop()


_spawned: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_run_left_behind() -> Iterator[None]:
    yield
    while _spawned:
        proc = _spawned.pop()
        if proc.poll() is None:
            proc.kill()  # its sandbox dies with it (parent-death signals)
            proc.communicate()


def isolated(cfg: str, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*EG, "run", "--isolate", "--config", cfg, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SUDO_UID": "", "SUDO_GID": "", **(env or {})},
        **kw,
    )
    _spawned.append(proc)
    return proc


INSIDE = r"""
import json, os
env = {k: os.environ.get(k) for k in ("HTTPS_PROXY", "http_proxy", "NO_PROXY", "EGRESS_GUARD_AGENT", "EGRESS_GUARD_SESSION", "OPENAI_API_KEY", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "HOME")}
routes = [l.split()[:2] for l in open("/proc/net/route").read().splitlines()[1:]]
ca = os.environ["NODE_EXTRA_CA_CERTS"]
print(json.dumps({"env": env, "routes": routes, "resolv": open("/etc/resolv.conf").read(), "uid": os.getuid(),
    "ca_readable": open(ca).read().startswith("-----BEGIN CERTIFICATE"), "bundle_readable": os.access(os.environ["SSL_CERT_FILE"], os.R_OK),
    }))
raise SystemExit(7)
"""


def test_run_isolate_gives_the_agent_env_on_the_tun_and_returns_the_status(cfg: str, fake_up: FakeUp) -> None:
    proc = isolated(
        cfg,
        "--agent",
        "agent",
        "--services",
        "openai",
        "--",
        "/usr/bin/env",
        f"CA_DIR={fake_up.path}",
        PY,
        "-c",
        INSIDE,
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 7, err
    got = json.loads(out)
    tun = fake_up.tuns[0]
    assert got["uid"] == 65534  # nobody: no SUDO_UID, no --user
    assert got["env"]["HTTPS_PROXY"] == got["env"]["http_proxy"] == "http://198.18.255.254:3128"
    assert got["env"]["OPENAI_API_KEY"].startswith("sk-proj-") and got["env"]["EGRESS_GUARD_AGENT"] == "agent"
    assert got["ca_readable"] and got["bundle_readable"]
    assert got["routes"] == [[tun, "00000000"]]  # the one route: everything into the TUN
    assert got["resolv"].startswith("nameserver 198.18.0.53\n")  # the sandbox's, symlink or not
    assert got["env"]["SSL_CERT_FILE"].startswith("/run/egress-guard/")  # bound in over the fresh /run
    opened, started = fake_up.events
    assert opened == {"op": "open", "agent": "agent", "session": got["env"]["EGRESS_GUARD_SESSION"]}
    assert started["op"] == "started" and started["pidns"] == started["pidns_seen"] != 0
    assert started["ca_dir_covered"]  # the CA dir (CA key, control socket) is an empty tmpfs inside
    assert fake_up.closed.wait(5)  # the connection ends with the run: up removes the TUN


def test_max_time_kills_at_the_deadline_and_the_keys_expire_with_it(cfg: str, fake_up: FakeUp) -> None:
    t0 = time.monotonic()
    proc = isolated(cfg, "--agent", "agent", "--services", "openai", "--max-time", "1s", "--", "/bin/sleep", "30")
    _, err = proc.communicate(timeout=30)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 137 and "--max-time 1s reached: sandbox killed" in err
    assert 1 <= elapsed < 3, elapsed
    listed = json.loads(
        subprocess.run(
            [*EG, "keys", "list", "--config", cfg, "--format", "json", "--all"], capture_output=True, text=True
        ).stdout
        or "[]"
    )
    print(f"--max-time 1s: run ended after {elapsed:.2f} s; keys {[(k['expires_at'], k['status']) for k in listed]}")


def test_ctrl_c_ends_the_run_with_130(cfg: str, fake_up: FakeUp) -> None:
    proc = isolated(cfg, "--", "/bin/sleep", "30", start_new_session=True)  # its own group: a terminal's ^C
    try:
        assert fake_up.started.wait(20)
        time.sleep(0.1)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=5)
        assert proc.returncode == 130
        assert time.monotonic() - t0 < 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_run_isolate_without_up_says_how_to_start_it(cfg: str) -> None:
    proc = isolated(cfg, "--", "/bin/true")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "egress-guard up is not running (no control socket at " in err
    assert "start it with `egress-guard up`, then run again" in err


def started_pidns(fake_up: FakeUp) -> int:
    assert fake_up.started.wait(20)
    return next(e["pidns"] for e in fake_up.events if e["op"] == "started")


def gone_within(pidns: int, seconds: float) -> float:
    t0 = time.monotonic()
    while pids_in(pidns) and time.monotonic() - t0 < seconds:
        time.sleep(0.002)
    assert pids_in(pidns) == []
    return time.monotonic() - t0


def test_sigterm_to_run_reaches_the_command(cfg: str, fake_up: FakeUp) -> None:
    proc = isolated(cfg, "--", "/bin/sleep", "30")
    pidns = started_pidns(fake_up)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=5)
    assert proc.returncode == 143
    gone_within(pidns, 1)


def test_the_sandbox_dies_with_run(cfg: str, fake_up: FakeUp) -> None:
    proc = isolated(cfg, "--", PY, "-c", TREE)
    pidns = started_pidns(fake_up)
    time.sleep(0.2)
    t0 = time.monotonic()
    proc.kill()  # SIGKILL: no cleanup code runs; the parent-death signals do it
    proc.communicate(timeout=5)
    gone_within(pidns, 1)
    print(f"run SIGKILLed: sandbox gone after {(time.monotonic() - t0) * 1000:.1f} ms")


def test_up_going_away_kills_the_sandbox(cfg: str, fake_up: FakeUp) -> None:
    fake_up.hang_up = True
    proc = isolated(cfg, "--", "/bin/sleep", "30")
    pidns = started_pidns(fake_up)
    _, err = proc.communicate(timeout=5)
    assert proc.returncode == 137 and "egress-guard up went away" in err
    gone_within(pidns, 1)


def test_a_kill_by_up_ends_the_run_with_137(cfg: str, fake_up: FakeUp) -> None:
    fake_up.kill_at_start = True
    proc = isolated(cfg, "--", PY, "-c", TREE)
    pidns = started_pidns(fake_up)
    proc.communicate(timeout=5)
    assert proc.returncode == 137
    gone_within(pidns, 1)


LEAKY = {
    "AWS_SECRET_ACCESS_KEY": "aws-real",
    "AWS_PROFILE": "prod",
    "GITHUB_TOKEN": "ghp_real",
    "SSH_AUTH_SOCK": "/tmp/ssh-x/agent.1",
    "DOCKER_HOST": "unix:///run/user/1000/docker.sock",
    "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1000/bus",
    "XDG_RUNTIME_DIR": "/run/user/1000",
    "TMUX": "/tmp/tmux-1000/default,1,0",
    "SUDO_COMMAND": "/bin/sh",
    "LC_TIME": "C",
    "TZ": "UTC",
}


def test_the_command_inherits_only_an_allowlist_of_runs_environment(cfg: str, fake_up: FakeUp) -> None:
    script = "import json, os; print(json.dumps(dict(os.environ)))"
    proc = isolated(cfg, "--agent", "agent", "--services", "openai", "--", PY, "-c", script, env=LEAKY)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    got = json.loads(out)
    leaked = sorted(k for k in LEAKY if k in got and k not in ("LC_TIME", "TZ"))
    assert leaked == []
    assert (got["LC_TIME"], got["TZ"], got["HOME"], got["USER"]) == ("C", "UTC", "/tmp", "nobody")
    assert got["OPENAI_API_KEY"].startswith("sk-proj-") and got["PATH"] == os.environ["PATH"]


# --- the terminal: no TIOCSTI, ^C through run -------------------------------------------------------


def on_pty(cfg: str, *command: str) -> tuple[subprocess.Popen, int]:
    """`run --isolate` as a terminal's foreground job: a new session whose controlling
    terminal is a fresh pty (util-linux `setsid --ctty`, which execs in place)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        ["setsid", "--ctty", *EG, "run", "--isolate", "--config", cfg, "--", *command],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "SUDO_UID": "", "SUDO_GID": ""},
    )
    os.close(slave)
    _spawned.append(proc)
    return proc, master


def pty_read_until(master: int, marker: bytes, timeout: float = 20) -> bytes:
    import select

    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out and time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            try:
                out += os.read(master, 4096)
            except OSError:
                break
    return out


def pty_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        return proc.wait(timeout)
    return None


def pty_cleanup(proc: subprocess.Popen, master: int) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    os.close(master)


TIOCSTI = r"""
import fcntl, termios
try:
    fcntl.ioctl(0, termios.TIOCSTI, b"#")
    print("INJECTED", flush=True)
except OSError as e:
    print("REFUSED", e.errno, flush=True)
"""


def test_the_command_cannot_push_input_into_the_callers_terminal(cfg: str, fake_up: FakeUp) -> None:
    import errno

    proc, master = on_pty(cfg, PY, "-c", TIOCSTI)
    try:
        out = pty_read_until(master, b"\n", 30)
        out += pty_read_until(master, b"\n", 1)
        assert pty_exit(proc, 10) == 0, out
        assert b"REFUSED" in out and b"INJECTED" not in out, out
        assert f"REFUSED {errno.EPERM}".encode() in out or f"REFUSED {errno.EIO}".encode() in out
    finally:
        pty_cleanup(proc, master)


def test_ctrl_c_on_the_terminal_reaches_the_command_130(cfg: str, fake_up: FakeUp) -> None:
    proc, master = on_pty(cfg, PY, "-c", "import time; print('ready', flush=True); time.sleep(30)")
    try:
        assert b"ready" in pty_read_until(master, b"ready")
        os.write(master, b"\x03")
        assert pty_exit(proc, 5) == 130
    finally:
        pty_cleanup(proc, master)


IGNORES = "import signal, time; [signal.signal(s, signal.SIG_IGN) for s in (2, 15)]; print('ready', flush=True); time.sleep(30)"


def test_a_second_ctrl_c_kills_a_command_that_ignores_the_first(cfg: str, fake_up: FakeUp) -> None:
    proc, master = on_pty(cfg, PY, "-c", IGNORES)
    try:
        assert b"ready" in pty_read_until(master, b"ready")
        os.write(master, b"\x03")
        assert pty_exit(proc, 0.5) is None  # ignored
        t0 = time.monotonic()
        os.write(master, b"\x03")
        assert pty_exit(proc, 2) == 137
        print(f"second ^C: run ended after {(time.monotonic() - t0) * 1000:.0f} ms")
    finally:
        pty_cleanup(proc, master)


def test_sigterm_not_obeyed_within_3s_kills_the_sandbox(cfg: str, fake_up: FakeUp) -> None:
    proc = isolated(cfg, "--", PY, "-c", IGNORES)
    pidns = started_pidns(fake_up)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 137 and "did not end within 3 s of SIGTERM" in err
    assert 2.9 <= elapsed < 4.5, elapsed
    gone_within(pidns, 1)


SYMLINKED_RESOLV = r"""
import os, subprocess, sys
from egress_guard import sandbox
from egress_guard.sandbox import SandboxSpec
from egress_guard.sandbox.stage import MS_BIND, MS_PRIVATE, MS_REC, _mount

share, py = sys.argv[1], sys.argv[2]
os.unshare(0x00020000)  # a private mount namespace for this test only
_mount(None, "/", None, MS_REC | MS_PRIVATE)
_mount("tmpfs", "/mnt", "tmpfs", 0, "mode=0755")
os.makedirs("/mnt/real-etc")
os.makedirs("/mnt/etc")
_mount("/etc", "/mnt/real-etc", None, MS_BIND)
for name in os.listdir("/etc"):  # /etc as on systemd-resolved hosts: resolv.conf -> /run/...
    target = "/run/systemd/resolve/stub-resolv.conf" if name == "resolv.conf" else f"/mnt/real-etc/{name}"
    os.symlink(target, f"/mnt/etc/{name}")
_mount("/mnt/etc", "/etc", None, MS_BIND)
script = "import os; print(os.path.realpath('/etc/resolv.conf')); print(open('/etc/resolv.conf').read(), end='')"
box = sandbox.start(SandboxSpec(command=[py, "-c", script], env={"PATH": "/usr/bin:/bin"}, share=share, resolv_conf="resolv.conf"))
sys.exit(box.wait(20))
"""


def test_resolv_conf_inside_is_the_sandboxs_even_as_a_symlink_into_the_fresh_run(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir(mode=0o755)
    (share / "resolv.conf").write_text("nameserver 198.18.0.53\n")
    (share / "resolv.conf").chmod(0o644)
    tmp_path.chmod(0o755)
    done = subprocess.run(
        [sys.executable, "-c", SYMLINKED_RESOLV, str(share), PY], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "/run/systemd/resolve/stub-resolv.conf\nnameserver 198.18.0.53\n"
