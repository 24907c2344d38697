"""Credential swap end to end: the real openai and anthropic SDKs, holding only fake keys,
talk through the real proxy to a local API that accepts only the real keys."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time

import anthropic
import httpx
import openai
import pytest
from click.testing import CliRunner
from support.llm.common import REAL
from support.proxy import RunningProxy
from support.upstream import Upstream

from egress_guard import keys
from egress_guard.cli import main


def http_client(proxy: RunningProxy, **kw) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=20, **kw)


def openai_client(proxy: RunningProxy, port: int, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=key, base_url=f"https://api.openai.com:{port}/v1", max_retries=0, http_client=http_client(proxy)
    )


def anthropic_client(proxy: RunningProxy, port: int, key: str) -> anthropic.Anthropic:
    import httpx2  # this anthropic SDK is built on httpx2

    client = httpx2.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=20)
    return anthropic.Anthropic(
        api_key=key, base_url=f"https://api.anthropic.com:{port}", max_retries=0, http_client=client
    )


def mint(proxy: RunningProxy, agent: str = "researcher", **kw) -> keys.Minted:
    return keys.mint(proxy.config, agent, **kw)


def assert_no_real_secret(proxy: RunningProxy, *texts: str) -> None:
    """No real key in the audit DB (every byte of the file), nor in any text given."""
    blob = proxy.config.audit_path.read_bytes()
    wal = proxy.config.audit_path.with_name(proxy.config.audit_path.name + "-wal")
    if wal.exists():
        blob += wal.read_bytes()
    for secret in REAL.values():
        for form in (secret.encode(), base64.b64encode(secret.encode())):
            assert form not in blob
            for text in texts:
                assert form.decode() not in text


def test_openai_sdk_sync_and_streaming(cred_proxy: RunningProxy, llm_upstream: Upstream, caplog) -> None:
    minted = mint(cred_proxy)
    fake = minted.env["OPENAI_API_KEY"]
    assert fake.startswith("sk-proj-") and len(fake) == len("sk-proj-") + 156 and fake != REAL["openai"]
    client = openai_client(cred_proxy, llm_upstream.port, fake)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}])
    assert reply.choices[0].message.content == "pong"
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "pong"
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini"]
    seen = llm_upstream.state.requests
    assert all(r["headers"]["authorization"] == f"Bearer {REAL['openai']}" for r in seen)
    rows = [r for r in cred_proxy.rows(expect=6) if r["kind"] == "request"]
    assert {(r["agent"], r["session"], r["service"], r["credential"]) for r in rows} == {
        ("researcher", minted.record.session, "openai", "swapped")
    }
    assert_no_real_secret(cred_proxy, caplog.text)


def test_anthropic_sdk_sync_and_streaming(cred_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    fake = mint(cred_proxy, services=["anthropic"]).env["ANTHROPIC_API_KEY"]
    assert fake.startswith("sk-ant-api03-") and fake.endswith("AA")
    client = anthropic_client(cred_proxy, llm_upstream.port, fake)
    msg = client.messages.create(
        model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "ping"}]
    )
    assert msg.content[0].text == "pong"
    with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "ping"}]
    ) as stream:
        assert "".join(stream.text_stream) == "pong"
    for r in llm_upstream.state.requests:  # swapped in whichever header the SDK used
        assert REAL["anthropic"] in (r["headers"].get("x-api-key"), r["headers"].get("authorization", "")[7:])


def test_gemini_header_and_query_key_and_github_token_scheme(cred_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    env = mint(cred_proxy).env
    gemini, gh = env["GEMINI_API_KEY"], env["GH_TOKEN"]
    url = (
        f"https://generativelanguage.googleapis.com:{llm_upstream.port}/v1beta/models/gemini-2.5-flash:generateContent"
    )
    with http_client(cred_proxy) as client:
        assert client.post(url, headers={"x-goog-api-key": gemini}, json={}).status_code == 200
        assert client.post(url, params={"key": gemini, "alt": "json"}, json={}).status_code == 200
        r = client.get(f"https://api.github.com:{llm_upstream.port}/user", headers={"Authorization": f"token {gh}"})
        assert r.status_code == 200 and r.json()["login"] == "octocat"
    gemini_seen = [r for r in llm_upstream.state.requests if r["path"].startswith("/v1beta")]
    assert gemini_seen[0]["headers"]["x-goog-api-key"] == REAL["google-gemini"]
    assert gemini_seen[1]["query"] == f"key={REAL['google-gemini']}&alt=json"
    assert llm_upstream.state.requests[-1]["headers"]["authorization"] == f"token {REAL['github']}"


def test_a_real_key_swapped_into_the_query_never_reaches_the_audit_log(
    make_proxy, cred_config: dict, real_env, llm_upstream: Upstream
) -> None:
    # audit.query_strings: true records ?query; Gemini's key travels in ?key=. The rows and the
    # metered call's intent record the path as the agent sent it, never the path with the real
    # key egress-guard swapped in, and with the key parameter's value redacted (the agent's
    # fake key is a credential too: security review L6).
    cred_config["audit"] = {"query_strings": True}
    cred_config["agents"]["researcher"]["limits"] = {"budget_usd": {"day": 10}}  # metered: an intent too
    proxy = make_proxy(**cred_config)
    gemini = mint(proxy).env["GEMINI_API_KEY"]
    url = (
        f"https://generativelanguage.googleapis.com:{llm_upstream.port}/v1beta/models/gemini-2.5-flash:generateContent"
    )
    with http_client(proxy) as client:
        assert client.post(url, params={"key": gemini, "alt": "json"}, json={}).status_code == 200
    assert llm_upstream.state.requests[-1]["query"] == f"key={REAL['google-gemini']}&alt=json"  # swapped upstream
    row = next(r for r in proxy.rows(expect=2) if r["kind"] == "request")
    assert row["path"].endswith("?key=<redacted>&alt=json") and row["cost_usd"], row
    with http_client(proxy) as client:  # a real key the agent should not hold: refused, and not recorded
        refused = client.post(url, params={"alt": "json", "key": REAL["google-gemini"]}, json={})
    assert refused.status_code == 401, refused.text
    row = next(r for r in reversed(proxy.rows(expect=3)) if r["kind"] == "request")
    assert row["path"].endswith("?alt=json&key=<redacted>") and row["credential"] == "denied-foreign-key", row
    assert_no_real_secret(proxy)
    blob = b"".join(p.read_bytes() for p in proxy.config.audit_path.parent.glob(proxy.config.audit_path.name + "*"))
    assert gemini.encode() not in blob, "the agent's fake key is in the audit DB"


@pytest.mark.parametrize(
    ("make_key", "credential", "message"),
    [
        (lambda env: None, "denied-missing", "no openai credential"),
        (lambda env: REAL["openai"], "denied-foreign-key", "not an egress-guard key"),
        (lambda env: "sk-proj-" + "A" * 156, "denied-forged", "forged or altered"),
        (
            lambda env: env["OPENAI_API_KEY"][:-1] + ("B" if env["OPENAI_API_KEY"][-1] != "B" else "C"),
            "denied-forged",
            "forged or altered",
        ),
        (lambda env: env["ANTHROPIC_API_KEY"], "denied-wrong-service", "is for anthropic, not openai"),
    ],
)
def test_refused_credentials_never_reach_upstream(
    cred_proxy: RunningProxy, llm_upstream: Upstream, make_key, credential: str, message: str
) -> None:
    key = make_key(mint(cred_proxy).env)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with http_client(cred_proxy) as client:
        r = client.post(f"https://api.openai.com:{llm_upstream.port}/v1/chat/completions", headers=headers, json={})
    assert r.status_code == 401
    error = r.json()["error"]  # OpenAI's own error shape
    assert error["code"] == "invalid_api_key" and message in error["message"] and "egress-guard" in error["message"]
    assert llm_upstream.state.requests == []
    row = cred_proxy.row_for(r.headers["x-egress-guard-request-id"])
    assert (row["decision"], row["credential"], row["service"], row["status"]) == ("deny", credential, "openai", 401)
    if credential in ("denied-foreign-key", "denied-forged", "denied-wrong-service"):
        assert "flagged" in row["reason"]
    assert_no_real_secret(cred_proxy, r.text)


def test_sdk_shows_egress_guards_reason(cred_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    client = anthropic_client(cred_proxy, llm_upstream.port, "sk-ant-api03-" + "x" * 93 + "AA")
    with pytest.raises(anthropic.AuthenticationError) as info:
        client.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert "egress-guard: forged or altered egress-guard key for anthropic" in str(info.value)
    client2 = openai_client(cred_proxy, llm_upstream.port, REAL["openai"])
    with pytest.raises(openai.AuthenticationError) as info2:
        client2.models.list()
    assert "egress-guard" in str(info2.value) and "not an egress-guard key" in str(info2.value)


def test_expired_and_revoked_keys(cred_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    short = mint(cred_proxy, ttl="1s").env["OPENAI_API_KEY"]
    client = openai_client(cred_proxy, llm_upstream.port, short)
    assert client.models.list().data  # fine while fresh
    time.sleep(2.1)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        client.models.list()
    minted = mint(cred_proxy)
    client = openai_client(cred_proxy, llm_upstream.port, minted.env["OPENAI_API_KEY"])
    assert client.models.list().data
    result = CliRunner().invoke(main, ["keys", "revoke", "--config", str(cred_proxy.config.path), minted.record.key_id])
    assert result.exit_code == 0 and f"revoked {minted.record.key_id}" in result.output
    time.sleep(0.6)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        client.models.list()
    listed = CliRunner().invoke(
        main, ["keys", "list", "--config", str(cred_proxy.config.path), "--all", "--format", "json"]
    )
    statuses = {row["key_id"]: row["status"] for row in json.loads(listed.output)}
    assert statuses[minted.record.key_id] == "revoked"
    assert "sk-proj-" not in listed.output  # never the keys themselves


@pytest.mark.parametrize("where", ["header", "query", "json body", "basic auth"])
def test_fake_key_sent_to_an_unbound_host_is_refused_and_flagged(
    cred_proxy: RunningProxy, upstream: Upstream, where: str
) -> None:
    fake = mint(cred_proxy).env["OPENAI_API_KEY"]
    url = f"https://api.test.local:{upstream.port}/json"
    with http_client(cred_proxy) as client:
        if where == "header":
            r = client.get(url, headers={"X-Note": f"my key is {fake}"})
        elif where == "query":
            r = client.get(url, params={"leak": fake})
        elif where == "json body":
            r = client.post(url, json={"messages": [{"content": f"here: {fake} thanks"}]})
        else:
            r = client.get(url, auth=("user", fake))
    assert r.status_code == 403
    assert "an egress-guard key for openai was sent to api.test.local" in r.json()["error"]["message"]
    assert upstream.state.requests == []
    row = cred_proxy.row_for(r.headers["x-egress-guard-request-id"])
    assert row["credential"] == "denied-unbound-host" and "possible exfiltration" in row["reason"]


def test_fake_key_in_a_streamed_upload_to_an_unbound_host_is_cut(cred_proxy: RunningProxy, upstream: Upstream) -> None:
    fake = mint(cred_proxy).env["GH_TOKEN"].encode()

    def body():  # no Content-Length: streamed through the proxy chunk by chunk
        yield b"x" * 100_000
        yield b"prefix " + fake[:10]
        yield fake[10:] + b" suffix"  # split across chunks
        yield b"y" * 100_000

    with http_client(cred_proxy) as client, pytest.raises(httpx.HTTPError):
        client.post(f"https://api.test.local:{upstream.port}/json", content=body())
    assert not any(fake in json.dumps(r).encode() for r in upstream.state.requests)
    assert all(r["body_bytes"] < 100_000 + 20 for r in upstream.state.requests)


def test_upstream_that_echoes_the_key_never_shows_it_to_the_agent(
    cred_proxy: RunningProxy, llm_upstream: Upstream
) -> None:
    fake = mint(cred_proxy).env["OPENAI_API_KEY"]
    with http_client(cred_proxy) as client:
        r = client.get(f"https://api.openai.com:{llm_upstream.port}/echo", headers={"Authorization": f"Bearer {fake}"})
    assert r.status_code == 200
    assert llm_upstream.state.requests[0]["headers"]["authorization"] == f"Bearer {REAL['openai']}"  # it was sent
    body = r.json()
    assert "REDACTED" in body["received"]["authorization"] and "REDACTED" in body["b64"]
    assert "REDACTED" in r.headers["x-echo-authorization"]
    assert_no_real_secret(cred_proxy, r.text, json.dumps(dict(r.headers)))


def test_missing_env_secret_fails_closed_for_that_service_only(
    cred_proxy: RunningProxy, llm_upstream: Upstream, monkeypatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    env = mint(cred_proxy).env
    with pytest.raises(openai.InternalServerError) as info:
        openai_client(cred_proxy, llm_upstream.port, env["OPENAI_API_KEY"]).models.list()
    assert "environment variable OPENAI_API_KEY is not set" in str(info.value)
    msg = anthropic_client(cred_proxy, llm_upstream.port, env["ANTHROPIC_API_KEY"]).messages.create(
        model="claude-haiku-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}]
    )
    assert msg.content[0].text == "pong"
    assert [r["path"] for r in llm_upstream.state.requests] == ["/v1/messages"]  # openai never forwarded


def test_kill_switch_cuts_an_open_stream_and_refuses_the_next_request(
    cred_proxy: RunningProxy, llm_upstream: Upstream
) -> None:
    minted = mint(cred_proxy)
    fake = minted.env["OPENAI_API_KEY"]
    events: list[str] = []
    outcome: dict[str, object] = {}

    def consume() -> None:
        try:
            with (
                http_client(cred_proxy) as client,
                client.stream(
                    "GET",
                    f"https://api.openai.com:{llm_upstream.port}/v1/slow",
                    headers={"Authorization": f"Bearer {fake}"},
                ) as r,
            ):
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(line)
            outcome["ended"] = "cleanly"
        except httpx.HTTPError as exc:
            outcome["ended"] = f"cut: {type(exc).__name__}"

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 10
    while len(events) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    killed_at = time.monotonic()
    result = CliRunner().invoke(main, ["kill", "--config", str(cred_proxy.config.path), "--agent", "researcher"])
    assert result.exit_code == 0 and "revoked 1 key(s) of agent researcher" in result.output
    reader.join(5)
    cut_after = time.monotonic() - killed_at
    assert not reader.is_alive()
    assert str(outcome["ended"]).startswith("cut"), outcome
    assert cut_after < 2.0 and len(events) < 50  # the stream would have run for 20 s
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        openai_client(cred_proxy, llm_upstream.port, fake).models.list()
    conn = sqlite3.connect(cred_proxy.config.audit_path)
    assert conn.execute("SELECT reason FROM revocations").fetchone()[0] == "kill switch"


def test_anonymous_access_only_when_configured(make_proxy, cred_config, real_env, llm_upstream: Upstream) -> None:
    cred_config["services"] = ["openai", "anthropic", "google-gemini", {"preset": "github", "anonymous": True}]
    proxy = make_proxy(**cred_config)
    with http_client(proxy) as client:
        r = client.get(f"https://api.github.com:{llm_upstream.port}/user")  # no credential: passes unchanged
        assert r.status_code == 401 and r.json() == {"message": "Bad credentials"}  # upstream's own answer
        r = client.get(f"https://api.openai.com:{llm_upstream.port}/v1/models")
        assert r.status_code == 401 and "no openai credential" in r.text
    rows = {r["service"]: r["credential"] for r in proxy.rows(expect=4) if r["kind"] == "request"}
    assert rows == {"github": "anonymous", "openai": "denied-missing"}


def test_revocations_survive_a_proxy_restart(make_proxy, cred_config, real_env, llm_upstream: Upstream) -> None:
    first = make_proxy(**cred_config)
    revoked, kept = mint(first), mint(first, agent="writer")
    result = CliRunner().invoke(main, ["kill", "--config", str(first.config.path), "--agent", "researcher"])
    assert result.exit_code == 0
    first.stop()
    second = make_proxy(**cred_config)  # same directory: same DB and HMAC key
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        openai_client(second, llm_upstream.port, revoked.env["OPENAI_API_KEY"]).models.list()
    msg = anthropic_client(second, llm_upstream.port, kept.env["ANTHROPIC_API_KEY"]).messages.create(
        model="claude-haiku-4-5", max_tokens=5, messages=[]
    )
    assert msg.content[0].text == "pong"
