"""SpendGuard: rate limits, model allowlists and USD budgets for identified agents, priced
from the real token usage of each response.

Before forwarding (`request`, body buffered): the model must be allowed, and the request's
worst-case cost is reserved against every budget and rate limit that applies — or it is
refused with 429 (provider error shape, `Retry-After`). OpenAI chat streams that did not ask
for usage get `stream_options.include_usage` on the way up, and the extra usage-only chunk is
dropped on the way back. After the response (JSON, or SSE tapped as it passes without delay)
the reservation is settled to the real cost; on error it is released, or billed in full if
the provider may already have charged (see README, "What is billed"). A metered call's
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
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from mitmproxy import http

from egress_guard.addons._flow import answered, fail_closed, reject
from egress_guard.addons.bodies import body_stream
from egress_guard.addons.flow import state
from egress_guard.audit import AuditLog, AuditUnavailable, Intent, now_iso
from egress_guard.config import Config
from egress_guard.policy import Decision, Verdict
from egress_guard.spend import (
    METER_OF,
    SCOPES,
    Cost,
    Hold,
    Ledger,
    Metered,
    Refusal,
    RunningCost,
    SSEEvents,
    StreamEnd,
    Unpriced,
    UsageFromStream,
    allowed_models,
    cost_of,
    decode_event,
    is_usage_only_chunk,
    meter,
    model_allowed,
    reservation,
)

log = logging.getLogger("egress_guard")
ACCUMULATE_LIMIT = 16 * 1024 * 1024


@dataclass
class Overrun:
    """What a tap needs to end an SSE stream that crosses a budget (`spend.on_overrun: cut`)."""

    running: RunningCost
    end: StreamEnd
    over: Callable[[Decimal], str | None]  # the budget a stream costing this much breaks, if any
    cut: Callable[[str, Cost], None]  # called once, when the stream is ended


class StreamTap:
    """A response BodyStream stage that reads usage from SSE events (or a streamed JSON body)
    as they pass, drops OpenAI's usage-only chunk when egress-guard asked for it, and hands
    everything else on unchanged. With an `Overrun`, an SSE stream whose running cost breaks
    a budget is ended after the event that broke it, with the provider's own closing events;
    what the upstream sends after that is dropped. An event split across pieces is held
    until it is complete (so a piece may come out empty: BodyStream sends nothing for it).
    It never raises."""

    def __init__(
        self,
        m: Metered,
        sse: bool,
        drop: bool,
        done: Callable[[dict | None], None],
        overrun: Overrun | None = None,
    ) -> None:
        self.m, self.sse, self.drop, self.done = m, sse, drop, done
        self.overrun = overrun if sse else None
        self.events = SSEEvents()
        self.usage = UsageFromStream(m.provider, m.flavor)
        self.body = bytearray()
        self.broken = False
        self.ended = False

    def __call__(self, chunk: bytes, end: bool) -> bytes:
        if self.ended:  # nothing more reaches the agent; usage is still read, to bill it if it comes
            with contextlib.suppress(Exception):
                for _raw, _name, data in self.events.feed(chunk):
                    obj = decode_event(data)
                    if obj is not None:
                        self.usage.observe(obj)
                if end:  # the upstream finished after all (it was not cut): its usage is real
                    self.done(self.usage.response)
            return b""
        if self.broken:
            return chunk
        try:
            if not self.sse:
                if len(self.body) < ACCUMULATE_LIMIT:
                    self.body += chunk
                if end:
                    self.done(self._json_usage())
                return chunk
            out = bytearray()
            for raw, _name, data in self.events.feed(chunk):
                obj = decode_event(data)
                if obj is not None:
                    reported = self.usage.observe(obj)
                    if self.drop and is_usage_only_chunk(obj):
                        continue
                    if self.overrun is not None and self._crossed(obj, reported, out, raw):
                        return bytes(out)
                out += raw
            if end:
                out += self.events.rest()
                self.done(self.usage.response)
            return bytes(out)
        except Exception:
            log.exception("usage tap failed; passing the stream through unparsed")
            self.broken = True
            return self.events.rest() + chunk

    def _crossed(self, obj: dict, reported: bool, out: bytearray, raw: bytes) -> bool:
        """Follow the running cost; if this event breaks a budget, end the stream after it."""
        o = self.overrun
        assert o is not None
        o.end.observe(obj)
        # Only an event with output is checked: the usage reported at the end (OpenAI's usage
        # chunk, Anthropic's message_delta, response.completed) comes when nothing is left to
        # save, and ending the stream after it would send the agent a second end.
        if not o.running.observe(obj, self.usage.response if reported else None):
            return False
        reason = o.over(o.running.usd)
        if reason is None:
            return False
        self.ended = True
        out += raw + o.end.events(f"stream ended: {reason}", o.running.output_tokens)
        o.cut(reason, o.running.cost())
        return True

    def _json_usage(self) -> dict | None:
        try:
            value = json.loads(bytes(self.body))
        except ValueError:
            return None
        if isinstance(value, list):  # Gemini's streamGenerateContent without alt=sse: a JSON array
            for item in value:
                if isinstance(item, dict):
                    self.usage.observe(item)
            return self.usage.response
        return value if isinstance(value, dict) else None


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
        self.meters = {s.name: s.meter or METER_OF.get(s.name) for s in config.services}
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
        how = self.meters.get(service)
        usd, tokens, m = Decimal(0), 0, None
        # only a POST is a call that costs (a GET of /v1/chat/completions lists stored ones)
        if how is not None and flow.request.method == "POST" and meter(how.api, flow.request.path, None, 0):
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
            m = meter(how.api, flow.request.path, body, len(raw), how.provider)
            if m is not None:
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
                    usd, tokens = reservation(self.settings, m)
                except Unpriced as exc:
                    self._refuse(flow, str(exc), 403)
                    return
                if m.provider == "openai" and m.flavor == "chat" and m.stream and isinstance(body, dict):
                    raw_options = body.get("stream_options")
                    options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
                    if not options.get("include_usage"):
                        body["stream_options"] = {**options, "include_usage": True}
                        flow.request.content = json.dumps(body).encode()
                        st.drop_usage_chunk = True
                st.metered = m
        try:
            hold = self.ledger.admit(agent.limits, agent_name, st.session or "", usd, tokens)
        except Refusal as refusal:
            self._refuse(flow, refusal.reason, refusal.status, refusal.retry_after)
            return
        st.hold = hold
        if m is not None:
            await self._intent(flow, hold, m, service)

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
                    path=flow.request.path if self.query_strings else flow.request.path.split("?", 1)[0],
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
            StreamEnd(m.provider, m.flavor),
            lambda usd: self.ledger.overrun(limits, hold, usd),
            cut,
        )

    def _observed(self, flow: http.HTTPFlow, m: Metered, obj: dict | None) -> None:
        cost = cost_of(self.settings, m.provider, m.flavor, obj, m.price_as) if obj else None
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
            log.warning("no usage in %s's %s response for %s; billing the reservation", m.provider, m.model, flow.id)
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
