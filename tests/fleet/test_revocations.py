"""Revocations across replicas: `kill` run from anywhere reaches every replica at once
(LISTEN/NOTIFY, polling as the backstop), and a replica that cannot confirm it is current
refuses keys (503) rather than serve them from a stale cache.

Real PostgreSQL (tests/fleet/conftest.py), real `egress-guard up` processes, the real CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from click.testing import CliRunner
from support.proxy import RunningProxy
from support.replicas import EG, Replica, fleet_config, free_port, pg_rows
from support.upstream import Upstream

from egress_guard import keys
from egress_guard.addons.killswitch import KillSwitch
from egress_guard.cli import main
from egress_guard.keycache import KeyCache
from egress_guard.store.postgres.listen import Listener, bounded
from egress_guard.timeutil import parse_iso


def http_client(proxy: RunningProxy) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=20)


def stream_until_cut(
    replica: Replica | RunningProxy, url: str, key: str, events: list[str], outcome: dict[str, Any]
) -> None:
    try:
        with (
            replica.client() if isinstance(replica, Replica) else http_client(replica) as client,
            client.stream("GET", url, headers={"Authorization": f"Bearer {key}"}) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
        outcome["ended"] = "cleanly"
    except httpx.HTTPError as exc:
        outcome["ended"] = f"cut: {type(exc).__name__}"
    outcome["at"] = time.time()


def kill_agent(replica: Replica, agent: str) -> subprocess.CompletedProcess[str]:
    """`egress-guard kill --agent` with a replica's config: its own process, as from another host."""
    return subprocess.run(
        [*EG, "kill", "--config", str(replica.config.path), "--agent", agent],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_kill_via_the_cli_cuts_an_open_stream_on_another_replica_within_1s(
    tmp_path: Path, pg_url: str, llm_upstream: Upstream, cred_config: dict[str, Any]
) -> None:
    config = fleet_config(tmp_path, cred_config, pg_url)
    key = keys.mint(config, "researcher").env["OPENAI_API_KEY"]
    first, second = Replica.start(config), Replica.start(config)
    try:
        slow = f"https://api.openai.com:{llm_upstream.port}/v1/slow"
        events: list[str] = []
        outcome: dict[str, Any] = {}
        reader = threading.Thread(target=stream_until_cut, args=(second, slow, key, events, outcome))
        reader.start()
        deadline = time.monotonic() + 15
        while len(events) < 3:
            assert time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.02)
        cli_started = time.time()
        result = kill_agent(first, "researcher")  # the CLI reaches the store, not a replica
        assert result.returncode == 0 and "revoked 1 key(s) of agent researcher" in result.stdout, result
        reader.join(5)
        assert not reader.is_alive() and str(outcome["ended"]).startswith("cut"), outcome
        with psycopg.connect(pg_url, autocommit=True) as conn:
            (written,) = conn.execute("SELECT ts FROM revocations").fetchone()  # type: ignore[misc]
        lag = outcome["at"] - parse_iso(written).timestamp()
        print(
            f"\nkill lag across replicas: stream cut {lag * 1000:.0f} ms after the revocation was written "
            f"({(outcome['at'] - cli_started) * 1000:.0f} ms after the CLI process started)"
        )
        assert lag < 1.0
        assert len(events) < 50  # the stream would have run for 20 s
        models = f"https://api.openai.com:{llm_upstream.port}/v1/models"
        for replica in (first, second):  # refused everywhere from now on
            with replica.client() as client:
                r = client.get(models, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 401 and "revoked" in r.text
    finally:
        first.stop()
        second.stop()
    applied = [line for line in second.log.read_text().splitlines() if "applied" in line and "revocation" in line]
    assert applied, second.log.read_text()


@pytest.fixture
def migrated(pg_url: str, tmp_path: Path, cred_config: dict[str, Any]) -> str:
    """`pg_url` with egress-guard's schema (opened once through the store, as `keys mint` does)."""
    config = fleet_config(tmp_path, cred_config, pg_url)
    keys.mint(config, "researcher")
    return pg_url


async def _wait(check: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.01)
    return bool(check())


def test_the_revocations_trigger_notifies_the_listener_and_it_reconnects(migrated: str) -> None:
    async def run() -> None:
        heard: list[tuple[float, str]] = []
        listener = Listener(lambda: migrated, "the test store", 1.0, application_name="egress-guard listener t")
        listener.on_notify.append(lambda payload: heard.append((time.monotonic(), payload)))
        await listener.start(wait=5)
        assert listener.connected and heard == [(heard[0][0], "")]  # catching up at connect
        conn = await psycopg.AsyncConnection.connect(migrated, autocommit=True)
        async with conn:
            written = time.monotonic()
            await conn.execute(
                "INSERT INTO revocations (ts, agent, reason) VALUES ('2026-01-01T00:00:00.000Z', 'a', 'test')"
            )
            assert await _wait(lambda: any(p.startswith("revocations:") for _, p in heard))
            at = next(t for t, p in heard if p.startswith("revocations:"))
            print(f"\nNOTIFY reached the listener {(at - written) * 1000:.1f} ms after the INSERT returned")
            assert at - written < 0.5
            await conn.execute(
                "INSERT INTO budgets (agent, scope, limit_usd, updated_at) VALUES ('a', 'day', '1', '2026-01-01T00:00:00Z')"
            )
            assert await _wait(lambda: any(p.startswith("budgets:") for _, p in heard))
            # the listener's connection dies (a failover, an idle-connection reaper): it reconnects
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                ("egress-guard listener t",),
            )
            assert await _wait(lambda: not listener.connected, 5)
            assert await _wait(lambda: listener.connected, 5)
            heard.clear()
            await conn.execute("INSERT INTO revocations (ts, agent) VALUES ('2026-01-01T00:00:00.000Z', 'b')")
            assert await _wait(lambda: any(p.startswith("revocations:") for _, p in heard))
        await listener.close()

    asyncio.run(run())


