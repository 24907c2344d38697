"""The console's server (`egress-guard console`): every /api endpoint needs the Bearer token
(a cookie is no credential: the browser would send it to every port on 127.0.0.1), the pages
and static files are shells served without it, the Host check, the action checks, the
security headers; each API answer equals the CLI's and each action makes the CLI's write
(compared on twin stores); the live stream and its cap; no key in /api/agents; and the agents'
side of a real proxy cannot reach it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from console_env import RunningConsole, make_home

from egress_guard import keys as keys_mod
from egress_guard.cli import main
from egress_guard.cli.console import console as console_command
from egress_guard.config import load_config
from egress_guard.console import api
from egress_guard.console.api import console_by
from egress_guard.console.auth import CSP
from egress_guard.console.server import STATIC
from egress_guard.store import AuditLog, AuditRow, CreateApproval, SQLiteStore, open_engine
from egress_guard.store.records import Approval

FUTURE = "2099-01-01T00:00:00.000Z"

API_GETS = [
    "/api/decisions",
    "/api/decisions/1",
    "/api/decisions/stream",
    "/api/spend",
    "/api/budgets",
    "/api/sessions/top",
    "/api/denials",
    "/api/approvals",
    "/api/approvals?history=1",
    "/api/agents",
    "/api/nothing",
]
PAGES = ["live", "spend", "denials", "approvals", "agents"]
SHELLS = ["/", *(f"/{page}" for page in PAGES), "/static/console.css", "/static/common.js", "/static/live.js"]
POSTS = ["/api/approvals/aaaa000000000001/approve", "/api/approvals/aaaa000000000001/deny", "/api/agents/agent/kill"]


def cli(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*args, "--config", str(config)], catch_exceptions=False)
    return result.exit_code, result.output


def untimed(text: str) -> str:
    """A message without the instants in it (each store stamps its own)."""
    return re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "<ts>", text)


def seed(config_path: Path, rows: list[AuditRow]) -> None:
    """Write audit rows as the proxy does: through its writer, AuditLog (running totals too)."""

    async def write() -> None:
        log = AuditLog(open_engine(load_config(config_path)), batch_delay=0)
        await log.open()
        n = 0
        for r in rows:
            n = log.record(r)
        await log.durable(n)
        await log.close()

    asyncio.run(write())


def row(n: int, **kw: Any) -> AuditRow:
    """An audit row: an allowed, priced OpenAI call unless told otherwise."""
    base: dict[str, Any] = {
        "ts": f"2026-11-{20 + n % 3}T{8 + n % 12:02d}:{n % 60:02d}:00.000Z",
        "request_id": f"r{n}",
        "kind": "request",
        "agent": "agent",
        "session": f"s{n % 3}",
        "decision": "allow",
        "reason": "POST api.openai.com is allowed",
        "rule": "openai#0",
        "method": "POST",
        "scheme": "https",
        "host": "api.openai.com",
        "port": 443,
        "path": "/v1/chat/completions",
        "status": 200,
        "service": "openai",
        "credential": "swapped",
        "model": "gpt-4o-mini" if n % 2 else "gpt-4o",
        "input_tokens": 100,
        "output_tokens": 50,
        "cost_usd": f"0.0{n % 9}{n % 7}5",
    }
    return AuditRow(**(base | kw))


def approval(id: str, **kw: Any) -> Approval:
    base: dict[str, Any] = {
        "id": id,
        "created": "2026-11-22T23:00:00.000Z",
        "expires": FUTURE,
        "replica": "local",
        "request_id": f"req-{id}",
        "agent": "agent",
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


APPROVALS = [
    approval("aaaa000000000001"),
    approval("aaaa000000000002", session=None),
    approval("aaaa000000000003", created="2026-01-01T00:00:00.000Z", expires="2026-01-01T00:02:00.000Z"),
    approval("bbbb000000000004"),
]


def with_approvals(config: Path) -> Path:
    with SQLiteStore(config.parent / "egress-guard.db", readonly=False) as db:
        for a in APPROVALS:
            db.write(CreateApproval(a))
    return config


def state(config: Path) -> dict[str, Any]:
    """The store's approvals, grants and keys, without the times a write stamps."""
    with SQLiteStore(config.parent / "egress-guard.db") as db:
        return {
            "approvals": [dataclasses.asdict(a) | {"decided_at": None} for a in db.approvals()],
            "grants": [dataclasses.asdict(g) | {"created": None, "id": None} for g in db.grants(active_only=False)],
            "keys": [(k.agent, k.session, bool(k.revoked_at), k.revoked_reason) for k in db.keys()],  # noqa: SIM118 (Store.keys: the key records),
        }


