"""Replicas for the fleet tests: `egress-guard up` processes sharing one PostgreSQL store.

    config = fleet_config(tmp_path, cred_config, pg_url, timeout=1)
    r1, r2 = Replica.start(config), Replica.start(config)   # each its own process and name
    r1.client(key) ... r2.kill9() ... r1.stop()
    pg_rows(pg_url, "kind = 'request'")

One config file (and so one CA and one fake-key HMAC key, as replicas behind a load balancer
share); each process picks its own replica name (the config gives none).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
from psycopg.rows import dict_row

from egress_guard.config import Config
from support.llm.common import REAL_ENV
from support.proxy import write_config

EG = [sys.executable, "-m", "egress_guard"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fleet_config(directory: Path, body: dict[str, Any], url: str, **store: Any) -> Config:
    """The replicas' config: `body` with `store:` the PostgreSQL URL (and `store` options) and
    query strings recorded (each test call carries a marker `?m=…`)."""
    return write_config(
        directory, {**body, "store": {"url": url, **store}, "audit": {**body.get("audit", {}), "query_strings": True}}
    )


def marker(path: str | None) -> str | None:
    return parse_qs(urlsplit(path or "").query).get("m", [None])[0]


def pg_rows(url: str, where: str = "TRUE", args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5, row_factory=dict_row) as conn:
        return list(conn.execute(f"SELECT * FROM audit WHERE {where} ORDER BY id", args))  # type: ignore[arg-type]


class Replica:
    """One `egress-guard up` process on a free port; its stderr goes to `log`."""

    def __init__(self, config: Config, proc: subprocess.Popen[str], port: int, log: Path) -> None:
        self.config, self.proc, self.port, self.log = config, proc, port, log

    @classmethod
    def start(cls, config: Config, env: dict[str, str] | None = None) -> Replica:
        port = free_port()
        log = config.path.parent / f"replica-{port}.log"
        proc = subprocess.Popen(
            [*EG, "up", "--config", str(config.path), "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE,
            stderr=log.open("a"),
            text=True,
            env={**os.environ, **REAL_ENV, **(env or {})},
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
                if line.startswith("egress-guard listening on"):
                    return cls(config, proc, port, log)
                if not line and proc.poll() is not None:
                    break
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"egress-guard up did not start:\n{log.read_text()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.config.ca_dir / "egress-guard-ca.pem"))

    def client(self, timeout: float = 20) -> httpx.Client:
        return httpx.Client(proxy=self.url, verify=self.context(), trust_env=False, timeout=timeout)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not leave within 30 s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode
