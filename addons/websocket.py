"""WebSocketGuard: WebSocket messages pass through egress-guard as HTTP bodies do.

After an upgrade mitmproxy relays frames with no hook of the other guards: without this
addon an upstream could send the injected secret back to the agent, the agent could send a
fake key to a host it is not bound to, and a model call made over WebSocket (Codex CLI's
`wss://…/v1/responses`) would escape budgets and model allowlists. Per connection:

- from the agent: every message is scanned for egress-guard keys bound elsewhere (in every
  encoding `CredentialGuard.leak` recognises, also across message boundaries); a hit drops
  it, closes the connection with 1008 and writes a `denied-unbound-host` row;
- from the upstream: every form of the real secret is masked (same length) before the
  agent gets the message. A secret split across messages is masked too: a message whose end
  could be a secret's beginning is held (at most HOLD_SECONDS) until the next one shows, and
  what the agent already has is remembered, so a completed secret is masked in the message
  that completes it. Ordinary JSON messages (which end in `}`) are never held or changed;
- metered APIs (OpenAI Responses WebSocket mode, the Realtime API): each call-starting
  message is checked against the model allowlist, reserved and admitted like an HTTP call
  (refused: the agent gets an `error` event in the API's shape, the connection stays open),
  its reservation committed as an intent before it is forwarded, and settled from the usage
  its last event reports; each call gets its own audit row (method WS);
- a service with `websocket: false` gets a 403 before any upgrade; a metered service's
  WebSocket endpoint egress-guard cannot meter is refused when the agent has limits there;
- when the connection ends, a row records messages and bytes each way, how it closed, and
  any call still open is billed at its reservation (the provider may have charged).

The kill switch needs nothing here: the upgrade's swap registered the connection with the
key, and cutting it aborts the WebSocket too. Every hook fails closed: an exception drops
the message at hand and closes the connection (1011).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import wsproto.events
from mitmproxy import http, websocket

from egress_guard.addons._flow import answered, fail_closed, reject
from egress_guard.addons._mitm import WS_CONTROL
from egress_guard.addons.flow import state
from egress_guard.addons.killswitch import cut_client
from egress_guard.audit import AuditLog, AuditRow, now_iso
from egress_guard.config import Config
from egress_guard.credentials import Credential, Service
from egress_guard.forms import SecretForms
from egress_guard.ledger import SCOPES, Hold, Ledger, Refusal
from egress_guard.policy import Decision, Verdict
from egress_guard.spend import (
    METER_OF,
    Cost,
    Limits,
    Metered,
    Unpriced,
    allowed_models,
    model_allowed,
)
from egress_guard.ws_meter import (
    REALTIME,
    Create,
    Failed,
    Finished,
    SetModel,
    Started,
    Unreadable,
    audio_bytes_as_tokens,
    carried_tokens,
    carry,
    client_message,
    cost,
    reserve,
    server_message,
    url_model,
    ws_api,
)

log = logging.getLogger("egress_guard")
HOLD_MIN = 4  # a shorter tail that could begin a secret is let through: it is no secret yet
HOLD_SECONDS = 0.2  # how long a message may wait for the one that shows what its tail is
CLOSE_POLICY, CLOSE_ERROR = 1008, 1011


# --- the way to the agent: scrubbing across messages ------------------------------------------


class Relay:
    """Delivers the upstream's messages to the agent with every form of the secret masked.

    mitmproxy hands over whole messages: holding a tail back means holding the message.
    `held` are messages not yet delivered (their content already scrubbed as far as known);
    `in_flight` counts messages injected and not yet seen back in the hook — while any are,
    every new message is queued behind them (injected too), so order is kept. `tail` is the
    end of what the agent already has: a secret that began there is masked where it ends.
    """

    __slots__ = ("forms", "held", "in_flight", "inject", "tail", "timer")

    def __init__(self, forms: SecretForms | None, inject: Callable[[bytes, bool], None]) -> None:
        self.forms, self.inject = forms, inject
        self.tail = b""
        self.held: list[list[Any]] = []  # [content, is_text]
        self.in_flight = 0
        self.timer: asyncio.TimerHandle | None = None

    def upstream(self, msg: websocket.WebSocketMessage) -> None:
        if self.forms is None and not self.held and not self.in_flight:
            return  # nothing to mask, nothing queued before it: as it is
        queue = [*self.held, [msg.content, msg.is_text]]
        self.held = []
        keep_from = len(queue)
        if self.forms is not None:
            scrubbed = self.forms.scrub(self.tail + b"".join(c for c, _ in queue))
            pos = len(self.tail)
            for item in queue:
                item[0], pos = scrubbed[pos : pos + len(item[0])], pos + len(item[0])
            hold = self.forms.partial(scrubbed)
            if hold >= HOLD_MIN:  # hold each message that has a byte of that tail
                cut, pos = len(scrubbed) - hold, len(self.tail)
                for i, item in enumerate(queue):
                    if pos + len(item[0]) > cut:
                        keep_from = i
                        break
                    pos += len(item[0])
        release, self.held = queue[:keep_from], queue[keep_from:]
        if len(queue) == 1 and release and not self.in_flight:
            msg.content = release[0][0]  # the message itself goes on, masked
            self._delivered(release[0][0])
        else:
            msg.drop()
            for content, is_text in release:
                self.send(content, is_text)
        if self.held and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(HOLD_SECONDS, self.flush)
        elif not self.held:
            self.stop()

    def send(self, content: bytes, is_text: bool) -> None:
        """Inject a message to the agent, behind everything already on its way."""
        self.in_flight += 1
        self.inject(content, is_text)
        self._delivered(content)

    def returned(self) -> None:
        """An injected message came back through the hook (it is being delivered)."""
        self.in_flight = max(0, self.in_flight - 1)

    def flush(self) -> None:
        """The hold expired: what was held goes as it is. Its tail was no secret so far; if
        the next message completes one, `tail` has it masked there."""
        self.timer = None
        held, self.held = self.held, []
        for content, is_text in held:
            self.send(content, is_text)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _delivered(self, content: bytes) -> None:
        if self.forms is not None:
            self.tail = (self.tail + content)[-self.forms.max_len :]


# --- per connection ---------------------------------------------------------------------------


@dataclass
class _Call:
    """A metered call in flight on the connection."""

    n: int
    request_id: str
    metered: Metered
    hold: Hold
    request_bytes: int
    started_at: float = field(default_factory=time.time)
    started: bool = False  # the upstream began answering it
    response_bytes: int = 0


@dataclass
class WsConn:
    """One WebSocket connection's state, kept in the flow state (`FlowState.ws`)."""

    host: str
    port: int
    path: str  # as recorded (query string kept only with audit.query_strings)
    service: str | None
    agent: str | None
    session: str | None
    limits: Limits | None
    api: str | None  # ws_meter.RESPONSES / REALTIME, or None: not metered
    price_as: str
    model: str  # the Realtime session's model
    relay: Relay
    leak: Callable[[bytes], str | None] | None
    window: int
    scan_tail: bytes = b""
    agent_messages: int = 0
    agent_bytes: int = 0
    upstream_messages: int = 0
    upstream_bytes: int = 0
    calls: deque[_Call] = field(default_factory=deque)
    seq: int = 0  # numbers the connection's call rows (refusals included)
    calls_made: int = 0
    carried: int = 0  # tokens of context the server holds for the next call
    audio_bytes: int = 0  # Realtime: audio appended since the last response
    text_bytes: int = 0
    billed: Decimal = Decimal(0)
    refused: int = 0
    closing: str | None = None  # why egress-guard is closing it (or cut it)
    close_verdict: Verdict | None = None  # the closing row's decision, if egress-guard ended it
    ended: bool = False
    started_at: float = field(default_factory=time.time)


