"""One WebSocket connection as egress-guard keeps it (the flow state's `ws`): what passed each
way, the relay that scrubs what goes to the agent, the scan of what goes up, its metered
calls, and how it ended — and the words its close row gives all that.

Pure: no I/O, no mitmproxy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from egress_guard.policy import Verdict
from egress_guard.ws_meter import WsMeter
from egress_guard.ws_relay import KeyScan, Relay


@dataclass
class WsConn:
    """One WebSocket connection's state, kept in the flow state (`FlowState.ws`)."""

    host: str
    port: int
    path: str  # as recorded (query string kept only with audit.query_strings)
    service: str | None
    relay: Relay
    scan: KeyScan | None  # None: no egress-guard key can be recognised (none configured)
    meter: WsMeter | None  # None: its calls are not metered
    agent_messages: int = 0
    agent_bytes: int = 0
    upstream_messages: int = 0
    upstream_bytes: int = 0
    closing: str | None = None  # why egress-guard is closing it (or cut it)
    close_verdict: Verdict | None = None  # the closing row's decision, if egress-guard ended it
    ended: bool = False
    started_at: float = field(default_factory=time.time)

    def from_agent(self, data: bytes) -> None:
        self.agent_messages += 1
        self.agent_bytes += len(data)

    def from_upstream(self, data: bytes) -> None:
        self.upstream_messages += 1
        self.upstream_bytes += len(data)

    def close_reason(self, code: int | None, closed_by_client: bool | None) -> str:
        """How the connection ended and what passed, for its close row."""
        if self.closing is not None:
            how = self.closing
        elif closed_by_client is not None:
            side = "the agent" if closed_by_client else "the upstream"
            how = f"closed by {side}" + (" without a close frame" if code == 1006 else "") + f" ({code})"
        else:
            how = f"connection lost ({code})"
        reason = (
            f"WebSocket {how}: {self.agent_messages} messages ({self.agent_bytes} bytes) from the agent, "
            f"{self.upstream_messages} messages ({self.upstream_bytes} bytes) from the upstream"
        )
        return reason + (self.meter.summary() if self.meter is not None else "")
