"""Hostile peers end to end: what a malicious agent or a malicious upstream on a service's
host can do with the corners of HTTP, and what egress-guard must do about it.

Two invariants are under attack in every test here:
- the real secret never reaches the agent: not in a body split around an empty HTTP/2 DATA
  frame, a trailer, a header name, a reason phrase, a second gzip member, bytes after the
  gzip stream, nor a transfer coding mitmproxy does not decode;
- an egress-guard key never reaches a host it is not bound to: not in a request trailer, a
  header name, a second gzip member or bytes after it, nor a gzip transfer coding. A
  buffered body is refused (400/403, nothing forwarded); a streamed one is cut before its
  end, so the upstream never holds a complete request.
Plus: a stage that raises cuts the upload; a decompression bomb is refused quickly and the
proxy goes on serving.

The peers are real: mitmproxy on a free port, TLS upstreams on loopback (HTTP/1.1 from
support.upstream, HTTP/2 from support.h2), raw-socket and hyper-h2 agents where httpx cannot send or
show the bytes that matter.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import ssl
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import brotli
import httpx
import pytest
import zstandard
from support.clients import raw_connect
from support.h2 import H2Upstream, h2_request
from support.llm.common import REAL
from support.proxy import RunningProxy
from support.upstream import Upstream
from test_credentials import http_client, mint

from egress_guard.addons import credential_guard

SECRET = REAL["openai"]
MASK = b"[REDACTED-by-egress-guard]"


# --- set-ups -------------------------------------------------------------------------------


def openai_on(make_proxy: Callable[..., RunningProxy], test_ca: Any, port: int) -> RunningProxy:
    """A proxy whose openai service (real key from the environment) is the upstream on `port`."""
    return make_proxy(
        allowlists=["openai"],
        allow=[{"host": "api.openai.com", "ports": [port]}],
        services=["openai"],
        agents={"researcher": {"services": ["openai"]}},
        network={"hosts": {"api.openai.com": ["127.0.0.1"]}, "upstream_ca": str(test_ca[1])},
    )


def unbound_on(make_proxy: Callable[..., RunningProxy], cred_config: dict[str, Any], port: int) -> RunningProxy:
    """The credentialed config, with api.test.local (bound to no service) on `port`."""
    allow = [r for r in cred_config["allow"] if r["host"] != "api.test.local"]
    return make_proxy(**{**cred_config, "allow": [*allow, {"host": "api.test.local", "ports": [port]}]})


@contextlib.contextmanager
def serving(server: Upstream | H2Upstream) -> Iterator[Any]:
    try:
        yield server
    finally:
        server.close()


class Recorder(BaseHTTPRequestHandler):
    """An HTTP/1.1 upstream that records every request as it arrives (head first, then its
    body) in state.requests, and whether all of it came: a connection cut midway is not
    taken for the body's end (the generic upstream's reader would take it so)."""

    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, *args: Any) -> None:
        pass

    def _take(self, seen: dict[str, Any], n: int) -> bool:
        while n > 0:
            data = self.rfile.read1(n)
            if not data:
                return False
            seen["body"] += data
            n -= len(data)
        return True

    def _read(self, seen: dict[str, Any]) -> bool:
        if "chunked" not in seen["te"].lower():
            return self._take(seen, int(self.headers.get("content-length") or 0))
        while True:
            line = self.rfile.readline()
            if not line.endswith(b"\n"):
                return False
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while (line := self.rfile.readline()) not in (b"\r\n", b"\n"):
                    if not line:
                        return False
                return True
            if not self._take(seen, size) or self.rfile.readline() != b"\r\n":
                return False

    def do_POST(self) -> None:
        state = self.server.state
        seen: dict[str, Any] = {"method": self.command, "te": self.headers.get("transfer-encoding", "")}
        seen.update(body=b"", complete=False)
        with state.lock:
            state.requests.append(seen)
        try:
            seen["complete"] = self._read(seen)
        except (OSError, ValueError):
            return
        if seen["complete"]:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    do_GET = do_POST


def hostile(respond: Callable[[BaseHTTPRequestHandler], None]) -> type[BaseHTTPRequestHandler]:
    """An HTTP/1.1 upstream that answers every GET with `respond(handler)`, after recording
    the Authorization it got (the swap must have happened for the test to mean anything)."""

    class Hostile(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server: Any

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            with self.server.state.lock:
                self.server.state.requests.append({"authorization": self.headers.get("authorization")})
            respond(self)

    return Hostile


def exchange(proxy: RunningProxy, host: str, port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send `request` by hand through a CONNECT tunnel; every byte the agent got back, up to
    the end of the connection (ask for `Connection: close`) or its cut."""
    sock, head = raw_connect(proxy.port, f"{host}:{port}", timeout=timeout)
    assert head.startswith(b"HTTP/1.1 200"), head
    tls = proxy.client_context().wrap_socket(sock, server_hostname=host)
    got = b""
    try:
        tls.sendall(request)
        while chunk := tls.recv(65536):
            got += chunk
    except TimeoutError:
        raise TimeoutError(f"the proxy neither answered nor closed within {timeout} s: {got!r}") from None
    except (ssl.SSLError, ConnectionError):
        pass  # cut: what came before it is what the agent got
    finally:
        tls.close()
    return got


