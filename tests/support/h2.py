"""HTTP/2 peers for the tests, built on hyper-h2, on loopback, TLS with the tests' CAs.

- `h2_request`: a raw HTTP/2 agent. It opens a CONNECT tunnel through the proxy, speaks h2
  (ALPN) inside it, sends one request (optionally with a body and request trailers) and
  reports exactly what came back: the head, every DATA payload, the trailers, a reset, or a
  connection the proxy cut. httpx cannot send trailers nor show the ones it receives.
- `H2Upstream`: a scripted HTTP/2 upstream. It answers every request with the DATA frames
  it was given (b"" is an empty DATA frame without END_STREAM, which HTTP/2 allows mid-stream
  and HTTP/1.1 cannot express) and optional response trailers, and records every request
  stream it saw begin, with its body, its trailers, and whether it ever ended. It speaks
  HTTP/2 only: mitmproxy offers h2 upstream only to an agent that offered it (ALPN), so its
  agent must be `h2_request` or a client that offers h2 (httpx with http2=True).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trustme

from support.clients import raw_connect
from support.proxy import RunningProxy
from support.upstream import UPSTREAM_NAMES

Fields = list[tuple[str, str]]


def _text(fields: Iterable[Any]) -> Fields:
    """hyper-h2's header tuples (bytes, or str with header_encoding) as (str, str)."""

    def s(v: bytes | str) -> str:
        return v.decode("latin-1") if isinstance(v, bytes) else v

    return [(s(k), s(v)) for k, v in fields]


@dataclass
class H2Reply:
    """What the agent received on its stream, as received."""

    status: int | None = None
    headers: Fields = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)
    trailers: Fields = field(default_factory=list)
    reset: int | None = None  # RST_STREAM's error code
    ended: bool = False  # the stream ended normally (END_STREAM)
    closed: bool = False  # the connection went away (EOF, GOAWAY, TLS error) before that

    @property
    def body(self) -> bytes:
        return b"".join(self.data)

    def everything(self) -> bytes:
        """Every byte the agent could read: head, DATA, trailers."""
        fields = [*self.headers, *self.trailers]
        return "\n".join(f"{k}: {v}" for k, v in fields).encode() + b"\n" + self.body


def h2_request(
    proxy: RunningProxy,
    host: str,
    port: int,
    path: str,
    headers: Fields,
    *,
    method: str = "GET",
    body: bytes = b"",
    trailers: Fields | None = None,
    timeout: float = 10,
) -> H2Reply:
    """One HTTP/2 request through the proxy's tunnel to host:port. A reply that does not end
    within `timeout` seconds raises TimeoutError."""
    sock, head = raw_connect(proxy.port, f"{host}:{port}", timeout=timeout)
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = proxy.client_context()
    ctx.set_alpn_protocols(["h2"])
    tls = ctx.wrap_socket(sock, server_hostname=host)
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    request_head = [(":method", method), (":path", path), (":scheme", "https"), (":authority", f"{host}:{port}")]
    conn.send_headers(sid, [*request_head, *headers], end_stream=not (body or trailers))
    if body:
        conn.send_data(sid, body, end_stream=not trailers)
    if trailers:
        conn.send_headers(sid, trailers, end_stream=True)
    reply = H2Reply()
    try:
        tls.sendall(conn.data_to_send())
        while not (reply.ended or reply.reset is not None or reply.closed):
            try:
                data = tls.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"no end of the HTTP/2 reply within {timeout} s: {reply}") from None
            except (ssl.SSLError, ConnectionError):
                data = b""
            if not data:
                reply.closed = True
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                    reply.headers = _text(event.headers)
                    reply.status = int(dict(reply.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == sid:
                    reply.data.append(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.TrailersReceived) and event.stream_id == sid:
                    reply.trailers = _text(event.headers)
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == sid:
                    reply.reset = event.error_code
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                    reply.ended = True
                elif isinstance(event, h2.events.ConnectionTerminated):
                    reply.closed = True
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                tls.sendall(conn.data_to_send())
    finally:
        tls.close()
    return reply


@dataclass
class H2Request:
    """One request stream as the upstream saw it."""

    headers: dict[str, str]
    body: bytes = b""
    trailers: Fields = field(default_factory=list)
    complete: bool = False  # its END_STREAM arrived: the upstream had the whole request


class H2Upstream:
    """An HTTP/2-only TLS server on 127.0.0.1 with a certificate for UPSTREAM_NAMES: every
    request gets 200 `content_type` (with a content-length if asked), the DATA frames
    `frames` (each sent and flushed on its own), then `trailers` or a plain end of stream."""

    def __init__(
        self,
        ca: trustme.CA,
        frames: list[bytes],
        trailers: Fields | None = None,
        content_type: str = "text/event-stream",
        content_length: bool = False,
    ) -> None:
        self.frames, self.trailers = frames, trailers
        self.head = [(":status", "200"), ("content-type", content_type)]
        if content_length:
            self.head.append(("content-length", str(sum(map(len, frames)))))
        self.requests: list[H2Request] = []
        self._lock = threading.Lock()
        self._conns: list[ssl.SSLSocket] = []
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*UPSTREAM_NAMES).configure_cert(self.ctx)
        self.ctx.set_alpn_protocols(["h2"])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def complete(self) -> list[H2Request]:
        with self._lock:
            return [r for r in self.requests if r.complete]

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return  # closed
            raw.settimeout(20)
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        with contextlib.suppress(OSError, h2.exceptions.ProtocolError):
            tls = self.ctx.wrap_socket(raw, server_side=True)
            with self._lock:
                self._conns.append(tls)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            conn.initiate_connection()
            tls.sendall(conn.data_to_send())
            streams: dict[int, H2Request] = {}
            while data := tls.recv(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        streams[event.stream_id] = req = H2Request(dict(_text(event.headers)))
                        with self._lock:
                            self.requests.append(req)
                    elif isinstance(event, h2.events.DataReceived):
                        streams[event.stream_id].body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.TrailersReceived):
                        streams[event.stream_id].trailers = _text(event.headers)
                    elif isinstance(event, h2.events.StreamEnded):
                        streams[event.stream_id].complete = True
                        self._answer(tls, conn, event.stream_id)
                tls.sendall(conn.data_to_send())

    def _answer(self, tls: ssl.SSLSocket, conn: h2.connection.H2Connection, sid: int) -> None:
        conn.send_headers(sid, self.head)
        tls.sendall(conn.data_to_send())
        for frame in self.frames:
            conn.send_data(sid, frame)
            tls.sendall(conn.data_to_send())
        if self.trailers:
            conn.send_headers(sid, self.trailers, end_stream=True)
        else:
            conn.end_stream(sid)
        tls.sendall(conn.data_to_send())

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
