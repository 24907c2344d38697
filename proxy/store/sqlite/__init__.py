"""The SQLite store: one file in WAL mode.

schema.py   named migrations and the connections every part opens
writes.py   every write: a writer's batch, each typed write
queries.py  SQLiteStore (a command's view) and the reads the proxy shares with it
engine.py   SQLiteEngine (the running proxy's view: commits, upkeep, reads)
"""

from egress_guard.store.sqlite.engine import SQLiteEngine
from egress_guard.store.sqlite.queries import SQLiteStore
from egress_guard.store.sqlite.schema import MIGRATIONS, migrate

__all__ = ["MIGRATIONS", "SQLiteEngine", "SQLiteStore", "migrate"]