def status_of(raw: bytes) -> int | None:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else None


def readable(raw: bytes) -> bytes:
    """`raw` and whatever each gzip stream in it inflates to: all an agent could read."""
    out = [raw]
    i = raw.find(b"\x1f\x8b")
    while i >= 0:
        with contextlib.suppress(zlib.error):
            out.append(zlib.decompressobj(31).decompress(raw[i:]))
        i = raw.find(b"\x1f\x8b", i + 1)
    return b"\n".join(out)


def get_as_agent(proxy: RunningProxy, port: int, fake: str, path: str = "/v1/models") -> bytes:
    target = f"api.openai.com:{port}"
    request = f"GET {path} HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {fake}\r\nConnection: close\r\n\r\n"
    return exchange(proxy, "api.openai.com", port, request.encode())


def audit_row(proxy: RunningProxy, credential: str, timeout: float = 5) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in proxy.rows() if r["kind"] == "request" and r["credential"] == credential]
        if rows or time.monotonic() > deadline:
            assert rows, f"no request row with credential {credential!r}: {proxy.rows()}"
            return rows[-1]
        time.sleep(0.05)


def in_two(body: bytes) -> Iterator[bytes]:
    """A body httpx sends chunked, in two pieces (no Content-Length: the proxy streams it)."""
    yield body[:10]
    yield body[10:]


# --- HTTP/2: an empty DATA frame mid-stream -------------------------------------------------


def split_around_an_empty_frame() -> tuple[bytes, int, list[bytes]]:
    secret = SECRET.encode()
    half = len(secret) // 2
    return secret, half, [b'data: {"echo": "' + secret[:half], b"", secret[half:] + b'"}\n\n']


def agent_view(proxy: RunningProxy, port: int, fake: str, agent: str) -> tuple[int | None, bytes]:
    """(status, every byte the agent could read) for a GET /v1/models from the raw HTTP/2
    agent, or from httpx: it offers h2 (so the proxy offers it upstream, and the HTTP/2-only
    upstream answers) and speaks HTTP/1.1 inside the tunnel, so mitmproxy translates."""
    if agent == "h2":
        reply = h2_request(proxy, "api.openai.com", port, "/v1/models", [("authorization", f"Bearer {fake}")])
        return reply.status, reply.everything()
    got, status = b"", None
    url = f"https://api.openai.com:{port}/v1/models"
    with (
        http_client(proxy, http2=True) as client,
        contextlib.suppress(httpx.HTTPError),  # a cut: what came before it is what the agent got
        client.stream("GET", url, headers={"Authorization": f"Bearer {fake}"}) as r,
    ):
        status = r.status_code
        got = str(r.headers).encode()
        for piece in r.iter_raw():
            got += piece
    return status, got


@pytest.mark.parametrize("agent", ["http1", "h2"])
def test_an_empty_http2_data_frame_mid_stream_does_not_unmask_the_secret(make_proxy, test_ca, real_env, agent) -> None:
    """mitmproxy hands a stream callable b"" for an empty DATA frame, its signal for the END
    of the body: the scrubber flushed the half of the secret it held back, and the other half
    followed. The frame is dropped now; the secret arrives whole, and masked."""
    secret, half, frames = split_around_an_empty_frame()
    with serving(H2Upstream(test_ca[0], frames)) as up:
        proxy = openai_on(make_proxy, test_ca, up.port)
        status, got = agent_view(proxy, up.port, mint(proxy).env["OPENAI_API_KEY"], agent)
        assert up.complete[0].headers["authorization"] == f"Bearer {SECRET}"  # the swap happened
    assert secret[:half] not in got and secret[half:] not in got, f"the real secret reached the agent: {got!r}"
    assert status == 200 and MASK in got  # masked, and the stream went on to its end