class _Engine:
    name = "postgresql://eg@db.example:5432/egress_guard"

    async def last_revocation(self) -> int:
        return 0

    async def revocations(self, after: int) -> list[Any]:
        return []


class _Ear:
    name = "postgresql://eg@db.example:5432/egress_guard"
    on_notify: list[Any] = []

    def __init__(self) -> None:
        self.down = 0.0

    def down_for(self) -> float:
        return self.down

    @property
    def reason(self) -> str:
        return f"store {self.name}: listener down for {self.down:.1f} s (connection refused)"

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def test_currency_listener_down_or_polls_failing_for_3s_refuses_keys() -> None:
    ear = _Ear()
    cache = KeyCache(_Engine(), ear)  # type: ignore[arg-type]
    assert cache.stale() is not None and "last successful revocations poll never" in str(cache.stale())
    asyncio.run(cache.open())
    assert cache.stale() is None
    ear.down = 2.5  # a reconnect in progress: polls still confirm
    assert cache.stale() is None
    ear.down = 3.5
    assert cache.stale() == (
        "cannot confirm revocations are current: store postgresql://eg@db.example:5432/egress_guard: "
        "listener down for 3.5 s (connection refused)"
    )
    ear.down = 0.0
    assert cache.polled is not None
    cache.polled -= 3.5
    cache.poll_error = "store postgresql://eg@db.example:5432/egress_guard did not answer within 2 s"
    assert cache.stale() == (
        "cannot confirm revocations are current: store postgresql://eg@db.example:5432/egress_guard: "
        "last successful revocations poll 3.5 s ago (store postgresql://eg@db.example:5432/egress_guard "
        "did not answer within 2 s)"
    )
    embedded = KeyCache(_Engine())  # type: ignore[arg-type]
    assert embedded.stale() is None  # the embedded store: no listener, no gate


def test_the_listener_never_shows_the_store_password(caplog: pytest.LogCaptureFixture) -> None:
    password = "Pw-0f-the-store-9f3a"

    async def run() -> str:
        port = free_port()  # nothing listens there
        listener = Listener(
            lambda: f"postgresql://eg:{password}@127.0.0.1:{port}/egress_guard", "postgresql://eg@127.0.0.1/x", 1.0
        )
        await listener.start()
        await _wait(lambda: listener.error not in (None, "not connected yet"), 5)
        reason = listener.reason
        await listener.close()
        return reason

    with caplog.at_level(logging.DEBUG):
        reason = asyncio.run(run())
    assert "listener down" in reason and "postgresql://eg@127.0.0.1/x" in reason
    assert password not in reason and password not in caplog.text


def test_bounded_abandons_a_call_to_a_frozen_server_at_its_timeout(migrated: str, pg_cluster: Any) -> None:
    async def run() -> float:
        conn = await psycopg.AsyncConnection.connect(migrated, autocommit=True)
        pg_cluster.sigstop()
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await bounded(conn, conn.execute("SELECT 1"), 0.5)
            return time.monotonic() - started
        finally:
            pg_cluster.sigcont()

    took = asyncio.run(run())
    assert took < 1.5  # asyncio.wait_for takes ~10.5 s here: psycopg's own cancel waits on the server


def _in_loop(proxy: RunningProxy, coro: Any) -> Any:
    assert proxy._loop is not None
    return asyncio.run_coroutine_threadsafe(coro, proxy._loop).result(10)


def _kill_switch(proxy: RunningProxy) -> KillSwitch:
    assert proxy.proxy is not None
    return next(t for t in proxy.proxy._background if isinstance(t, KillSwitch))


