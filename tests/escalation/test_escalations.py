"""Escalations on real stores with the real CLI: a held request approved, denied or timed
out; an answer committed just before the timeout wins; scope session leaves a grant the
policy's Grants view covers; a freeze holds at once, is stored and audited, and an approval
with scope session lifts it; stopping ends every held request."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from escalation_env import cli, make_home, request, running, wait_pending
from psycopg.rows import dict_row

from egress_guard import escalation
from egress_guard.cli.approvals import default_by
from egress_guard.hosts import normalize_host
from egress_guard.store import DecideApproval, SQLiteStore
from egress_guard.timeutil import now_iso
from egress_guard.verdicts import FREEZE, Facts


def facts(
    agent: str = "researcher", session: str | None = "s1", host: str = "new.example.com", port: int = 443
) -> Facts:
    return Facts(host=normalize_host(host), port=port, agent=agent, session=session)


def events(config: Path) -> list[dict[str, Any]]:
    """The event rows in the config's store (SQLite or PostgreSQL)."""
    store = yaml.safe_load(config.read_text()).get("store")
    if store:
        with psycopg.connect(store["url"], row_factory=dict_row) as pg:
            return pg.execute("SELECT * FROM audit WHERE kind = 'event' ORDER BY id").fetchall()
    db = config.parent / "egress-guard.db"
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM audit WHERE kind = 'event' ORDER BY id")]
    finally:
        conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "sqlite":
        return make_home(tmp_path)
    return make_home(tmp_path, request.getfixturevalue("pg_url"))


async def test_approved_from_the_cli_with_scope_session_then_granted(config: Path) -> None:
    async with running(config, timeout=20) as esc:
        asked = asyncio.create_task(esc.ask(request()))
        (shown,) = await wait_pending(config)
        assert esc.held == 1
        assert (shown["agent"], shown["session"], shown["host"], shown["port"], shown["rule"]) == (
            "researcher",
            "s1",
            "new.example.com",
            443,
            "unknown_hosts",
        )
        assert esc.grants.covers("unknown_hosts", facts()) is None
        code, out = await asyncio.to_thread(
            cli, config, "approve", shown["id"], "--scope", "session", "--note", "eval run", "--by", "alice"
        )
        assert code == 0, out
        assert f"approved {shown['id']}: POST new.example.com:443 for agent researcher and its session s1" in out
        answer = await asyncio.wait_for(asked, 5)
        assert answer.approved and (answer.by, answer.scope, answer.note) == ("alice", "session", "eval run")
        assert answer.reason == f"approved by alice (escalation {shown['id']}, scope session: eval run)"
        # the grant is in force at once: the session's next request does not ask
        grant = esc.grants.covers("unknown_hosts", facts())
        assert grant is not None and (grant.agent, grant.session) == ("researcher", "s1")
        assert esc.grants.covers("unknown_hosts", facts(session="s2")) is None
        assert esc.grants.covers("unknown_hosts", facts(port=8443)) is None
        assert esc.grants.covers("rule:other", facts()) is None
        assert esc.held == 0
    code, out = cli(config, "pending", "--history")
    assert code == 0 and shown["id"][:8] in out and "approved" in out and "alice" in out and "grants" in out
    (row,) = events(config)
    assert (row["method"], row["decision"], row["rule"], row["request_id"]) == (
        "approve",
        "allow",
        shown["id"],
        "req-1",
    )
    assert row["reason"] == answer.reason and row["host"] == "new.example.com"


async def test_denied_from_the_cli_with_a_note(tmp_path: Path) -> None:
    config = make_home(tmp_path)
    async with running(config, timeout=20) as esc:
        asked = asyncio.create_task(esc.ask(request()))
        (shown,) = await wait_pending(config)
        code, out = await asyncio.to_thread(cli, config, "deny", shown["id"], "--note", "not needed", "--by", "bob")
        assert code == 0 and f"denied {shown['id']}" in out, out
        answer = await asyncio.wait_for(asked, 5)
    assert not answer.approved and answer.status == "denied"
    assert answer.reason == f"escalation {shown['id']} denied by bob: not needed"
    (row,) = events(config)
    assert (row["method"], row["decision"], row["reason"]) == ("deny", "deny", answer.reason)
    # answered: the CLI says by whom and when
    code, out = cli(config, "approve", shown["id"])
    assert code == 1 and f"escalation {shown['id']} is not pending: denied by bob at " in out and "not needed" in out


