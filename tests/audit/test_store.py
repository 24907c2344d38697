"""The store on real SQLite files: running totals kept with each priced row and filled once
from history, budgets read from them (not from the log), retention that budgets survive,
reservations written as changes, typed writes, planner statistics, connections closed."""

from __future__ import annotations

import datetime
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
from test_audit_log import row
from test_durable import intent, select

from egress_guard import spend_report
from egress_guard.bootstrap import init
from egress_guard.config import Config, load_config
from egress_guard.fakekeys import KeyRecord
from egress_guard.store import (
    COLUMNS,
    AuditLog,
    Batch,
    Filters,
    InsertKey,
    Reservations,
    ResetBudget,
    RevokeKeys,
    SetBudget,
    Spent,
    SQLiteStore,
    StoreError,
    migrate,
    open_store,
)
from egress_guard.store.sqlite import MIGRATIONS, schema, writes
from egress_guard.timeutil import iso, now_iso, utcnow

TODAY = now_iso()
LONG_AGO = "2026-01-02T03:04:05.678Z"


def priced(i: int, agent: str = "agent", session: str | None = "s1", usd: str = "0.1", ts: str = TODAY):
    return row(i, agent=agent, session=session, cost_usd=usd, ts=ts, service="openai", model="gpt-4o-mini")


async def write(db: Path, *rows) -> None:
    log = AuditLog(db)
    await log.open()
    for r in rows:
        log.record(r)
    assert await log.close() == 0


@pytest.fixture
def config(tmp_path: Path) -> Config:
    init(tmp_path)  # the default config: agent "agent", budgets session 5, day 20
    return load_config(tmp_path / "egress-guard.yaml")


