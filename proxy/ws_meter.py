"""Metering the model calls of one WebSocket connection: each call priced and checked (model,
price) and quoted its reservation, settled from the usage its last event reports, and what
is still open when the connection ends billed at its reservation.

The API's own messages are read by its provider's WsReader (egress_guard.providers); this
module keeps the calls in flight, in order (the server answers them in the order they were
made), with the ledger. Pure: no I/O, no mitmproxy. The WebSocket addon admits each quoted
call (`quote` → ledger → `admitted`) as SpendGuard admits an HTTP call — on a fleet in the
store, atomically with its intent — and records the rows.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from egress_guard import providers
from egress_guard.credentials import Agent, Service
from egress_guard.ledger import SCOPES, Hold, Ledger, Refusal
from egress_guard.pricing import Cost, Unpriced
from egress_guard.providers import Provider
from egress_guard.providers.base import Metered
from egress_guard.providers.ws import Create, Failed, Finished, WsReader
from egress_guard.spend import Limits, Meter, SpendSettings, allowed_models, model_allowed

log = logging.getLogger("egress_guard")


@dataclass
class WsCall:
    """A metered call in flight on the connection."""

    request_id: str
    metered: Metered
    hold: Hold
    request_bytes: int
    started_at: float = field(default_factory=time.time)
    started: bool = False  # the upstream began answering it
    response_bytes: int = 0


@dataclass(frozen=True)
class Refused:
    """Why a message of the agent's is not forwarded: the `error` event and row it gets."""

    status: int
    reason: str
    model: str | None
    code: str
    retry_after: int | None = None


@dataclass(frozen=True)
class Quote:
    """A call the meter would let through, if the ledger admits it: what to reserve for it
    (`usd`, `tokens`) and its row's (and intent's) id."""

    request_id: str
    metered: Metered
    usd: Decimal
    tokens: int
    request_bytes: int


def refused_by(refusal: Refusal, model: str) -> Refused:
    """A ledger's refusal of a call (a limit: 429; the store unanswering: 503) as the agent's
    `error` event and row get it."""
    status = refusal.status
    code = "rate_limit_exceeded" if status == 429 else "egress_error" if status >= 500 else "egress_denied"
    return Refused(status, refusal.reason, model, code, refusal.retry_after)


@dataclass(frozen=True)
class Settled:
    """A call that ended: what it is billed (None: nothing) and the row's words for it."""

    call: WsCall
    cost: Cost | None
    status: int | None
    note: str


def carry(m: Metered, tokens: int) -> Metered:
    """`m` with `tokens` of context the server already holds added to its prompt estimate:
    a call that continues a previous response is billed for all of it, though the message
    carries only what is new."""
    return replace(m, input_bytes=m.input_bytes + 3 * tokens) if tokens > 0 else m


def not_allowed(limits: Limits, agent: str, service: str, model: str, session: str) -> str:
    allowed = ", ".join(allowed_models(limits, service, session) or ())
    return f"model {model!r} is not allowed for agent {agent} on {service} (allowed: {allowed})"


def limited(ledger: Ledger, limits: Limits, agent: str, service: str, session: str) -> bool:
    """Whether a budget, token rate or model allowlist applies to this agent's calls."""
    return (
        limits.tokens_per_minute is not None
        or allowed_models(limits, service, session) is not None
        or any(ledger.limit(limits, agent, scope, session) is not None for scope in SCOPES)
    )


