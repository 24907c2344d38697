"""egress-guard's mitmproxy addons. `chain()` is the one place that fixes their order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from egress_guard.addons import _flow
from egress_guard.addons.audit_gate import AuditGate
from egress_guard.addons.connect_guard import ConnectGuard, Tunnels
from egress_guard.addons.credential_guard import CredentialGuard
from egress_guard.addons.killswitch import KillSwitch, cut_client
from egress_guard.addons.recorder import AuditRecorder
from egress_guard.addons.request_guard import RequestGuard
from egress_guard.addons.spend_guard import BudgetFollower, SpendGuard
from egress_guard.addons.streaming import ResponseStreamer
from egress_guard.audit import AuditLog
from egress_guard.config import Config
from egress_guard.keycache import KeyCache
from egress_guard.resolve import Resolver
from egress_guard.secrets import SecretStore
from egress_guard.spend import Ledger


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


def chain(rt: Runtime) -> tuple[list[Any], list[Any]]:
    """The addons in the order every hook runs through them, and the background tasks.

    1. AuditGate        refuse everything while the audit log cannot be written
    2. ConnectGuard     allowlist at CONNECT, before any TLS or upstream connection
    3. RequestGuard     Host/SNI/CONNECT agreement, allowlist, SSRF vetting, address pinning
    4. CredentialGuard  fake key -> real secret on the service's hosts; keys elsewhere refused
    5. ResponseStreamer stream every response through, chunk by chunk, scrubbing the secret
    6. SpendGuard       (request) model allowlist, rate limits, reserve the worst-case cost;
                        (response) tap usage from JSON/SSE, settle to the real cost
    7. AuditRecorder    one row per decision; refuse anything no guard decided on
    Background (not addons: every hook walks every addon, so those with no flow hooks
    stay out of the chain): KillSwitch follows revocations and cuts the connections of
    revoked keys; BudgetFollower follows run-time budget changes.
    """
    _flow.ERROR_STYLES.clear()
    _flow.ERROR_STYLES.update({host: s.name for s in rt.config.services for host in s.hosts})
    tunnels: Tunnels = {}
    credentials = CredentialGuard(
        rt.config.services,
        rt.config.agents,
        rt.hmac_key,
        rt.keys,
        rt.secrets,
        lambda client_id: cut_client(rt.proxyserver, client_id),
    )
    return [
        AuditGate(rt.audit),
        ConnectGuard(rt.config.rules, tunnels),
        RequestGuard(rt.config.rules, tunnels, rt.resolver),
        credentials,
        ResponseStreamer(),
        SpendGuard(rt.config, rt.ledger),
        AuditRecorder(rt.audit, query_strings=rt.config.audit_query_strings),
    ], [KillSwitch(rt.keys, credentials.clients, rt.proxyserver), rt.budgets]
