"""`init` creates the config and the audit DB 0600: a sandboxed agent runs as another local
user (nobody) and must read neither the config nor the audit table."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from egress_guard import bootstrap


def test_init_creates_config_and_audit_db_0600_and_sqlites_files_follow(tmp_path: Path) -> None:
    bootstrap.init(tmp_path)
    db = tmp_path / "egress-guard.db"
    conn = sqlite3.connect(db)  # WAL: -wal and -shm appear now, with the DB file's mode
    conn.execute("SELECT count(*) FROM audit").fetchone()
    try:
        files = [tmp_path / "egress-guard.yaml", db, *(p for p in tmp_path.glob("egress-guard.db-*"))]
        assert len(files) >= 3
        assert {str(p.name): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
            str(p.name): "0o600" for p in files
        }
    finally:
        conn.close()