def test_bytes_after_the_end_of_a_streamed_body_abort_it(make_proxy, test_ca, real_env, monkeypatch) -> None:
    """Defence in depth, with the empty-frame filter of addons/_mitm.py undone for this test:
    BodyStream sees b"" (an end) and then more bytes, and aborts, so the half of the secret
    that came after the empty frame never reaches the agent (the half flushed at the false end
    did: that is what the filter is for)."""
    from mitmproxy.proxy.layers.http import HttpStream

    secret, half, frames = split_around_an_empty_frame()
    with serving(H2Upstream(test_ca[0], frames)) as up:
        proxy = openai_on(make_proxy, test_ca, up.port)  # installs the filter: undo it after
        for name in ("state_stream_request_body", "state_stream_response_body"):
            patched = HttpStream.__dict__[name]
            assert getattr(patched, "_egress_guard", False), f"{name} is not wrapped: test needs updating"
            monkeypatch.setattr(HttpStream, name, patched.__wrapped__)
        fake = mint(proxy).env["OPENAI_API_KEY"]
        reply = h2_request(proxy, "api.openai.com", up.port, "/v1/models", [("authorization", f"Bearer {fake}")])
    assert secret[half:] not in reply.everything(), f"bytes after the end reached the agent: {reply}"
    assert not reply.ended and (reply.closed or reply.reset is not None), reply  # cut, not ended


# --- HTTP/2 trailers -----------------------------------------------------------------------


@pytest.mark.parametrize("buffered", [False, True], ids=["streamed", "buffered"])
def test_a_secret_in_http2_response_trailers_never_reaches_the_agent(make_proxy, test_ca, real_env, buffered) -> None:
    """Trailers arrive after the body and leave after the `response` hook: they are scrubbed
    there (only the head used to be)."""
    trailers = [("x-echo", SECRET), ("x-note", "fine")]
    body = [b'{"data": []}']
    if buffered:  # a known, small length: buffered and scrubbed whole
        upstream = H2Upstream(test_ca[0], body, trailers, content_type="application/json", content_length=True)
    else:
        upstream = H2Upstream(test_ca[0], body, trailers)
    with serving(upstream) as up:
        proxy = openai_on(make_proxy, test_ca, up.port)
        fake = mint(proxy).env["OPENAI_API_KEY"]
        reply = h2_request(proxy, "api.openai.com", up.port, "/v1/models", [("authorization", f"Bearer {fake}")])
        assert up.complete[0].headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET.encode() not in reply.everything(), f"the real secret reached the agent: {reply}"
    assert reply.status == 200 and reply.body == b'{"data": []}' and ("x-note", "fine") in reply.trailers


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
def test_a_fake_key_in_http2_request_trailers_is_refused(make_proxy, cred_config, real_env, test_ca, streamed) -> None:
    """A buffered body is refused whole (403); a streamed one went ahead of its trailers, so
    the agent's connection is cut before the end: the upstream never has the trailer nor a
    complete request."""
    with serving(H2Upstream(test_ca[0], [b"{}"], content_type="application/json")) as up:
        proxy = unbound_on(make_proxy, cred_config, up.port)
        fake = mint(proxy).env["OPENAI_API_KEY"]
        headers = [("content-type", "text/plain"), *([] if streamed else [("content-length", "5")])]
        reply = h2_request(
            proxy,
            "api.test.local",
            up.port,
            "/upload",
            headers,
            method="POST",
            body=b"hello",
            trailers=[("x-note", fake)],
        )
        time.sleep(0.3)  # anything the proxy would still forward has arrived by now
        leaked = [r for r in up.requests if fake in repr(r)]
        assert not leaked, f"the fake key reached the unbound host in a trailer: {leaked} (agent: {reply})"
        assert up.complete == []
        if streamed:
            assert reply.status is None and (reply.closed or reply.reset is not None), reply
        else:
            assert reply.status == 403 and up.requests == [], reply
            assert b"sent to api.test.local in a trailer" in reply.body


