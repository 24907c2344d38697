"""Prometheus metrics (`metrics: {listen: …}`): the real proxy, real clients, a real upstream;
`/metrics` scraped over HTTP and parsed with prometheus-client's own parser, its counters
compared with the audit log row for row."""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from click.testing import CliRunner
from mitmproxy.test import tflow
from prometheus_client.parser import text_string_to_metric_families
from support.llm.common import REAL
from support.pg import pg_rows
from support.proxy import RunningProxy, write_config
from support.replicas import Replica, fleet_config
from support.upstream import Upstream

from egress_guard import keys
from egress_guard.addons.flow import Failure, state
from egress_guard.addons.metrics import FlowMetrics
from egress_guard.addons.timeouts import Timeouts
from egress_guard.cli import main
from egress_guard.config import load_config
from egress_guard.credentials import Agent
from egress_guard.ledger import Ledger
from egress_guard.metrics import Metrics
from egress_guard.policy import Decision, Verdict
from egress_guard.server import StartupError
from egress_guard.spend import Limits, SpendSettings
from egress_guard.store import AuditRow
from egress_guard.store.interface import Batch

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> Samples:
    """Every sample: (name, sorted labels) -> value, by prometheus-client's parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(proxy: RunningProxy) -> str:
    server = proxy.proxy.metrics_server if proxy.proxy is not None else None
    assert server is not None, "metrics are not served"
    with urllib.request.urlopen(server.url, timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def series(samples: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """The samples of one metric, by the values of the labels `keys` (non-zero only)."""
    out: dict[tuple[str, ...], float] = {}
    for (n, labels), value in samples.items():
        if n == name and value:
            d = dict(labels)
            out[tuple(d[k] for k in keys)] = out.get(tuple(d[k] for k in keys), 0.0) + value
    return out


def http_client(proxy: RunningProxy) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=20)


def code(status: int | None) -> str:
    return f"{status // 100}xx" if status is not None else "none"


def expected_requests(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], float]:
    counts: collections.Counter[tuple[str, ...]] = collections.Counter(
        (r["kind"], r["decision"], r["service"] or "", r["agent"] or "", code(r["status"])) for r in rows
    )
    return {k: float(v) for k, v in counts.items()}


def audit_rows(proxy: RunningProxy, expect: int) -> list[dict[str, Any]]:
    """The audit rows, from whichever store the proxy writes to."""
    store = proxy.config.store
    return proxy.rows(expect=expect) if store is None else pg_rows(store.url, expect=expect)


def matching(proxy: RunningProxy, n_rows: int, timeout: float = 10.0) -> tuple[list[dict[str, Any]], Samples, str]:
    """The audit rows (at least `n_rows`) and a scrape whose request counters match them: the
    counters move right after each commit, so a scrape may trail the DB by one commit."""
    deadline = time.monotonic() + timeout
    while True:
        rows = audit_rows(proxy, n_rows)
        text = scrape(proxy)
        samples = parse(text)
        got = series(samples, "egress_guard_requests_total", "kind", "decision", "service", "agent", "code")
        if got == expected_requests(rows) or time.monotonic() > deadline:
            return rows, samples, text
        time.sleep(0.1)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> str | None:
    """The store the proxy runs on: the embedded SQLite file, or a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


