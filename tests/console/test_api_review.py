"""The console API's answers to what the security review tried: numbers too large for the
stores (L3) are 400s naming the bound, never 500s; an approval's scope refused
(`escalation.scope_problem`) is 400, while 409 stays "not pending any more"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from console_env import RunningConsole
from test_server import approval  # the approval rows the server tests seed

from egress_guard.store import CreateApproval, SQLiteStore

HUGE = "99999999999999999999999"


@pytest.mark.parametrize(
    "path",
    [
        "/api/decisions?since=999999d",  # OverflowError in parse_when: before the year 1
        "/api/spend?until=99999999d",
        f"/api/decisions?after={HUGE}",  # too large for a SQLite integer
        f"/api/decisions?after={2**63}",
        f"/api/decisions?limit={HUGE}",
        f"/api/decisions/{HUGE}",
        f"/api/decisions/{2**63}",
        "/api/decisions?after=" + "9" * 5000,
    ],
)
def test_too_large_numbers_are_400_naming_the_bound(path: str, console: RunningConsole) -> None:
    r = httpx.get(console.url + path, headers=console.auth, timeout=10)
    assert r.status_code == 400, (path, r.status_code, r.text)
    assert "error" in r.json() and len(r.json()["error"]) < 200


def test_the_largest_id_is_still_an_answer(console: RunningConsole) -> None:
    assert httpx.get(f"{console.url}/api/decisions/{2**63 - 1}", headers=console.auth).status_code == 404
    r = httpx.get(f"{console.url}/api/decisions?after={2**63 - 1}", headers=console.auth)
    assert r.status_code == 200, r.text


def test_a_refused_scope_is_400_and_not_pending_stays_409(home: Path, start_console: Callable) -> None:
    with SQLiteStore(home.parent / "egress-guard.db", readonly=False) as db:
        db.write(CreateApproval(approval("cccc000000000001", agent=None, session=None)))  # a request without a key
        db.write(CreateApproval(approval("cccc000000000002", session=None)))
        db.write(CreateApproval(approval("cccc000000000003", agent=None, expires="2026-01-01T00:02:00.000Z")))
    console = start_console(home)

    def approve(id: str, scope: str) -> httpx.Response:
        return httpx.post(f"{console.url}/api/approvals/{id}/approve", json={"scope": scope}, headers=console.action())

    for id, scope in (("cccc000000000001", "always"), ("cccc000000000001", "session"), ("cccc000000000002", "session")):
        r = approve(id, scope)
        assert r.status_code == 400 and "Fix: --scope once" in r.json()["error"], (id, scope, r.text)
    r = approve("cccc000000000003", "always")  # expired: not pending any more comes first
    assert r.status_code == 409 and "expired" in r.json()["error"], r.text
    assert approve("cccc000000000001", "once").status_code == 200
    r = approve("cccc000000000001", "always")
    assert r.status_code == 409 and "not pending" in r.json()["error"], r.text
