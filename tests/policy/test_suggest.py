"""`policy suggest`: audit rows → allow rules that load with `load_config` and admit the same
requests per `policy.decide`; errors and enforced refusals never become rules; the command
reads the config's store and writes a file only when told to replace it."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from egress_guard.cli import main
from egress_guard.cli.policy import policy
from egress_guard.config import load_config
from egress_guard.hosts import normalize_host
from egress_guard.policy import Destination, Verdict, decide
from egress_guard.store import AuditLog, AuditRow
from egress_guard.suggest import globs, suggest
from egress_guard.timeutil import iso, now_iso, utcnow


def req(
    host: str, method: str, path: str, decision: str = "allow", port: int = 443, kind: str = "request"
) -> dict[str, Any]:
    return {"kind": kind, "decision": decision, "host": host, "port": port, "method": method, "path": path}


PYPI = [
    req("pypi.org", "GET", f"/simple/{name}/") for name in ("requests", "numpy", "idna", "certifi", "urllib3", "six")
]
ROWS = [
    *PYPI,
    req("pypi.org", "GET", "/simple"),
    req("pypi.org", "HEAD", "/pypi/requests/json", "would-deny"),
    req("files.pythonhosted.org", "GET", "/packages/ab/cd/requests-2.32.whl?x=1"),
    req("api.example.com", "POST", "/v1/chat", "would-escalate", port=8443),
    req("api.example.com", "GET", "/v1/models", port=8443),
    req("api.example.com", "GET", "/odd[1]*", port=8443),
]
NOT_USED = [
    req("evil.example", "GET", "/", "deny"),  # enforced refusal
    req("evil.example", "POST", "/upload", "error"),  # structural refusal or failure
    req("evil.example", "CONNECT", "", "allow", kind="connect"),
    {"kind": "event", "decision": "allow", "host": None, "port": None, "method": "approve", "path": None},
]


def load_suggested(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "egress-guard.yaml"
    path.write_text("version: 1\nallow:\n" + text)
    return load_config(path)


def test_rows_become_rules_that_load_and_admit_the_same_requests(tmp_path: Path) -> None:
    found = suggest(ROWS + NOT_USED)
    assert found.used == len(ROWS)
    assert found.rules == [
        {
            "host": "api.example.com",
            "ports": [8443],
            "methods": ["GET", "POST"],
            "paths": ["/odd[[]1][*]", "/v1/chat", "/v1/models"],
        },
        {
            "host": "files.pythonhosted.org",
            "ports": [443],
            "methods": ["GET"],
            "paths": ["/packages/ab/cd/requests-2.32.whl"],
        },
        {
            "host": "pypi.org",
            "ports": [443],
            "methods": ["GET", "HEAD"],
            "paths": ["/pypi/requests/json", "/simple", "/simple/*"],
        },
    ]
    assert "evil.example" not in found.text
    assert "# pypi.org:443: 8 request(s) (7 allow, 1 would-deny)" in found.text
    assert "# api.example.com:8443: 3 request(s) (2 allow, 1 would-escalate)" in found.text
    config = load_suggested(tmp_path, found.text)
    for row in ROWS:
        dest = Destination(normalize_host(row["host"]), row["port"], row["method"], row["path"])
        decision = decide(config.rules, dest)
        assert decision.verdict is Verdict.ALLOW, (row, decision.reason)
    # and not more than that: other methods, ports, paths and hosts stay refused
    for host, port, method, path in (
        ("pypi.org", 443, "POST", "/simple/requests/"),
        ("pypi.org", 443, "GET", "/admin"),
        ("api.example.com", 443, "GET", "/v1/models"),
        ("api.example.com", 8443, "GET", "/odd1"),
        ("evil.example", 443, "GET", "/"),
    ):
        assert decide(config.rules, Destination(normalize_host(host), port, method, path)).verdict is Verdict.DENY


def test_ambiguous_paths_and_unnamed_methods_are_left_out_and_counted() -> None:
    found = suggest(
        [req("a.example", "GET", "/x/../admin"), req("a.example", "PROPFIND", "/dav"), req("a.example", "GET", "/ok")]
    )
    assert found.rules == [{"host": "a.example", "ports": [443], "methods": ["GET"], "paths": ["/ok"]}]
    assert found.skipped == {
        "ambiguous path (dot segments or encoded slashes)": 1,
        "method the allowlist cannot name": 1,
    }
    assert "left out: 1 ambiguous path, 1 method PROPFIND" in found.text


def test_nothing_to_suggest() -> None:
    found = suggest(NOT_USED)
    assert (found.rules, found.used) == ([], 0)


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (["/a", "/b"], ["/a", "/b"]),
        (["/v1/x", "/v1/y", "/v1/z", "/v2/a", "/v2/b", "/health"], ["/health", "/v1/*", "/v2/*"]),
        (["/v1", "/v1/a", "/v1/b", "/v1/c", "/v1/d", "/v1/e"], ["/v1", "/v1/*"]),
        (["/", "/a/1", "/a/2", "/a/3", "/a/4", "/a/5"], ["/", "/a/*"]),
    ],
)
def test_globs(paths: list[str], expected: list[str]) -> None:
    assert globs(paths) == expected


# --- the command -----------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    result = CliRunner().invoke(main, ["init", "--dir", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tmp_path


async def write(home: Path, rows: list[dict[str, Any]], ago: float = 0) -> None:
    """The rows, as the proxy's writer records them, `ago` seconds in the past."""
    ts = iso(utcnow() - datetime.timedelta(seconds=ago)) if ago else now_iso()
    log = AuditLog(home / "egress-guard.db")
    await log.open()
    for i, r in enumerate(rows):
        log.record(AuditRow(ts=ts, request_id=f"r{ago}-{i}", agent="bot" if i % 2 else "other", status=200, **r))
    assert await log.close() == 0


