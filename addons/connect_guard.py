"""ConnectGuard: the allowlist at CONNECT time.

A CONNECT to a host:port no rule allows is answered 403 right here — before any TLS with
the client and before any upstream connection (the proxy runs with lazy connections). An
allowed tunnel's target is remembered per client connection, so the request guard can
require every request inside it to name the same host.
"""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy import connection, http

from egress_guard.addons._flow import answered, fail_closed, reject
from egress_guard.addons.flow import FlowState, state
from egress_guard.credentials import Service
from egress_guard.hosts import Host, HostError, normalize_host
from egress_guard.policy import Decision, Destination, Rule, Verdict, decide
from egress_guard.providers import Styles, error_styles

Tunnels = dict[str, tuple[Host, int]]  # client connection id -> CONNECT target


def aim(st: FlowState, host: Host, port: int, styles: Styles) -> None:
    """Record where the flow goes, and so which error shape its refusals take."""
    st.target = (host, port)
    st.style = styles.get(host.name)


class ConnectGuard:
    def __init__(self, rules: tuple[Rule, ...], tunnels: Tunnels, services: Iterable[Service] = ()) -> None:
        self.rules = rules
        self.tunnels = tunnels
        self.styles = error_styles(services)

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
        st = state(flow)
        aim(st, host, port, self.styles)
        decision = decide(self.rules, Destination(host, port))
        if not decision.allowed:
            reject(flow, decision)
            return
        st.decision = decision
        self.tunnels[flow.client_conn.id] = (host, port)

    def client_disconnected(self, client: connection.Client) -> None:
        self.tunnels.pop(client.id, None)
