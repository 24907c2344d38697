"""The PostgreSQL store on a real PostgreSQL 15 cluster: migrations (once, under a lock, by
many replicas at once), the engine's batch commit and reads, the proxy end to end."""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from support.clients import curl
from support.pg import PGCluster, pg_rows
from support.proxy import RunningProxy
from support.upstream import Upstream

from egress_guard.config.fleet import StoreSettings
from egress_guard.store import AuditRow, Batch, Intent, StoreError
from egress_guard.store.postgres import MIGRATIONS, PGEngine, PGStore


def settings(url: str, replica: str = "r1", timeout: float = 2.0) -> StoreSettings:
    return StoreSettings(url=url, replica=replica, timeout=timeout)


def row(request_id: str, **kw: Any) -> AuditRow:
    return AuditRow(
        ts=kw.pop("ts", "2026-01-02T03:04:05.678Z"), request_id=request_id, kind="request", decision="allow", **kw
    )


def test_migrations_run_once_when_many_replicas_start_together(pg_url: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            with PGStore(settings(pg_url), readonly=False) as store:
                results.append(store.migrate())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with psycopg.connect(pg_url) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
    assert names == [name for name, _ in MIGRATIONS]
    assert names[:9] == [
        "0001_audit",
        "0002_fake_keys",
        "0003_spend",
        "0004_spend_intents",
        "0005_websocket",
        "0006_spend_totals",
        "0007_hash_chain",
        "0008_fleet",
        "0009_order_and_floor",
    ]


def test_readonly_store_on_an_empty_database_says_so(pg_url: str) -> None:
    with pytest.raises(StoreError, match=r"store postgresql://eg@.* has no egress-guard tables"):
        PGStore(settings(pg_url))


def test_engine_commits_a_batch_in_one_transaction_and_reads_back(pg_url: str) -> None:
    async def main() -> None:
        engine = PGEngine(settings(pg_url))
        assert await engine.open() == 0
        try:
            batch = Batch(
                intents=[
                    Intent(
                        request_id="q1",
                        ts="2026-01-02T03:04:05.000Z",
                        agent="a",
                        session="s",
                        service="openai",
                        model="m",
                        day="2026-01-02",
                        reserved_usd="0.5",
                    )
                ],
                rows=[row("r1", agent="a", session="s", cost_usd="0.0030", duration_ms=1 / 3, path="/\udcff\x00")],
            )
            await engine.commit(batch)
            settle = Batch(
                rows=[row("q1", agent="a", session="s", cost_usd="0.001")], settles=["q1"], amends=[("r1", "cut")]
            )
            await engine.commit(settle)
            totals = await engine.totals()
            assert [(t.agent, t.session, t.day, t.usd) for t in totals] == [("a", "s", "2026-01-02", Decimal("0.0040"))]
            assert await engine.spent_since("2026-01-01T00:00:00.000Z") == {"a": Decimal("0.0040")}
        finally:
            await engine.close()

    asyncio.run(main())
    with PGStore(settings(pg_url)) as store:
        rows = store.rows(store_filters(), None)
        assert [r["request_id"] for r in rows] == ["r1", "q1"]
        assert rows[0]["duration_ms"] == 1 / 3  # exact round trip (the chain's hashes need it)
        assert rows[0]["path"] == "/" + "\ufffd" * 4  # a lone surrogate and a NUL cannot stop the log
        assert (rows[0]["decision"], rows[0]["reason"]) == ("error", "cut")
        assert store.totals()[0].usd == Decimal("0.0040")
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM spend_intents").fetchone() == (0,)


def store_filters() -> Any:
    from egress_guard.store import Filters

    return Filters()


def test_open_settles_only_this_replicas_leftover_intents(pg_url: str) -> None:
    async def main() -> None:
        for replica in ("r1", "r2"):
            engine = PGEngine(settings(pg_url, replica))
            await engine.open()
            intent = Intent(
                request_id=f"left-{replica}",
                ts="2026-01-02T03:04:05.000Z",
                agent="a",
                session=None,
                service="openai",
                model="m",
                day="2026-01-02",
                reserved_usd="0.25",
            )
            await engine.commit(Batch(intents=[intent]))
            await engine.close()
        again = PGEngine(settings(pg_url, "r1"))
        assert await again.open() == 1
        await again.close()

    asyncio.run(main())
    rows = pg_rows(pg_url)
    assert [(r["request_id"], r["cost_usd"]) for r in rows] == [("left-r1", "0.25")]
    assert rows[0]["reason"].startswith("settled at its reservation")
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT request_id, replica FROM spend_intents").fetchall() == [("left-r2", "r2")]


def test_unreachable_store_fails_naming_it_without_the_password(tmp_path: Path, pg_cluster: PGCluster) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2-very-secret\n")
    dead = f"postgresql://eg@127.0.0.1:{free_port()}/egress_guard"
    store = StoreSettings(url=dead, password_file=secret, replica="r1", timeout=1.0)
    with pytest.raises(StoreError) as caught:
        PGStore(store)
    assert str(caught.value).startswith(f"store {dead} is unreachable: ")
    assert "hunter2" not in str(caught.value) and "hunter2" not in repr(store)

    async def main() -> str:
        engine = PGEngine(store)
        assert "hunter2" not in repr(engine)
        try:
            await engine.open()
        except StoreError as exc:
            return str(exc)
        raise AssertionError("opened a dead store")

    message = asyncio.run(main())
    assert message.startswith(f"store {dead} is unreachable") and "hunter2" not in message


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_proxy_on_postgresql_serves_and_records(make_proxy: Any, upstream: Upstream, pg_url: str) -> None:
    proxy: RunningProxy = make_proxy(store=pg_url)
    status, _, _ = curl(proxy, f"https://api.test.local:{upstream.port}/json")
    assert status == 200
    status, _, _ = curl(proxy, f"https://other.test.local:{upstream.port}/json")
    assert status == 403
    rows = pg_rows(pg_url, expect=3)
    assert [(r["kind"], r["decision"], r["host"]) for r in rows] == [
        ("connect", "allow", "api.test.local"),
        ("request", "allow", "api.test.local"),
        ("connect", "deny", "other.test.local"),
    ]
    assert not (proxy.config.audit_path.exists() and sqlite_rows(proxy.config.audit_path))  # nothing went to SQLite


def sqlite_rows(path: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def verify(url: str) -> Any:
    from egress_guard.store.chain import Verifier

    with PGStore(settings(url)) as store:
        verifier = Verifier(starts=store.chain_starts())
        for record in store.audit_chain():
            verifier.feed(record)
    verifier.finish()
    return verifier


def test_writer_chains_rows_amends_keep_the_original_and_prune_keeps_chains_whole(pg_url: str) -> None:
    from egress_guard.store import AuditLog

    async def run_replica(replica: str, first: int, n: int, leftover: bool = False) -> None:
        engine = PGEngine(settings(pg_url, replica))
        log = AuditLog(engine, batch_delay=0)
        await log.open()
        numbers = [
            log.record(row(f"{replica}-{i}", ts=f"2026-01-{1 + i // 10:02d}T00:00:00.000Z", duration_ms=i / 7))
            for i in range(first, first + n)
        ]
        await log.durable(numbers[-1])
        log.amend(numbers[0], f"{replica}-{first}", "response cut")
        if leftover:
            intent = Intent(
                request_id=f"{replica}-left",
                ts="2026-01-09T00:00:00.000Z",
                agent="a",
                session=None,
                service="openai",
                model="m",
                day="2026-01-09",
                reserved_usd="0.25",
            )
            await log.intent(intent)
        await log.close()

    asyncio.run(run_replica("r1", 0, 25, leftover=True))
    asyncio.run(run_replica("r2", 0, 15))
    asyncio.run(run_replica("r1", 25, 10))  # reopened: settles its leftover, then continues its chain
    v = verify(pg_url)
    assert v.ok, v.problems
    assert v.rows == 25 + 15 + 10 + 1 and v.unchained == 0
    assert {name: (s.seq, s.amended) for name, s in v.chains.items()} == {"r1": (36, 2), "r2": (15, 1)}
    with PGStore(settings(pg_url), readonly=False) as store:
        assert store.prune("2026-01-02T00:00:00.000Z") == 20  # r1-0..9 and r2-0..9
        assert {name: seq for name, (seq, _) in store.chain_starts().items()} == {"r1": 10, "r2": 10}
    v = verify(pg_url)
    assert v.ok, v.problems
    assert v.rows == 51 - 20
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE audit SET status = 201 WHERE request_id = 'r2-12'")
    v = verify(pg_url)
    assert not v.ok and "hash mismatch" in v.problems[0]


def test_engine_fails_within_its_timeout_when_the_server_stops_and_recovers_by_itself(tmp_path: Path) -> None:
    """SIGSTOP (nothing answers), then SIGKILL and a restart: every call fails within the
    store's timeout with a StoreError naming the store, and works again without a reopen."""
    import time

    cluster = PGCluster.start(Path("/tmp"))
    try:
        url = cluster.new_database()

        async def timed(call: Any) -> tuple[float, BaseException | None]:
            started = time.monotonic()
            try:
                await call
            except BaseException as exc:
                return time.monotonic() - started, exc
            return time.monotonic() - started, None

        async def main() -> None:
            engine = PGEngine(settings(url, timeout=1.0))
            await engine.open()
            try:
                assert await engine.key("nope") is None
                cluster.sigstop()
                try:
                    for call in (engine.key("k"), engine.revocations(0), engine.commit(Batch(rows=[row("x")]))):
                        took, exc = await timed(call)
                        assert isinstance(exc, StoreError) and took < 1.5, (took, exc)
                        assert str(exc) == f"store {url} is unreachable: no answer within 1 s"
                    # a burst of calls, more than the pool holds: each fails on time
                    burst = await asyncio.gather(*(timed(engine.key(f"k{i}")) for i in range(20)))
                    assert all(isinstance(exc, StoreError) and took < 1.5 for took, exc in burst), burst
                finally:
                    cluster.sigcont()
                resumed = time.monotonic()
                # back at once, no reopen: abandoned calls closed their connections, none holds a slot
                while (await timed(engine.key("k")))[1] is not None:
                    await asyncio.sleep(0.05)
                assert time.monotonic() - resumed < 1.5
                await engine.commit(Batch(rows=[row("after-stop")]))
                cluster.kill9()
                down = time.monotonic()
                while time.monotonic() - down < 4:  # an outage of 4 s, with calls failing all along
                    took, exc = await timed(engine.key("k"))
                    assert (
                        isinstance(exc, StoreError)
                        and took < 1.5
                        and str(exc).startswith(f"store {url} is unreachable")
                    )
                    await asyncio.sleep(0.1)
                cluster.restart()
                up = time.monotonic()
                while (await timed(engine.key("k")))[1] is not None:
                    await asyncio.sleep(0.05)
                recovered = time.monotonic() - up
                print(f"recovered {recovered:.2f} s after the restart")
                assert recovered < 2.5  # the pool's reconnection backoff is capped (1 s), not ~the outage
                await engine.commit(Batch(rows=[row("after-restart")]))
                assert engine.read_failures >= 3
            finally:
                await engine.close()

        asyncio.run(main())
        # "x" failed on time; it may still have landed (SIGSTOP reaches the server's processes
        # asynchronously: a backend can finish the commit it was reading first). Never twice.
        ids = [r["request_id"] for r in pg_rows(url)]
        assert ids in (["after-stop", "after-restart"], ["x", "after-stop", "after-restart"]), ids
    finally:
        cluster.stop()


def test_two_replicas_on_one_chain_fail_closed_and_a_landed_retry_is_not_written_twice(pg_url: str) -> None:
    async def main() -> None:
        one, two = PGEngine(settings(pg_url, "same")), PGEngine(settings(pg_url, "same"))
        await one.open()
        await two.open()
        try:
            await one.commit(Batch(rows=[row("a")], links=[("same", 1, "h1")]))
            intent = Intent(
                request_id="b",
                ts="2026-01-02T03:04:05.000Z",
                agent="a",
                session=None,
                service="openai",
                model="m",
                day="2026-01-02",
                reserved_usd="0.25",
            )
            with pytest.raises(StoreError, match=r"do two replicas write chain same\? give each its own `replica:`"):
                await two.commit(
                    Batch(intents=[intent], rows=[row("b", cost_usd="1", agent="a")], links=[("same", 1, "h2")])
                )
            # all or nothing: the failed batch's intent and running total are not there either
            await two.commit(Batch(rows=[row("d")]))  # and the connection is usable again
            # the writer's retry of a batch whose COMMIT went unanswered but did land, with one
            # more row queued since: the landed part is not written twice, the rest is
            landed = Batch(rows=[row("a")], links=[("same", 1, "h1")])
            one._unsure = [landed]
            await one.commit(Batch(rows=[*landed.rows, row("c")], links=[*landed.links, ("same", 2, "h3")]))
            lost = Batch(rows=[row("e")], links=[("same", 3, "h4")])
            one._unsure = [lost]  # unanswered, not landed
            await one.commit(lost)
        finally:
            await one.close()
            await two.close()

    asyncio.run(main())
    assert [(r["request_id"], r["chain_seq"]) for r in pg_rows(pg_url)] == [("a", 1), ("d", None), ("c", 2), ("e", 3)]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM spend_intents").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM spend_totals").fetchone() == (0,)


def test_password_from_a_file_reaches_the_server_and_never_a_message_log_or_row(
    tmp_path: Path, make_proxy: Any, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A cluster that wants a password over TCP: the proxy and the CLI connect with the one in
    store.password_file; a wrong one fails naming the store; the password is nowhere."""
    import logging

    from click.testing import CliRunner

    from egress_guard.cli import main as cli

    password = "Tr0ub4dor&3-sw0rdfish 'quoted'"
    cluster = PGCluster.start(Path("/tmp"), password=password)
    caplog.set_level(logging.DEBUG)
    try:
        url = cluster.new_database()
        secret = tmp_path / "pg-password"
        secret.write_text(password + "\n")
        proxy: RunningProxy = make_proxy(store={"url": url, "password_file": str(secret), "replica": "pw-1"})
        status, _, _ = curl(proxy, f"https://api.test.local:{upstream.port}/json")
        assert status == 200
        cfg = str(proxy.config.path)
        listed = CliRunner().invoke(cli, ["audit", "--config", cfg, "--format", "json"])
        assert listed.exit_code == 0 and len(json_rows(listed.output)) >= 1
        proxy.stop()

        secret.write_text("wrong-" + password)
        wrong = CliRunner().invoke(cli, ["audit", "--config", cfg])
        assert wrong.exit_code == 1 and f"store {url} is unreachable" in wrong.output
        assert "password authentication failed" in wrong.output and "sw0rdfish" not in wrong.output
        with pytest.raises(Exception, match=rf"store {url} is unreachable: .*password authentication failed") as caught:
            make_proxy(store={"url": url, "password_file": str(secret), "replica": "pw-2"})
        assert "sw0rdfish" not in str(caught.value)
        rows = pg_rows_admin(cluster, url)
        assert rows and not any("sw0rdfish" in str(r) for r in rows)
        assert "sw0rdfish" not in caplog.text
    finally:
        cluster.stop()


def json_rows(text: str) -> list[Any]:
    import json

    return list(json.loads(text))


def pg_rows_admin(cluster: PGCluster, url: str) -> list[tuple[Any, ...]]:
    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(host=str(cluster.data), port=cluster.port, user="eg", dbname=dbname) as conn:
        return conn.execute("SELECT * FROM audit").fetchall()


def test_a_landed_batch_amended_before_its_retry_is_stored_as_the_writer_chains_it(pg_url: str) -> None:
    """A COMMIT whose answer was lost did commit; meanwhile the writer amended a row of it
    (its response was cut); the retry, one row longer, keeps the chain verifiable."""
    from egress_guard.store import chain as chainmod

    async def main() -> None:
        engine = PGEngine(settings(pg_url, "r1"))
        await engine.open()
        try:
            rows = [row("a"), row("b", reason="allowed")]
            landed = Batch(rows=rows)
            landed.links, _ = chainmod.link("r1", (0, ""), rows)
            await engine.commit(landed)
            # as if its COMMIT had gone unanswered, and a retry's too (that one did not land)
            engine._unsure = [landed, Batch(rows=[*rows, row("x")], links=[*landed.links, ("r1", 3, "f" * 64)])]
            rows[1].decision, rows[1].reason = "error", "allowed; response cut off"  # AuditLog.amend, in place
            retry = Batch(rows=[*rows, row("c")])
            retry.links, _ = chainmod.link("r1", (0, ""), retry.rows)
            await engine.commit(retry)
        finally:
            await engine.close()

    asyncio.run(main())
    v = verify(pg_url)
    assert v.ok, v.problems
    stored = pg_rows(pg_url)
    assert [(r["request_id"], r["chain_seq"], r["decision"]) for r in stored] == [
        ("a", 1, "allow"),
        ("b", 2, "error"),
        ("c", 3, "allow"),
    ]


def test_work_the_proxy_gave_up_on_dies_on_the_server_too(pg_url: str) -> None:
    """A call past its deadline is abandoned by the replica; on the server it must not wait on
    behind a lock and commit later (a 'refused' admission that still reserves, a pile of
    backends waiting): the proxy's connections carry a lock_timeout (and statement and
    idle-in-transaction timeouts) of their own."""

    async def main() -> None:
        engine = PGEngine(settings(pg_url, timeout=1.0))
        await engine.open()
        holder = await psycopg.AsyncConnection.connect(pg_url)  # another replica, stopped mid-transaction
        try:
            await holder.execute("INSERT INTO agent_usage (agent) VALUES ('frank')")
            await holder.commit()
            await holder.execute("SELECT * FROM agent_usage WHERE agent = 'frank' FOR UPDATE")

            async def bump(conn: Any) -> None:
                await conn.execute("UPDATE agent_usage SET inflight = inflight + 1 WHERE agent = 'frank'")

            results = await asyncio.gather(*(engine.run(bump) for _ in range(6)), return_exceptions=True)
            assert all(isinstance(r, StoreError) for r in results), results
            await asyncio.sleep(1.2)  # a wait that began as late as the deadline has met its lock_timeout
            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as probe:
                cur = await probe.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
                assert (await cur.fetchone()) == (0,)  # nobody still waits behind the lock
                await holder.rollback()  # the lock goes: none of the abandoned updates may land
                await asyncio.sleep(0.3)
                cur = await probe.execute("SELECT inflight FROM agent_usage WHERE agent = 'frank'")
                assert (await cur.fetchone()) == (0,)
        finally:
            await holder.close()
            await engine.close()

    asyncio.run(main())
