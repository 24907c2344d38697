"""The escalation tests' stores: a real SQLite file, and a real PostgreSQL database on a
throwaway cluster (as tests/fleet's; without PostgreSQL's binaries those cases skip, loudly)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.pg import PGCluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PGCluster]:
    if PGCluster.binaries() is None:
        message = "PostgreSQL (initdb, pg_ctl, postgres) is not installed: run ./dev setup; PostgreSQL cases SKIPPED"
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    cluster = PGCluster.start(Path("/tmp"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PGCluster) -> str:
    """A fresh, empty database on the session's cluster."""
    return pg_cluster.new_database()
