"""Revocation ids commit in order on PostgreSQL. A replica follows revocations by id (`id >
last seen`); an id is drawn at INSERT, not at COMMIT, so without the order two concurrent
`kill`s could commit ids 2 then 1, and a replica that read 2 first would never read 1: that
agent's key would stay usable there. Migration 0009 makes every INSERT into revocations wait
for the one before it to commit."""

from __future__ import annotations

import threading
import time

import psycopg

from egress_guard.config import StoreSettings
from egress_guard.store.postgres import PGStore


def test_a_revocation_waits_for_the_one_before_it_and_gets_a_higher_id(pg_url: str) -> None:
    with PGStore(StoreSettings(url=pg_url, replica="t"), readonly=False):
        pass  # migrated
    first = psycopg.connect(pg_url)  # a transaction, like the CLI's write
    second = psycopg.connect(pg_url, autocommit=True)
    insert = "INSERT INTO revocations (ts, agent, reason) VALUES ('2026-01-01T00:00:00.000Z', %s, 'kill') RETURNING id"
    try:
        (alice,) = first.execute(insert, ("alice",)).fetchone() or (None,)
        got: dict[str, int] = {}
        other = threading.Thread(target=lambda: got.setdefault("bob", second.execute(insert, ("bob",)).fetchone()[0]))
        other.start()
        time.sleep(0.3)
        assert "bob" not in got  # waits for alice's revocation to commit
        # what a replica polling now sees: nothing yet (alice's is uncommitted, bob's not drawn)
        with psycopg.connect(pg_url, autocommit=True) as reader:
            assert reader.execute("SELECT id FROM revocations").fetchall() == []
        first.commit()
        other.join(5)
        assert got["bob"] > alice
    finally:
        first.close()
        second.close()
