"""FailureAnswers: a failed flow gets egress-guard's answer, not mitmproxy's HTML page.

Runs in `error`, for a flow that failed before any response reached the agent (the `Failure`
that addons/_mitm.py puts in its flow state says so): the upstream could not be reached, its
TLS failed or is not trusted, it hung up, one of the timeouts ran out (504), or mitmproxy's
parser refused the request (400). The answer is a rejection like every other (status, the
provider's error shape, X-Egress-Guard-* headers) with a reason that names the cause and,
where there is one, the fix; its status is what the audit row records. Never quotes bytes
from the upstream: mitmproxy's messages pass through `safe_text`.
"""

from __future__ import annotations

from mitmproxy import http

from egress_guard.addons._flow import reject, safe_text
from egress_guard.addons.flow import state
from egress_guard.addons.timeouts import Timeouts
from egress_guard.policy import Decision, Verdict

# mitmproxy's advice to its own users (change an option) is wrong for egress-guard's
MITM_ADVICE = (" Disable the validate_inbound_headers option", " This usually indicates a misconfiguration")


def _words(message: str) -> str:
    for advice in MITM_ADVICE:
        message = message.partition(advice)[0]
    return safe_text(message)


def upstream_reason(message: str, host: str, port: int) -> str:
    """Why the upstream failed, in words an operator can act on."""
    if message.startswith("Certificate verify failed"):
        detail = safe_text(message.partition(": ")[2] or message)
        return (
            f"the TLS certificate of {host} is not trusted ({detail}); if {host} uses a private or "
            "corporate CA, add that CA's PEM file to network.upstream_ca in the config"
        )
    if message == "connection closed":  # mitmproxy's words for a TLS handshake the upstream cut
        return f"{host}:{port} closed the connection during the TLS handshake"
    return f"the upstream {host}:{port} failed: {_words(message)}"


def parser_reason(flow: http.HTTPFlow, message: str) -> str:
    """Why mitmproxy's parser refused the request, without its advice to change its options."""
    if flow.request.method.upper() == "CONNECT":
        message = "a CONNECT inside a tunnel"
    elif "refusing to prevent request smuggling" in message:
        message = message.partition(" from client")[0] + " (a request smuggling pattern)"
    return f"the proxy's HTTP parser refused the request: {_words(message)}"


def refused_head(message: str) -> str:
    """Why mitmproxy's parser refused a request head before any flow existed (`message` may
    quote the agent's bytes: only fixed words and safe_text leave here)."""
    what = safe_text(message, 160)
    if message.startswith("Bad HTTP request line: "):
        line = message.partition(": ")[2].strip("b'\"")
        target = line.split(" ")[1] if line.count(" ") >= 2 else ""
        authority = target.partition("//")[2].partition("/")[0] if "//" in target else ""
        if "@" in authority:
            what = "a URL with user:password@ (userinfo) is not accepted"
        elif "%" in authority:
            what = "a percent-encoded host is not accepted"
        else:
            what = "bad request line"
    return f"the proxy's HTTP parser refused the request: {what}"


class FailureAnswers:
    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts

    def error(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        failure = st.failure
        if failure is None or failure.status is None:
            return  # nothing can reach the agent any more (gone, or the response under way)
        message = flow.error.msg if flow.error is not None else ""
        target = st.target
        host, port = (str(target[0]), int(target[1])) if target else (flow.request.host, flow.request.port)
        rule = st.decision.rule if st.decision is not None else None
        timeout = st.timeout
        if failure.client:
            decision, status = Decision(Verdict.DENY, parser_reason(flow, message), rule), failure.status
        elif timeout is not None:
            decision, status = Decision(Verdict.ERROR, self.timeouts.reason(timeout, host, port), rule), 504
        else:
            decision, status = Decision(Verdict.ERROR, upstream_reason(message, host, port), rule), failure.status
        reject(flow, decision, status)