@pytest.fixture
def metered(
    make_proxy: Callable[..., RunningProxy], cred_config: dict[str, Any], real_env: dict[str, str]
) -> Callable[..., RunningProxy]:
    """A proxy with metrics on a free loopback port and a day budget for researcher."""

    def make(**extra: Any) -> RunningProxy:
        cred_config["agents"]["researcher"]["limits"] = {"budget_usd": {"day": 5}}
        cred_config["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
        return make_proxy(**{**cred_config, **{k: v for k, v in extra.items() if v is not None}})

    return make


def test_counters_match_the_audit_log(
    metered: Callable[..., RunningProxy],
    cred_config: dict[str, Any],
    llm_upstream: Upstream,
    store: str | None,
    tmp_path: Path,
) -> None:
    dead = free_port()  # an allowed host whose upstream is not there
    cred_config["allow"].append({"host": "api.test.local", "ports": [dead]})
    password = "pg-Pa55word-never-shown"
    if store is not None:  # the long form, with a password file (trust auth: never asked for)
        secret = tmp_path / "pg-password"
        secret.write_text(password)
        proxy = metered(store={"url": store, "password_file": str(secret)})
    else:
        proxy = metered()
    cfg = proxy.config
    fake = keys.mint(cfg, "researcher").env["OPENAI_API_KEY"]
    client = openai.OpenAI(
        api_key=fake,
        base_url=f"https://api.openai.com:{llm_upstream.port}/v1",
        max_retries=0,
        http_client=http_client(proxy),
    )
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=7, messages=[{"role": "user", "content": "hi"}])
    list(client.chat.completions.create(model="gpt-4o-mini", max_tokens=9, stream=True, messages=[]))
    with http_client(proxy) as http:
        # refused: a forged key, a host not on the allowlist
        forged = http.get(
            f"https://api.openai.com:{llm_upstream.port}/v1/models", headers={"Authorization": "Bearer sk-proj-x"}
        )
        assert forged.status_code in (401, 403)
        with pytest.raises(httpx.HTTPError):
            http.get("https://not-allowed.test.local/")
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=20) as plain:  # allowed, nothing listens
        assert plain.get(f"http://api.test.local:{dead}/").status_code == 502
    rows, samples, text = matching(proxy, 8)
    got = series(samples, "egress_guard_requests_total", "kind", "decision", "service", "agent", "code")
    assert got == expected_requests(rows)
    assert ("request", "allow", "openai", "researcher", "2xx") in got
    assert any(k[1] == "deny" for k in got) and any(k[1] == "error" for k in got)

    # USD spent: the rows' cost_usd, per agent and service; the budget left is the limit minus that
    spent = sum(Decimal(r["cost_usd"]) for r in rows if r["cost_usd"])
    assert spent > 0
    assert series(samples, "egress_guard_spent_usd_total", "agent", "service") == pytest.approx(
        {("researcher", "openai"): float(spent)}
    )
    assert samples[("egress_guard_budget_limit_usd", (("agent", "researcher"), ("scope", "day")))] == 5
    left = samples[("egress_guard_budget_remaining_usd", (("agent", "researcher"), ("scope", "day")))]
    assert left == pytest.approx(float(5 - spent))

    # latencies: the two forwarded calls (the refusals and the failure have none)
    forwarded = [r for r in rows if r["kind"] == "request" and r["decision"] == "allow"]
    for name in ("request_duration_seconds", "upstream_seconds", "overhead_seconds"):
        assert series(samples, f"egress_guard_{name}_count", "service") == {("openai",): len(forwarded)}
    total = series(samples, "egress_guard_request_duration_seconds_sum", "service")[("openai",)]
    assert 0 < series(samples, "egress_guard_overhead_seconds_sum", "service")[("openai",)] < total
    assert series(samples, "egress_guard_upstream_errors_total", "service", "reason") == {("", "failed"): 1}

    # the audit log: every commit timed, nothing queued, nothing failed
    assert samples[("egress_guard_audit_commit_seconds_count", ())] >= 1
    assert samples[("egress_guard_audit_backlog", ())] == 0
    assert samples[("egress_guard_audit_healthy", ())] == 1
    assert samples[("egress_guard_store_errors_total", (("op", "write"),))] == 0
    assert samples[("egress_guard_store_errors_total", (("op", "read"),))] == 0
    assert samples[("egress_guard_event_loop_responsive", ())] == 1
    assert ("process_resident_memory_bytes", ()) in samples

    # no secret, no key, no store password, no host or path an agent chose
    for secret in (*REAL.values(), fake, password, "not-allowed", "/v1/chat"):
        assert secret not in text


