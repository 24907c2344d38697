"""`egress-guard store copy`: a SQLite store (history, keys, revocations, budgets) copied into
an empty PostgreSQL store. Everything arrives exactly; `audit verify` passes on the copy; a
proxy on the copy enforces the same remaining budget; and the copy refuses what would lose or
merge data: a proxy still writing the source, a destination that already holds data."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from click.testing import CliRunner
from genai_prices import Usage, calc_price
from psycopg.rows import dict_row
from support.proxy import RunningProxy, audit_rows
from support.upstream import Upstream

from egress_guard import keys
from egress_guard.cli import main
from egress_guard.config import load_config
from egress_guard.store.sqlite import schema as sqlite_schema

TABLES = ["audit", "fake_keys", "revocations", "budgets", "spend_totals"]


def price(**usage: int) -> Decimal:
    return Decimal(calc_price(Usage(**usage), "gpt-4o-mini", provider_id="openai").total_price)


def invoke(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    return result


def chat(proxy: RunningProxy, port: int, key: str) -> httpx.Response:
    with httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=20) as client:
        return client.post(
            f"https://api.openai.com:{port}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "gpt-4o-mini", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]},
        )


def sqlite_table(db: Path, table: str) -> list[dict[str, Any]]:
    conn = sqlite_schema.connect(db, readonly=True)
    try:
        order = " ORDER BY id" if table in ("audit", "revocations") else ""
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table}{order}")]
    finally:
        conn.close()


def pg_table(url: str, table: str, order: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == {"to_regclass": None}:
            return []
        return conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()  # type: ignore[arg-type]


def budget(config: Path, agent: str) -> dict[str, dict[str, Any]]:
    shown = json.loads(invoke("budget", "show", "--config", str(config), "--agent", agent, "--format", "json").output)
    return {r["scope"]: r for r in shown}


def test_sqlite_history_keys_and_budgets_arrive_exactly_and_are_enforced(
    make_proxy, cred_config: dict, real_env, llm_upstream: Upstream, pg_url: str, tmp_path: Path
) -> None:
    # A SQLite deployment with history: priced calls, a revoked key, a run-time budget override.
    one = price(input_tokens=11, output_tokens=100)  # a call's real cost
    held = price(input_tokens=256, output_tokens=100)  # its reservation
    cap = 2 * one + held / 2  # room for two calls; a third's reservation does not fit
    cred_config["agents"]["researcher"]["limits"] = {"budget_usd": {"total": str(cap)}}
    old = make_proxy(**cred_config)
    key = keys.mint(old.config, "researcher", session="s1").env["OPENAI_API_KEY"]
    revoked = keys.mint(old.config, "researcher", session="s2")
    for _ in range(2):
        assert chat(old, llm_upstream.port, key).status_code == 200
    old.rows(expect=4)
    third = chat(old, llm_upstream.port, key)
    assert third.status_code == 429 and f"total budget of ${cap}" in third.text, third.text
    invoke("keys", "revoke", "--config", str(old.config.path), revoked.record.key_id)
    invoke("budget", "set", "--config", str(old.config.path), "--agent", "writer", "--scope", "day", "--usd", "3")
    old.rows(expect=5)
    before = budget(old.config.path, "researcher")["total"]
    assert Decimal(before["spent_usd"]) > 0
    # While the proxy runs, the copy refuses: it would race the proxy's writes.
    fleet_dir = tmp_path / "fleet"
    fleet_dir.mkdir()
    body = yaml.safe_load(old.config.path.read_text())
    body["store"] = {"url": pg_url, "replica": "copy-test"}
    body["ca_dir"] = str(old.config.ca_dir)
    fleet_config = fleet_dir / "egress-guard.yaml"
    fleet_config.write_text(yaml.safe_dump(body))
    db = old.config.audit_path
    refused = invoke("store", "copy", "--config", str(fleet_config), "--from", str(db), code=1)
    assert "stop the proxy" in refused.output and "Traceback" not in refused.output
    assert pg_table(pg_url, "audit", "id") == []  # nothing half-copied
    old.stop()

    out = invoke("store", "copy", "--config", str(fleet_config), "--from", str(db), "--format", "json")
    report = json.loads(out.stdout)
    source = {t: sqlite_table(db, t) for t in TABLES}
    assert report["rows"]["audit"] == len(source["audit"]) >= 4
    # Every row of every table, exactly (ids, hash-chain columns, exact decimals as text).
    assert pg_table(pg_url, "audit", "id") == source["audit"]
    assert pg_table(pg_url, "fake_keys", "created_at, key_id") == sorted(
        source["fake_keys"], key=lambda r: (r["created_at"], r["key_id"])
    )
    assert pg_table(pg_url, "revocations", "id") == source["revocations"]
    assert pg_table(pg_url, "budgets", "agent, scope") == source["budgets"]
    assert pg_table(pg_url, "spend_totals", "agent, session, day") == sorted(
        source["spend_totals"], key=lambda r: (r["agent"], r["session"], r["day"])
    )
    # The chain verifies on the copy, and the CLI reads it as it read the SQLite file.
    verified = invoke("audit", "verify", "--config", str(fleet_config))
    assert "FAILED" not in verified.output
    assert budget(fleet_config, "researcher")["total"]["spent_usd"] == before["spent_usd"]
    assert budget(fleet_config, "writer")["day"]["limit_usd"] == "3"
    listed = {
        k["key_id"]: k
        for k in json.loads(invoke("keys", "list", "--config", str(fleet_config), "--all", "--format", "json").output)
    }
    assert listed[revoked.record.key_id]["status"] == "revoked"

    # A proxy on the copy enforces the same remaining budget: the next call does not fit.
    fleet = RunningProxy(load_config(fleet_config)).start()
    try:
        refused_call = chat(fleet, llm_upstream.port, key)
        assert refused_call.status_code == 429 and f"total budget of ${cap}" in refused_call.text, refused_call.text
        assert "would be exceeded" in refused_call.text
        revoked_call = chat(fleet, llm_upstream.port, revoked.env["OPENAI_API_KEY"])
        assert revoked_call.status_code in (401, 403) and "revoked" in revoked_call.text
        # new rows continue after the copied ids
        rows = fleet.rows(expect=len(source["audit"]) + 2)
        assert [r["id"] for r in rows] == sorted({r["id"] for r in rows})
        assert rows[-1]["id"] > source["audit"][-1]["id"]
    finally:
        fleet.stop()
    assert "FAILED" not in invoke("audit", "verify", "--config", str(fleet_config)).output

    # A second copy into the same (now non-empty) store is refused and changes nothing.
    n = len(pg_table(pg_url, "audit", "id"))
    again = invoke("store", "copy", "--config", str(fleet_config), "--from", str(db), code=1)
    assert "already holds data" in again.output and "empty database" in again.output
    assert len(pg_table(pg_url, "audit", "id")) == n
    assert audit_rows(db) == source["audit"]  # the source is untouched


def test_copy_needs_a_postgresql_destination_and_an_existing_source(tmp_path: Path, pg_url: str) -> None:
    invoke("init", "--dir", str(tmp_path))
    config = tmp_path / "egress-guard.yaml"
    no_store = invoke("store", "copy", "--config", str(config), code=1)
    assert "names no PostgreSQL store" in no_store.output and "store: postgresql://" in no_store.output
    body = yaml.safe_load(config.read_text())
    body["store"] = pg_url
    config.write_text(yaml.safe_dump(body))
    missing = invoke("store", "copy", "--config", str(config), "--from", str(tmp_path / "nope.db"), code=1)
    assert "no SQLite store at" in missing.output


@pytest.mark.parametrize("password", ["hunter2-secret-pw"])
def test_copy_to_an_unreachable_store_names_it_never_its_password(tmp_path: Path, password: str) -> None:
    invoke("init", "--dir", str(tmp_path))
    config = tmp_path / "egress-guard.yaml"
    (tmp_path / "pw").write_text(password)
    body = yaml.safe_load(config.read_text())
    body["store"] = {"url": "postgresql://eg@127.0.0.1:1/nowhere", "password_file": "pw", "timeout": 1}
    config.write_text(yaml.safe_dump(body))
    out = invoke("store", "copy", "--config", str(config), code=1)
    assert "store postgresql://eg@127.0.0.1:1/nowhere" in out.output and password not in out.output


def test_init_with_a_postgresql_store_creates_no_sqlite_file(tmp_path: Path, pg_url: str) -> None:
    config = tmp_path / "egress-guard.yaml"
    config.write_text(yaml.safe_dump({"version": 1, "store": pg_url}))
    out = invoke("init", "--dir", str(tmp_path)).output  # keeps the config there
    assert "not touched" in out and not (tmp_path / "egress-guard.db").exists()
    assert (tmp_path / "certs" / "egress-guard-ca.pem").exists()
