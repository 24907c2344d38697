"""FlowMetrics: last in the chain; times each forwarded request and counts the upstream's
failures for the Prometheus metrics (proxy/metrics.py). An observer: it decides nothing,
changes no flow, and a failure of its own is logged, never turned into a refused or cut
request. Requests and spend are counted elsewhere, from the committed audit rows.

Times come from the flow's own timestamps and from when this addon's `request` hook runs
(last in the chain: every guard has checked the request, it is forwarded next):
- overhead: request fully read -> forwarded, plus response fully read -> released to the
  agent (scrubbing, and the wait for the row's commit: the response hooks before this one);
- upstream: forwarded -> the upstream's response headers (the upstream connection opens
  lazily, after the checks: connect and TLS are in it);
- duration: the request's first byte -> released.
"""

from __future__ import annotations

import logging
import time
import weakref

from mitmproxy import http

from egress_guard.addons._flow import answered
from egress_guard.addons.flow import state
from egress_guard.metrics import Metrics

log = logging.getLogger("egress_guard")


class FlowMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # when each flow was forwarded; a flow that is gone takes its entry with it
        self._forwarded: weakref.WeakKeyDictionary[http.HTTPFlow, float] = weakref.WeakKeyDictionary()
        self._failing = False

    def request(self, flow: http.HTTPFlow) -> None:
        if not answered(flow):
            self._forwarded[flow] = time.time()

    def response(self, flow: http.HTTPFlow) -> None:
        try:
            self._response(flow)
        except Exception:
            self._failed()

    def error(self, flow: http.HTTPFlow) -> None:
        try:
            self._error(flow)
        except Exception:
            self._failed()

    def _response(self, flow: http.HTTPFlow) -> None:
        forwarded = self._forwarded.pop(flow, None)
        st, resp = state(flow), flow.response
        if forwarded is None or resp is None or st.own_response:
            return  # refused, or answered by egress-guard: no upstream to time
        now, req = time.time(), flow.request
        before = max(0.0, forwarded - (req.timestamp_end or forwarded))
        after = max(0.0, now - (resp.timestamp_end or now))
        upstream = resp.timestamp_start - forwarded if resp.timestamp_start else None
        self.metrics.response(st.service, now - req.timestamp_start, upstream, before + after)
        if resp.status_code >= 500:
            self.metrics.upstream_error(st.service, "status_5xx")

    def _error(self, flow: http.HTTPFlow) -> None:
        if self._forwarded.pop(flow, None) is None:
            return  # never forwarded: a refusal, not the upstream's failure
        st = state(flow)
        if st.timeout is not None:  # TimeoutWatch's: "connect", "tls" or "response"
            self.metrics.upstream_error(st.service, f"{st.timeout}_timeout")
        elif st.failure is not None and not st.failure.client:
            self.metrics.upstream_error(st.service, "failed")
        # else the agent hung up, or egress-guard cut the flow (a revocation, a budget)

    def _failed(self) -> None:
        if not self._failing:  # once: it would fail the same way on every flow
            log.exception("metrics: observing a flow failed; its metrics are skipped")
        self._failing = True
