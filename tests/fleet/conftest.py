"""The fleet tests' PostgreSQL: one throwaway cluster per test session (`pg_cluster`), a
fresh database per test (`pg_url`). Without PostgreSQL's binaries the tests skip, loudly."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.pg import PGCluster


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PGCluster]:
    if PGCluster.binaries() is None:
        message = "PostgreSQL (initdb, pg_ctl, postgres) is not installed: run ./dev setup; fleet tests SKIPPED"
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    cluster = PGCluster.start(Path("/tmp"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PGCluster) -> str:
    """A fresh, empty database on the session's cluster (its URL: no password, trust auth)."""
    return pg_cluster.new_database()
