"""`egress-guard audit browse`: Datasette over the audit DB of a real proxy run, read-only, the
canned queries giving the CLI's answers; only the sign-in link's holder sees anything; clear
errors for a PostgreSQL store and for Datasette missing."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from support.proxy import RunningProxy, write_config
from support.upstream import Upstream

from egress_guard import keys
from egress_guard.cli import main


def http_client(proxy: RunningProxy) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=20)


def openai_client(proxy: RunningProxy, port: int, agent: str = "researcher") -> openai.OpenAI:
    key = keys.mint(proxy.config, agent).env["OPENAI_API_KEY"]
    return openai.OpenAI(
        api_key=key, base_url=f"https://api.openai.com:{port}/v1", max_retries=0, http_client=http_client(proxy)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browse:
    """`egress-guard audit browse` in its own process, signed in (the link it printed)."""

    def __init__(self, proxy: RunningProxy) -> None:
        self.port = free_port()
        config = str(proxy.config.path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "egress_guard", "audit", "browse", "--config", config, "--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # Datasette prints the sign-in link first
        found = re.search(r"http://127\.0\.0\.1:\d+/-/auth-token\?token=\w+", line)
        assert found, f"no sign-in link: {line!r} {self.proc.stderr.read() if self.proc.poll() is not None else ''}"
        self.base = f"http://127.0.0.1:{self.port}"
        self.db = f"{self.base}/{proxy.config.audit_path.stem}"
        self.anonymous = httpx.Client(trust_env=False, timeout=10)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.anonymous.get(self.base)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "audit browse did not start"
                time.sleep(0.1)
        self.client = httpx.Client(trust_env=False, timeout=10)
        self.signed_in = self.client.get(found.group(0))
        assert self.signed_in.status_code == 302 and "ds_actor" in self.client.cookies

    def query(self, name: str, **params: str) -> list[dict[str, Any]]:
        reply = self.client.get(f"{self.db}/{name}.json", params={"_shape": "array", **params})
        assert reply.status_code == 200, reply.text
        rows: list[dict[str, Any]] = reply.json()
        return rows

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.client.close()
        self.anonymous.close()


@pytest.fixture
def escalating(make_proxy, cred_config: dict, real_env) -> RunningProxy:
    cred_config["rules"] = [
        {
            "name": "gpt-4o",
            "hosts": ["api.openai.com"],
            "match": "model == 'gpt-4o'",
            "action": "escalate",
            "reason": "gpt-4o needs a human",
        }
    ]
    cred_config["escalation"] = {"timeout": "1s"}
    return make_proxy(**cred_config)


@pytest.fixture
def browse(escalating: RunningProxy, llm_upstream: Upstream) -> Iterator[Browse]:
    """A real run first: priced calls of two agents, a refused host, an escalation that expired."""
    researcher = openai_client(escalating, llm_upstream.port)
    for n in (3, 5):
        researcher.chat.completions.create(
            model="gpt-4o-mini", max_tokens=n, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.PermissionDeniedError, match="timed out"):
        researcher.chat.completions.create(model="gpt-4o", max_tokens=1, messages=[])
    with pytest.raises(httpx.ProxyError):
        http_client(escalating).get("https://other.test.local/")
    escalating.rows(expect=5)
    server = Browse(escalating)
    yield server
    server.close()


def test_canned_queries_give_the_clis_answers(browse: Browse, escalating: RunningProxy) -> None:
    spent = json.loads(
        CliRunner().invoke(main, ["audit", "spend", "--config", str(escalating.config.path), "--format", "json"]).output
    )
    by_day = browse.query("spend_by_agent_and_day")
    assert [(r["agent"], Decimal(r["usd"]), r["requests"]) for r in by_day] == [
        (s["agent"], Decimal(s["cost_usd"]), s["requests"]) for s in spent
    ]
    assert Decimal(by_day[0]["usd"]) > 0
    assert {r["host"]: r["denials"] for r in browse.query("denials_by_host")}["other.test.local"] == 1
    (expired,) = browse.query("escalations", status="expired")
    assert (expired["agent"], expired["rule"], expired["host"]) == ("researcher", "rule:gpt-4o", "api.openai.com")
    assert browse.query("escalations", status="pending") == []
    last = browse.query("agent_last_decisions", agent="researcher")
    assert last[0]["id"] > last[-1]["id"] and {r["decision"] for r in last} >= {"allow", "deny"}
    assert all(r["hash"] for r in browse.query("chain_head"))


def test_it_reads_a_running_proxys_newest_rows(
    browse: Browse, escalating: RunningProxy, llm_upstream: Upstream
) -> None:
    before = browse.query("agent_last_decisions", agent="researcher")
    openai_client(escalating, llm_upstream.port).chat.completions.create(model="gpt-4o-mini", messages=[])
    deadline = time.monotonic() + 5
    while len(after := browse.query("agent_last_decisions", agent="researcher")) == len(before):
        assert time.monotonic() < deadline, "the new row never showed (a WAL read as --immutable?)"
        time.sleep(0.2)
    assert after[0]["id"] > before[0]["id"] and after[0]["model"] == "gpt-4o-mini"


def test_only_the_sign_in_links_holder_sees_anything_and_nothing_writes(browse: Browse) -> None:
    for path in ("/", "/-/metadata.json", browse.db.removeprefix(browse.base) + "/audit.json"):
        assert browse.anonymous.get(browse.base + path).status_code == 403, path
    reply = browse.client.get(f"{browse.db}.json", params={"sql": "DELETE FROM audit"})
    assert reply.status_code == 400 and reply.json()["ok"] is False
    reply = browse.client.get(
        f"{browse.db}.json",
        params={"sql": "SELECT decimal_sum(x) AS s FROM (SELECT '0.1' AS x UNION ALL SELECT '0.2')", "_shape": "array"},
    )
    assert reply.json() == [{"s": "0.3"}]  # exact, where SUM() says 0.30000000000000004


def test_the_sign_in_cookie_is_http_only_and_same_site_strict(browse: Browse) -> None:
    """Browsers do not separate cookies by port: a page on any 127.0.0.1 port could read a
    plain ds_actor with document.cookie (security review). Every cookie set is HttpOnly and
    SameSite=Strict, the sign-in's and the CSRF token's alike."""
    set_cookies = browse.signed_in.headers.get_list("set-cookie")
    page = browse.client.get(f"{browse.db}", params={"sql": "SELECT 1"})
    set_cookies += page.headers.get_list("set-cookie")
    assert any(c.startswith("ds_actor=") for c in set_cookies), set_cookies
    for cookie in set_cookies:
        attributes = [a.strip().lower() for a in cookie.split(";")[1:]]
        assert "httponly" in attributes and "samesite=strict" in attributes, cookie
        assert [a for a in attributes if a.startswith("samesite")] == ["samesite=strict"], cookie
    assert browse.client.get(f"{browse.db}/audit.json").status_code == 200  # still signed in


def test_a_postgresql_store_is_pointed_at_psql(tmp_path) -> None:
    config = write_config(tmp_path, {"store": {"url": "postgresql://eg@127.0.0.1:1/egress_guard", "replica": "r1"}})
    result = CliRunner().invoke(main, ["audit", "browse", "--config", str(config.path)])
    assert result.exit_code == 1
    assert "PostgreSQL" in result.output and "psql" in result.output and "eg@127.0.0.1" not in result.output


def test_datasette_missing_names_the_extra(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, {})
    monkeypatch.setitem(sys.modules, "datasette.cli", None)  # what an install without the extra sees
    result = CliRunner().invoke(main, ["audit", "browse", "--config", str(config.path)])
    assert result.exit_code == 1 and "pip install 'egress-guard[browse]'" in result.output


def test_help_has_an_example() -> None:
    result = CliRunner().invoke(main, ["audit", "browse", "--help"])
    assert result.exit_code == 0 and re.search(r"Example:\n +egress-guard audit browse --port", result.output)
    said = " ".join(result.output.split())
    assert "to every port on 127.0.0.1" in said and "stop audit browse (Ctrl-C) when done" in said
