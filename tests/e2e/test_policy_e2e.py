"""Policy end to end (#12): the real SDKs and curl through the real proxy, answered from the
real command line. Escalations held and approved, denied or timed out; `--scope session`;
`unknown_hosts: escalate`; observe mode and `policy suggest`; a runaway agent frozen; and
`egress-guard check` agreeing with the proxy on every row of a rules table."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from support.clients import curl
from support.proxy import RunningProxy
from support.upstream import Upstream
from test_credentials import http_client, mint, openai_client

GPT4O_NEEDS_A_HUMAN = {
    "name": "gpt-4o",
    "hosts": ["api.openai.com"],
    "match": "model == 'gpt-4o'",
    "action": "escalate",
    "reason": "gpt-4o needs a human",
}


def cli(proxy: RunningProxy, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real command line, in its own process (as an operator runs it)."""
    out = subprocess.run(
        [sys.executable, "-m", "egress_guard", *args, "--config", str(proxy.config.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"egress-guard {' '.join(args)} exited {out.returncode}: {out.stderr}")
    return out


def pending(proxy: RunningProxy, n: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
    """The pending approvals, waiting (bounded) until there are `n`."""
    deadline = time.monotonic() + timeout
    while True:
        found = json.loads(cli(proxy, "pending", "--format", "json").stdout)
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def answer(proxy: RunningProxy, verb: str, *args: str) -> threading.Thread:
    """In the background: wait for one pending approval, then `egress-guard VERB ID ARGS`."""
    done: dict[str, Any] = {}

    def run() -> None:
        found = pending(proxy)
        assert found, "no pending approval appeared"
        done["id"] = found[0]["id"]
        done["out"] = cli(proxy, verb, found[0]["id"], *args)

    thread = threading.Thread(target=run, daemon=True)
    thread.done = done  # type: ignore[attr-defined]
    thread.start()
    return thread


def ask(proxy: RunningProxy, port: int, model: str = "gpt-4o", key: str | None = None) -> str:
    client = openai_client(proxy, port, key or mint(proxy).env["OPENAI_API_KEY"])
    reply = client.chat.completions.create(model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    return reply.choices[0].message.content or ""


@pytest.fixture
def escalating(make_proxy, cred_config: dict, real_env) -> RunningProxy:
    cred_config["rules"] = [GPT4O_NEEDS_A_HUMAN]
    cred_config["escalation"] = {"timeout": "20s"}
    return make_proxy(**cred_config)


def test_an_escalated_request_approved_from_the_cli_completes(escalating: RunningProxy, llm_upstream: Upstream) -> None:
    approver = answer(escalating, "approve", "--note", "one look")
    assert ask(escalating, llm_upstream.port) == "pong"  # the SDK waited, then got the answer
    approver.join(30)
    assert len(llm_upstream.state.requests) == 1
    rows = escalating.rows(expect=3)
    req = next(r for r in rows if r["kind"] == "request")
    assert req["decision"] == "allow" and req["rule"] == "rule:gpt-4o" and "approved by" in req["reason"]
    event = next(r for r in rows if r["kind"] == "event")
    assert event["method"] == "approve" and "one look" in event["reason"] and "once" in event["reason"]
    # an approval once is for that request only: the next one asks again
    assert pending(escalating, timeout=0.1) == []


def test_a_denied_request_gets_the_reason(escalating: RunningProxy, llm_upstream: Upstream) -> None:
    denier = answer(escalating, "deny", "--note", "not today")
    with pytest.raises(openai.PermissionDeniedError) as info:
        ask(escalating, llm_upstream.port)
    denier.join(30)
    assert "denied" in str(info.value) and "not today" in str(info.value)
    assert llm_upstream.state.requests == []
    req = next(r for r in escalating.rows(expect=3) if r["kind"] == "request")
    assert req["decision"] == "deny" and "not today" in req["reason"]


def test_an_unanswered_escalation_times_out_with_a_reason(
    make_proxy, cred_config: dict, real_env, llm_upstream: Upstream
) -> None:
    cred_config["rules"] = [GPT4O_NEEDS_A_HUMAN]
    cred_config["escalation"] = {"timeout": "1s"}
    proxy = make_proxy(**cred_config)
    with pytest.raises(openai.PermissionDeniedError, match="timed out"):
        ask(proxy, llm_upstream.port)
    assert llm_upstream.state.requests == []
    history = json.loads(cli(proxy, "pending", "--history", "--format", "json").stdout)["approvals"]
    assert [h["status"] for h in history] == ["expired"]


def test_scope_session_lets_the_next_request_through_without_asking(
    escalating: RunningProxy, llm_upstream: Upstream
) -> None:
    key = mint(escalating, session="s1").env["OPENAI_API_KEY"]
    approver = answer(escalating, "approve", "--scope", "session")
    assert ask(escalating, llm_upstream.port, key=key) == "pong"
    approver.join(30)
    assert ask(escalating, llm_upstream.port, key=key) == "pong"  # no approval asked
    assert len(llm_upstream.state.requests) == 2
    history = json.loads(cli(escalating, "pending", "--history", "--format", "json").stdout)
    assert [h["status"] for h in history["approvals"]] == ["approved"]
    assert [(g["rule"], g["agent"], g["session"]) for g in history["grants"]] == [("rule:gpt-4o", "researcher", "s1")]
    # another session of the same agent still asks
    other = mint(escalating, session="s2").env["OPENAI_API_KEY"]
    denier = answer(escalating, "deny")
    with pytest.raises(openai.PermissionDeniedError):
        ask(escalating, llm_upstream.port, key=other)
    denier.join(30)


def test_an_approval_never_lifts_a_deny_rule(make_proxy, cred_config: dict, real_env, llm_upstream: Upstream) -> None:
    cred_config["rules"] = [
        GPT4O_NEEDS_A_HUMAN,
        {"hosts": ["api.openai.com"], "match": "stream", "action": "deny", "reason": "no streams"},
    ]
    proxy = make_proxy(**cred_config)
    key = mint(proxy, session="s1").env["OPENAI_API_KEY"]
    approver = answer(proxy, "approve", "--scope", "always")
    assert ask(proxy, llm_upstream.port, key=key) == "pong"
    approver.join(30)
    client = openai_client(proxy, llm_upstream.port, key)
    with pytest.raises(openai.PermissionDeniedError, match="no streams"):
        list(client.chat.completions.create(model="gpt-4o", max_tokens=5, stream=True, messages=[]))


def test_unknown_hosts_escalate_and_an_approval_lets_the_agent_reach_it_once(make_proxy, upstream: Upstream) -> None:
    proxy = make_proxy(unknown_hosts="escalate", escalation={"timeout": "20s"})
    approver = answer(proxy, "approve")
    status, _, body = curl(proxy, f"https://other.test.local:{upstream.port}/v1/new")
    approver.join(30)
    assert status == 200, body
    assert approver.done["out"].returncode == 0  # type: ignore[attr-defined]
    row = next(r for r in proxy.rows(expect=3) if r["kind"] == "request")
    assert row["decision"] == "allow" and row["rule"] == "unknown_hosts"
    # once: the next request asks again (and, unanswered here, is denied)
    denier = answer(proxy, "deny", "--note", "enough")
    status, _, body = curl(proxy, f"https://other.test.local:{upstream.port}/v1/new")
    denier.join(30)
    assert status == 403 and "enough" in body


def test_observe_mode_records_would_deny_and_suggest_reproduces_an_allowlist(
    make_proxy, upstream: Upstream, tmp_path: Path
) -> None:
    proxy = make_proxy(allow=[], mode="observe")
    seen = ["/simple/requests/", "/simple/httpx/", "/packages/a.whl"]
    for path in seen:
        assert curl(proxy, f"https://api.test.local:{upstream.port}{path}")[0] == 200
    rows = [r for r in proxy.rows(expect=6) if r["kind"] == "request"]
    assert [r["decision"] for r in rows] == ["would-deny"] * 3
    out = tmp_path / "suggested.yaml"
    cli(proxy, "policy", "suggest", "--since", "1h", "--out", str(out))
    suggested = yaml.safe_load(out.read_text())
    proxy.stop()
    enforcing = make_proxy(allow=suggested)
    for path in seen:
        assert curl(enforcing, f"https://api.test.local:{upstream.port}{path}")[0] == 200
    assert curl(enforcing, f"https://other.test.local:{upstream.port}/simple/x/")[0] == 403


# --- `check` agrees with the proxy ------------------------------------------------------------

TABLE_RULES = [
    {"name": "no-admin", "match": "path.startsWith('/admin')", "action": "deny", "reason": "no admin"},
    {"name": "big-body", "match": "body_size > 100", "action": "escalate", "reason": "big body"},
    {
        "name": "other-get",
        "hosts": ["other.test.local"],
        "match": "method == 'GET' && !('debug' in query)",
        "action": "allow",
        "reason": "reads",
    },
    {"name": "delete", "hosts": ["api.test.local"], "match": "method == 'DELETE'", "action": "escalate"},
]
TABLE = [  # method, host, path, body, expected verdict
    ("GET", "api.test.local", "/v1/x", None, "allow"),  # the allowlist
    ("GET", "api.test.local", "/admin/x", None, "deny"),  # deny beats the allowlist's allow
    ("POST", "api.test.local", "/v1/x", "x" * 200, "escalate"),
    ("POST", "api.test.local", "/admin", "x" * 200, "deny"),  # deny beats escalate
    ("GET", "other.test.local", "/v1/x", None, "allow"),  # a CEL allow rule
    ("GET", "other.test.local", "/v1/x?debug=1", None, "deny"),  # no rule allows it
    ("POST", "other.test.local", "/v1/x", None, "deny"),
    ("DELETE", "api.test.local", "/v1/x", None, "escalate"),
    ("DELETE", "other.test.local", "/v1/x", None, "deny"),  # the escalate rule is scoped to api.test.local
]


def test_check_agrees_with_the_proxy_on_every_row_of_the_rules_table(make_proxy, upstream: Upstream) -> None:
    proxy = make_proxy(rules=TABLE_RULES, escalation={"timeout": "1s"})
    with http_client(proxy) as client:
        for method, host, path, body, expected in TABLE:
            url = f"https://{host}:{upstream.port}{path}"
            args = ["check", method, url, "--format", "json"] + (["--json", json.dumps(body)] if body else [])
            said = json.loads(cli(proxy, *args, check=False).stdout)
            r = client.request(method, url, content=json.dumps(body).encode() if body else None)
            did = "allow" if r.status_code == 200 else "escalate" if "timed out" in r.text else "deny"
            assert (said["decision"], did) == (expected, expected), (method, url, said, r.status_code, r.text)


# --- a runaway agent is frozen ----------------------------------------------------------------


def test_a_runaway_agent_is_frozen_with_a_row_that_shows_baseline_and_trigger(
    make_proxy, cred_config: dict, real_env, llm_upstream: Upstream
) -> None:
    cred_config["freeze"] = {
        "window": "1s",
        "warmup": 3,
        "requests_rate": "4x",
        "min_requests": 6,
        "action": "deny",
    }
    proxy = make_proxy(**cred_config)
    key = mint(proxy, session="run-1").env["OPENAI_API_KEY"]
    client = openai_client(proxy, llm_upstream.port, key)
    for _ in range(4):  # a steady baseline: one request a window
        client.models.list()
        time.sleep(1.0)
    with pytest.raises(openai.PermissionDeniedError, match="frozen"):
        for _ in range(200):  # a runaway loop
            client.models.list()
    events = [r for r in proxy.rows(expect=10) if r["kind"] == "event" and r["method"] == "freeze"]
    assert len(events) == 1 and "baseline" in events[0]["reason"], events
    assert events[0]["agent"] == "researcher" and events[0]["session"] == "run-1"


# --- the verdict table's rows (tests/policy) through the proxy ------------------------------


def request_rows(proxy: RunningProxy, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    """The request rows (not connect rows), oldest first, waiting until there are `n`."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in proxy.rows() if r["kind"] == "request"]
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def _port_in(url: str, port: int) -> str:
    scheme, rest = url.split("://", 1)
    authority, _, target = rest.partition("/")
    return f"{scheme}://{authority}:{port}/{target}"


def test_check_agrees_with_the_proxy_on_every_row_of_the_verdict_table(make_proxy, upstream: Upstream) -> None:
    """tests/policy's table (BASE + RULES, and `check`'s ROWS) through the real proxy: the
    verdict and rule `check` gives are those of the row the proxy writes. An escalation times
    out here (1 s), so the proxy's answer to it is a refusal whose reason says so."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "policy"))
    from test_check_cli import ROWS
    from test_rules import BASE, RULES

    config = yaml.safe_load(BASE + RULES)
    for rule in config["allow"]:
        rule["ports"] = [upstream.port]
    hosts = {"api.openai.com", "api.github.com", "pypi.org", "mcp.example.com", "new.example.org", "div.example.com"}
    proxy = make_proxy(
        allow=config["allow"],
        rules=config["rules"],
        agents=config["agents"],
        escalation={"timeout": "1s"},
        network={"hosts": {h: ["127.0.0.1"] for h in hosts}},
    )
    checked = requests = 0
    with http_client(proxy) as client:
        for args, _status, decision, rule in ROWS:
            if "--agent" in args:
                continue  # an agent is named by its key on a service's host: the next test
            method, url = args[0], _port_in(args[1], upstream.port)
            body = args[args.index("--json") + 1] if "--json" in args else None
            said = json.loads(
                cli(
                    proxy, "check", method, url, *(["--json", body] if body else []), "--format", "json", check=False
                ).stdout
            )
            try:
                r = client.request(
                    method, url, content=body.encode() if body else None, headers={"content-type": "application/json"}
                )
            except httpx.ProxyError:  # refused at CONNECT: no rule names the host
                host = url.split("/")[2].split(":")[0]
                deadline = time.monotonic() + 10
                while not (refused := [x for x in proxy.rows() if x["kind"] == "connect" and x["host"] == host]):
                    assert time.monotonic() < deadline, f"no CONNECT row for {host}"
                    time.sleep(0.05)
                row = refused[-1]
            else:
                requests += 1
                row = request_rows(proxy, requests)[-1]
                assert (r.status_code == 200) == (row["decision"] == "allow"), (r.status_code, row)
            did = "escalate" if "timed out" in (row["reason"] or "") else row["decision"]
            assert (said["decision"], said["rule"]) == (decision, rule), (args, said)
            assert (did, row["rule"]) == (decision, rule), (args, r.status_code, row)
            checked += 1
    assert checked == len(ROWS) - 1


def test_check_agrees_with_the_proxy_on_a_rule_about_the_agent(
    make_proxy, cred_config: dict, real_env, llm_upstream: Upstream
) -> None:
    """The agent a rule names is the one the proxy identified by its key (the table's
    `--agent` row): the same request escalates for one agent and goes through for another."""
    cred_config["rules"] = [
        {"name": "writer-asks", "match": "agent == 'writer' && method != 'GET'", "action": "escalate"}
    ]
    cred_config["agents"]["writer"]["services"] = ["anthropic", "openai"]
    cred_config["escalation"] = {"timeout": "1s"}
    proxy = make_proxy(**cred_config)
    url = f"https://api.openai.com:{llm_upstream.port}/v1/chat/completions"
    body = '{"model": "gpt-4o-mini", "max_tokens": 5, "messages": []}'
    for agent, expected in (("researcher", "allow"), ("writer", "escalate")):
        out = cli(proxy, "check", "--agent", agent, "POST", url, "--json", body, "--format", "json", check=False)
        said = json.loads(out.stdout)
        key = mint(proxy, agent=agent).env["OPENAI_API_KEY"]
        with http_client(proxy) as client:
            r = client.post(url, content=body, headers={"authorization": f"Bearer {key}"})
        did = "escalate" if "timed out" in r.text else "allow" if r.status_code == 200 else "deny"
        assert (said["decision"], did) == (expected, expected), (agent, said, r.status_code, r.text)


def test_a_size_rule_holds_for_a_chunked_upload_and_a_path_rule_for_an_encoded_path(
    make_proxy, upstream: Upstream, tmp_path: Path
) -> None:
    """A body sent chunked has no size at its headers (and a big one streams upstream as it
    arrives): a rule on body_size refuses it rather than judge it 0. A path an upstream would
    read as /admin is refused by a rule on /admin, however it is spelled."""
    proxy = make_proxy(
        rules=[
            {"name": "no-uploads", "match": "body_size > 1000", "action": "deny", "reason": "too big"},
            {"name": "no-admin", "match": "path.startsWith('/admin')", "action": "deny", "reason": "no admin"},
        ]
    )
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 50_000)
    url = f"https://api.test.local:{upstream.port}/upload"
    status, _, body = curl(proxy, url, "--data-binary", f"@{blob}")
    assert status == 403 and "too big" in body
    try:
        status = curl(proxy, url, "--data-binary", f"@{blob}", "-H", "Transfer-Encoding: chunked")[0]
    except AssertionError as exc:  # curl: the HTTP/2 stream or the connection was cut
        assert "(18)" in str(exc) or "(56)" in str(exc) or "(92)" in str(exc), exc
        status = 0
    assert status == 0  # a size not known: the body is not read; the connection is cut, the row says why
    deadline = time.monotonic() + 10
    while not any("not known" in (r["reason"] or "") for r in proxy.rows()):
        assert time.monotonic() < deadline, proxy.rows()
        time.sleep(0.05)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (2 << 20))  # over 1 MiB: streamed, judged at its headers by its Content-Length
    assert curl(proxy, url, "--data-binary", f"@{big}")[0] == 403
    assert curl(proxy, url, "--data-binary", "small")[0] == 200
    for path in ("/admin/x", "/%61dmin/x", "/repos/%2e%2e/admin/secrets", "//admin"):
        status, _, body = curl(proxy, f"https://api.test.local:{upstream.port}{path}", "--path-as-is")
        assert status == 403, (path, body)
    assert [r["path"] for r in upstream.state.requests] == ["/upload"]
