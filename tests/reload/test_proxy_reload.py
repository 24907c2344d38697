"""Hot reload on the real proxy: a valid file swaps the policy the next request is judged by,
a broken one (or one that changes more than the policy) is refused while the proxy keeps
serving, the poll notices an edit, a stream under way finishes under the policy it began
with — and `egress-guard up` reloads on SIGHUP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from support.clients import curl, raw_connect
from support.proxy import RunningProxy, write_config
from support.upstream import Upstream

from egress_guard.reload import Outcome

EG = [sys.executable, "-m", "egress_guard"]


def reload(proxy: RunningProxy) -> Outcome:
    """`reload_now()` on the proxy's own loop (a proxy in a thread has no SIGHUP)."""
    assert proxy.proxy is not None and proxy._loop is not None
    return asyncio.run_coroutine_threadsafe(proxy.proxy.watcher.reload_now(), proxy._loop).result(20)


def edit(proxy: RunningProxy, **changes: Any) -> None:
    body = yaml.safe_load(proxy.config.path.read_text()) | changes
    proxy.config.path.write_text(yaml.safe_dump(body))


def events(proxy: RunningProxy, n: int) -> list[tuple[str, str, str]]:
    rows = [r for r in proxy.rows(expect=None) if r["kind"] == "event"]
    deadline = time.monotonic() + 5
    while len(rows) < n and time.monotonic() < deadline:
        time.sleep(0.05)
        rows = [r for r in proxy.rows() if r["kind"] == "event"]
    return [(r["method"], r["decision"], r["rule"]) for r in rows]


def test_reloads_swap_the_policy_and_a_broken_file_keeps_serving(
    make_proxy: Callable[..., RunningProxy], upstream: Upstream
) -> None:
    proxy = make_proxy()
    api, other = (f"https://{h}:{upstream.port}/json" for h in ("api.test.local", "other.test.local"))
    assert curl(proxy, api)[0] == 200 and curl(proxy, other)[0] == 403
    allow = [{"host": h, "ports": [upstream.port]} for h in ("api.test.local", "other.test.local")]

    edit(proxy, allow=allow)
    applied = reload(proxy)
    assert applied.applied and "allow rules 1 -> 2" in applied.reason
    assert curl(proxy, other)[0] == 200

    good = proxy.config.path.read_text()
    proxy.config.path.write_text(good.replace("host: other.test.local", "host: '*.test.*'"))
    broken = reload(proxy)
    assert broken.rejected and "Fix:" in broken.reason
    assert curl(proxy, api)[0] == 200 and curl(proxy, other)[0] == 200  # still the last good one

    proxy.config.path.write_text(good)
    edit(proxy, listen="127.0.0.1:1", allow=allow[:1])
    fixed = reload(proxy)
    assert fixed.rejected and fixed.reason.startswith("listen changed: restart egress-guard")
    assert curl(proxy, other)[0] == 200

    # the poll: an edit alone, no reload_now
    proxy.config.path.write_text(yaml.safe_dump(yaml.safe_load(good) | {"allow": allow[:1]}))
    deadline = time.monotonic() + 10
    while curl(proxy, other)[0] != 403:
        assert time.monotonic() < deadline, "the edit was not picked up"
        time.sleep(0.2)
    assert curl(proxy, api)[0] == 200
    assert (
        events(proxy, 4)
        == [
            ("reload", "allow", applied.digest[:12]),  # type: ignore[index]
            ("reload-rejected", "deny", broken.digest[:12]),  # type: ignore[index]
            ("reload-rejected", "deny", fixed.digest[:12]),  # type: ignore[index]
            ("reload", "allow", proxy.proxy.holder.config.digest[:12]),  # type: ignore[union-attr]
        ]
    )