async def test_each_priced_row_adds_to_its_running_total_exactly(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    await write(
        db,
        priced(1, usd="0.1"),
        priced(2, usd="0.2"),  # 0.1 + 0.2 is 0.3 here, not 0.30000000000000004
        priced(3, session=None, usd="0.000001"),
        priced(4, ts=LONG_AGO, usd="1.5"),
        priced(5, agent="other", usd="2"),
        row(6, agent="agent", session="s1"),  # not priced: no total
        row(7, cost_usd="9"),  # priced but no agent: no budget to count against
    )
    with SQLiteStore(db) as store:
        totals = sorted(store.totals(), key=lambda t: (t.agent, t.session, t.day))
    assert totals == [
        Spent("agent", "", TODAY[:10], Decimal("0.000001")),
        Spent("agent", "s1", LONG_AGO[:10], Decimal("1.5")),
        Spent("agent", "s1", TODAY[:10], Decimal("0.3")),
        Spent("other", "s1", TODAY[:10], Decimal("2")),
    ]
    assert select(
        db, "SELECT usd FROM spend_totals WHERE agent = 'agent' AND session = 's1' AND day = '%s'" % TODAY[:10]
    ) == [("0.3",)]


async def test_a_row_whose_cost_or_agent_is_unusual_never_stops_the_log(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db)
    await log.open()
    for i, (agent, usd) in enumerate([("bot", "not a number"), ("bot", "NaN"), ("b\udcffot", "0.5")]):
        await log.durable(log.record(priced(i, agent=agent, usd=usd)))
    await log.durable(log.record(priced(9, agent="bot", usd="0.25")))
    assert await log.close() == 0
    assert select(db, "SELECT COUNT(*) FROM audit") == [(4,)]
    with SQLiteStore(db) as store:
        assert sorted((t.agent, t.usd) for t in store.totals()) == [
            ("bot", Decimal("0.25")),
            (writes.bindable(("b\udcffot",))[0], Decimal("0.5")),  # as the row itself names it
        ]


async def test_an_intent_settled_at_start_counts_in_the_totals(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db)
    await log.open()
    await log.intent(intent("r-gone", "0.5"))
    log._open_intents.clear()  # as if the proxy stopped here: a new start settles it
    await log.close()
    await write(db)
    with SQLiteStore(db) as store:
        assert store.totals() == [Spent("bot", "s1", "2026-11-22", Decimal("0.5"))]


async def test_migration_0006_fills_the_totals_from_the_log_once(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    conn = schema.connect(db)  # a log of the schema before 0006, with history in it
    conn.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    for name, sql in MIGRATIONS[:5]:
        with schema.transaction(conn):
            for statement in schema._statements(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (name, TODAY))
    for r in [priced(1), priced(2, usd="0.25"), priced(3, ts=LONG_AGO), priced(4, agent="b")]:
        values = writes.bind(Batch(rows=[r])).rows[0][: len(COLUMNS) - 1]  # no chain columns before 0007
        conn.execute(f"INSERT INTO audit ({', '.join(COLUMNS[1:])}) VALUES ({', '.join('?' * len(values))})", values)
    conn.close()
    with SQLiteStore(db) as old:  # before it is migrated, a command counts the rows itself
        before = sorted(old.totals(), key=lambda t: (t.agent, t.day))
    assert migrate(db) == ["0006_spend_totals", "0007_hash_chain", "0008_fleet", "0009_order_and_floor", "0010_policy"]
    with SQLiteStore(db) as store:
        assert (
            sorted(store.totals(), key=lambda t: (t.agent, t.day))
            == before
            == [
                Spent("agent", "s1", LONG_AGO[:10], Decimal("0.1")),
                Spent("agent", "s1", TODAY[:10], Decimal("0.35")),
                Spent("b", "s1", TODAY[:10], Decimal("0.1")),
            ]
        )
    assert migrate(db) == []


async def test_budget_show_reads_the_totals_and_the_days_rows_not_the_log(tmp_path: Path, config: Config) -> None:
    db = config.audit_path
    await write(db, priced(1, usd="1"), priced(2, usd="0.5", session="s2"), priced(3, ts=LONG_AGO, usd="3"))
    with sqlite3.connect(db) as conn:  # a row the totals do not know of (written behind the store's back)...
        conn.execute(
            "INSERT INTO audit (ts, request_id, kind, agent, session, decision, cost_usd) "
            "VALUES (?, 'x', 'request', 'agent', 's1', 'allow', '100')",
            (LONG_AGO,),
        )
    conn.close()
    with open_store(config) as store:
        rows = {(r["scope"], r["key"]): r for r in spend_report.budget_rows(store, config, None)}
    # ...counts in no budget: the session and total budgets read the running totals, and
    # the day budget reads only the open day's rows
    assert rows[("total", "agent")]["spent_usd"] == "4.5"
    assert rows[("day", TODAY[:10])]["spent_usd"] == "1.5"
    assert rows[("day", TODAY[:10])]["remaining_usd"] == "18.5"


async def test_prune_deletes_old_rows_and_the_budgets_do_not_move(tmp_path: Path, config: Config) -> None:
    db = config.audit_path
    now = utcnow()
    old = iso(now - datetime.timedelta(days=40))
    await write(db, priced(1, ts=old, usd="2"), row(2, ts=old), priced(3, usd="1"), row(4))
    log = AuditLog(db)
    await log.open()
    await log.intent(intent("r-flight", "0.5"))  # a call in flight: its intent is not the log's to prune
    with open_store(config) as store:
        shown = spend_report.budget_rows(store, config, None)
    before, clamped = spend_report.prune_before(config.spend, 30 * 86400, now)
    assert before == iso(now - datetime.timedelta(days=30)) and not clamped
    with open_store(config, write=True) as store:
        assert store.count(Filters(until=before)) == 2
        assert store.prune(before) == 2
        assert [r["request_id"] for r in store.rows(Filters(), None)] == ["r3", "r4"]
        assert spend_report.budget_rows(store, config, None) == shown
    assert select(db, "SELECT request_id FROM spend_intents") == [("r-flight",)]
    await log.close()


def test_prune_never_reaches_into_the_open_budget_day(config: Config) -> None:
    now = datetime.datetime(2026, 11, 22, 9, 30, tzinfo=datetime.UTC)
    assert spend_report.prune_before(config.spend, 3600, now) == ("2026-11-22T00:00:00.000Z", True)
    assert spend_report.prune_before(config.spend, 86400, now) == ("2026-11-21T09:30:00.000Z", False)
    tokyo = type(config.spend)(timezone="Asia/Tokyo")  # its day began at 15:00 UTC the day before
    assert spend_report.prune_before(tokyo, 3600, now) == ("2026-11-21T15:00:00.000Z", True)


async def test_prune_in_chunks_while_the_proxy_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from egress_guard.store.sqlite import queries

    monkeypatch.setattr(queries, "PRUNE_CHUNK", 7)
    db = tmp_path / "a.db"
    await write(db, *(row(i, ts=LONG_AGO) for i in range(50)))
    log = AuditLog(db)
    await log.open()
    with SQLiteStore(db, readonly=False) as store:
        assert store.prune("2026-06-01T00:00:00.000Z") == 50
    await log.durable(log.record(row(99)))  # the writer was never shut out
    assert select(db, "SELECT request_id FROM audit") == [("r99",)]
    await log.close()


async def test_reservations_are_written_as_changes(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db)
    await log.open()
    changes = [
        Reservations((("day:a/2026-11-22", Decimal("0.5")), ("total:a", Decimal("0.5"))), (), "t1"),
        Reservations((("total:a", Decimal("0.75")),), ("day:a/2026-11-22",), "t2"),
    ]
    for change in changes:
        await log.durable(log.submit(change))
    assert select(db, "SELECT key, usd, updated_at FROM budget_reserved") == [("total:a", "0.75", "t2")]
    await log.close()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO budget_reserved VALUES ('day:a/2026-11-21', '9', 't0')")
    conn.close()
    await write(db)  # a new run's reservations start empty: a stopped one holds none
    assert select(db, "SELECT key FROM budget_reserved") == []


def test_typed_writes_for_budgets_and_keys(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "a.db", readonly=False) as store:
        assert store.write(SetBudget("a", "day", Decimal("2.50"), TODAY)) == 1
        assert store.write(SetBudget("a", "day", Decimal(3), TODAY)) == 1
        assert store.overrides() == {("a", "day"): Decimal(3)}
        assert store.write(ResetBudget("a", "day")) == 1
        assert store.write(ResetBudget("a", "day")) == 0
        assert store.write(RevokeKeys("gone", TODAY, agent="a")) == 0  # no key yet; the revocation is recorded
        key = KeyRecord("k1", "a", "s1", ("openai", "anthropic"), TODAY, "2999-01-01T00:00:00.000Z")
        assert store.write(InsertKey(key)) == 1
        assert store.keys("a") == [key] and store.keys("b") == []
        assert store.live_sessions(TODAY) == [("a", "s1")]
        assert store.write(RevokeKeys("leaked", TODAY, key_id="k1")) == 1
        assert store.keys()[0].revoked_reason == "leaked" and store.live_sessions(TODAY) == []
    assert select(tmp_path / "a.db", "SELECT agent, key_id, reason FROM revocations") == [
        ("a", None, "gone"),
        (None, "k1", "leaked"),
    ]
    with pytest.raises(ValueError, match="exactly one"):
        RevokeKeys("x", TODAY, agent="a", key_id="k1")  # agent and session together is one agent's session


async def test_the_writer_gives_the_planner_statistics(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    await write(db, *(row(i, ts=f"2026-11-{1 + i % 20:02d}T10:00:00.000Z", host=f"h{i % 30}") for i in range(3000)))
    await write(db)  # the next start finds 3000 rows and no statistics: it takes them
    assert select(db, "SELECT COUNT(*) FROM sqlite_stat1 WHERE tbl = 'audit'")[0][0] > 0
    conn = sqlite3.connect(db)
    plan = " ".join(
        r[3]
        for r in conn.execute("EXPLAIN QUERY PLAN SELECT COUNT(*) FROM audit WHERE ts >= '2026-11-20' GROUP BY host")
    )
    conn.close()
    assert "SEARCH" in plan and "ts>?" in plan, plan  # the window, not a walk of a whole index


def test_a_command_closes_its_connection_and_names_a_db_it_cannot_open(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "a.db", readonly=False) as store:
        conn = store._conn
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        conn.execute("SELECT 1")
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match=r"cannot open .*file/a\.db"):
        SQLiteStore(tmp_path / "file" / "a.db", readonly=False)
