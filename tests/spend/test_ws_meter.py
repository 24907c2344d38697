"""ws_meter: one WebSocket connection's metered calls against the ledger — admitted or
refused, settled in order from the usage their last event reports, billed at their
reservation when they break off, and the close row's summary. Pure: no sockets. What the
messages mean is tests/providers/test_openai_ws.py."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from support.proxy import write_config

from egress_guard import providers
from egress_guard.credentials import Agent
from egress_guard.ledger import Ledger, Refusal
from egress_guard.providers.ws import Create, Failed, Finished
from egress_guard.spend import Limits, SpendSettings
from egress_guard.ws_meter import Refused, WsCall, WsMeter, carry, refused_by, upgrade_refusal

SETTINGS = SpendSettings()
OPENAI = providers.get("openai")
USAGE = {"input_tokens": 1000, "output_tokens": 200, "input_tokens_details": {"cached_tokens": 0}}


def msg(obj: object) -> bytes:
    return json.dumps(obj).encode()


def connection(path: str = "/v1/responses", **limits: Any) -> tuple[WsMeter, Ledger]:
    ledger = Ledger(SETTINGS)
    reader = OPENAI.websocket(path, "")
    assert reader is not None
    return WsMeter(reader, OPENAI, SETTINGS, ledger, Limits(**limits), "bot", "openai", "s1", "f1"), ledger


def admit(meter: WsMeter, event: Create) -> WsCall | Refused:
    """As the WebSocket addon admits a call on one process's ledger: quoted by the meter,
    admitted (or refused) by the ledger."""
    quote = meter.quote(event, 100)
    if isinstance(quote, Refused):
        return quote
    try:
        hold = meter.ledger.admit(meter.limits, meter.agent, meter.session, quote.usd, quote.tokens)
    except Refusal as refusal:
        return refused_by(refusal, quote.metered.model)
    return meter.admitted(quote, hold)


def create(meter: WsMeter, **fields: object) -> WsCall:
    event = meter.reader.from_agent(msg({"type": "response.create", "model": "gpt-5-mini", **fields}))
    assert isinstance(event, Create)
    call = admit(meter, event)
    assert isinstance(call, WsCall)
    meter.forwarded(call)
    return call


def test_calls_are_settled_in_order_from_their_usage() -> None:
    meter, ledger = connection()
    first, second = create(meter), create(meter)
    assert (first.request_id, second.request_id) == ("f1:ws1", "f1:ws2")
    assert ledger.reserved[("total", "bot")] == first.hold.usd + second.hold.usd
    meter.answering(10)
    meter.started()
    assert first.started and not second.started and first.response_bytes == 10
    done = meter.finished(Finished("completed", {"model": "gpt-5-mini", "usage": USAGE}))
    assert done.call is first and done.status == 200 and done.cost is not None
    assert done.note == "WebSocket responses call: response completed"
    assert (done.cost.input_tokens, done.cost.output_tokens) == (1000, 200)
    assert ledger.spent[("total", "bot")] == done.cost.usd and meter.carried == 1200
    # the next call that continues the response is reserved for the context it carries
    continued = admit(meter, Create(carry(second.metered, 0), True))
    assert isinstance(continued, WsCall) and continued.metered.input_bytes == second.metered.input_bytes + 3600


def test_a_finished_call_without_priced_usage_is_billed_at_its_reservation() -> None:
    meter, ledger = connection()
    call = create(meter)
    done = meter.finished(Finished("completed", None))
    assert done.cost is not None and done.cost.usd == call.hold.usd
    assert done.note.endswith("no priced usage reported: billed at its reservation")
    assert ledger.spent[("total", "bot")] == call.hold.usd and meter.carried == 0


@pytest.mark.parametrize(("started", "billed"), [(False, False), (True, True)])
def test_an_error_event_bills_a_call_only_if_the_server_had_begun_it(started: bool, billed: bool) -> None:
    meter, ledger = connection()
    call = create(meter)
    if started:
        meter.started()
    done = meter.failed(Failed(429, "slow down"))
    assert done is not None and done.status == 429 and done.call is call
    assert ledger.spent.get(("total", "bot"), Decimal(0)) == (call.hold.usd if billed else 0)
    assert ledger.reserved[("total", "bot")] == 0
    assert meter.failed(Failed(None, "x")) is None  # no call open: nothing to settle


def test_calls_open_when_the_connection_ends_are_billed_at_their_reservation() -> None:
    meter, ledger = connection()
    a, b = create(meter), create(meter)
    closed = meter.closed()
    assert [s.call for s in closed] == [a, b] and all(s.status is None for s in closed)
    assert ledger.spent[("total", "bot")] == a.hold.usd + b.hold.usd and not meter.calls
    assert meter.summary() == f"; 2 model calls, ${a.hold.usd + b.hold.usd:f} billed"


def test_refusals_model_price_and_budget() -> None:
    meter, ledger = connection(models={"openai": ("gpt-5-mini",)}, budget_day=Decimal("0.000001"))
    assert meter.disallowed("gpt-5-mini") is None
    refused = meter.disallowed("gpt-5-pro")
    assert refused is not None and (refused.status, refused.code) == (403, "model_not_allowed")
    event = meter.reader.from_agent(msg({"type": "response.create", "model": "gpt-5-mini"}))
    assert isinstance(event, Create)
    over = admit(meter, event)
    assert isinstance(over, Refused) and (over.status, over.code) == (429, "rate_limit_exceeded")
    assert "day budget of $0.000001" in over.reason and over.retry_after is not None
    unpriced = WsMeter(meter.reader, OPENAI, SETTINGS, ledger, Limits(), "bot", "openai", "s1", "f1")
    event = meter.reader.from_agent(msg({"type": "response.create", "model": "no-such-model"}))
    assert isinstance(event, Create)
    got = admit(unpriced, event)
    assert isinstance(got, Refused) and (got.status, got.code) == (403, "model_not_priced")
    assert meter.refusal_id() == "f1:ws2" and meter.refusal_id("f1:ws9") == "f1:ws9"  # (ws1: the quoted call)
    assert meter.summary() == "; 0 model calls, $0 billed, 2 refused"


def test_a_realtime_response_the_server_started_is_billed_and_a_spent_budget_closes() -> None:
    meter, ledger = connection("/v1/realtime?model=gpt-realtime", budget_total=Decimal("0.0001"))
    assert not meter.exhausted()
    meter.reader.from_upstream(msg({"type": "response.created", "response": {}}))
    meter.started()  # nothing open: nothing to mark
    usage = {"response": {"usage": {"input_tokens": 100, "output_tokens": 100}}}
    done = meter.finished(Finished("completed", usage))
    assert done.call.request_id == "f1:ws1" and done.call.metered.model == "gpt-realtime"
    assert done.cost is not None and ledger.spent[("total", "bot")] == done.cost.usd > Decimal("0.0001")
    assert meter.exhausted() and meter.calls_made == 1
    again = meter.finished(Finished("completed", usage))  # admitted over the limit: spent all the same
    assert again.call.hold.settled and ledger.spent[("total", "bot")] == 2 * done.cost.usd


def test_upgrade_refusals(tmp_path: Path) -> None:
    (service,) = write_config(tmp_path, {"allowlists": ["openai"], "services": ["openai"]}).services
    assert service.meter is not None
    ledger = Ledger(SETTINGS)
    limited = Agent("bot", ("openai",), Limits(models={"openai": ("gpt-realtime-mini",)}))
    free = Agent("bot", ("openai",), Limits())

    def refusal(agent: Agent | None, path: str, websocket: bool = True) -> tuple[int, str] | None:
        return upgrade_refusal(replace(service, websocket=websocket), agent, service.meter, path, ledger, "")

    assert refusal(free, "/v1/responses", websocket=False) == (
        426,
        "WebSocket is turned off for openai (services.openai.websocket: false); use its HTTP API",
    )
    assert refusal(free, "/v1/responses") is None and refusal(free, "/v1/audio") is None
    assert refusal(None, "/v1/audio") is None  # no agent: nothing to account to
    assert refusal(limited, "/v1/audio") == (
        403,
        "egress-guard cannot meter WebSocket calls to /v1/audio of openai, and agent bot has limits there; "
        "use the HTTP API",
    )
    got = refusal(limited, "/v1/realtime?model=gpt-realtime")
    assert got is not None and got[0] == 403 and "model 'gpt-realtime' is not allowed" in got[1]
    assert refusal(limited, "/v1/realtime?model=gpt-realtime-mini") is None
