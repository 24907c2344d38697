"""WebSocket model calls on a fleet: admitted by the store's one atomic statement (reservation
and intent together), as HTTP calls are, so two replicas enforce one budget — and refused 503,
naming the store, while PostgreSQL does not answer.

Real PostgreSQL (tests/fleet/conftest.py), two real `egress-guard up` processes on one database
(tests/support/replicas.py), the fake OpenAI API's Responses-over-WebSocket mode
(tests/support/ws_upstream.py), a real WebSocket client through each replica."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from support.pg import PGCluster
from support.replicas import Replica, fleet_config
from support.upstream import Upstream
from websockets.asyncio.client import ClientConnection, connect

from egress_guard import keys, providers
from egress_guard.config import Config
from egress_guard.providers.ws import Create
from egress_guard.spend import SpendSettings

TIMEOUT = 1.0  # store.timeout in these tests
BODY = {"model": "gpt-5-mini", "input": [{"role": "user", "content": "ping"}], "max_output_tokens": 2000}


def reservation() -> Decimal:
    """What one call of BODY reserves (the first of its connection: no context carried)."""
    api = providers.get("openai")
    reader = api.websocket("/v1/responses", "")
    assert reader is not None
    event = reader.from_agent(json.dumps({"type": "response.create", **BODY}).encode())
    assert isinstance(event, Create)
    return api.reservation(SpendSettings(), event.metered)[0]


def config_for(tmp_path: Path, ws_up: Upstream, test_ca: Any, url: str, budget: Decimal | None) -> Config:
    limits = {"budget_usd": {"total": str(budget)}} if budget is not None else {}
    body = {
        "allowlists": ["openai"],
        "allow": [{"host": "api.openai.com", "ports": [ws_up.port]}],
        "services": ["openai"],
        "agents": {"researcher": {"services": ["openai"], "limits": limits}},
        "network": {"hosts": {"api.openai.com": ["127.0.0.1"]}, "upstream_ca": str(test_ca[1])},
    }
    return fleet_config(tmp_path, body, url, timeout=TIMEOUT)


def ws(replica: Replica, port: int, key: str) -> Any:
    return connect(
        f"wss://api.openai.com:{port}/v1/responses",
        proxy=replica.url,
        ssl=replica.context(),
        additional_headers={"Authorization": f"Bearer {key}"},
        open_timeout=20,
        max_size=None,
    )


async def answer(conn: ClientConnection, timeout: float = 20) -> dict[str, Any]:
    """The event that ends the call just sent: `response.completed`, or an `error`."""
    while True:
        event = json.loads(await asyncio.wait_for(conn.recv(), timeout))
        if event["type"] in ("response.completed", "error"):
            return dict(event)


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


def until(check: Any, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


async def test_two_replicas_admit_websocket_calls_against_one_budget(
    tmp_path: Path, pg_url: str, ws_up: Upstream, test_ca: Any
) -> None:
    reserved = reservation()
    budget = (reserved * Decimal("6.5")).quantize(Decimal("0.000001"))
    config = config_for(tmp_path, ws_up, test_ca, pg_url, budget)
    key = keys.mint(config, "researcher").env["OPENAI_API_KEY"]
    replicas = [Replica.start(config), Replica.start(config)]
    n = 40
    try:
        # every connection open first, then every call at once, half through each replica
        conns = [await ws(replicas[i % 2], ws_up.port, key).__aenter__() for i in range(n)]
        try:
            await asyncio.gather(*(c.send(json.dumps({"type": "response.create", **BODY})) for c in conns))
            answers = await asyncio.gather(*(answer(c) for c in conns))
        finally:
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    finally:
        for r in replicas:
            r.stop()
    ok = [a for a in answers if a["type"] == "response.completed"]
    refused = [a for a in answers if a["type"] == "error"]
    assert len(ok) + len(refused) == n
    assert len(ok) >= 6, answers  # 6 reservations fit at once
    for event in refused:  # the budget's own words, as over HTTP
        assert (event["status"], event["error"]["code"]) == (429, "rate_limit_exceeded"), event
        message = event["error"]["message"]
        assert "total budget" in message and f"may cost up to ${reserved}" in message, message

    where = "agent = 'researcher' AND kind = 'request' AND method = 'WS'"
    (settled, calls), *_ = query(
        pg_url, f"SELECT coalesce(sum(cost_usd::numeric), 0), count(cost_usd) FROM audit WHERE {where}"
    )
    per_replica = query(pg_url, f"SELECT chain, count(*) FROM audit WHERE {where} AND status = 200 GROUP BY chain")
    (spent, held), *_ = query(pg_url, "SELECT spent, reserved FROM budget_usage WHERE scope = 'total'")
    print(
        f"\n2 replicas, {n} concurrent WebSocket calls: {len(ok)} completed, {len(refused)} refused 429 "
        f"(completed per replica {sorted(c for _, c in per_replica)}); budget ${budget}, one reservation "
        f"${reserved}; settled ${settled} over {calls} calls ({(settled - budget) / reserved:+.2f} reservations "
        f"vs the budget); budget_usage spent ${spent}, reserved ${held}"
    )
    assert calls == len(ok)
    assert settled <= budget + reserved
    assert len(per_replica) == 2  # both replicas served calls
    assert spent == settled and held == 0  # every call's row settled its reservation in the store
    assert query(pg_url, "SELECT count(*) FROM spend_intents") == [(0,)]
    assert query(pg_url, "SELECT inflight FROM agent_usage WHERE agent = 'researcher'") == [(0,)]


async def test_a_websocket_call_is_refused_503_naming_the_store_while_postgres_is_frozen(
    tmp_path: Path, pg_cluster: PGCluster, pg_url: str, ws_up: Upstream, test_ca: Any
) -> None:
    config = config_for(tmp_path, ws_up, test_ca, pg_url, Decimal(10))
    assert config.store is not None
    store = config.store.name  # as messages name it: no password
    key = keys.mint(config, "researcher").env["OPENAI_API_KEY"]
    replica = Replica.start(config)
    create = json.dumps({"type": "response.create", **BODY})
    try:
        async with ws(replica, ws_up.port, key) as conn:
            await conn.send(create)
            assert (await answer(conn))["type"] == "response.completed"
            time.sleep(0.5)  # its row commits
            reached = len(ws_up.state.reported)  # type: ignore[attr-defined]
            pg_cluster.sigstop()
            try:
                sent = time.monotonic()
                await conn.send(create)
                refused = await answer(conn)
                took = time.monotonic() - sent
            finally:
                pg_cluster.sigcont()
            assert len(ws_up.state.reported) == reached  # type: ignore[attr-defined]  # never forwarded
            # the store answers again: the next call on the same connection goes through
            again: dict[str, Any] = {}
            for _ in range(20):
                await conn.send(create)
                again = await answer(conn)
                if again["type"] == "response.completed":
                    break
                await asyncio.sleep(0.5)
    finally:
        replica.stop()
    print(f"\nPostgreSQL SIGSTOPped: a WebSocket call refused in {took * 1000:.0f} ms: {refused['error']['message']}")
    assert (refused["type"], refused["status"], refused["error"]["code"]) == ("error", 503, "egress_error"), refused
    message = refused["error"]["message"]
    assert "budgets and rate limits cannot be checked" in message and store in message, message
    assert took < TIMEOUT + 1.0
    assert again["type"] == "response.completed", again
    assert until(lambda: bool(query(pg_url, "SELECT 1 FROM audit WHERE method = 'WS' AND status = 503")))
    rows = query(pg_url, "SELECT decision, status, reason FROM audit WHERE method = 'WS' AND status = 503")
    assert rows and rows[0][0] == "error" and store in rows[0][2], rows
