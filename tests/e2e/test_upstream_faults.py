"""Hanging and failing upstreams, and agents that never finish a request, against real sockets:
a connect that never completes (a listener whose backlog is full), a listener that never
speaks TLS, a TLS server that never answers, one that answers garbage. Every failure is
answered in the provider's error shape with a status the audit row records; timeouts are
504 and name their setting. Short timeouts keep these tests to seconds."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trustme
from support.clients import curl, read_http_response
from support.llm.common import REAL
from support.proxy import RunningProxy, write_config
from support.upstream import UPSTREAM_NAMES

from egress_guard import keys
from egress_guard.addons import spend_guard
from egress_guard.addons.timeouts import Timeouts

SHORT = Timeouts(connect=1.0, tls=1.0, response=1.5, header=1.0)


def TimedProxy(config: Any, timeouts: Timeouts) -> RunningProxy:
    """RunningProxy with timeouts of the test's choosing (EgressProxy's `timeouts`)."""
    return RunningProxy(config, timeouts=timeouts)


class Fault:
    """A misbehaving upstream on 127.0.0.1.

    full-backlog: never accepts, and its backlog is full: a connect to it never completes.
    silent:       accepts, never speaks (no TLS ServerHello).
    tls-silent:   completes TLS, reads the request, never answers.
    tls-slow:     completes TLS, answers 200 after `delay` seconds.
    tls-garbage:  completes TLS, sends `garbage` (not HTTP, or HTTP cut short), hangs up.
    """

    def __init__(self, mode: str, ca: trustme.CA, delay: float = 0.0, garbage: bytes = b"") -> None:
        self.mode, self.delay, self.garbage = mode, delay, garbage
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*UPSTREAM_NAMES).configure_cert(self.ctx)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.requests = 0
        self.closed = threading.Event()
        if mode == "full-backlog":
            self.sock.listen(0)
            for _ in range(4):  # fill the accept queue; later SYNs are dropped and retried
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", self.port))
                self.held.append(filler)
            time.sleep(0.2)
        else:
            self.sock.listen(16)
            threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.mode == "silent":
            return
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
            self.held.append(tls)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.requests += 1
            if self.mode == "tls-slow":
                time.sleep(self.delay)
                tls.sendall(
                    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
                )
            elif self.mode == "tls-garbage":
                tls.sendall(self.garbage)
                tls.close()
        except (OSError, ssl.SSLError):
            return

    def close(self) -> None:
        self.closed.set()
        for s in [self.sock, *self.held]:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def faults(test_ca: tuple[trustme.CA, Path]) -> Iterator[Callable[..., Fault]]:
    made: list[Fault] = []

    def make(mode: str, **kw: Any) -> Fault:
        made.append(Fault(mode, test_ca[0], **kw))
        return made[-1]

    yield make
    for f in made:
        f.close()


@pytest.fixture
def timed_proxy(tmp_path: Path, test_ca: tuple[trustme.CA, Path]) -> Iterator[Callable[..., RunningProxy]]:
    started: list[RunningProxy] = []

    def make(port: int, timeouts: Timeouts = SHORT, **extra: Any) -> RunningProxy:
        names = ["api.test.local", "api.openai.com"]
        body = {
            "allow": [{"host": name, "ports": [port]} for name in names],
            "network": {"hosts": {name: ["127.0.0.1"] for name in names}, "upstream_ca": str(test_ca[1])},
            **extra,
        }
        proxy = TimedProxy(write_config(tmp_path, body), timeouts).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def request_row(proxy: RunningProxy) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        rows = [r for r in proxy.rows() if r["kind"] == "request"]
        if rows or time.monotonic() > deadline:
            assert rows, proxy.rows()
            return rows[-1]
        time.sleep(0.05)


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_a_connect_that_never_completes_is_answered_504(faults, timed_proxy, http: str) -> None:
    fault = faults("full-backlog")
    proxy = timed_proxy(fault.port)
    started = time.monotonic()
    status, headers, body = curl(proxy, f"https://api.test.local:{fault.port}/v1/x", http)
    assert time.monotonic() - started < 6
    assert status == 504, body
    error = json.loads(body)["error"]
    assert error["type"] == "egress_error"
    assert "no TCP connection to api.test.local" in error["message"] and "network.connect_timeout" in error["message"]
    assert headers["x-egress-guard-decision"] == "error"
    row = request_row(proxy)
    assert (row["decision"], row["status"], row["host"]) == ("error", 504, "api.test.local")
    assert "network.connect_timeout" in row["reason"]


def test_an_upstream_that_never_speaks_tls_is_answered_504(faults, timed_proxy) -> None:
    fault = faults("silent")
    proxy = timed_proxy(fault.port)
    status, _headers, body = curl(proxy, f"https://api.test.local:{fault.port}/v1/x")
    assert status == 504, body
    assert "TLS handshake with api.test.local" in body and "network.tls_timeout" in body
    row = request_row(proxy)
    assert (row["decision"], row["status"]) == ("error", 504)
    assert "network.tls_timeout" in row["reason"] and "Client disconnected" not in row["reason"]


def test_an_upstream_that_never_answers_is_504_in_the_openai_sdk(faults, timed_proxy, real_env) -> None:
    fault = faults("tls-silent")
    proxy = timed_proxy(fault.port, services=["openai"], agents={"researcher": {"services": ["openai"]}})
    fake = keys.mint(proxy.config, "researcher").env["OPENAI_API_KEY"]
    http = httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=20)
    client = openai.OpenAI(
        api_key=fake, base_url=f"https://api.openai.com:{fault.port}/v1", max_retries=0, http_client=http
    )
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.models.list()
    assert time.monotonic() - started < 6
    assert caught.value.status_code == 504
    body = caught.value.body
    assert isinstance(body, dict) and "network.response_timeout" in body["message"]  # openai's error shape
    assert "api.openai.com" in body["message"]
    assert fault.requests == 1  # it was forwarded, and no answer came
    row = request_row(proxy)
    assert (row["decision"], row["status"], row["agent"], row["credential"]) == ("error", 504, "researcher", "swapped")
    assert "network.response_timeout" in row["reason"]


def test_a_slow_answer_within_the_timeouts_is_not_cut(faults, timed_proxy) -> None:
    fault = faults("tls-slow", delay=2.0)  # longer than the header timeout: a request in progress is not idle
    proxy = timed_proxy(fault.port, Timeouts(connect=1, tls=1, response=5, header=1))
    status, _, body = curl(proxy, f"https://api.test.local:{fault.port}/v1/x")
    assert (status, json.loads(body)) == (200, {"ok": True})
    assert request_row(proxy)["status"] == 200


def test_garbage_from_the_upstream_is_502_and_never_quoted(faults, timed_proxy) -> None:
    marker = "sk-ECHOED-BY-A-HOSTILE-UPSTREAM-0123456789"
    fault = faults("tls-garbage", garbage=f"HTTP/1.1 2OO {marker}\r\n{marker}\r\n\r\n".encode())
    proxy = timed_proxy(fault.port)
    status, headers, body = curl(proxy, f"https://api.test.local:{fault.port}/v1/x")
    assert status == 502, body
    assert marker not in body and marker not in json.dumps(headers)
    assert json.loads(body)["error"]["type"] == "egress_error"
    row = request_row(proxy)
    assert (row["decision"], row["status"]) == ("error", 502)
    assert marker not in row["reason"] and "b'" not in row["reason"]
    assert marker.encode() not in proxy.config.audit_path.read_bytes()


def test_a_refused_connection_is_502_with_its_status_recorded(timed_proxy) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the connect is refused at once
    proxy = timed_proxy(port)
    status, headers, body = curl(proxy, f"https://api.test.local:{port}/v1/x")
    assert status == 502 and headers["x-egress-guard-decision"] == "error"
    assert "the upstream api.test.local" in json.loads(body)["error"]["message"]
    row = request_row(proxy)
    assert (row["decision"], row["status"]) == ("error", 502)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_an_agent_that_never_finishes_its_request_head_is_closed(faults, timed_proxy) -> None:
    fault = faults("tls-slow")
    proxy = timed_proxy(fault.port)
    slow = socket.create_connection(("127.0.0.1", proxy.port))
    slow.sendall(f"GET http://api.test.local:{fault.port}/v1/x HTTP/1.1\r\nHost: api.test.local".encode())
    tunnel = socket.create_connection(("127.0.0.1", proxy.port))
    tunnel.sendall(
        f"CONNECT api.test.local:{fault.port} HTTP/1.1\r\nHost: api.test.local:{fault.port}\r\n\r\n".encode()
    )
    assert tunnel.recv(4096).startswith(b"HTTP/1.1 200")  # and then no TLS, no request
    started = time.monotonic()
    assert _closed_within(slow, 5) and _closed_within(tunnel, 5)
    assert time.monotonic() - started < 4
    rows = [r for r in proxy.rows(expect=3) if "network.header_timeout" in (r["reason"] or "")]
    assert len(rows) == 2, proxy.rows()
    assert {r["decision"] for r in rows} == {"deny"}
    assert {r["host"] for r in rows} == {None, "api.test.local"}  # the tunnel's row names its target
    assert fault.requests == 0


def test_an_idle_kept_alive_connection_is_closed_without_a_refusal_row(faults, timed_proxy) -> None:
    fault = faults("tls-slow")
    proxy = timed_proxy(fault.port)
    ctx = proxy.client_context()
    with httpx.Client(proxy=proxy.url, verify=ctx, trust_env=False, timeout=10) as client:
        assert client.get(f"https://api.test.local:{fault.port}/v1/x").status_code == 200
        time.sleep(2.5)  # idle past the header timeout: the proxy closes the connection
        assert client.get(f"https://api.test.local:{fault.port}/v1/x").status_code == 200  # a new one
    assert not [r for r in proxy.rows() if "header_timeout" in (r["reason"] or "")]


def test_a_response_already_under_way_records_its_status_when_the_upstream_dies(faults, timed_proxy) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    fault = faults("tls-garbage", garbage=head + b"e\r\ndata: first\n\n\r\n")  # then the connection closes
    proxy = timed_proxy(fault.port)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        raw.sendall(f"CONNECT api.test.local:{fault.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        tls = proxy.client_context().wrap_socket(raw, server_hostname="api.test.local")
        tls.sendall(f"GET /v1/x HTTP/1.1\r\nHost: api.test.local:{fault.port}\r\n\r\n".encode())
        status, _, _ = read_http_response(tls)
    assert status == 200
    row = request_row(proxy)
    assert row["status"] == 200 and row["decision"] == "allow"
    assert "upstream" in row["reason"]


def test_no_real_secret_reaches_a_timeout_row(faults, timed_proxy, real_env) -> None:
    fault = faults("tls-silent")
    proxy = timed_proxy(fault.port, services=["openai"], agents={"researcher": {"services": ["openai"]}})
    fake = keys.mint(proxy.config, "researcher").env["OPENAI_API_KEY"]
    status, _, body = curl(
        proxy, f"https://api.openai.com:{fault.port}/v1/models", "-H", f"Authorization: Bearer {fake}"
    )
    assert status == 504
    assert REAL["openai"] not in body
    request_row(proxy)
    assert REAL["openai"].encode() not in proxy.config.audit_path.read_bytes()


def test_an_agent_that_gives_up_waiting_gets_a_row_that_says_so(faults, timed_proxy) -> None:
    fault = faults("full-backlog")
    proxy = timed_proxy(fault.port, Timeouts(connect=30, tls=1, response=1.5, header=1))
    with pytest.raises(AssertionError, match="curl failed"):
        curl(proxy, f"https://api.test.local:{fault.port}/v1/x", timeout=1)  # curl gives up after 1 s
    row = request_row(proxy)
    assert row["status"] is None  # it got nothing
    assert "the agent's side: client disconnected" in row["reason"] and "upstream" not in row["reason"]


def test_a_member_that_raises_in_error_does_not_cost_the_row(timed_proxy, monkeypatch) -> None:
    def broken(self, flow):
        raise RuntimeError("settle exploded")

    monkeypatch.setattr(spend_guard.SpendGuard, "error", broken)  # before the chain binds it
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    proxy = timed_proxy(port)
    status, _, _ = curl(proxy, f"https://api.test.local:{port}/v1/x")
    assert status == 502  # FailureAnswers and AuditRecorder, after SpendGuard, still ran
    row = request_row(proxy)
    assert (row["decision"], row["status"]) == ("error", 502)


def test_the_config_sets_the_timeouts(faults, tmp_path: Path, test_ca: tuple[trustme.CA, Path]) -> None:
    fault = faults("full-backlog")
    body = {
        "allow": [{"host": "api.test.local", "ports": [fault.port]}],
        "network": {
            "hosts": {"api.test.local": ["127.0.0.1"]},
            "upstream_ca": str(test_ca[1]),
            "connect_timeout": 1,
        },
    }
    proxy = RunningProxy(write_config(tmp_path, body)).start()  # EgressProxy as `up` builds it
    try:
        started = time.monotonic()
        status, _, body_text = curl(proxy, f"https://api.test.local:{fault.port}/v1/x")
        assert status == 504 and "within 1 s (network.connect_timeout)" in body_text
        assert time.monotonic() - started < 5
    finally:
        proxy.stop()
