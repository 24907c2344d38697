from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).parent))

from helpers import RunningProxy, Upstream, write_config


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    """The upstreams' own CA: unrelated to egress-guard's, trusted only via network.upstream_ca."""
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("test-ca") / "test-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


@pytest.fixture
def upstream(test_ca: tuple[trustme.CA, Path]) -> Iterator[Upstream]:
    server = Upstream(test_ca[0])
    yield server
    server.state.sse_gate.set()
    server.close()


@pytest.fixture
def plain_upstream() -> Iterator[Upstream]:
    server = Upstream(None)
    yield server
    server.close()


@pytest.fixture
def make_proxy(
    tmp_path: Path, upstream: Upstream, test_ca: tuple[trustme.CA, Path]
) -> Iterator[Callable[..., RunningProxy]]:
    """Start the real proxy with a config: by default it allows api.test.local on the TLS
    upstream's port; both test names are pinned to 127.0.0.1; the test CA is trusted upstream."""
    started: list[RunningProxy] = []

    def make(
        allow: list[dict[str, Any]] | None = None, network: dict[str, Any] | None = None, **extra: Any
    ) -> RunningProxy:
        body: dict[str, Any] = {
            "allow": allow if allow is not None else [{"host": "api.test.local", "ports": [upstream.port]}],
            "network": {
                "hosts": {name: ["127.0.0.1"] for name in ("api.test.local", "other.test.local")},
                "upstream_ca": str(test_ca[1]),
                **(network or {}),
            },
            **extra,
        }
        proxy = RunningProxy(write_config(tmp_path, body)).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(make_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    return make_proxy()
