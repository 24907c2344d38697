"""ConnectGuard: the allowlist at CONNECT time.

A CONNECT to a host:port no rule allows is answered 403 right here — before any TLS with
the client and before any upstream connection (the proxy runs with lazy connections). An
allowed tunnel's target is remembered per client connection, so the request guard can
require every request inside it to name the same host.
"""

from __future__ import annotations

from mitmproxy import connection, http

from egress_guard.addons._flow import DECISION, TARGET, answered, fail_closed, reject
from egress_guard.hosts import Host, HostError, normalize_host
from egress_guard.policy import Decision, Destination, Rule, Verdict, decide

Tunnels = dict[str, tuple[Host, int]]  # client connection id -> CONNECT target


class ConnectGuard:
    def __init__(self, rules: tuple[Rule, ...], tunnels: Tunnels) -> None:
        self.rules = rules
        self.tunnels = tunnels

    @fail_closed("request")
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if answered(flow):
            return
        try:
            host = normalize_host(flow.request.host)
        except HostError as exc:
            reject(flow, Decision(Verdict.DENY, f"invalid CONNECT target: {exc}"))
            return
        port = flow.request.port
        flow.metadata[TARGET] = (host, port)
        decision = decide(self.rules, Destination(host, port))
        if not decision.allowed:
            reject(flow, decision)
            return
        flow.metadata[DECISION] = decision
        self.tunnels[flow.client_conn.id] = (host, port)

    def client_disconnected(self, client: connection.Client) -> None:
        self.tunnels.pop(client.id, None)
