"""A chain member that raises in `client_connected` (where SandboxGuard admits or refuses a
sandbox's connection) closes the connection: it is never admitted unchecked."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from support.proxy import RunningProxy
from support.upstream import Upstream

from egress_guard import addons


class Raiser:
    def client_connected(self, client: Any) -> None:
        raise RuntimeError("client_connected exploded")


def test_a_raise_in_client_connected_closes_the_connection(
    monkeypatch: pytest.MonkeyPatch, make_proxy: Callable[..., RunningProxy], upstream: Upstream
) -> None:
    original = addons.chain

    def chain(rt: addons.Runtime) -> tuple[list[Any], list[Any]]:
        flow_addons, background = original(rt)
        return [Raiser(), *flow_addons], background

    monkeypatch.setattr(addons, "chain", chain)  # EgressProxy calls addons.chain
    proxy = make_proxy()
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--proxy", proxy.url, "--cacert", str(proxy.ca_cert),
         f"https://api.test.local:{upstream.port}/json"],
        capture_output=True,
        text=True,
        timeout=20,
    )  # fmt: skip
    assert out.returncode != 0, out
    assert upstream.state.connections == 0