def test_revocation_lag(metered: Callable[..., RunningProxy], llm_upstream: Upstream, store: str | None) -> None:
    proxy = metered(store=store)
    fake = keys.mint(proxy.config, "researcher").env["OPENAI_API_KEY"]
    with http_client(proxy) as http:
        url = f"https://api.openai.com:{llm_upstream.port}/v1/models"
        assert http.get(url, headers={"Authorization": f"Bearer {fake}"}).status_code == 200
    killswitch = proxy.proxy.metrics.revocations if proxy.proxy and proxy.proxy.metrics else None
    if not hasattr(killswitch, "last_lag"):
        pytest.skip("KillSwitch.last_lag is not there yet (C2)")
    written = time.monotonic()
    result = CliRunner().invoke(main, ["kill", "--agent", "researcher", "--config", str(proxy.config.path)])
    assert result.exit_code == 0, result.output
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        samples = parse(scrape(proxy))
        lag = samples.get(("egress_guard_revocation_lag_seconds", ()))
        if lag is not None:
            break
        time.sleep(0.05)
    assert lag is not None, "no revocation lag after a kill"
    assert 0 <= lag <= time.monotonic() - written + 0.05, lag
    assert samples[("egress_guard_revocations_applied_total", ())] >= 1
    assert samples[("egress_guard_revocation_apply_seconds_count", ())] >= 1
    # current: the listener is up and a poll succeeded within 3 s (a loaded machine may miss that
    # for a moment: wait for it rather than read one sample)
    deadline = time.monotonic() + 10
    while samples[("egress_guard_revocations_current", ())] != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        samples = parse(scrape(proxy))
    assert samples[("egress_guard_revocations_current", ())] == 1


def test_off_by_default(make_proxy: Callable[..., RunningProxy]) -> None:
    proxy = make_proxy()
    assert proxy.proxy is not None and proxy.proxy.metrics is None and proxy.proxy.metrics_server is None


def test_metrics_port_taken_is_a_startup_error(metered: Callable[..., RunningProxy]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError) as info:
            metered(metrics={"listen": f"127.0.0.1:{port}"})
    assert f"cannot serve metrics on 127.0.0.1:{port}" in str(info.value)
    assert "metrics.listen" in str(info.value)


def test_stopped_proxy_stops_serving(metered: Callable[..., RunningProxy]) -> None:
    proxy = metered()
    server = proxy.proxy.metrics_server if proxy.proxy else None
    assert server is not None
    scrape(proxy)
    proxy.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)


