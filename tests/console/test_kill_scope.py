"""Kill one agent's session (security review M2): two agents may share a session name
(`keys mint --session NAME`); "Kill → only session S" on agent A (the console) and
`egress-guard kill --agent A --session S` (the CLI) revoke A's keys of S and kill A's
containers of S — never B's. Through a real proxy, on SQLite and on PostgreSQL, with a
Docker Engine API stand-in that records what it was asked to kill."""

from __future__ import annotations

import contextlib
import http.server
import json
import socketserver
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from click.testing import CliRunner
from console_env import RunningConsole
from support.proxy import RunningProxy, write_config
from support.upstream import Upstream

from egress_guard import keys
from egress_guard.addons.sandboxes import Sandbox, Sandboxes
from egress_guard.cli import main
from egress_guard.config import Config
from egress_guard.console.api import console_by
from egress_guard.docker_kill import kill_containers
from egress_guard.store import Revocation, RevokeKeys

SESSION = "shared"


class _Engine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@contextlib.contextmanager
def fake_engine(path: Path, containers: list[dict[str, Any]], killed: list[str]) -> Iterator[str]:
    """A Docker Engine API stand-in on a Unix socket: lists `containers` by label filter (all
    labels given must match); each kill asked is appended to `killed`. Yields its DOCKER_HOST."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: object) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            wanted = [label.partition("=") for label in json.loads(query["filters"][0])["label"]]
            self._send(200, [c for c in containers if all(c["Labels"].get(k) == v for k, _, v in wanted)])

        def do_POST(self) -> None:
            killed.append(urllib.parse.urlsplit(self.path).path.split("/")[2])
            self._send(204, None)

    server = _Engine(str(path), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"unix://{path}"
    finally:
        server.shutdown()
        server.server_close()


def box(name: str, agent: str, session: str | None) -> dict[str, Any]:
    labels = {"egress-guard.agent": agent} | ({"egress-guard.session": session} if session else {})
    return {"Id": name * 16, "Names": [f"/{name}"], "Labels": labels}


BOXES = [box("aaaa", "researcher", SESSION), box("bbbb", "writer", SESSION), box("cccc", "researcher", "other")]


def revocations(config: Config) -> list[tuple[Any, ...]]:
    query = "SELECT agent, session, key_id, reason FROM revocations ORDER BY id"
    if config.store is not None:
        with psycopg.connect(config.store.url, autocommit=True) as conn:
            return [tuple(r) for r in conn.execute(query)]
    with sqlite3.connect(config.audit_path) as db:
        return list(db.execute(query))


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.fixture(params=["sqlite", "postgres"])
def engine_store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The config's `store:` (none: the embedded SQLite file; else a fresh PostgreSQL database)."""
    if request.param == "sqlite":
        return {}
    return {"store": {"url": request.getfixturevalue("pg_url")}}


@pytest.fixture
def shared_session(
    tmp_path: Path, cred_config: dict[str, Any], real_env: Any, engine_store: dict[str, Any]
) -> Iterator[tuple[RunningProxy, str, str]]:
    """The real proxy, and two agents' keys minted for the same session name."""
    body = {**cred_config, **engine_store, "agents": {"researcher": {"services": ["openai"]}, "writer": {"services": ["openai"]}}}  # fmt: skip
    proxy = RunningProxy(write_config(tmp_path, body)).start()
    try:
        mine = keys.mint(proxy.config, "researcher", session=SESSION).env["OPENAI_API_KEY"]
        theirs = keys.mint(proxy.config, "writer", session=SESSION).env["OPENAI_API_KEY"]
        keys.mint(proxy.config, "researcher", session="other")  # researcher's other session stays
        yield proxy, mine, theirs
    finally:
        proxy.stop()


def check_only_researcher_killed(
    shared: tuple[RunningProxy, str, str], llm_upstream: Upstream, kill: Callable[[], None], killed: list[str]
) -> list[tuple[Any, ...]]:
    """Both keys work (and so are cached in the proxy); `kill` runs; researcher's key is
    refused within a few kill-switch polls, writer's still works after more; only researcher's
    container of the session died. Returns the revocations."""
    proxy, mine, theirs = shared
    models = f"https://api.openai.com:{llm_upstream.port}/v1/models"

    def client() -> httpx.Client:
        return httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=20)

    # One connection per agent: the kill cuts researcher's; writer's must stay open and work.
    with client() as researcher, client() as writer:

        def status(http: httpx.Client, key: str) -> int:
            try:
                return http.get(models, headers={"Authorization": f"Bearer {key}"}).status_code
            except httpx.TransportError:  # its connection was cut
                return 0

        assert status(researcher, mine) == 200 and status(writer, theirs) == 200
        kill()
        assert wait_for(lambda: status(researcher, mine) == 401), "researcher's key was not refused"
        time.sleep(0.6)  # more than two kill-switch polls after the revocation was applied
        assert status(writer, theirs) == 200, "the other agent's key of the same session name was revoked"
    assert killed == ["aaaa" * 16], killed
    listed = sorted((r["agent"], r["session"], r["status"]) for r in keys.list_keys(proxy.config, None, True))
    assert listed == [
        ("researcher", "other", "active"),
        ("researcher", SESSION, "revoked"),
        ("writer", SESSION, "active"),
    ]
    return revocations(proxy.config)


