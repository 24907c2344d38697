"""What the escalation tests share: a config home (SQLite, or PostgreSQL at a URL), the
proxy's writer and Escalations running on it, the real CLI."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from click.testing import CliRunner

from egress_guard.cli import main
from egress_guard.cli.approvals import approve, deny, pending, revoke_grant, unfreeze
from egress_guard.config import load_config
from egress_guard.escalation import Escalations, PendingRequest
from egress_guard.store import AuditLog, open_engine
from egress_guard.verdicts import EscalationSettings

COMMANDS = {"pending": pending, "approve": approve, "deny": deny, "revoke-grant": revoke_grant, "unfreeze": unfreeze}


def make_home(tmp_path: Path, url: str | None = None) -> Path:
    """A config from `init` (SQLite), or pointed at the PostgreSQL store `url`."""
    result = CliRunner().invoke(main, ["init", "--dir", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = tmp_path / "egress-guard.yaml"
    if url is not None:
        body = yaml.safe_load(config.read_text())
        body["store"] = {"url": url, "replica": "eu-1"}
        config.write_text(yaml.safe_dump(body))
    return config


def cli(config: Path, command: str, *args: str) -> tuple[int, str]:
    """One of this package's commands, invoked directly (the lead registers them in `main`)."""
    result = CliRunner().invoke(COMMANDS[command], ["--config", str(config), *args], catch_exceptions=False)
    return result.exit_code, result.output


def holder(**settings: Any) -> Any:
    """What Escalations reads its settings from (PolicyHolder's shape)."""
    return SimpleNamespace(current=SimpleNamespace(escalation=EscalationSettings(**settings)))


def request(n: int = 1, **kw: Any) -> PendingRequest:
    base: dict[str, Any] = {
        "request_id": f"req-{n}",
        "agent": "researcher",
        "session": "s1",
        "method": "POST",
        "scheme": "https",
        "host": "new.example.com",
        "port": 443,
        "path": "/v1/things",
        "rule": "unknown_hosts",
        "reason": "host new.example.com is covered by no rule (unknown_hosts: escalate)",
    }
    return PendingRequest(**(base | kw))


@asynccontextmanager
async def running(config: Path, **settings: Any) -> AsyncIterator[Escalations]:
    """The proxy's writer and Escalations on the config's store, started."""
    engine = open_engine(load_config(config))
    log = AuditLog(engine, batch_delay=0)
    await log.open()
    esc = Escalations(engine, log, holder(**settings))
    await esc.start()
    try:
        yield esc
    finally:
        await esc.close()
        await log.close()


async def wait_pending(config: Path, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The pending approvals, once there are `count` (the CLI's own view)."""
    deadline = time.monotonic() + timeout
    while True:
        code, out = await asyncio.to_thread(cli, config, "pending", "--format", "json")
        assert code == 0, out
        found: list[dict[str, Any]] = json.loads(out)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)
