"""ConnectGuard: the policy at CONNECT time.

A CONNECT to a host:port nothing admits (no allowlist rule, no `rules:` allow or escalate
rule scoped to it; `unknown_hosts: deny`; enforcing) is answered 403 right here — before any
TLS with the client and before any upstream connection (the proxy runs with lazy
connections). An admitted tunnel's target is remembered per client connection, so the
request guard can require every request inside it to name the same host; what each request
may do is decided per request (RequestGuard, PolicyGuard).
"""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy import connection, http

from egress_guard.addons._flow import answered, fail_closed, reject
from egress_guard.addons.flow import FlowState, state
from egress_guard.credentials import Service
from egress_guard.hosts import Host, HostError, normalize_host
from egress_guard.policy import Decision, Verdict
from egress_guard.providers import Styles, error_styles
from egress_guard.verdicts import Action, Policy, PolicyHolder

Tunnels = dict[str, tuple[Host, int]]  # client connection id -> CONNECT target


def flow_policy(holder: PolicyHolder, st: FlowState) -> Policy:
    """The policy this flow is judged under: the one current when a guard first looked at it
    (a reload mid-request never changes the rules it meets)."""
    if st.policy is None:
        st.policy = holder.current
    return st.policy


def aim(st: FlowState, host: Host, port: int, styles: Styles) -> None:
    """Record where the flow goes, and so which error shape its refusals take."""
    st.target = (host, port)
    st.style = styles.get(host.name)


class ConnectGuard:
    def __init__(self, holder: PolicyHolder, tunnels: Tunnels, services: Iterable[Service] = ()) -> None:
        self.holder = holder
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
        outcome = flow_policy(self.holder, st).connect(host, port)
        if outcome.action is Action.DENY and not outcome.observed:
            reject(flow, Decision(Verdict.DENY, outcome.reason, outcome.rule))
            return
        if outcome.observed:
            st.observed = outcome
        st.decision = Decision(Verdict.ALLOW, outcome.reason, outcome.rule)
        self.tunnels[flow.client_conn.id] = (host, port)

    def client_disconnected(self, client: connection.Client) -> None:
        self.tunnels.pop(client.id, None)