def test_the_console_kills_only_that_agents_session(
    shared_session: tuple[RunningProxy, str, str],
    llm_upstream: Upstream,
    start_console: Callable[..., RunningConsole],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    proxy = shared_session[0]
    console = start_console(proxy.config.path)
    killed: list[str] = []
    answer: dict[str, Any] = {}
    with fake_engine(tmp_path / "d.sock", BOXES, killed) as host:
        monkeypatch.setenv("DOCKER_HOST", host)

        def kill() -> None:
            r = httpx.post(
                f"{console.url}/api/agents/researcher/kill",
                json={"session": SESSION},
                headers=console.action(),
                timeout=20,
            )
            assert r.status_code == 200, r.text
            answer.update(r.json())

        rows = check_only_researcher_killed(shared_session, llm_upstream, kill, killed)
    assert answer["revoked_keys"] == 1 and answer["ok"], answer
    assert [r[:3] for r in rows] == [("researcher", SESSION, None)] * 2, rows
    # Who killed, as an approval's `by` says who answered (L5).
    assert rows[0][3] == f"kill switch ({console_by()})", rows
    assert rows[1][3].startswith(f"kill switch ({console_by()}): SIGKILLed container(s) aaaa"), rows


def test_the_cli_kills_only_that_agents_session(
    shared_session: tuple[RunningProxy, str, str],
    llm_upstream: Upstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = shared_session[0]
    killed: list[str] = []
    with fake_engine(tmp_path / "d.sock", BOXES, killed) as host:
        monkeypatch.setenv("DOCKER_HOST", host)

        def kill() -> None:
            args = ["kill", "--config", str(proxy.config.path), "--agent", "researcher", "--session", SESSION]
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
            assert f"revoked 1 key(s) of session {SESSION} of agent researcher" in result.stdout

        rows = check_only_researcher_killed(shared_session, llm_upstream, kill, killed)
    assert [r[:3] for r in rows] == [("researcher", SESSION, None)] * 2, rows


def test_revoke_keys_names_agent_and_session_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RevokeKeys("x", "2026-11-22T00:00:00.000Z", agent="a", key_id="k")
    with pytest.raises(ValueError, match="exactly one"):
        RevokeKeys("x", "2026-11-22T00:00:00.000Z")
    op = RevokeKeys("x", "2026-11-22T00:00:00.000Z", agent="a", session="s")
    assert op.where() == (("agent", "a"), ("session", "s"))
    # What the running proxy's revocation follower matches a cached key (or a sandbox) with.
    both = Revocation(1, "t", "a", "s", None, "x")
    assert both.covers("a", "s", "k") and not both.covers("b", "s", "k") and not both.covers("a", "t", "k")
    session = Revocation(2, "t", None, "s", None, "x")
    assert session.covers("a", "s") and session.covers("b", "s") and not session.covers("a", "t")
    key = Revocation(3, "t", None, None, "k", "x")
    assert (
        key.covers("a", "s", "k")
        and not key.covers("a", "s", "j")
        and not Revocation(4, "t", None, None, None, None).covers("a", "s")
    )


def test_kill_containers_of_an_agents_session_leave_the_others_and_name_the_unlabelled(tmp_path: Path) -> None:
    killed: list[str] = []
    with fake_engine(tmp_path / "d.sock", BOXES, killed) as host:
        done = kill_containers(agent="researcher", session=SESSION, host=host)
    assert done.killed == [f"aaaa ({'a' * 12})"] and killed == ["aaaa" * 16]
    assert done.selector == f"egress-guard.agent=researcher,egress-guard.session={SESSION}"
    bare = [box("dddd", "researcher", None), box("bbbb", "writer", SESSION)]
    killed.clear()
    with fake_engine(tmp_path / "d2.sock", bare, killed) as host:
        done = kill_containers(agent="researcher", session=SESSION, host=host)
    assert killed == [] and done.unlabelled == [f"dddd ({'d' * 12})"]


def test_the_kill_switch_kills_only_that_agents_sandboxes_of_the_session() -> None:
    """`run --isolate` sandboxes follow the same revocation: agent and session together kill
    that agent's sandbox of the session, not the other agent's of the same session name."""
    sandboxes = Sandboxes.__new__(Sandboxes)  # the registry alone: no TUN, no control server
    opened = "2026-11-22T00:00:00.000Z"
    boxes = [Sandbox("a", 1, "researcher", SESSION, opened), Sandbox("b", 2, "writer", SESSION, opened)]
    boxes.append(Sandbox("c", 3, "researcher", "other", opened))
    sandboxes.by_tun = {sb.tun: sb for sb in boxes}
    killed: list[str] = []

    def kill(sb: Sandbox, reason: str) -> None:  # what Sandboxes.kill marks, without the SIGKILL
        sb.killed = True
        killed.append(sb.id)

    sandboxes.kill = kill  # type: ignore[method-assign]
    sandboxes.kill_matching("researcher", SESSION, "2026-11-22T00:00:01.000Z", "kill switch")
    assert killed == ["a"]
    sandboxes.kill_matching(None, SESSION, "2026-11-22T00:00:01.000Z", "kill switch")
    assert killed == ["a", "b"]
