"""The real Codex CLI (@openai/codex from npm, its native binary) through the real proxy.

Codex talks to the Responses API over `wss://…/v1/responses` whenever its provider supports
WebSockets (the built-in `openai` provider does) and falls back to HTTPS when the upgrade is
refused with 426 or its WebSocket retries run out. Here it is driven as egress-guard users
run it: `codex exec` with the fake key in CODEX_API_KEY, HTTPS_PROXY pointing at the proxy,
SSL_CERT_FILE at egress-guard's CA, and only `openai_base_url` changed (the fake API listens
on a loopback port). The fake API (tests/support/ws_upstream.py) accepts only the real key.

The package is installed once into a cache outside the repo (EGRESS_GUARD_TEST_CACHE, default
~/.cache/egress-guard-tests); the tests are skipped, saying why, only if npm cannot install it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from genai_prices import Usage, calc_price
from support.llm.common import REAL
from support.proxy import RunningProxy
from support.upstream import Upstream
from test_credentials import assert_no_real_secret, mint

CODEX_VERSION = "0.169.0"  # the version these findings were made with; bump deliberately
CACHE = Path(os.environ.get("EGRESS_GUARD_TEST_CACHE") or Path.home() / ".cache" / "egress-guard-tests")
MODEL = "gpt-5.1-codex-mini"


@pytest.fixture(scope="session")
def codex() -> Path:
    root = CACHE / f"codex-{CODEX_VERSION}"
    binary = root / "node_modules" / ".bin" / "codex"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs must not install into one directory at once
        if not binary.exists():
            npm = shutil.which("npm")
            if npm is None:
                pytest.skip("SKIPPED: npm is not installed, so Codex CLI cannot be installed (apt-get install npm)")
            out = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--prefix", str(root), f"@openai/codex@{CODEX_VERSION}"],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            if out.returncode != 0 or not binary.exists():
                pytest.skip(f"SKIPPED: npm could not install @openai/codex@{CODEX_VERSION}: {out.stderr[-800:]}")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert CODEX_VERSION in version.stdout, version.stdout + version.stderr
    return binary


@pytest.fixture
def codex_config(ws_up: Upstream, test_ca) -> dict[str, Any]:
    return {
        "allowlists": ["openai"],
        "allow": [{"host": "api.openai.com", "ports": [ws_up.port]}],
        "services": ["openai"],
        "agents": {
            "researcher": {"services": ["openai"], "limits": {"budget_usd": {"day": 5}}},
            "writer": {"services": ["openai"], "limits": {"models": {"openai": ["gpt-5-mini"]}}},
        },
        "network": {"hosts": {"api.openai.com": ["127.0.0.1"]}, "upstream_ca": str(test_ca[1])},
    }


def run_codex(
    codex: Path, proxy: RunningProxy, port: int, key: str, tmp: Path, config: str = ""
) -> subprocess.CompletedProcess[str]:
    home, codex_home, work = tmp / "home", tmp / "codex-home", tmp / "work"
    for d in (home, codex_home, work):
        d.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(
        f'model = "{MODEL}"\nopenai_base_url = "https://api.openai.com:{port}/v1"\n{config}'
    )
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "CODEX_HOME": str(codex_home),
        "HTTPS_PROXY": proxy.url,
        "SSL_CERT_FILE": str(proxy.ca_cert),  # Codex's HTTP and WebSocket clients both read it
        "CODEX_API_KEY": key,
        "RUST_LOG": "codex_api=info",
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [str(codex), "exec", "--skip-git-repo-check", "say pong"],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def files_text(root: Path) -> str:
    return "".join(p.read_bytes().decode(errors="replace") for p in root.rglob("*") if p.is_file())


def test_codex_over_websocket_is_metered_exactly(codex, make_proxy, codex_config, real_env, ws_up, tmp_path) -> None:
    proxy = make_proxy(**codex_config)
    minted = mint(proxy)
    out = run_codex(codex, proxy, ws_up.port, minted.env["OPENAI_API_KEY"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pong" in out.stdout
    assert "successfully connected to Responses WebSocket" in out.stderr
    seen = ws_up.state.requests
    upgrade = next(r for r in seen if r.get("path") == "/v1/responses" and "headers" in r)
    assert upgrade["headers"]["upgrade"].lower() == "websocket"
    assert upgrade["headers"]["authorization"] == f"Bearer {REAL['openai']}"
    assert "responses_websockets=" in upgrade["headers"]["openai-beta"]
    creates = [json.loads(r["ws_message"]) for r in seen if "ws_message" in r]
    assert creates and all(c["type"] == "response.create" and c["model"] == MODEL for c in creates)
    assert not [r for r in seen if r.get("method") == "POST"]  # it never fell back to HTTP
    reported = ws_up.state.reported
    assert len(reported) == len(creates)
    rows = [r for r in proxy.rows(expect=3 + len(reported)) if r["kind"] == "request"]
    calls = [r for r in rows if r["method"] == "WS" and ":ws" in r["request_id"]]
    assert len(calls) == len(reported)
    for row, rep in zip(calls, reported, strict=True):
        usage = rep["usage"]
        expected = calc_price(
            Usage(
                input_tokens=usage["input_tokens"],
                output_tokens=usage["output_tokens"],
                cache_read_tokens=usage["input_tokens_details"]["cached_tokens"],
            ),
            MODEL,
            provider_id="openai",
        ).total_price
        assert (row["model"], row["input_tokens"], row["output_tokens"]) == (
            MODEL,
            usage["input_tokens"],
            usage["output_tokens"],
        )
        assert Decimal(row["cost_usd"]) == Decimal(expected)
        assert (row["agent"], row["session"], row["credential"]) == ("researcher", minted.record.session, "swapped")
    # the close row comes when the proxy sees Codex's connection drop (at its exit, without a
    # close frame): wait for that row itself, not a row count other rows can reach first
    deadline = time.monotonic() + 10
    while not any(r["request_id"].endswith(":close") for r in proxy.rows()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(r["request_id"].endswith(":close") for r in proxy.rows())
    assert_no_real_secret(proxy, out.stdout, out.stderr, files_text(tmp_path))


def test_codex_is_told_why_a_model_is_refused(codex, make_proxy, codex_config, real_env, ws_up, tmp_path) -> None:
    proxy = make_proxy(**codex_config)
    key = mint(proxy, agent="writer").env["OPENAI_API_KEY"]
    # Codex retries a refused stream 5 times, then falls back to HTTPS (refused the same way):
    # a provider of its own with no retries keeps this test short
    provider = (
        'model_provider = "eg"\n[model_providers.eg]\nname = "OpenAI via egress-guard"\n'
        f'base_url = "https://api.openai.com:{ws_up.port}/v1"\nenv_key = "CODEX_API_KEY"\n'
        'wire_api = "responses"\nsupports_websockets = true\nrequest_max_retries = 0\nstream_max_retries = 0\n'
    )
    out = run_codex(codex, proxy, ws_up.port, key, tmp_path, provider)
    assert out.returncode != 0
    assert (
        f"egress-guard: model '{MODEL}' is not allowed for agent writer on openai (allowed: gpt-5-mini)" in out.stderr
    )
    assert "successfully connected to Responses WebSocket" in out.stderr  # refused per message, not at the upgrade
    assert ws_up.state.reported == []  # no call reached the API, over WebSocket or HTTPS
    denied = [r for r in proxy.rows() if r["decision"] == "deny" and r["kind"] == "request"]
    assert {r["method"] for r in denied} <= {"WS", "POST"} and "WS" in {r["method"] for r in denied}


def test_codex_falls_back_to_https_when_websocket_is_off(
    codex, make_proxy, codex_config, real_env, ws_up, tmp_path
) -> None:
    codex_config["services"] = [{"preset": "openai", "websocket": False}]
    proxy = make_proxy(**codex_config)
    out = run_codex(codex, proxy, ws_up.port, mint(proxy).env["OPENAI_API_KEY"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "failed to connect to Responses WebSocket" in out.stderr  # and went on over HTTPS, silently
    rows = [r for r in proxy.rows(expect=4) if r["kind"] == "request"]
    refused = [r for r in rows if r["method"] == "GET"]
    assert [(r["status"], r["decision"]) for r in refused] == [(426, "deny")]  # once: 426 means "use HTTPS"
    post = next(r for r in rows if r["method"] == "POST")
    assert (post["path"], post["status"], post["model"]) == ("/v1/responses", 200, MODEL)
    assert post["cost_usd"] is not None  # priced by SpendGuard, as any HTTP call
