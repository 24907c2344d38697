"""TimeoutWatch: bounds every wait whose end egress-guard could otherwise not see.

Upstream, per attempt: the TCP connect (`connect`), the TLS handshake (`tls`), and the
response headers after the agent's request was received (`response`). A wait that runs out
aborts that upstream attempt and marks the flow (`TIMEOUT`); FailureAnswers then answers it
504 in the provider's error shape, naming the setting. Agent side (`header`): a connection
with no request in progress must complete a request head in time — after connecting, after
CONNECT, between requests on a kept-alive connection — or it is closed (slowloris, and idle
keep-alive connections, as web servers do); a connection closed without ever completing a
request is recorded.

Never aborts what it did not time: a connect still waiting for one of mitmproxy's five
connection slots per address is looked at again later, not cancelled. Cheap on the hot path:
a request only writes and removes two deadlines in dicts; one timer (`_tick`, running only
while something is watched) finds the ones that passed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mitmproxy import connection, http, tls
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from egress_guard.addons.flow import state
from egress_guard.addons.killswitch import cut_client

log = logging.getLogger("egress_guard")
RECHECK = 1.0  # seconds: look again at a wait that is not ours to end yet


@dataclass(frozen=True)
class Timeouts:
    """Seconds; the defaults are the config's (network.*_timeout). They fit LLM APIs: a
    connect and a handshake take well under a second when the provider is up; a non-streamed
    completion may think for minutes before its headers (the OpenAI and Anthropic SDKs wait
    up to 600 s); an agent sends a request head in milliseconds, and a kept-alive connection
    idle longer than `header` is closed, as web servers do (clients open a new one)."""

    connect: float = 10.0
    tls: float = 10.0
    response: float = 600.0
    header: float = 30.0

    @classmethod
    def from_config(cls, config: Any) -> Timeouts:
        """From `network.connect_timeout`, `tls_timeout`, `response_timeout`, `header_timeout`
        (flat on Config, like idle_timeout), each defaulting when the config has none."""
        d = cls()
        return cls(
            float(getattr(config, "connect_timeout", d.connect)),
            float(getattr(config, "tls_timeout", d.tls)),
            float(getattr(config, "response_timeout", d.response)),
            float(getattr(config, "header_timeout", d.header)),
        )

    def reason(self, kind: str, host: str, port: int) -> str:
        where = f"{host}:{port}"
        if kind == "connect":
            return f"no TCP connection to {where} within {self.connect:g} s (network.connect_timeout)"
        if kind == "tls":
            return f"the TLS handshake with {where} did not finish within {self.tls:g} s (network.tls_timeout)"
        return f"{where} sent no response headers within {self.response:g} s (network.response_timeout)"


class TimeoutWatch:
    def __init__(
        self, timeouts: Timeouts, proxyserver: Any, on_idle_close: Callable[[connection.Client, str], None]
    ) -> None:
        self.t = timeouts
        self.proxyserver = proxyserver
        self.on_idle_close = on_idle_close  # records a connection closed before any request
        self._attempts: dict[str, asyncio.TimerHandle] = {}  # server connection id -> connect/TLS timer
        self._expired: dict[str, dict[tuple[str, int], str]] = {}  # client id -> address -> "connect"/"tls"
        self._waiting: dict[str, tuple[float, http.HTTPFlow]] = {}  # flow id -> response headers deadline
        self._live: dict[str, set[str]] = {}  # client id -> its flows in progress
        self._idle: dict[str, float] = {}  # client id -> deadline for its next request head
        self._requested: set[str] = set()  # client ids that completed a request head
        self.tick = min(1.0, timeouts.response / 4, timeouts.header / 4)
        self._ticking = False

    def _watch(self) -> None:
        if not self._ticking:
            self._ticking = True
            asyncio.get_running_loop().call_later(self.tick, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        for flow_id, (deadline, flow) in list(self._waiting.items()):
            if deadline <= now:
                del self._waiting[flow_id]
                self._response_expired(flow)
        for client_id, deadline in list(self._idle.items()):
            if deadline <= now:
                del self._idle[client_id]
                self._idle_expired(client_id)
        self._ticking = False
        if self._waiting or self._idle:
            self._watch()

    # --- upstream: connect and TLS ------------------------------------------------------

    def _io(self, client_id: str, conn: connection.Connection) -> Any:
        handler = self.proxyserver.connections.get(client_id)
        return handler.transports.get(conn) if handler is not None else None

    def _arm(self, key: str, table: dict[str, asyncio.TimerHandle], delay: float, fn: Callable, *args: Any) -> None:
        old = table.pop(key, None)
        if old is not None:
            old.cancel()
        table[key] = asyncio.get_running_loop().call_later(delay, fn, *args)

    def _disarm(self, key: str, table: dict[str, asyncio.TimerHandle]) -> None:
        timer = table.pop(key, None)
        if timer is not None:
            timer.cancel()

    def server_connect(self, data: ServerConnectionHookData) -> None:
        if data.server.error or data.server.address is None:
            return  # refused (an unvetted address): nothing will be dialled
        self._expired.get(data.client.id, {}).pop(data.server.address, None)  # a new attempt
        self._arm(data.server.id, self._attempts, self.t.connect, self._connect_expired, data.client.id, data.server)

    def _connect_expired(self, client_id: str, server: connection.Server) -> None:
        self._attempts.pop(server.id, None)
        io = self._io(client_id, server)
        if io is None or io.handler is None or server.connected:
            return
        if server.timestamp_start is None:  # still waiting for a connection slot, not dialling yet
            self._arm(server.id, self._attempts, RECHECK, self._connect_expired, client_id, server)
            return
        self._mark(client_id, server, "connect")
        io.handler.cancel("egress-guard: connect timeout")  # mitmproxy fails the attempt and its flows

    def server_connected(self, data: ServerConnectionHookData) -> None:
        self._disarm(data.server.id, self._attempts)
        if data.server.tls:
            self._arm(data.server.id, self._attempts, self.t.tls, self._tls_expired, data.client.id, data.server)

    def _tls_expired(self, client_id: str, server: connection.Server) -> None:
        self._attempts.pop(server.id, None)
        io = self._io(client_id, server)
        transport = getattr(io.writer, "transport", None) if io is not None else None
        if transport is None or server.tls_established:
            return
        self._mark(client_id, server, "tls")
        transport.abort()  # the handshake fails ("connection closed"); _expired says why

    def _mark(self, client_id: str, server: connection.Server, kind: str) -> None:
        assert server.address is not None
        self._expired.setdefault(client_id, {})[server.address] = kind
        log.warning("upstream %s to %s timed out", kind, server.address)

    def tls_established_server(self, data: tls.TlsData) -> None:
        self._disarm(data.conn.id, self._attempts)

    def tls_failed_server(self, data: tls.TlsData) -> None:
        self._disarm(data.conn.id, self._attempts)

    def server_connect_error(self, data: ServerConnectionHookData) -> None:
        self._disarm(data.server.id, self._attempts)

    def server_disconnected(self, data: ServerConnectionHookData) -> None:
        self._disarm(data.server.id, self._attempts)

    # --- upstream: response headers -----------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and flow.error is None and flow.live:
            self._waiting[flow.id] = (time.monotonic() + self.t.response, flow)
            self._watch()

    def _response_expired(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None or not flow.live:
            return
        io = self._io(flow.client_conn.id, flow.server_conn)
        transport = getattr(io.writer, "transport", None) if io is not None else None
        if transport is None or not flow.server_conn.connected:
            # still connecting: the connect and TLS timeouts watch that; look again later
            self._waiting[flow.id] = (time.monotonic() + RECHECK, flow)
            return
        state(flow).timeout = "response"
        log.warning(
            "no response headers for %s within %g s: aborting its upstream connection", flow.id, self.t.response
        )
        # An HTTP/2 upstream connection carries the agent connection's other requests too:
        # they fail with it (mitmproxy cannot reset one stream from outside).
        transport.abort()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)

    # --- the agent's side: request heads ------------------------------------------------

    def _await_head(self, client_id: str) -> None:
        self._idle[client_id] = time.monotonic() + self.t.header
        self._watch()

    def client_connected(self, client: connection.Client) -> None:
        self._await_head(client.id)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # the CONNECT head is in; the tunnel's first request must follow in time
        if not self._live.get(flow.client_conn.id):
            self._await_head(flow.client_conn.id)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        cid = flow.client_conn.id
        self._idle.pop(cid, None)
        live = self._live.get(cid)
        if live is None:
            live = self._live[cid] = set()
            self._requested.add(cid)
        live.add(flow.id)

    def response(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)
        if flow.websocket is None:  # a WebSocket is in progress until websocket_end
            self._done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._waiting.pop(flow.id, None)
        st = state(flow)
        if st.timeout is None:
            expired = self._expired.get(flow.client_conn.id)
            kind = expired.get((flow.request.host, flow.request.port)) if expired else None
            if kind is not None:
                st.timeout = kind
        self._done(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def _done(self, flow: http.HTTPFlow) -> None:
        cid = flow.client_conn.id
        live = self._live.get(cid)
        if live is not None:
            live.discard(flow.id)
            if live:
                return
        if flow.client_conn.connected:
            self._await_head(cid)

    def _idle_expired(self, client_id: str) -> None:
        if self._live.get(client_id):
            return
        handler = self.proxyserver.connections.get(client_id)
        if handler is None:
            return
        if client_id not in self._requested:
            self.on_idle_close(
                handler.client,
                f"the agent sent no complete request within {self.t.header:g} s (network.header_timeout); "
                "connection closed",
            )
        log.debug("closing agent connection %s: no request within %g s", handler.client.peername, self.t.header)
        cut_client(self.proxyserver, client_id)

    def client_disconnected(self, client: connection.Client) -> None:
        self._idle.pop(client.id, None)
        self._live.pop(client.id, None)
        self._expired.pop(client.id, None)
        self._requested.discard(client.id)