def _ws_layer(proxyserver: Any, flow: http.HTTPFlow) -> Any:
    """The mitmproxy layer relaying this flow's frames (mitmproxy 12 has no API to close a
    WebSocket: a close is fed to this layer as if the agent had sent it). Found by walking
    the connection's layers: children are held as `layer` (NextLayer), `child_layer`,
    `streams` (HttpLayer), a delegating `_handle_event`, or a context's `layers`."""
    from mitmproxy.proxy.layers.websocket import WebsocketLayer

    handler = proxyserver.connections.get(flow.client_conn.id)
    stack = [getattr(handler, "layer", None)]
    seen: set[int] = set()
    while stack:
        layer = stack.pop()
        if layer is None or id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, WebsocketLayer) and layer.flow is flow:
            return layer
        delegate = getattr(getattr(layer, "_handle_event", None), "__self__", None)
        stack += [getattr(layer, "layer", None), getattr(layer, "child_layer", None), delegate]
        streams = getattr(layer, "streams", None)
        if isinstance(streams, dict):
            stack += list(streams.values())
        stack += list(getattr(getattr(layer, "context", None), "layers", None) or ())
    return None


class WebSocketGuard:
    def __init__(self, config: Config, ledger: Ledger, audit: AuditLog, credentials: Any, proxyserver: Any) -> None:
        self.config = config
        self.settings = config.spend
        self.ledger = ledger
        self.audit = audit
        self.credentials = credentials  # CredentialGuard: `leak` and its key scanner
        self.proxyserver = proxyserver
        self.services: dict[str, Service] = {s.name: s for s in config.services}
        self.meters = {s.name: s.meter or METER_OF.get(s.name) for s in config.services}

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
        path = flow.request.path
        if not service.websocket:
            # 426, not 403: a client with an HTTP transport takes it as "use that" (Codex CLI
            # falls back at once; after a 403 it retries the WebSocket five times first)
            return 426, (
                f"WebSocket is turned off for {service.name} (services.{service.name}.websocket: false); "
                "use its HTTP API"
            )
        how = self.meters.get(service.name)
        agent = self.config.agents.get(st.agent or "")
        if how is None or agent is None:
            return None
        session = st.session or ""
        api = ws_api(how.api, path)
        if api is None:
            if self._limited(agent.limits, agent.name, service.name, session):
                return 403, (
                    f"egress-guard cannot meter WebSocket calls to {path.split('?', 1)[0]} of {service.name}, "
                    f"and agent {agent.name} has limits there; use the HTTP API"
                )
            return None
        model = url_model(path) if api == REALTIME else ""
        if model and not model_allowed(agent.limits, service.name, model, session):
            return 403, self._not_allowed(agent.limits, agent.name, service.name, model, session)
        return None

    def _limited(self, limits: Limits, agent: str, service: str, session: str) -> bool:
        """Whether a budget, token rate or model allowlist applies to this agent's calls."""
        return (
            limits.tokens_per_minute is not None
            or allowed_models(limits, service, session) is not None
            or any(self.ledger.limit(limits, agent, scope, session) is not None for scope in SCOPES)
        )

    @staticmethod
    def _not_allowed(limits: Limits, agent: str, service: str, model: str, session: str) -> str:
        allowed = ", ".join(allowed_models(limits, service, session) or ())
        return f"model {model!r} is not allowed for agent {agent} on {service} (allowed: {allowed})"

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

    def _guard_control_frames(self, flow: http.HTTPFlow, conn: WsConn) -> None:
        """Ping/pong payloads and close reasons pass no hook (addons/_mitm.py filters them
        through these): to the agent, the secret is masked; to the upstream, a key bound
        elsewhere blanks the frame and closes the connection. Frames on a connection with
        no filter go out blank."""

        def to_agent(event: Any) -> Any:
            forms = conn.relay.forms
            if forms is None:
                return event
            if isinstance(event, wsproto.events.CloseConnection):
                reason = (event.reason or "").encode()
                masked = forms.scrub(reason)
                return event if masked is reason else wsproto.events.CloseConnection(event.code, masked.decode())
            payload = bytes(event.payload)
            masked = forms.scrub(payload)
            return event if masked is payload else type(event)(payload=masked)

        def to_upstream(event: Any) -> Any:
            if conn.leak is None:
                return event
            closing = isinstance(event, wsproto.events.CloseConnection)
            if closing and conn.closing is not None:
                return event  # egress-guard's own close: the reason is its words
            data = (event.reason or "").encode() if closing else bytes(event.payload)
            if not data:
                return event
            joined = conn.scan_tail + data
            why = conn.leak(joined)
            conn.scan_tail = joined[-conn.window :]
            if not why:
                return event
            log.warning("SECURITY %s: %s (id %s); WebSocket closed", Credential.UNBOUND_HOST.value, why, flow.id)
            self.audit.record(
                self._row(flow, conn, f"{flow.id}:ws-leak", Verdict.DENY, why, 403, credential=Credential.UNBOUND_HOST)
            )
            if closing:  # already closing: the close goes on, without the reason
                return wsproto.events.CloseConnection(code=CLOSE_POLICY, reason=None)
            self._close(flow, conn, CLOSE_POLICY, why)
            return type(event)(payload=b"")

        WS_CONTROL[flow.client_conn.id] = to_agent
        WS_CONTROL[flow.server_conn.id] = to_upstream

    def _conn(self, flow: http.HTTPFlow) -> WsConn:
        st = state(flow)
        target = st.target
        host, port = (str(target[0]), int(target[1])) if target else (flow.request.host, flow.request.port)
        service = st.service
        agent = self.config.agents.get(st.agent or "")
        how = self.meters.get(service or "")
        api = ws_api(how.api, flow.request.path) if how is not None and agent is not None else None
        forms = st.scrub
        scanner = self.credentials.scanner
        leak = None
        if scanner.max_len:
            leak = lambda data: self.credentials.leak(host, data, "a WebSocket message")  # noqa: E731
        path = flow.request.path if self.config.audit_query_strings else flow.request.path.split("?", 1)[0]
        return WsConn(
            host=host,
            port=port,
            path=path,
            service=service,
            agent=agent.name if agent is not None else None,
            session=st.session,
            limits=agent.limits if agent is not None else None,
            api=api,
            price_as=how.provider if how is not None else "",
            model=url_model(flow.request.path) if api == REALTIME else "",
            relay=Relay(forms, lambda content, is_text: self._inject(flow, content, is_text)),
            leak=leak,
            window=getattr(scanner, "window", 0) or 6 * scanner.max_len,
        )

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
            while conn.calls:  # forwarded and never finished: the provider may have charged
                call = conn.calls.popleft()
                self._settle(
                    flow,
                    conn,
                    call,
                    None,
                    None,
                    True,
                    "the connection closed before the response completed: billed at its reservation",
                )
            if conn.closing is None and st.key_id:
                record = await self.credentials.keys.lookup(st.key_id)  # cached: no I/O
                if record is not None and record.revoked_at:
                    conn.closing = f"cut: its key {record.key_id} was revoked ({record.revoked_reason})"
                    conn.close_verdict = Verdict.DENY
            self.audit.record(self._close_row(flow, conn))
        except Exception:
            log.exception("could not record the end of WebSocket %s", flow.id)

    # --- from the agent --------------------------------------------------------------------

    async def _from_agent(self, flow: http.HTTPFlow, conn: WsConn, msg: websocket.WebSocketMessage) -> None:
        data = msg.content
        conn.agent_messages += 1
        conn.agent_bytes += len(data)
        if conn.leak is not None:
            joined = conn.scan_tail + data
            why = conn.leak(joined)
            conn.scan_tail = joined[-conn.window :]
            if why:
                msg.drop()
                log.warning("SECURITY %s: %s (id %s); WebSocket closed", Credential.UNBOUND_HOST.value, why, flow.id)
                self.audit.record(
                    self._row(
                        flow, conn, f"{flow.id}:ws-leak", Verdict.DENY, why, 403, credential=Credential.UNBOUND_HOST
                    )
                )
                self._close(flow, conn, CLOSE_POLICY, why)
                return
        if conn.api is None:
            return
        if not msg.is_text:  # these APIs speak JSON text: a binary message could hide a call
            self._refuse(flow, conn, msg, 400, "binary messages are not part of this API", None, "invalid_request")
            return
        if conn.api == REALTIME:
            if b"input_audio_buffer.append" in data[:80]:
                conn.audio_bytes += len(data)
            else:
                conn.text_bytes += len(data)
        event = client_message(conn.api, flow.request.path, conn.model, data, conn.price_as)
        if isinstance(event, Unreadable):
            self._refuse(flow, conn, msg, 400, event.reason, None, "invalid_request")
        elif isinstance(event, SetModel):
            if not self._allowed(conn, event.model):
                self._refuse(
                    flow, conn, msg, 403, self._reason_model(conn, event.model), event.model, "model_not_allowed"
                )
            else:
                conn.model = event.model
        elif isinstance(event, Create):
            await self._start_call(flow, conn, msg, event)

    def _allowed(self, conn: WsConn, model: str) -> bool:
        assert conn.limits is not None and conn.service is not None
        return model_allowed(conn.limits, conn.service, model, conn.session or "")

    def _reason_model(self, conn: WsConn, model: str) -> str:
        assert conn.limits is not None and conn.service is not None and conn.agent is not None
        return self._not_allowed(conn.limits, conn.agent, conn.service, model, conn.session or "")

    async def _start_call(
        self, flow: http.HTTPFlow, conn: WsConn, msg: websocket.WebSocketMessage, event: Create
    ) -> None:
        assert conn.limits is not None and conn.agent is not None
        m = event.metered
        if event.carried:
            extra = conn.carried + audio_bytes_as_tokens(conn.audio_bytes) + conn.text_bytes // 3
            m = carry(m, extra)
        if not self._allowed(conn, m.model):
            self._refuse(flow, conn, msg, 403, self._reason_model(conn, m.model), m.model, "model_not_allowed")
            return
        try:
            usd, tokens = reserve(self.settings, m)
        except Unpriced as exc:
            self._refuse(flow, conn, msg, 403, str(exc), m.model, "model_not_priced")
            return
        try:
            hold = self.ledger.admit(conn.limits, conn.agent, conn.session or "", usd, tokens)
        except Refusal as refusal:
            code = "rate_limit_exceeded" if refusal.status == 429 else "egress_denied"
            self._refuse(flow, conn, msg, refusal.status, refusal.reason, m.model, code, refusal.retry_after)
            return
        conn.seq += 1
        call = _Call(conn.seq, f"{flow.id}:ws{conn.seq}", m, hold, len(msg.content))
        why = await self._intent(conn, call)
        if why is not None:
            self.ledger.settle(hold, Decimal(0), 0)
            reason = f"the call's reservation could not be recorded, so it was not forwarded: {why}"
            self._refuse(flow, conn, msg, 503, reason, m.model, "egress_error", intent_id=call.request_id)
            return
        conn.calls.append(call)
        conn.calls_made += 1

    async def _intent(self, conn: WsConn, call: _Call) -> str | None:
        """Commit the call's reservation before it is forwarded (if the proxy stops before the
        call's row is written, the next start bills it); the reason if that failed."""
        commit = getattr(self.audit, "intent", None)
        if commit is None:  # an audit log without intents (before they land)
            return None
        from egress_guard.audit import Intent

        hold = call.hold
        try:
            await commit(
                Intent(
                    request_id=call.request_id,
                    ts=now_iso(),
                    agent=hold.agent,
                    session=hold.session,
                    service=conn.service,
                    model=call.metered.model,
                    day=hold.day,
                    reserved_usd=f"{hold.usd:f}",
                    method="WS",
                    host=conn.host,
                    port=conn.port,
                    path=conn.path,
                )
            )
        except Exception as exc:  # AuditUnavailable
            return str(exc)
        return None

    def _refuse(
        self,
        flow: http.HTTPFlow,
        conn: WsConn,
        msg: websocket.WebSocketMessage,
        status: int,
        reason: str,
        model: str | None,
        code: str,
        retry_after: int | None = None,
        intent_id: str | None = None,
    ) -> None:
        """Refuse one message: it is dropped, the agent gets an `error` event in the API's
        shape (the connection stays open), and a row records it."""
        msg.drop()
        conn.refused += 1
        kind = "egress_denied" if status < 500 else "egress_error"
        error: dict[str, Any] = {
            "type": kind,
            "code": code,
            "message": f"egress-guard: {reason}",
            "param": None,
        }
        event: dict[str, Any] = {"type": "error", "status": status, "error": error}
        headers = {"x-egress-guard-decision": "deny" if status < 500 else "error"}
        if retry_after is not None:
            headers["retry-after"] = str(retry_after)
        event["headers"] = headers
        conn.relay.send(json.dumps(event).encode(), True)
        verdict = Verdict.DENY if status < 500 else Verdict.ERROR
        conn.seq += 1
        request_id = intent_id or f"{flow.id}:ws{conn.seq}"
        row = self._row(flow, conn, request_id, verdict, reason, status, request_bytes=len(msg.content))
        row.model = model
        self.audit.record(row)

    # --- from the upstream -------------------------------------------------------------------

    async def _from_upstream(self, flow: http.HTTPFlow, conn: WsConn, msg: websocket.WebSocketMessage) -> None:
        data = msg.content
        conn.upstream_messages += 1
        conn.upstream_bytes += len(data)
        if conn.api is not None and msg.is_text:
            if conn.calls:
                conn.calls[0].response_bytes += len(data)
            event = server_message(conn.api, data)
            if isinstance(event, Started):
                for call in conn.calls:
                    if not call.started:
                        call.started = True
                        break
            elif isinstance(event, SetModel):
                conn.model = event.model
            elif isinstance(event, Finished):
                n = self._finished(flow, conn, event)
                if n is not None and not await self._durable(flow, conn, n, msg):
                    return
            elif isinstance(event, Failed) and conn.calls:
                call = conn.calls.popleft()
                note = f"the upstream answered with an error event (status {event.status})"
                self._settle(flow, conn, call, None, event.status or 502, call.started, note)
        conn.relay.upstream(msg)

    def _finished(self, flow: http.HTTPFlow, conn: WsConn, event: Finished) -> Any:
        """Settle the call this event ends and record its row; returns the row's number."""
        if conn.api == REALTIME:
            conn.audio_bytes = conn.text_bytes = 0
        # with no open call, the Realtime API started it itself (server-side turn detection)
        call = conn.calls.popleft() if conn.calls else self._unasked(flow, conn)
        if call is None:
            return None
        return self._settle(flow, conn, call, event.usage, 200, True, f"response {event.status}")

    def _unasked(self, flow: http.HTTPFlow, conn: WsConn) -> _Call | None:
        """A call nobody asked for by message: admitted now, at nothing, to be settled at once."""
        if conn.agent is None or conn.limits is None:
            return None
        m = Metered("openai", REALTIME, conn.model, None, True, 0, conn.price_as)
        try:
            hold = self.ledger.admit(conn.limits, conn.agent, conn.session or "", Decimal(0), 0)
        except Refusal:  # over a limit already: the usage is still spent
            hold = Hold(conn.agent, conn.session or "", self.ledger.day(), Decimal(0), 0)
            hold.settled = True
        conn.seq += 1
        conn.calls_made += 1
        return _Call(conn.seq, f"{flow.id}:ws{conn.seq}", m, hold, 0, started=True)

    def _settle(
        self,
        flow: http.HTTPFlow,
        conn: WsConn,
        call: _Call,
        usage: dict[str, Any] | None,
        status: int | None,
        billable: bool,
        note: str,
    ) -> Any:
        """Settle the call, record its row; returns the row's number (for `_durable`)."""
        hold = call.hold
        over_limit = hold.settled  # an unasked Realtime response admitted over a limit
        c = None
        if usage is not None:
            try:
                c = cost(self.settings, call.metered, usage)
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
            conn.carried = carried_tokens(c)
        if c is not None:
            conn.billed += c.usd
        row = self._row(
            flow,
            conn,
            call.request_id,
            Verdict.ALLOW,
            f"WebSocket {call.metered.flavor} call: {note}",
            status,
            request_bytes=call.request_bytes,
            response_bytes=call.response_bytes,
            since=call.started_at,
        )
        row.model = c.model if c is not None else call.metered.model
        if c is not None:
            row.input_tokens, row.output_tokens, row.cached_tokens = c.input_tokens, c.output_tokens, c.cached_tokens
            row.cost_usd = f"{c.usd:f}"
        n = self.audit.record(row)
        if conn.api == REALTIME and conn.limits is not None and self._exhausted(conn):
            # the Realtime API answers by itself (server-side turn detection): no message of
            # the agent's can be refused to stop it, so the connection is
            self._close(flow, conn, CLOSE_POLICY, f"agent {conn.agent}'s budget is spent")
        return n

    def _exhausted(self, conn: WsConn) -> bool:
        assert conn.limits is not None and conn.agent is not None
        session = conn.session or ""
        for scope, key in self.ledger.keys(conn.agent, session, self.ledger.day()):
            cap = self.ledger.limit(conn.limits, conn.agent, scope, session)
            if cap is not None and self.ledger.spent.get(key, Decimal(0)) >= cap:
                return True
        return False

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

    def _inject(self, flow: http.HTTPFlow, content: bytes, is_text: bool) -> None:
        self.proxyserver.inject_websocket(flow, True, content, is_text)

    def _close(self, flow: http.HTTPFlow, conn: WsConn | None, code: int, why: str) -> None:
        """Close both sides with `code` (1008: policy violation), or cut the connection."""
        import wsproto.events
        from wsproto.connection import ConnectionState

        if conn is None:
            state(flow).ws_closing = True
        else:
            if conn.closing is not None:
                return
            conn.closing = f"closed by egress-guard ({code}): {why}"
            conn.close_verdict = Verdict.DENY if code == CLOSE_POLICY else Verdict.ERROR
            conn.relay.stop()
        layer = _ws_layer(self.proxyserver, flow)
        client_ws = getattr(layer, "client_ws", None)
        if client_ws is not None and client_ws.state is ConnectionState.OPEN:
            reason = f"egress-guard: {why}".encode()[:120].decode(errors="ignore")
            client_ws._events.append(wsproto.events.CloseConnection(code=code, reason=reason))
            self.proxyserver.inject_websocket(flow, False, b"", True)  # makes the layer read it
        else:
            cut_client(self.proxyserver, flow.client_conn.id)

    def _row(
        self,
        flow: http.HTTPFlow,
        conn: WsConn,
        request_id: str,
        verdict: Verdict,
        reason: str,
        status: int | None,
        *,
        credential: Credential | None = None,
        request_bytes: int | None = None,
        response_bytes: int | None = None,
        since: float | None = None,
    ) -> AuditRow:
        peer = flow.client_conn.peername
        st = state(flow)
        decision = st.decision
        if credential is None:
            credential = st.credential
        return AuditRow(
            ts=now_iso(),
            request_id=request_id,
            kind="request",
            decision=verdict.value,
            reason=reason,
            rule=decision.rule if decision is not None else None,
            client=f"{peer[0]}:{peer[1]}" if peer else None,
            method="WS",
            scheme="wss" if flow.request.scheme == "https" else "ws",
            host=conn.host,
            port=conn.port,
            path=conn.path,
            status=status,
            request_bytes=request_bytes,
            response_bytes=response_bytes,
            duration_ms=round((time.time() - (since or conn.started_at)) * 1000, 2),
            agent=st.agent,
            session=st.session,
            service=conn.service,
            credential=str(credential) if credential is not None else None,
        )

    def _close_row(self, flow: http.HTTPFlow, conn: WsConn) -> AuditRow:
        ws = flow.websocket
        code = ws.close_code if ws is not None else None
        if conn.closing is not None:
            how = conn.closing
        elif ws is not None and ws.closed_by_client is not None:
            side = "the agent" if ws.closed_by_client else "the upstream"
            how = f"closed by {side}" + (" without a close frame" if code == 1006 else "") + f" ({code})"
        else:
            how = f"connection lost ({code})"
        reason = (
            f"WebSocket {how}: {conn.agent_messages} messages ({conn.agent_bytes} bytes) from the agent, "
            f"{conn.upstream_messages} messages ({conn.upstream_bytes} bytes) from the upstream"
        )
        if conn.api is not None:
            reason += f"; {conn.calls_made} model calls, ${conn.billed:f} billed"
            if conn.refused:
                reason += f", {conn.refused} refused"
        verdict = conn.close_verdict or Verdict.ALLOW
        row = self._row(
            flow,
            conn,
            f"{flow.id}:close",
            verdict,
            reason,
            None,  # no HTTP status: the close code has a column of its own
            request_bytes=conn.agent_bytes,
            response_bytes=conn.upstream_bytes,
        )
        row.ws_messages_out, row.ws_messages_in, row.ws_close_code = conn.agent_messages, conn.upstream_messages, code
        return row
