"""Escalations: a request the policy escalates waits here for a human's answer; the grants
that earlier answers left, and the frozen sessions, are followed here for the policy.

`ask` records a pending approval (through the proxy's one writer, `AuditLog.submit`, and
waits for it to be durable: nobody can answer an approval the store does not hold), tells
the webhook, then waits: one watcher reads every held approval's status every POLL seconds
(the CLI's `approve`/`deny` write from another process, maybe another replica). Unanswered by
`escalation.timeout`, it expires the approval — conditionally: an answer committed first
wins — and reads the final status back, so the request's fate is always the one the store
holds. Each outcome becomes an audit `event` row (method approve | deny | expire, rule = the
approval id), written by the proxy: only its writer extends the hash chain.

Grants (`scope session|always`) and freezes are re-read every REFRESH seconds into a
`verdicts.Grants` view and a frozen-sessions map; an answer this proxy sees refreshes them at
once, so the request after an approval with scope session goes through without asking.

Fail closed: an approval that cannot be recorded, read back or expired is a denial saying why.
Never a secret here: approvals hold method, host, port and the audit row's path only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from egress_guard import webhook
from egress_guard.secrets import Secret
from egress_guard.store import (
    AddFreeze,
    Approval,
    AuditLog,
    AuditRow,
    AuditUnavailable,
    CreateApproval,
    DecideApproval,
    Engine,
    ExpireApproval,
    ExpireLeftovers,
    Freeze,
    GrantRecord,
)
from egress_guard.store.records import ANY_HOST
from egress_guard.timeutil import iso, now_iso, utcnow
from egress_guard.verdicts import FREEZE, EscalationSettings, Facts, Grant

log = logging.getLogger("egress_guard.escalation")

POLL = 0.25  # seconds between two reads of the held approvals' status
REFRESH = 0.5  # seconds between two reads of the active grants and freezes
STOPPING = "egress-guard is stopping"
# An approval's id: 16 random hex characters (64 bits). Among n approvals ever stored, the
# chance that two share an id is about n² / 2^65 (a million approvals: 3 in 100 million).
# If it happens anyway, the insert inserts nothing and `ask` finds another request's row
# under its id: that request is refused ("store conflict"), nothing else is harmed.
ID_BYTES = 8
# Held requests are bounded: each holds a connection, its body (up to 1 MiB) in memory, a
# store row and a webhook call. Beyond either cap a request is refused at once, unrecorded
# as an approval, so one hostile agent cannot hold the proxy's memory or its humans' queue.
MAX_HELD_PER_AGENT = 16  # held at once for one agent (requests without an agent count as one)
MAX_HELD = 256  # held at once by this proxy, all agents


@dataclass(frozen=True)
class PendingRequest:
    """The request an escalation holds, as its approval records it."""

    request_id: str
    agent: str | None
    session: str | None
    method: str | None
    scheme: str | None
    host: str
    port: int
    path: str | None  # as the audit row has it (no query string unless audit.query_strings)
    rule: str  # the escalating rule's id ("rule:<name>", "rules#<i>", "unknown_hosts", "freeze")
    reason: str


@dataclass(frozen=True)
class Answer:
    """How an escalation ended. `reason` is ready for the audit row and the agent."""

    approval_id: str
    status: str  # approved | denied | expired | failed (could not be recorded or read) | refused (a cap)
    by: str | None
    scope: str | None
    note: str | None
    reason: str

    @property
    def approved(self) -> bool:
        return self.status == "approved"


class _Holder(Protocol):
    """What Escalations reads its settings from: the PolicyHolder (reloadable)."""

    @property
    def current(self) -> Any: ...


class StoredGrants:
    """A `verdicts.Grants` view of the active grants: by (rule, host); a freeze's grant
    covers every host of its agent/session."""

    def __init__(self, records: Iterable[GrantRecord] = ()) -> None:
        self._by: dict[tuple[str, str], list[Grant]] = {}
        self.count = 0
        for r in records:
            g = Grant(id=r.id, rule=r.rule, host=r.host, port=r.port, agent=r.agent, session=r.session)
            self._by.setdefault((r.rule, r.host), []).append(g)
            self.count += 1

    def covers(self, rule: str, facts: Facts) -> Grant | None:
        if not self._by:
            return None
        host = ANY_HOST if rule == FREEZE else str(facts.host)
        for g in self._by.get((rule, host), ()):
            if (
                (rule == FREEZE or g.port == facts.port)
                and (g.agent is None or g.agent == facts.agent)
                and (g.session is None or g.session == facts.session)
            ):
                return g
        return None

    def frozen_granted(self, agent: str, session: str | None) -> bool:
        """Whether a freeze's grant covers this agent's session (it may not be frozen again)."""
        return any(
            (g.agent is None or g.agent == agent) and (g.session is None or g.session == session)
            for g in self._by.get((FREEZE, ANY_HOST), ())
        )

    def __repr__(self) -> str:
        return f"StoredGrants({self.count} grants)"


def _expires(seconds: float) -> str:
    return iso(utcnow() + datetime.timedelta(seconds=seconds))


def past_expiry(a: Approval) -> str:
    """Why an approval past its `expires` time cannot be answered (the CLI says the same)."""
    return f"escalation {a.id} expired at {a.expires}: its request was refused (nobody holds it any more)"


def scope_problem(a: Approval, scope: str | None) -> str | None:
    """Why `scope` cannot be given to this approval (the CLI, the console and the callback
    say the same), or None. A standing grant is for the agent (and session) the request named:
    a request that named none would become a grant for every agent, or every session."""
    if scope in ("session", "always") and a.agent is None:
        return (
            f"escalation {a.id} names no agent (a request without a key, from outside a sandbox): --scope {scope} "
            "would let every agent through. Fix: --scope once"
        )
    if scope == "session" and a.session is None:
        return (
            f"escalation {a.id} has no session (the agent's key names none): --scope session would cover "
            "every session. Fix: --scope once, or --scope always (this agent, any session)"
        )
    return None


def answer_of(a: Approval, timeout: float | None = None) -> Answer:
    """The Answer an approval's final status gives (its reason as the agent will read it)."""
    note = f": {a.note}" if a.note else ""
    if a.status == "approved":
        reason = f"approved by {a.decided_by} (escalation {a.id}, scope {a.scope}{note})"
    elif a.status == "denied":
        reason = f"escalation {a.id} denied by {a.decided_by}{note}"
    elif a.status == "expired" and a.decided_by == "timeout":
        after = f" after {timeout:g} s" if timeout is not None else ""
        reason = f"escalation {a.id} timed out{after} without an answer (escalation.timeout)"
    elif a.status == "expired":
        reason = f"escalation {a.id} ended unanswered: {a.decided_by}"
    else:
        reason = f"escalation {a.id} is still pending"
    return Answer(a.id, a.status, a.decided_by, a.scope, a.note, reason)


