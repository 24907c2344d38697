"""`egress-guard status` with CliRunner on real files: no proxy running, a running proxy's
status file (as `up` keeps it), the config on disk differing from the running one, pending
approvals and the store's health."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from support.proxy import write_config

from egress_guard import status as status_mod
from egress_guard import store
from egress_guard.cli.status import status
from egress_guard.config import Config
from egress_guard.reload import ConfigWatcher
from egress_guard.verdicts import PolicyHolder


def run(config: Config, *args: str) -> Result:
    return CliRunner().invoke(status, ["--config", str(config.path), *args], catch_exceptions=False)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return write_config(tmp_path, {"allow": [{"host": "api.example.com"}], "agents": {"a": {"services": []}}})


@pytest.fixture
def egress_process() -> Iterator[int]:
    """A live process whose command line says egress (what `status.read` accepts as a proxy)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "egress-guard"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_no_proxy_running_is_said_plainly_with_exit_3(config: Config) -> None:
    out = run(config)
    assert out.exit_code == 3
    lines = out.output.splitlines()
    assert lines[0] == (
        f"egress-guard: not running for {config.path} (no status file at {status_mod.status_path(config)})"
    )
    assert f"(digest {config.digest[:12]} on disk)" in out.output
    assert f"store:       {config.audit_path}: ok (" in out.output
    report = json.loads(run(config, "--format", "json").output)
    assert report["running"] is False and report["config_digest"] == config.digest and report["store"]["ok"]


async def test_a_running_proxy_its_config_reloads_and_approvals(config: Config, egress_process: int) -> None:
    holder = PolicyHolder(config)
    watcher = ConfigWatcher(holder, signals=False, poll=None)
    keeper = status_mod.StatusFile(status_mod.status_path(config))
    base = status_mod.Status(
        pid=egress_process,
        started_at="2026-01-01T00:00:00Z",
        listen="127.0.0.1:8080",
        config=str(config.path),
        checked_at="2026-01-01T00:00:00Z",
    )
    keeper.update(status_mod.refresh(base, holder, 4, watcher.last))
    out = run(config)
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0] == (
        f"egress-guard: running, pid {egress_process}, listening on 127.0.0.1:8080 since 2026-01-01T00:00:00Z"
    )
    assert f"  digest:      {config.digest[:12]}, loaded {holder.loaded_at}\n" in out.output
    assert "  policy:      mode enforce, unknown hosts deny\n" in out.output
    assert "  rules:       1 allow rules, 0 rules\n" in out.output and "  agents:      1\n" in out.output
    assert "  connections: 4 open (at " in out.output and "  approvals:   0 pending\n" in out.output
    assert "differs" not in out.output and "last reload" not in out.output

    # the file changes and is refused: status says the running config is not the file's
    body = yaml.safe_load(config.path.read_text()) | {"listen": "127.0.0.1:9"}
    config.path.write_text(yaml.safe_dump(body))
    refused = await watcher.reload_now()
    keeper.update(status_mod.refresh(base, holder, 4, watcher.last))
    conn = sqlite3.connect(config.audit_path)
    with conn:
        conn.execute(
            "INSERT INTO approvals (id, created, expires, replica, request_id, host, port, rule, reason, status)"
            " VALUES ('1a2b3c4d', 'x', 'y', 'r', 'q', 'h.example', 443, 'unknown_hosts', 'new host', 'pending')"
        )
    conn.close()
    out = CliRunner().invoke(status, ["--config", str(config.path)])  # the file on disk no longer loads as before
    text = out.output
    assert out.exit_code == 0, text
    assert f"the file on disk differs ({refused.digest[:12]})" in text and f"kill -HUP {egress_process}" in text
    assert f"  last reload: REFUSED at {refused.at}: listen changed: restart egress-guard to apply them" in text
    assert "  approvals:   1 pending (egress-guard pending)\n" in text
    report = json.loads(run(config, "--format", "json").output)
    assert report["digest"] == config.digest and report["config_digest"] == refused.digest
    assert report["last_reload"]["applied"] is False and report["pending_approvals"] == 1
    assert report["counts"] == {"allow_rules": 1, "rules": 0, "services": 0, "agents": 1}

    # a file that does not load: what runs is still shown (that is when one asks), with the error
    config.path.write_text("version: 1\nallow: [\n")
    broken = await watcher.reload_now()
    keeper.update(status_mod.refresh(base, holder, 4, watcher.last))
    out = run(config)
    assert out.exit_code == 2, out.output
    assert out.output.startswith(f"egress-guard: running, pid {egress_process}")
    assert f"  digest:      {config.digest[:12]}" in out.output and "kill -HUP" not in out.output
    assert f"  last reload: REFUSED at {broken.at}: {broken.reason}\n" in out.output
    assert f"  ON DISK:     {broken.reason}\n" in out.output
    assert "  store:       unknown (the config does not load)\n" in out.output


def test_a_store_that_does_not_answer_exits_1(config: Config, egress_process: int) -> None:
    base = status_mod.Status(
        pid=egress_process, started_at="t", listen="127.0.0.1:8080", config=str(config.path), checked_at="t"
    )
    status_mod.write(status_mod.status_path(config), base)  # a proxy from before hot reload: no digest
    config.audit_path.unlink()
    out = run(config)
    assert out.exit_code == 1, out.output
    assert "digest:      unknown (a proxy older than hot reload)" in out.output
    assert f"store:       {config.audit_path}: NOT OK: no audit DB there (run 'egress-guard init')" in out.output


def test_status_file_writes_at_once_on_a_change_and_the_count_at_most_every_2s(config: Config) -> None:
    path = status_mod.status_path(config)
    keeper = status_mod.StatusFile(path)
    holder = PolicyHolder(config)
    base = status_mod.Status(pid=1, started_at="t", listen="127.0.0.1:1", config=str(config.path), checked_at="t")
    first = keeper.update(status_mod.refresh(base, holder, 1))
    assert json.loads(path.read_text())["connections"] == 1 and first.updated_at
    keeper.update(status_mod.refresh(first, holder, 2))
    assert json.loads(path.read_text())["connections"] == 1  # only the count moved, just now
    keeper.update(dataclasses.replace(status_mod.refresh(first, holder, 3), mode="observe"))  # more than the count
    assert json.loads(path.read_text())["connections"] == 3 and json.loads(path.read_text())["mode"] == "observe"
    path.unlink()
    keeper.update(status_mod.refresh(first, holder, 3))
    assert path.exists()


def test_a_postgresql_store_is_named_without_its_password(tmp_path: Path, pg_url: str) -> None:
    password = "pg-Pa55-status-never-shown"
    secret = tmp_path / "pg-password"
    secret.write_text(password)
    config = write_config(tmp_path, {"store": {"url": pg_url, "password_file": str(secret)}})
    with store.open_store(config, write=True) as db:
        db.migrate()
    out = run(config)
    assert out.exit_code == 3, out.output  # no proxy; the store answers
    assert f"store:       {config.store_name}: ok (" in out.output and "approvals:   0 pending" in out.output
    (tmp_path / "dead").mkdir()
    dead_url = pg_url.rsplit(":", 1)[0] + ":1/nothing"  # nothing listens on port 1
    dead = write_config(tmp_path / "dead", {"store": {"url": dead_url, "password_file": str(secret)}})
    report = json.loads(run(dead, "--format", "json").output)
    assert report["store"]["ok"] is False and report["store"]["name"] == dead.store_name
    assert password not in json.dumps(report) and password not in run(dead).output
