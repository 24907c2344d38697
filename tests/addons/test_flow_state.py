"""The flow state (addons/flow.py): one typed object per flow, under one metadata key, and
the error shape of a refusal taken from the flow's service, not from a process-wide table."""

from __future__ import annotations

import json
from pathlib import Path

from mitmproxy.test import tflow
from support.policy import FixedPolicy
from support.proxy import write_config

from egress_guard.addons.connect_guard import ConnectGuard
from egress_guard.addons.flow import KEY, FlowState, state
from egress_guard.addons.request_guard import RequestGuard
from egress_guard.resolve import Resolver


def test_state_is_created_once_under_one_key() -> None:
    flow = tflow.tflow()
    assert flow.metadata == {}
    st = state(flow)
    assert isinstance(st, FlowState) and state(flow) is st
    st.agent = "bot"
    assert list(flow.metadata) == [KEY] and state(flow).agent == "bot"


def connect(host: str) -> tflow.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method, flow.request.host, flow.request.port = "CONNECT", host, 443
    return flow


def test_a_refusal_takes_the_error_shape_of_its_service(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"allowlists": ["anthropic"], "services": ["anthropic"]})
    guard = ConnectGuard(FixedPolicy(), {}, config.services)  # no rule: every CONNECT is refused
    flow = connect("api.anthropic.com")
    guard.http_connect(flow)
    assert state(flow).style == "anthropic"
    assert flow.response is not None and flow.response.status_code == 403
    body = json.loads(flow.response.content)
    assert body["type"] == "error" and body["error"]["type"] == "permission_error"  # Anthropic's shape

    other = connect("example.com")  # a host of no service: egress-guard's own shape
    guard.http_connect(other)
    assert state(other).style is None
    assert other.response is not None and json.loads(other.response.content)["error"]["type"] == "egress_denied"

    # another proxy's guard, built without that service, answers in its own shape: the
    # style is per guard and per flow, nothing a previous chain() left behind
    plain = connect("api.anthropic.com")
    ConnectGuard(FixedPolicy(), {}).http_connect(plain)
    assert plain.response is not None and "type" not in json.loads(plain.response.content)


async def test_the_request_guard_sets_the_style_with_the_target(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"allowlists": ["google-gemini"], "services": ["google-gemini"]})
    guard = RequestGuard(FixedPolicy(), {}, Resolver(), config.services)
    flow = tflow.tflow()
    flow.request.host, flow.request.port, flow.request.scheme = "generativelanguage.googleapis.com", 443, "http"
    flow.request.headers["host"] = "generativelanguage.googleapis.com:443"
    await guard.requestheaders(flow)
    st = state(flow)
    assert st.target is not None and st.target[0].name == "generativelanguage.googleapis.com"
    assert st.style == "google"  # the API the service speaks (its meter), not its name
    assert flow.response is not None
    assert json.loads(flow.response.content)["error"]["status"] == "PERMISSION_DENIED"  # Gemini's shape
