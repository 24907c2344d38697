"""SandboxGuard: the chain member for connections from `run --isolate` sandboxes (their TUN
modes, addons/sandboxes.py), first in the chain.

It names the sandbox's agent and session on every flow (and pins them for refusals, in
Attribution), answers every DNS query itself — an allow rule's name gets a per-sandbox address
from 198.18.0.0/16, AAAA and other types no data, any other name NXDOMAIN and an audit row —
turns a captured TCP connection to such an address into a tunnel to (name, port) that
RequestGuard checks Host and SNI against and pins as for a CONNECT, gives the explicit proxy
address mitmproxy's regular HTTP proxy layer (so ConnectGuard decides as usual), and refuses
everything else — TCP to any other address, UDP but DNS — with an audit row naming the agent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import uuid
from typing import Any

from mitmproxy import connection, dns, http
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.mode_specs import TunMode

from egress_guard.addons._flow import safe_text
from egress_guard.addons.connect_guard import Tunnels
from egress_guard.addons.flow import state
from egress_guard.addons.sandboxes import PROXY_ADDR, REFUSALS_PER_SECOND, Sandbox, Sandboxes
from egress_guard.hosts import HostError, normalize_host
from egress_guard.policy import Verdict
from egress_guard.store import AuditRow
from egress_guard.timeutil import now_iso
from egress_guard.verdicts import Action, PolicyHolder

log = logging.getLogger("egress_guard")

REFUSE_AFTER = 0.05  # seconds a refused captured TCP connection stays open (see client_connected)
DNS_ROW_EVERY = 2.0  # seconds: one NXDOMAIN row per name and sandbox in this window (A + AAAA)


class SandboxGuard:
    """The chain member for flows from sandboxes (first in the chain: it names them)."""

    def __init__(self, sandboxes: Sandboxes, holder: PolicyHolder, tunnels: Tunnels) -> None:
        self.sandboxes = sandboxes
        self.holder = holder
        self.tunnels = tunnels
        self.audit = sandboxes.audit

    def _covered(self, name: str) -> bool:
        try:
            host = normalize_host(name)
        except HostError:
            return False
        return host.ip is None and self.holder.current.covers_name(host)

    def _refuse(
        self, sb: Sandbox, client: connection.Client, reason: str, host: str | None, port: int | None, **kw: Any
    ) -> None:
        budget = sb.refusals
        if not budget.take(time.monotonic()):
            log.debug("deny %s:%s from sandbox %s (over the row budget): %s", host, port, sb.id, reason)
            if not budget.flushing:
                budget.flushing = True
                asyncio.get_running_loop().call_later(1.0, self._aggregate, sb)
            return
        peer = client.peername
        row = AuditRow(
            ts=now_iso(),
            request_id=str(uuid.uuid4()),
            kind="connect",
            decision=Verdict.DENY.value,
            reason=safe_text(reason, 300),
            client=f"{peer[0]}:{peer[1]}" if peer else None,
            host=safe_text(host, 255) if host else None,
            port=port,
            agent=sb.agent,
            session=sb.session,
            **kw,
        )
        self.audit.record(row)
        log.info("deny %s:%s from sandbox %s (agent %s): %s", host, port, sb.id, sb.agent, row.reason)

    def _aggregate(self, sb: Sandbox) -> None:
        """One row for the refusals a sandbox's budget left unwritten in the last second."""
        budget = sb.refusals
        n, budget.suppressed = budget.suppressed, 0
        if n == 0:
            budget.flushing = False
            return
        asyncio.get_running_loop().call_later(1.0, self._aggregate, sb)  # until a quiet second
        reason = f"{n} more refusals from sandbox {sb.id} (over {REFUSALS_PER_SECOND:g}/s: not written one by one)"
        log.info("deny: %s (agent %s)", reason, sb.agent)
        try:
            self.audit.record(
                AuditRow(
                    ts=now_iso(),
                    request_id=str(uuid.uuid4()),
                    kind="connect",
                    decision=Verdict.DENY.value,
                    reason=reason,
                    client=sb.addr,
                    agent=sb.agent,
                    session=sb.session,
                )
            )
        except Exception as exc:  # the audit log closed (egress-guard stopping)
            log.warning("cannot record %s: %r", reason, exc)

    # --- connections -----------------------------------------------------------------------

    async def client_connected(self, client: connection.Client) -> None:
        sb = self.sandboxes.of(client)
        if sb is None:
            if isinstance(client.proxy_mode, TunMode):  # a TUN no sandbox owns (any more): fail closed
                client.error = "egress-guard: this TUN belongs to no open sandbox"
            return
        if sb.agent is not None:
            self.sandboxes.attribution.pin(client.id, (sb.agent, sb.session))
        if sb.killed or sb.closed:
            refusal: str | None = "the sandbox was killed or closed"
        else:
            refusal = self._admit(sb, client)
        if refusal is not None and client.transport_protocol == "tcp":
            # mitmproxy_rs hands over a TCP stream before the handshake is done; closed at
            # once, the FIN was sometimes lost and the sandbox's connect hung (measured): let
            # the handshake finish first
            await asyncio.sleep(REFUSE_AFTER)
        if refusal is not None:
            client.error = f"egress-guard: {refusal}"

    def _admit(self, sb: Sandbox, client: connection.Client) -> str | None:
        """Why a sandbox's connection is refused (recorded), or None: it goes on."""
        ip, port = str(client.sockname[0]), int(client.sockname[1])
        if client.transport_protocol == "udp":
            if port == 53:
                return None  # DNS, answered by dns_request
            reason = f"UDP to {ip}:{port} refused: a sandbox may send only DNS"
            self._refuse(sb, client, reason, ip, port)
            return reason
        if (ip, port) == PROXY_ADDR or port == 53:
            return None  # the explicit proxy (next_layer); DNS over TCP, answered by dns_request
        name = sb.name_by_fake.get(ip)
        if name is None:
            reason = (
                f"captured TCP to {ip}:{port} refused: not an address egress-guard's DNS handed out "
                "(hard-coded addresses and other resolvers are not reachable from a sandbox)"
            )
            self._refuse(sb, client, reason, ip, port)
            return reason
        host = normalize_host(name)
        outcome = self.holder.current.connect(host, port)
        if outcome.action is Action.DENY and not outcome.observed:
            self._refuse(sb, client, f"captured TCP: {outcome.reason}", name, port, rule=outcome.rule)
            return outcome.reason
        self.tunnels[client.id] = (host, port)  # RequestGuard checks Host and SNI against it
        return None

    def client_disconnected(self, client: connection.Client) -> None:
        self.sandboxes.attribution.unpin(client.id)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """The explicit proxy address inside a sandbox speaks HTTP proxy (CONNECT and absolute
        URLs), as the regular listener does, and port 53 speaks DNS only, never TLS or HTTP
        (the chain runs before mitmproxy's NextLayer)."""
        context = nextlayer.context
        if nextlayer.layer is not None:
            return
        if context.client.sockname[1] == 53 and self.sandboxes.of(context.client) is not None:
            # port 53 was admitted as DNS (_admit): it speaks DNS, whatever its first bytes look like
            if not any(isinstance(lay, layers.DNSLayer) for lay in context.layers):
                nextlayer.layer = layers.DNSLayer(context)
            return
        if len(context.layers) != 1 or context.client.transport_protocol != "tcp":
            return
        if self.sandboxes.of(context.client) is None or tuple(context.client.sockname) != PROXY_ADDR:
            return
        context.server.address = None
        nextlayer.layer = layers.HttpLayer(context, HTTPMode.regular)

    # --- flows: the identity ---------------------------------------------------------------

    def _name(self, flow: http.HTTPFlow) -> None:
        sb = self.sandboxes.of(flow.client_conn)
        if sb is not None:
            st = state(flow)
            st.agent, st.session = sb.agent, sb.session

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._name(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._name(flow)

    # --- DNS -------------------------------------------------------------------------------

    def dns_request(self, flow: dns.DNSFlow) -> None:
        """Answer every query (an unanswered one would go to wherever the sandbox sent it)."""
        from mitmproxy.net.dns import response_codes, types

        try:
            sb = self.sandboxes.of(flow.client_conn)
            question = flow.request.question
            if sb is None or sb.killed or sb.closed or question is None:
                flow.response = flow.request.fail(response_codes.REFUSED)
                return
            name = question.name.lower().rstrip(".")
            if self._covered(name):
                fake = sb.fake_ip(name) if question.type == types.A else None
                if question.type == types.A and fake is None:
                    flow.response = flow.request.fail(response_codes.SERVFAIL)
                    return
                answers = [dns.ResourceRecord.A(question.name, ipaddress.IPv4Address(fake), ttl=300)] if fake else []
                flow.response = flow.request.succeed(answers)  # AAAA, HTTPS, ...: no data
                return
            flow.response = flow.request.fail(response_codes.NXDOMAIN)
            now = time.monotonic()
            if now - sb.denied_names.get(name, -1e9) >= DNS_ROW_EVERY:
                if len(sb.denied_names) > 4096:
                    sb.denied_names.clear()
                sb.denied_names[name] = now
                self._refuse(
                    sb,
                    flow.client_conn,
                    f"dns: no allow rule covers {safe_text(name, 120)!r}: answered NXDOMAIN",
                    name,
                    53,
                    scheme="dns",
                    method=types.to_str(question.type)[:20],
                )
        finally:
            if flow.response is None:
                flow.response = flow.request.fail(response_codes.REFUSED)
