"""The running proxy's status file, next to the audit DB: who listens where, since when,
and whether each service's secret resolves *in the proxy's own environment*.

`up` writes it (and rewrites it when a secret's state changes) and removes it on shutdown;
`doctor` and `env`/`run` read it, so they report on the running proxy rather than on the
shell they are started from. It holds yes/no and the reason a secret is missing, never a
value: SecretUnavailable messages never carry one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from egress_guard.config import Config
from egress_guard.credentials import Service
from egress_guard.secrets import EnvBackend, SecretStore, SecretUnavailable


@dataclass(frozen=True)
class SecretStatus:
    secret: str  # the reference (env:OPENAI_API_KEY), never the value
    resolves: bool
    problem: str | None = None


@dataclass(frozen=True)
class Status:
    pid: int
    started_at: str
    listen: str  # HOST:PORT actually bound ([v6]:PORT)
    config: str
    checked_at: str
    services: dict[str, SecretStatus] = field(default_factory=dict)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def status_path(config: Config) -> Path:
    return config.audit_path.with_suffix(".status.json")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def check_secrets(config: Config, store: SecretStore) -> dict[str, SecretStatus]:
    """Whether each service's secret resolves where the proxy reads it, all at once."""

    async def one(service: Service) -> SecretStatus:
        ref = str(service.secret)
        try:
            if service.secret.kind == "env":  # this process's environment: read it, quietly
                EnvBackend().read(service.secret)
            else:  # through the proxy's own cache: a fresh secret costs no Vault call
                await store.get(service.secret)
            return SecretStatus(ref, True)
        except SecretUnavailable as exc:
            return SecretStatus(ref, False, str(exc))
        except Exception as exc:  # a backend bug: the type only (its message might echo data)
            return SecretStatus(ref, False, f"reading it failed ({type(exc).__name__})")

    results = await asyncio.gather(*(one(s) for s in config.services))
    return {s.name: r for s, r in zip(config.services, results, strict=True)}


def write(path: Path, status: Status) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(status), indent=2) + "\n")
    tmp.chmod(0o644)
    tmp.replace(path)


def remove(path: Path, pid: int) -> None:
    """Remove the file if it is this process's (a second `up` may have written its own)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if json.loads(path.read_text())["pid"] == pid:
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.parent.exists():  # Linux: a reused pid is not an egress-guard
        try:
            return b"egress" in cmdline.read_bytes()
        except OSError:
            return False
    return True


def read(config: Config) -> Status | None:
    """The running proxy's status for this config, or None (no file, a stale one whose
    process is gone, another config's, or unreadable)."""
    try:
        data = json.loads(status_path(config).read_text())
        status = Status(
            pid=int(data["pid"]),
            started_at=str(data["started_at"]),
            listen=str(data["listen"]),
            config=str(data["config"]),
            checked_at=str(data["checked_at"]),
            services={k: SecretStatus(**v) for k, v in data["services"].items()},
        )
        status.listen_host_port  # noqa: B018 - validates the address
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if status.config != str(config.path) or not _alive(status.pid):
        return None
    return status
