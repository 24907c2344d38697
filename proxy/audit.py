"""Moved: the audit log is part of the store (`egress_guard.store`), the time helpers are in
`egress_guard.timeutil`. These names stay importable from here only until their importers
move to the new modules (issue #9 step 5); new code imports from those."""

from egress_guard.store import (
    COLUMNS,
    SETTLED_AT_RESERVATION,
    AuditLog,
    AuditRow,
    AuditUnavailable,
    Filters,
    Intent,
    migrate,
)
from egress_guard.timeutil import now_iso, parse_when

__all__ = [
    "COLUMNS",
    "SETTLED_AT_RESERVATION",
    "AuditLog",
    "AuditRow",
    "AuditUnavailable",
    "Filters",
    "Intent",
    "migrate",
    "now_iso",
    "parse_when",
]
