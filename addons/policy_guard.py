"""PolicyGuard: the per-request policy (`rules:`, `unknown_hosts:`, `mode:`, frozen sessions)
on a request the structural guards have let through, and the hold of an escalated one.

RequestGuard has checked Host/SNI, vetted the address and applied the allowlist; where the
allowlist alone would refuse but the policy may still admit (a CEL allow or escalate rule
for the host, `unknown_hosts: escalate`, observe mode), it leaves the decision to this
guard. Here the request, with its body when a rule reads one, becomes `verdicts.Facts`, and
`Policy.evaluate` — the one function `egress-guard check` calls too — gives the verdict:

- deny: refused 403 with the rule and its reason;
- escalate: the agent's connection waits while a human answers (`Escalations.ask`:
  `egress-guard approve/deny`, or a signed webhook callback); approved goes on, denied or
  timed out is refused with the reason;
- allow: goes on (to SpendGuard, which reserves only after this, so a held request holds no
  budget);
- observe mode: the verdict is kept on the flow (`FlowState.observed`) and the row records it
  as would-deny / would-escalate, but the request goes on.

The flow keeps the policy it started under (`FlowState.policy`): a reload never changes the
rules halfway through a request. FreezeWatch, last in the chain, feeds every finished flow to
the per-agent baselines and freezes a session whose behaviour diverges (`freeze:`).
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal

from mitmproxy import http

from egress_guard.addons._flow import answered, fail_closed, reject
from egress_guard.addons.attribution import Attribution, Who
from egress_guard.addons.flow import FlowState, recorded_path, state
from egress_guard.baseline import Baselines
from egress_guard.decoding import decode_all
from egress_guard.escalation import Escalations, PendingRequest
from egress_guard.policy import Decision, Verdict
from egress_guard.verdicts import Action, BodyFacts, Facts, Outcome, Policy, PolicyHolder, body_facts, request_facts

log = logging.getLogger("egress_guard")

BODY_LIMIT = 1 << 20  # a body rules read is at most this (larger ones stream, and are unread)


def flow_policy(holder: PolicyHolder, st: FlowState) -> Policy:
    """The policy this flow is judged under: the one current when it was first looked at."""
    if st.policy is None:
        st.policy = holder.current
    return st.policy


class PolicyGuard:
    def __init__(
        self,
        holder: PolicyHolder,
        escalations: Escalations,
        attribution: Attribution,
        query_strings: bool,
        rearm: object = None,
    ) -> None:
        self.holder = holder
        self.escalations = escalations
        self.attribution = attribution
        self.query_strings = query_strings
        self.rearm = rearm  # TimeoutWatch.request: the response timeout counts from the end of a hold

    @fail_closed("request")
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A streamed body (over 1 MiB, or of unknown length) goes upstream as it arrives:
        # judge it now, without its body (a rule that needs one fails closed).
        if flow.request.stream and not answered(flow):
            await self._judge(flow, read_body=False)

    @fail_closed("request")
    async def request(self, flow: http.HTTPFlow) -> None:
        if not answered(flow) and not state(flow).judged:
            await self._judge(flow, read_body=True)

    async def _judge(self, flow: http.HTTPFlow, *, read_body: bool) -> None:
        st = state(flow)
        st.judged = True
        policy = flow_policy(self.holder, st)
        # Who asks: the key's agent, else the one this connection named before (a sandbox's,
        # or an earlier keyed request's). Kept to the verdict: the flow's own agent (billing,
        # its row) stays what the credential guard found.
        who = (st.agent, st.session) if st.agent is not None else self.attribution.known(flow.client_conn.id)
        frozen = self.escalations.frozen(who[0], who[1]) if who is not None else None
        if policy.plain and frozen is None:
            return  # no rules, no unknown-host escalation, enforcing: the allowlist decided
        facts = self._facts(flow, st, policy, read_body, who)
        outcome = policy.evaluate(facts, self.escalations.grants, frozen)
        if outcome.observed:
            st.observed = outcome
            if st.decision is None or not st.decision.allowed:
                st.decision = Decision(Verdict.ALLOW, f"observe mode: {outcome.reason}", outcome.rule)
            return
        if outcome.action is Action.DENY:
            reject(flow, Decision(Verdict.DENY, outcome.reason, outcome.rule))
            return
        if outcome.action is Action.ESCALATE:
            await self._escalate(flow, st, outcome, who)
            return
        st.decision = Decision(Verdict.ALLOW, outcome.reason, outcome.rule)

    async def _escalate(self, flow: http.HTTPFlow, st: FlowState, outcome: Outcome, who: Who | None) -> None:
        req = flow.request
        host, port = st.target if st.target is not None else (None, req.port)
        pending = PendingRequest(
            request_id=flow.id,
            agent=who[0] if who is not None else None,
            session=who[1] if who is not None else None,
            method=req.method,
            scheme=req.scheme,
            host=str(host) if host is not None else req.host,
            port=port,
            path=recorded_path(flow, self.query_strings),
            rule=outcome.rule or "policy",
            reason=outcome.reason,
        )
        answer = await self.escalations.ask(pending)
        if not flow.live or answered(flow):
            return  # the agent gave up waiting; its row says so
        if answer.approved:
            st.decision = Decision(Verdict.ALLOW, answer.reason, outcome.rule)
            if callable(self.rearm):
                self.rearm(flow)
            return
        reject(flow, Decision(Verdict.DENY, answer.reason, outcome.rule))

    def _facts(self, flow: http.HTTPFlow, st: FlowState, policy: Policy, read_body: bool, who: Who | None) -> Facts:
        """The request as rules see it, built as `egress-guard check` builds it
        (`verdicts.request_facts`), so the two judge alike."""
        req = flow.request
        assert st.target is not None  # RequestGuard aimed it
        host, port = st.target
        body: BodyFacts | None = None
        size: int | None = None  # a streamed body without a Content-Length: not known
        content = None if req.stream else req.raw_content
        if content is not None:
            size = len(content)
            if not content:
                body = BodyFacts()
            elif policy.needs_body(host, port) and size <= BODY_LIMIT:
                try:
                    decoded = decode_all(req.headers.get("content-encoding", ""), content)
                except ValueError:
                    decoded = b""  # CredentialGuard refused an undecodable body already
                body = body_facts(req.headers.get("content-type", ""), decoded)
        else:  # streamed (judged at its headers): the length it declares, which framing holds it to
            length = req.headers.get("content-length", "")
            size = int(length) if length.isdigit() else None
        return request_facts(
            host,
            port,
            req.method,
            st.agent_path or req.path,  # as the agent sent it: never a real key swapped into the query
            req.headers.keys(),
            agent=who[0] if who is not None else None,
            session=who[1] if who is not None else None,
            service=st.service,
            body_size=size,
            body=body,
        )


class FreezeWatch:
    """Feeds every finished request to the per-agent baselines (`freeze:`); a session whose
    behaviour diverges is frozen: its next requests escalate (or are refused), with an audit
    row that shows the baseline and the trigger. Last in the chain: the cost is settled and
    the decision final."""

    def __init__(self, holder: PolicyHolder, escalations: Escalations) -> None:
        self.holder = holder
        self.escalations = escalations
        self.baselines: Baselines | None = None
        self.settings: object = None

    def _baselines(self, policy: Policy) -> Baselines | None:
        """The baselines for the policy in force: a reload changes thresholds and keeps the
        history (`Baselines.reconfigure`); turning `freeze:` off drops it."""
        if policy.freeze is None:
            self.baselines = None
        elif self.baselines is None:
            self.baselines = Baselines(policy.freeze)
        elif self.settings != policy.freeze:
            self.baselines.reconfigure(policy.freeze)
        self.settings = policy.freeze
        return self.baselines

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._observe(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._observe(flow)

    async def _observe(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        if st.agent is None or st.watched:
            return
        st.watched = True
        baselines = self._baselines(self.holder.current)
        if baselines is None:
            return
        host = str(st.target[0]) if st.target is not None else flow.request.host
        usd = st.usage.usd if st.usage is not None else Decimal(0)
        refused = st.decision is None or not st.decision.allowed
        now = time.monotonic()
        baselines.observe(st.agent, st.session, host, usd, refused, now)
        if self.escalations.frozen(st.agent, st.session) is not None:
            return
        trigger = baselines.check(st.agent, st.session, now)
        if trigger is not None:
            log.warning("freezing agent %s session %s: %s", st.agent, st.session, trigger.text)
            await self.escalations.freeze(st.agent, st.session, trigger.text, trigger.baseline_json())
