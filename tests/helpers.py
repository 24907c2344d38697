"""Real components for the tests: a TLS upstream on loopback with its own test CA, the real
proxy running in a background thread, and small raw-socket clients for what curl and httpx
cannot send (mismatched SNI, non-HTTP bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trustme
import yaml

from egress_guard import bootstrap
from egress_guard.config import Config, load_config
from egress_guard.server import EgressProxy

UPSTREAM_NAMES = [
    "api.test.local",
    "other.test.local",
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "api.github.com",
    "api.groq.com",
]


@dataclass
class UpstreamState:
    connections: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    sse_gate: threading.Event = field(default_factory=threading.Event)
    sse_gate_timed_out: bool = False
    runaway: list[int] = field(default_factory=list)  # text events each runaway stream wrote
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    """A generic upstream: /json echoes the request, /sse streams behind a gate, /big downloads."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        """The whole request body; a connection that ends before it is complete raises (the
        request is then not recorded: tests check that a refused upload never arrives whole)."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                line = self.rfile.readline()
                if not line.endswith(b"\n"):
                    raise ConnectionResetError("the chunked body ended before its last chunk")
                size = int(line.strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                data = self.rfile.read(size + 2)
                if len(data) < size + 2:
                    raise ConnectionResetError("the chunked body ended inside a chunk")
                out += data[:size]
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        if len(body) < length:
            raise ConnectionResetError("the body ended before its Content-Length")
        return body

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def handle_any(self) -> None:
        body = self._body()
        url = urlsplit(self.path)
        state = self.server.state
        seen = {
            "method": self.command,
            "path": url.path,
            "query": url.query,
            "host": self.headers.get("host"),
            "headers": dict(self.headers.items()),
            "body_bytes": len(body),
        }
        with state.lock:
            state.requests.append(seen)
        if url.path == "/sse":
            n = int(parse_qs(url.query).get("n", ["3"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunk(b"data: first\n\n")
            # The test releases the gate once it has *received* the first event. A proxy that
            # buffered the stream would never deliver it, and the gate would time out.
            if not state.sse_gate.wait(5):
                state.sse_gate_timed_out = True
            for i in range(1, n):
                self._chunk(f"data: event {i}\n\n".encode())
            self.wfile.write(b"0\r\n\r\n")
            return
        if url.path == "/sized":  # a body of known length (Content-Length framing), any size
            size = int(parse_qs(url.query).get("size", ["1024"])[0])
            self._send(200, b"x" * size, "application/octet-stream")
            return
        if url.path == "/big":
            size = int(parse_qs(url.query).get("size", ["1048576"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent = 0
            while sent < size:
                part = min(65536, size - sent)
                self._chunk(b"x" * part)
                sent += part
            self.wfile.write(b"0\r\n\r\n")
            return
        self._send(200, json.dumps(seen).encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, ssl_context: ssl.SSLContext | None, handler: type[BaseHTTPRequestHandler] = _Handler) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.ssl_context = ssl_context
        self.state = UpstreamState()

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self.state.lock:
            self.state.connections += 1
        if self.ssl_context is not None:
            try:  # handshake in the connection's own thread, not in accept()
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
        super().finish_request(request, client_address)


class Upstream:
    """A TLS (or plain) HTTP/1.1 server on 127.0.0.1 with a certificate for UPSTREAM_NAMES."""

    def __init__(self, ca: trustme.CA | None, handler: type[BaseHTTPRequestHandler] = _Handler) -> None:
        ctx = None
        if ca is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert(*UPSTREAM_NAMES).configure_cert(ctx)  # names only: no IP SAN
        self.server = _Server(ctx, handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def state(self) -> UpstreamState:
        return self.server.state

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RunningProxy:
    """The real EgressProxy, on a free port, in a thread with its own event loop."""

    def __init__(self, config: Config, **options: Any) -> None:
        self.options = options  # more EgressProxy arguments (e.g. timeouts)
        self.config = config
        self.proxy: EgressProxy | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.proxy = EgressProxy(self.config, listen=("127.0.0.1", 0), **self.options)
        try:
            self.address = await self.proxy.start()
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        self.lost = await self.proxy.stop()

    def start(self) -> RunningProxy:
        self.thread.start()
        assert self._ready.wait(20), "proxy did not start"
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self.thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(20)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.config.ca_dir / "egress-guard-ca.pem"

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def rows(self, expect: int | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Audit rows, waiting (bounded) for the writer to flush at least `expect` of them."""
        deadline = time.monotonic() + timeout
        while True:
            conn = sqlite3.connect(self.config.audit_path)
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY id")]
            conn.close()
            if expect is None or len(rows) >= expect or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)

    def row_for(self, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for row in self.rows():
                if row["request_id"] == request_id:
                    return row
            time.sleep(0.05)
        raise AssertionError(f"no audit row for {request_id}")


def write_config(directory: Path, body: dict[str, Any]) -> Config:
    """Write egress-guard.yaml (version 1 + body), init CA and DB, load it."""
    path = directory / "egress-guard.yaml"
    path.write_text(yaml.safe_dump({"version": 1, **body}))
    bootstrap.init(directory, path)
    return load_config(path)


def curl(proxy: RunningProxy, url: str, *args: str, timeout: float = 20) -> tuple[int, dict[str, str], str]:
    """curl through the proxy; returns (status, lowercase headers, body)."""
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--proxy",
            proxy.url,
            "--cacert",
            str(proxy.ca_cert),
            "-D",
            "-",
            "--max-time",
            str(timeout),
            *args,
            url,
        ],
        capture_output=True,
        timeout=timeout + 5,
        check=False,
    )
    if out.returncode not in (0, 22, 56):
        raise AssertionError(f"curl failed ({out.returncode}): {out.stderr.decode()}")
    blocks = out.stdout.decode().split("\r\n\r\n")
    # with a CONNECT, the proxy's "200 Connection established" block comes first
    while len(blocks) > 1 and " 200 Connection established" in blocks[0]:
        blocks = blocks[1:]
    head, body = blocks[0], "\r\n\r\n".join(blocks[1:])
    lines = head.split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    return status, headers, body


def raw_connect(proxy_port: int, target: str, timeout: float = 10) -> tuple[socket.socket, bytes]:
    """Send a CONNECT by hand; returns the socket and the proxy's whole response head + body."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return sock, head + b"\r\n\r\n" + rest


def read_http_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    with contextlib.suppress(OSError, ssl.SSLError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/"):
        return 0, {}, data
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    return int(lines[0].split()[1]), headers, body


def tunnel_request(
    proxy: RunningProxy, target: str, *, sni: str | None, host_header: str, path: str = "/json"
) -> tuple[int, dict[str, str], bytes]:
    """CONNECT to `target`, TLS with `sni` (trusting the proxy's CA), one request with `host_header`."""
    sock, head = raw_connect(proxy.port, target)
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = proxy.client_context()
    ctx.check_hostname = False  # the point is to send an SNI that differs from the target
    tls = ctx.wrap_socket(sock, server_hostname=sni)
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
    try:
        return read_http_response(tls)
    finally:
        tls.close()


def plain_proxy_request(proxy: RunningProxy, authority: str, path: str = "/json") -> tuple[int, dict[str, str], bytes]:
    """An absolute-form plain-HTTP proxy request, sent by hand so no client rewrites the
    authority (curl normalises `2130706433` to `127.0.0.1` before sending)."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(f"GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
    try:
        return read_http_response(sock)
    finally:
        sock.close()
