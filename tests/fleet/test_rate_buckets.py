"""Shared rate limits kept in per-second buckets (store/postgres/fleet.py, `rate_buckets`): the
window is the current second and the 60 before it, a settlement corrects the tokens of the
second the call was admitted in, older buckets are deleted and never counted."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
from test_budgets import engines, intent, rows

from egress_guard.ledger import Refusal
from egress_guard.shared_ledger import SharedLedger
from egress_guard.spend import Limits, SpendSettings
from egress_guard.store import AuditRow, Batch
from egress_guard.timeutil import now_iso


async def refused(ledger: SharedLedger, limits: Limits, agent: str, tokens: int, request_id: str) -> Refusal | None:
    try:
        await ledger.reserve(limits, agent, "s", Decimal("0.01"), tokens, intent(request_id))
    except Refusal as exc:
        return exc
    return None


async def test_a_settlement_corrects_the_tokens_of_the_second_it_was_admitted_in(pg_url: str) -> None:
    (engine,) = await engines(pg_url, 1)
    try:
        ledger = SharedLedger(SpendSettings(), engine)
        limits = Limits(tokens_per_minute=100)
        assert await refused(ledger, limits, "a", 40, "t1") is None
        assert await refused(ledger, limits, "a", 40, "t2") is None
        exc = await refused(ledger, limits, "a", 40, "t3")
        assert exc is not None and exc.reason.endswith("(80 used, this request may use 40)"), exc
        assert 1 <= exc.retry_after <= 61
        row = AuditRow(
            ts=now_iso(),
            request_id="t1",
            kind="request",
            agent="a",
            session="s",
            decision="allow",
            cost_usd="0.005",
            input_tokens=2,
            output_tokens=3,
        )
        await engine.commit(Batch(rows=[row], settles=["t1"]))
        # t1 used 5 tokens, not 40: 45 in the window, so another 40 fit
        assert [r[0] for r in rows(pg_url, "SELECT sum(tokens) FROM rate_buckets WHERE agent = 'a'")] == [45]
        assert await refused(ledger, limits, "a", 40, "t4") is None
        assert rows(pg_url, "SELECT count(*) FROM spend_intents WHERE request_id = 't1'") == [(0,)]
    finally:
        await engine.close()


async def test_the_window_is_this_second_and_the_sixty_before(pg_url: str) -> None:
    (engine,) = await engines(pg_url, 1)
    try:
        ledger = SharedLedger(SpendSettings(), engine)
        limits = Limits(requests_per_minute=5)

        def bucket(ago: int, requests: int) -> None:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO rate_buckets VALUES "
                    "('b', floor(extract(epoch FROM clock_timestamp()))::bigint - %s, %s, 0)",
                    (ago, requests),
                )

        bucket(100, 50)  # long gone: deleted by the next admission, never counted
        bucket(62, 50)  # left the window
        bucket(58, 4)  # in it (58, not 60: the test may cross a second boundary)
        assert await refused(ledger, limits, "b", 0, "r1") is None
        exc: Any = await refused(ledger, limits, "b", 0, "r2")
        assert exc is not None and exc.reason == "rate limit: 5 requests per minute for agent b", exc
        assert 1 <= exc.retry_after <= 4  # the bucket of 58 s ago leaves the window 61 s after its second began
        ages = rows(
            pg_url,
            "SELECT floor(extract(epoch FROM clock_timestamp()))::bigint - second FROM rate_buckets "
            "WHERE agent = 'b' ORDER BY second",
        )
        assert len(ages) == 2 and 58 <= ages[0][0] <= 60 and ages[1][0] <= 2, ages
    finally:
        await engine.close()