def test_a_stream_under_way_finishes_under_the_policy_it_began_with(
    make_proxy: Callable[..., RunningProxy], upstream: Upstream
) -> None:
    proxy = make_proxy()
    sock, head = raw_connect(proxy.port, f"api.test.local:{upstream.port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    tls = proxy.client_context().wrap_socket(sock, server_hostname="api.test.local")
    tls.sendall(f"GET /sse?n=3 HTTP/1.1\r\nHost: api.test.local:{upstream.port}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while b"data: first" not in data:
        chunk = tls.recv(65536)
        assert chunk, data
        data += chunk

    edit(proxy, allow=[{"host": "other.test.local", "ports": [upstream.port]}])  # api.test.local no more
    assert reload(proxy).applied
    assert curl(proxy, f"https://api.test.local:{upstream.port}/json")[0] == 403  # a new request: the new policy

    upstream.state.sse_gate.set()
    try:
        while chunk:
            chunk = tls.recv(65536)
            data += chunk
    except (OSError, ssl.SSLError):
        pass
    finally:
        tls.close()
    assert b"data: event 1" in data and b"data: event 2" in data and b"0\r\n\r\n" in data
    assert not upstream.state.sse_gate_timed_out


def test_keys_and_budgets_survive_a_reload(
    make_proxy: Callable[..., RunningProxy], cred_config: dict[str, Any], real_env: Any, llm_upstream: Upstream
) -> None:
    """Nothing but the policy is swapped: a key minted before still works, and the spend
    before the reload still counts against the budget after it."""
    import httpx
    import openai
    from genai_prices import Usage, calc_price

    from egress_guard import keys

    def cost(input_tokens: int) -> Decimal:
        usage = Usage(input_tokens=input_tokens, output_tokens=100)
        return Decimal(calc_price(usage, "gpt-4o-mini", provider_id="openai").total_price)

    one, held = cost(11), cost(256)  # a call's real cost, and its reservation
    # room for one reservation, but not for a second one on top of the first call's cost
    cred_config["agents"]["researcher"]["limits"] = {"budget_usd": {"day": str(held + one / 2)}}
    proxy = make_proxy(**cred_config)
    key = keys.mint(proxy.config, "researcher").env["OPENAI_API_KEY"]
    http = httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=20)
    client = openai.OpenAI(
        api_key=key, base_url=f"https://api.openai.com:{llm_upstream.port}/v1", max_retries=0, http_client=http
    )
    body: dict[str, Any] = {"model": "gpt-4o-mini", "max_tokens": 100, "messages": []}
    assert client.chat.completions.create(**body).choices

    edit(proxy, allow=[*cred_config["allow"], {"host": "other.test.local", "ports": [443]}])
    assert reload(proxy).applied
    with pytest.raises(openai.RateLimitError, match="day budget"):  # the key passes, the budget remembers
        client.chat.completions.create(**body)
    http.close()


# --- `up` as a real process: SIGHUP -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_status(port: int, target: str) -> bytes:
    sock, head = raw_connect(port, target)
    sock.close()
    return head.split(b"\r\n", 1)[0]


def test_up_reloads_on_sighup(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"allow": [{"host": "old1.example", "ports": [443]}]})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_GUARD_")}
    proc = subprocess.Popen(
        [*EG, "up", "--config", str(config.path), "--listen", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("egress-guard listening on")
        assert connect_status(port, "old1.example:443") == b"HTTP/1.1 200 Connection established"
        assert connect_status(port, "new1.example:443").startswith(b"HTTP/1.1 403")

        # the same size and mtime, rewritten in place: only SIGHUP can tell
        st = config.path.stat()
        config.path.write_text(config.path.read_text().replace("old1.example", "new1.example"))
        os.utime(config.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while not connect_status(port, "new1.example:443").endswith(b"200 Connection established"):
            assert time.monotonic() < deadline and proc.poll() is None, "SIGHUP did not reload"
            time.sleep(0.1)
        assert connect_status(port, "old1.example:443").startswith(b"HTTP/1.1 403")

        from egress_guard.cli.status import status
        from egress_guard.config import load_config

        new = load_config(config.path)
        deadline = time.monotonic() + 10
        while True:  # the status file follows within its loop's 0.5 s
            report = json.loads(CliRunner().invoke(status, ["--config", str(config.path), "--format", "json"]).output)
            if report.get("digest") == new.digest or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert report["running"] and report["pid"] == proc.pid and report["digest"] == new.digest
        assert report["last_reload"]["applied"] is True and report["store"]["ok"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "SIGHUP: reloading" in err and "reloaded (SIGHUP)" in err
