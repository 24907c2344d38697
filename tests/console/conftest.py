"""The console tests' fixtures: a token, a config home, the real console started on it
(`start_console(config_path, static=...)` for another home or static directory)."""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from console_env import RunningConsole, make_home
from support.pg import PGCluster

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


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PGCluster]:
    """A throwaway PostgreSQL cluster (skipped, loudly, without its binaries)."""
    if PGCluster.binaries() is None:
        message = "PostgreSQL (initdb, pg_ctl, postgres) is not installed: run ./dev setup; console PG test SKIPPED"
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    cluster = PGCluster.start(Path("/tmp"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PGCluster) -> str:
    return pg_cluster.new_database()
