"""WebSocketGuard: WebSocket messages pass through egress-guard as HTTP bodies do.

After an upgrade mitmproxy relays frames with no hook of the other guards: without this
addon an upstream could send the injected secret back to the agent, the agent could send a
fake key to a host it is not bound to, and a model call made over WebSocket (Codex CLI's
`wss://…/v1/responses`) would escape budgets and model allowlists. Per connection:

- from the agent: every message is scanned for egress-guard keys bound elsewhere (in every
  encoding `CredentialGuard.leak` recognises, also across message boundaries); a hit drops
  it, closes the connection with 1008 and writes a `denied-unbound-host` row;
- from the upstream: every form of the real secret is masked (same length) before the
  agent gets the message, also a secret split across messages (egress_guard.ws_relay);
  ordinary JSON messages (which end in `}`) are never held or changed;
- metered APIs (those whose provider module reads WebSocket calls: OpenAI's Responses
  WebSocket mode and Realtime API): each call-starting message is checked against the model
  allowlist, reserved and admitted like an HTTP call (refused: the agent gets an `error`
  event in the API's shape, the connection stays open), its reservation committed as an
  intent before it is forwarded — on a fleet (SharedLedger) by the store's one atomic
  admission statement, so replicas enforce one budget — and settled from the usage its last
  event reports (egress_guard.ws_meter); each call gets its own audit row (method WS);
- a service with `websocket: false` gets a 426 before any upgrade; a metered service's
  WebSocket endpoint egress-guard cannot meter is refused when the agent has limits there;
- when the connection ends, a row records messages and bytes each way, how it closed, and
  any call still open is billed at its reservation (the provider may have charged).

The kill switch needs nothing here: the upgrade's swap registered the connection with the
key, and cutting it aborts the WebSocket too. Every hook fails closed: an exception drops
the message at hand and closes the connection (1011).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import wsproto.events
from mitmproxy import http, websocket

from egress_guard import providers
from egress_guard.addons._flow import answered, fail_closed, reject
from egress_guard.addons._mitm import WS_CONTROL
from egress_guard.addons._ws_close import close_websocket
from egress_guard.addons._ws_rows import call_row, close_row, ws_row
from egress_guard.addons.flow import recorded_path, state
from egress_guard.config import Config
from egress_guard.credentials import Credential, Service
from egress_guard.ledger import Hold, Ledger, Refusal
from egress_guard.policy import Decision, Verdict
from egress_guard.providers.ws import Create, Failed, Finished, SetModel, Started, Unreadable
from egress_guard.shared_ledger import SharedLedger
from egress_guard.store import AuditLog, Intent
from egress_guard.timeutil import now_iso
from egress_guard.ws_conn import WsConn
from egress_guard.ws_meter import Quote, Refused, Settled, WsMeter, refused_by, upgrade_refusal
from egress_guard.ws_relay import KeyScan, Relay, blanked, control_data, masked_control

log = logging.getLogger("egress_guard")
CLOSE_POLICY, CLOSE_ERROR = 1008, 1011
BINARY = Refused(400, "binary messages are not part of this API", None, "invalid_request")


class WebSocketGuard:
    def __init__(self, config: Config, ledger: Ledger, audit: AuditLog, credentials: Any, proxyserver: Any) -> None:
        self.config = config
        self.settings = config.spend
        self.ledger = ledger
        self.audit = audit
        self.credentials = credentials  # CredentialGuard: `leak` and its key scanner
        self.proxyserver = proxyserver
        self.services: dict[str, Service] = {s.name: s for s in config.services}
        self.meters = {s.name: how for s in config.services if (how := providers.meter_of(s.name, s.meter))}

    # --- the upgrade -----------------------------------------------------------------------

    @fail_closed("request")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        upgrade = flow.request.headers.get("upgrade", "")
        if answered(flow) or "websocket" not in upgrade.lower():
            return
        refusal = self._refusal(flow)
        if refusal is not None:
            status, reason = refusal
            reject(flow, Decision(Verdict.DENY, reason), status)

    def _refusal(self, flow: http.HTTPFlow) -> tuple[int, str] | None:
        """Why a WebSocket to this flow's service may not open (status, reason), or None."""
        st = state(flow)
        service = self.services.get(st.service or "")
        if service is None:
            return None  # a host bound to no service: its frames are scanned for keys
        agent = self.config.agents.get(st.agent or "")
        meter = self.meters.get(service.name)
        return upgrade_refusal(service, agent, meter, flow.request.path, self.ledger, st.session or "")

    # --- the connection --------------------------------------------------------------------

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        try:
            conn = state(flow).ws = self._conn(flow)
            self._guard_control_frames(flow, conn)
            # the upgrade was judged by its request; mitmproxy judges a WebSocket by the
            # response (101, Upgrade: websocket): one the request check missed closes here
            refusal = self._refusal(flow)
            if refusal is not None:
                self._close(flow, conn, CLOSE_POLICY, refusal[1])
        except Exception as exc:
            log.exception("WebSocket guard could not start on %s; closing it", flow.id)
            self._close(flow, None, CLOSE_ERROR, f"internal error ({type(exc).__name__})")

    def _conn(self, flow: http.HTTPFlow) -> WsConn:
        st = state(flow)
        target = st.target
        host, port = (str(target[0]), int(target[1])) if target else (flow.request.host, flow.request.port)
        service = st.service
        agent = self.config.agents.get(st.agent or "")
        how = self.meters.get(service or "")
        meter = None
        if how is not None and agent is not None and service is not None:
            api = providers.get(how.api)
            reader = api.websocket(flow.request.path, how.provider)
            if reader is not None:
                meter = WsMeter(
                    reader,
                    api,
                    self.settings,
                    self.ledger,
                    agent.limits,
                    agent.name,
                    service,
                    st.session or "",
                    flow.id,
                )
        scanner = self.credentials.scanner
        scan = None
        if scanner.max_len:
            leak = lambda data: self.credentials.leak(host, data, "a WebSocket message")  # noqa: E731
            scan = KeyScan(leak, getattr(scanner, "window", 0) or 6 * scanner.max_len)
        path = recorded_path(flow, self.config.audit_query_strings)
        inject = lambda content, is_text: self.proxyserver.inject_websocket(flow, True, content, is_text)  # noqa: E731
        return WsConn(host, port, path, service, Relay(st.scrub, inject), scan, meter)

    def _guard_control_frames(self, flow: http.HTTPFlow, conn: WsConn) -> None:
        """Ping/pong payloads and close reasons pass no hook (addons/_mitm.py filters them
        through these): to the agent, the secret is masked; to the upstream, a key bound
        elsewhere blanks the frame and closes the connection. Frames on a connection with
        no filter go out blank."""

        def to_agent(event: Any) -> Any:
            return masked_control(conn.relay.forms, event)

        def to_upstream(event: Any) -> Any:
            closing = isinstance(event, wsproto.events.CloseConnection)
            if conn.scan is None or (closing and conn.closing is not None):
                return event  # no key to find; or egress-guard's own close: the reason is its words
            data = control_data(event)
            why = conn.scan(data) if data else None
            if not why:
                return event
            self._leaked(flow, conn, why)
            if not closing:  # (already closing: the close goes on, without the reason)
                self._close(flow, conn, CLOSE_POLICY, why)
            return blanked(event, CLOSE_POLICY)

        WS_CONTROL[flow.client_conn.id] = to_agent
        WS_CONTROL[flow.server_conn.id] = to_upstream

    def _leaked(self, flow: http.HTTPFlow, conn: WsConn, why: str) -> None:
        log.warning("SECURITY %s: %s (id %s); WebSocket closed", Credential.UNBOUND_HOST.value, why, flow.id)
        row = ws_row(flow, conn, f"{flow.id}:ws-leak", Verdict.DENY, why, 403, credential=Credential.UNBOUND_HOST)
        self.audit.record(row)

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        msg = flow.websocket.messages[-1]
        del flow.websocket.messages[:-1]  # mitmproxy keeps every message for the connection's life
        st = state(flow)
        conn = st.ws
        if conn is None or conn.ended:
            msg.drop()  # never relay what no guard looked at
            if conn is None and not st.ws_closing:
                self._close(flow, None, CLOSE_ERROR, "the WebSocket guard has no state for this connection")
            return
        try:
            if msg.injected:
                if msg.from_client:
                    msg.drop()  # the empty message that makes the layer read a close (`_close`)
                else:
                    conn.relay.returned()
                return
            if conn.closing is not None:
                msg.drop()
            elif msg.from_client:
                await self._from_agent(flow, conn, msg)
            else:
                await self._from_upstream(flow, conn, msg)
        except Exception as exc:
            log.exception("WebSocket guard failed on a message of %s; closing the connection", flow.id)
            msg.drop()
            self._close(flow, conn, CLOSE_ERROR, f"internal error in the WebSocket guard ({type(exc).__name__})")

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        WS_CONTROL.pop(flow.client_conn.id, None)  # its close frames have been sent
        WS_CONTROL.pop(flow.server_conn.id, None)
        st = state(flow)
        conn = st.ws
        if conn is None or conn.ended:
            return
        conn.ended = True
        conn.relay.stop()
        try:
            for settled in conn.meter.closed() if conn.meter is not None else ():
                self._record(flow, conn, settled)
            if conn.closing is None and st.key_id:
                record = await self.credentials.keys.lookup(st.key_id)  # cached: no I/O
                if record is not None and record.revoked_at:
                    conn.closing = f"cut: its key {record.key_id} was revoked ({record.revoked_reason})"
                    conn.close_verdict = Verdict.DENY
            self.audit.record(close_row(flow, conn))
        except Exception:
            log.exception("could not record the end of WebSocket %s", flow.id)

    # --- from the agent --------------------------------------------------------------------

    async def _from_agent(self, flow: http.HTTPFlow, conn: WsConn, msg: websocket.WebSocketMessage) -> None:
        data = msg.content
        conn.from_agent(data)
        if conn.scan is not None:
            why = conn.scan(data)
            if why:
                msg.drop()
                self._leaked(flow, conn, why)
                self._close(flow, conn, CLOSE_POLICY, why)
                return
        meter = conn.meter
        if meter is None:
            return
        if not msg.is_text:  # these APIs speak JSON text: a binary message could hide a call
            self._refuse(flow, conn, meter, msg, BINARY)
            return
        event = meter.reader.from_agent(data)
        if isinstance(event, Unreadable):
            self._refuse(flow, conn, meter, msg, Refused(400, event.reason, None, "invalid_request"))
        elif isinstance(event, SetModel):
            refused = meter.disallowed(event.model)
            if refused is not None:
                self._refuse(flow, conn, meter, msg, refused)
            else:
                meter.reader.model = event.model
        elif isinstance(event, Create):
            await self._start_call(flow, conn, meter, msg, event)

    async def _start_call(
        self, flow: http.HTTPFlow, conn: WsConn, meter: WsMeter, msg: websocket.WebSocketMessage, event: Create
    ) -> None:
        quote = meter.quote(event, len(msg.content))
        if isinstance(quote, Refused):
            self._refuse(flow, conn, meter, msg, quote)
            return
        intent = self._intent_of(conn, quote)
        ledger = self.ledger
        try:
            if isinstance(ledger, SharedLedger):  # a fleet: admitted in the store, with its intent
                hold = await ledger.reserve(meter.limits, meter.agent, meter.session, quote.usd, quote.tokens, intent)
            else:
                hold = ledger.admit(meter.limits, meter.agent, meter.session, quote.usd, quote.tokens)
        except Refusal as refusal:
            self._refuse(flow, conn, meter, msg, refused_by(refusal, quote.metered.model), intent_id=quote.request_id)
            return
        call = meter.admitted(quote, hold)
        if hold.shared:
            self.audit.track_intent(call.request_id)  # committed with the reservation; the call's row removes it
        else:
            why = await self._intent(intent, hold)
            if why is not None:
                meter.release(call)
                reason = f"the call's reservation could not be recorded, so it was not forwarded: {why}"
                refused = Refused(503, reason, call.metered.model, "egress_error")
                self._refuse(flow, conn, meter, msg, refused, intent_id=call.request_id)
                return
        meter.forwarded(call)

    @staticmethod
    def _intent_of(conn: WsConn, quote: Quote) -> Intent:
        """The call's intent; the ledger fills in agent, session, day and the reservation."""
        return Intent(
            request_id=quote.request_id,
            ts=now_iso(),
            agent="",
            session=None,
            service=conn.service,
            model=quote.metered.model,
            day="",
            reserved_usd="0",
            method="WS",
            host=conn.host,
            port=conn.port,
            path=conn.path,
        )

    async def _intent(self, intent: Intent, hold: Hold) -> str | None:
        """Commit the call's reservation before it is forwarded (if the proxy stops before the
        call's row is written, the next start bills it); the reason if that failed."""
        commit = getattr(self.audit, "intent", None)
        if commit is None:  # an audit log without intents (before they land)
            return None
        try:
            await commit(
                replace(intent, agent=hold.agent, session=hold.session, day=hold.day, reserved_usd=f"{hold.usd:f}")
            )
        except Exception as exc:  # AuditUnavailable
            return str(exc)
        return None

    def _refuse(
        self,
        flow: http.HTTPFlow,
        conn: WsConn,
        meter: WsMeter,
        msg: websocket.WebSocketMessage,
        refused: Refused,
        intent_id: str | None = None,
    ) -> None:
        """Refuse one message: it is dropped, the agent gets an `error` event in the API's
        shape (the connection stays open), and a row records it."""
        msg.drop()
        status, reason = refused.status, refused.reason
        event = meter.reader.error_event(status, refused.code, f"egress-guard: {reason}", refused.retry_after)
        conn.relay.send(event, True)
        verdict = Verdict.DENY if status < 500 else Verdict.ERROR
        request_id = meter.refusal_id(intent_id)
        row = ws_row(flow, conn, request_id, verdict, reason, status, request_bytes=len(msg.content))
        row.model = refused.model
        self.audit.record(row)

    # --- from the upstream -------------------------------------------------------------------

    async def _from_upstream(self, flow: http.HTTPFlow, conn: WsConn, msg: websocket.WebSocketMessage) -> None:
        data = msg.content
        conn.from_upstream(data)
        meter = conn.meter
        if meter is not None and msg.is_text:
            meter.answering(len(data))
            event = meter.reader.from_upstream(data)
            if isinstance(event, Started):
                meter.started()
            elif isinstance(event, Finished):
                n = self._record(flow, conn, meter.finished(event))
                if not await self._durable(flow, conn, n, msg):
                    return
            elif isinstance(event, Failed) and (settled := meter.failed(event)) is not None:
                self._record(flow, conn, settled)
        conn.relay.upstream(msg)

    def _record(self, flow: http.HTTPFlow, conn: WsConn, settled: Settled) -> Any:
        """The row of a call that ended; returns its number (for `_durable`)."""
        n = self.audit.record(call_row(flow, conn, settled))
        if conn.meter is not None and conn.meter.exhausted():
            # the API answers by itself (server-side turn detection): no message of the
            # agent's can be refused to stop it, so the connection is
            self._close(flow, conn, CLOSE_POLICY, f"agent {conn.meter.agent}'s budget is spent")
        return n

    async def _durable(self, flow: http.HTTPFlow, conn: WsConn, n: Any, msg: websocket.WebSocketMessage) -> bool:
        """The call's last event reaches the agent only once its row is committed."""
        durable = getattr(self.audit, "durable", None)
        if durable is None or not isinstance(n, int):  # an audit log that cannot wait (before that lands)
            return True
        try:
            await durable(n)
        except Exception as exc:  # AuditUnavailable
            log.error("audit row for a WebSocket call of %s could not be committed (%s); closing it", flow.id, exc)
            msg.drop()
            self._close(flow, conn, CLOSE_ERROR, "the call's audit row could not be committed")
            return False
        return True

    # --- closing and rows ------------------------------------------------------------------

    def _close(self, flow: http.HTTPFlow, conn: WsConn | None, code: int, why: str) -> None:
        """Close both sides with `code` (1008: policy violation), or cut the connection."""
        if conn is None:
            state(flow).ws_closing = True
        else:
            if conn.closing is not None:
                return
            conn.closing = f"closed by egress-guard ({code}): {why}"
            conn.close_verdict = Verdict.DENY if code == CLOSE_POLICY else Verdict.ERROR
            conn.relay.stop()
        close_websocket(self.proxyserver, flow, code, f"egress-guard: {why}")