def test_beyond_loopback_is_said(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    metrics = Metrics({}, ())

    async def serve() -> None:
        server = metrics.serve("0.0.0.0", 0)
        server.stop()

    with caplog.at_level(logging.WARNING, logger="egress_guard"):
        asyncio.run(serve())
    assert "beyond loopback" in caplog.text


# --- the pure parts --------------------------------------------------------------------------


def registry_samples(metrics: Metrics) -> Samples:
    from prometheus_client import generate_latest

    return parse(generate_latest(metrics.registry).decode())


def test_labels_are_config_names_only() -> None:
    metrics = Metrics({"a": Agent("a", ("openai",))}, ["openai"])
    rows = [
        AuditRow(ts="t", request_id="1", kind="request", decision="allow", agent="a", service="openai", status=200),
        AuditRow(ts="t", request_id="2", kind="request", decision="deny", agent="mallory", service="x", status=403),
        AuditRow(ts="t", request_id="3", kind="connect", decision="deny", host="evil.example", status=None),
        AuditRow(
            ts="t", request_id="4", kind="request", decision="allow", agent="a", service="openai", cost_usd="0.25"
        ),
    ]
    metrics.committed(Batch(rows=rows, amends=[("1", "late")]), 0.003)
    got = series(
        registry_samples(metrics), "egress_guard_requests_total", "kind", "decision", "service", "agent", "code"
    )
    assert got == {
        ("request", "allow", "openai", "a", "2xx"): 1,
        ("request", "deny", "other", "other", "4xx"): 1,
        ("connect", "deny", "", "", "none"): 1,
        ("request", "allow", "openai", "a", "none"): 1,
    }
    samples = registry_samples(metrics)
    assert samples[("egress_guard_spent_usd_total", (("agent", "a"), ("service", "openai")))] == 0.25
    assert samples[("egress_guard_audit_rows_amended_total", ())] == 1
    assert samples[("egress_guard_audit_commit_seconds_count", ())] == 1


def test_budget_remaining_includes_overrides_and_reservations() -> None:
    ledger = Ledger(SpendSettings())
    agents = {
        "a": Agent("a", (), Limits(budget_day=Decimal(10), budget_total=Decimal(100))),
        "b": Agent("b", ()),  # no budget: no series
    }
    metrics = Metrics(agents, (), ledger=ledger)
    ledger.add_spent("a", "s1", ledger.day(), Decimal("2.5"))
    ledger.admit(agents["a"].limits, "a", "s1", Decimal(1), 10)  # reserved, not settled
    ledger.overrides[("a", "total")] = Decimal(50)
    remaining = series(registry_samples(metrics), "egress_guard_budget_remaining_usd", "agent", "scope")
    assert remaining == {("a", "day"): 6.5, ("a", "total"): 46.5}


def test_flow_observer() -> None:
    metrics = Metrics({}, ["openai"])
    observer = FlowMetrics(metrics)

    def forwarded(status: int | None) -> Any:
        flow = tflow.tflow(resp=status is not None)
        state(flow).service = "openai"
        flow.response = None
        observer.request(flow)
        if status is not None:
            flow.response = tflow.tresp(status_code=status)
        return flow

    ok = forwarded(200)
    observer.response(ok)
    bad = forwarded(503)
    observer.response(bad)
    timed_out = forwarded(None)
    state(timed_out).timeout = "connect"
    observer.error(timed_out)
    hung_up = forwarded(None)
    state(hung_up).failure = Failure(None, client=True)  # the agent's side: not the upstream's
    observer.error(hung_up)
    refused = tflow.tflow()
    own = tflow.tresp(status_code=403)
    refused.response = own
    state(refused).own_response = True
    state(refused).decision = Decision(Verdict.DENY, "no")
    observer.request(refused)
    observer.response(refused)
    samples = registry_samples(metrics)
    assert series(samples, "egress_guard_upstream_errors_total", "service", "reason") == {
        ("openai", "status_5xx"): 1,
        ("openai", "connect_timeout"): 1,
    }
    assert samples[("egress_guard_upstream_seconds_count", (("service", "openai"),))] == 2


def test_store_down_is_visible_and_metrics_still_answer(
    metered: Callable[..., RunningProxy], pg_cluster: Any, pg_url: str
) -> None:
    """PostgreSQL stopped (SIGSTOP): the scrape still answers (it never waits on the store), and
    says the audit log refuses requests and its commits fail; SIGCONT: healthy again."""
    proxy = metered(store={"url": pg_url, "timeout": 1})
    samples = parse(scrape(proxy))
    assert samples[("egress_guard_audit_healthy", ())] == 1
    assert samples[("egress_guard_store_errors_total", (("op", "write"),))] == 0
    pg_cluster.sigstop()
    try:
        # a refusal: its row cannot be committed
        with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as plain, contextlib.suppress(httpx.HTTPError):
            plain.get(f"http://api.test.local:{free_port()}/")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            started = time.monotonic()
            samples = parse(scrape(proxy))
            assert time.monotonic() - started < 1.5, "a scrape waited on the store"
            if samples[("egress_guard_store_errors_total", (("op", "write"),))] >= 1:
                break
            time.sleep(0.2)
        assert samples[("egress_guard_store_errors_total", (("op", "write"),))] >= 1
        assert samples[("egress_guard_audit_healthy", ())] == 0
        assert samples[("egress_guard_audit_backlog", ())] >= 1
        assert samples[("egress_guard_event_loop_responsive", ())] == 1
        while time.monotonic() < deadline:  # the kill switch reads revocations every 0.25 s
            if samples.get(("egress_guard_store_errors_total", (("op", "read"),)), 0) >= 1:
                break
            time.sleep(0.2)
            samples = parse(scrape(proxy))
        assert samples[("egress_guard_store_errors_total", (("op", "read"),))] >= 1
    finally:
        pg_cluster.sigcont()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        samples = parse(scrape(proxy))
        if samples[("egress_guard_audit_healthy", ())] == 1 and samples[("egress_guard_audit_backlog", ())] == 0:
            break
        time.sleep(0.2)
    assert samples[("egress_guard_audit_healthy", ())] == 1
    assert samples[("egress_guard_audit_backlog", ())] == 0


def test_a_stuck_event_loop_still_gets_a_scrape() -> None:
    """The scrape-time values are read on the proxy's event loop; if it does not answer, the
    counters are still served and event_loop_responsive says 0."""
    import asyncio

    metrics = Metrics({}, ())
    loop = asyncio.new_event_loop()  # never run: as good as stuck
    try:
        metrics.loop = loop
        samples = registry_samples(metrics)
    finally:
        loop.close()
    assert samples[("egress_guard_event_loop_responsive", ())] == 0
    assert ("egress_guard_audit_commit_seconds_count", ()) in samples


def test_two_replicas_sum_to_the_shared_audit_log(
    cred_config: dict[str, Any], llm_upstream: Upstream, pg_url: str, tmp_path: Path
) -> None:
    """Two replica processes on one PostgreSQL store, each serving its own /metrics: each counts
    what it committed; summed over the replicas (as `sum without (instance)` does) the counters
    are the shared audit log's."""
    ports = [free_port(), free_port()]
    first = fleet_config(tmp_path, {**cred_config, "metrics": {"listen": f"127.0.0.1:{ports[0]}"}}, pg_url)
    body = yaml.safe_load(first.path.read_text())  # the same CA, keys and store; its own metrics port
    body["metrics"]["listen"] = f"127.0.0.1:{ports[1]}"
    second = first.path.with_name("replica-2.yaml")
    second.write_text(yaml.safe_dump(body))
    replicas = [Replica.start(first), Replica.start(load_config(second))]
    try:
        fake = keys.mint(first, "researcher").env["OPENAI_API_KEY"]
        for i, replica in enumerate(replicas * 3):
            client = openai.OpenAI(
                api_key=fake,
                base_url=f"https://api.openai.com:{llm_upstream.port}/v1",
                max_retries=0,
                http_client=replica.client(),
            )
            client.chat.completions.create(model="gpt-4o-mini", max_tokens=i + 1, messages=[])
        rows = pg_rows(pg_url, expect=12)
        assert len(rows) == 12
        deadline = time.monotonic() + 10
        while True:
            scrapes = []
            for port in ports:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    scrapes.append(parse(response.read().decode()))
            total: collections.Counter[tuple[str, ...]] = collections.Counter()
            for samples in scrapes:
                got = series(samples, "egress_guard_requests_total", "kind", "decision", "service", "agent", "code")
                total.update({k: int(v) for k, v in got.items()})
            if {k: float(v) for k, v in total.items()} == expected_requests(rows) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert {k: float(v) for k, v in total.items()} == expected_requests(rows)
        each = [series(s, "egress_guard_requests_total", "kind") for s in scrapes]
        assert each == [{("connect",): 3, ("request",): 3}] * 2  # each replica counts only its own
        spent = sum(Decimal(r["cost_usd"]) for r in rows if r["cost_usd"])
        summed = sum(series(s, "egress_guard_spent_usd_total", "agent")[("researcher",)] for s in scrapes)
        assert summed == pytest.approx(float(spent))
    finally:
        for replica in replicas:
            replica.stop()


def test_upstream_timeout_is_counted(tmp_path: Path) -> None:
    """An upstream that accepts and reads the request but never answers: 504 after the
    response timeout, counted as the upstream's response_timeout (not as a refusal)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(silent.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    port = silent.getsockname()[1]
    config = write_config(
        tmp_path,
        {
            "allow": [{"host": "api.test.local", "ports": [port]}],
            "network": {"hosts": {"api.test.local": ["127.0.0.1"]}},
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        },
    )
    proxy = RunningProxy(config, timeouts=Timeouts(connect=1.0, tls=1.0, response=1.0, header=1.0)).start()
    try:
        with httpx.Client(proxy=proxy.url, trust_env=False, timeout=20) as plain:
            assert plain.get(f"http://api.test.local:{port}/").status_code == 504
        rows, samples, _ = matching(proxy, 1)
        assert [(r["decision"], r["status"]) for r in rows] == [("error", 504)]
        assert series(samples, "egress_guard_upstream_errors_total", "service", "reason") == {
            ("", "response_timeout"): 1
        }
        assert series(samples, "egress_guard_upstream_seconds_count", "service") == {}  # no answer to time
    finally:
        proxy.stop()
        silent.close()
        for conn in held:
            conn.close()
