"""What the store holds, as the rest of egress-guard sees it: an audit row, a metered call's
intent, a running spend total, a revocation, the filters of an audit query, and the typed
writes (key and budget changes, the open reservations). Engine-neutral: no SQL here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from decimal import Decimal

from egress_guard.fakekeys import KeyRecord


@dataclass(slots=True, kw_only=True)
class AuditRow:
    """One audit row; fields in the table's column order."""

    ts: str
    request_id: str
    kind: str
    agent: str | None = None
    session: str | None = None
    client: str | None = None
    decision: str
    reason: str | None = None
    rule: str | None = None
    method: str | None = None
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    status: int | None = None
    request_bytes: int | None = None
    response_bytes: int | None = None
    duration_ms: float | None = None
    service: str | None = None
    credential: str | None = None
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: str | None = None
    cached_tokens: int | None = None
    ws_messages_out: int | None = None
    ws_messages_in: int | None = None
    ws_close_code: int | None = None


COLUMNS = ["id", *(f.name for f in dataclasses.fields(AuditRow))]


@dataclass(slots=True, kw_only=True)
class Intent:
    """A metered call's reservation, committed before the call is forwarded: if the proxy
    stops before the call's own row is written, the next start bills the reservation."""

    request_id: str
    ts: str
    agent: str
    session: str | None
    service: str | None
    model: str | None
    day: str
    reserved_usd: str
    method: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None


INTENT_COLUMNS = [f.name for f in dataclasses.fields(Intent)]

SETTLED_AT_RESERVATION = (
    "settled at its reservation: the proxy stopped before the call finished (the provider may have charged for it)"
)


def settled_row(i: Intent) -> AuditRow:
    """The row of a metered call whose proxy (or replica) stopped before it finished: billed at
    its reservation, on the day the call was made. Its intent is removed in the row's
    transaction, as any call's."""
    return AuditRow(
        ts=i.ts,  # when the call was made: it counts against that day
        request_id=i.request_id,
        kind="request",
        agent=i.agent,
        session=i.session,
        decision="allow",
        reason=SETTLED_AT_RESERVATION,
        method=i.method,
        scheme="https",
        host=i.host,
        port=i.port,
        path=i.path,
        service=i.service,
        model=i.model,
        cost_usd=i.reserved_usd,
    )


class AuditUnavailable(Exception):
    """The audit log could not commit a row (or intent) someone was waiting on."""


class StoreError(Exception):
    """A command could not open the store; the message names it and why."""


@dataclass(frozen=True)
class Spent:
    """A running total: what an agent's session spent on one UTC day (exact)."""

    agent: str
    session: str  # "" for calls made outside a session
    day: str  # the rows' UTC date (a day budget in another time zone is counted from its rows)
    usd: Decimal


@dataclass(frozen=True)
class Revocation:
    id: int
    ts: str
    agent: str | None
    session: str | None
    key_id: str | None
    reason: str | None


@dataclass(frozen=True)
class Filters:
    """What an audit query selects: each given field narrows it; times are instants."""

    agent: str | None = None
    host: str | None = None
    decision: str | None = None
    since: str | None = None
    until: str | None = None


# --- typed writes: each is applied in one transaction ------------------------------------


@dataclass(frozen=True)
class InsertKey:
    record: KeyRecord


@dataclass(frozen=True)
class RevokeKeys:
    """Revoke every still-valid key of an agent, a session or one key id, and record one
    revocation (the running proxy follows those). Counts the keys revoked."""

    reason: str
    ts: str
    agent: str | None = None
    session: str | None = None
    key_id: str | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.agent, self.session, self.key_id)) != 1:
            raise ValueError("revoke by exactly one of agent, session or key_id")


@dataclass(frozen=True)
class SetBudget:
    agent: str
    scope: str  # session | day | total | session:<id>
    limit_usd: Decimal
    ts: str


@dataclass(frozen=True)
class ResetBudget:
    """Drop a run-time budget override; counts the overrides dropped (0 or 1)."""

    agent: str
    scope: str


@dataclass(frozen=True)
class Reservations:
    """What changed in the running proxy's open reservations (for `budget show`) since the
    last write: keys whose amount changed, and keys no longer reserved."""

    changed: tuple[tuple[str, Decimal], ...]
    removed: tuple[str, ...]
    ts: str


Write = InsertKey | RevokeKeys | SetBudget | ResetBudget | Reservations
