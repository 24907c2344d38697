"""The audit rows of a WebSocket connection: one per metered call (and per refused message),
one for a key caught on its way up, one when it closes. Built from the flow state and the
connection's state (egress_guard.ws_conn); WebSocketGuard records them."""

from __future__ import annotations

import time

from mitmproxy import http

from egress_guard.addons.flow import state
from egress_guard.credentials import Credential
from egress_guard.policy import Verdict
from egress_guard.store import AuditRow
from egress_guard.timeutil import now_iso
from egress_guard.ws_conn import WsConn
from egress_guard.ws_meter import Settled


def ws_row(
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
    """One row of the connection (method WS): `verdict` and `reason` for `request_id`."""
    st = state(flow)
    peer = flow.client_conn.peername
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


def call_row(flow: http.HTTPFlow, conn: WsConn, settled: Settled) -> AuditRow:
    """The row of a metered call that ended: its tokens and what it was billed."""
    call, c = settled.call, settled.cost
    row = ws_row(
        flow,
        conn,
        call.request_id,
        Verdict.ALLOW,
        settled.note,
        settled.status,
        request_bytes=call.request_bytes,
        response_bytes=call.response_bytes,
        since=call.started_at,
    )
    row.model = c.model if c is not None else call.metered.model
    if c is not None:
        row.input_tokens, row.output_tokens, row.cached_tokens = c.input_tokens, c.output_tokens, c.cached_tokens
        row.cost_usd = f"{c.usd:f}"
    return row


def close_row(flow: http.HTTPFlow, conn: WsConn) -> AuditRow:
    ws = flow.websocket
    code = ws.close_code if ws is not None else None
    reason = conn.close_reason(code, ws.closed_by_client if ws is not None else None)
    row = ws_row(
        flow,
        conn,
        f"{flow.id}:close",
        conn.close_verdict or Verdict.ALLOW,
        reason,
        None,  # no HTTP status: the close code has a column of its own
        request_bytes=conn.agent_bytes,
        response_bytes=conn.upstream_bytes,
    )
    row.ws_messages_out, row.ws_messages_in, row.ws_close_code = conn.agent_messages, conn.upstream_messages, code
    return row
