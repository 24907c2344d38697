"""`egress-guard audit verify` on a PostgreSQL store: two replicas' chains, each verified; a row
edited, deleted or inserted by hand SQL is named; the replicas' anchors catch a cut tail."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from click.testing import CliRunner

from egress_guard.cli import main
from egress_guard.config import load_config
from egress_guard.store import AuditLog, AuditRow, open_engine
from egress_guard.timeutil import now_iso


def config_for(tmp_path: Path, url: str, replica: str) -> Path:
    home = tmp_path / replica
    result = CliRunner().invoke(main, ["init", "--dir", str(home)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    path = home / "egress-guard.yaml"
    body = yaml.safe_load(path.read_text())
    body["store"] = {"url": url, "replica": replica}
    path.write_text(yaml.safe_dump(body))
    (home / "egress-guard.db").unlink(missing_ok=True)
    return path


def write(config: Path, n: int, tag: str) -> None:
    async def run() -> None:
        log = AuditLog(open_engine(load_config(config)), batch_delay=0)
        await log.open()
        last = 0
        for i in range(n):
            last = log.record(
                AuditRow(
                    ts=now_iso(),
                    request_id=f"{tag}{i}",
                    kind="request",
                    decision="allow",
                    host="h.test",
                    duration_ms=i / 3,
                    status=200,
                    reason=None if i % 2 else "ok",
                )
            )
            if i % 5 == 4:
                await log.durable(last)
        await log.durable(last)
        if n > 3:
            log.amend(3, f"{tag}2", "response cut")
        await log.close()

    asyncio.run(run())


def verify(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["audit", "verify", "--config", str(config), *args], catch_exceptions=False)
    return result.exit_code, result.output


def sql(url: str, statement: str, *args: Any) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, args)  # type: ignore[arg-type]


def row_id(url: str, request_id: str) -> int:
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT id FROM audit WHERE request_id = %s", (request_id,)).fetchone()
        assert found is not None
        return int(found[0])


@pytest.fixture
def fleet(tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture) -> tuple[Path, Path, Path]:
    caplog.set_level(logging.INFO, "egress_guard.audit")
    one, two = config_for(tmp_path, pg_url, "eu-1"), config_for(tmp_path, pg_url, "eu-2")
    write(one, 12, "a")
    write(two, 7, "b")
    write(one, 4, "c")  # eu-1 again: its chain continues
    logfile = tmp_path / "replicas.log"
    logfile.write_text(
        "".join(f"INFO {r.getMessage()}\n" for r in caplog.records if r.getMessage().startswith("audit anchor:"))
    )
    return one, two, logfile


def test_verify_passes_on_postgresql_and_names_each_chain(fleet: tuple[Path, Path, Path]) -> None:
    _, two, logfile = fleet
    code, out = verify(two, "--anchors", str(logfile))
    assert code == 0, out
    assert "ok: 23 rows in 2 chains" in out and "postgresql://" in out
    assert "chain eu-1: 16 rows, head seq 16" in out and "chain eu-2: 7 rows, head seq 7" in out
    assert "3 amended" not in out and "2 amended" in out and "1 amended" in out
    assert "anchors in" in out and "checked" in out and ", 0 checked" not in out


def test_an_edited_row_on_postgresql_is_named(fleet: tuple[Path, Path, Path], pg_url: str) -> None:
    one, _, _ = fleet
    target = row_id(pg_url, "b4")
    sql(pg_url, "UPDATE audit SET host = 'evil.example' WHERE id = %s", target)
    code, out = verify(one)
    assert code == 1 and f"FAILED: row id {target}: chain eu-2 seq 5: hash mismatch" in out, out


def test_a_deleted_row_on_postgresql_is_named(fleet: tuple[Path, Path, Path], pg_url: str) -> None:
    one, _, _ = fleet
    sql(pg_url, "DELETE FROM audit WHERE request_id = 'a5'")
    code, out = verify(one)
    assert code == 1
    assert f"FAILED: row id {row_id(pg_url, 'a6')}: chain eu-1 seq 7 follows seq 5: seq 6 missing" in out, out


def test_an_inserted_row_on_postgresql_is_named(fleet: tuple[Path, Path, Path], pg_url: str) -> None:
    one, _, _ = fleet
    sql(
        pg_url,
        "INSERT INTO audit (ts, request_id, kind, decision) VALUES (%s, 'forged', 'request', 'allow')",
        now_iso(),
    )
    code, out = verify(one)
    assert code == 1 and f"FAILED: row id {row_id(pg_url, 'forged')}: has no chain, after chained rows" in out, out


def test_anchors_catch_a_cut_tail_on_postgresql(fleet: tuple[Path, Path, Path], pg_url: str) -> None:
    one, _, logfile = fleet
    sql(pg_url, "DELETE FROM audit WHERE request_id IN ('c2', 'c3')")  # eu-1's newest rows
    assert verify(one)[0] == 0  # the chain alone cannot tell
    code, out = verify(one, "--anchors", str(logfile))
    assert code == 1 and "chain eu-1 seq 16 is not in the DB (its head is seq 14)" in out, out
