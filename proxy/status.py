"""The running proxy's status file, next to the audit DB: who listens where, since when,
and whether each service's secret resolves *in the proxy's own environment*.

`up` writes it (and rewrites it when a secret's state changes, when a reload swaps or
refuses a config, and every few seconds while the count of open connections moves) and
removes it on shutdown; `doctor`, `env`/`run` and `status` read it, so they report on the
running proxy rather than on the shell they are started from. It holds yes/no and the reason
a secret is missing, never a value: SecretUnavailable messages never carry one. The config
it describes is the one running: its digest, when it was loaded, what it counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from egress_guard.config import Config
from egress_guard.credentials import Service
from egress_guard.secrets import EnvBackend, SecretStore, SecretUnavailable

if TYPE_CHECKING:
    from egress_guard.reload import Holder, Outcome


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
    # the config running (None: written by a proxy before hot reload)
    digest: str | None = None  # sha256 hex of the config file and its presets
    loaded_at: str | None = None  # when that config was swapped in (the start, or the last reload)
    mode: str | None = None  # enforce | observe
    unknown_hosts: str | None = None  # deny | escalate
    counts: dict[str, int] = field(default_factory=dict)  # allow_rules, rules, services, agents
    connections: int | None = None  # open client connections at updated_at
    updated_at: str | None = None
    last_reload: dict[str, Any] | None = None  # the latest reload that changed something: at, applied, digest, reason

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


def refresh(
    status: Status, holder: Holder | None = None, connections: int | None = None, last: Outcome | None = None
) -> Status:
    """`status` with what the proxy runs now: the holder's config (digest, load time, mode,
    counts), the open connections and the last reload that changed something."""
    changes: dict[str, Any] = {"connections": connections}
    if holder is not None:
        from egress_guard.reload import digest_of  # the status file is read where reload is not needed

        config = holder.config
        changes |= {
            "digest": digest_of(config),
            "loaded_at": holder.loaded_at,
            "mode": config.policy.mode,
            "unknown_hosts": config.policy.unknown_hosts,
            "counts": {
                "allow_rules": len(config.rules),
                "rules": len(config.policy.rules),
                "services": len(config.services),
                "agents": len(config.agents),
            },
        }
    if last is not None:
        changes["last_reload"] = {
            "applied": last.applied,
            "digest": last.digest,
            "old_digest": last.old_digest,
            "reason": last.reason,
            "at": last.at,
        }
    return replace(status, **changes)


class StatusFile:
    """The status file as `up` keeps it: written at once when anything but the connection
    count changed (or the file is gone), and for the count at most every CONNECTIONS_EVERY
    seconds — a busy proxy's count moves all the time, and the file is for people and scripts.
    A write that fails raises OSError once; the next failures are quiet until one succeeds."""

    CONNECTIONS_EVERY = 2.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written: Status | None = None
        self._at = -1e9
        self._failing = False

    def update(self, status: Status) -> Status:
        """Write `status` if it is worth it; returns it (with `updated_at` when written)."""
        old = self.written
        moved = old is None or replace(old, connections=None, updated_at=None) != replace(
            status, connections=None, updated_at=None
        )
        counted = old is not None and old.connections != status.connections
        due = counted and time.monotonic() - self._at >= self.CONNECTIONS_EVERY
        if not (moved or due or not self.path.exists()):
            return status
        status = replace(status, updated_at=now())
        try:
            write(self.path, status)
        except OSError:
            if self._failing:
                return status
            self._failing = True
            raise
        self._failing = False
        self.written, self._at = status, time.monotonic()
        return status


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
    return read_file(status_path(config), config.path)


def find(config_path: Path) -> Status | None:
    """The running proxy's status for a config file that does not load (so its audit path is
    unknown): a status file beside it that names it. `status` uses it to show what runs
    while the file on disk is broken."""
    for candidate in sorted(config_path.resolve().parent.glob("*.status.json")):
        found = read_file(candidate, config_path.resolve())
        if found is not None:
            return found
    return None


def read_file(path: Path, config_path: Path) -> Status | None:
    try:
        data = json.loads(path.read_text())
        status = Status(
            pid=int(data["pid"]),
            started_at=str(data["started_at"]),
            listen=str(data["listen"]),
            config=str(data["config"]),
            checked_at=str(data["checked_at"]),
            services={k: SecretStatus(**v) for k, v in data["services"].items()},
            digest=data.get("digest"),
            loaded_at=data.get("loaded_at"),
            mode=data.get("mode"),
            unknown_hosts=data.get("unknown_hosts"),
            counts={str(k): int(v) for k, v in (data.get("counts") or {}).items()},
            connections=None if data.get("connections") is None else int(data["connections"]),
            updated_at=data.get("updated_at"),
            last_reload=data.get("last_reload") if isinstance(data.get("last_reload"), dict) else None,
        )
        status.listen_host_port  # noqa: B018 - validates the address
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if status.config != str(config_path) or not _alive(status.pid):
        return None
    return status
