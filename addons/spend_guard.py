"""SpendGuard: rate limits, model allowlists and USD budgets for identified agents, priced
from the real token usage of each response.

Before forwarding (`request`, body buffered): the model must be allowed, and the request's
worst-case cost is reserved against every budget and rate limit that applies — or it is
refused with 429 (provider error shape, `Retry-After`). What a call is, what it may cost
and where its usage is come from the service's API module (egress_guard.providers); a
request that API rewrites to report its usage (an OpenAI chat stream gets
`stream_options.include_usage`) has what the rewrite adds taken out of the answer. After the
response (JSON, or SSE tapped as it passes without delay, providers/stream.py) the
reservation is settled to the real cost; on error it is released, or billed in full if the
provider may already have charged (docs/spend.md, "What is billed"). A metered call's
reservation is committed to the audit log (an intent) before the call is forwarded: if the
proxy stops before the call's row is written, the next start bills the reservation. With
`spend.on_overrun: cut`, an SSE stream whose running cost crosses a budget is ended with the
provider's own closing events, and its upstream connection is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from mitmproxy import http

from egress_guard.addons._flow import answered, fail_closed, reject
from egress_guard.addons.bodies import body_stream
from egress_guard.addons.flow import recorded_path, state
from egress_guard.config import Config
from egress_guard.ledger import SCOPES, Hold, Ledger, Refusal
from egress_guard.policy import Decision, Verdict
from egress_guard.pricing import Cost, Unpriced
from egress_guard.providers import Metered, get, meter_of
from egress_guard.providers.stream import Overrun, RunningCost, StreamTap
from egress_guard.shared_ledger import SharedLedger
from egress_guard.spend import allowed_models, model_allowed
from egress_guard.store import AuditLog, AuditUnavailable, Intent
from egress_guard.timeutil import now_iso

log = logging.getLogger("egress_guard")


class SpendGuard:
    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        cut_upstream: Callable[[http.HTTPFlow], object] | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.agents = config.agents
        self.settings = config.spend
        self.ledger = ledger
        self.cut_upstream = cut_upstream  # aborts a flow's upstream connection
        # service -> the API that meters its calls, and the genai-prices provider that prices them
        self.meters = {
            s.name: (get(how.api), how.provider) for s in config.services if (how := meter_of(s.name, s.meter))
        }
        self.audit = audit  # commits each metered call's reservation (intent) before it is forwarded
        self.audit_path = config.audit_path
        self.query_strings = config.audit_query_strings  # the intent records the path as the audit row will

    def _refuse(self, flow: http.HTTPFlow, reason: str, status: int, retry_after: int | None = None) -> None:
        reject(flow, Decision(Verdict.DENY, reason), status)
        if retry_after is not None and flow.response is not None:
            flow.response.headers["Retry-After"] = str(retry_after)

    @fail_closed("request")
    async def request(self, flow: http.HTTPFlow) -> None:
        if answered(flow):
            return
        st = state(flow)
        agent_name, service = st.agent, st.service
        if agent_name is None or service is None:
            return  # no agent identified: nothing to account to
        agent = self.agents.get(agent_name)
        if agent is None:
            self._refuse(flow, f"agent {agent_name!r} is not in the config", 403)
            return
        usd, tokens, m = Decimal(0), 0, None
        api, price_as = self.meters.get(service, (None, ""))
        # only a POST is a call that costs (a GET of /v1/chat/completions lists stored ones)
        if api is not None and flow.request.method == "POST" and api.meter(flow.request.path, None, 0):
            if flow.request.stream:
                self._refuse(
                    flow,
                    "the request body is too large or of unknown length to meter; send it with a "
                    "Content-Length of at most 1 MiB",
                    413,
                )
                return
            raw = flow.request.get_content(strict=False) or b""
            body: Any = None
            if raw[:1] in (b"{", b"["):
                with contextlib.suppress(ValueError):
                    body = json.loads(raw)
            m = api.meter(flow.request.path, body, len(raw))
            if m is not None:
                m = m.priced_as(price_as)
                session = st.session or ""
                if not model_allowed(agent.limits, service, m.model, session):
                    allowed = ", ".join(allowed_models(agent.limits, service, session) or ())
                    self._refuse(
                        flow,
                        f"model {m.model!r} is not allowed for agent {agent_name} on {service} (allowed: {allowed})",
                        403,
                    )
                    return
                try:
                    usd, tokens = api.reservation(self.settings, m)
                except Unpriced as exc:
                    self._refuse(flow, str(exc), 403)
                    return
                if api.rewrite(m, body):  # e.g. asks an OpenAI chat stream for its usage
                    flow.request.content = json.dumps(body).encode()
                    st.drop_usage_chunk = True
                st.metered = m
        try:
            if isinstance(self.ledger, SharedLedger):  # a fleet: admitted in the store, with its intent
                hold = await self.ledger.reserve(
                    agent.limits, agent_name, st.session or "", usd, tokens, self._intent_of(flow, m, service)
                )
            else:
                hold = self.ledger.admit(agent.limits, agent_name, st.session or "", usd, tokens)
        except Refusal as refusal:
            self._refuse(flow, refusal.reason, refusal.status, refusal.retry_after)
            return
        st.hold = hold
        if hold.shared and self.audit is not None:
            self.audit.track_intent(flow.id)  # committed with the reservation; the call's row removes it
        elif m is not None:
            await self._intent(flow, hold, m, service)

    def _intent_of(self, flow: http.HTTPFlow, m: Metered | None, service: str) -> Intent:
        """The call's intent as the shared ledger commits it (it fills in agent, session, day
        and the reservation)."""
        target = state(flow).target
        host, port = (str(target[0]), target[1]) if target else (flow.request.host, flow.request.port)
        return Intent(
            request_id=flow.id,
            ts=now_iso(),
            agent="",
            session=None,
            service=service,
            model=m.model if m is not None else None,
            day="",
            reserved_usd="0",
            method=flow.request.method,
            host=host,
            port=port,
            path=recorded_path(flow, self.query_strings),
        )

    async def _intent(self, flow: http.HTTPFlow, hold: Hold, m: Metered, service: str) -> None:
        """Commit the call's reservation before it is forwarded. If the proxy stops before the
        call's own row is written, the next start bills the reservation (README, "What is
        billed"); if it cannot be committed, the call is refused: never charged unrecorded."""
        audit = self.audit
        target = state(flow).target
        host, port = (str(target[0]), target[1]) if target else (flow.request.host, flow.request.port)
        try:
            if audit is None:
                raise AuditUnavailable(f"no audit log {self.audit_path} was given to SpendGuard")
            await audit.intent(
                Intent(
                    request_id=flow.id,
                    ts=now_iso(),
                    agent=hold.agent,
                    session=hold.session,
                    service=service,
                    model=m.model,
                    day=hold.day,
                    reserved_usd=f"{hold.usd:f}",
                    method=flow.request.method,
                    host=host,
                    port=port,
                    path=recorded_path(flow, self.query_strings),
                )
            )
        except AuditUnavailable as exc:
            reason = f"the call's reservation could not be recorded, so it was not forwarded: {exc}"
            reject(flow, Decision(Verdict.ERROR, reason), 503)

    @fail_closed("response")
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        m = st.metered
        response = flow.response
        if m is None or response is None or not response.stream or response.status_code >= 400:
            return
        sse = "event-stream" in response.headers.get("content-type", "")
        overrun = self._overrun(flow, m) if sse and self.settings.on_overrun == "cut" else None
        if overrun is not None and not flow.request.is_http2:
            # The stream may be ended before the upstream ends it: the agent's response is
            # then delimited by the connection's close (HTTP/1.1 without chunked framing),
            # which is a clean end, rather than a chunked body cut short.
            response.headers.pop("transfer-encoding", None)
            response.headers.pop("content-length", None)
            response.headers["connection"] = "close"
        tap = StreamTap(m, sse, st.drop_usage_chunk, lambda obj: self._observed(flow, m, obj), overrun)
        body_stream(flow, response).add(tap, first=True)  # it reads what the upstream sent

    def _overrun(self, flow: http.HTTPFlow, m: Metered) -> Overrun | None:
        st = state(flow)
        hold = st.hold
        agent = self.agents.get(st.agent or "")
        if hold is None or agent is None:
            return None
        limits = agent.limits
        if all(self.ledger.limit(limits, hold.agent, scope, hold.session) is None for scope in SCOPES):
            return None  # no budget to cross: the stream keeps its usual framing

        def cut(reason: str, cost: Cost) -> None:
            st.usage = cost
            st.cut = reason
            log.warning("%s's %s stream %s: %s; ending it", hold.agent, m.model, flow.id, reason)
            if flow.server_conn.alpn == b"h2":
                # other streams may share this upstream connection: leave it to finish; what it
                # reports at the end is billed
                log.warning("%s: HTTP/2 upstream, not cut; the rest of the stream is dropped", flow.id)
            elif self.cut_upstream is not None:
                # after the closing events are on their way to the agent
                asyncio.get_running_loop().call_soon(self.cut_upstream, flow)

        return Overrun(
            RunningCost(self.settings, m),
            get(m.api).stream_end(m.flavor),
            lambda usd: self.ledger.overrun(limits, hold, usd),
            cut,
        )

    def _observed(self, flow: http.HTTPFlow, m: Metered, obj: dict | None) -> None:
        cost = get(m.api).cost(self.settings, m, obj) if obj else None
        if cost is not None:
            state(flow).usage = cost

    @fail_closed("response")
    def response(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        hold = st.hold
        if hold is None:
            return
        m = st.metered
        status = flow.response.status_code if flow.response is not None else 0
        if (
            m is not None
            and st.usage is None
            and status < 400
            and flow.response is not None
            and not flow.response.stream
        ):
            # A buffered response (small, or compressed): read it as the tap reads a stream —
            # JSON, a JSON array (Gemini), or SSE, whose usage-only chunk egress-guard asked
            # for is taken out here too.
            response = flow.response
            content = response.get_content(strict=False) or b""
            sse = "event-stream" in response.headers.get("content-type", "")
            tap = StreamTap(m, sse, st.drop_usage_chunk, lambda obj: self._observed(flow, m, obj))
            out = tap(content, True)
            if sse and out != content:
                response.content = out
        cost = st.usage
        if m is None or status >= 400:
            self.ledger.settle(hold, Decimal(0), 0)  # unmetered, or the provider refused: nothing billed
        elif cost is not None:
            self.ledger.settle(hold, cost.usd, cost.input_tokens + cost.output_tokens)
        else:  # a success without usage: bill the worst case rather than nothing
            log.warning("no usage in %s's %s response for %s; billing the reservation", m.api, m.model, flow.id)
            self.ledger.settle(hold, hold.usd, hold.tokens)
            st.usage = Cost(hold.usd, 0, 0, 0, m.model)

    def error(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        hold = st.hold
        if hold is None or hold.settled:
            return
        cost = st.usage
        if cost is not None:
            self.ledger.settle(hold, cost.usd, cost.input_tokens + cost.output_tokens)
        elif st.metered is not None and (flow.response is not None or _reached_upstream(flow)):
            # the call reached the provider and the exchange broke off (client gone, upstream
            # timeout, stream cut): the provider may have charged for it, so it is billed at the
            # reservation, as it would be had the proxy stopped at that moment
            self.ledger.settle(hold, hold.usd, hold.tokens)
            st.usage = Cost(hold.usd, 0, 0, 0, st.metered.model)
        else:
            self.ledger.settle(hold, Decimal(0), 0)  # never reached the provider: released


def _reached_upstream(flow: http.HTTPFlow) -> bool:
    """Whether the request may have reached the provider: its upstream connection was up."""
    server = flow.server_conn
    return server.timestamp_tls_setup is not None or (not server.tls and server.timestamp_tcp_setup is not None)
