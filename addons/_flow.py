"""What the egress-guard addons share besides the flow state (addons/flow.py): the one place
rejections are made, and the fail-closed wrapper every hook wears.

mitmproxy catches an exception in a hook, logs it and lets the flow continue — a request
whose check crashed would still go upstream. `fail_closed` turns such a crash into an error
response (request phase) or a killed flow (response phase), recorded in the audit log.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from egress_guard import providers
from egress_guard.addons.flow import state
from egress_guard.policy import Decision, Verdict

log = logging.getLogger("egress_guard")

STATUS_FOR = {Verdict.DENY: 403, Verdict.ERROR: 502}
HEADER_SAFE = str.maketrans({c: " " for c in "\r\n\x00"})


def safe_text(text: str, limit: int = 200) -> str:
    """`text` fit for a reason, a header or a log line: no bytes from the wire (mitmproxy
    quotes them as b'...'; a hostile upstream could echo a secret there), no control
    characters, at most `limit` characters."""
    for quote in ("b'", 'b"', "bytearray("):
        cut = text.find(quote)
        if cut != -1:
            text = text[:cut].rstrip(" :(=") + " (bytes omitted)"
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def rejection(
    decision: Decision, request_id: str, status: int | None = None, style: str | None = None
) -> http.Response:
    """The response for every refusal egress-guard makes, CONNECT and request level alike."""
    kind = "egress_denied" if decision.verdict is Verdict.DENY else "egress_error"
    status = status or STATUS_FOR[decision.verdict]
    ours = {
        "type": kind,
        "message": f"egress-guard: {decision.reason}",
        "rule": decision.rule,
        "request_id": request_id,
    }
    body = providers.get(style).error_body(ours, status)  # its SDKs show egress-guard's reason
    reason = decision.reason.translate(HEADER_SAFE)[:300]
    return http.Response.make(
        status,
        json.dumps(body).encode(),
        {
            "Content-Type": "application/json",
            "X-Egress-Guard-Decision": decision.verdict.value,
            "X-Egress-Guard-Reason": reason.encode("ascii", "replace").decode(),
            "X-Egress-Guard-Request-Id": request_id,
            "Connection": "close" if decision.verdict is Verdict.ERROR else "keep-alive",
        },
    )


READ_REFUSED_BODY_UP_TO = 64 << 20  # a refused upload of known size is read (to answer it) up to this


def reject(flow: http.HTTPFlow, decision: Decision, status: int | None = None) -> None:
    """Refuse `flow` with egress-guard's answer, in the error shape of its service (known
    APIs get refusals in their own shape, so their SDKs show egress-guard's reason).

    A request whose body was to stream upstream (RequestGuard: over 1 MiB, or of unknown
    length), refused at its headers: mitmproxy cannot answer and stream at once, so a body
    of known size up to 64 MiB is read and dropped, then answered (and the connection
    closed); one of unknown or larger size is not read at all: the connection is cut (the
    row says why)."""
    st = state(flow)
    st.decision = decision
    req = flow.request
    if req.stream and req.timestamp_end is None:  # at its headers: nothing of the body sent yet
        length = req.headers.get("content-length", "")
        if not (length.isdigit() and int(length) <= READ_REFUSED_BODY_UP_TO):
            abort_connection(flow)
            return
        req.stream = False
        st.own_response = True
        flow.response = rejection(decision, flow.id, status, st.style)
        flow.response.headers["connection"] = "close"
        return
    st.own_response = True
    flow.response = rejection(decision, flow.id, status, st.style)


def answered(flow: http.HTTPFlow) -> bool:
    """Already answered, errored or dead: nothing more for a request-phase hook to do."""
    return flow.response is not None or flow.error is not None or not flow.live


Hook = Callable[..., Any]


def crashed(name: str, phase: str, flow: Any, exc: BaseException) -> None:
    """Fail closed after hook `name` raised `exc`: phase "request" answers 502 (or keeps the
    refusal already set); "response" kills the flow (the response may be half sent, so no new
    one can replace it); "connection" aborts the agent's connection (a WebSocket: mitmproxy's
    WebSocket layer never looks at a killed flow); anything else is only logged."""
    log.error("egress-guard hook %s failed on %s: %r", name, getattr(flow, "id", flow), exc, exc_info=exc)
    if phase not in ("request", "response", "connection") or not isinstance(flow, http.HTTPFlow):
        return
    decision = Decision(Verdict.ERROR, f"internal error in {name} ({type(exc).__name__}); request refused")
    if phase == "connection":
        state(flow).decision = decision
        abort_connection(flow)
    elif phase == "request" and flow.response is None:
        reject(flow, decision, 502)
    else:
        state(flow).decision = decision
        if flow.killable:
            flow.kill()


def fail_closed(phase: str) -> Callable[[Hook], Hook]:
    """Wrap a flow hook so an exception refuses the flow instead of letting it through.

    phase "request": answer 502 with the error; "response": kill the flow (the response
    may be half sent, so no new one can replace it).
    """

    def wrap(hook: Hook) -> Hook:
        if inspect.iscoroutinefunction(hook):

            @functools.wraps(hook)
            async def async_wrapper(self: Any, flow: http.HTTPFlow) -> None:
                try:
                    await hook(self, flow)
                except Exception as exc:
                    crashed(hook.__qualname__, phase, flow, exc)

            return async_wrapper

        @functools.wraps(hook)
        def wrapper(self: Any, flow: http.HTTPFlow) -> None:
            try:
                hook(self, flow)
            except Exception as exc:
                crashed(hook.__qualname__, phase, flow, exc)

        return wrapper

    return wrap


def abort_connection(flow: http.HTTPFlow) -> None:
    """Abort the agent's connection and the upstream connections it holds, now: the one way
    to stop a flow in transit (a streamed body, a WebSocket), which `flow.kill()` cannot."""
    from mitmproxy import ctx

    from egress_guard.addons.killswitch import cut_client

    proxyserver = ctx.master.addons.get("proxyserver")
    if (proxyserver is None or not cut_client(proxyserver, flow.client_conn.id)) and flow.killable:
        flow.kill()
