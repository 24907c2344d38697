"""The generic upstream for the tests: a TLS (or plain) HTTP/1.1 server on loopback whose
certificate, from the tests' own CA, names every host a test dials (UPSTREAM_NAMES).
`GenericHandler` echoes what it received (/json), streams behind a gate (/sse) and serves
bodies of any size (/sized, /big); the fake APIs in `support.llm` are handlers on the same
server."""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trustme

UPSTREAM_NAMES = [
    "api.test.local",
    "other.test.local",
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "api.github.com",
    "api.groq.com",
    "pypi.org",  # tests/e2e/test_policy_e2e.py: the verdict table's hosts
    "mcp.example.com",
    "div.example.com",
    "new.example.org",
]


@dataclass
class UpstreamState:
    connections: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    sse_gate: threading.Event = field(default_factory=threading.Event)
    sse_gate_timed_out: bool = False
    runaway: list[int] = field(default_factory=list)  # text events each runaway stream wrote
    lock: threading.Lock = field(default_factory=threading.Lock)


class GenericHandler(BaseHTTPRequestHandler):
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

    def __init__(
        self, ssl_context: ssl.SSLContext | None, handler: type[BaseHTTPRequestHandler] = GenericHandler
    ) -> None:
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

    def __init__(self, ca: trustme.CA | None, handler: type[BaseHTTPRequestHandler] = GenericHandler) -> None:
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