async def test_unanswered_it_expires_and_the_cli_says_so(config: Path) -> None:
    async with running(config, timeout=0.6) as esc:
        answer = await esc.ask(request())
    assert answer.status == "expired" and not answer.approved
    assert (
        answer.reason == f"escalation {answer.approval_id} timed out after 0.6 s without an answer (escalation.timeout)"
    )
    (row,) = events(config)
    assert (row["method"], row["decision"], row["rule"]) == ("expire", "deny", answer.approval_id)
    code, out = cli(config, "approve", answer.approval_id)
    assert code == 1 and "is not pending: it expired at" in out and "(timeout)" in out
    assert "no requests are waiting for an answer" in cli(config, "pending")[1]


async def test_an_answer_committed_before_the_expiry_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's approval lands while the proxy is not looking (no poll before the deadline):
    the expiry, conditional, changes nothing, and the final status read back is the approval."""
    config = make_home(tmp_path)
    monkeypatch.setattr(escalation, "POLL", 60.0)
    async with running(config, timeout=1.0) as esc:
        asked = asyncio.create_task(esc.ask(request()))
        (shown,) = await wait_pending(config)
        with SQLiteStore(config.parent / "egress-guard.db", readonly=False) as store:
            op = DecideApproval(id=shown["id"], status="approved", scope="once", note=None, by="carol", ts=now_iso())
            assert store.write(op) == 1
        answer = await asyncio.wait_for(asked, 5)
    assert answer.approved and answer.by == "carol"
    (row,) = events(config)
    assert row["method"] == "approve"


async def test_cli_errors_name_the_problem(tmp_path: Path) -> None:
    config = make_home(tmp_path)
    code, out = cli(config, "approve", "deadbeef")
    assert code == 1 and "no escalation 'deadbeef'" in out and "egress-guard pending" in out
    async with running(config, timeout=20) as esc:
        asked = asyncio.create_task(esc.ask(request(session=None)))
        (shown,) = await wait_pending(config)
        code, out = await asyncio.to_thread(cli, config, "approve", shown["id"], "--scope", "session")
        assert code == 1 and "has no session" in out and "--scope always" in out
        code, out = await asyncio.to_thread(cli, config, "approve", shown["id"], "--scope", "always")
        assert code == 0, out
        answer = await asyncio.wait_for(asked, 5)
        assert answer.approved and answer.scope == "always"
        assert esc.grants.covers("unknown_hosts", facts(session="any-other")) is not None
        assert esc.grants.covers("unknown_hosts", facts(agent="writer")) is None  # this agent only


async def test_a_freeze_holds_at_once_and_an_approval_for_the_session_lifts_it(tmp_path: Path) -> None:
    config = make_home(tmp_path)
    async with running(config, timeout=20) as esc:
        await esc.freeze("researcher", "s1", "spend 9.1x its baseline", '{"usd_per_window":"0.01"}')
        assert esc.frozen("researcher", "s1") == "spend 9.1x its baseline"
        assert esc.frozen("researcher", "s2") is None and esc.frozen(None, None) is None
        await esc.refresh()
        assert esc.frozen("researcher", "s1") == "spend 9.1x its baseline"  # now from the store
        with SQLiteStore(config.parent / "egress-guard.db") as store:
            (stored,) = store.freezes()
        assert (stored.agent, stored.session, stored.baseline) == ("researcher", "s1", '{"usd_per_window":"0.01"}')
        asked = asyncio.create_task(esc.ask(request(rule=FREEZE, reason="frozen: spend 9.1x its baseline")))
        (shown,) = await wait_pending(config)
        code, out = await asyncio.to_thread(cli, config, "approve", shown["id"], "--scope", "session", "--by", "ops")
        assert code == 0, out
        assert (await asyncio.wait_for(asked, 5)).approved
        assert esc.frozen("researcher", "s1") is None
        assert esc.grants.covers(FREEZE, facts(host="anything.example", port=80)) is not None
        assert esc.grants.covers(FREEZE, facts(session="s2")) is None
        await esc.freeze("researcher", "s1", "spend 12x its baseline", "{}")  # approved past it: not again
        assert esc.frozen("researcher", "s1") is None
    rows = events(config)
    assert rows[0]["method"] == "freeze"
    # the approval lifted the freeze: its own row, and the proxy's row for the freeze it saw lifted
    assert sorted(r["method"] for r in rows[1:]) == ["approve", "unfreeze"]
    assert "spend 9.1x its baseline" in rows[0]["reason"] and '{"usd_per_window":"0.01"}' in rows[0]["reason"]


async def test_stopping_ends_every_held_request(tmp_path: Path) -> None:
    config = make_home(tmp_path)
    async with running(config, timeout=60) as esc:
        asked = [asyncio.create_task(esc.ask(request(n))) for n in (1, 2)]
        await wait_pending(config, 2)
        await esc.close()
        answers = await asyncio.wait_for(asyncio.gather(*asked), 5)
    assert [a.approved for a in answers] == [False, False]
    assert all(escalation.STOPPING in a.reason for a in answers)
    with SQLiteStore(config.parent / "egress-guard.db") as store:
        assert {a.status for a in store.approvals()} == {"expired"}


async def test_ids_are_64_bits_and_a_taken_id_is_refused_not_followed(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An id collision (forced here) neither wedges the writer nor lets the request follow the
    other request's approval: it is refused, and the other approval is left as it was."""
    async with running(config, timeout=20) as esc:
        asked = asyncio.create_task(esc.ask(request(1)))
        (theirs,) = await wait_pending(config)
        assert len(theirs["id"]) == 16 and int(theirs["id"], 16) >= 0
        code, out = await asyncio.to_thread(cli, config, "approve", theirs["id"][:6])  # a prefix names it
        assert code == 0, out
        answer = await asyncio.wait_for(asked, 5)
        assert answer.approved and answer.approval_id == theirs["id"]
        monkeypatch.setattr(escalation.secrets, "token_hex", lambda n: theirs["id"])
        mine = await asyncio.wait_for(esc.ask(request(2)), 5)
        monkeypatch.undo()
        assert mine.status == "failed" and not mine.approved
        assert mine.reason == (
            f"escalation {theirs['id']}: store conflict: its id holds another request's approval (refused)"
        )
        assert esc.audit.healthy and esc.held == 0
        code, out = await asyncio.to_thread(cli, config, "pending", "--history", "--format", "json")
        (stored,) = json.loads(out)["approvals"]
        assert (stored["request_id"], stored["status"], stored["decided_by"]) == ("req-1", "approved", default_by())
    (row,) = events(config)  # the refused one wrote no answer of its own
    assert (row["method"], row["request_id"]) == ("approve", "req-1")


