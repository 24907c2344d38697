"""ConfigWatcher on real config files and a real PolicyHolder: a valid change swaps the
policy, a broken file or a change outside the policy is refused and the old config stays,
an edit to the file (or a preset file it reads) is noticed by the poll, and every outcome
that changed something is an audit row."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.proxy import write_config

from egress_guard.config import ConfigError, load_config
from egress_guard.reload import ConfigWatcher, Outcome, fixed_keys
from egress_guard.store import AuditLog
from egress_guard.verdicts import PolicyHolder

BASE: dict[str, Any] = {
    "allow": [{"host": "api.example.com", "ports": [443], "methods": ["GET"]}],
    "agents": {"agent": {"services": []}},
}


def rewrite(cfg: Path, **changes: Any) -> None:
    body = yaml.safe_load(cfg.read_text()) | changes
    cfg.write_text(yaml.safe_dump(body))


def hosts(holder: PolicyHolder) -> list[str]:
    return [str(r.host) for r in holder.config.rules]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, PolicyHolder, ConfigWatcher]:
    config = write_config(tmp_path, BASE)
    holder = PolicyHolder(config)
    return config.path, holder, ConfigWatcher(holder, signals=False, poll=None)


async def test_a_valid_change_swaps_the_policy(setup: tuple[Path, PolicyHolder, ConfigWatcher]) -> None:
    cfg, holder, watcher = setup
    before, old_policy = holder.config.digest, holder.current
    rewrite(
        cfg,
        allow=[*BASE["allow"], {"host": "new.example.com", "ports": [443]}],
        mode="observe",
        rules=[{"hosts": ["api.example.com"], "match": "method == 'DELETE'", "action": "deny", "reason": "no"}],
    )
    out = await watcher.reload_now()
    assert out.applied and out.changed and not out.rejected
    assert out.old_digest == before and out.digest == holder.config.digest != before
    assert holder.current is not old_policy and holder.current.mode == "observe" and len(holder.current.rules) == 1
    assert "new.example.com" in hosts(holder)
    assert (
        "allow rules 1 -> 2" in out.reason and "mode enforce -> observe" in out.reason and "rules 0 -> 1" in out.reason
    )


async def test_a_broken_file_is_refused_with_ups_message_and_the_old_policy_stays(
    setup: tuple[Path, PolicyHolder, ConfigWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    cfg, holder, watcher = setup
    old = holder.config
    cfg.write_text(cfg.read_text().replace("host: api.example.com", "host: '*.example.*'"))
    with pytest.raises(ConfigError) as what_up_says:
        load_config(cfg)
    with caplog.at_level(logging.ERROR, logger="egress_guard.reload"):
        out = await watcher.reload_now()
    assert out.rejected and out.reason == str(what_up_says.value)
    assert out.digest is not None and out.digest != old.digest  # the refused bytes, identified
    assert holder.config is old
    assert str(what_up_says.value) in caplog.text and "still running" in caplog.text


async def test_a_change_outside_the_policy_is_refused_naming_the_keys(
    setup: tuple[Path, PolicyHolder, ConfigWatcher],
) -> None:
    cfg, holder, watcher = setup
    old = holder.config
    rewrite(
        cfg,
        listen="127.0.0.1:9999",
        agents={"agent": {"services": []}, "other": {"services": []}},
        allow=[{"host": "new.example.com"}],  # reloadable, but the file is refused whole
    )
    out = await watcher.reload_now()
    assert out.rejected and holder.config is old
    assert out.reason == "listen, agents changed: restart egress-guard to apply them; the running config stays"


def test_fixed_keys_ignores_the_policy_and_names_each_key_once(tmp_path: Path) -> None:
    a = write_config(tmp_path, BASE)
    rewrite(
        a.path,
        allow=[],
        rules=[{"name": "all", "match": "true", "action": "escalate"}],
        network={"connect_timeout": 3, "tls_timeout": 4},
    )
    b = load_config(a.path)
    assert fixed_keys(a, b) == ["network.connect_timeout", "network.tls_timeout"]


async def test_an_unchanged_file_changes_nothing(setup: tuple[Path, PolicyHolder, ConfigWatcher]) -> None:
    cfg, holder, watcher = setup
    old = holder.config
    os.utime(cfg)
    out = await watcher.reload_now()
    assert not out.changed and not out.applied and holder.config is old


async def wait_for(cond: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_the_poll_notices_edits_renames_and_preset_files(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        yaml.safe_dump({"version": 1, "name": "mine", "allow": [{"host": "one.example.com"}]})
    )
    config = write_config(tmp_path, {**BASE, "allowlists": ["./mine.yaml"]})
    assert (tmp_path / "mine.yaml").resolve() in config.files
    holder = PolicyHolder(config)
    seen: list[Outcome] = []
    watcher = ConfigWatcher(holder, signals=False, poll=0.05, settle=0.05)
    watcher.listeners.append(seen.append)
    watcher.start()
    try:
        # an edit in place
        rewrite(config.path, allow=[{"host": "two.example.com"}])
        await wait_for(lambda: "two.example.com" in hosts(holder))
        # a new file renamed over the old one (how most editors save)
        tmp = tmp_path / "new.yaml"
        tmp.write_text(config.path.read_text().replace("two.example.com", "six.example.com"))
        os.replace(tmp, config.path)
        await wait_for(lambda: "six.example.com" in hosts(holder))
        # the preset file the config reads
        (tmp_path / "mine.yaml").write_text((tmp_path / "mine.yaml").read_text().replace("one.", "ten."))
        await wait_for(lambda: "ten.example.com" in hosts(holder))
        # a broken edit is refused once (not every second), the next good one applies
        good = config.path.read_text()
        config.path.write_text("version: 1\nallow: [\n")
        await wait_for(lambda: bool(seen) and seen[-1].rejected)
        await asyncio.sleep(0.3)
        assert sum(o.rejected for o in seen) == 1 and "six.example.com" in hosts(holder)
        config.path.write_text(good.replace("six.example.com", "nine.example.com"))
        await wait_for(lambda: "nine.example.com" in hosts(holder))
    finally:
        await watcher.close()
    assert [o.applied for o in seen] == [True, True, True, False, True]


async def test_reloads_are_audit_event_rows_with_the_digests(tmp_path: Path) -> None:
    config = write_config(tmp_path, BASE)
    audit = AuditLog(config.audit_path)
    await audit.open()
    holder = PolicyHolder(config)
    watcher = ConfigWatcher(holder, audit, signals=False, poll=None)
    try:
        rewrite(config.path, allow=[{"host": "new.example.com"}])
        applied = await watcher.reload_now()
        rewrite(config.path, listen="127.0.0.1:1")
        refused = await watcher.reload_now()
    finally:
        assert await audit.close() == 0
    conn = sqlite3.connect(config.audit_path)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM audit WHERE kind = 'event' ORDER BY id")]
    assert [(r["method"], r["decision"]) for r in rows] == [("reload", "allow"), ("reload-rejected", "deny")]
    assert rows[0]["rule"] == applied.digest[:12] and rows[1]["rule"] == refused.digest[:12]
    assert rows[0]["reason"].startswith(f"{config.digest[:12]} -> {applied.digest[:12]}: allow rules")
    assert rows[1]["reason"] == f"still running {applied.digest[:12]}: {refused.reason}"


async def test_sighup_reloads_and_a_burst_is_one_reload(setup: tuple[Path, PolicyHolder, ConfigWatcher]) -> None:
    cfg, holder, _ = setup
    seen: list[Outcome] = []
    watcher = ConfigWatcher(holder, poll=None)  # SIGHUP only: the poll cannot be what reloads
    watcher.listeners.append(seen.append)
    watcher.start()
    assert watcher._on_signal, "pytest runs tests in the main thread: the handler must be installed"
    try:
        rewrite(cfg, allow=[{"host": "hup.example.com"}])
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: "hup.example.com" in hosts(holder))
        await asyncio.sleep(0.2)
    finally:
        await watcher.close()
    os.kill(os.getpid(), signal.SIGHUP)  # after close: ignored (not the default, which ends the process)
    await asyncio.sleep(0.05)
    assert [o.applied for o in seen] == [True]


async def test_the_event_rows_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    from support.pg import pg_rows

    from egress_guard.store import open_engine

    config = write_config(tmp_path, {**BASE, "store": pg_url})
    audit = AuditLog(open_engine(config))
    await audit.open()
    watcher = ConfigWatcher(PolicyHolder(config), audit, signals=False, poll=None)
    try:
        rewrite(config.path, allow=[{"host": "new.example.com"}])
        applied = await watcher.reload_now()
        good = config.path.read_text()
        config.path.write_text("version: 1\nallow: [\n")
        refused = await watcher.reload_now()
        config.path.write_text(good)
        rewrite(config.path, store={"url": pg_url, "replica": "other"})  # a replica named: a change
        named = await watcher.reload_now()
    finally:
        assert await audit.close() == 0
    # a store without `replica:` gets a random name at each load: not a change (applied above)
    assert applied.applied and named.reason.startswith("store changed: restart egress-guard")
    assert applied.digest and refused.digest and named.digest
    rows = pg_rows(pg_url, "kind = 'event'")
    assert [(r["method"], r["decision"], r["rule"]) for r in rows] == [
        ("reload", "allow", applied.digest[:12]),
        ("reload-rejected", "deny", refused.digest[:12]),
        ("reload-rejected", "deny", named.digest[:12]),
    ]
