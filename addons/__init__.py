"""egress-guard's mitmproxy addons. `chain()` is the one place that fixes their order."""

from __future__ import annotations

from typing import Any

from egress_guard.addons.audit_gate import AuditGate
from egress_guard.addons.connect_guard import ConnectGuard, Tunnels
from egress_guard.addons.recorder import AuditRecorder
from egress_guard.addons.request_guard import RequestGuard
from egress_guard.addons.streaming import ResponseStreamer
from egress_guard.audit import AuditLog
from egress_guard.config import Config
from egress_guard.resolve import Resolver


def chain(config: Config, audit: AuditLog, resolver: Resolver) -> list[Any]:
    """The addons in the order every hook runs through them:

    1. AuditGate        refuse everything while the audit log cannot be written
    2. ConnectGuard     allowlist at CONNECT, before any TLS or upstream connection
    3. RequestGuard     Host/SNI/CONNECT agreement, allowlist, SSRF vetting, address pinning
    4. ResponseStreamer stream every response through, chunk by chunk
    5. AuditRecorder    one row per decision; refuse anything no guard decided on
    """
    tunnels: Tunnels = {}
    return [
        AuditGate(audit),
        ConnectGuard(config.rules, tunnels),
        RequestGuard(config.rules, tunnels, resolver),
        ResponseStreamer(),
        AuditRecorder(audit, query_strings=config.audit_query_strings),
    ]