class Escalations:
    """The proxy's escalations (one per proxy). Background protocol: `running()` (sync,
    starts the task) / `done()`; or `await start()` / `await close()`."""

    def __init__(self, engine: Engine, audit: AuditLog, holder: _Holder, replica: str | None = None) -> None:
        self.engine = engine
        self.audit = audit
        self.holder = holder
        self.replica = replica or engine.chain
        self.grants: StoredGrants = StoredGrants()
        self.refreshed: float | None = None  # monotonic time of the last successful refresh
        self.refresh_error: str | None = None
        self.held = 0  # requests waiting for an answer now
        self._held_by: dict[str, int] = {}  # agent ("" for none) -> its requests waiting now
        self.callback: webhook.CallbackServer | None = None
        self._frozen: dict[tuple[str, str], str] = {}  # (agent, session or "") -> trigger text
        self._local: dict[tuple[str, str], tuple[str, float | None]] = {}  # freezes not yet read back
        self._waiting: dict[str, asyncio.Event] = {}  # held approval id -> set when it is answered
        self._final: dict[str, Approval] = {}
        self._task: asyncio.Task[None] | None = None
        self._notifies: set[asyncio.Task[Any]] = set()
        self._closing = asyncio.Event()
        self._secret: tuple[Any, float, Secret | None] | None = None  # (path, mtime, key)
        self._active: tuple[set[int], set[int]] | None = None  # grant and freeze ids at the last read
        self._ended: list[tuple[str, int]] = []  # ("grant"|"freeze", id) gone since, not yet recorded
        self._announced: set[tuple[str, int]] = set()  # seen gone once (ids are never reused)
        self._born = now_iso()  # this replica's approvals from before this are a dead run's
        self._leftovers: int | None = None  # ExpireLeftovers' item number, once submitted

    def __repr__(self) -> str:
        return f"Escalations(replica={self.replica!r}, held={self.held}, {self.grants!r})"

    @property
    def settings(self) -> EscalationSettings:
        settings: EscalationSettings = self.holder.current.escalation
        return settings

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Expire the approvals a previous run of this replica left pending, read grants and
        freezes, listen for callbacks (if configured: OSError if it cannot), and follow the
        store in the background."""
        await self._expire_leftovers()
        with contextlib.suppress(Exception):  # logged by refresh; the watcher retries
            await self.refresh()
        listen = self.settings.callback_listen
        if listen is not None and self.callback is None:
            server = webhook.CallbackServer(listen, self.secret, self.decide)
            await server.start()
            self.callback = server
            if self.secret() is None:
                log.error(
                    "escalation callback_listen %s:%d: no webhook secret_file; every callback is refused", *listen
                )
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="egress-guard escalations")

    def running(self) -> None:
        """The server's background protocol: start in a task (a callback address in use is
        logged, and the CLI still answers)."""

        async def go() -> None:
            try:
                await self.start()
            except OSError as exc:
                log.error("%s; answer escalations with the CLI", exc)
                if self._task is None:
                    self._task = asyncio.create_task(self._watch(), name="egress-guard escalations")

        asyncio.get_running_loop().create_task(go(), name="egress-guard escalations start")

    async def done(self) -> None:
        await self.close()

    async def close(self) -> None:
        """End every held ask (denied: STOPPING), stop the watcher and the callback server."""
        self._closing.set()
        for event in list(self._waiting.values()):
            event.set()
        for _ in range(40):  # the asks record their end through the writer, still open
            if not self._waiting:
                break
            await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):  # a revocation seen, its row not yet written
            await self._record_ended()
        for task in list(self._notifies):
            task.cancel()
        if self.callback is not None:
            await self.callback.close()
            self.callback = None

    # --- what the policy reads -------------------------------------------------------------

    def frozen(self, agent: str | None, session: str | None) -> str | None:
        """Why this agent's session is frozen (the trigger's text), or None."""
        if agent is None or not (self._frozen or self._local):
            return None
        key = (agent, session or "")
        local = self._local.get(key)
        return local[0] if local is not None else self._frozen.get(key)

    async def freeze(self, agent: str, session: str | None, trigger_text: str, baseline_json: str) -> None:
        """Freeze an agent's session: at once here, then in the store (AddFreeze) with an
        event row (method freeze). Nothing if it is frozen already, or a freeze's grant
        covers it. Raises AuditUnavailable if it cannot be recorded (the session stays
        frozen here until the proxy stops)."""
        key = (agent, session or "")
        if self.frozen(agent, session) is not None:
            return
        if self.grants.frozen_granted(agent, session):
            return  # an operator approved this session (or agent) past its freezes
        self._local[key] = (trigger_text, None)
        ts = now_iso()
        self.audit.submit(AddFreeze(agent=agent, session=key[1], trigger=trigger_text, baseline=baseline_json, ts=ts))
        n = self.audit.record(
            AuditRow(
                ts=ts,
                request_id=f"freeze-{secrets.token_hex(6)}",
                kind="event",
                agent=agent,
                session=session,
                decision="deny",
                reason=f"session frozen: {trigger_text}; baseline {baseline_json}",
                rule=FREEZE,
                method="freeze",
            )
        )
        await self.audit.durable(n)
        self._local[key] = (trigger_text, time.monotonic())

    async def _expire_leftovers(self) -> None:
        """A crashed run's pending approvals stay pending: nobody holds their requests, and a
        late answer would still add its grant. Expire them (this replica's, created before
        this run: the asks of this run are never touched), through the writer, once."""
        if self._leftovers is None:
            self._leftovers = self.audit.submit(ExpireLeftovers(replica=self.replica, before=self._born, ts=now_iso()))
        try:
            await self.audit.durable(self._leftovers)
        except AuditUnavailable as exc:  # queued: written when the store recovers
            log.error("escalations: could not expire the approvals a previous run left pending yet (%s)", exc)

    async def refresh(self) -> None:
        """Read the active grants and freezes now."""
        started = time.monotonic()
        try:
            grants = await self.engine.active_grants()
            freezes = await self.engine.active_freezes()
        except Exception as exc:
            self.refresh_error = str(exc) or type(exc).__name__
            raise
        self._apply(grants, freezes, started)
        self._note_ended(grants, freezes)
        await self._record_ended()

    def _note_ended(self, grants: list[GrantRecord], freezes: list[Freeze]) -> None:
        """The grants and freezes active at the last read and gone from this one (each once:
        a slower read applied after a newer one may show it again)."""
        now = ({g.id for g in grants}, {f.id for f in freezes})
        before, self._active = self._active, now
        if before is None:
            return
        for kind, ids in (("grant", before[0] - now[0]), ("freeze", before[1] - now[1])):
            for i in sorted(ids):
                if (kind, i) not in self._announced:
                    self._announced.add((kind, i))
                    self._ended.append((kind, i))

    async def _record_ended(self) -> None:
        """An event row for each grant revoked and each freeze lifted since the last read
        (`revoke-grant`, `unfreeze`: the commands cannot write audit rows, only this writer
        extends the chain), with who, when and the note as the store has them. What cannot
        be read now (or was interrupted) stays for the next refresh, or close."""
        if not self._ended:
            return
        ended = list(self._ended)
        try:
            gone_grants = await self.engine.grants_by_id([i for kind, i in ended if kind == "grant"])
            gone_freezes = await self.engine.freezes_by_id([i for kind, i in ended if kind == "freeze"])
        except Exception as exc:
            log.error("escalations: could not read the grants revoked and freezes lifted (%s); retrying", exc)
            return
        left = set(self._ended)  # (another call may have recorded some meanwhile)
        self._ended = [e for e in self._ended if e not in ended]
        gone_grants = [g for g in gone_grants if ("grant", g.id) in left]
        gone_freezes = [f for f in gone_freezes if ("freeze", f.id) in left]
        ts = now_iso()
        for g in gone_grants:
            if g.revoked is None:
                continue
            note = f": {g.note}" if g.note else ""
            who = f"agent {g.agent or 'any'}, session {g.session or 'any'}"
            self.audit.record(
                AuditRow(
                    ts=ts,
                    request_id=f"revoke-grant-{g.id}",
                    kind="event",
                    agent=g.agent,
                    session=g.session,
                    decision="allow",
                    reason=(
                        f"grant {g.id} revoked at {g.revoked}: rule {g.rule} for {g.host}:{g.port}, {who} "
                        f"(granted by {g.by} at {g.created}, escalation {g.approval_id}{note})"
                    ),
                    rule=str(g.id),
                    method="revoke-grant",
                    host=g.host,
                    port=g.port,
                )
            )
        for f in gone_freezes:
            if f.lifted is None:
                continue
            note = f": {f.note}" if f.note else ""
            self.audit.record(
                AuditRow(
                    ts=ts,
                    request_id=f"unfreeze-{f.id}",
                    kind="event",
                    agent=f.agent,
                    session=f.session or None,
                    decision="allow",
                    reason=(
                        f"freeze {f.id} lifted by {f.lifted_by} at {f.lifted}{note} "
                        f"(frozen at {f.created}: {f.trigger})"
                    ),
                    rule=FREEZE,
                    method="unfreeze",
                )
            )

    def _apply(self, grants: list[GrantRecord], freezes: list[Freeze], started: float) -> None:
        self.grants = StoredGrants(grants)
        self._frozen = {(f.agent, f.session): f.trigger for f in freezes}
        # a local freeze is the store's once a read that began after its commit has seen it
        for key, (_, committed) in list(self._local.items()):
            if committed is not None and committed < started:
                del self._local[key]
        self.refreshed, self.refresh_error = started, None

    # --- asking ------------------------------------------------------------------------------

    def secret(self) -> Secret | None:
        """The webhook key (re-read when its file changes); None without one, or if unreadable."""
        path = self.settings.webhook_secret_file
        if path is None:
            return None
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = -1.0
        if self._secret is None or self._secret[:2] != (path, mtime):
            try:
                key: Secret | None = webhook.read_secret(path)
            except ValueError as exc:
                log.error("%s", exc)
                key = None
            self._secret = (path, mtime, key)
        return self._secret[2]

    async def ask(self, pending: PendingRequest) -> Answer:
        """Hold `pending` until a human answers, or escalation.timeout passes."""
        settings = self.settings
        deadline = time.monotonic() + settings.timeout  # as `expires` says: from now, not from the commit
        approval_id = secrets.token_hex(ID_BYTES)
        while approval_id in self._waiting:  # (never in practice: 64 bits)
            approval_id = secrets.token_hex(ID_BYTES)
        approval = Approval(
            id=approval_id,
            created=now_iso(),
            expires=_expires(settings.timeout),
            replica=self.replica,
            request_id=pending.request_id,
            agent=pending.agent,
            session=pending.session,
            method=pending.method,
            scheme=pending.scheme,
            host=pending.host,
            port=pending.port,
            path=pending.path,
            rule=pending.rule,
            reason=pending.reason,
        )
        if self._closing.is_set():
            return Answer(approval.id, "failed", None, None, None, STOPPING)
        agent = pending.agent or ""
        refused = self._over_cap(agent)
        if refused is not None:
            log.warning("escalation refused: %s", refused)
            return Answer("", "refused", None, None, None, refused)
        event = self._waiting[approval.id] = asyncio.Event()
        self.held += 1
        self._held_by[agent] = self._held_by.get(agent, 0) + 1
        try:
            try:
                await self.audit.durable(self.audit.submit(CreateApproval(approval)))
            except AuditUnavailable as exc:
                return Answer(approval.id, "failed", None, None, None, f"the escalation could not be recorded: {exc}")
            problem = await self._stored(approval)
            if problem is not None:
                log.error("escalation %s: %s; its request is refused", approval.id, problem)
                return Answer(approval.id, "failed", None, None, None, f"escalation {approval.id}: {problem} (refused)")
            log.info(
                "escalation %s: %s %s:%d for agent %s held: %s (egress-guard approve %s)",
                approval.id,
                pending.method or "CONNECT",
                pending.host,
                pending.port,
                pending.agent or "?",
                pending.reason,
                approval.id,
            )
            self._notify(approval, settings)
            if self._task is None:
                self._task = asyncio.create_task(self._watch(), name="egress-guard escalations")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), max(0.0, deadline - time.monotonic()))
            final = self._final.pop(approval.id, None)
            if final is None:  # time is up (or the proxy is stopping): expire it, unless answered first
                why = STOPPING if self._closing.is_set() else "timeout"
                final = await self._expire(approval, why)
            answer = (
                answer_of(final, settings.timeout)
                if final is not None
                else Answer(
                    approval.id,
                    "failed",
                    None,
                    None,
                    None,
                    f"escalation {approval.id}: its answer could not be read from the store (refused: fail closed)",
                )
            )
            self._record(approval, answer)
            if answer.approved and answer.scope in ("session", "always"):
                with contextlib.suppress(Exception):
                    await self.refresh()
            return answer
        finally:
            self.held -= 1
            self._held_by[agent] -= 1
            if not self._held_by[agent]:
                del self._held_by[agent]
            self._waiting.pop(approval.id, None)
            self._final.pop(approval.id, None)

    def _over_cap(self, agent: str) -> str | None:
        """Why one more request (of `agent`) may not be held, or None."""
        who = f"agent {agent}" if agent else "requests without an agent"
        if self._held_by.get(agent, 0) >= MAX_HELD_PER_AGENT:
            return (
                f"escalation refused: {who} already has {MAX_HELD_PER_AGENT} requests waiting for an answer "
                f"(at most {MAX_HELD_PER_AGENT} per agent); answer them first: egress-guard pending"
            )
        if self.held >= MAX_HELD:
            return (
                f"escalation refused: this proxy already holds {MAX_HELD} requests waiting for an answer "
                f"(at most {MAX_HELD}); answer them first: egress-guard pending"
            )
        return None

    async def _stored(self, approval: Approval) -> str | None:
        """None if the store holds `approval` as this ask created it; else why not. (An id
        taken already inserts nothing: the row there is another request's, and following it
        would let this request through on someone else's answer.)"""
        try:
            found = await self.engine.approvals_by_id([approval.id])
        except Exception as exc:
            return f"it could not be read back from the store ({exc})"
        mine = (approval.request_id, approval.replica, approval.created)
        if not found or (found[0].request_id, found[0].replica, found[0].created) != mine:
            return "store conflict: its id holds another request's approval"
        return None

    async def _expire(self, approval: Approval, why: str) -> Approval | None:
        """Expire it if still pending; the final status as the store holds it (None: unknown)."""
        try:
            await self.audit.durable(self.audit.submit(ExpireApproval(id=approval.id, ts=now_iso(), by=why)))
        except AuditUnavailable as exc:
            log.error("escalation %s: could not record its expiry (%s)", approval.id, exc)
        try:
            found = await self.engine.approvals_by_id([approval.id])
        except Exception as exc:
            log.error("escalation %s: could not read its final status (%s)", approval.id, exc)
            return None
        if not found or found[0].status == "pending":
            return None
        return found[0]

    def _record(self, approval: Approval, answer: Answer) -> None:
        """The outcome's event row (the request's own row follows, from the addon)."""
        method = {"approved": "approve", "denied": "deny"}.get(answer.status, "expire")
        self.audit.record(
            AuditRow(
                ts=now_iso(),
                request_id=approval.request_id,
                kind="event",
                agent=approval.agent,
                session=approval.session,
                decision="allow" if answer.approved else "deny",
                reason=answer.reason,
                rule=approval.id,
                method=method,
                scheme=approval.scheme,
                host=approval.host,
                port=approval.port,
                path=approval.path,
            )
        )

    def _notify(self, approval: Approval, settings: EscalationSettings) -> None:
        url = settings.webhook_url
        if url is None:
            return
        payload = {
            "id": approval.id,
            "created": approval.created,
            "expires": approval.expires,
            "replica": approval.replica,
            "request_id": approval.request_id,
            "agent": approval.agent,
            "session": approval.session,
            "method": approval.method,
            "scheme": approval.scheme,
            "host": approval.host,
            "port": approval.port,
            "path": approval.path,
            "rule": approval.rule,
            "reason": approval.reason,
            "approve": f"egress-guard approve {approval.id} [--scope once|session|always]",
            "deny": f"egress-guard deny {approval.id}",
            "callback": f"/approvals/{approval.id}" if settings.callback_listen is not None else None,
        }
        task = asyncio.get_running_loop().create_task(webhook.notify(url, self.secret(), payload))
        self._notifies.add(task)
        task.add_done_callback(self._notifies.discard)

    async def _watch(self) -> None:
        """Every POLL s: the held approvals' status; every REFRESH s: grants and freezes."""
        failing = False
        last_refresh = 0.0
        while True:
            await asyncio.sleep(POLL)
            try:
                held = [i for i in self._waiting if i not in self._final]
                if held:
                    for a in await self.engine.approvals_by_id(held):
                        if a.status != "pending" and a.id in self._waiting:
                            self._final[a.id] = a
                            self._waiting[a.id].set()
                if time.monotonic() - last_refresh >= REFRESH:
                    last_refresh = time.monotonic()
                    await self.refresh()
            except Exception as exc:
                if not failing:
                    log.error("escalations: reading the store failed: %s (retrying)", exc)
                failing = True
                continue
            if failing:
                log.warning("escalations: the store can be read again")
            failing = False

    # --- answering (the callback server) ---------------------------------------------------

    async def decide(self, approval_id: str, decision: str, scope: str | None, note: str | None, by: str) -> Any:
        """Answer an approval as `egress-guard approve/deny` would: the same DecideApproval,
        through this proxy's writer. Returns the callback's Reply."""
        try:
            found = await self.engine.approvals_by_id([approval_id])
        except Exception as exc:
            return webhook.Reply(503, {"error": f"the store cannot be read: {exc}"})
        if not found:
            return webhook.Reply(404, {"error": f"no escalation {approval_id}"})
        a = found[0]
        if a.status != "pending":
            return webhook.Reply(409, _decided(a))
        if a.expires <= now_iso():
            return webhook.Reply(409, {"error": past_expiry(a), "status": a.status, "expires": a.expires})
        problem = scope_problem(a, scope if decision == "approve" else None)
        if problem is not None:
            return webhook.Reply(400, {"error": problem})
        ts = now_iso()
        op = DecideApproval(
            id=a.id,
            status="approved" if decision == "approve" else "denied",
            scope=scope if decision == "approve" else None,
            note=note,
            by=by,
            ts=ts,
        )
        try:
            await self.audit.durable(self.audit.submit(op))
            after = await self.engine.approvals_by_id([a.id])
        except Exception as exc:
            return webhook.Reply(503, {"error": f"the decision could not be recorded: {exc}"})
        if not after or (after[0].decided_at, after[0].decided_by) != (ts, by) or after[0].status != op.status:
            return webhook.Reply(409, _decided(after[0]) if after else {"error": "gone"})
        if a.id in self._waiting:  # held here: answer it now, not at the next poll
            self._final[a.id] = after[0]
            self._waiting[a.id].set()
        return webhook.Reply(200, {"id": a.id, "status": op.status, "scope": op.scope, "by": by})


def _decided(a: Approval) -> dict[str, Any]:
    return {
        "error": f"escalation {a.id} is not pending: {a.status} by {a.decided_by} at {a.decided_at}",
        "status": a.status,
        "decided_by": a.decided_by,
        "decided_at": a.decided_at,
    }
