"""What the store holds, as the rest of egress-guard sees it: an audit row, a metered call's
intent, a running spend total, a revocation, the filters of an audit query, an approval, a
grant and a freeze, and the typed writes (key and budget changes, the open reservations,
approvals and their decisions, freezes). Engine-neutral: no SQL here.
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

    def covers(self, agent: str | None, session: str | None, key_id: str | None = None) -> bool:
        """Whether this revocation revokes a key (or a sandbox) of `agent` and `session`:
        every field it names matches (agent and session together: that agent's session
        only, never another agent's session of the same name)."""
        pairs = [(self.agent, agent), (self.session, session), (self.key_id, key_id)]
        named = [(mine, theirs) for mine, theirs in pairs if mine is not None]
        return bool(named) and all(mine == theirs for mine, theirs in named)


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
    """Revoke every still-valid key of an agent, a session (of every agent that has it),
    one agent's session (agent and session: two agents may share a session name), or one key
    id, and record one revocation (the running proxy follows those). Counts the keys revoked."""

    reason: str
    ts: str
    agent: str | None = None
    session: str | None = None
    key_id: str | None = None

    def __post_init__(self) -> None:
        if (self.key_id is None) == (self.agent is None and self.session is None):
            raise ValueError("revoke by exactly one of agent (optionally with session), session or key_id")

    def where(self) -> tuple[tuple[str, str], ...]:
        """(column, value) pairs a revoked key matches, all of them."""
        pairs = (("agent", self.agent), ("session", self.session), ("key_id", self.key_id))
        return tuple((c, v) for c, v in pairs if v is not None)


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


# --- escalations: approvals, grants, freezes (migration 0010_policy) ---------------------

APPROVAL_STATUSES = ("pending", "approved", "denied", "expired")
SCOPES = ("once", "session", "always")
ANY_HOST = "*"  # a grant's host (port 0) that covers every host: a freeze's, which is per session


@dataclass(frozen=True)
class Approval:
    """A held request waiting for (or given) a human's answer. `id` is 16 random hex
    characters (escalation.ID_BYTES); `approve` takes a unique prefix of it, the callback
    the whole id."""

    id: str
    created: str
    expires: str
    replica: str  # the proxy holding the request ("local" for SQLite, else a replica's name)
    request_id: str
    agent: str | None
    session: str | None
    method: str | None
    scheme: str | None
    host: str
    port: int
    path: str | None  # as the audit row records it (no query unless audit.query_strings)
    rule: str  # the escalating rule's id: "rule:<name>", "rules#<i>", "unknown_hosts" or "freeze"
    reason: str
    status: str = "pending"  # APPROVAL_STATUSES
    scope: str | None = None  # SCOPES, once approved
    note: str | None = None
    decided_by: str | None = None  # who answered ("timeout" for an expiry)
    decided_at: str | None = None


APPROVAL_COLUMNS = [f.name for f in dataclasses.fields(Approval)]


@dataclass(frozen=True)
class GrantRecord:
    """A stored grant: what an approval with scope session or always added. `agent`/`session`
    None cover any; host ANY_HOST (port 0) covers every host (a freeze's grant)."""

    id: int
    created: str
    approval_id: str | None
    rule: str
    host: str
    port: int
    agent: str | None
    session: str | None
    by: str
    note: str | None
    revoked: str | None  # when it was revoked (None: active)


@dataclass(frozen=True)
class Freeze:
    """A session frozen because its agent diverged from its baseline (proxy/baseline.py).
    `session` is "" for an agent's requests outside a session."""

    id: int
    created: str
    agent: str
    session: str
    trigger: str  # the trigger as text: metric, value, baseline, threshold
    baseline: str  # JSON
    lifted: str | None
    lifted_by: str | None
    note: str | None


@dataclass(frozen=True)
class CreateApproval:
    approval: Approval

    def __post_init__(self) -> None:
        if self.approval.status != "pending":
            raise ValueError("an approval is created pending")


@dataclass(frozen=True)
class DecideApproval:
    """Answer a pending approval (conditional: counts 0 if it is no longer pending). Approved
    with scope session or always, a grant is added in the same transaction (session: this
    agent and session; always: this agent, any session); for a freeze's approval, the freeze
    is lifted too. Scope session on an approval without a session changes nothing (0): it
    would otherwise grant every session."""

    id: str
    status: str  # approved | denied
    scope: str | None  # SCOPES when approved; None when denied
    note: str | None
    by: str
    ts: str

    def __post_init__(self) -> None:
        if self.status not in ("approved", "denied"):
            raise ValueError(f"a decision is approved or denied, not {self.status!r}")
        if self.status == "approved" and self.scope not in SCOPES:
            raise ValueError(f"an approval's scope is one of {', '.join(SCOPES)}, not {self.scope!r}")
        if self.status == "denied" and self.scope is not None:
            raise ValueError("a denial has no scope")

    @property
    def grants(self) -> bool:
        return self.status == "approved" and self.scope in ("session", "always")


@dataclass(frozen=True)
class ExpireApproval:
    """A pending approval nobody answered in time (conditional: counts 0 if it was answered)."""

    id: str
    ts: str
    by: str = "timeout"


@dataclass(frozen=True)
class ExpireLeftovers:
    """The approvals a replica left pending when it stopped without answering them (a crash):
    its pending ones created before `before`. Nobody holds their requests any more."""

    replica: str
    before: str
    ts: str
    by: str = "the proxy holding it stopped without an answer"


@dataclass(frozen=True)
class AddFreeze:
    agent: str
    session: str  # "" outside a session
    trigger: str
    baseline: str  # JSON
    ts: str


@dataclass(frozen=True)
class LiftFreeze:
    """Lift the active freezes of an agent's session; counts them."""

    agent: str
    session: str
    by: str
    ts: str
    note: str | None = None


@dataclass(frozen=True)
class RevokeGrant:
    """Revoke a grant by id; counts 0 if there is none active."""

    id: int
    ts: str


Write = (
    InsertKey
    | RevokeKeys
    | SetBudget
    | ResetBudget
    | Reservations
    | CreateApproval
    | DecideApproval
    | ExpireApproval
    | ExpireLeftovers
    | AddFreeze
    | LiftFreeze
    | RevokeGrant
)
