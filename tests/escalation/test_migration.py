"""Migration 0010_policy on a store that already holds a chained audit log (written by the
proxy's writer under the schema before it): the old rows and the hash chain still verify
(`egress-guard audit verify`, the real CLI), SQLite's integrity check passes, a connection
opened before the migration sees the new checks, and the widened checks take event rows and
observe mode's decisions while still refusing anything else. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from click.testing import CliRunner

from egress_guard.cli import main
from egress_guard.config import load_config
from egress_guard.store import AuditLog, AuditRow, open_engine
from egress_guard.store.postgres import schema as pg_schema
from egress_guard.store.sqlite import schema as sqlite_schema
from egress_guard.timeutil import now_iso

BEFORE = 9  # migrations 0001-0009: the schema before this one


def home_for(tmp_path: Path, url: str | None = None) -> Path:
    """A config from `init`, without its (already migrated) SQLite DB; on `url` if given."""
    result = CliRunner().invoke(main, ["init", "--dir", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = tmp_path / "egress-guard.yaml"
    if url is not None:
        body = yaml.safe_load(config.read_text())
        body["store"] = {"url": url, "replica": "eu-1"}
        config.write_text(yaml.safe_dump(body))
    for leftover in tmp_path.glob("egress-guard.db*"):
        leftover.unlink()
    return config


def write(config: Path, rows: list[AuditRow], amend: str | None = None) -> None:
    """Rows through the proxy's writer (chained), in a few commits; `amend` cuts one after."""

    async def run() -> None:
        log = AuditLog(open_engine(load_config(config)), batch_delay=0)
        await log.open()
        numbers = {}
        for i, r in enumerate(rows):
            numbers[r.request_id] = log.record(r)
            if i % 3 == 2:
                await log.durable(numbers[r.request_id])
        await log.durable(max(numbers.values()))
        if amend is not None:
            log.amend(numbers[amend], amend, "response cut")
        assert await log.close() == 0

    asyncio.run(run())


def rows(tag: str, n: int, **kw: Any) -> list[AuditRow]:
    return [
        AuditRow(
            ts=now_iso(),
            request_id=f"{tag}{i}",
            kind=kw.get("kind", "request" if i % 2 else "connect"),
            decision=kw.get("decision", "allow" if i % 3 else "deny"),
            host="api.test.local",
            port=443,
            method="GET",
            path=f"/p/{i}",
            status=200,
            duration_ms=i / 7,
            reason=None if i % 2 else "not on the allowlist",
        )
        for i in range(n)
    ]


def verify(config: Path) -> str:
    result = CliRunner().invoke(main, ["audit", "verify", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_sqlite_store_from_before_0010_migrates_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = home_for(tmp_path)
    db = tmp_path / "egress-guard.db"
    with monkeypatch.context() as m:
        m.setattr(sqlite_schema, "MIGRATIONS", sqlite_schema.MIGRATIONS[:BEFORE])
        write(config, rows("old", 10), amend="old3")
    early = sqlite3.connect(db)  # open across the migration: must pick up the new schema
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        early.execute("INSERT INTO audit (ts, request_id, kind, decision) VALUES ('t', 'x', 'event', 'allow')")
    early.rollback()
    assert "ok: 10 rows in 1 chains" in verify(config)
    before = sqlite3.connect(db).execute("SELECT * FROM audit ORDER BY id").fetchall()

    assert sqlite_schema.migrate(db) == ["0010_policy"]

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert conn.execute("SELECT * FROM audit ORDER BY id").fetchall() == before  # not a byte rewritten
    sql = conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'audit'").fetchone()[0]
    assert "'connect', 'request', 'event'" in sql and "'would-deny', 'would-escalate'" in sql
    for table in ("approvals", "grants", "freezes"):
        assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,)
    conn.close()
    early.execute("INSERT INTO audit (ts, request_id, kind, decision) VALUES ('t', 'x', 'event', 'would-deny')")
    early.rollback()  # (unchained: only to show the check; not kept)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        early.execute("INSERT INTO audit (ts, request_id, kind, decision) VALUES ('t', 'x', 'other', 'allow')")
    early.close()

    # the chain continues across the migration, with the new kinds and decisions
    write(config, rows("ev", 4, kind="event") + rows("obs", 3, kind="request", decision="would-escalate"))
    out = verify(config)
    assert "ok: 17 rows in 1 chains" in out and "1 amended" in out
    assert sqlite_schema.migrate(db) == []


def test_postgresql_store_from_before_0010_migrates(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = home_for(tmp_path, pg_url)
    with monkeypatch.context() as m:
        m.setattr(pg_schema, "MIGRATIONS", pg_schema.MIGRATIONS[:BEFORE])
        write(config, rows("old", 8), amend="old1")
        with (
            psycopg.connect(pg_url, autocommit=True) as conn,
            pytest.raises(psycopg.errors.CheckViolation, match="audit_kind_check"),
        ):
            conn.execute("INSERT INTO audit (ts, request_id, kind, decision) VALUES ('t', 'x', 'event', 'allow')")
    assert "ok: 8 rows in 1 chains" in verify(config)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        before = conn.execute("SELECT * FROM audit ORDER BY id").fetchall()
        assert pg_schema.migrate_conn(conn) == ["0010_policy"]
        assert conn.execute("SELECT * FROM audit ORDER BY id").fetchall() == before
        checks = dict(
            conn.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = 'audit'::regclass AND contype = 'c'"
            ).fetchall()
        )
        assert set(checks) == {"audit_kind_check", "audit_decision_check"}
        assert "event" in checks["audit_kind_check"] and "would-escalate" in checks["audit_decision_check"]
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO audit (ts, request_id, kind, decision) VALUES ('t', 'x', 'other', 'allow')")
    write(config, rows("ev", 3, kind="event", decision="would-deny"))
    out = verify(config)
    assert "ok: 11 rows in 1 chains" in out and "1 amended" in out


def test_postgresql_0010_adds_its_checks_not_valid_and_validates_them_after_its_commit(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The widened checks are added NOT VALID (no scan of audit under the migration's ACCESS
    EXCLUSIVE lock) and validated in a transaction of their own; a run stopped in between
    (here: the validation left out) finishes it at the next migrate."""
    config = home_for(tmp_path, pg_url)
    with monkeypatch.context() as m:
        m.setattr(pg_schema, "MIGRATIONS", pg_schema.MIGRATIONS[:BEFORE])
        write(config, rows("old", 4))

    def validated(conn: psycopg.Connection[Any]) -> dict[str, bool]:
        found = conn.execute(
            "SELECT conname, convalidated FROM pg_constraint WHERE conrelid = 'audit'::regclass AND contype = 'c'"
        ).fetchall()
        return {str(name): bool(valid) for name, valid in found}

    with psycopg.connect(pg_url, autocommit=True) as conn:
        with monkeypatch.context() as m:
            m.setattr(pg_schema, "validate_checks", lambda conn: [])  # stopped after 0010's commit
            assert pg_schema.migrate_conn(conn) == ["0010_policy"]
        assert validated(conn) == {"audit_kind_check": False, "audit_decision_check": False}
        with pytest.raises(psycopg.errors.CheckViolation):  # new rows are checked already
            conn.execute("INSERT INTO audit (ts, request_id, kind, decision) VALUES ('t', 'x', 'other', 'allow')")
        assert pg_schema.migrate_conn(conn) == []  # nothing left to migrate; the checks are proven
        assert validated(conn) == {"audit_kind_check": True, "audit_decision_check": True}
        assert pg_schema.validate_checks(conn) == []
    assert "ok: 4 rows in 1 chains" in verify(config)