def test_a_notify_wakes_the_kill_switch_at_once_and_last_lag_says_how_late(
    make_proxy: Any, cred_config: dict[str, Any], real_env: Any, pg_url: str, llm_upstream: Upstream
) -> None:
    proxy = make_proxy(**cred_config, store={"url": pg_url})
    switch = _kill_switch(proxy)
    assert switch.keys.listener is not None and switch.last_lag is None and switch.current
    key = keys.mint(proxy.config, "researcher").env["OPENAI_API_KEY"]
    models = f"https://api.openai.com:{llm_upstream.port}/v1/models"
    auth = {"Authorization": f"Bearer {key}"}
    with http_client(proxy) as client:
        assert client.get(models, headers=auth).status_code == 200
        switch.interval = 30.0  # from its next tick: only a notification can make it poll sooner
        time.sleep(0.4)
        result = CliRunner().invoke(main, ["kill", "--config", str(proxy.config.path), "--agent", "researcher"])
        assert result.exit_code == 0, result.output
        assert wait_for(lambda: switch.last_lag is not None, 2.0), "no notification woke the kill switch"
        assert switch.last_lag is not None and switch.last_lag < 0.5 and switch.applied == 1
        r = client.get(models, headers=auth)
        assert r.status_code == 401 and "revoked" in r.text
        print(f"\nKillSwitch.last_lag after a NOTIFY (poll every 30 s): {switch.last_lag * 1000:.0f} ms")


def test_a_replica_that_cannot_hear_revocations_refuses_keys_503_until_it_can(
    make_proxy: Any,
    cred_config: dict[str, Any],
    real_env: Any,
    pg_url: str,
    llm_upstream: Upstream,
    upstream: Upstream,
) -> None:
    proxy = make_proxy(**cred_config, store={"url": pg_url})
    switch = _kill_switch(proxy)
    listener = switch.keys.listener
    assert isinstance(listener, Listener)
    key = keys.mint(proxy.config, "researcher").env["OPENAI_API_KEY"]
    models = f"https://api.openai.com:{llm_upstream.port}/v1/models"
    auth = {"Authorization": f"Bearer {key}"}
    slow = f"https://api.openai.com:{llm_upstream.port}/v1/slow"
    events: list[str] = []
    outcome: dict[str, Any] = {}
    reader = threading.Thread(target=stream_until_cut, args=(proxy, slow, key, events, outcome))
    reader.start()
    assert wait_for(lambda: len(events) >= 3, 15.0), "the stream did not start"
    with http_client(proxy) as client:
        assert client.get(models, headers=auth).status_code == 200
        deaf_at = time.time()
        _in_loop(proxy, listener.close())  # the listener is gone; polls still work
        assert client.get(models, headers=auth).status_code == 200  # within the grace period
        assert wait_for(lambda: not switch.current, 5.0)
        reader.join(5)  # the open stream is cut too: a revocation might be missed
        assert not reader.is_alive() and str(outcome["ended"]).startswith("cut"), outcome
        assert 3.0 <= outcome["at"] - deaf_at < 6.0, outcome["at"] - deaf_at
        # every connection that used a key was cut, this client's kept-alive one too: a new one
        client.close()
        client = http_client(proxy)
        r = client.get(models, headers=auth)
        assert r.status_code == 503, r.text
        store = f"store {pg_url}"
        assert re.search(
            rf"cannot confirm revocations are current: {re.escape(store)}: listener down for \d+\.\d s", r.text
        )
        assert "(stopped)" in r.text
        assert r.headers["x-egress-guard-reason"].startswith("cannot confirm revocations are current")
        r = client.get(f"https://api.test.local:{upstream.port}/")  # no service, no key: not gated
        assert r.status_code == 200
        _in_loop(proxy, listener.start(wait=5))  # heard again: served again, no restart
        assert switch.current
        assert client.get(models, headers=auth).status_code == 200
        client.close()
    proxy.stop()
    rows = pg_rows(pg_url, "kind = 'request' AND status = 503")
    assert len(rows) == 1 and rows[0]["credential"] == "error-store-unavailable", rows
    assert rows[0]["reason"].startswith("cannot confirm revocations are current")


def wait_for(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return bool(check())


def test_a_revocation_applied_while_a_key_is_being_read_is_not_lost() -> None:
    from egress_guard.fakekeys import KeyRecord
    from egress_guard.store import Revocation

    live = KeyRecord("k1", "researcher", "s1", ("openai",), "2026-01-01T00:00:00.000Z", "2099-01-01T00:00:00.000Z")
    revoked = dataclasses.replace(live, revoked_at="2026-01-02T00:00:00.000Z", revoked_reason="kill switch")

    class Racing:
        name = "test"
        reads = 0
        rev: list[Revocation] = []

        async def last_revocation(self) -> int:
            return 0

        async def revocations(self, after: int) -> list[Revocation]:
            return [r for r in self.rev if r.id > after]

        async def key(self, key_id: str) -> KeyRecord | None:
            self.reads += 1
            if self.reads == 1:  # the kill commits, and a poll applies it, while this read is on the wire
                self.rev = [Revocation(1, revoked.revoked_at or "", "researcher", None, None, "kill switch")]
                await cache.poll()
                return live
            return revoked

    engine = Racing()
    cache = KeyCache(engine)  # type: ignore[arg-type]
    asyncio.run(cache.open())
    record = asyncio.run(cache.lookup("k1"))
    assert record is not None and record.revoked_at is not None and engine.reads == 2
