"""Poller: a task that runs `poll()` every `interval` seconds while the proxy runs.

Started and stopped by EgressProxy (`running` / `done`), not added to mitmproxy's addon
chain: every hook walks every addon, and these have no flow hooks. A failing poll is
logged once, then retried quietly until it succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("egress_guard")


class Poller:
    name = "poller"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def poll(self) -> None:
        raise NotImplementedError

    def running(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"egress-guard {self.name}")

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Exception as exc:
                if not failing:
                    log.error("%s failed: %r (retrying)", self.name, exc)
                failing = True
                continue
            if failing:
                log.warning("%s works again", self.name)
            failing = False
