"""The tamper-evident audit log on real SQLite files: the proxy's writer chains every row, and
`egress-guard audit verify` (the real CLI) names the row a hand-written SQL statement edited,
inserted or deleted; anchors from the proxy's log catch a rewritten table and a cut tail."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_audit_log import row

from egress_guard.cli import main
from egress_guard.store import AuditLog, Batch, Intent, SQLiteEngine, SQLiteStore, chain
from egress_guard.store.records import AuditRow
from egress_guard.timeutil import now_iso


def verify(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        main, ["audit", "verify", "--config", str(home / "egress-guard.yaml"), *args], catch_exceptions=False
    )
    return result.exit_code, result.output


@pytest.fixture
def home(tmp_path: Path) -> Path:
    result = CliRunner().invoke(main, ["init", "--dir", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp_path


def db_of(home: Path) -> Path:
    return home / "egress-guard.db"


async def write_rows(db: Path, n: int, *, start: int = 0, amend: int | None = None) -> AuditLog:
    """n rows through the proxy's writer (several commits), optionally amending row `amend`
    after its commit (a response cut once its row was already written)."""
    log = AuditLog(db)
    await log.open()
    numbers = {}
    for i in range(start, start + n):
        numbers[i] = log.record(row(i, host=f"h{i % 3}.test", duration_ms=i * 1.5, reason="ok" if i % 2 else None))
        if i % 4 == 3:
            await log.durable(numbers[i])
    if amend is not None:
        await log.durable(numbers[amend])
        log.amend(numbers[amend], f"r{amend}", "response cut: audit log unavailable")
    assert await log.close() == 0
    return log


def sql(db: Path, statement: str, *args: Any) -> None:
    conn = sqlite3.connect(db)
    conn.execute(statement, args)
    conn.commit()
    conn.close()


# --- the chain itself -------------------------------------------------------------------


def test_link_is_deterministic_and_covers_every_field() -> None:
    rows = [row(1, ts="2026-11-22T10:00:00.000Z"), row(2, ts="2026-11-22T10:00:01.000Z")]
    links, head = chain.link("local", (0, ""), rows)
    assert [(c, s) for c, s, _ in links] == [("local", 1), ("local", 2)]
    assert head == (2, links[1][2])
    again, _ = chain.link("local", (0, ""), [row(1, ts="2026-11-22T10:00:00.000Z")])
    assert again[0] == links[0]
    for name in chain.FIELDS:  # change any one field and the hash changes
        changed = row(1, ts="2026-11-22T10:00:00.000Z")
        value = getattr(changed, name)
        setattr(changed, name, 7 if not isinstance(value, str) else value + "x")
        assert chain.link("local", (0, ""), [changed])[0][0] != links[0], name
    assert chain.link("other", (0, ""), [row(1, ts="2026-11-22T10:00:00.000Z")])[0][0] != links[0]


def test_normalize_makes_values_what_the_db_returns() -> None:
    r = AuditRow(ts="t", request_id="x\x00y", kind="request", decision="allow", path="/a\udcff", duration_ms=5)
    r.port = 443.0  # type: ignore[assignment]
    chain.normalize(r)
    assert r.request_id == "x\ufffdy" and "\udcff" not in (r.path or "") and r.path is not None
    assert r.duration_ms == 5.0 and isinstance(r.duration_ms, float)
    assert r.port == 443 and isinstance(r.port, int)
    r.duration_ms = float("nan")
    chain.normalize(r)
    assert r.duration_ms is None


# --- the writer and verify ---------------------------------------------------------------


async def test_writer_chains_every_row_and_verify_passes(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "egress_guard.audit")
    await write_rows(db_of(home), 20, amend=5)
    await write_rows(db_of(home), 5, start=20)  # a second run continues the chain
    code, out = verify(home)
    assert code == 0, out
    assert "ok: 25 rows in 1 chains" in out
    assert "chain local: 25 rows, head seq 25" in out and "1 amended" in out and "ids 6" in out
    conn = sqlite3.connect(db_of(home))
    seqs = [r[0] for r in conn.execute("SELECT chain_seq FROM audit ORDER BY id")]
    amended = conn.execute("SELECT decision, reason, amended_from FROM audit WHERE request_id = 'r5'").fetchone()
    conn.close()
    assert seqs == list(range(1, 26))
    assert amended[0] == "error" and amended[1] == "ok; response cut: audit log unavailable"
    assert json.loads(amended[2]) == {"decision": "allow", "reason": "ok"}
    anchors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit anchor:")]
    assert len(anchors) == 3  # at close, at the second open (the same head: logged again), at close
    assert "chain=local seq=25 hash=" in anchors[-1]
    code, out = verify(home, "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["chains"]["local"]["head_seq"] == 25
    assert report["amended_ids"] == [6]


async def test_an_edited_row_is_named(home: Path) -> None:
    await write_rows(db_of(home), 12)
    sql(db_of(home), "UPDATE audit SET host = 'evil.example' WHERE id = 7")
    code, out = verify(home)
    assert code == 1
    assert "FAILED: row id 7: chain local seq 7: hash mismatch" in out
    assert out.count("FAILED: row") == 1  # its successor still chains from its stored hash


async def test_a_deleted_row_is_named(home: Path) -> None:
    await write_rows(db_of(home), 12)
    sql(db_of(home), "DELETE FROM audit WHERE id = 7")
    code, out = verify(home)
    assert code == 1
    assert "FAILED: row id 8: chain local seq 8 follows seq 6: seq 7 missing (deleted?)" in out


async def test_an_inserted_row_is_named(home: Path) -> None:
    await write_rows(db_of(home), 12)
    sql(
        db_of(home),
        "INSERT INTO audit (ts, request_id, kind, decision, host) VALUES (?, 'forged', 'request', 'allow', 'x')",
        now_iso(),
    )
    code, out = verify(home)
    assert code == 1
    assert "FAILED: row id 13: has no chain, after chained rows" in out


async def test_an_inserted_row_with_a_copied_seq_is_named(home: Path) -> None:
    await write_rows(db_of(home), 12)
    sql(db_of(home), "DROP INDEX audit_chain_seq")  # the unique index refuses it otherwise
    sql(
        db_of(home),
        "INSERT INTO audit (ts, request_id, kind, decision, chain, chain_seq, hash) "
        "SELECT ts, 'forged', kind, decision, chain, chain_seq, hash FROM audit WHERE id = 12",
    )
    code, out = verify(home)
    assert code == 1
    assert "FAILED: row id 13: chain local seq 12 after seq 12: a duplicate or out-of-order row" in out


async def test_an_amendment_other_than_the_proxys_is_named(home: Path) -> None:
    await write_rows(db_of(home), 8, amend=3)
    assert verify(home)[0] == 0
    sql(db_of(home), "UPDATE audit SET decision = 'allow' WHERE request_id = 'r3'")
    code, out = verify(home)
    assert code == 1 and "FAILED: row id 4: chain local: amended to decision 'allow'" in out
    sql(db_of(home), 'UPDATE audit SET decision = \'error\', amended_from = \'{"decision": "deny", "reason": "ok"}\'')
    code, out = verify(home)
    assert code == 1 and "FAILED: row id 4: chain local seq 4: hash mismatch" in out


async def test_a_retried_batch_is_chained_the_same_way(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = SQLiteEngine(db_of(home))
    log = AuditLog(engine)
    await log.open()
    real_now, real_thread = engine.commit_now, engine.commit
    failures = [2]

    def flaky_now(batch: Batch) -> bool:
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return real_now(batch)

    def flaky_thread(batch: Batch) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return real_thread(batch)

    monkeypatch.setattr(engine, "commit_now", flaky_now)
    monkeypatch.setattr(engine, "commit", flaky_thread)
    for i in range(5):
        log.record(row(i))
    await log.close()
    assert log.failures == 2 and log.written == 5
    code, out = verify(home)
    assert code == 0 and "head seq 5" in out, out


async def test_rows_the_engine_settles_at_open_are_chained(home: Path) -> None:
    await write_rows(db_of(home), 3)
    log = AuditLog(db_of(home))
    await log.open()
    await log.intent(
        Intent(
            request_id="inflight",
            ts=now_iso(),
            agent="a",
            session="s",
            service="openai",
            model="m",
            day=now_iso()[:10],
            reserved_usd="0.5",
        )
    )
    log._task.cancel()  # type: ignore[union-attr]  # the proxy dies: no row for the call
    await log.engine.close()
    await write_rows(db_of(home), 2, start=3)  # the next start settles it, on the chain, before its own rows
    code, out = verify(home)
    assert code == 0 and "6 rows" in out and "head seq 6" in out, out


async def test_rows_from_before_the_chain_are_reported_unverifiable(home: Path) -> None:
    for i in range(3):
        sql(
            db_of(home),
            "INSERT INTO audit (ts, request_id, kind, decision) VALUES (?, ?, 'request', 'allow')",
            now_iso(),
            f"old{i}",
        )
    # as migration 0009 records on a DB that had them: pre-chain rows end at id 3
    sql(db_of(home), "UPDATE audit_chain_floor SET max_unchained_id = 3")
    await write_rows(db_of(home), 4)
    code, out = verify(home)
    assert code == 0, out
    assert "3 rows from before the hash chain (schema 0007): unverifiable" in out and "head seq 4" in out


@pytest.mark.parametrize("row_id", [-1, 0, 100])
async def test_an_unchained_row_where_none_can_be_is_named(home: Path, row_id: int) -> None:
    # a store created with the chain (floor 0) has no unchained row: one inserted by hand,
    # before every chained row (a negative id) or after them, fails
    await write_rows(db_of(home), 3)
    sql(
        db_of(home),
        "INSERT INTO audit (id, ts, request_id, kind, agent, decision, cost_usd) "
        "VALUES (?, ?, 'forged', 'request', 'alice', 'allow', '999')",
        row_id,
        now_iso(),
    )
    code, out = verify(home)
    assert code == 1 and f"row id {row_id}: has no chain" in out, out


async def test_prune_keeps_chains_verifiable(home: Path) -> None:
    await write_rows(db_of(home), 10)
    sql(db_of(home), "UPDATE audit SET ts = '2020-01-01T00:00:00.000Z' WHERE chain_seq <= 4 OR chain_seq = 6")
    with SQLiteStore(db_of(home), readonly=False) as s:
        assert s.prune("2021-01-01T00:00:00.000Z") == 4  # seq 6 stays: seq 5 is newer (a prefix only)
        assert s.chain_starts()["local"][0] == 4
    # those UPDATEs were edits: re-chain as the writer would have (ts is hashed), then check the prune
    rechain(db_of(home))
    code, out = verify(home)
    assert code == 0 and "6 rows" in out and "starts after seq 4 (pruned)" in out, out
    sql(db_of(home), "DELETE FROM audit WHERE chain_seq = 5")  # deleting the new first row shows
    code, out = verify(home)
    assert code == 1 and "seq 6 follows seq 4: seq 5 missing" in out


def rechain(db: Path, *, change: dict[str, Any] | None = None) -> None:
    """What a forger with write access does: rewrite every row (optionally changed) and its chain."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    start = conn.execute("SELECT seq, hash FROM audit_pruned WHERE chain = 'local'").fetchone()
    head = (start[0], start[1]) if start else (0, "")
    for r in conn.execute(f"SELECT id, {', '.join(chain.FIELDS)} FROM audit ORDER BY id").fetchall():
        fields = {k: r[k] for k in chain.FIELDS} | (change or {})
        links, head = chain.link("local", head, [AuditRow(**fields)])
        _, seq, digest = links[0]
        sets = ", ".join(f"{k} = ?" for k in change or {})
        conn.execute(
            f"UPDATE audit SET {sets + ', ' if sets else ''}chain_seq = ?, hash = ? WHERE id = ?",
            (*(change or {}).values(), seq, digest, r["id"]),
        )
    conn.commit()
    conn.close()


