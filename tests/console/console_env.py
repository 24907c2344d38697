"""What the console tests share: a config home made by `init` (`make_home`), and the real
console (`serve`) on a free port in a thread with its own event loop (`RunningConsole`).
The fixtures are in conftest.py; import these from here (a module named `conftest` is
ambiguous when several test directories run together)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from click.testing import CliRunner

from egress_guard.cli import main
from egress_guard.config import Config
from egress_guard.console.server import STATIC, serve


def make_home(directory: Path) -> Path:
    """`egress-guard init --dir` (config, CA, audit DB); returns the config's path."""
    directory.mkdir(parents=True, exist_ok=True)
    result = CliRunner().invoke(main, ["init", "--dir", str(directory)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return directory / "egress-guard.yaml"


class RunningConsole:
    """The real console (`serve`) on a free port, in a thread with its own event loop."""

    def __init__(self, config: Config, token: str, static: Path = STATIC, port: int = 0) -> None:
        self.config, self.token, self.static, self.listen_port = config, token, static, port
        self.url = ""
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            runner, self.url = await serve(self.config, "127.0.0.1", self.listen_port, self.token, static=self.static)
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def start(self) -> RunningConsole:
        self.thread.start()
        assert self._ready.wait(20), "console did not start"
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self.thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(20)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def sign_in(self) -> str:
        """The address `egress-guard console` prints: the token in the fragment."""
        return f"{self.url}/#token={self.token}"

    def action(self) -> dict[str, str]:
        """The headers a console page's action sends (fetch adds Content-Type for a JSON body)."""
        return self.auth | {"Origin": self.url, "Sec-Fetch-Site": "same-origin"}
