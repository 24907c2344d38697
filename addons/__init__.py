"""egress-guard's mitmproxy addons. `chain()` is the one place that fixes their order."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

from egress_guard.addons import _flow, _mitm
from egress_guard.addons.attribution import Attribution
from egress_guard.addons.audit_gate import AuditGate
from egress_guard.addons.budget_follower import BudgetFollower
from egress_guard.addons.connect_guard import ConnectGuard, Tunnels
from egress_guard.addons.credential_guard import CredentialGuard
from egress_guard.addons.failures import FailureAnswers
from egress_guard.addons.killswitch import KillSwitch, cut_client, cut_server
from egress_guard.addons.metrics import FlowMetrics
from egress_guard.addons.policy_guard import FreezeWatch, PolicyGuard
from egress_guard.addons.recorder import AuditRecorder
from egress_guard.addons.request_guard import RequestGuard
from egress_guard.addons.sandbox_guard import SandboxGuard
from egress_guard.addons.sandboxes import Sandboxes
from egress_guard.addons.spend_guard import SpendGuard
from egress_guard.addons.streaming import ResponseStreamer
from egress_guard.addons.timeouts import Timeouts, TimeoutWatch
from egress_guard.addons.websocket import WebSocketGuard
from egress_guard.config import Config
from egress_guard.escalation import Escalations
from egress_guard.keycache import KeyCache
from egress_guard.ledger import Ledger
from egress_guard.metrics import Metrics
from egress_guard.resolve import Resolver
from egress_guard.secrets import SecretStore
from egress_guard.store import AuditLog
from egress_guard.verdicts import PolicyHolder

log = logging.getLogger("egress_guard")


class Chain:
    """The egress-guard addons as ONE mitmproxy addon.

    mitmproxy calls every hook on every addon in its chain (a context manager, a coroutine
    and a getattr each), and that dispatch, not the checks, is most of what egress-guard
    costs per request. This addon holds the real ones, in order, and calls only those that
    define the hook.

    Members are isolated: one that raises never stops the others' hooks (a row is still
    written, a reservation still settled). A raise in a request-phase hook refuses the flow
    (502, as `fail_closed` does); in a hook where the response may be under way
    (responseheaders, response, websocket_start/_message) it kills the flow; in
    `server_connect` the connection is not dialled; anywhere else it is logged.
    """

    HOOKS = (
        "client_connected",
        "next_layer",
        "dns_request",
        "http_connect",
        "requestheaders",
        "request",
        "responseheaders",
        "response",
        "error",
        "server_connect",
        "server_connected",
        "server_connect_error",
        "server_disconnected",
        "tls_established_server",
        "tls_failed_server",
        "tls_failed_client",
        "websocket_start",
        "websocket_message",
        "websocket_end",
        "client_disconnected",
        _mitm.EgressGuardParserRefusalHook.name,
    )
    ON_CRASH = {
        "http_connect": "request",
        "requestheaders": "request",
        "request": "request",
        "responseheaders": "response",
        "response": "response",
        "websocket_start": "connection",
        "websocket_message": "connection",
    }

    def __init__(self, addons: list[Any]) -> None:
        # A hook a member defines but the chain does not relay would silently never run (a
        # guard skipped = fail open): refuse to build such a chain.
        import mitmproxy.addons.proxyserver  # noqa: F401 - registers the proxy's hook names
        from mitmproxy import hooks

        for a in addons:
            dropped = [h for h in hooks.all_hooks if h not in self.HOOKS and callable(getattr(a, h, None))]
            if dropped:
                raise TypeError(f"{type(a).__name__} defines {dropped}, which Chain does not relay: add to HOOKS")
        for hook in self.HOOKS:
            fns = [getattr(a, hook) for a in addons if callable(getattr(a, hook, None))]
            if fns:
                setattr(self, hook, self._sequence(hook, fns))

    @classmethod
    def _crashed(cls, hook: str, fn: Any, args: tuple[Any, ...], exc: Exception) -> None:
        name = getattr(fn, "__qualname__", repr(fn))
        try:
            if hook == "server_connect":
                log.error("egress-guard hook %s failed: %r; not dialling", name, exc, exc_info=exc)
                args[0].server.error = f"egress-guard: {name} failed ({type(exc).__name__})"
            elif hook == "client_connected":  # fail closed: the connection is not admitted
                log.error("egress-guard hook %s failed: %r; closing the connection", name, exc, exc_info=exc)
                args[0].error = f"egress-guard: {name} failed ({type(exc).__name__})"
            else:
                _flow.crashed(name, cls.ON_CRASH.get(hook, "log"), args[0] if args else None, exc)
        except Exception:  # never let the handling of one crash stop the other members
            log.exception("handling the failure of %s failed", name)

    @classmethod
    def _sequence(cls, hook: str, fns: list[Any]) -> Any:
        if any(inspect.iscoroutinefunction(fn) for fn in fns):

            async def run_async(*args: Any) -> None:
                for fn in fns:
                    try:
                        result = fn(*args)
                        if inspect.isawaitable(result):
                            await result
                    except Exception as exc:
                        cls._crashed(hook, fn, args, exc)

            return run_async

        def run(*args: Any) -> None:
            for fn in fns:
                try:
                    fn(*args)
                except Exception as exc:
                    cls._crashed(hook, fn, args, exc)

        return run


@dataclass
class Runtime:
    """What the addons share with the server: opened and closed by EgressProxy."""

    config: Config
    audit: AuditLog
    resolver: Resolver
    keys: KeyCache
    secrets: SecretStore
    hmac_key: bytes
    proxyserver: Any
    ledger: Ledger
    budgets: BudgetFollower
    policy: PolicyHolder  # the policy in force (`rules:`, `allow:`, mode ...): swapped by a reload
    escalations: Escalations  # pending approvals, grants and frozen sessions
    timeouts: Timeouts = field(default_factory=Timeouts)
    metrics: Metrics | None = None  # Prometheus (config metrics.listen); None: off


def chain(rt: Runtime) -> tuple[list[Any], list[Any]]:
    """The addons in the order every hook runs through them, and the background tasks.

     0. SandboxGuard     connections from `run --isolate` sandboxes (TUN modes): names their
                         agent on every flow, answers their DNS, turns captured TCP into
                         tunnels or refuses it (first, so every row from a sandbox names it)
     1. TimeoutWatch     connect, TLS and response-header timeouts upstream; a request head
                         in time from the agent (first, so a slow guard never counts as the
                         agent's delay)
     2. AuditGate        refuse everything while the audit log cannot be written
     3. ConnectGuard     allowlist at CONNECT, before any TLS or upstream connection
     4. RequestGuard     Host/SNI/CONNECT agreement, allowlist, SSRF vetting, address pinning
     5. CredentialGuard  fake key -> real secret on the service's hosts; keys elsewhere refused
     5b. PolicyGuard     `rules:` (CEL), unknown hosts, frozen sessions, observe mode: allow,
                         deny, or hold the request while a human answers (after the
                         credential guard names the agent, before SpendGuard reserves)
     6. WebSocketGuard   WebSocket messages: key scan (agent -> upstream), secret scrub
                         (upstream -> agent), metered calls (Responses/Realtime), close row
     7. ResponseStreamer stream every response through, chunk by chunk, scrubbing the secret
     8. SpendGuard       (request) model allowlist, rate limits, reserve the worst-case cost;
                         (response) tap usage from JSON/SSE, settle to the real cost;
                         with on_overrun: cut, end a stream that crosses a budget
     9. FailureAnswers   (error) a flow that failed before its response answers 502/504/400
                         in the provider's shape, not mitmproxy's HTML page
     9b. FreezeWatch     every finished request into its agent's baseline (its cost settled):
                         a session that diverges is frozen (`freeze:`)
    10. AuditRecorder    one row per decision; refuse anything no guard decided on; rows for
                         parser refusals and connections closed before any request
    12. FlowMetrics      (only with metrics.listen) times forwarded requests, counts upstream
                         failures; an observer, last so every guard has run (addons/metrics.py)
     Background (not addons: every hook walks every addon, so those with no flow hooks
     stay out of the chain): KillSwitch follows revocations and cuts the connections of
     revoked keys (and kills the revoked agents' sandboxes); BudgetFollower follows run-time
     budget changes; Sandboxes serves the control socket `run --isolate` opens sandboxes by.
    """
    tunnels: Tunnels = {}
    attribution = Attribution(rt.hmac_key, rt.config.services, rt.keys)
    sandboxes = Sandboxes(rt.config, rt.audit, rt.proxyserver, attribution)
    credentials = CredentialGuard(
        rt.config.services,
        rt.config.agents,
        rt.hmac_key,
        rt.keys,
        rt.secrets,
        lambda client_id: cut_client(rt.proxyserver, client_id),
        sandboxes.origin,
    )
    recorder = AuditRecorder(
        rt.audit,
        query_strings=rt.config.audit_query_strings,
        attribution=attribution,
        tunnels=tunnels,
    )
    timeouts = TimeoutWatch(rt.timeouts, rt.proxyserver, recorder.idle_closed)
    return [
        SandboxGuard(sandboxes, rt.policy, tunnels),
        timeouts,
        AuditGate(rt.audit),
        ConnectGuard(rt.policy, tunnels, rt.config.services),
        RequestGuard(rt.policy, tunnels, rt.resolver, rt.config.services),
        credentials,
        PolicyGuard(rt.policy, rt.escalations, attribution, rt.config.audit_query_strings, timeouts.request),
        WebSocketGuard(rt.config, rt.ledger, rt.audit, credentials, rt.proxyserver),
        ResponseStreamer(),
        SpendGuard(
            rt.config,
            rt.ledger,
            lambda flow: cut_server(rt.proxyserver, flow.client_conn.id, flow.server_conn),
            audit=rt.audit,
        ),
        FailureAnswers(rt.timeouts),
        FreezeWatch(rt.policy, rt.escalations),
        recorder,
        *([FlowMetrics(rt.metrics)] if rt.metrics is not None else []),
    ], [
        KillSwitch(rt.keys, credentials.clients, rt.proxyserver, sandboxes=sandboxes),
        rt.budgets,
        sandboxes,
        rt.escalations,
    ]