async def test_anchors_catch_a_rewritten_table_and_a_cut_tail(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "egress_guard.audit")
    await write_rows(db_of(home), 10)
    logfile = home / "proxy.log"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit anchor:")]
    logfile.write_text("".join(f"2026-11-22 10:00:00 INFO egress_guard.audit: {line}\n" for line in lines))
    code, out = verify(home, "--anchors", str(logfile))
    assert code == 0 and "1 found, 1 checked" in out, out

    rechain(db_of(home), change={"host": "nothing-to-see.example"})  # every row and hash rewritten
    assert verify(home)[0] == 0  # the chain alone cannot tell
    code, out = verify(home, "--anchors", str(logfile))
    assert code == 1 and "FAILED: row id 10: chain local seq 10 has hash" in out and "log line 1" in out, out

    sql(db_of(home), "DELETE FROM audit WHERE id > 8")  # the newest rows deleted
    assert verify(home)[0] == 0
    code, out = verify(home, "--anchors", str(logfile))
    assert code == 1
    assert "FAILED: anchor on log line 1: chain local seq 10 is not in the DB (its head is seq 8)" in out


def test_verify_with_an_anchor_file_without_anchors_fails(home: Path) -> None:
    empty = home / "empty.log"
    empty.write_text("nothing\n")
    code, out = verify(home, "--anchors", str(empty))
    assert code == 1 and "no 'audit anchor:' lines" in out


