"""`egress-guard run --isolate` end to end: the real `up` (a subprocess: a process that held
a TUN must leave with os._exit) and the real launcher, with curl and Node 20's official
`openai` package (its fetch ignores proxy variables) inside, as nobody."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from egress_guard.config import Config

pytestmark = [
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
        reason="needs Linux, root and /dev/net/tun",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("egress_guard.addons.sandboxes") is None,
        reason="SKIPPED: up's side of run --isolate (egress_guard.addons.sandboxes) is not in this tree yet",
    ),
]

EG = [sys.executable, "-m", "egress_guard"]
NODE_OPENAI = "6.49.0"  # the npm `openai` version this was verified with; bump deliberately
CACHE = Path(os.environ.get("EGRESS_GUARD_TEST_CACHE_SHARED") or "/var/cache/egress-guard-tests")


@dataclass
class World:
    config: Config
    llm_port: int

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [*EG, "run", "--isolate", "--config", str(self.config.path), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env())

    def rows(self, where: str, args: tuple[Any, ...] = (), expect: int = 1, timeout: float = 5) -> list[dict]:
        from support.proxy import audit_rows

        return audit_rows(self.config.audit_path, where, args, expect, timeout)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}  # the command: nobody


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, test_ca: tuple[trustme.CA, Path]) -> Iterator[World]:
    from support.llm import LLMHandler
    from support.llm.common import REAL_ENV
    from support.proxy import write_config
    from support.upstream import Upstream

    llm = Upstream(test_ca[0], LLMHandler)
    home = tmp_path_factory.mktemp("run-isolate")
    config = write_config(
        home,
        {
            "allowlists": ["openai"],
            "allow": [{"host": "api.openai.com", "ports": [llm.port]}],
            "services": ["openai"],
            "agents": {"researcher": {"services": ["openai"]}, "runner": {"services": ["openai"]}},
            "network": {"hosts": {"api.openai.com": ["127.0.0.1"]}, "upstream_ca": str(test_ca[1])},
        },
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(home / "up.log", "wb")  # noqa: SIM115 - closed below
    up = subprocess.Popen(
        [*EG, "up", "--config", str(config.path), "--listen", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **REAL_ENV},
    )
    sock = config.ca_dir / "control.sock"
    deadline = time.monotonic() + 30
    while not sock.exists() and up.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert sock.exists(), (home / "up.log").read_text()
        yield World(config, llm.port)
    finally:
        up.terminate()
        try:
            up.wait(20)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        log.close()
        llm.close()


@pytest.fixture(scope="session")
def node_openai() -> Path:
    """The official `openai` npm package, installed once where the sandbox's user can read it."""
    root = CACHE / f"node-openai-{NODE_OPENAI}"
    package = root / "node_modules" / "openai"
    if shutil.which("node") is None:
        pytest.skip("SKIPPED: no node (Node 20) on this machine")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (package / "package.json").exists():
            npm = shutil.which("npm")
            if npm is None:
                pytest.skip("SKIPPED: npm is not installed, so the openai package cannot be (apt-get install npm)")
            out = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--prefix", str(root), f"openai@{NODE_OPENAI}"],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if out.returncode != 0:
                pytest.skip(f"SKIPPED: npm could not install openai@{NODE_OPENAI}: {out.stderr[-800:]}")
    for path in (CACHE, root, *root.rglob("*")):
        path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    return package


SHOW = 'printf "%s %s\\n" "$EGRESS_GUARD_AGENT" "$EGRESS_GUARD_SESSION"; '


def curl(world: World, noproxy: bool) -> str:
    url = f"https://api.openai.com:{world.llm_port}/v1/chat/completions"
    body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
    np = "--noproxy '*' " if noproxy else ""
    return (
        f'curl -sS -o /dev/null -w "%{{http_code}}\\n" {np}--cacert "$CURL_CA_BUNDLE" '
        f"-H \"Authorization: Bearer $OPENAI_API_KEY\" -H 'Content-Type: application/json' -d '{body}' {url}; "
    )


def test_curl_reaches_the_allowed_host_captured_and_through_the_proxy_variables(world: World) -> None:
    out = world.run("--agent", "researcher", "--", "sh", "-c", SHOW + curl(world, True) + curl(world, False) + "id -u")
    assert out.returncode == 0, out.stderr
    ident, captured, explicit, uid = out.stdout.split("\n")[:4]
    agent, session = ident.split()
    assert (agent, captured, explicit, uid) == ("researcher", "200", "200", "65534"), out
    rows = world.rows(
        "session = ? AND kind = 'request' AND host = 'api.openai.com' AND status = 200", (session,), expect=2
    )
    assert len(rows) == 2 and {r["agent"] for r in rows} == {"researcher"}


NODE = """
const OpenAI = require(process.argv[1]);
const client = new OpenAI({baseURL: `https://api.openai.com:${process.argv[2]}/v1`, maxRetries: 0});
client.chat.completions.create({model: 'gpt-4o-mini', messages: [{role: 'user', content: 'hi'}]})
  .then(r => console.log(JSON.stringify({content: r.choices[0].message.content,
                                        session: process.env.EGRESS_GUARD_SESSION})))
  .catch(e => { console.error(String(e)); process.exit(3); });
"""


def test_node_openai_sdk_completes_a_call_with_no_preload(world: World, node_openai: Path) -> None:
    out = world.run("--agent", "researcher", "--", "/usr/bin/node", "-e", NODE, str(node_openai), str(world.llm_port))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["content"]
    rows = world.rows("session = ? AND cost_usd IS NOT NULL", (got["session"],))
    assert len(rows) == 1 and rows[0]["agent"] == "researcher"  # captured (fetch ignores HTTPS_PROXY), priced


def test_kill_agent_ends_the_isolated_run_within_a_second(world: World) -> None:
    argv = [*EG, "run", "--isolate", "--config", str(world.config.path), "--agent", "runner"]
    proc = subprocess.Popen(
        [*argv, "--", "sh", "-c", "echo ready; exec sleep 60"], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        t0 = time.monotonic()
        subprocess.run([*EG, "kill", "--config", str(world.config.path), "--agent", "runner"], check=True)
        t_cli = time.monotonic()
        assert proc.wait(5) == 137
        gone = time.monotonic()
        print(
            f"kill --agent: run ended {(gone - t0) * 1000:.0f} ms after `kill` started, {(gone - t_cli) * 1000:.0f} after it returned"
        )
        assert gone - t_cli < 1
    finally:
        proc.kill()
        proc.wait()


def test_max_time_ends_the_run_and_the_keys_at_the_deadline(world: World) -> None:
    t0 = time.monotonic()
    out = world.run("--agent", "researcher", "--max-time", "3s", "--", "sh", "-c", SHOW + "exec sleep 60")
    elapsed = time.monotonic() - t0
    assert out.returncode == 137 and "--max-time 3s reached" in out.stderr
    assert 3 <= elapsed < 5, elapsed
    session = out.stdout.split()[1]
    keys = json.loads(
        subprocess.run(
            [*EG, "keys", "list", "--config", str(world.config.path), "--format", "json", "--all"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert [k["status"] for k in keys if k["session"] == session] == ["expired"]
