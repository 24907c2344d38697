"""The real proxy for the tests: EgressProxy on a free port in a thread with its own event
loop, and the config it runs with (written, bootstrapped and loaded as `init` would)."""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from egress_guard import bootstrap
from egress_guard.config import Config, load_config
from egress_guard.server import EgressProxy


def audit_rows(
    db: Path, where: str = "1", args: tuple[Any, ...] = (), expect: int | None = None, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """The audit rows matching `where`, waiting (bounded) until at least `expect` are there:
    the proxy's writer commits in batches, from another process or thread."""
    deadline = time.monotonic() + timeout
    while True:
        conn = sqlite3.connect(db)
        try:
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute(f"SELECT * FROM audit WHERE {where} ORDER BY id", args)]
        finally:
            conn.close()
        if expect is None or len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


class RunningProxy:
    """The real EgressProxy, on a free port, in a thread with its own event loop."""

    def __init__(self, config: Config, **options: Any) -> None:
        self.options = options  # more EgressProxy arguments (e.g. timeouts)
        self.config = config
        self.proxy: EgressProxy | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.proxy = EgressProxy(self.config, listen=("127.0.0.1", 0), **self.options)
        try:
            self.address = await self.proxy.start()
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        self.lost = await self.proxy.stop()

    def start(self) -> RunningProxy:
        self.thread.start()
        assert self._ready.wait(20), "proxy did not start"
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self.thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(20)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.config.ca_dir / "egress-guard-ca.pem"

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def rows(self, expect: int | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Audit rows, waiting (bounded) for the writer to flush at least `expect` of them
        (from the SQLite file, or the PostgreSQL store the config names)."""
        if self.config.store is not None:
            from support.pg import pg_rows

            return pg_rows(self.config.store.url, expect=expect, timeout=timeout)  # type: ignore[return-value]
        return audit_rows(self.config.audit_path, expect=expect, timeout=timeout)

    def row_for(self, request_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for row in self.rows():
                if row["request_id"] == request_id:
                    return row
            time.sleep(0.05)
        raise AssertionError(f"no audit row for {request_id}")


def write_config(directory: Path, body: dict[str, Any]) -> Config:
    """Write egress-guard.yaml (version 1 + body), init CA and DB, load it."""
    path = directory / "egress-guard.yaml"
    path.write_text(yaml.safe_dump({"version": 1, **body}))
    bootstrap.init(directory, path)
    return load_config(path)
