"""The console tests' fixtures: a token, a config home, the real console started on it
(`start_console(config_path, static=...)` for another home or static directory)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from console_env import RunningConsole, make_home

from egress_guard.config import load_config


@pytest.fixture
def console_token() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_home(tmp_path / "home")


@pytest.fixture
def start_console(console_token: str) -> Iterator[Callable[..., RunningConsole]]:
    started: list[RunningConsole] = []

    def start(config_path: Path, **kw: Any) -> RunningConsole:
        running = RunningConsole(load_config(config_path), console_token, **kw).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def console(home: Path, start_console: Callable[..., RunningConsole]) -> RunningConsole:
    return start_console(home)
