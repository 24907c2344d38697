"""`up` with the vault backend: it warns, per service, about a secret that does not resolve
(never a value) and its status file says so for `doctor`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from support.llm.common import REAL
from test_vault import Bao, free_port, vault_config

from egress_guard.cli import main


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Bao]:
    server = Bao(tmp_path).start()
    server.seed()
    yield server
    server.stop()


def test_up_warns_about_a_vault_secret_that_does_not_resolve(tmp_path: Path, cred_config, vault: Bao) -> None:
    config = vault_config(cred_config, vault, ref="vault:secret/llm/missing#api_key") | {
        "listen": f"127.0.0.1:{free_port()}"
    }
    path = tmp_path / "egress-guard.yaml"
    path.write_text(yaml.safe_dump({"version": 1} | config))
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "GH_TOKEN"))}
    env |= {"VAULT_TOKEN": "root", "ANTHROPIC_API_KEY": REAL["anthropic"]}
    subprocess.run([sys.executable, "-m", "egress_guard", "init", "--dir", str(tmp_path)], check=True, env=env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "egress_guard", "up", "--config", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    status_file = tmp_path / "egress-guard.status.json"
    try:
        deadline = time.monotonic() + 30
        while not status_file.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no status file"
            time.sleep(0.05)
        services = json.loads(status_file.read_text())["services"]
        assert services["openai"] == {
            "secret": "vault:secret/llm/missing#api_key",
            "resolves": False,
            "problem": "vault:secret/llm/missing#api_key does not exist in vault",
        }
        assert services["anthropic"]["resolves"] is True and services["github"]["resolves"] is False
        doctor = CliRunner().invoke(main, ["doctor", "--config", str(path)])
        assert "service openai: secret vault:secret/llm/missing#api_key resolves: no (in the running proxy" in (
            doctor.output
        )
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert "WARNING: service openai: its secret vault:secret/llm/missing#api_key does not resolve" in err
    assert "Fix: check that secret in vault" in err
    assert "WARNING: service github: its secret env:GH_TOKEN does not resolve" in err
    assert "WARNING: service anthropic" not in err
    assert not status_file.exists()
    for secret in REAL.values():
        assert secret not in out + err
