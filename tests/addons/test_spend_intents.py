"""SpendGuard and the audit log on mitmproxy's test flows and a real SQLite file: a metered
call's reservation is committed before the call may be forwarded, a call the log cannot
record is refused, and a call that reached the provider is billed even when no answer came."""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal
from pathlib import Path

from mitmproxy.test import tflow
from support.proxy import write_config

from egress_guard.addons.flow import state
from egress_guard.addons.spend_guard import SpendGuard
from egress_guard.hosts import Host
from egress_guard.ledger import Ledger
from egress_guard.policy import Decision, Verdict
from egress_guard.providers import meter
from egress_guard.store import AuditLog


def guard(tmp_path: Path, audit: AuditLog | None) -> SpendGuard:
    config = write_config(
        tmp_path,
        {
            "allowlists": ["openai"],
            "services": ["openai"],
            "agents": {"bot": {"services": ["openai"], "limits": {"budget_usd": {"day": 10}}}},
        },
    )
    return SpendGuard(config, Ledger(config.spend), audit=audit)


def chat_flow() -> tflow.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method = "POST"
    flow.request.host, flow.request.port, flow.request.path = "api.openai.com", 443, "/v1/chat/completions?x=1"
    flow.request.content = json.dumps({"model": "gpt-4o-mini", "max_tokens": 100, "messages": []}).encode()
    st = state(flow)
    st.agent, st.session, st.service = "bot", "s1", "openai"
    st.target, st.decision = (Host("api.openai.com"), 443), Decision(Verdict.ALLOW, "ok")
    return flow


async def test_the_reservation_is_committed_before_the_call_is_forwarded(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db", batch_delay=5.0)  # only a waiter could make it commit in time
    await log.open()
    spend = guard(tmp_path, log)
    flow = chat_flow()
    await spend.request(flow)
    assert flow.response is None  # forwarded...
    hold = state(flow).hold
    assert hold is not None
    conn = sqlite3.connect(tmp_path / "a.db")  # ...and its reservation is already on disk
    got = conn.execute("SELECT request_id, agent, session, service, model, reserved_usd, path FROM spend_intents")
    assert got.fetchall() == [(flow.id, "bot", "s1", "openai", "gpt-4o-mini", f"{hold.usd:f}", "/v1/chat/completions")]
    assert hold.usd > 0
    await log.close()


async def test_a_call_whose_reservation_cannot_be_committed_is_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.db")
    await log.open()
    spend = guard(tmp_path, log)
    lock = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    flow = chat_flow()
    await spend.request(flow)
    lock.execute("ROLLBACK")
    assert flow.response is not None and flow.response.status_code == 503
    assert (
        "reservation could not be recorded, so it was not forwarded" in flow.response.headers["X-Egress-Guard-Reason"]
    )
    spend.response(flow)  # the refusal releases what it reserved
    assert spend.ledger.reserved[("total", "bot")] == 0 and spend.ledger.spent.get(("total", "bot"), 0) == 0
    await log.close()


async def test_without_an_open_audit_log_a_metered_call_is_refused(tmp_path: Path) -> None:
    spend = guard(tmp_path, None)
    flow = chat_flow()
    await spend.request(flow)
    assert flow.response is not None and flow.response.status_code == 503
    assert "was given to SpendGuard" in flow.response.headers["X-Egress-Guard-Reason"]


def errored(spend: SpendGuard, *, connected: bool) -> tflow.HTTPFlow:
    flow = chat_flow()
    st = state(flow)
    st.hold = spend.ledger.admit(spend.agents["bot"].limits, "bot", "s1", Decimal("0.5"), 100)
    st.metered = meter("openai", "/v1/chat/completions", {"model": "gpt-4o-mini"}, 10)
    flow.server_conn.tls = True
    if not connected:
        flow.server_conn.timestamp_tcp_setup = flow.server_conn.timestamp_tls_setup = None
    flow.error = tflow.terr("Client disconnected.")
    return flow


def test_a_call_that_reached_the_provider_is_billed_at_its_reservation_when_no_answer_came(tmp_path: Path) -> None:
    spend = guard(tmp_path, None)
    flow = errored(spend, connected=True)
    spend.error(flow)
    assert spend.ledger.spent[("total", "bot")] == Decimal("0.5")
    usage = state(flow).usage
    assert usage is not None and usage.usd == Decimal("0.5")  # the audit row carries it


def test_a_call_that_never_reached_the_provider_is_released(tmp_path: Path) -> None:
    spend = guard(tmp_path, None)
    flow = errored(spend, connected=False)
    spend.error(flow)
    assert spend.ledger.spent.get(("total", "bot"), 0) == 0 and spend.ledger.reserved[("total", "bot")] == 0
    assert state(flow).usage is None