# --- access -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", API_GETS)
def test_every_api_get_needs_the_bearer_token(console: RunningConsole, path: str) -> None:
    r = httpx.get(console.url + path)
    assert r.status_code == 401, (path, r.text)
    assert "Not signed in" in r.json()["error"] and "#token=" in r.json()["error"]
    assert r.headers["Content-Security-Policy"] == CSP  # refusals carry the headers too
    for headers in (
        {"Authorization": "Bearer " + "x" * 43},  # a wrong token
        {"Authorization": console.token},  # no scheme
        {"Authorization": f"Basic {console.token}"},
    ):
        assert httpx.get(console.url + path, headers=headers).status_code == 401, headers


@pytest.mark.parametrize("path", API_GETS)
def test_a_cookie_is_no_credential(console: RunningConsole, path: str) -> None:
    """The cross-port case: a browser sends the cookies of 127.0.0.1 to every port on it, so a
    request carrying the old cookie with the right token (as another local server would have
    got it) and no Bearer header is refused; with the header the cookie changes nothing."""
    cookie = {"Cookie": f"eg_console={console.token}"}
    r = httpx.get(console.url + path, headers=cookie)
    assert r.status_code == 401, (path, r.text)
    assert console.token not in r.text
    if path != "/api/decisions/stream":
        with_both = httpx.get(console.url + path, headers=cookie | console.auth)
        assert with_both.status_code in (200, 404), (path, with_both.text)  # /api/decisions/1: no row
        assert "Set-Cookie" not in with_both.headers


@pytest.mark.parametrize("path", POSTS)
def test_every_action_needs_the_bearer_token(console: RunningConsole, path: str) -> None:
    page_headers = {"Origin": console.url, "Sec-Fetch-Site": "same-origin"}
    for headers in (page_headers, page_headers | {"Cookie": f"eg_console={console.token}"}):
        r = httpx.post(console.url + path, json={}, headers=headers)
        assert r.status_code == 401 and "Not signed in" in r.json()["error"], r.text


@pytest.mark.parametrize("path", SHELLS)
def test_pages_and_static_files_are_shells_served_without_the_token(console: RunningConsole, path: str) -> None:
    """They hold no data: served to anyone who passes the Host check, with the headers."""
    r = httpx.get(console.url + path, follow_redirects=False)
    if path == "/":
        assert r.status_code == 303 and r.headers["Location"] == "/live"  # a #token= fragment goes along
    else:
        assert r.status_code == 200, (path, r.text)
        packaged = path.removeprefix("/static/") if path.startswith("/static/") else f"{path[1:]}.html"
        assert r.content == (STATIC / packaged).read_bytes()
    assert r.headers["Content-Security-Policy"] == CSP
    assert "Set-Cookie" not in r.headers
    assert console.token not in r.text
    with_token = httpx.get(console.url + path, headers=console.auth, follow_redirects=False)
    assert with_token.content == r.content  # the same shell for everyone: nothing in it depends on the token


