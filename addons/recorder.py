"""AuditRecorder: last in the chain. Writes one audit row per decision and guarantees that
nothing leaves without one: a CONNECT or request that reaches this point with no decision
from the guards is refused (a guard was skipped or broken — fail closed)."""

from __future__ import annotations

import logging
import time

from mitmproxy import http, tls

from egress_guard.addons._flow import (
    AGENT,
    CREDENTIAL,
    DECISION,
    REQUEST_BYTES,
    RESPONSE_BYTES,
    SERVICE,
    SESSION,
    TARGET,
    answered,
    fail_closed,
    reject,
)
from egress_guard.addons.spend_guard import CUT, METERED, USAGE
from egress_guard.audit import AuditLog, AuditRow, now_iso
from egress_guard.policy import Decision, Verdict

log = logging.getLogger("egress_guard")
RECORDED = "egress_guard.recorded"
NO_DECISION = Decision(Verdict.ERROR, "no egress-guard decision was made for this request; refused")


class AuditRecorder:
    def __init__(self, audit: AuditLog, *, query_strings: bool = False) -> None:
        self.audit = audit
        self.query_strings = query_strings

    @fail_closed("request")
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if DECISION not in flow.metadata:
            reject(flow, NO_DECISION, 502)
        self._record(flow, "connect", status=flow.response.status_code if flow.response else 200)

    @fail_closed("request")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not answered(flow) and DECISION not in flow.metadata:
            reject(flow, NO_DECISION, 502)

    @fail_closed("response")
    async def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow, "request", status=flow.response.status_code if flow.response else None)
        # The agent's response is complete only once its row is committed: mitmproxy sends a
        # streamed response's end, or a buffered response whole, after this hook returns.
        n = flow.metadata.get("egress_guard.audit_seq")
        if n is None:
            return
        try:
            await self.audit.durable(n)
        except Exception as exc:  # AuditUnavailable: the row stays queued, written when the DB recovers
            from egress_guard.addons._flow import OWN_RESPONSE

            if flow.metadata.get(OWN_RESPONSE):
                return  # egress-guard's own refusal: nothing was forwarded, and the agent gets the reason
            log.error("audit row for %s could not be committed (%s): response cut off", flow.id, exc)
            self.audit.amend(n, flow.id, f"response cut off: its audit row could not be committed ({exc})")
            if flow.killable:
                flow.kill()  # the agent sees a broken response, never a complete one without a row

    def error(self, flow: http.HTTPFlow) -> None:
        try:
            self._record(flow, "request", status=None)
        except Exception:
            log.exception("could not record the audit row for %s", flow.id)

    def tls_failed_client(self, data: tls.TlsData) -> None:
        log.warning(
            "TLS handshake with agent %s for %s failed (%s): does the agent trust egress-guard's CA?",
            data.context.client.peername,
            data.context.client.sni,
            data.conn.error,
        )

    def _record(self, flow: http.HTTPFlow, kind: str, status: int | None) -> None:
        if flow.metadata.get(RECORDED):
            return
        flow.metadata[RECORDED] = True
        req = flow.request
        decision: Decision = flow.metadata.get(DECISION) or NO_DECISION
        reason = decision.reason
        if CUT in flow.metadata:
            reason = f"{reason}; {flow.metadata[CUT]}: the stream was ended"
            status = flow.response.status_code if flow.response is not None else status
        elif flow.error is not None and decision.allowed:
            reason = f"{reason}; upstream: {flow.error.msg}"
        target = flow.metadata.get(TARGET)
        host, port = (str(target[0]), target[1]) if target else (req.host[:255], req.port)
        path = None
        if kind == "request":
            path = req.path if self.query_strings else req.path.split("?", 1)[0]
        req_bytes = flow.metadata.get(REQUEST_BYTES)
        if req_bytes is None and kind == "request" and req.raw_content is not None:
            req_bytes = len(req.raw_content)
        resp_bytes = flow.metadata.get(RESPONSE_BYTES)
        if resp_bytes is None and flow.response is not None and flow.response.raw_content is not None:
            resp_bytes = len(flow.response.raw_content)
        peer = flow.client_conn.peername
        row = AuditRow(
            ts=now_iso(),
            request_id=flow.id,
            kind=kind,
            decision=decision.verdict.value,
            reason=reason,
            rule=decision.rule,
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
            agent=flow.metadata.get(AGENT),
            session=flow.metadata.get(SESSION),
            service=flow.metadata.get(SERVICE),
            credential=str(flow.metadata[CREDENTIAL]) if CREDENTIAL in flow.metadata else None,
        )
        cost = flow.metadata.get(USAGE)
        if cost is not None:
            row.model, row.input_tokens, row.output_tokens = cost.model, cost.input_tokens, cost.output_tokens
            row.cached_tokens, row.cost_usd = cost.cached_tokens, f"{cost.usd:f}"
        elif (metered := flow.metadata.get(METERED)) is not None:
            row.model = metered.model
        flow.metadata["egress_guard.audit_seq"] = self.audit.record(row)  # for `response` to wait on
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
