"""The flow state: everything the egress-guard addons tell each other about one flow.

Addons never call each other: what one decides, the next reads here. `state(flow)` is the one
way in (created on first use, kept in `flow.metadata` under one key), and `FlowState` is the
contract — each field says which addon sets it and which read it, and mypy checks every
access. A new field goes here, with its setter and readers, or nowhere.

Imports nothing at run time but the standard library: every addon imports this module, so
it must never import one of them (the types below are for mypy only).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mitmproxy import http

    from egress_guard.credentials import Credential
    from egress_guard.forms import SecretForms
    from egress_guard.hosts import Host
    from egress_guard.ledger import Hold
    from egress_guard.policy import Decision
    from egress_guard.pricing import Cost
    from egress_guard.providers import Metered
    from egress_guard.verdicts import Outcome, Policy
    from egress_guard.ws_conn import WsConn

KEY = "egress_guard"  # the one flow.metadata key egress-guard uses


@dataclass(frozen=True, slots=True)
class Failure:
    """What mitmproxy is about to do with a flow that failed, told to the `error` hook.

    `status`: the error page mitmproxy would send the agent (400, 413, 502), or None when it
    can send nothing (the response is already under way, the client is gone): only then may
    an `error` hook answer, by setting `flow.response`. `client`: the agent's side failed
    (a request mitmproxy's parser refused, a disconnect), not the upstream's.
    """

    status: int | None
    client: bool


@dataclass(slots=True)
class FlowState:
    """What the addons leave on one flow, in the order the chain sets it."""

    # --- where it goes: ConnectGuard (CONNECT), RequestGuard (each request) ----------------
    target: tuple[Host, int] | None = None
    """The destination as the agent named it. Set by ConnectGuard / RequestGuard; read by
    CredentialGuard (the service's host), SpendGuard (intents), WebSocketGuard,
    FailureAnswers (reasons) and AuditRecorder (the row's host)."""
    style: str | None = None
    """The error shape of the target's service: the API it speaks (a Provider's name: openai,
    anthropic, google, github; `providers.error_styles`), None for a host of no service. Set
    with `target` by ConnectGuard / RequestGuard from the config's services; read by
    `_flow.reject`."""
    dialed: str | None = None
    """The vetted address the proxy connects to. Set by RequestGuard; CredentialGuard refuses
    a request without it (it was never vetted)."""
    decision: Decision | None = None
    """The verdict on this flow, the latest one wins. Set by every guard that allows or
    refuses (`_flow.reject` for refusals), FailureAnswers and `_flow.crashed`; read by
    AuditRecorder (no decision: refused), FailureAnswers and WebSocketGuard (the rule)."""
    own_response: bool = False
    """The response is a refusal egress-guard made (`_flow.reject`). ResponseStreamer leaves
    it alone; AuditRecorder records its status and never cuts it for a late audit row."""

    # --- the policy: RequestGuard / ConnectGuard (which one), PolicyGuard (its verdict) -------
    policy: Policy | None = None
    """The policy snapshot this flow is judged under, taken when a guard first looks at it
    (`policy_guard.flow_policy`): a reload mid-request never changes the rules it meets."""
    deferred: bool = False
    """The allowlist refused the request but the policy may still admit it: RequestGuard left
    the verdict to PolicyGuard (AuditRecorder refuses it at `request` if none came)."""
    judged: bool = False
    """PolicyGuard evaluated the policy on it (at its headers when the body streams, else
    with the body)."""
    observed: Outcome | None = None
    """Observe mode: what the policy would have done (deny, escalate). Set by PolicyGuard;
    read by AuditRecorder (the row's decision: would-deny / would-escalate)."""
    watched: bool = False
    """FreezeWatch counted the flow in its agent's baseline (once per flow)."""

    # --- who asks: CredentialGuard (or AuditRecorder's attribution of a refusal) -------------
    service: str | None = None
    """The credentialed service of the target host. Set by CredentialGuard; read by
    SpendGuard, WebSocketGuard and AuditRecorder."""
    secret_params: frozenset[str] = frozenset()
    """The query parameters that carry the service's credential (its `query:` slots, such
    as Gemini's `key`): `recorded_path` redacts their values. Set with `service`."""
    agent: str | None = None
    """The agent the egress-guard key identified. Set by CredentialGuard (or AuditRecorder
    when it attributes a refusal); read by SpendGuard, WebSocketGuard and AuditRecorder."""
    session: str | None = None
    """The key's session, set and read with `agent`."""
    key_id: str | None = None
    """The key that was swapped. Set by CredentialGuard; read by WebSocketGuard (a revoked
    key's close row)."""
    credential: Credential | None = None
    """What happened to the agent's credential. Set by CredentialGuard; read by
    AuditRecorder and WebSocketGuard (the rows' credential column)."""
    agent_path: str | None = None
    """The request's path as the agent sent it, before CredentialGuard swapped a real key into
    its query (a query-slot credential such as Gemini's `?key=`): what rows and intents record
    (`recorded_path`), so the real key never reaches the store. Set by CredentialGuard."""
    scrub: SecretForms | None = None
    """Every form of the real secret swapped in, to mask in what comes back. Set by
    CredentialGuard; read by ResponseStreamer and WebSocketGuard."""
    upload_cut: bool = False
    """A streamed request body held a key bound elsewhere: CredentialGuard cut the connection
    midway, and cuts whatever upstream connection opened since in `request`."""

    # --- what it costs: SpendGuard ------------------------------------------------------------
    hold: Hold | None = None
    """The reservation admitted against the agent's budgets and rate limits. Set by
    SpendGuard.request; settled by SpendGuard.response / .error."""
    metered: Metered | None = None
    """The metered call (provider, model, worst case). Set by SpendGuard.request; read by
    SpendGuard and AuditRecorder (the row's model)."""
    drop_usage_chunk: bool = False
    """SpendGuard had the provider rewrite the request to report its usage (an OpenAI chat
    stream's include_usage): what that adds is dropped on the way back (SpendGuard's tap)."""
    usage: Cost | None = None
    """What the response really cost (or its reservation, when billed at it). Set by
    SpendGuard; read by AuditRecorder (tokens and cost columns)."""
    cut: str | None = None
    """Why SpendGuard ended a stream mid-flight (`spend.on_overrun: cut`); AuditRecorder adds
    it to the row's reason."""

    # --- the way back: ResponseStreamer, TimeoutWatch, mitmproxy (addons/_mitm.py) -----------
    scrub_buffered: bool = False
    """ResponseStreamer buffered a credentialed response: it is decoded, scrubbed and
    re-encoded in `response`."""
    request_bytes: int | None = None
    """Bytes of a streamed request body, counted by RequestGuard's counter; None: the body
    was buffered (AuditRecorder measures it)."""
    response_bytes: int | None = None
    """Bytes of a streamed response body, counted by ResponseStreamer; None: buffered."""
    timeout: str | None = None
    """The timeout that ended the flow: "connect", "tls" or "response". Set by TimeoutWatch;
    read by FailureAnswers (504 and the setting to change)."""
    failure: Failure | None = None
    """How mitmproxy failed the flow, set by addons/_mitm.py before the `error` hook; read by
    FailureAnswers (may it answer?) and AuditRecorder (the status the agent got)."""

    # --- WebSocket: WebSocketGuard --------------------------------------------------------------
    ws: WsConn | None = None
    """The WebSocket connection's state (counts, calls in flight, the relay), from
    websocket_start to websocket_end."""
    ws_closing: bool = False
    """WebSocketGuard closed the connection before it had a state."""

    # --- the row: AuditRecorder ---------------------------------------------------------------
    recorded: bool = False
    """The flow's audit row was written (one row per flow, whichever hook comes first)."""
    audit_seq: int | None = None
    """The row's sequence number, for AuditRecorder.response to wait until it is committed."""


REDACTED = "<redacted>"


def recorded_path(flow: http.HTTPFlow, query_strings: bool) -> str:
    """The path an audit row or intent records: as the agent sent it (never with a real key
    swapped into its query), without its query string unless `audit.query_strings` — and then
    with the value of each credential parameter of the service (`secret_params`) redacted:
    the agent's key there, fake or not (a real key it should not hold), is a secret too."""
    st: FlowState | None = flow.metadata.get(KEY)
    path = st.agent_path if st is not None and st.agent_path is not None else flow.request.path
    base, mark, query = path.partition("?")
    if not query_strings:
        return base
    if st is None or not st.secret_params or not query:
        return path
    parts = []
    for part in query.split("&"):
        name = part.partition("=")[0]
        if urllib.parse.unquote_plus(name) in st.secret_params:
            part = f"{name}={REDACTED}"
        parts.append(part)
    return f"{base}{mark}{'&'.join(parts)}"


def state(flow: http.HTTPFlow) -> FlowState:
    """The flow's state, created on first use."""
    st: FlowState | None = flow.metadata.get(KEY)
    if st is None:
        st = flow.metadata[KEY] = FlowState()
    return st