def test_pages_are_the_packaged_html_with_nothing_injected(console: RunningConsole) -> None:
    for page in PAGES:
        r = httpx.get(f"{console.url}/{page}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.content == (STATIC / f"{page}.html").read_bytes()
        assert "csrf" not in r.text.lower() and "<meta name=" not in r.text.replace('<meta name="viewport"', "")
    assert httpx.get(console.url + "/static/nothing.js").status_code == 404


def test_the_old_query_token_address_no_longer_signs_in(console: RunningConsole) -> None:
    r = httpx.get(f"{console.url}/?token={console.token}", follow_redirects=False)
    assert r.status_code == 400 and r.headers["content-type"].startswith("text/html")
    assert "#token=" in r.text and console.token not in r.text
    assert "Set-Cookie" not in r.headers and "Location" not in r.headers
    assert httpx.get(console.url + "/api/agents", headers=console.auth).status_code == 200  # the header works


def test_host_check_refuses_another_name(console: RunningConsole) -> None:
    """DNS rebinding: a page at evil.example resolving to 127.0.0.1 sends Host: evil.example.
    The pages and static files are checked too."""
    for path in ("/api/agents", "/live", "/static/console.css", "/"):
        for host in (f"evil.example:{console.port}", "127.0.0.1", f"127.0.0.1:{console.port + 1}"):
            r = httpx.get(console.url + path, headers=console.auth | {"Host": host})
            assert r.status_code == 421, (path, host)
            assert r.headers["Content-Security-Policy"] == CSP
    for host in (f"localhost:{console.port}", f"127.0.0.1:{console.port}", f"[::1]:{console.port}"):
        assert httpx.get(console.url + "/api/agents", headers=console.auth | {"Host": host}).status_code == 200


def test_security_headers_everywhere(console: RunningConsole) -> None:
    for path in ("/live", "/api/agents", "/static/console.css", "/api/nothing", "/static/nothing.js", "/"):
        for headers in ({}, console.auth):
            r = httpx.get(console.url + path, headers=headers, follow_redirects=False)
            assert r.headers["Content-Security-Policy"] == CSP, path
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Referrer-Policy"] == "no-referrer"
            assert r.headers["Cache-Control"] == "no-store"
            assert r.headers["X-Frame-Options"] == "DENY"
            assert "Set-Cookie" not in r.headers
    for directive in ("base-uri 'none'", "form-action 'self'", "object-src 'none'", "frame-ancestors 'none'"):
        assert directive in CSP


def test_static_files_from_another_directory(tmp_path: Path, home: Path, start_console: Callable) -> None:
    static = tmp_path / "static"
    static.mkdir()
    for page in PAGES:
        (static / f"{page}.html").write_text(f"<!doctype html><title>{page}</title>")
    (static / "x.js").write_text("export const x = 1;\n")
    running = start_console(home, static=static)
    assert httpx.get(f"{running.url}/spend").text == "<!doctype html><title>spend</title>"
    r = httpx.get(running.url + "/static/x.js")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    for bad in ("/static/../conftest.py", "/static/%2e%2e/conftest.py", "/static/.hidden", "/static/nothing.js"):
        assert httpx.get(running.url + bad, headers=running.auth).status_code == 404, bad
    (static / "live.html").unlink()
    missing = httpx.get(f"{running.url}/live")
    assert missing.status_code == 404 and "not installed" in missing.text


# --- actions: who may -------------------------------------------------------------------


def test_action_refusals(home: Path, start_console: Callable) -> None:
    """An action is a POST with the Bearer token, a JSON body, the console's own Origin (when
    sent) and Sec-Fetch-Site same-origin (when sent); no CSRF token is needed any more."""
    running = start_console(with_approvals(home))
    url = running.url + "/api/approvals/aaaa000000000001/deny"
    other_port = f"http://127.0.0.1:{running.port + 1}"
    cases = {
        "wrong origin": (running.action() | {"Origin": "http://evil.example"}, {"json": {}}),
        "another port's origin": (running.action() | {"Origin": other_port}, {"json": {}}),
        "https origin": (running.action() | {"Origin": running.url.replace("http:", "https:")}, {"json": {}}),
        "null origin": (running.action() | {"Origin": "null"}, {"json": {}}),
        "cross-site fetch": (running.action() | {"Sec-Fetch-Site": "cross-site"}, {"json": {}}),
        "same-site fetch (another port)": (running.action() | {"Sec-Fetch-Site": "same-site"}, {"json": {}}),
        "typed address": (running.action() | {"Sec-Fetch-Site": "none"}, {"json": {}}),
        "form body": (running.action(), {"data": {"note": "x"}}),
        "text body": (running.action() | {"Content-Type": "text/plain"}, {"content": b"{}"}),
        "no content type": (running.action(), {"content": b"{}"}),
    }
    for name, (headers, body) in cases.items():
        r = httpx.post(url, headers=headers, **body)
        assert r.status_code == 403, (name, r.text)
        assert "error" in r.json()
    assert httpx.get(url, headers=running.auth).status_code == 405  # actions are POST only
    assert httpx.post(running.url + "/live", headers=running.action(), json={}).status_code == 405
    assert {a["status"] for a in state(home)["approvals"] if a["id"] == "aaaa000000000001"} == {"pending"}
    r = httpx.post(url, headers=running.auth, json={"note": "script"})  # a script: no Origin, no Sec-Fetch-*
    assert r.status_code == 200, r.text
    r = httpx.post(running.url + "/api/approvals/bbbb000000000004/deny", headers=running.action(), json={})  # a page
    assert r.status_code == 200, r.text
    statuses = {a["id"]: a["status"] for a in state(home)["approvals"]}
    assert statuses["aaaa000000000001"] == statuses["bbbb000000000004"] == "denied"


# --- actions: the CLI's writes ------------------------------------------------------------


def test_approve_and_deny_write_what_the_cli_writes(tmp_path: Path, start_console: Callable) -> None:
    by_console = with_approvals(make_home(tmp_path / "console"))
    by_cli = with_approvals(make_home(tmp_path / "cli"))
    running = start_console(by_console)
    by = console_by()

    def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(running.url + path, headers=running.action(), json=body)

    r = post("/api/approvals/aaaa000000000001/approve", {"scope": "session", "note": "eval run"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "approved" and r.json()["decided_by"] == by and r.json()["scope"] == "session"
    assert cli(by_cli, "approve", "aaaa000000000001", "--scope", "session", "--note", "eval run", "--by", by)[0] == 0
    r = post("/api/approvals/bbbb00/deny", {"note": "not needed"})  # a prefix, as the CLI takes
    assert r.status_code == 200 and r.json()["id"] == "bbbb000000000004", r.text
    assert cli(by_cli, "deny", "bbbb00", "--note", "not needed", "--by", by)[0] == 0
    assert state(by_console) == state(by_cli)
    assert state(by_console)["grants"][0]["session"] == "s1"

    # the refusals: the CLI's messages, as 404 / 409 / 400, and nothing written
    errors = [
        ("/api/approvals/nope/approve", {}, ("approve", "nope"), 404),
        ("/api/approvals/aaaa00/approve", {}, ("approve", "aaaa00"), 404),  # ambiguous
        ("/api/approvals/aaaa000000000001/deny", {}, ("deny", "aaaa000000000001"), 409),  # answered already
        ("/api/approvals/aaaa000000000003/approve", {}, ("approve", "aaaa000000000003"), 409),  # expired
        (
            "/api/approvals/aaaa000000000002/approve",
            {"scope": "session"},
            ("approve", "aaaa000000000002", "--scope", "session"),
            400,
        ),
    ]
    for path, body, args, status in errors:
        r = post(path, body)
        code, out = cli(by_cli, *args, "--by", by)
        assert (r.status_code, code) == (status, 1), (path, r.text, out)
        assert untimed(r.json()["error"]) == untimed(out.removeprefix("Error: ").strip()), path
    assert post("/api/approvals/aaaa000000000002/approve", {"scope": "forever"}).status_code == 400
    assert post("/api/approvals/aaaa000000000002/approve", {"note": 5}).status_code == 400
    assert state(by_console) == state(by_cli)


def test_approvals_list_is_pending_format_json(home: Path, start_console: Callable) -> None:
    running = start_console(with_approvals(home))
    assert cli(home, "approve", "aaaa000000000001", "--scope", "always", "--by", "alice")[0] == 0
    for query, args in (("", ()), ("?history=1", ("--history",)), ("?history=0", ())):
        r = httpx.get(running.url + "/api/approvals" + query, headers=running.auth)
        assert r.json() == json.loads(cli(home, "pending", *args, "--format", "json")[1]), query
    assert [a["id"] for a in httpx.get(running.url + "/api/approvals", headers=running.auth).json()] == [
        "aaaa000000000002",
        "bbbb000000000004",
    ]
    assert httpx.get(running.url + "/api/approvals?history=yes", headers=running.auth).status_code == 400


def test_kill_revokes_what_the_cli_revokes(
    tmp_path: Path, start_console: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")  # never a real engine's containers
    homes = {name: make_home(tmp_path / name) for name in ("console", "cli")}
    for config in homes.values():
        for session in ("s1", "s2"):
            keys_mod.mint(load_config(config), "agent", session=session)
    running = start_console(homes["console"])
    r = httpx.post(running.url + "/api/agents/agent/kill", headers=running.action(), json={"session": "s1"})
    assert r.status_code == 200, r.text
    done = r.json()
    assert (done["revoked_keys"], done["session"], done["ok"]) == (1, "s1", False)
    assert done["containers"]["error"] and done["problems"]  # the engine named cannot be asked: said
    reason = f"kill switch ({console_by()})"  # who killed, as an approval's `by`
    code, out = cli(homes["cli"], "kill", "--agent", "agent", "--session", "s1", "--reason", reason)
    assert code == 1 and "revoked 1 key(s)" in out and "s1" in out, out
    assert state(homes["console"])["keys"] == state(homes["cli"])["keys"]
    r = httpx.post(running.url + "/api/agents/agent/kill", headers=running.action(), json={})
    assert r.status_code == 200 and r.json()["revoked_keys"] == 1
    assert cli(homes["cli"], "kill", "--agent", "agent", "--reason", reason)[0] == 1
    assert state(homes["console"])["keys"] == state(homes["cli"])["keys"]
    assert all(revoked for _, _, revoked, _ in state(homes["console"])["keys"])
    assert httpx.post(running.url + "/api/agents/nobody/kill", headers=running.action(), json={}).status_code == 404
    r = httpx.post(running.url + "/api/agents/agent/kill", headers=running.action(), json={"session": "s9"})
    assert r.status_code == 404 and "has no session 's9'" in r.json()["error"]


# --- answers: the CLI's -------------------------------------------------------------------


def test_spend_total_is_audit_spends(home: Path, start_console: Callable) -> None:
    seed(home, [row(n) for n in range(1, 40)] + [row(99, agent="other", cost_usd="1.5", model="claude")])
    running = start_console(home)
    for since in ("2026-11-19", "2026-11-21T12:00"):
        spent = httpx.get(running.url + f"/api/spend?since={since}", headers=running.auth).json()
        by_agent = json.loads(cli(home, "audit", "spend", "--since", since, "--format", "json")[1])
        assert spent["total"] == f"{sum(Decimal(r['cost_usd']) for r in by_agent):f}"
        assert spent["by_agent"] == {r["agent"]: r["cost_usd"] for r in by_agent}
        by_model = json.loads(cli(home, "audit", "spend", "--by", "model", "--since", since, "--format", "json")[1])
        assert spent["by_model"] == {r["model"]: r["cost_usd"] for r in by_model}
        assert sum(Decimal(s["usd"]) for s in spent["series"]) == Decimal(spent["total"])
        by_day = json.loads(cli(home, "audit", "spend", "--by", "day", "--since", since, "--format", "json")[1])
        assert len({s["bucket"] for s in spent["series"]}) == len(by_day)
    hourly = httpx.get(running.url + "/api/spend?since=2026-11-19&bucket=hour", headers=running.auth).json()
    assert all(s["bucket"].endswith(":00:00.000Z") for s in hourly["series"])
    assert hourly["total"] == spent["total"] or hourly["total"]  # same rows, other buckets
    assert httpx.get(running.url + "/api/spend?bucket=week", headers=running.auth).status_code == 400
    assert httpx.get(running.url + "/api/spend?since=yesterday", headers=running.auth).status_code == 400


def test_budgets_and_top_sessions(home: Path, start_console: Callable) -> None:
    seed(home, [row(n) for n in range(1, 10)])
    running = start_console(home)
    budgets = httpx.get(running.url + "/api/budgets", headers=running.auth).json()
    assert budgets == json.loads(cli(home, "budget", "show", "--format", "json")[1])
    assert httpx.get(running.url + "/api/budgets?agent=nobody", headers=running.auth).status_code == 404
    top = httpx.get(running.url + "/api/sessions/top?since=2026-11-01&limit=2", headers=running.auth).json()
    by_session = json.loads(
        cli(home, "audit", "spend", "--by", "session", "--since", "2026-11-01", "--format", "json")[1]
    )
    assert [(t["agent"] + "/" + t["session"], t["usd"], t["requests"]) for t in top] == [
        (r["session"], r["cost_usd"], r["requests"]) for r in by_session[:2]
    ]
    assert all(t["last"].startswith("2026-11-") for t in top)


def test_decisions_are_audit_querys_rows(home: Path, start_console: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(
        home,
        [row(n) for n in range(1, 8)]
        + [row(8, decision="deny", host="evil.example", cost_usd=None), row(9, decision="would-deny", cost_usd=None)],
    )
    running = start_console(home)
    got = httpx.get(running.url + "/api/decisions", headers=running.auth).json()
    assert got["rows"] == json.loads(cli(home, "audit", "--format", "json")[1])
    assert got["last"] == 9
    deny = httpx.get(running.url + "/api/decisions?decision=deny&host=EVIL.example.", headers=running.auth).json()
    assert [r["request_id"] for r in deny["rows"]] == ["r8"]
    page = httpx.get(running.url + "/api/decisions?after=3&limit=2", headers=running.auth).json()
    assert [r["id"] for r in page["rows"]] == [8, 9] and page["last"] == 9  # the newest 2 after 3
    observed = httpx.get(running.url + "/api/decisions?decision=would-deny", headers=running.auth).json()
    assert [r["request_id"] for r in observed["rows"]] == ["r9"]  # observe mode's rows
    none = httpx.get(running.url + "/api/decisions?after=9&agent=nobody", headers=running.auth).json()
    assert none == {"rows": [], "last": 9}
    one = httpx.get(running.url + "/api/decisions/5", headers=running.auth)
    assert one.json() == got["rows"][4]
    assert httpx.get(running.url + "/api/decisions/99", headers=running.auth).status_code == 404
    monkeypatch.setattr(api, "LOOKUP_SPAN", 3)  # an old row: a 404 naming the command, never a full scan
    old = httpx.get(running.url + "/api/decisions/5", headers=running.auth)
    assert old.status_code == 404 and "egress-guard audit query" in old.json()["error"]
    assert httpx.get(running.url + "/api/decisions/6", headers=running.auth).json()["id"] == 6
    for bad in ("?decision=maybe", "?after=x", "?limit=0", "?limit=100000"):
        assert httpx.get(running.url + "/api/decisions" + bad, headers=running.auth).status_code == 400, bad


def test_the_stream_sends_new_rows_within_a_second(home: Path, start_console: Callable) -> None:
    seed(home, [row(1)])
    running = start_console(home)
    events: list[tuple[str, dict[str, Any]]] = []
    opened = threading.Event()

    def listen() -> None:
        with httpx.stream(
            "GET", running.url + "/api/decisions/stream?agent=agent", headers=running.auth, timeout=10
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            opened.set()
            kind = ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
                    if len(events) == 2:
                        return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert opened.wait(5)
    time.sleep(0.6)  # the stream has read the head: only rows written from now on
    started = time.monotonic()
    seed(home, [row(2, agent="other"), row(3), row(4)])
    thread.join(5)
    assert time.monotonic() - started < 2.5
    assert [(kind, r["request_id"]) for kind, r in events] == [("row", "r3"), ("row", "r4")]  # filtered, in order
    assert events[0][1]["cost_usd"] == row(3).cost_usd  # the full row


def test_the_stream_resumes_after_an_id(home: Path, start_console: Callable) -> None:
    seed(home, [row(n) for n in range(1, 4)])
    running = start_console(home)
    resumed = running.auth | {"Last-Event-ID": "1"}
    for headers, query in ((running.auth, "?after=1"), (resumed, ""), (resumed, "?after=0")):  # the header wins
        with httpx.stream("GET", running.url + "/api/decisions/stream" + query, headers=headers, timeout=10) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if len([x for x in lines if x.startswith("data: ")]) == 2:
                    break
        assert [x for x in lines if x.startswith("id: ")] == ["id: 2", "id: 3"]


def test_denials_flagged_first(home: Path, start_console: Callable) -> None:
    flag = "; flagged as a possible exfiltration attempt"
    seed(
        home,
        [
            row(1, decision="deny", host="evil.example", reason="host evil.example is not on the allowlist", rule=None),
            row(2, decision="deny", host="evil.example", reason="host evil.example is not on the allowlist", rule=None),
            row(3, decision="deny", credential="denied-forged", reason=f"forged or altered egress-guard key{flag}"),
            row(4, decision="deny", credential="denied-revoked", reason="egress-guard key k was revoked (kill)"),
            row(5),
        ],
    )
    running = start_console(home)
    got = httpx.get(running.url + "/api/denials?since=2026-11-01&bucket=day", headers=running.auth).json()
    assert [r["request_id"] for r in got["flagged"]] == ["r3"]
    assert got["total"] == 4
    assert {h["host"]: h["count"] for h in got["by_host"]} == {"evil.example": 2, "api.openai.com": 2}
    reasons = {r["reason"]: r["count"] for r in got["by_reason"]}
    assert reasons == {"host evil.example is not on the allowlist": 2, "denied-forged": 1, "denied-revoked": 1}
    assert sum(s["count"] for s in got["series"]) == 4


def test_agents_show_key_ids_never_keys(home: Path, start_console: Callable) -> None:
    config = load_config(home)
    minted = [keys_mod.mint(config, "agent", session=s) for s in ("s1", "s2")]
    keys_mod.revoke_keys(config, session="s2", reason="done")
    seed(home, [row(n, ts=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())) for n in (1, 2)])
    running = start_console(home)
    r = httpx.get(running.url + "/api/agents", headers=running.auth)
    text = r.text
    for m in minted:
        for value in m.env.values():
            assert value not in text  # no fake key
        assert m.record.key_id in text
    (agent,) = r.json()
    assert agent["agent"] == "agent" and agent["services"] == list(config.agents["agent"].services)
    assert agent["sessions"] == ["s1"]
    assert {(k["session"], k["revoked"]) for k in agent["keys"]} == {("s1", False), ("s2", True)}
    assert Decimal(agent["spent_today"]) == Decimal(row(1).cost_usd or 0) + Decimal(row(2).cost_usd or 0)


# --- the agents' side cannot reach it -----------------------------------------------------


def test_the_proxy_refuses_agents_the_console(
    console: RunningConsole, make_proxy: Callable[..., Any], test_ca: Any
) -> None:
    """An agent asking the proxy for the console's loopback address (even with the token, even
    with an allow rule naming it) is refused by the proxy; the console never sees it."""
    proxy = make_proxy(allow=[{"host": "localhost", "ports": [console.port]}])
    with httpx.Client(proxy=proxy.url, timeout=10) as client:
        for target in (f"http://127.0.0.1:{console.port}", f"http://localhost:{console.port}"):
            r = client.get(target + "/api/agents", headers=console.auth)
            assert r.status_code in (403, 502), (target, r.status_code, r.text)
            assert "Content-Security-Policy" not in r.headers  # not the console's answer
            assert "agent" not in r.text.split("reason")[0] or r.status_code != 200
    with pytest.raises(httpx.HTTPError), httpx.Client(proxy=proxy.url, timeout=10, verify=False) as client:
        client.get(f"https://127.0.0.1:{console.port}/api/agents", headers=console.auth).raise_for_status()
    rows = proxy.rows(expect=3)
    assert [r["decision"] for r in rows if str(console.port) in str(r["port"])] == ["deny"] * 3


# --- the command ----------------------------------------------------------------------------


def test_command_help_and_refusals(home: Path, tmp_path: Path) -> None:
    assert console_command.help and "Example" in console_command.help and "egress-guard console" in console_command.help
    runner = CliRunner()
    result = runner.invoke(console_command, ["--config", str(home), "--listen", "192.0.2.1:8081"])
    assert result.exit_code == 2 and "not a loopback address" in result.output and "--allow-remote" in result.output
    result = runner.invoke(console_command, ["--config", str(home), "--listen", "0.0.0.0:8081", "--allow-remote"])
    assert result.exit_code == 2 and "name the address" in result.output
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o600)
    result = runner.invoke(console_command, ["--config", str(home), "--token-file", str(short)])
    assert result.exit_code == 2 and "too short" in result.output
    short.write_text("a" * 20 + ";b\n")  # not in an address's alphabet
    result = runner.invoke(console_command, ["--config", str(home), "--token-file", str(short)])
    assert result.exit_code == 2 and "letters, digits" in result.output and "a" * 20 not in result.output


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_command_refuses_a_token_file_others_can_read(home: Path, tmp_path: Path, mode: int) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t" * 40 + "\n")
    token_file.chmod(mode)
    result = CliRunner().invoke(console_command, ["--config", str(home), "--token-file", str(token_file)])
    assert result.exit_code == 2, result.output
    assert f"chmod 600 {token_file}" in result.output and f"{mode:04o}" in result.output
    assert "t" * 40 not in result.output


def _run_console(home: Path, *args: str) -> tuple[Any, int]:
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        # the command itself (`egress-guard console` once registered in the group)
        [
            sys.executable,
            "-c",
            "from egress_guard.cli.console import console; console()",
            *("--config", str(home), "--listen", f"127.0.0.1:{port}", *args),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, port


def test_command_prints_the_address_with_the_token_in_the_fragment(home: Path) -> None:
    proc, port = _run_console(home)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline().strip()
        match = re.fullmatch(rf"console: http://127\.0\.0\.1:{port}/#token=([A-Za-z0-9_-]{{40,}})", line)
        assert match, line
        token = match[1]
        assert "open it in a browser" in proc.stderr.readline()
        r = httpx.get(f"http://127.0.0.1:{port}/api/agents", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()[0]["agent"] == "agent"
        page = httpx.get(line.removeprefix("console: "))  # what a browser asks: the fragment stays behind
        assert page.status_code == 303 and page.headers["Location"] == "/live"
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0


def test_command_with_a_token_file_never_prints_the_token(home: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t" * 40 + "\n")
    token_file.chmod(0o600)
    proc, port = _run_console(home, "--token-file", str(token_file))
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().strip() == f"console: http://127.0.0.1:{port}/"
        hint = proc.stderr.readline()
        assert f"the token is in {token_file}" in hint and f"http://127.0.0.1:{port}/#token=" in hint
        r = httpx.get(f"http://127.0.0.1:{port}/api/agents", headers={"Authorization": f"Bearer {'t' * 40}"})
        assert r.status_code == 200 and r.json()[0]["agent"] == "agent"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "t" * 40 not in out + err + hint


def test_a_quiet_stream_is_kept_alive_and_streams_are_capped(
    home: Path, start_console: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    from egress_guard.console import server

    monkeypatch.setattr(server, "PING", 0.2)
    monkeypatch.setattr(server, "MAX_STREAMS", 1)
    running = start_console(home)
    with httpx.stream("GET", running.url + "/api/decisions/stream", headers=running.auth, timeout=10) as r:
        lines = r.iter_lines()
        assert next(lines) == "retry: 1000"
        assert ": ping" in [next(lines) for _ in range(3)]  # (a blank line ends each message)
        second = httpx.get(running.url + "/api/decisions/stream", headers=running.auth, timeout=10)
        assert second.status_code == 503 and "streams are open" in second.json()["error"]


def test_on_a_postgresql_store(tmp_path: Path, pg_url: str, start_console: Callable) -> None:
    """The same answers and writes on the PostgreSQL store replicas share."""
    import yaml

    from egress_guard.store import open_store

    config = make_home(tmp_path / "pg")
    body = yaml.safe_load(config.read_text())
    body["store"] = {"url": pg_url, "replica": "eu-1"}
    config.write_text(yaml.safe_dump(body))
    seed(config, [row(n) for n in range(1, 6)] + [row(6, decision="deny", cost_usd=None)])
    with open_store(load_config(config), write=True) as db:
        for a in APPROVALS:
            db.write(CreateApproval(dataclasses.replace(a, replica="eu-1")))
    running = start_console(config)

    def get(path: str) -> Any:
        r = httpx.get(running.url + path, headers=running.auth)
        assert r.status_code == 200, (path, r.text)
        return r.json()

    assert get("/api/decisions")["rows"] == json.loads(cli(config, "audit", "--format", "json")[1])
    by_agent = json.loads(cli(config, "audit", "spend", "--since", "2026-11-01", "--format", "json")[1])
    assert get("/api/spend?since=2026-11-01")["total"] == f"{sum(Decimal(r['cost_usd']) for r in by_agent):f}"
    assert get("/api/budgets") == json.loads(cli(config, "budget", "show", "--format", "json")[1])
    r = httpx.post(
        running.url + "/api/approvals/aaaa000000000001/approve", headers=running.action(), json={"scope": "always"}
    )
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    assert get("/api/approvals?history=1") == json.loads(cli(config, "pending", "--history", "--format", "json")[1])
    assert get("/api/agents")[0]["agent"] == "agent"
    assert get("/api/denials?since=2026-11-01")["total"] == 1


def test_at_most_32_streams_open_at_once(console: RunningConsole) -> None:
    """The slot is taken before the stream's first await: 40 opened at once, at most 32 get
    200 (the others 503), and a closed stream gives its slot back."""
    from egress_guard.console import server

    async def storm() -> list[int]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=20))

            async def open_one() -> int:
                r = await stack.enter_async_context(
                    client.stream("GET", console.url + "/api/decisions/stream", headers=console.auth)
                )
                return r.status_code

            return list(await asyncio.gather(*(open_one() for _ in range(40))))

    codes = asyncio.run(storm())
    assert codes.count(200) == server.MAX_STREAMS and codes.count(503) == 40 - server.MAX_STREAMS, codes
    deadline = time.monotonic() + 5  # each closed stream notices within a poll and frees its slot
    while True:
        with httpx.stream("GET", console.url + "/api/decisions/stream", headers=console.auth, timeout=10) as r:
            if r.status_code == 200:
                break
        assert time.monotonic() < deadline, "the closed streams kept their slots"
        time.sleep(0.2)