# --- header names and the reason phrase -------------------------------------------------------


def test_a_fake_key_as_a_request_header_name_is_refused(cred_proxy, upstream) -> None:
    fake = mint(cred_proxy).env["OPENAI_API_KEY"]
    with http_client(cred_proxy) as client:
        r = client.get(f"https://api.test.local:{upstream.port}/json", headers={fake: "1"})
    assert upstream.state.requests == [], "the fake key reached the unbound host as a header name"
    assert r.status_code == 403
    assert "an egress-guard key for openai was sent to api.test.local in header" in r.json()["error"]["message"]


def _secret_header_name(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header(SECRET, "1")
    handler.send_header("X-Note", "fine")
    handler.send_header("Content-Length", "2")
    handler.end_headers()
    handler.wfile.write(b"{}")


def _secret_reason(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200, "OK " + SECRET)
    handler.send_header("Content-Length", "2")
    handler.end_headers()
    handler.wfile.write(b"{}")


def test_a_response_header_named_by_the_secret_is_dropped(make_proxy, test_ca, real_env) -> None:
    with serving(Upstream(test_ca[0], hostile(_secret_header_name))) as up:
        proxy = openai_on(make_proxy, test_ca, up.port)
        raw = get_as_agent(proxy, up.port, mint(proxy).env["OPENAI_API_KEY"])
        assert up.state.requests == [{"authorization": f"Bearer {SECRET}"}]
    assert SECRET.lower().encode() not in raw.lower(), f"the real secret reached the agent: {raw!r}"
    assert status_of(raw) == 200 and b"\r\nx-note: fine\r\n" in raw.lower() and raw.endswith(b"\r\n\r\n{}")


def test_a_secret_in_the_reason_phrase_is_masked(make_proxy, test_ca, real_env) -> None:
    with serving(Upstream(test_ca[0], hostile(_secret_reason))) as up:
        proxy = openai_on(make_proxy, test_ca, up.port)
        raw = get_as_agent(proxy, up.port, mint(proxy).env["OPENAI_API_KEY"])
        assert up.state.requests == [{"authorization": f"Bearer {SECRET}"}]
    assert SECRET.encode() not in raw, f"the real secret reached the agent: {raw!r}"
    assert raw.startswith(b"HTTP/1.1 200 OK " + MASK) and raw.endswith(b"\r\n\r\n{}")


# --- gzip: every member, nothing after the last ---------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
@pytest.mark.parametrize("how", ["second-member", "trailing-bytes"])
def test_a_fake_key_after_the_first_gzip_member_is_refused(
    make_proxy, cred_config, real_env, test_ca, streamed, how
) -> None:
    """zlib stops at the end of the first gzip member: a key in a second member, or in plain
    bytes after the first, went unread and was forwarded. A second member is read (a key in
    it: 403); plain bytes after the stream make the body unreadable (400)."""
    with serving(Upstream(test_ca[0], Recorder)) as up:
        proxy = unbound_on(make_proxy, cred_config, up.port)
        fake = mint(proxy).env["OPENAI_API_KEY"].encode()
        body = gzip.compress(b'{"q": "hello"}') + (gzip.compress(fake) if how == "second-member" else fake)
        url = f"https://api.test.local:{up.port}/upload"
        headers = {"content-encoding": "gzip", "content-type": "application/json"}
        with http_client(proxy) as client:
            if streamed:
                with pytest.raises(httpx.HTTPError):  # cut before the body's end
                    client.post(url, content=in_two(body), headers=headers)
            else:
                r = client.post(url, content=body, headers=headers)
                assert r.status_code == (403 if how == "second-member" else 400), r.text
        time.sleep(0.3)  # anything the proxy would still forward has arrived by now
        seen = up.state.requests
        assert not any(fake in readable(s["body"]) for s in seen), f"the fake key reached the unbound host: {seen}"
        assert not any(s["complete"] for s in seen), seen
        if not streamed:
            assert seen == []
    credential = "denied-unbound-host" if how == "second-member" else "denied-unreadable-body"
    audit_row(proxy, credential)


def _gzip_then(tail: Callable[[bytes], bytes]) -> Callable[[BaseHTTPRequestHandler], None]:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        body = gzip.compress(b'{"data": []}') + tail(SECRET.encode())
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return respond


@pytest.mark.parametrize("how", ["second-member", "trailing-bytes"])
def test_a_secret_after_the_first_gzip_member_never_reaches_the_agent(make_proxy, test_ca, real_env, how) -> None:
    """The scrubber read the first member only, found nothing, and let the wire bytes through
    as they were. Now a second member is read and scrubbed; plain bytes after the stream
    kill the flow."""
    tail = gzip.compress if how == "second-member" else (lambda s: s)
    with serving(Upstream(test_ca[0], hostile(_gzip_then(tail)))) as up:
        proxy = openai_on(make_proxy, test_ca, up.port)
        raw = get_as_agent(proxy, up.port, mint(proxy).env["OPENAI_API_KEY"])
        assert up.state.requests == [{"authorization": f"Bearer {SECRET}"}]
    assert SECRET.encode() not in readable(raw), f"the real secret reached the agent: {raw!r}"
    if how == "second-member":
        assert status_of(raw) == 200 and MASK in readable(raw)
    else:
        assert status_of(raw) != 200, raw


# --- transfer codings other than chunked ---------------------------------------------------


def test_a_request_with_a_gzip_transfer_coding_is_refused(make_proxy, cred_config, real_env, test_ca) -> None:
    """mitmproxy accepts `Transfer-Encoding: gzip, chunked` on a request and forwards it
    undecoded: a key inside could not be checked. Refused before anything is forwarded."""
    with serving(Upstream(test_ca[0], Recorder)) as up:
        proxy = unbound_on(make_proxy, cred_config, up.port)
        fake = mint(proxy).env["OPENAI_API_KEY"].encode()
        body = gzip.compress(b'{"note": "' + fake + b'"}')
        target = f"api.test.local:{up.port}"
        head = (
            f"POST /upload HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n"
        )
        raw = exchange(proxy, "api.test.local", up.port, head.encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        time.sleep(0.3)
        assert up.state.requests == []
    assert status_of(raw) == 400 and b"Transfer-Encoding 'gzip,chunked' is not accepted" in raw, raw


def _gzip_transfer_coding(te: str) -> Callable[[BaseHTTPRequestHandler], None]:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        body = gzip.compress(b'{"echo": "' + SECRET.encode() + b'"}')
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", te)
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if "chunked" in te else body)

    return respond


@pytest.mark.parametrize("te", ["gzip, chunked", "gzip"])
def test_a_secret_in_a_gzip_transfer_coding_never_reaches_the_agent(make_proxy, test_ca, real_env, te) -> None:
    """mitmproxy passes such a body through undecoded, so the scrubber saw only gzip: on a
    credentialed response the flow is killed before anything is sent."""
    with serving(Upstream(test_ca[0], hostile(_gzip_transfer_coding(te)))) as up:
        proxy = openai_on(make_proxy, test_ca, up.port)
        raw = get_as_agent(proxy, up.port, mint(proxy).env["OPENAI_API_KEY"])
        assert up.state.requests == [{"authorization": f"Bearer {SECRET}"}]
    assert SECRET.encode() not in readable(raw), f"the real secret reached the agent: {raw!r}"
    assert status_of(raw) != 200, raw


# --- a stage that raises ---------------------------------------------------------------------


@pytest.mark.parametrize("first_piece_bad", [True, False])
def test_a_raising_stage_never_completes_the_upload(
    make_proxy, cred_config, real_env, test_ca, monkeypatch, first_piece_bad
) -> None:
    """A stage bug (not a scanner hit) aborts the connection: the upstream never receives a
    complete, truncated request, also when the body's end arrives while the upstream
    connection is still opening."""
    original = credential_guard.StreamScanner.__call__

    def boom(self: credential_guard.StreamScanner, data: bytes, end: bool) -> bytes:
        if b"BOOM" in data:
            raise RuntimeError("a stage bug")
        return original(self, data, end)

    monkeypatch.setattr(credential_guard.StreamScanner, "__call__", boom)
    with serving(Upstream(test_ca[0], Recorder)) as up:
        proxy = unbound_on(make_proxy, cred_config, up.port)
        target = f"api.test.local:{up.port}"
        first = b"BOOM" if first_piece_bad else b"hello"
        head = (
            f"POST /json HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        # one write: the body's end arrives while the upstream connection is still opening
        raw = exchange(
            proxy, "api.test.local", up.port, head + b"%x\r\n%s\r\n4\r\nBOOM\r\n0\r\n\r\n" % (len(first), first)
        )
        time.sleep(0.3)
        assert not any(s["complete"] for s in up.state.requests), f"the upstream got a complete request: {up.state}"
    assert status_of(raw) != 200, raw


# --- decompression bombs ---------------------------------------------------------------------


@functools.cache
def bomb(encoding: str) -> bytes:
    """A few hundred bytes that decode to 70 MiB of zeros (the proxy's cap is 64 MiB)."""
    mib = bytes(1 << 20)
    if encoding == "br":
        c = brotli.Compressor(quality=5)
        return b"".join(c.process(mib) for _ in range(70)) + c.finish()
    if encoding == "zstd":
        z = zstandard.ZstdCompressor().compressobj()
        return b"".join(z.compress(mib) for _ in range(70)) + z.flush()
    assert encoding == "gzip, gzip"
    g = zlib.compressobj(9, zlib.DEFLATED, 31)
    once = b"".join(g.compress(mib) for _ in range(70)) + g.flush()
    return gzip.compress(once)


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
@pytest.mark.parametrize("encoding", ["br", "gzip, gzip", "zstd"])
def test_a_decompression_bomb_is_refused_quickly(
    make_proxy, cred_config, real_env, test_ca, encoding, streamed
) -> None:
    body = bomb(encoding)
    assert len(body) < 4096
    with serving(Upstream(test_ca[0], Recorder)) as up:
        proxy = unbound_on(make_proxy, cred_config, up.port)
        url = f"https://api.test.local:{up.port}/upload"
        with http_client(proxy) as client:
            started = time.monotonic()
            if streamed:
                with pytest.raises(httpx.HTTPError):
                    client.post(url, content=in_two(body), headers={"content-encoding": encoding})
            else:
                r = client.post(url, content=body, headers={"content-encoding": encoding})
                assert r.status_code == 400 and "decodes to more than 64 MiB" in r.json()["error"]["message"]
            elapsed = time.monotonic() - started
        row = audit_row(proxy, "denied-unreadable-body")
        assert "decodes to more than 64 MiB" in row["reason"]
        assert elapsed < 5, f"refusing a {len(body)}-byte bomb took {elapsed:.1f} s"
        assert not any(s["complete"] for s in up.state.requests)
        with http_client(proxy) as client:  # and the proxy goes on serving
            assert client.post(url, content=b"{}").status_code == 200


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
@pytest.mark.parametrize("encoding", ["br", "gzip", "zstd"])
def test_a_large_honest_compressed_body_is_forwarded(make_proxy, cred_config, real_env, test_ca, encoding, streamed):
    """The bomb cap refuses only what is over it: 16 MiB of zeros, a few KB compressed, goes
    through whole."""
    plain = bytes(16 << 20)
    body = {"br": brotli.compress, "gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress}[encoding](plain)
    with serving(Upstream(test_ca[0], Recorder)) as up:
        proxy = unbound_on(make_proxy, cred_config, up.port)
        url = f"https://api.test.local:{up.port}/upload"
        with http_client(proxy) as client:
            r = client.post(url, content=in_two(body) if streamed else body, headers={"content-encoding": encoding})
        assert r.status_code == 200, r.text
        assert [(s["body"], s["complete"]) for s in up.state.requests] == [(body, True)]


def test_a_non_utf8_http2_path_does_not_stop_the_audit_log(cred_proxy, upstream) -> None:
    """mitmproxy decodes an HTTP/2 :path with surrogateescape; a lone surrogate in a row
    could not be bound by sqlite3, its batch failed again and again, and every later
    request was refused 503 (one request took the proxy down)."""
    with contextlib.suppress(Exception):
        h2_request(cred_proxy, "api.test.local", upstream.port, b"/json/a\xffb", [])  # type: ignore[arg-type]
    reply = h2_request(cred_proxy, "api.test.local", upstream.port, "/json", [])
    assert reply.status == 200
    rows = [r for r in cred_proxy.rows(expect=3) if r["kind"] == "request"]
    assert any(r["path"] and r["path"].startswith("/json/a") for r in rows)  # the odd one has its row too
