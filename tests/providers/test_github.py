"""GitHub's REST API: nothing metered, its own error shape."""

from __future__ import annotations

from egress_guard import providers

API = providers.get("github")


def test_nothing_is_metered() -> None:
    assert API.meter("/repos/o/r/issues", {"model": "gpt-4o"}, 10) is None
    assert API.websocket("/v1/responses", "") is None


def test_error_body() -> None:
    ours = {"type": "egress_denied", "message": "egress-guard: no", "rule": "r", "request_id": "id"}
    assert API.error_body(ours, 403) == {
        "message": "egress-guard: no",
        "documentation_url": "https://github.com/egress-guard",
        "egress_guard": ours,
    }
