from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).parent))

from support.pg import PGCluster
from support.proxy import RunningProxy, write_config
from support.upstream import Upstream


@pytest.fixture(scope="session", autouse=True)
def no_real_secret_anywhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole suite: no real key in any file the tests left (audit DBs and their
    WAL, configs, bao logs) nor in the log output of the whole run."""
    import base64
    import logging

    from support.llm.common import REAL

    log_file = tmp_path_factory.mktemp("logs") / "suite.log"
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("egress_guard", "mitmproxy")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)
    handler.close()
    forms = [f for v in REAL.values() for f in (v.encode(), base64.b64encode(v.encode()))]
    leaks = [
        str(path)
        for path in tmp_path_factory.getbasetemp().rglob("*")
        if path.is_file() and any(form in path.read_bytes() for form in forms)
    ]
    assert leaks == [], f"real secrets found in {leaks}"


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


@pytest.fixture
def llm_upstream(test_ca: tuple[trustme.CA, Path]) -> Iterator[Upstream]:
    from support.llm import LLMHandler
    from support.llm.openai import SlowStream

    SlowStream.stop.clear()
    server = Upstream(test_ca[0], LLMHandler)
    yield server
    SlowStream.stop.set()
    server.close()


SERVICE_HOSTS = ["api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com", "api.github.com"]


@pytest.fixture
def cred_config(llm_upstream: Upstream, upstream: Upstream, test_ca: tuple[trustme.CA, Path]) -> dict[str, Any]:
    """A config with the four credentialed presets pointed at the local LLM upstream, plus
    api.test.local (an allowed host bound to no service) on the generic upstream."""
    return {
        "allowlists": ["openai", "anthropic", "google-gemini", "github"],
        "allow": [{"host": h, "ports": [llm_upstream.port]} for h in SERVICE_HOSTS]
        + [{"host": "api.test.local", "ports": [upstream.port]}],
        "services": ["openai", "anthropic", "google-gemini", "github"],
        "agents": {
            "researcher": {"services": ["openai", "anthropic", "google-gemini", "github"]},
            "writer": {"services": ["anthropic"]},
        },
        "network": {
            "hosts": {h: ["127.0.0.1"] for h in [*SERVICE_HOSTS, "api.test.local"]},
            "upstream_ca": str(test_ca[1]),
        },
    }


@pytest.fixture
def real_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The real keys, in the environment of the (in-process) proxy: the env backend."""
    from support.llm.common import REAL_ENV

    for name, value in REAL_ENV.items():
        monkeypatch.setenv(name, value)
    return REAL_ENV


@pytest.fixture
def cred_proxy(make_proxy: Callable[..., RunningProxy], cred_config: dict[str, Any], real_env) -> RunningProxy:
    return make_proxy(**cred_config)


@pytest.fixture
def ws_up(test_ca: tuple[trustme.CA, Path]) -> Iterator[Any]:
    """The fake OpenAI API over HTTP and WebSocket (Responses, Realtime, echo) on one TLS port."""
    from support.ws_upstream import start

    server = start(test_ca[0])
    yield server
    server.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PGCluster]:
    """One throwaway PostgreSQL cluster for the whole run (the fleet, escalation, reload and
    console tests' PostgreSQL cases); without PostgreSQL's binaries they skip, loudly."""
    if PGCluster.binaries() is None:
        message = "PostgreSQL (initdb, pg_ctl, postgres) is not installed: run ./dev setup; PostgreSQL tests SKIPPED"
        import warnings

        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    cluster = PGCluster.start(Path("/tmp"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PGCluster) -> str:
    """A fresh, empty database on the run's cluster (its URL: no password, trust auth)."""
    return pg_cluster.new_database()
