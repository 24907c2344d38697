"""Rate limits and USD budgets end to end: the real SDKs through the real proxy; every cost
compared with genai-prices applied to what the upstream reported."""

from __future__ import annotations

import json
import threading
import time
from decimal import Decimal

import openai
import pytest
from click.testing import CliRunner
from genai_prices import Usage, calc_price
from support.llm.openai import SlowStream
from support.proxy import RunningProxy
from support.upstream import Upstream
from test_credentials import anthropic_client, http_client, mint, openai_client

from egress_guard.cli import main


def price(model: str, provider: str, **usage: int) -> Decimal:
    return Decimal(calc_price(Usage(**usage), model, provider_id=provider).total_price)


def rows(proxy: RunningProxy, n: int) -> list[dict]:
    return [r for r in proxy.rows(expect=n) if r["kind"] == "request"]


@pytest.fixture
def spend_config(cred_config: dict) -> dict:
    cred_config["agents"]["researcher"]["limits"] = {"budget_usd": {"day": 100}}
    cred_config["agents"]["writer"]["limits"] = {"models": {"anthropic": ["claude-haiku-*"]}}
    return cred_config


@pytest.fixture
def spend_proxy(make_proxy, spend_config, real_env) -> RunningProxy:
    return make_proxy(**spend_config)


def test_openai_json_and_stream_costs_are_exact(spend_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    client = openai_client(spend_proxy, llm_upstream.port, mint(spend_proxy).env["OPENAI_API_KEY"])
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=7, messages=[{"role": "user", "content": "hi"}])
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=9, stream=True, messages=[{"role": "user", "content": "hi"}]
        )
    )
    # the client did not ask for usage: it sees exactly the stream it asked for...
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "pong"
    # ...although egress-guard asked the upstream for it
    sent = json.loads(llm_upstream.state.requests[-1]["body"])
    assert sent["stream_options"] == {"include_usage": True}
    json_row, stream_row = rows(spend_proxy, 4)
    assert (json_row["model"], json_row["input_tokens"], json_row["output_tokens"]) == ("gpt-4o-mini", 11, 7)
    assert Decimal(json_row["cost_usd"]) == price("gpt-4o-mini", "openai", input_tokens=11, output_tokens=7)
    assert (stream_row["input_tokens"], stream_row["output_tokens"]) == (11, 9)
    assert Decimal(stream_row["cost_usd"]) == price("gpt-4o-mini", "openai", input_tokens=11, output_tokens=9)


def test_usage_chunk_the_client_asked_for_is_kept(spend_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    client = openai_client(spend_proxy, llm_upstream.port, mint(spend_proxy).env["OPENAI_API_KEY"])
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=3, stream=True, messages=[], stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert rows(spend_proxy, 2)[0]["output_tokens"] == 3


def test_anthropic_json_and_stream_costs_include_cache_tokens(
    spend_proxy: RunningProxy, llm_upstream: Upstream
) -> None:
    client = anthropic_client(spend_proxy, llm_upstream.port, mint(spend_proxy).env["ANTHROPIC_API_KEY"])
    client.messages.create(model="claude-haiku-4-5", max_tokens=6, messages=[{"role": "user", "content": "x"}])
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=8, messages=[]) as stream:
        assert "".join(stream.text_stream) == "pong"
    expected = [
        price(
            "claude-haiku-4-5",
            "anthropic",
            input_tokens=10,
            output_tokens=out,
            cache_read_tokens=2,
            cache_write_tokens=3,
        )
        for out in (6, 8)
    ]
    got = rows(spend_proxy, 4)
    assert [Decimal(r["cost_usd"]) for r in got] == expected
    assert [(r["input_tokens"], r["output_tokens"], r["cached_tokens"]) for r in got] == [(10, 6, 5), (10, 8, 5)]


