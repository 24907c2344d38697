"""`up --listen-unix`: the Unix-socket entrance network-less containers use. Real proxy, real
TLS upstream; a client on the socket gets exactly what a TCP client gets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.clients import read_http_response
from support.proxy import RunningProxy, write_config
from support.upstream import Upstream

from egress_guard.server import StartupError
from egress_guard.unix_relay import UnixRelay, UnixRelayError


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="egs-", dir="/tmp") as d:  # short: sun_path is 108 bytes
        yield Path(d)


def unix_connect(path: Path, target: str) -> tuple[socket.socket, bytes]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def test_a_client_on_the_socket_is_proxied_and_audited(
    tmp_path: Path, sock_dir: Path, upstream: Upstream, test_ca
) -> None:
    config = write_config(
        tmp_path,
        {
            "allow": [{"host": "api.test.local", "ports": [upstream.port]}],
            "network": {"hosts": {"api.test.local": ["127.0.0.1"]}, "upstream_ca": str(test_ca[1])},
        },
    )
    path = sock_dir / "proxy.sock"
    proxy = RunningProxy(config, listen_unix=path).start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666
        sock, head = unix_connect(path, f"api.test.local:{upstream.port}")
        assert head.startswith(b"HTTP/1.1 200"), head
        tls = proxy.client_context().wrap_socket(sock, server_hostname="api.test.local")
        tls.sendall(f"GET /json HTTP/1.1\r\nHost: api.test.local:{upstream.port}\r\nConnection: close\r\n\r\n".encode())
        status, _, _ = read_http_response(tls)
        tls.close()
        assert status == 200
        denied, head = unix_connect(path, "evil.example:443")
        denied.close()
        assert head.startswith(b"HTTP/1.1 403"), head
        deadline = time.monotonic() + 5
        while not any(r["host"] == "evil.example" for r in proxy.rows()) and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = proxy.rows()
        assert [r["decision"] for r in rows if r["host"] == "api.test.local"][-1] == "allow"
        assert any(r["host"] == "evil.example" and r["decision"] == "deny" for r in rows)
    finally:
        proxy.stop()
    assert not path.exists(), "stop() removes the socket"


def test_a_path_too_long_for_a_socket_is_a_clear_startup_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"allow": []})
    path = Path("/tmp/" + "x" * 120 + "/proxy.sock")
    with pytest.raises(StartupError, match=r"is 136 bytes; at most 107 fit.*Fix: choose a shorter path"):
        RunningProxy(config, listen_unix=path).start()


def test_a_stale_socket_is_replaced_a_live_one_or_a_file_is_refused(sock_dir: Path) -> None:
    async def main() -> None:
        stale = sock_dir / "stale.sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(stale))
        s.close()  # bound, nobody listens: what a killed proxy leaves
        relay = UnixRelay(stale, ("127.0.0.1", 9))
        await relay.start()
        with pytest.raises(UnixRelayError, match="in use by another process"):
            await UnixRelay(stale, ("127.0.0.1", 9)).start()
        await relay.stop()
        plain = sock_dir / "file"
        plain.write_text("")
        with pytest.raises(UnixRelayError, match="is not a socket"):
            await UnixRelay(plain, ("127.0.0.1", 9)).start()
        assert plain.exists()

    asyncio.run(main())
    assert os.listdir(sock_dir) == ["file"]


def test_up_listen_unix_from_the_command_line(tmp_path: Path, sock_dir: Path) -> None:
    """`egress-guard up --listen-unix`: the banner names the socket, a client on it reaches the
    proxy (a denied CONNECT gets egress-guard's 403), SIGTERM removes it; a path too long
    is refused before anything listens."""
    write_config(tmp_path, {"allow": []})
    config = str(tmp_path / "egress-guard.yaml")
    eg = [sys.executable, "-m", "egress_guard", "up", "--config", config]
    too_long = subprocess.run(
        [*eg, "--listen-unix", "/tmp/" + "y" * 110 + "/p.sock"], capture_output=True, text=True, timeout=60
    )
    assert too_long.returncode == 1 and "at most 107 fit" in too_long.stderr, too_long.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = sock_dir / "proxy.sock"
    proc = subprocess.Popen(
        [*eg, "--listen", f"127.0.0.1:{port}", "--listen-unix", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(2)]
        assert banner[1].strip() == f"and on:   unix:{path} (relayed to it)", banner
        sock, head = unix_connect(path, "evil.example:443")
        sock.close()
        assert head.startswith(b"HTTP/1.1 403"), head
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert proc.returncode == 0
    assert not path.exists()


def test_connections_over_the_cap_do_not_exhaust_the_proxy(tmp_path: Path, sock_dir: Path) -> None:
    """An agent opening far more connections to the socket than the relay takes (MAX_CONNECTIONS)
    cannot starve `up` of file descriptors: its TCP listener still answers, and the log
    stays a few lines (no traceback per refused connection). `up` runs with 1,024 fds:
    without the cap, 1,300 idle connections (two fds each in `up`) would exhaust them."""
    import resource

    from egress_guard.unix_relay import MAX_CONNECTIONS

    write_config(tmp_path, {"allow": []})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = sock_dir / "proxy.sock"
    log_path = tmp_path / "up.log"

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "egress_guard", "up", "--config", str(tmp_path / "egress-guard.yaml"),
             "--listen", f"127.0.0.1:{port}", "--listen-unix", str(path)],
            stdout=subprocess.PIPE, stderr=log_file, text=True, preexec_fn=low_fd_limit,
        )  # fmt: skip
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        deadline = time.monotonic() + 15
        while len(clients) < 1300 and time.monotonic() < deadline:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            clients.append(c)
            while time.monotonic() < deadline:
                try:
                    c.connect(str(path))
                    break
                except BlockingIOError:
                    time.sleep(0.005)  # the backlog is full for a moment: wait until the relay accepts
        time.sleep(1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as tcp:
            tcp.sendall(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
            assert tcp.recv(4096).startswith(b"HTTP/1.1 403")

        def through_socket() -> bytes:
            try:
                sock, head = unix_connect(path, "evil.example:443")
                sock.close()
                return head
            except OSError as exc:
                return repr(exc).encode()

        assert not through_socket().startswith(b"HTTP/1.1"), "no slot free: closed at once"
        for c in clients[: MAX_CONNECTIONS + 50]:
            c.close()  # slots free up
        deadline = time.monotonic() + 10
        while not (head := through_socket()).startswith(b"HTTP/1.1 403") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert head.startswith(b"HTTP/1.1 403"), head
    finally:
        for c in clients:
            c.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    log_text = log_path.read_text()
    assert log_path.stat().st_size < 4000, log_text[:4000]
    assert f"{MAX_CONNECTIONS} connections on {path} already" in log_text
    assert "Traceback" not in log_text


def test_a_directory_others_can_write_is_refused_unless_sticky(sock_dir: Path) -> None:
    """Another user who can write the socket's directory could swap the socket (or, before,
    a symlink the chmod followed): refused, naming the fix. Sticky (like /tmp) is fine; the
    socket is 0666 whatever the umask, and nothing is left next to it."""

    async def main() -> None:
        shared = sock_dir / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        with pytest.raises(UnixRelayError, match=r"writable by group or others and not sticky.*Fix: chmod go-w"):
            await UnixRelay(shared / "p.sock", ("127.0.0.1", 9)).start()
        assert os.listdir(shared) == []
        shared.chmod(0o1777)
        old = os.umask(0o077)
        try:
            relay = UnixRelay(shared / "p.sock", ("127.0.0.1", 9))
            await relay.start()
        finally:
            os.umask(old)
        assert stat.S_IMODE((shared / "p.sock").lstat().st_mode) == 0o666
        assert os.listdir(shared) == ["p.sock"]
        await relay.stop()
        assert os.listdir(shared) == []

    asyncio.run(main())
