"""What the egress-guard addons share: metadata keys, the one place rejections are made,
and the fail-closed wrapper every hook wears.

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

from egress_guard.policy import Decision, Verdict

log = logging.getLogger("egress_guard")

DECISION = "egress_guard.decision"  # Decision: the verdict on this flow
TARGET = "egress_guard.target"  # (host, port): the destination as the agent named it
DIALED = "egress_guard.dialed"  # str: the vetted address the proxy connects to
REQUEST_BYTES = "egress_guard.request_bytes"
RESPONSE_BYTES = "egress_guard.response_bytes"
OWN_RESPONSE = "egress_guard.own_response"  # True: the response is a refusal egress-guard made
STATUS_FOR = {Verdict.DENY: 403, Verdict.ERROR: 502}
HEADER_SAFE = str.maketrans({c: " " for c in "\r\n\x00"})


def rejection(decision: Decision, request_id: str, status: int | None = None) -> http.Response:
    """The response for every refusal egress-guard makes, CONNECT and request level alike."""
    kind = "egress_denied" if decision.verdict is Verdict.DENY else "egress_error"
    body = {
        "error": {
            "type": kind,
            "message": f"egress-guard: {decision.reason}",
            "rule": decision.rule,
            "request_id": request_id,
        }
    }
    reason = decision.reason.translate(HEADER_SAFE)[:300]
    return http.Response.make(
        status or STATUS_FOR[decision.verdict],
        json.dumps(body).encode(),
        {
            "Content-Type": "application/json",
            "X-Egress-Guard-Decision": decision.verdict.value,
            "X-Egress-Guard-Reason": reason.encode("ascii", "replace").decode(),
            "X-Egress-Guard-Request-Id": request_id,
            "Connection": "close" if decision.verdict is Verdict.ERROR else "keep-alive",
        },
    )


def reject(flow: http.HTTPFlow, decision: Decision, status: int | None = None) -> None:
    flow.metadata[DECISION] = decision
    flow.metadata[OWN_RESPONSE] = True
    flow.response = rejection(decision, flow.id, status)


def answered(flow: http.HTTPFlow) -> bool:
    """Already answered, errored or dead: nothing more for a request-phase hook to do."""
    return flow.response is not None or flow.error is not None or not flow.live


Hook = Callable[..., Any]


def fail_closed(phase: str) -> Callable[[Hook], Hook]:
    """Wrap a flow hook so an exception refuses the flow instead of letting it through.

    phase "request": answer 502 with the error; "response": kill the flow (the response
    may be half sent, so no new one can replace it).
    """

    def crashed(hook: Hook, flow: http.HTTPFlow, exc: Exception) -> None:
        log.error("egress-guard hook %s failed on %s: %r", hook.__qualname__, flow.id, exc, exc_info=exc)
        decision = Decision(
            Verdict.ERROR, f"internal error in {hook.__qualname__} ({type(exc).__name__}); request refused"
        )
        if phase == "request" and flow.response is None:
            reject(flow, decision, 502)
        else:
            flow.metadata[DECISION] = decision
            if flow.killable:
                flow.kill()

    def wrap(hook: Hook) -> Hook:
        if inspect.iscoroutinefunction(hook):

            @functools.wraps(hook)
            async def async_wrapper(self: Any, flow: http.HTTPFlow) -> None:
                try:
                    await hook(self, flow)
                except Exception as exc:
                    crashed(hook, flow, exc)

            return async_wrapper

        @functools.wraps(hook)
        def wrapper(self: Any, flow: http.HTTPFlow) -> None:
            try:
                hook(self, flow)
            except Exception as exc:
                crashed(hook, flow, exc)

        return wrapper

    return wrap
