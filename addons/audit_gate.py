"""AuditGate: first in the chain. No audit row, no traffic: while the audit log cannot be
written, every new CONNECT and request is refused with 503 and the reason."""

from __future__ import annotations

from mitmproxy import http

from egress_guard.addons._flow import answered, fail_closed, reject
from egress_guard.policy import Decision, Verdict
from egress_guard.store import AuditLog


class AuditGate:
    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def _check(self, flow: http.HTTPFlow) -> None:
        if not answered(flow) and not self.audit.healthy:
            reject(flow, Decision(Verdict.ERROR, self.audit.unhealthy_reason), 503)

    @fail_closed("request")
    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._check(flow)

    @fail_closed("request")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._check(flow)
