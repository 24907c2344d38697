"""The shipped presets pypi, npm and github, as the policy reads them: read-only (GET/HEAD),
GitHub's git over HTTPS for clone and fetch only. A decision table per preset, run through
`load_config` (the file as shipped) and `policy.decide`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from egress_guard.config import load_config
from egress_guard.hosts import normalize_host
from egress_guard.policy import Destination, Verdict, decide

A, D = Verdict.ALLOW, Verdict.DENY

TABLES: dict[str, list[tuple[str, str, Verdict]]] = {
    "pypi": [
        ("GET", "https://pypi.org/simple/requests/", A),
        ("GET", "https://pypi.org/pypi/requests/json", A),
        ("HEAD", "https://pypi.org/simple/", A),
        ("GET", "https://files.pythonhosted.org/packages/ab/cd/requests-2.32.3-py3-none-any.whl", A),
        ("POST", "https://pypi.org/simple/requests/", D),  # read-only
        ("POST", "https://upload.pypi.org/legacy/", D),  # twine upload: another host
        ("PUT", "https://files.pythonhosted.org/packages/x.whl", D),
        ("GET", "http://pypi.org/simple/", D),  # port 80: plain HTTP is not in the preset
        ("GET", "https://test.pypi.org/simple/", D),
    ],
    "npm": [
        ("GET", "https://registry.npmjs.org/left-pad", A),
        ("GET", "https://registry.npmjs.org/left-pad/-/left-pad-1.3.0.tgz", A),
        ("HEAD", "https://registry.npmjs.org/@types%2fnode", A),
        ("GET", "https://registry.yarnpkg.com/react", A),
        ("PUT", "https://registry.npmjs.org/my-package", D),  # npm publish
        ("POST", "https://registry.npmjs.org/-/npm/v1/security/advisories/bulk", D),  # npm audit
        ("DELETE", "https://registry.npmjs.org/-/user/token/abc", D),  # npm logout / token revoke
        ("GET", "https://www.npmjs.com/package/left-pad", D),
    ],
    "github": [
        ("GET", "https://api.github.com/repos/octo/hello/pulls", A),
        ("HEAD", "https://api.github.com/rate_limit", A),
        ("POST", "https://api.github.com/repos/octo/hello/issues", D),  # a write
        ("PATCH", "https://api.github.com/repos/octo/hello", D),
        ("DELETE", "https://api.github.com/repos/octo/hello", D),
        ("POST", "https://api.github.com/graphql", D),  # GraphQL can mutate: not in the preset
        # git clone / fetch over HTTPS: ref discovery, then the pack
        ("GET", "https://github.com/octo/hello.git/info/refs?service=git-upload-pack", A),
        ("GET", "https://github.com/octo/hello/info/refs?service=git-upload-pack", A),
        ("POST", "https://github.com/octo/hello.git/git-upload-pack", A),
        # git push: the discovery GET only lists refs (the query is not matched), the push itself is refused
        ("GET", "https://github.com/octo/hello.git/info/refs?service=git-receive-pack", A),
        ("POST", "https://github.com/octo/hello.git/git-receive-pack", D),
        ("POST", "https://github.com/octo/hello.git/git-upload-pack/../git-receive-pack", D),  # never by a dot segment
        ("POST", "https://github.com/octo/hello.git/info/lfs/objects/batch", D),  # LFS upload (and download) batch
        ("POST", "https://github.com/login/oauth/access_token", D),
        ("GET", "https://github.com/octo/hello/releases/download/v1.0/tool-linux-amd64.tar.gz", A),
        ("GET", "https://github.com/octo/hello/archive/refs/tags/v1.0.tar.gz", A),
        ("GET", "https://github.com/settings/tokens", D),  # the web UI is not in the preset
        ("GET", "https://codeload.github.com/octo/hello/tar.gz/refs/heads/main", A),
        ("GET", "https://raw.githubusercontent.com/octo/hello/main/README.md", A),
        ("GET", "https://objects.githubusercontent.com/github-production-release-asset/1", A),
        ("GET", "https://release-assets.githubusercontent.com/github-production-release-asset/1", A),
        ("PUT", "https://raw.githubusercontent.com/octo/hello/main/README.md", D),
        ("POST", "https://uploads.github.com/repos/octo/hello/releases/1/assets", D),  # release upload: another host
        ("GET", "https://gist.githubusercontent.com/octo/1/raw", D),
    ],
}


@pytest.mark.parametrize(
    ("preset", "method", "url", "verdict"),
    [(name, *row) for name, rows in TABLES.items() for row in rows],
    ids=lambda v: v if isinstance(v, str) and not v.startswith("http") else None,
)
def test_preset_decisions(tmp_path: Path, preset: str, method: str, url: str, verdict: Verdict) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(f"version: 1\nallowlists: [{preset}]\n")
    rules = load_config(path).rules
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    dest = Destination(normalize_host(parts.hostname or ""), port, method, target)
    decision = decide(rules, dest)
    assert decision.verdict is verdict, f"{method} {url}: {decision.reason}"
    if verdict is A:  # the tunnel it travels in is admitted too
        assert decide(rules, Destination(dest.host, port)).verdict is A


@pytest.mark.parametrize("preset", sorted(TABLES))
def test_every_preset_rule_is_read_only_except_githubs_upload_pack(tmp_path: Path, preset: str) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(f"version: 1\nallowlists: [{preset}]\n")
    for rule in load_config(path).rules:
        assert rule.ports == frozenset({443})
        assert rule.methods is not None
        if rule.methods <= {"GET", "HEAD"}:
            continue
        assert (rule.host, rule.methods, rule.paths) == ("github.com", frozenset({"POST"}), ("/*/git-upload-pack",))