def test_gemini_cost_from_json(spend_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    key = mint(spend_proxy).env["GEMINI_API_KEY"]
    url = (
        f"https://generativelanguage.googleapis.com:{llm_upstream.port}/v1beta/models/gemini-2.5-flash:generateContent"
    )
    with http_client(spend_proxy) as client:
        assert client.post(url, headers={"x-goog-api-key": key}, json={"contents": []}).status_code == 200
    row = rows(spend_proxy, 2)[0]
    assert Decimal(row["cost_usd"]) == price("gemini-2.5-flash", "google", input_tokens=7, output_tokens=3)


def test_model_allowlist(spend_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    client = anthropic_client(
        spend_proxy, llm_upstream.port, mint(spend_proxy, agent="writer").env["ANTHROPIC_API_KEY"]
    )
    assert client.messages.create(model="claude-haiku-4-5", max_tokens=2, messages=[]).content
    with pytest.raises(anthropic_permission_error()) as info:
        client.messages.create(model="claude-opus-4-1", max_tokens=2, messages=[])
    assert "model 'claude-opus-4-1' is not allowed for agent writer on anthropic (allowed: claude-haiku-*)" in str(
        info.value
    )
    assert len(llm_upstream.state.requests) == 1


def anthropic_permission_error() -> type[Exception]:
    import anthropic

    return anthropic.PermissionDeniedError


def test_rate_limit_returns_429_with_retry_after(make_proxy, spend_config, real_env, llm_upstream: Upstream) -> None:
    spend_config["agents"]["researcher"]["limits"] = {"requests_per_minute": 3}
    proxy = make_proxy(**spend_config)
    key = mint(proxy).env["OPENAI_API_KEY"]
    with http_client(proxy) as client:
        url = f"https://api.openai.com:{llm_upstream.port}/v1/models"
        assert [client.get(url, headers={"Authorization": f"Bearer {key}"}).status_code for _ in range(3)] == [200] * 3
        r = client.get(url, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 429
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert "3 requests per minute" in r.json()["error"]["message"]


def test_concurrent_requests_cannot_overshoot_the_budget(
    make_proxy, spend_config, real_env, llm_upstream: Upstream
) -> None:
    one = price("gpt-4o-mini", "openai", input_tokens=11, output_tokens=2000)  # what each call really costs
    spend_config["agents"]["researcher"]["limits"] = {"budget_usd": {"session": str(one * 10)}}
    proxy = make_proxy(**spend_config)
    key = mint(proxy).env["OPENAI_API_KEY"]
    statuses: list[int] = []
    lock = threading.Lock()

    def call() -> None:
        with http_client(proxy) as client:
            r = client.post(
                f"https://api.openai.com:{llm_upstream.port}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "gpt-4o-mini", "max_tokens": 2000, "messages": []},
            )
        with lock:
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert "session budget" in r.text and "would be exceeded" in r.text

    threads = [threading.Thread(target=call) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(statuses) == 64 and set(statuses) <= {200, 429}
    ok = statuses.count(200)
    spent = sum(Decimal(r["cost_usd"]) for r in rows(proxy, 64 + ok) if r["cost_usd"])
    reservation_bound = price("gpt-4o-mini", "openai", input_tokens=200, output_tokens=2000)
    assert spent <= one * 10 + reservation_bound
    assert 1 <= ok <= 10 and statuses.count(429) >= 54


def test_budget_survives_restart_and_budget_set_applies_at_once(
    make_proxy, spend_config, real_env, llm_upstream: Upstream
) -> None:
    one = price("gpt-4o-mini", "openai", input_tokens=11, output_tokens=100)  # a call's real cost
    held = price("gpt-4o-mini", "openai", input_tokens=256, output_tokens=100)  # its reservation
    # room for one reservation, but not for a second one on top of the first call's real cost
    spend_config["agents"]["researcher"]["limits"] = {"budget_usd": {"day": str(held + one / 2)}}
    first = make_proxy(**spend_config)
    key = mint(first).env["OPENAI_API_KEY"]
    body = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": []}
    assert openai_client(first, llm_upstream.port, key).chat.completions.create(**body).choices
    first.stop()
    second = make_proxy(**spend_config)  # same DB: the day's spend is remembered
    client = openai_client(second, llm_upstream.port, key)
    with pytest.raises(openai.RateLimitError, match="day budget"):
        client.chat.completions.create(**body)
    result = CliRunner().invoke(
        main,
        ["budget", "set", "--config", str(second.config.path), "--agent", "researcher", "--scope", "day", "--usd", "1"],
    )
    assert result.exit_code == 0, result.output
    time.sleep(1.0)  # the proxy follows budget changes every 0.5 s
    assert client.chat.completions.create(**body).choices
    deadline = time.monotonic() + 5
    while sum(1 for r in second.rows() if r["cost_usd"]) < 2:  # let the audit writer flush the second call
        assert time.monotonic() < deadline
        time.sleep(0.05)
    shown = json.loads(
        CliRunner()
        .invoke(
            main, ["budget", "show", "--config", str(second.config.path), "--agent", "researcher", "--format", "json"]
        )
        .output
    )
    day = next(r for r in shown if r["scope"] == "day")
    assert day["limit_usd"] == "1" and Decimal(day["spent_usd"]) == one * 2
    assert Decimal(day["remaining_usd"]) == Decimal(1) - one * 2


def test_config_session_override_beats_the_agent_budget(
    make_proxy, spend_config, real_env, llm_upstream: Upstream
) -> None:
    spend_config["agents"]["researcher"]["limits"] = {
        "budget_usd": {"session": "0.000001"},  # too little for any call
        "sessions": {"batch-*": {"budget_usd": "0.50"}},
    }
    proxy = make_proxy(**spend_config)
    body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": []}
    plain = openai_client(proxy, llm_upstream.port, mint(proxy, session="dev-1").env["OPENAI_API_KEY"])
    with pytest.raises(openai.RateLimitError, match=r"session budget of \$0.000001"):
        plain.chat.completions.create(**body)
    batch = openai_client(proxy, llm_upstream.port, mint(proxy, session="batch-7").env["OPENAI_API_KEY"])
    assert batch.chat.completions.create(**body).choices
    shown = CliRunner().invoke(
        main, ["budget", "show", "--config", str(proxy.config.path), "--agent", "researcher", "--format", "json"]
    )
    limits = {r["key"]: r["limit_usd"] for r in json.loads(shown.output) if r["scope"] == "session"}
    assert limits == {"dev-1": "0.000001", "batch-7": "0.50"}


def test_aborted_stream_is_billed_at_its_reservation(spend_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    key = mint(spend_proxy).env["OPENAI_API_KEY"]
    with (
        http_client(spend_proxy) as client,
        client.stream(
            "POST",
            f"https://api.openai.com:{llm_upstream.port}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "gpt-4o-mini", "max_tokens": 50, "stream": True, "messages": []},
        ) as r,
    ):
        assert r.status_code == 200
        # read nothing: close at once (the client aborts)
    row = rows(spend_proxy, 2)[0]
    assert row["cost_usd"] is not None and Decimal(row["cost_usd"]) > 0


def test_audit_spend_report(spend_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    env = mint(spend_proxy).env
    openai_client(spend_proxy, llm_upstream.port, env["OPENAI_API_KEY"]).chat.completions.create(
        model="gpt-4o-mini", max_tokens=4, messages=[]
    )
    anthropic_client(spend_proxy, llm_upstream.port, env["ANTHROPIC_API_KEY"]).messages.create(
        model="claude-haiku-4-5", max_tokens=4, messages=[]
    )
    rows(spend_proxy, 4)
    out = CliRunner().invoke(
        main, ["audit", "spend", "--config", str(spend_proxy.config.path), "--by", "model", "--format", "json"]
    )
    by_model = {r["model"]: r for r in json.loads(out.output)}
    assert set(by_model) == {"gpt-4o-mini", "claude-haiku-4-5"}
    assert Decimal(by_model["gpt-4o-mini"]["cost_usd"]) == price(
        "gpt-4o-mini", "openai", input_tokens=11, output_tokens=4
    )
    by_agent = json.loads(
        CliRunner()
        .invoke(main, ["audit", "spend", "--config", str(spend_proxy.config.path), "--format", "json"])
        .output
    )
    assert by_agent[0]["agent"] == "researcher" and by_agent[0]["requests"] == 2
    SlowStream.stop.set()


def test_responses_api_embeddings_and_gemini_stream_are_priced(
    spend_proxy: RunningProxy, llm_upstream: Upstream
) -> None:
    env = mint(spend_proxy).env
    client = openai_client(spend_proxy, llm_upstream.port, env["OPENAI_API_KEY"])
    assert client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=5).output_text == "pong"
    with client.responses.stream(model="gpt-4o-mini", input="hi", max_output_tokens=6) as stream:
        assert stream.get_final_response().usage.output_tokens == 6
    assert client.embeddings.create(model="text-embedding-3-small", input="hi").data
    url = (
        f"https://generativelanguage.googleapis.com:{llm_upstream.port}/v1beta/models/gemini-2.5-flash"
        ":streamGenerateContent"
    )
    with http_client(spend_proxy) as h:
        r = h.post(url, params={"alt": "sse"}, headers={"x-goog-api-key": env["GEMINI_API_KEY"]}, json={})
        assert r.status_code == 200 and r.text.count("data:") == 3
    deadline = time.monotonic() + 5
    while sum(1 for r in spend_proxy.rows() if r["cost_usd"]) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    costs = [Decimal(r["cost_usd"]) for r in spend_proxy.rows() if r["cost_usd"]]
    assert costs == [
        price("gpt-4o-mini", "openai", input_tokens=13, output_tokens=5),
        price("gpt-4o-mini", "openai", input_tokens=13, output_tokens=6),
        price("text-embedding-3-small", "openai", input_tokens=8),
        price("gemini-2.5-flash", "google", input_tokens=7, output_tokens=3),  # the last usageMetadata
    ]


def wait_for(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def cut_proxy(make_proxy, spend_config, real_env) -> RunningProxy:
    # The client sets no max_tokens, so 50 are reserved; the "model" then writes 3000 (one per
    # event). The session budget fits the reservation with room for a few hundred tokens.
    spend_config["spend"] = {"on_overrun": "cut", "default_max_output_tokens": 50}
    spend_config["agents"]["researcher"]["limits"] = {"budget_usd": {"session": "0.0004"}}
    return make_proxy(**spend_config)


RUNAWAY = 3000


def test_stream_crossing_the_budget_is_ended_cleanly_and_the_upstream_stopped(
    cut_proxy: RunningProxy, llm_upstream: Upstream
) -> None:
    client = openai_client(cut_proxy, llm_upstream.port, mint(cut_proxy, session="s-cut").env["OPENAI_API_KEY"])
    chunks = list(
        client.chat.completions.create(model="gpt-4o-mini", stream=True, messages=[], extra_body={"x_runaway": RUNAWAY})
    )  # no exception: the SDK saw a complete stream
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    streamed = text.count("tok ")
    assert text == "tok " * streamed and 100 < streamed < RUNAWAY
    wait_for(lambda: len(llm_upstream.state.runaway) == 1)
    assert llm_upstream.state.runaway[0] < RUNAWAY  # the upstream connection was cut: generation stopped
    row = rows(cut_proxy, 2)[0]
    assert row["status"] == 200 and "session budget of $0.0004" in row["reason"]
    assert "reached mid-stream" in row["reason"] and "the stream was ended" in row["reason"]
    # billed what was streamed (prompt at its estimate, one token per event), within the budget
    assert (row["input_tokens"], row["output_tokens"]) == (256, streamed)
    assert Decimal(row["cost_usd"]) == price("gpt-4o-mini", "openai", input_tokens=256, output_tokens=streamed)
    # ended at the first event past the budget: over it by that one event at most
    one_token = price("gpt-4o-mini", "openai", output_tokens=1)
    assert Decimal("0.0004") < Decimal(row["cost_usd"]) <= Decimal("0.0004") + one_token
    # the session's budget is spent: the next call is refused before it goes upstream
    with pytest.raises(openai.RateLimitError, match="session budget"):
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=5, messages=[])


def test_anthropic_stream_crossing_the_budget_ends_with_max_tokens(
    cut_proxy: RunningProxy, llm_upstream: Upstream
) -> None:
    client = anthropic_client(cut_proxy, llm_upstream.port, mint(cut_proxy).env["ANTHROPIC_API_KEY"])
    with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=10, messages=[], extra_body={"x_runaway": RUNAWAY}
    ) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "max_tokens"
    streamed = message.content[0].text.count("tok ")
    # message_start reported 1 output token; one per event streamed after it
    assert 10 < streamed < RUNAWAY and message.usage.output_tokens == streamed + 1
    wait_for(lambda: len(llm_upstream.state.runaway) == 1)
    assert llm_upstream.state.runaway[0] < RUNAWAY
    row = rows(cut_proxy, 2)[0]
    assert "reached mid-stream" in row["reason"] and row["output_tokens"] == streamed + 1
    # the prompt is priced from the usage Anthropic reported at the start (message_start)
    assert Decimal(row["cost_usd"]) == price(
        "claude-haiku-4-5",
        "anthropic",
        input_tokens=10,  # genai-prices counts cache reads and writes in the input
        output_tokens=streamed + 1,
        cache_read_tokens=2,
        cache_write_tokens=3,
    )


def test_streams_within_the_budget_are_untouched_when_cutting_is_on(
    cut_proxy: RunningProxy, llm_upstream: Upstream
) -> None:
    client = openai_client(cut_proxy, llm_upstream.port, mint(cut_proxy).env["OPENAI_API_KEY"])
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", max_tokens=9, stream=True, messages=[]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "pong"
    assert chunks[-1].choices[0].finish_reason == "stop"
    row = rows(cut_proxy, 2)[0]
    assert "mid-stream" not in row["reason"]
    assert Decimal(row["cost_usd"]) == price("gpt-4o-mini", "openai", input_tokens=11, output_tokens=9)
    # a stream that may be ended early is delimited by the connection's close; one of an agent
    # with no budget to cross (writer) keeps its chunked framing and its connection
    framing = {}
    for agent, service, path, header in (
        ("researcher", "openai", "/v1/chat/completions", "OPENAI_API_KEY"),
        ("writer", "anthropic", "/v1/messages", "ANTHROPIC_API_KEY"),
    ):
        key = mint(cut_proxy, agent).env[header]
        host = {"openai": "api.openai.com", "anthropic": "api.anthropic.com"}[service]
        with http_client(cut_proxy) as h:
            r = h.post(
                f"https://{host}:{llm_upstream.port}{path}",
                headers={"Authorization": f"Bearer {key}"},
                json={
                    "model": "claude-haiku-4-5" if agent == "writer" else "gpt-4o-mini",
                    "stream": True,
                    "max_tokens": 3,
                },
            )
            assert r.status_code == 200 and "data:" in r.text
            framing[agent] = (r.headers.get("transfer-encoding"), r.headers.get("connection"))
    assert framing == {"researcher": (None, "close"), "writer": ("chunked", None)}


def test_a_custom_openai_compatible_service_is_metered_and_priced_as_its_provider(
    make_proxy, spend_config, real_env, llm_upstream: Upstream
) -> None:
    spend_config["allow"].append({"host": "api.groq.com", "ports": [llm_upstream.port]})
    spend_config["network"]["hosts"]["api.groq.com"] = ["127.0.0.1"]
    spend_config["services"].append(
        {
            "name": "groq",
            "hosts": ["api.groq.com"],
            "credential": [{"header": "Authorization", "scheme": "Bearer"}],
            "fake_key": {"prefix": "gsk_", "length": 56},
            "env_var": "GROQ_API_KEY",
            "secret": "env:OPENAI_API_KEY",  # the test upstream takes the same real key
            "meter": {"api": "openai", "provider": "groq"},
        }
    )
    spend_config["agents"]["researcher"]["services"].append("groq")
    spend_config["agents"]["researcher"]["limits"] = {"budget_usd": {"day": 100}, "models": {"groq": ["llama-*"]}}
    proxy = make_proxy(**spend_config)
    key = mint(proxy).env["GROQ_API_KEY"]
    client = openai.OpenAI(
        api_key=key,
        base_url=f"https://api.groq.com:{llm_upstream.port}/openai/v1",
        max_retries=0,
        http_client=http_client(proxy),
    )
    client.chat.completions.create(model="llama-3.1-8b-instant", max_tokens=7, messages=[])
    chunks = list(client.chat.completions.create(model="llama-3.1-8b-instant", max_tokens=9, stream=True, messages=[]))
    assert all(c.usage is None for c in chunks)  # include_usage was added and its chunk dropped here too
    with pytest.raises(openai.PermissionDeniedError, match="not allowed for agent researcher on groq"):
        client.chat.completions.create(model="gpt-4o", max_tokens=5, messages=[])
    json_row, stream_row = rows(proxy, 5)[:2]
    for row, out in ((json_row, 7), (stream_row, 9)):
        assert (row["model"], row["input_tokens"], row["output_tokens"]) == ("llama-3.1-8b-instant", 11, out)
        assert Decimal(row["cost_usd"]) == price("llama-3.1-8b-instant", "groq", input_tokens=11, output_tokens=out)


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
def test_compressed_streams_are_priced_and_keep_their_shape(
    spend_proxy: RunningProxy, llm_upstream: Upstream, encoding: str
) -> None:
    # an upstream that compresses although egress-guard asked for identity: the body is
    # buffered (to be scrubbed), decoded, priced, and the usage chunk it asked for taken out
    env = mint(spend_proxy).env
    openai_sdk = openai_client(spend_proxy, llm_upstream.port, env["OPENAI_API_KEY"])
    chunks = list(
        openai_sdk.chat.completions.create(
            model="gpt-4o-mini",
            max_tokens=9,
            stream=True,
            messages=[],
            extra_headers={"X-Test-Compress": encoding},
        )
    )
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "pong"
    anthropic_sdk = anthropic_client(spend_proxy, llm_upstream.port, env["ANTHROPIC_API_KEY"])
    with anthropic_sdk.messages.stream(
        model="claude-haiku-4-5", max_tokens=8, messages=[], extra_headers={"X-Test-Compress": encoding}
    ) as stream:
        assert "".join(stream.text_stream) == "pong"
    openai_row, anthropic_row = rows(spend_proxy, 4)
    assert Decimal(openai_row["cost_usd"]) == price("gpt-4o-mini", "openai", input_tokens=11, output_tokens=9)
    assert Decimal(anthropic_row["cost_usd"]) == price(
        "claude-haiku-4-5", "anthropic", input_tokens=10, output_tokens=8, cache_read_tokens=2, cache_write_tokens=3
    )


def test_gemini_json_array_stream_is_priced(spend_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    # streamGenerateContent without alt=sse answers one JSON array (buffered when small)
    env = mint(spend_proxy).env
    url = (
        f"https://generativelanguage.googleapis.com:{llm_upstream.port}/v1beta/models/gemini-2.5-flash"
        ":streamGenerateContent"
    )
    with http_client(spend_proxy) as h:
        r = h.post(url, headers={"x-goog-api-key": env["GEMINI_API_KEY"]}, json={})
        assert r.status_code == 200 and isinstance(r.json(), list)
    (row,) = rows(spend_proxy, 2)
    assert Decimal(row["cost_usd"]) == price("gemini-2.5-flash", "google", input_tokens=7, output_tokens=3)
