"""The store: everything egress-guard keeps in its database, and the only code that speaks SQL.

  records.py    what it holds (AuditRow, Intent, Spent, Revocation, Filters, Approval, GrantRecord,
                Freeze), the typed writes
  interface.py  Store (a command's view) and Engine (the running proxy's view)
  writer.py     AuditLog: the proxy's one writer, engine-neutral
  sqlite/       the SQLite engine: schema and migrations, writes, queries

A second engine (PostgreSQL) is a package beside sqlite/ implementing Store and Engine, and
a branch in `open_store` / `open_engine`; nothing that uses the store changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from egress_guard.store.interface import Batch, Engine, Store
from egress_guard.store.records import (
    COLUMNS,
    SETTLED_AT_RESERVATION,
    AddFreeze,
    Approval,
    AuditRow,
    AuditUnavailable,
    CreateApproval,
    DecideApproval,
    ExpireApproval,
    ExpireLeftovers,
    Filters,
    Freeze,
    GrantRecord,
    InsertKey,
    Intent,
    LiftFreeze,
    Reservations,
    ResetBudget,
    Revocation,
    RevokeGrant,
    RevokeKeys,
    SetBudget,
    Spent,
    StoreError,
    Write,
)
from egress_guard.store.sqlite import SQLiteEngine, SQLiteStore, migrate
from egress_guard.store.writer import AuditLog

if TYPE_CHECKING:
    from egress_guard.config import Config


def open_store(config: Config, *, write: bool = False) -> Store:
    """The store a config names, for a command: read-only, or migrated and writable. Close it
    (`with`). Raises StoreError if it cannot be opened."""
    if config.store is not None:
        from egress_guard.store.postgres import PGStore

        return PGStore(config.store, readonly=not write)
    return SQLiteStore(config.audit_path, readonly=not write)


def open_engine(config: Config) -> Engine:
    """The store a config names, for the running proxy (opened by `AuditLog.open`)."""
    if config.store is not None:
        from egress_guard.store.postgres import PGEngine

        return PGEngine(config.store)
    return SQLiteEngine(config.audit_path, synchronous=config.audit_synchronous)


__all__ = [
    "COLUMNS",
    "SETTLED_AT_RESERVATION",
    "AddFreeze",
    "Approval",
    "AuditLog",
    "AuditRow",
    "AuditUnavailable",
    "Batch",
    "CreateApproval",
    "DecideApproval",
    "Engine",
    "ExpireApproval",
    "ExpireLeftovers",
    "Filters",
    "Freeze",
    "GrantRecord",
    "InsertKey",
    "Intent",
    "LiftFreeze",
    "Reservations",
    "ResetBudget",
    "Revocation",
    "RevokeGrant",
    "RevokeKeys",
    "SQLiteEngine",
    "SQLiteStore",
    "SetBudget",
    "Spent",
    "Store",
    "StoreError",
    "Write",
    "migrate",
    "open_engine",
    "open_store",
]
