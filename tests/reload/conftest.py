"""PostgreSQL for the status tests: the session's cluster from support.pg (as tests/fleet)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.pg import PGCluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PGCluster]:
    if PGCluster.binaries() is None:
        message = "PostgreSQL (initdb, pg_ctl, postgres) is not installed: run ./dev setup; PostgreSQL tests SKIPPED"
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
