"""The CLI against a PostgreSQL store (`store:` in the config): every command that opens the
store — audit (query, stats, tail, spend, prune), budget, keys, kill — works on it, and an
unreachable store is a clear error naming it, never its password."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psycopg
import yaml
from click.testing import CliRunner

from egress_guard.cli import main
from egress_guard.config import load_config
from egress_guard.store import COLUMNS, AuditLog, AuditRow, open_engine
from egress_guard.timeutil import now_iso


def invoke(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    return result


def pg_config(tmp_path: Path, store: Any) -> str:
    """`init` a dir, then point its config at the PostgreSQL store (no SQLite file is used)."""
    invoke("init", "--dir", str(tmp_path))
    path = tmp_path / "egress-guard.yaml"
    body = yaml.safe_load(path.read_text())
    body["store"] = store
    body.setdefault("agents", {})
    body["agents"].update(
        {
            "agent-a": {"services": ["openai"], "limits": {"budget_usd": {"session": 5, "day": 10, "total": 20}}},
            "agent-b": {"services": ["openai"]},
        }
    )
    path.write_text(yaml.safe_dump(body))
    (tmp_path / "egress-guard.db").unlink(missing_ok=True)  # any use of SQLite would show
    return str(path)


def write_rows(config_path: str, rows: list[AuditRow]) -> None:
    """Rows as the running proxy writes them: through the writer, chained."""

    async def main_() -> None:
        log = AuditLog(open_engine(load_config(config_path)), batch_delay=0)
        await log.open()
        n = 0
        for row in rows:
            n = log.record(row)
        await log.durable(n)
        await log.close()

    asyncio.run(main_())


def rows() -> list[AuditRow]:
    return [
        AuditRow(
            ts="2020-11-20T08:00:00.000Z",
            request_id="r1",
            kind="connect",
            agent="agent-a",
            decision="allow",
            host="api.openai.com",
            port=443,
            method="CONNECT",
            status=200,
        ),
        AuditRow(
            ts="2020-11-20T08:00:01.000Z",
            request_id="r2",
            kind="request",
            agent="agent-a",
            session="s1",
            decision="allow",
            method="POST",
            scheme="https",
            host="api.openai.com",
            port=443,
            path="/v1/chat/completions",
            status=200,
            request_bytes=120,
            response_bytes=900,
            duration_ms=12.5,
            service="openai",
            model="gpt-4o-mini",
            input_tokens=100,
            output_tokens=50,
            cost_usd="0.0450",
        ),
        AuditRow(
            ts=now_iso(),
            request_id="r3",
            kind="connect",
            agent="agent-b",
            decision="deny",
            reason='host evil.com, "x" is not on the allowlist',
            host="evil.com",
            port=443,
            status=403,
            response_bytes=180,
        ),
    ]


def test_audit_commands_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    cfg = pg_config(tmp_path, pg_url)
    write_rows(cfg, rows())
    listed = json.loads(invoke("audit", "--config", cfg, "--format", "json").output)
    assert [r["request_id"] for r in listed] == ["r1", "r2", "r3"]
    assert list(listed[0]) == COLUMNS and listed[1]["duration_ms"] == 12.5 and listed[1]["cost_usd"] == "0.0450"
    denied = json.loads(invoke("audit", "--config", cfg, "--decision", "deny", "--format", "json").output)
    assert [r["request_id"] for r in denied] == ["r3"]
    timed = json.loads(
        invoke(
            "audit",
            "--config",
            cfg,
            "--since",
            "2020-11-20T08:00:01Z",
            "--until",
            "2020-11-21T00:00Z",
            "--format",
            "json",
        ).output
    )
    assert [r["request_id"] for r in timed] == ["r2"]
    stats = json.loads(invoke("audit", "stats", "--config", cfg, "--format", "json").output)
    assert [(s["host"], s["decision"], s["requests"], s["response_bytes"]) for s in stats] == [
        ("api.openai.com", "allow", 2, 900),
        ("evil.com", "deny", 1, 180),
    ]
    tail = invoke("audit", "tail", "--config", cfg, "-n", "1", "--no-follow", "--format", "jsonl").output
    assert [json.loads(line)["request_id"] for line in tail.splitlines()] == ["r3"]
    spend = json.loads(invoke("audit", "spend", "--config", cfg, "--by", "model", "--format", "json").output)
    assert [(s["model"], s["requests"], s["cost_usd"]) for s in spend] == [("gpt-4o-mini", 1, "0.0450")]
    verified = json.loads(invoke("audit", "verify", "--config", cfg, "--format", "json").output)
    assert verified["ok"] and verified["rows"] == 3
    pruned = invoke("audit", "prune", "--config", cfg, "--older-than", "1d", "--yes").output
    assert pruned.startswith("pruned 2 audit rows")
    left = json.loads(invoke("audit", "--config", cfg, "--format", "json").output)
    assert [r["request_id"] for r in left] == ["r3"]
    verified = json.loads(invoke("audit", "verify", "--config", cfg, "--format", "json").output)
    assert verified["ok"] and verified["rows"] == 1  # the chain starts where the prune left it
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE audit SET status = 200 WHERE request_id = 'r3'")
    tampered = invoke("audit", "verify", "--config", cfg, code=1).output
    assert "hash mismatch" in tampered
    budget = json.loads(invoke("budget", "show", "--config", cfg, "--agent", "agent-a", "--format", "json").output)
    total = next(b for b in budget if b["scope"] == "total")
    assert total["spent_usd"] == "0.0450"  # running totals survive a prune
    assert not (tmp_path / "egress-guard.db").exists()


def test_keys_kill_and_budget_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    cfg = pg_config(tmp_path, {"url": pg_url, "replica": "cli-test"})
    minted = invoke("keys", "mint", "--config", cfg, "--agent", "agent-a", "--session", "s1", "--format", "json")
    assert json.loads(minted.stdout)["OPENAI_API_KEY"].startswith("sk-")
    invoke("keys", "mint", "--config", cfg, "--agent", "agent-a", "--session", "s2")
    invoke("keys", "mint", "--config", cfg, "--agent", "agent-b", "--session", "s3")
    listed = json.loads(invoke("keys", "list", "--config", cfg, "--format", "json").output)
    assert sorted((k["agent"], k["session"], k["status"]) for k in listed) == [
        ("agent-a", "s1", "active"),
        ("agent-a", "s2", "active"),
        ("agent-b", "s3", "active"),
    ]
    key_id = next(k["key_id"] for k in listed if k["session"] == "s3")
    assert "revoked 1 key(s) of session s1" in invoke("kill", "--config", cfg, "--session", "s1").output
    assert "revoked 1 key(s) of agent agent-a" in invoke("kill", "--config", cfg, "--agent", "agent-a").output
    invoke("keys", "revoke", "--config", cfg, key_id)
    after = json.loads(invoke("keys", "list", "--config", cfg, "--all", "--format", "json").output)
    assert {k["session"]: k["status"] for k in after} == {"s1": "revoked", "s2": "revoked", "s3": "revoked"}
    with psycopg.connect(pg_url) as conn:
        revocations = conn.execute("SELECT agent, session, key_id FROM revocations ORDER BY id").fetchall()
    assert revocations[:2] == [(None, "s1", None), ("agent-a", None, None)] and revocations[-1][2] == key_id

    invoke("budget", "set", "--config", cfg, "--agent", "agent-a", "--scope", "day", "--usd", "2.5")
    shown = json.loads(invoke("budget", "show", "--config", cfg, "--agent", "agent-a", "--format", "json").output)
    assert next(b for b in shown if b["scope"] == "day")["limit_usd"] == "2.5"
    invoke("budget", "reset", "--config", cfg, "--agent", "agent-a", "--scope", "day")
    shown = json.loads(invoke("budget", "show", "--config", cfg, "--agent", "agent-a", "--format", "json").output)
    assert next(b for b in shown if b["scope"] == "day")["limit_usd"] == "10"
    assert not (tmp_path / "egress-guard.db").exists()


def test_unreachable_store_is_a_clear_error_without_the_password(tmp_path: Path, pg_cluster: Any) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = tmp_path / "pg-password"
    secret.write_text("correct-horse-battery\n")
    url = f"postgresql://eg@127.0.0.1:{port}/egress_guard"
    cfg = pg_config(tmp_path, {"url": url, "password_file": str(secret), "timeout": 1})
    for args in (["audit"], ["audit", "stats"], ["keys", "list"], ["budget", "show"], ["kill", "--agent", "agent-a"]):
        result = CliRunner().invoke(main, [*args, "--config", cfg])
        assert result.exit_code == 1, (args, result.output)
        assert f"store {url} is unreachable" in result.output, (args, result.output)
        assert "correct-horse" not in result.output
