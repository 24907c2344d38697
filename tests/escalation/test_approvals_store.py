"""Approvals, grants and freezes in both stores (real SQLite files, a real PostgreSQL
database): the typed writes as a command commits them, the same writes through the proxy's
writer, and the reads each face makes. Every case runs on both engines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from egress_guard.config.fleet import StoreSettings
from egress_guard.store import (
    AddFreeze,
    Approval,
    AuditLog,
    AuditRow,
    CreateApproval,
    DecideApproval,
    Engine,
    ExpireApproval,
    LiftFreeze,
    RevokeGrant,
    SQLiteEngine,
    SQLiteStore,
    Store,
)

TS = "2026-11-22T23:00:00.000Z"


def approval(id: str, **kw: Any) -> Approval:
    base: dict[str, Any] = {
        "id": id,
        "created": TS,
        "expires": "2026-11-22T23:02:00.000Z",
        "replica": "local",
        "request_id": f"req-{id}",
        "agent": "researcher",
        "session": "s1",
        "method": "POST",
        "scheme": "https",
        "host": "new.example.com",
        "port": 443,
        "path": "/v1/x",
        "rule": "unknown_hosts",
        "reason": "host new.example.com is covered by no rule",
    }
    return Approval(**(base | kw))


def decide(id: str, status: str = "approved", scope: str | None = "once", **kw: Any) -> DecideApproval:
    return DecideApproval(
        id=id, status=status, scope=scope, note=kw.get("note"), by=kw.get("by", "alice"), ts=kw.get("ts", TS)
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def stores(
    engine_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Callable[[], Store], Callable[[], Engine]]]:
    """(a command's store, the proxy's engine) factories on one fresh database."""
    if engine_kind == "sqlite":
        db = tmp_path / "eg.db"
        yield (lambda: SQLiteStore(db, readonly=False)), (lambda: SQLiteEngine(db))
    else:
        url = request.getfixturevalue("pg_url")
        from egress_guard.store.postgres import PGEngine, PGStore

        settings = StoreSettings(url=url, replica="eu-1", timeout=5.0)
        yield (lambda: PGStore(settings, readonly=False)), (lambda: PGEngine(settings))


def test_a_decision_is_conditional_and_adds_the_grant_its_scope_says(stores: Any) -> None:
    open_store, _ = stores
    with open_store() as store:
        for i in ("a1", "a2", "a3", "a4"):
            assert store.write(CreateApproval(approval(i))) == 1
        assert store.write(decide("a1", scope="once")) == 1
        assert store.write(decide("a2", scope="session", note="for this run")) == 1
        assert store.write(decide("a3", scope="always", by="bob")) == 1
        assert store.write(decide("a4", status="denied", scope=None, note="no")) == 1
        # answered already: a second answer (the CLI after a callback, a timeout) changes nothing
        assert store.write(decide("a1", status="denied", scope=None, by="mallory")) == 0
        assert store.write(ExpireApproval(id="a2", ts=TS)) == 0
        a1 = store.approval("a1")
        assert a1 is not None and (a1.status, a1.scope, a1.decided_by, a1.decided_at) == (
            "approved",
            "once",
            "alice",
            TS,
        )
        a4 = store.approval("a4")
        assert a4 is not None and (a4.status, a4.scope, a4.note) == ("denied", None, "no")
        assert store.approval("nope") is None
        grants = store.grants()
        assert [(g.approval_id, g.rule, g.host, g.port, g.agent, g.session, g.by) for g in grants] == [
            ("a2", "unknown_hosts", "new.example.com", 443, "researcher", "s1", "alice"),
            ("a3", "unknown_hosts", "new.example.com", 443, "researcher", None, "bob"),
        ]
        assert grants[0].note == "for this run"
        assert [a.id for a in store.approvals(status="approved")] == ["a1", "a2", "a3"]
        assert [a.id for a in store.approvals(limit=2)] == ["a3", "a4"]  # the newest two, oldest first
        assert store.write(RevokeGrant(id=grants[0].id, ts=TS)) == 1
        assert store.write(RevokeGrant(id=grants[0].id, ts=TS)) == 0
        assert [g.approval_id for g in store.grants()] == ["a3"]
        assert [g.revoked for g in store.grants(active_only=False)] == [TS, None]


def test_scope_session_without_a_session_grants_nothing(stores: Any) -> None:
    open_store, _ = stores
    with open_store() as store:
        store.write(CreateApproval(approval("b1", session=None)))
        assert store.write(decide("b1", scope="session")) == 0  # it would grant every session
        b1 = store.approval("b1")
        assert b1 is not None and b1.status == "pending"
        assert store.grants() == []
        assert store.write(decide("b1", scope="always")) == 1


def test_expiry_only_of_a_pending_approval(stores: Any) -> None:
    open_store, _ = stores
    with open_store() as store:
        store.write(CreateApproval(approval("c1")))
        assert store.write(ExpireApproval(id="c1", ts=TS)) == 1
        assert store.write(decide("c1")) == 0  # too late: the request was refused
        c1 = store.approval("c1")
        assert c1 is not None and (c1.status, c1.decided_by) == ("expired", "timeout")
        assert store.approvals(status="pending") == []


def test_approving_a_freeze_for_the_session_lifts_it(stores: Any) -> None:
    open_store, _ = stores
    with open_store() as store:
        assert (
            store.write(AddFreeze(agent="researcher", session="s1", trigger="spend 9x", baseline='{"usd":1}', ts=TS))
            == 1
        )
        assert store.write(AddFreeze(agent="researcher", session="s2", trigger="refusals", baseline="{}", ts=TS)) == 1
        store.write(CreateApproval(approval("f1", rule="freeze", reason="frozen: spend 9x")))
        store.write(CreateApproval(approval("f2", rule="freeze", session="s2")))
        assert store.write(decide("f2", scope="once")) == 1  # once: this request only, still frozen
        assert [f.session for f in store.freezes()] == ["s1", "s2"]
        assert store.write(decide("f1", scope="session", by="carol", note="expected")) == 1
        active = store.freezes()
        assert [(f.agent, f.session, f.trigger) for f in active] == [("researcher", "s2", "refusals")]
        lifted = next(f for f in store.freezes(active_only=False) if f.session == "s1")
        assert (lifted.lifted, lifted.lifted_by, lifted.note, lifted.baseline) == (TS, "carol", "expected", '{"usd":1}')
        (grant,) = store.grants()
        assert (grant.rule, grant.host, grant.port, grant.agent, grant.session) == (
            "freeze",
            "*",
            0,
            "researcher",
            "s1",
        )
        assert store.write(LiftFreeze(agent="researcher", session="s2", by="dave", ts=TS)) == 1
        assert store.freezes() == []


def test_the_proxys_writer_commits_them_and_its_engine_reads_them(stores: Any) -> None:
    open_store, open_engine = stores

    async def main() -> None:
        engine = open_engine()
        log = AuditLog(engine, batch_delay=0)
        await log.open()
        try:
            log.submit(CreateApproval(approval("e1")))
            log.submit(CreateApproval(approval("e2", session=None)))
            log.submit(AddFreeze(agent="bot", session="", trigger="hosts 6x", baseline="{}", ts=TS))
            n = log.submit(decide("e1", scope="session"))
            # the rows 0010 allows: events, and observe mode's decisions
            for kind, decision in [("event", "allow"), ("request", "would-deny"), ("request", "would-escalate")]:
                n = log.record(AuditRow(ts=TS, request_id=f"{kind}-{decision}", kind=kind, decision=decision))
            await log.durable(n)
            found = {a.id: a for a in await engine.approvals_by_id(["e1", "e2", "zz"])}
            assert sorted(found) == ["e1", "e2"]
            assert found["e1"].status == "approved" and found["e2"].status == "pending"
            assert found["e2"].session is None and found["e2"].port == 443
            assert await engine.approvals_by_id([]) == []
            (grant,) = await engine.active_grants()
            assert (grant.approval_id, grant.session) == ("e1", "s1")
            (freeze,) = await engine.active_freezes()
            assert (freeze.agent, freeze.session, freeze.trigger) == ("bot", "", "hosts 6x")
        finally:
            await log.close()

    asyncio.run(main())
    with open_store() as store:
        rows = store.rows(store_filters(), None)
        assert [(r["kind"], r["decision"]) for r in rows] == [
            ("event", "allow"),
            ("request", "would-deny"),
            ("request", "would-escalate"),
        ]


def test_the_audit_table_still_refuses_other_kinds_and_decisions(stores: Any) -> None:
    _, open_engine = stores

    async def main() -> None:
        log = AuditLog(open_engine(), batch_delay=0, wait_timeout=2.0)
        await log.open()
        try:
            n = log.record(AuditRow(ts=TS, request_id="x", kind="event", decision="maybe"))
            with pytest.raises(Exception, match=r"(?i)check"):
                await log.durable(n)
        finally:
            log._pending.clear()  # the bad row would be retried forever
            await log.close()

    asyncio.run(main())


def store_filters() -> Any:
    from egress_guard.store import Filters

    return Filters()


def test_an_id_taken_already_inserts_nothing_and_prefixes_find_ids(stores: Any) -> None:
    open_store, open_engine = stores

    async def main() -> None:
        log = AuditLog(open_engine(), batch_delay=0, wait_timeout=2.0)
        await log.open()
        try:
            await log.durable(log.submit(CreateApproval(approval("0123456789abcdef"))))
            # the same id again (a collision): nothing inserted, and the writer goes on
            log.submit(CreateApproval(approval("0123456789abcdef", request_id="req-other")))
            n = log.record(AuditRow(ts=TS, request_id="after", kind="event", decision="allow"))
            await log.durable(n)
            assert log.healthy and log.backlog == 0
            (kept,) = await log.engine.approvals_by_id(["0123456789abcdef"])
            assert kept.request_id == "req-0123456789abcdef"  # the first one's, unchanged
        finally:
            await log.close()

    asyncio.run(main())
    with open_store() as store:
        assert store.write(CreateApproval(approval("0123456789abcdef"))) == 0
        assert store.write(CreateApproval(approval("0123456fffffffff"))) == 1
        assert store.approval_ids("0123456789") == ["0123456789abcdef"]
        assert store.approval_ids("012345") == ["0123456789abcdef", "0123456fffffffff"]
        assert store.approval_ids("012345", limit=1) == ["0123456789abcdef"]
        assert store.approval_ids("fedcba") == []
        assert store.approval_ids("01%") == [] and store.approval_ids("01_3") == []  # not hex: no pattern


def test_the_proxys_reads_see_every_commit_before_them(stores: Any) -> None:
    """Reads on the shared reader interleave (the watcher's, an ask's): none may see a
    snapshot from before a commit it follows (an expiry read back as still pending)."""
    open_store, open_engine = stores
    with open_store() as store:
        for i in range(300):
            store.write(AddFreeze(agent=f"a{i}", session="", trigger="t", baseline="{}", ts=TS))

    async def main() -> None:
        log = AuditLog(open_engine(), batch_delay=0)
        await log.open()
        stop = asyncio.Event()

        async def reading() -> None:
            while not stop.is_set():
                await log.engine.active_freezes()

        readers = [asyncio.create_task(reading()) for _ in range(3)]
        try:
            for i in range(40):
                await log.durable(log.submit(CreateApproval(approval(f"{i:016x}"))))
                await log.durable(log.submit(ExpireApproval(id=f"{i:016x}", ts=TS)))
                (read,) = await log.engine.approvals_by_id([f"{i:016x}"])
                assert read.status == "expired", i
        finally:
            stop.set()
            await asyncio.gather(*readers)
            await log.close()

    asyncio.run(main())
