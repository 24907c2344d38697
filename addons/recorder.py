"""AuditRecorder: last in the chain. Writes one audit row per decision and guarantees that
nothing leaves without one: a CONNECT or request that reaches this point with no decision
from the guards is refused (a guard was skipped or broken — fail closed).

A row records the status the agent actually got (egress-guard's answer, mitmproxy's error
page, or a response already under way; none if it got nothing) and never quotes bytes from
the wire. Refusals that never became a flow get rows too: a request mitmproxy's parser
refused, a connection closed for sending no request (TimeoutWatch). Every refusal row names
the agent wherever it is known (addons/attribution.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from mitmproxy import connection, http, tls

from egress_guard.addons._flow import answered, fail_closed, reject, safe_text
from egress_guard.addons._mitm import ParserRefusal
from egress_guard.addons.attribution import Attribution, Who
from egress_guard.addons.connect_guard import Tunnels
from egress_guard.addons.failures import refused_head
from egress_guard.addons.flow import recorded_path, state
from egress_guard.policy import Decision, Verdict
from egress_guard.store import AuditLog, AuditRow
from egress_guard.timeutil import now_iso

log = logging.getLogger("egress_guard")
NO_DECISION = Decision(Verdict.ERROR, "no egress-guard decision was made for this request; refused")


class AuditRecorder:
    def __init__(
        self,
        audit: AuditLog,
        *,
        query_strings: bool = False,
        attribution: Attribution | None = None,
        tunnels: Tunnels | None = None,
    ) -> None:
        self.audit = audit
        self.query_strings = query_strings
        self.attribution = attribution
        self.tunnels = tunnels if tunnels is not None else {}

    async def _attribute(self, flow: http.HTTPFlow) -> None:
        """Name the agent of a refusal no credential check named."""
        st = state(flow)
        if self.attribution is not None and st.agent is None:
            who = await self.attribution.identify(flow.request, flow.client_conn.id)
            if who is not None:
                st.agent, st.session = who

    @fail_closed("request")
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if state(flow).decision is None:
            reject(flow, NO_DECISION, 502)
        if flow.response is not None:
            await self._attribute(flow)
        self._record(flow, "connect", status=flow.response.status_code if flow.response else 200)

    @fail_closed("request")
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        if not answered(flow) and st.decision is None and not (st.deferred and not flow.request.stream):
            reject(flow, NO_DECISION, 502)  # (a deferred verdict comes with the body: PolicyGuard.request)
        if flow.response is not None or flow.error is not None:
            await self._attribute(flow)

    @fail_closed("request")
    async def request(self, flow: http.HTTPFlow) -> None:
        if not answered(flow) and state(flow).decision is None:
            reject(flow, NO_DECISION, 502)
        if flow.response is not None and state(flow).agent is None:
            await self._attribute(flow)  # refused for its body: the body may name the agent

    @fail_closed("response")
    async def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow, "request", status=flow.response.status_code if flow.response else None)
        # The agent's response is complete only once its row is committed: mitmproxy sends a
        # streamed response's end, or a buffered response whole, after this hook returns.
        st = state(flow)
        n = st.audit_seq
        if n is None:
            return
        try:
            await self.audit.durable(n)
        except Exception as exc:  # AuditUnavailable: the row stays queued, written when the DB recovers
            if st.own_response:
                return  # egress-guard's own refusal: nothing was forwarded, and the agent gets the reason
            log.error("audit row for %s could not be committed (%s): response cut off", flow.id, exc)
            self.audit.amend(n, flow.id, f"response cut off: its audit row could not be committed ({exc})")
            if flow.killable:
                flow.kill()  # the agent sees a broken response, never a complete one without a row

    def error(self, flow: http.HTTPFlow) -> None:
        try:
            self._record(flow, "request", status=self._status_after_error(flow))
        except Exception:
            log.exception("could not record the audit row for %s", flow.id)

    @staticmethod
    def _status_after_error(flow: http.HTTPFlow) -> int | None:
        """What the agent of a failed flow got: egress-guard's answer, a response already under
        way (then cut), mitmproxy's own error page; None if nothing."""
        response, st = flow.response, state(flow)
        if response is not None and (st.own_response or response.stream):
            return response.status_code
        return st.failure.status if st.failure is not None else None

    async def egress_guard_parser_refusal(self, refusal: ParserRefusal) -> None:
        """A request mitmproxy's parser refused before it became a flow (addons/_mitm.py)."""
        target = self.tunnels.get(refusal.client.id)  # before any await: the connection is closing
        who = None
        if self.attribution is not None:
            who = await self.attribution.identify(refusal.request, refusal.client.id)
        reason = refused_head(refusal.message)
        self._record_refusal(refusal.client, target, "request", reason, refusal.status, who, refusal.request)

    def idle_closed(self, client: connection.Client, reason: str) -> None:
        """A connection TimeoutWatch closed before it sent any request."""
        who = self.attribution.known(client.id) if self.attribution is not None else None
        self._record_refusal(client, self.tunnels.get(client.id), "connect", reason, None, who, None)

    def client_disconnected(self, client: connection.Client) -> None:
        if self.attribution is not None:
            self.attribution.forget(client.id)

    def _record_refusal(
        self,
        client: connection.Client,
        target: tuple[Any, int] | None,
        kind: str,
        reason: str,
        status: int | None,
        who: Who | None,
        request: http.Request | None,
    ) -> None:
        host: str | None = str(target[0]) if target else None
        port: int | None = target[1] if target else None
        path = None
        if request is not None:
            if host is None and request.host:
                host, port = safe_text(request.host, 255), request.port
            path = safe_text(request.path if self.query_strings else request.path.split("?", 1)[0], 2000)
        peer = client.peername
        row = AuditRow(
            ts=now_iso(),
            request_id=str(uuid.uuid4()),
            kind=kind,
            decision=Verdict.DENY.value,
            reason=reason,
            client=f"{peer[0]}:{peer[1]}" if peer else None,
            method=safe_text(request.method, 20) if request is not None else None,
            scheme=(request.scheme or None) if request is not None else None,
            host=host,
            port=port,
            path=path,
            status=status,
            agent=who[0] if who else None,
            session=who[1] if who else None,
        )
        self.audit.record(row)
        log.info("deny %s %s:%s status=%s reason=%r agent=%s", kind, host, port, status, reason, row.agent)

    def tls_failed_client(self, data: tls.TlsData) -> None:
        log.warning(
            "TLS handshake with agent %s for %s failed (%s): does the agent trust egress-guard's CA?",
            data.context.client.peername,
            data.context.client.sni,
            data.conn.error,
        )

    def _record(self, flow: http.HTTPFlow, kind: str, status: int | None) -> None:
        st = state(flow)
        if st.recorded:
            return
        st.recorded = True
        req = flow.request
        decision = st.decision or NO_DECISION
        reason = decision.reason
        if st.cut is not None:
            reason = f"{reason}; {st.cut}: the stream was ended"
            status = flow.response.status_code if flow.response is not None else status
        elif flow.error is not None and decision.allowed:
            failure = st.failure
            side = "ended" if failure is None else "the agent's side" if failure.client else "upstream"
            reason = f"{reason}; {side}: {safe_text(flow.error.msg)}"
        target = st.target
        host, port = (str(target[0]), target[1]) if target else (req.host[:255], req.port)
        path = None
        if kind == "request":
            path = recorded_path(flow, self.query_strings)
        req_bytes = st.request_bytes
        if req_bytes is None and kind == "request" and req.raw_content is not None:
            req_bytes = len(req.raw_content)
        resp_bytes = st.response_bytes
        if resp_bytes is None and flow.response is not None and flow.response.raw_content is not None:
            resp_bytes = len(flow.response.raw_content)
        peer = flow.client_conn.peername
        agent, session = st.agent, st.session
        if self.attribution is not None:
            if agent is not None:
                self.attribution.remember(flow.client_conn.id, agent, session)
            elif not decision.allowed:
                agent, session = self.attribution.known(flow.client_conn.id) or (None, None)
        verdict, rule = decision.verdict.value, decision.rule
        observed = st.observed
        if observed is not None and decision.allowed:  # observe mode: what the policy would have done
            verdict, rule = observed.verdict_text, observed.rule
        row = AuditRow(
            ts=now_iso(),
            request_id=flow.id,
            kind=kind,
            decision=verdict,
            reason=reason,
            rule=rule,
            client=f"{peer[0]}:{peer[1]}" if peer else None,
            method=req.method,
            scheme=req.scheme if kind == "request" else None,
            host=host,
            port=port,
            path=path,
            status=status,
            request_bytes=req_bytes,
            response_bytes=resp_bytes,
            duration_ms=round((time.time() - req.timestamp_start) * 1000, 2),
            agent=agent,
            session=session,
            service=st.service,
            credential=str(st.credential) if st.credential is not None else None,
        )
        cost = st.usage
        if cost is not None:
            row.model, row.input_tokens, row.output_tokens = cost.model, cost.input_tokens, cost.output_tokens
            row.cached_tokens, row.cost_usd = cost.cached_tokens, f"{cost.usd:f}"
        elif st.metered is not None:
            row.model = st.metered.model
        st.audit_seq = self.audit.record(row)  # for `response` to wait on
        if decision.verdict is not Verdict.ALLOW:
            log.info(
                "%s %s %s:%s%s status=%s reason=%r rule=%s id=%s",
                row.decision,
                row.method,
                host,
                port,
                path or "",
                status,
                reason,
                row.rule,
                flow.id,
            )
