"""The presets end to end: curl through the real proxy to a local TLS upstream that answers
for the presets' hosts (`network.hosts` pins them to loopback). A GET goes through, a write
is refused with 403 and never reaches the upstream; git's clone requests pass, a push's
does not.

The upstream listens on a free port, not 443, so each preset runs as a copy of the shipped
file with only its ports changed (the shipped files themselves: test_preset_tables.py).
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from support.clients import curl
from support.proxy import RunningProxy, write_config
from support.upstream import GenericHandler, Upstream, _Server

from egress_guard.config.rules import preset_names

PRESET_DIR = Path(__file__).parents[2] / "allowlists"

# (preset, method, host, path, allowed)
CASES = [
    ("pypi", "GET", "pypi.org", "/simple/requests/", True),
    ("pypi", "POST", "pypi.org", "/legacy/", False),
    ("pypi", "GET", "files.pythonhosted.org", "/packages/ab/requests.whl", True),
    ("pypi", "PUT", "files.pythonhosted.org", "/packages/ab/requests.whl", False),
    ("npm", "GET", "registry.npmjs.org", "/left-pad", True),
    ("npm", "PUT", "registry.npmjs.org", "/left-pad", False),  # npm publish
    ("npm", "GET", "registry.yarnpkg.com", "/left-pad", True),
    ("npm", "DELETE", "registry.yarnpkg.com", "/left-pad/-rev/1", False),
    ("github", "GET", "api.github.com", "/repos/octo/hello", True),
    ("github", "POST", "api.github.com", "/repos/octo/hello/issues", False),
    ("github", "GET", "github.com", "/octo/hello.git/info/refs?service=git-upload-pack", True),
    ("github", "POST", "github.com", "/octo/hello.git/git-upload-pack", True),
    ("github", "POST", "github.com", "/octo/hello.git/git-receive-pack", False),  # git push
    ("github", "GET", "raw.githubusercontent.com", "/octo/hello/main/README.md", True),
    ("github", "DELETE", "raw.githubusercontent.com", "/octo/hello/main/README.md", False),
    ("github", "GET", "codeload.github.com", "/octo/hello/tar.gz/refs/heads/main", True),
    ("github", "GET", "objects.githubusercontent.com", "/release-asset/1", True),
    ("github", "GET", "release-assets.githubusercontent.com", "/release-asset/1", True),
    ("github", "PATCH", "release-assets.githubusercontent.com", "/release-asset/1", False),
]


def preset_hosts(name: str) -> list[str]:
    return sorted({r["host"] for r in yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())["allow"]})


class PresetUpstream(Upstream):
    """The generic echo upstream, with a certificate naming every host of the three presets."""

    def __init__(self, ca: trustme.CA) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*(h for p in ("pypi", "npm", "github") for h in preset_hosts(p))).configure_cert(ctx)
        self.server = _Server(ctx, GenericHandler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture(scope="module")
def preset_upstream(test_ca: tuple[trustme.CA, Path]) -> Iterator[Upstream]:
    server = PresetUpstream(test_ca[0])
    yield server
    server.close()


def local_copy(name: str, port: int, directory: Path) -> Path:
    """The shipped preset with its ports pointed at the local upstream (nothing else changed)."""
    data: dict[str, Any] = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
    for rule in data["allow"]:
        assert rule["ports"] == [443]
        rule["ports"] = [port]
    path = directory / f"{name}-local.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def preset_proxy(
    tmp_path_factory: pytest.TempPathFactory, preset_upstream: Upstream, test_ca: tuple[trustme.CA, Path]
) -> Iterator[RunningProxy]:
    assert {"pypi", "npm", "github"} <= set(preset_names())
    home = tmp_path_factory.mktemp("presets")
    files = [str(local_copy(n, preset_upstream.port, home)) for n in ("pypi", "npm", "github")]
    hosts = [h for n in ("pypi", "npm", "github") for h in preset_hosts(n)]
    config = write_config(
        home,
        {
            "allowlists": files,
            "network": {"hosts": {h: ["127.0.0.1"] for h in hosts}, "upstream_ca": str(test_ca[1])},
        },
    )
    proxy = RunningProxy(config).start()
    yield proxy
    proxy.stop()


@pytest.mark.parametrize(
    ("preset", "method", "host", "path", "allowed"),
    CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}{c[3].split('?')[0]}" for c in CASES],
)
def test_preset_through_the_proxy(
    preset_proxy: RunningProxy, preset_upstream: Upstream, preset: str, method: str, host: str, path: str, allowed: bool
) -> None:
    url = f"https://{host}:{preset_upstream.port}{path}"
    with preset_upstream.state.lock:
        preset_upstream.state.requests.clear()
    extra = ["-X", method] + (["--data-binary", "0000"] if method in ("POST", "PUT", "PATCH") else [])
    status, headers, body = curl(preset_proxy, url, *extra)
    with preset_upstream.state.lock:
        seen = [(r["method"], r["host"], r["path"]) for r in preset_upstream.state.requests]
    if allowed:
        assert status == 200, body
        assert seen == [(method, f"{host}:{preset_upstream.port}", path.split("?")[0])]
    else:
        assert status == 403, body
        assert seen == []  # refused before anything was sent upstream
        assert headers["x-egress-guard-decision"] == "deny"
        assert "not allowed" in headers["x-egress-guard-reason"]