async def test_odd_values_verify_after_their_round_trip(home: Path) -> None:
    log = AuditLog(db_of(home))
    await log.open()
    log.record(row(1, path="/a\udcff\x00b", duration_ms=5, reason="caf\u00e9 \U0001f600"))  # type: ignore[arg-type]
    log.record(row(2, duration_ms=float("inf"), port=443.0))  # type: ignore[arg-type]
    await log.close()
    code, out = verify(home)
    assert code == 0 and "2 rows" in out, out


async def test_the_writer_logs_an_anchor_every_interval_of_writing(
    home: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, "egress_guard.audit")
    monkeypatch.setattr(AuditLog, "ANCHOR_EVERY", 0.0)  # every commit of rows, for the test
    log = AuditLog(db_of(home))
    await log.open()
    for burst in range(3):
        await log.durable(max(log.record(row(burst * 2 + i)) for i in range(2)))
    await log.close()
    seqs = [int(m.group("seq")) for r in caplog.records if (m := chain.ANCHOR.search(r.getMessage()))]
    assert seqs == [2, 4, 6]  # one per commit; not again at close (the head did not move)
    monkeypatch.setattr(AuditLog, "ANCHOR_EVERY", 3600.0)
    caplog.clear()
    log = AuditLog(db_of(home))
    await log.open()
    await log.durable(log.record(row(9)))
    await log.close()
    seqs = [int(m.group("seq")) for r in caplog.records if (m := chain.ANCHOR.search(r.getMessage()))]
    assert seqs == [6, 7]  # the head found at open, and at close