async def test_the_command_reads_the_store_and_writes_a_file(home: Path) -> None:
    rows = ROWS + NOT_USED  # would-deny and would-escalate: migration 0010
    await write(home, rows)
    config = home / "egress-guard.yaml"
    runner = CliRunner()
    result = runner.invoke(policy, ["suggest", "--config", str(config), "--since", "1h"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert '  - host: "pypi.org"' in result.output and "evil.example" not in result.output
    (home / "check").mkdir()
    assert {r.host for r in load_suggested(home / "check", result.output).rules} == {
        "pypi.org",
        "files.pythonhosted.org",
        "api.example.com",
    }

    out = home / "suggested.yaml"
    result = runner.invoke(policy, ["suggest", "--config", str(config), "--agent", "bot", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.read_text().startswith("# egress-guard policy suggest")
    bot_hosts = {r["host"] for i, r in enumerate(rows) if i % 2 and r in ROWS}
    assert {r.host for r in load_suggested(home / "check", out.read_text()).rules} == bot_hosts

    result = runner.invoke(policy, ["suggest", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 1 and "exists" in result.output and "--force" in result.output
    result = runner.invoke(policy, ["suggest", "--config", str(config), "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert "pypi.org" in out.read_text()

    result = runner.invoke(policy, ["suggest", "--config", str(config), "--agent", "nobody"])
    assert result.exit_code == 1 and "no allowed or observed request rows" in result.output


async def test_the_command_reads_every_hour_of_its_span(home: Path) -> None:
    """Rows are read an hour at a time: rows hours apart all count, and --since/--until bound them."""
    await write(home, [req("old.example", "GET", "/a")], ago=5 * 3600 + 17)
    await write(home, [req("mid.example", "GET", "/b")], ago=2 * 3600)
    await write(home, [req("new.example", "GET", "/c")])
    config = str(home / "egress-guard.yaml")

    def hosts(*args: str) -> set[str]:
        result = CliRunner().invoke(policy, ["suggest", "--config", config, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return {r["host"] for r in yaml.safe_load("allow:\n" + result.output)["allow"]}

    assert hosts("--since", "1d") == {"old.example", "mid.example", "new.example"}
    assert hosts("--since", "3h") == {"mid.example", "new.example"}
    assert hosts("--since", "1d", "--until", "1h") == {"old.example", "mid.example"}


# --- end to end: observe, suggest, enforce ---------------------------------------------


@pytest.mark.parametrize(
    "first_run",
    [
        "observe",  # empty allowlist: every request would be denied, and goes on
        "broad",  # enforced, the whole host allowed: suggest narrows it to what was used
    ],
)
def test_a_run_then_suggest_gives_an_allowlist_that_admits_the_same_traffic(
    tmp_path: Path, upstream: Any, test_ca: tuple[Any, Path], first_run: str
) -> None:
    """A workload runs once (under `mode: observe` with an empty allowlist, or enforced under a
    rule for the whole host); `policy suggest` turns its rows into rules; enforced, they
    admit the same requests and refuse others."""
    from support.clients import curl
    from support.proxy import RunningProxy, write_config

    network = {"hosts": {"api.test.local": ["127.0.0.1"]}, "upstream_ca": str(test_ca[1])}
    base = f"https://api.test.local:{upstream.port}"
    traffic = [("GET", "/json/a"), ("GET", "/json/b"), ("POST", "/v1/items")]

    observed_home = tmp_path / "observe"
    observed_home.mkdir()
    first: dict[str, Any] = (
        {"mode": "observe", "network": network}
        if first_run == "observe"
        else {"allow": [{"host": "api.test.local", "ports": [upstream.port]}], "network": network}
    )
    proxy = RunningProxy(write_config(observed_home, first)).start()
    try:
        for method, path in traffic:
            status, headers, body = curl(
                proxy, base + path, "-X", method, *(["--data", "{}"] if method == "POST" else [])
            )
            assert status == 200, (method, path, status, body)
        rows = proxy.rows(expect=len(traffic))
    finally:
        proxy.stop()
    expected = "would-deny" if first_run == "observe" else "allow"
    assert [r["decision"] for r in rows if r["kind"] == "request"] == [expected] * len(traffic)

    out = tmp_path / "suggested.yaml"
    result = CliRunner().invoke(
        policy, ["suggest", "--config", str(observed_home / "egress-guard.yaml"), "--since", "1h", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    allow = yaml.safe_load("allow:\n" + out.read_text())["allow"]
    assert allow == [
        {
            "host": "api.test.local",
            "ports": [upstream.port],
            "methods": ["GET", "POST"],
            "paths": ["/json/a", "/json/b", "/v1/items"],
        }
    ]

    enforced_home = tmp_path / "enforce"
    enforced_home.mkdir()
    proxy = RunningProxy(write_config(enforced_home, {"allow": allow, "network": network})).start()
    try:
        for method, path in traffic:
            status, _, body = curl(proxy, base + path, "-X", method, *(["--data", "{}"] if method == "POST" else []))
            assert status == 200, (method, path, status, body)
        for method, path in (("GET", "/json/c"), ("DELETE", "/json/a")):
            status, headers, _ = curl(proxy, base + path, "-X", method)
            assert status == 403 and headers["x-egress-guard-decision"] == "deny", (method, path)
    finally:
        proxy.stop()
