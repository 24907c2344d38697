"""The approval commands on a real store, without a proxy: `pending` (and --history, as a
table and as JSON), `approve`/`deny` errors, `revoke-grant`, `unfreeze`. The answers a
running proxy acts on are tested in test_escalations.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from escalation_env import cli, make_home
from test_approvals_store import approval

from egress_guard.store import AddFreeze, CreateApproval, SQLiteStore
from egress_guard.timeutil import now_iso

FUTURE = "2099-01-01T00:00:00.000Z"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    config = make_home(tmp_path)
    with SQLiteStore(tmp_path / "egress-guard.db", readonly=False) as store:
        store.write(CreateApproval(approval("aaaa0001", expires=FUTURE, created="2026-11-22T23:00:00.000Z")))
        store.write(
            CreateApproval(approval("aaaa0002", expires=FUTURE, created="2026-11-22T23:00:01.000Z", session=None))
        )
        store.write(
            CreateApproval(approval("aaaa0003", created="2026-01-01T00:00:00.000Z", expires="2026-01-01T00:02:00.000Z"))
        )  # long expired, unanswered
        store.write(
            AddFreeze(agent="researcher", session="s9", trigger="refusals 25 in a window", baseline="{}", ts=now_iso())
        )
    return config


def test_pending_lists_what_still_waits(config: Path) -> None:
    code, out = cli(config, "pending")
    assert code == 0, out
    assert "aaaa0001" in out and "aaaa0002" in out and "aaaa0003" not in out  # past its expiry: nobody holds it
    assert out.splitlines()[0].split()[:3] == ["id", "created", "expires"]
    code, out = cli(config, "pending", "--format", "json")
    assert [a["id"] for a in json.loads(out)] == ["aaaa0001", "aaaa0002"]


def test_history_shows_answers_grants_and_freezes(config: Path) -> None:
    assert cli(config, "approve", "aaaa0001", "--scope", "session", "--by", "alice", "--note", "eval")[0] == 0
    assert cli(config, "deny", "aaaa0002", "--by", "bob")[0] == 0
    code, out = cli(config, "pending", "--history", "--format", "json")
    assert code == 0, out
    history = json.loads(out)
    by_id = {a["id"]: a for a in history["approvals"]}
    assert (by_id["aaaa0001"]["status"], by_id["aaaa0001"]["scope"], by_id["aaaa0001"]["decided_by"]) == (
        "approved",
        "session",
        "alice",
    )
    assert (by_id["aaaa0002"]["status"], by_id["aaaa0002"]["decided_by"]) == ("denied", "bob")
    (grant,) = history["grants"]
    assert (grant["approval_id"], grant["session"], grant["by"], grant["note"]) == ("aaaa0001", "s1", "alice", "eval")
    (freeze,) = history["freezes"]
    assert (freeze["agent"], freeze["session"], freeze["lifted"]) == ("researcher", "s9", None)
    code, out = cli(config, "pending", "--history")
    assert code == 0 and "grants (scope session|always):" in out and "freezes:" in out and "refusals 25" in out


def test_approve_and_deny_errors(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = cli(config, "approve", "aaaa0003")
    assert code == 1 and "escalation aaaa0003 expired at" in out and "nobody holds it" in out
    code, out = cli(config, "approve", "aaaa0002", "--scope", "session")
    assert code == 1 and "has no session" in out
    code, out = cli(config, "deny", "nope")
    assert code == 1 and "no escalation 'nope'" in out
    monkeypatch.setenv("SUDO_USER", "operator7")
    code, out = cli(config, "deny", "aaaa0001", "--note", "unexpected host")
    assert code == 0 and "by operator7" in out
    code, out = cli(config, "approve", "aaaa0001", "--scope", "always")
    assert code == 1
    assert "escalation aaaa0001 is not pending: denied by operator7 at 20" in out and ": unexpected host" in out


def test_revoke_grant_and_unfreeze(config: Path) -> None:
    assert cli(config, "approve", "aaaa0001", "--scope", "always")[0] == 0
    history = json.loads(cli(config, "pending", "--history", "--format", "json")[1])
    grant_id = history["grants"][0]["id"]
    code, out = cli(config, "revoke-grant", str(grant_id))
    assert code == 0 and f"revoked grant {grant_id}: rule unknown_hosts for new.example.com:443" in out, out
    code, out = cli(config, "revoke-grant", str(grant_id))
    assert code == 1 and "revoked already" in out
    code, out = cli(config, "revoke-grant", "999")
    assert code == 1 and "no grant 999" in out
    code, out = cli(config, "unfreeze", "--agent", "researcher", "--session", "s1")
    assert code == 1 and "is not frozen (session 's1')" in out
    code, out = cli(config, "unfreeze", "--agent", "researcher", "--session", "s9", "--by", "ops", "--note", "ok")
    assert code == 0 and "lifted the freeze of agent researcher, session s9" in out
    with SQLiteStore(config.parent / "egress-guard.db") as store:
        assert store.freezes() == []
        (lifted,) = store.freezes(active_only=False)
        assert (lifted.lifted_by, lifted.note) == ("ops", "ok")
        assert store.grants() == []


def test_every_command_has_help_with_an_example() -> None:
    from escalation_env import COMMANDS

    for name, command in COMMANDS.items():
        assert command.help and "Example" in command.help and f"egress-guard {name}" in command.help, name


def test_an_id_prefix_of_six_or_more_names_one_approval(tmp_path: Path) -> None:
    config = make_home(tmp_path)
    with SQLiteStore(tmp_path / "egress-guard.db", readonly=False) as store:
        for i in ("c0ffee0123456789", "c0ffee01ffffffff", "badc0de012345678"):
            store.write(CreateApproval(approval(i, expires=FUTURE)))
    code, out = cli(config, "pending")
    assert code == 0 and "c0ffee01 " in out and "c0ffee0123456789" not in out  # a table shows 8 characters
    code, out = cli(config, "pending", "--format", "json")
    assert "badc0de012345678" in {a["id"] for a in json.loads(out)}  # JSON: the whole id
    code, out = cli(config, "deny", "c0ffee01")
    assert code == 1 and "'c0ffee01' is ambiguous" in out and "c0ffee0123456789, c0ffee01ffffffff" in out
    code, out = cli(config, "deny", "badc0")
    assert code == 1 and "at least 6 characters" in out
    code, out = cli(config, "deny", "abcdef")
    assert code == 1 and "no escalation 'abcdef'" in out and "egress-guard pending" in out
    code, out = cli(config, "deny", "BADC0D", "--by", "bob")
    assert code == 0 and "denied badc0de012345678" in out, out
    code, out = cli(config, "approve", "c0ffee012")
    assert code == 0 and "approved c0ffee0123456789" in out, out
    code, out = cli(config, "approve", "c0ffee01ffffffff", "--scope", "always")
    assert code == 0, out


def test_a_request_that_named_no_agent_is_approved_once_only(tmp_path: Path) -> None:
    """A keyless request from outside a sandbox names no agent: a standing grant for it would
    let every agent through, so only --scope once is taken (the CLI, the console and a signed
    callback refuse the rest with the same message)."""
    config = make_home(tmp_path)
    with SQLiteStore(tmp_path / "egress-guard.db", readonly=False) as store:
        store.write(CreateApproval(approval("bbbb0001", expires=FUTURE, agent=None, session=None)))
    for scope in ("session", "always"):
        code, out = cli(config, "approve", "bbbb0001", "--scope", scope)
        assert code == 1 and "names no agent" in out and "every agent" in out and "--scope once" in out, out
    code, out = cli(config, "approve", "bbbb0001", "--scope", "once")
    assert code == 0, out
    with SQLiteStore(tmp_path / "egress-guard.db") as store:
        assert store.grants(active_only=False) == []
