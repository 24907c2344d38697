"""RequestGuard: every HTTP request, in a tunnel or as a plain proxy request.

In order: the Host header (and HTTP/2 :authority) and the TLS SNI must name the CONNECT
target (no domain fronting, no Host smuggling); the allowlist must allow method and path
(or the policy may still admit the request: PolicyGuard then decides);
the SSRF guard must vet the address. Then the request is pointed at the vetted address
(the name is kept for Host, SNI and certificate verification), so mitmproxy never
resolves the name again. `server_connect` refuses to dial any address but one this guard
vetted for a request in progress on the same agent connection (kept per connection, only
while its requests last: nothing grows with the proxy's uptime).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from mitmproxy import connection, http
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from egress_guard.addons._flow import answered, fail_closed, reject
from egress_guard.addons.connect_guard import Tunnels, aim, flow_policy
from egress_guard.addons.flow import FlowState, state
from egress_guard.credentials import Service
from egress_guard.hosts import Host, HostError, normalize_host, split_host_port
from egress_guard.policy import Decision, Destination, Verdict, decide
from egress_guard.providers import error_styles
from egress_guard.resolve import Refused, Resolver
from egress_guard.verdicts import PolicyHolder

log = logging.getLogger("egress_guard")
STREAM_REQUESTS_OVER = 1 << 20  # bodies above 1 MiB (or of unknown length) stream upstream


class ByteCounter:
    """A stream callable that passes chunks through untouched and counts them (into the flow
    state's `request_bytes`)."""

    __slots__ = ("n", "state")

    def __init__(self, st: FlowState) -> None:
        self.state, self.n = st, 0
        st.request_bytes = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.n += len(chunk)
        self.state.request_bytes = self.n
        return chunk


def _deny(flow: http.HTTPFlow, reason: str, rule: str | None = None) -> None:
    reject(flow, Decision(Verdict.DENY, reason, rule))


class RequestGuard:
    def __init__(
        self, holder: PolicyHolder, tunnels: Tunnels, resolver: Resolver, services: Iterable[Service] = ()
    ) -> None:
        self.holder = holder
        self.tunnels = tunnels
        self.resolver = resolver
        self.styles = error_styles(services)
        # client connection id -> {flow id: the (address, port) vetted for it}, while it lasts
        self.vetted: dict[str, dict[str, tuple[str, int]]] = {}

    def _target(self, flow: http.HTTPFlow) -> tuple[Host, int] | str:
        """The destination every name in the request must agree on, or why they disagree."""
        req = flow.request
        tunnel = self.tunnels.get(flow.client_conn.id)
        try:
            host, port = tunnel if tunnel else (normalize_host(req.host), req.port)
        except HostError as exc:
            return f"invalid request host: {exc}"
        where = f"the CONNECT target {host}:{port}" if tunnel else f"the request URL's {host}:{port}"
        names = req.headers.get_all("host")
        if req.is_http2 and req.authority:
            names.append(req.authority)
        if not names:
            return "the request has no Host header"
        default_port = 443 if req.scheme == "https" else 80
        for name in names:
            try:
                h, p = split_host_port(name, default_port)
                ok = normalize_host(h) == host and p == port
            except HostError:
                ok = False
            if not ok:
                return f"Host {name!r} does not match {where} (domain fronting or Host smuggling)"
        if tunnel and req.scheme == "https":
            sni = flow.client_conn.sni
            if not sni:
                return f"the TLS client sent no SNI for {where}"
            try:
                ok = normalize_host(sni) == host
            except HostError:
                ok = False
            if not ok:
                return f"TLS SNI {sni!r} does not match {where} (domain fronting)"
        return host, port

    @fail_closed("request")
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if answered(flow):
            return
        target = self._target(flow)
        if isinstance(target, str):
            _deny(flow, target)
            return
        host, port = target
        st = state(flow)
        aim(st, host, port, self.styles)
        req = flow.request
        coding = req.headers.get("transfer-encoding", "").replace(" ", "").lower()
        if coding not in ("", "chunked"):
            # mitmproxy passes other transfer codings (gzip, chunked) through undecoded: what
            # is inside could not be checked for egress-guard keys
            reject(
                flow,
                Decision(
                    Verdict.DENY,
                    f"Transfer-Encoding {coding!r} is not accepted; send the body chunked or with a length",
                ),
                400,
            )
            return
        policy = flow_policy(self.holder, st)
        decision = decide(policy.allowlist, Destination(host, port, req.method.upper(), req.path))
        if not decision.allowed and not policy.may_admit(host, port):
            reject(flow, decision)
            return
        try:
            address = await self.resolver.vet(host, port)
        except Refused as exc:
            _deny(flow, str(exc), decision.rule)
            return
        if not flow.live:
            return  # the client went away while we resolved
        # Allowed by the allowlist; or not, and PolicyGuard decides (no decision until then:
        # a flow it never judged is refused by AuditRecorder)
        st.decision = decision if decision.allowed else None
        st.deferred = not decision.allowed
        st.dialed = str(address)
        self.vetted.setdefault(flow.client_conn.id, {})[flow.id] = (str(address), port)
        # data.host, not .host: the setter would rewrite Host/:authority to the address.
        req.data.host = str(address)
        length = req.headers.get("content-length")
        if length is not None:
            big = not length.isdigit() or int(length) > STREAM_REQUESTS_OVER
        else:  # no length: a chunked HTTP/1 body, or an HTTP/2 body of unknown size
            big = "chunked" in req.headers.get("transfer-encoding", "").lower() or (
                req.is_http2 and req.method.upper() not in ("GET", "HEAD", "OPTIONS", "DELETE")
            )
        if big:
            req.stream = ByteCounter(st)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def _finished(self, flow: http.HTTPFlow) -> None:
        vetted = self.vetted.get(flow.client_conn.id)
        if vetted is not None:
            vetted.pop(flow.id, None)

    def client_disconnected(self, client: connection.Client) -> None:
        self.vetted.pop(client.id, None)

    def server_connect(self, data: ServerConnectionHookData) -> None:
        try:
            address = data.server.address
            vetted = self.vetted.get(data.client.id)
            if address is None or not vetted or (str(address[0]), address[1]) not in vetted.values():
                data.server.error = f"egress-guard: refusing to dial {address}, an address it did not vet"
                log.error("refused to dial unvetted address %s", address)
                return
            if data.client.sni:
                # Verify the upstream certificate against the name the agent used (already
                # checked equal to the CONNECT target and Host), not the dialled address.
                data.server.sni = data.client.sni
        except Exception as exc:
            data.server.error = f"egress-guard: server_connect failed ({type(exc).__name__})"
            log.exception("server_connect failed")
