"""The PostgreSQL store (a fleet of replicas sharing one database): see docs/fleet.md.

schema.py   named migrations (SQLite's, in PostgreSQL's dialect), connection settings
writes.py   every write: a writer's batch in one transaction, each typed write
queries.py  PGStore (a command's view, sync psycopg) and the reads the proxy shares with it
engine.py   PGEngine (the running proxy's view: async psycopg, a pool, a deadline per call)
fleet.py    budgets and rate limits shared across replicas (migration 0008_fleet, settles)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from egress_guard.store.postgres.engine import PGEngine
    from egress_guard.store.postgres.queries import PGStore
    from egress_guard.store.postgres.schema import MIGRATIONS

__all__ = ["MIGRATIONS", "PGEngine", "PGStore"]
_WHERE = {"PGEngine": "engine", "PGStore": "queries", "MIGRATIONS": "schema"}


def __getattr__(name: str) -> Any:
    """Imported on first use: a proxy on SQLite never loads psycopg (≈ 0.1 s, ≈ 10 MB)."""
    if name in _WHERE:
        return getattr(importlib.import_module(f"egress_guard.store.postgres.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