class WsMeter:
    """The metered calls of one connection (`reader` reads its messages as `api`'s)."""

    def __init__(
        self,
        reader: WsReader,
        api: Provider,
        settings: SpendSettings,
        ledger: Ledger,
        limits: Limits,
        agent: str,
        service: str,
        session: str,
        flow_id: str,
    ) -> None:
        self.reader, self.api, self.settings, self.ledger = reader, api, settings, ledger
        self.limits, self.agent, self.service, self.session = limits, agent, service, session
        self.flow_id = flow_id
        self.calls: deque[WsCall] = deque()  # forwarded, oldest first
        self.seq = 0  # numbers the connection's call rows (refusals included)
        self.calls_made = 0
        self.carried = 0  # tokens of context the server holds for the next call
        self.billed = Decimal(0)
        self.refused = 0

    def next_id(self) -> str:
        self.seq += 1
        return f"{self.flow_id}:ws{self.seq}"

    def refusal_id(self, intent_id: str | None = None) -> str:
        """A refused message's row id (its quoted call's, if it had one)."""
        self.refused += 1
        return intent_id or self.next_id()

    def disallowed(self, model: str) -> Refused | None:
        if model_allowed(self.limits, self.service, model, self.session):
            return None
        reason = not_allowed(self.limits, self.agent, self.service, model, self.session)
        return Refused(403, reason, model, "model_not_allowed")

    # --- from the agent --------------------------------------------------------------------

    def quote(self, event: Create, request_bytes: int) -> Quote | Refused:
        """What a call would reserve (its worst case), or why it is refused before any ledger
        is asked (model, price). The caller admits the quote against its ledger — in the store,
        on a fleet — and hands back the hold (`admitted`) or the refusal (`refusal`)."""
        m = event.metered
        if event.carried:
            m = carry(m, self.carried + self.reader.pending_tokens())
        refused = self.disallowed(m.model)
        if refused is not None:
            return refused
        try:
            usd, tokens = self.api.reservation(self.settings, m)
        except Unpriced as exc:
            return Refused(403, str(exc), m.model, "model_not_priced")
        return Quote(self.next_id(), m, usd, tokens, request_bytes)

    def admitted(self, quote: Quote, hold: Hold) -> WsCall:
        """The quoted call, admitted with `hold` (not yet forwarded)."""
        return WsCall(quote.request_id, quote.metered, hold, quote.request_bytes)

    def forwarded(self, call: WsCall) -> None:
        """The call's message goes up: it is open until the server ends it."""
        self.calls.append(call)
        self.calls_made += 1

    def release(self, call: WsCall) -> None:
        """An admitted call that was not forwarded after all."""
        self.ledger.settle(call.hold, Decimal(0), 0)

    # --- from the upstream -------------------------------------------------------------------

    def answering(self, n: int) -> None:
        """`n` bytes of the server's answer to the oldest open call."""
        if self.calls:
            self.calls[0].response_bytes += n

    def started(self) -> None:
        for call in self.calls:
            if not call.started:
                call.started = True
                break

    def finished(self, event: Finished) -> Settled:
        """The oldest open call ended (or one the server started by itself)."""
        call = self.calls.popleft() if self.calls else self._unasked()
        return self.settle(call, event.usage, 200, True, f"response {event.status}")

    def failed(self, event: Failed) -> Settled | None:
        if not self.calls:
            return None
        call = self.calls.popleft()
        note = f"the upstream answered with an error event (status {event.status})"
        return self.settle(call, None, event.status or 502, call.started, note)

    def _unasked(self) -> WsCall:
        """A call nobody asked for by message (the Realtime API's server-side turn detection):
        admitted now, at nothing, to be settled at once."""
        try:
            hold = self.ledger.admit(self.limits, self.agent, self.session, Decimal(0), 0)
        except Refusal:  # over a limit already: the usage is still spent
            hold = Hold(self.agent, self.session, self.ledger.day(), Decimal(0), 0)
            hold.settled = True
        self.calls_made += 1
        return WsCall(self.next_id(), self.reader.unasked(), hold, 0, started=True)

    def closed(self) -> list[Settled]:
        """The connection ended: calls forwarded and never finished are billed at their
        reservation (the provider may have charged)."""
        out = []
        while self.calls:
            note = "the connection closed before the response completed: billed at its reservation"
            out.append(self.settle(self.calls.popleft(), None, None, True, note))
        return out

    # --- settling -----------------------------------------------------------------------------

    def settle(
        self, call: WsCall, usage: dict[str, Any] | None, status: int | None, billable: bool, note: str
    ) -> Settled:
        """Replace the call's reservation with what it cost: its usage priced, else (if it
        may have been charged) its reservation, else nothing."""
        hold = call.hold
        over_limit = hold.settled  # an unasked call admitted over a limit
        c = None
        if usage is not None:
            try:
                c = self.api.cost(self.settings, call.metered, usage)
            except Exception:  # a usage genai-prices cannot read: billed at the reservation, not lost
                log.exception("could not price the usage of WebSocket call %s", call.request_id)
        if c is None and billable:
            c = Cost(hold.usd, 0, 0, 0, call.metered.model)
            if usage is not None or status == 200:
                note += "; no priced usage reported: billed at its reservation"
        if over_limit:  # spent all the same
            if c is not None:
                self.ledger.add_spent(hold.agent, hold.session, hold.day, c.usd)
        elif c is not None:
            self.ledger.settle(hold, c.usd, c.input_tokens + c.output_tokens)
        else:
            self.ledger.settle(hold, Decimal(0), 0)
        if usage is not None and c is not None:
            self.carried = c.input_tokens + c.output_tokens  # the context left for the next call
        if c is not None:
            self.billed += c.usd
        return Settled(call, c, status, f"WebSocket {call.metered.flavor} call: {note}")

    def exhausted(self) -> bool:
        """Whether a budget of the agent's is spent, where only closing stops its calls: the
        server answers by itself (server_starts_calls), so no message can be refused to."""
        if not self.reader.server_starts_calls:
            return False
        ledger = self.ledger
        for scope, key in ledger.keys(self.agent, self.session, ledger.day()):
            cap = ledger.limit(self.limits, self.agent, scope, self.session)
            if cap is not None and ledger.spent.get(key, Decimal(0)) >= cap:
                return True
        return False

    def summary(self) -> str:
        """The connection's calls, for its close row."""
        text = f"; {self.calls_made} model calls, ${self.billed:f} billed"
        return text + (f", {self.refused} refused" if self.refused else "")


def upgrade_refusal(
    service: Service, agent: Agent | None, meter: Meter | None, path: str, ledger: Ledger, session: str
) -> tuple[int, str] | None:
    """Why a WebSocket upgrade at `path` of `service` may not open (status, reason), or None."""
    if not service.websocket:
        # 426, not 403: a client with an HTTP transport takes it as "use that" (Codex CLI
        # falls back at once; after a 403 it retries the WebSocket five times first)
        return 426, (
            f"WebSocket is turned off for {service.name} (services.{service.name}.websocket: false); use its HTTP API"
        )
    if meter is None or agent is None:
        return None
    reader = providers.get(meter.api).websocket(path, meter.provider)
    if reader is None:
        if limited(ledger, agent.limits, agent.name, service.name, session):
            return 403, (
                f"egress-guard cannot meter WebSocket calls to {path.split('?', 1)[0]} of {service.name}, "
                f"and agent {agent.name} has limits there; use the HTTP API"
            )
        return None
    if reader.model and not model_allowed(agent.limits, service.name, reader.model, session):
        return 403, not_allowed(agent.limits, agent.name, service.name, reader.model, session)
    return None