async def test_held_requests_are_capped_per_agent_and_in_total(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_home(tmp_path)
    async with running(config, timeout=30) as esc:
        held = [asyncio.create_task(esc.ask(request(n))) for n in range(escalation.MAX_HELD_PER_AGENT)]
        await wait_pending(config, escalation.MAX_HELD_PER_AGENT)
        assert esc.held == escalation.MAX_HELD_PER_AGENT == 16
        over = await asyncio.wait_for(esc.ask(request(99)), 1)  # at once: not held, not recorded
        assert over.status == "refused" and not over.approved
        assert over.reason == (
            "escalation refused: agent researcher already has 16 requests waiting for an answer "
            "(at most 16 per agent); answer them first: egress-guard pending"
        )
        assert len(await wait_pending(config)) == 16
        # another agent still asks
        other = asyncio.create_task(esc.ask(request(100, agent="writer")))
        await wait_pending(config, 17)
        # and in total: (a lower cap here, to spare 256 held requests)
        monkeypatch.setattr(escalation, "MAX_HELD", 17)
        total = await asyncio.wait_for(esc.ask(request(101, agent="third")), 1)
        assert total.status == "refused" and "this proxy already holds 17 requests" in total.reason
        assert "egress-guard pending" in total.reason
        monkeypatch.undo()
        # one answered: the agent may be held again
        first = (await wait_pending(config, 17))[0]
        code, out = await asyncio.to_thread(cli, config, "deny", first["id"])
        assert code == 0, out
        await asyncio.wait_for(asyncio.wait([t for t in held if not t.done()], return_when="FIRST_COMPLETED"), 5)
        again = asyncio.create_task(esc.ask(request(102)))
        await wait_pending(config, 17)
        assert not again.done() and esc.held == 17
        await esc.close()
        await asyncio.wait_for(asyncio.gather(*held, other, again), 5)


def stored(config: Path, *writes: Any) -> list[Any]:
    """Writes through a command's store (the config's engine); every approval afterwards."""
    from egress_guard.config import load_config
    from egress_guard.store import open_store

    with open_store(load_config(config), write=True) as store:
        for op in writes:
            store.write(op)
        return store.approvals()


async def test_a_crashed_runs_pending_approvals_expire_at_start_and_late_callbacks_are_refused(config: Path) -> None:
    from test_approvals_store import approval

    from egress_guard.store import CreateApproval

    replica = "eu-1" if yaml.safe_load(config.read_text()).get("store") else "local"
    future, past = "2099-01-01T00:00:00.000Z", "2026-01-01T00:02:00.000Z"
    stored(
        config,
        CreateApproval(approval("dead00000000000a", replica=replica, expires=future)),  # our crashed run's
        CreateApproval(approval("beef00000000000b", replica="other", expires=future)),
        CreateApproval(approval("01d0000000000000", replica="other", expires=past, session="s9")),
    )
    async with running(config, timeout=20) as esc:
        by_id = {a.id: a for a in stored(config)}
        dead = by_id["dead00000000000a"]
        assert (dead.status, dead.decided_by) == ("expired", "the proxy holding it stopped without an answer")
        assert by_id["beef00000000000b"].status == "pending"  # another replica's: it may still hold it
        # a late answer to an approval past its expiry: refused, as the CLI refuses it; no grant
        old = by_id["01d0000000000000"]
        assert old.status == "pending"
        reply = await esc.decide(old.id, "approve", "always", None, "late-bot")
        assert reply.status == 409 and reply.body["error"] == escalation.past_expiry(old)
        assert (
            "expired at 2026-01-01T00:02:00.000Z: its request was refused (nobody holds it any more)"
            in (reply.body["error"])
        )
        code, out = await asyncio.to_thread(cli, config, "approve", old.id)
        assert code == 1 and escalation.past_expiry(old) in out
        # this run's own asks are not leftovers
        asked = asyncio.create_task(esc.ask(request()))
        (mine,) = [p for p in await wait_pending(config, 2) if p["request_id"] == "req-1"]
        await esc._expire_leftovers()  # (a second start: nothing of this run is touched)
        assert {a.id: a.status for a in stored(config)}[mine["id"]] == "pending"
        code, out = await asyncio.to_thread(cli, config, "deny", mine["id"])
        assert code == 0, out
        assert (await asyncio.wait_for(asked, 5)).status == "denied"
    assert [a for a in stored(config) if a.status == "approved"] == []
    (row,) = events(config)
    assert row["method"] == "deny"


async def test_a_revoked_grant_and_a_lifted_freeze_leave_chained_event_rows(config: Path) -> None:
    """The commands cannot write audit rows (the proxy's writer owns the chain): the proxy
    that sees a grant revoked or a freeze lifted writes the event row, with who, when and the
    note the store has."""
    async with running(config, timeout=20) as esc:
        asked = asyncio.create_task(esc.ask(request()))
        (shown,) = await wait_pending(config)
        code, out = await asyncio.to_thread(
            cli, config, "approve", shown["id"], "--scope", "always", "--by", "alice", "--note", "eval"
        )
        assert code == 0, out
        assert (await asyncio.wait_for(asked, 5)).approved
        grant = esc.grants.covers("unknown_hosts", facts())
        assert grant is not None
        await esc.freeze("researcher", "s7", "refusals 25 in a window", "{}")
        await esc.refresh()
        code, out = await asyncio.to_thread(cli, config, "revoke-grant", str(grant.id))
        assert code == 0, out
        code, out = await asyncio.to_thread(
            cli, config, "unfreeze", "--agent", "researcher", "--session", "s7", "--by", "ops", "--note", "expected"
        )
        assert code == 0, out
        deadline = asyncio.get_running_loop().time() + 5
        while len(events(config)) < 4:
            assert asyncio.get_running_loop().time() < deadline, events(config)
            await asyncio.sleep(0.05)
        assert esc.grants.covers("unknown_hosts", facts()) is None and esc.frozen("researcher", "s7") is None
        await esc.refresh()  # once only
    rows = events(config)
    assert [r["method"] for r in rows] == ["approve", "freeze", "revoke-grant", "unfreeze"]
    revoked, lifted = rows[2], rows[3]
    assert (revoked["decision"], revoked["rule"], revoked["agent"], revoked["host"]) == (
        "allow",
        str(grant.id),
        "researcher",
        "new.example.com",
    )
    assert revoked["reason"].startswith(f"grant {grant.id} revoked at 20")
    assert "rule unknown_hosts for new.example.com:443" in revoked["reason"]
    assert f"granted by alice at {grant_created(config, grant.id)}, escalation {shown['id']}: eval" in revoked["reason"]
    assert (lifted["decision"], lifted["rule"], lifted["agent"], lifted["session"]) == (
        "allow",
        "freeze",
        "researcher",
        "s7",
    )
    assert " lifted by ops at 20" in lifted["reason"] and ": expected (frozen at " in lifted["reason"]
    assert "refusals 25 in a window" in lifted["reason"]
    from click.testing import CliRunner

    from egress_guard.cli import main

    verified = CliRunner().invoke(main, ["audit", "verify", "--config", str(config)], catch_exceptions=False)
    assert verified.exit_code == 0 and "ok: " in verified.output, verified.output  # chained, like every row


def grant_created(config: Path, grant_id: int) -> str:
    from egress_guard.config import load_config
    from egress_guard.store import open_store

    with open_store(load_config(config)) as store:
        (g,) = [g for g in store.grants(active_only=False) if g.id == grant_id]
        return g.created
