"""containers/fleet.compose.yaml run for real (issue #11) on a private Docker engine: PostgreSQL
built from containers/postgres/, two egress-guard replicas sharing it, an agent container on
each replica's socket. Fake keys, revocations and the audit log are one across the fleet.

The replicas reach a real TLS upstream (the fake OpenAI API on this host's loopback, relayed
from the compose egress network's gateway address). docs/kubernetes.yaml is checked here too:
it parses, and the config in its ConfigMap loads with egress-guard's own loader.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import pytest
import yaml
from docker_support import REPO, Dockerd, DockerUnavailable, log
from fleet_support import build_images, kubernetes_pod
from support.llm.common import REAL
from support.upstream import Upstream

from egress_guard.config import load_config

FLEET = REPO / "containers" / "fleet.compose.yaml"
FLEET_CONFIG = REPO / "containers" / "fleet.egress-guard.yaml"
MANIFEST = REPO / "docs" / "kubernetes.yaml"


def free_subnet() -> tuple[str, str]:
    """A /24 for the compose egress network that no route of this host uses (another engine,
    e.g. a concurrent run, may have taken one): (subnet, gateway)."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    for third in secrets.SystemRandom().sample(range(16, 250), 40):
        if f"172.31.{third}." not in routes:
            return f"172.31.{third}.0/24", f"172.31.{third}.1"
    raise AssertionError(f"no free 172.31.x.0/24 here: {routes}")


REQUEST = r"""
import os, urllib.request, urllib.error
key = os.environ.get("KEY") or os.environ["OPENAI_API_KEY"]
req = urllib.request.Request("https://api.openai.com:%s/v1/models" % os.environ["UPSTREAM_PORT"],
                             headers={"Authorization": "Bearer " + key})
try:
    print("RESULT", urllib.request.urlopen(req, timeout=30).status, flush=True)
except urllib.error.HTTPError as e:
    print("RESULT", e.code, e.read()[:400].decode(errors="replace"), flush=True)
"""


def skip_loudly(message: str) -> NoReturn:
    log(message)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


@pytest.fixture(scope="module")
def engine() -> Iterator[Dockerd]:
    root = Path(tempfile.mkdtemp(prefix="egf-", dir="/tmp"))  # short: the socket path must fit
    dockerd = Dockerd(root)
    work = Path(tempfile.mkdtemp(prefix="egf-build-"))
    try:
        dockerd.start()
        dockerd.import_base()
        dockerd.build_agent_image()
        build_images(dockerd, work)
    except DockerUnavailable as exc:
        dockerd.stop()
        skip_loudly(f"NO DOCKER ENGINE, the fleet compose test of issue #11 did NOT run: {exc}")
    except BaseException:
        dockerd.stop()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        yield dockerd
    finally:
        log(", ".join(f"{k}: {v * 1000:.0f} ms" for k, v in dockerd.timings.items()))
        dockerd.stop()


class Relay:
    """TCP from (host, port) to 127.0.0.1:port: the loopback upstream, for containers."""

    def __init__(self, host: str, port: int) -> None:
        self.server = socket.create_server((host, port))
        self.port = port
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.closed:
                client.close()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.port))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not, and an
        # accept left blocked on a closed descriptor outlived this test: a later test's
        # listening socket, given the same descriptor, lost its first connection to it
        self.closed = True
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(5)


def test_fleet_compose_two_replicas_share_keys_revocations_and_audit(
    engine: Dockerd, tmp_path: Path, llm_upstream: Upstream, test_ca: tuple[object, Path]
) -> None:
    password = f"pw-{secrets.token_hex(16)}"
    subnet, gateway = free_subnet()  # fixed before `up`: the replicas' config names the gateway
    private = tmp_path / "secrets"
    private.mkdir(mode=0o700)
    (private / "pg-password").write_text(password + "\n")
    (private / "pg-password").chmod(0o644)  # read by the postgres user and uid 10001, as the compose file says
    # the fleet's config as shipped, pointed at the test upstream
    config = yaml.safe_load(FLEET_CONFIG.read_text())
    config["allow"] = [{"host": "api.openai.com", "ports": [llm_upstream.port]}]
    config["network"] = {
        "hosts": {"api.openai.com": [gateway]},
        "allow_private": [subnet],
        "upstream_ca": "/etc/egress-guard/upstream-ca.pem",
    }
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(test_ca[1], tmp_path / "upstream-ca.pem")
    for f in ("fleet.yaml", "upstream-ca.pem"):
        (tmp_path / f).chmod(0o644)
    tmp_path.chmod(0o755)
    mounts = [
        f"{tmp_path / 'fleet.yaml'}:/etc/egress-guard/egress-guard.yaml:ro",
        f"{tmp_path / 'upstream-ca.pem'}:/etc/egress-guard/upstream-ca.pem:ro",
    ]
    agent = {"command": ["python3", "-c", REQUEST], "environment": {"UPSTREAM_PORT": str(llm_upstream.port)}}
    override = {
        "version": "3.8",
        "services": {
            "egress-guard-init": {"volumes": mounts},
            "egress-guard-1": {"volumes": mounts},
            "egress-guard-2": {"volumes": mounts},
            "agent-1": agent,
            "agent-2": agent,
        },
        "networks": {"egress": {"ipam": {"config": [{"subnet": subnet}]}}},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    compose = ["docker-compose", "-p", "egfleet", "-f", str(FLEET), "-f", str(tmp_path / "override.yaml")]
    env = {
        **engine.env,
        "EG_PG_PASSWORD_FILE": str(private / "pg-password"),
        "OPENAI_API_KEY": REAL["openai"],
        "ANTHROPIC_API_KEY": REAL["anthropic"],
        "EG_SESSION": "fleet-test",
    }

    def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, (
                f"docker-compose {' '.join(args[:3])}: {done.stdout[-1500:]}{done.stderr[-2000:]}"
            )
        return done

    def cli(replica: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run("exec", "-T", replica, "egress-guard", *args, "--config", "/tmp/egress-guard.yaml")

    def through(agent: str, key: str) -> str:
        """A request by an agent container (no network; its replica's socket) with `key`."""
        done = run("run", "--rm", "-T", "--no-deps", "-e", f"KEY={key}", agent, "python3", "-c", REQUEST)
        return next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))

    def mint(replica: str, session: str) -> str:
        out = cli(replica, "keys", "mint", "--agent", "agent", "--session", session, "--format", "json").stdout
        return json.loads(out)["OPENAI_API_KEY"]

    def start_pod() -> tuple[str, str, Path]:
        """A third replica, shaped as docs/kubernetes.yaml's pod, on the compose's database."""
        ca = tmp_path / "fleet-ca"  # what `kubectl create secret generic egress-guard-ca` is given
        ca.mkdir()
        engine.docker(
            "run", "--rm", "--network", "none", "--user", "0", "-v", "egfleet_egress-data:/d:ro", "-v", f"{ca}:/out",
            "--entrypoint", "sh", "egress-guard", "-c", "cp /d/certs/* /out/",
        )  # fmt: skip
        manifest = list(yaml.safe_load_all(MANIFEST.read_text()))
        (configmap,) = [d for d in manifest if d and d["kind"] == "ConfigMap"]
        pg_host = urlsplit(yaml.safe_load(configmap["data"]["egress-guard.yaml"])["store"]["url"]).hostname
        db_ip = engine.docker(
            "inspect", "-f", '{{(index .NetworkSettings.Networks "egfleet_store").IPAddress}}', run("ps", "-q", "db").stdout.strip()
        ).stdout.strip()  # fmt: skip
        upstream_keys = {"OPENAI_API_KEY": REAL["openai"].encode(), "ANTHROPIC_API_KEY": REAL["anthropic"].encode()}
        pod = kubernetes_pod(
            engine, manifest, tmp_path / "pod", name="egress-guard-5d8f7c9b6-x2kqp",
            networks=["egfleet_store", "egfleet_egress"], hosts={pg_host: db_ip},
            secrets={
                "egress-guard-store": {"pg-password": password.encode() + b"\n"},
                "egress-guard-ca": {f.name: f.read_bytes() for f in ca.iterdir()},
                "egress-guard-upstream": upstream_keys,
            },
            config_patch={k: config[k] for k in ("allow", "network", "agents")},
            extra=("-v", mounts[1]),
        )  # fmt: skip
        probe = "import socket; socket.create_connection(('127.0.0.1', 8080), 1)"
        deadline = time.monotonic() + 60
        while engine.docker("exec", pod, "python3", "-c", probe, check=False).returncode != 0:
            assert engine.state(pod)["Running"], engine.docker("logs", pod).stderr[-2000:]
            assert time.monotonic() < deadline, engine.docker("logs", pod).stderr[-2000:]
            time.sleep(0.5)
        ip = engine.docker(
            "inspect", "-f", '{{(index .NetworkSettings.Networks "egfleet_store").IPAddress}}', pod
        ).stdout.strip()
        return pod, ip, ca

    def through_pod(pod_ip: str, ca: Path, key: str) -> str:
        """An agent in another pod: HTTPS_PROXY at the pod's address (what the Service gives)."""
        done = engine.docker(
            "run", "--rm", "--network", "egfleet_store", "--user", "10002:10002", "--entrypoint", "python3",
            "-v", f"{ca / 'egress-guard-ca.pem'}:/ca.pem:ro", "-e", "SSL_CERT_FILE=/ca.pem",
            "-e", f"HTTPS_PROXY=http://{pod_ip}:8080", "-e", f"KEY={key}", "-e", f"UPSTREAM_PORT={llm_upstream.port}",
            "egress-guard-agent", "-c", REQUEST,
        )  # fmt: skip
        return next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))

    relay = pod = None
    try:
        started = time.monotonic()
        run("up", "--no-start", "db")  # creates the networks: the relay binds the egress one's gateway
        relay = Relay(gateway, llm_upstream.port)
        up = run("up", "-d", check=False, timeout=240)
        assert up.returncode == 0, up.stderr[-1500:] + run("logs", "--no-color", "--tail", "20", check=False).stdout
        engine.timings["fleet compose up (db, init, 2 replicas healthy, agents started)"] = time.monotonic() - started
        # the agents' own run: agent.env from their replica, its fake key swapped for the real one
        for name in ("agent-1", "agent-2"):
            container = run("ps", "-q", name).stdout.strip()
            assert engine.docker("wait", container, timeout=90).stdout.strip() == "0"
        logs = run("logs", "--no-color", "agent-1", "agent-2").stdout
        log(f"fleet agents: {[ln for ln in logs.splitlines() if 'RESULT' in ln]}")
        assert len(re.findall(r"agent-\d_1 +\| RESULT 200", logs)) == 2, logs
        # one database: both replicas migrated it once and write their own chains
        db = run("exec", "-T", "db", "psql", "-d", "egress_guard", "-Atc", "SELECT count(*) FROM schema_migrations")
        log(f"fleet: {db.stdout.strip()} migrations applied once")
        # a key minted through one replica works through the other, both ways
        key_1 = mint("egress-guard-1", "minted-on-1")
        key_2 = mint("egress-guard-2", "minted-on-2")
        assert through("agent-2", key_1) == "RESULT 200"
        assert through("agent-1", key_2) == "RESULT 200"
        # and through a replica run as docs/kubernetes.yaml describes its pods
        started = time.monotonic()
        pod, pod_ip, ca = start_pod()
        engine.timings["kubernetes-shaped replica ready"] = time.monotonic() - started
        assert through_pod(pod_ip, ca, key_1) == "RESULT 200"
        scrape = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9464/metrics').read().decode())"
        counted = r'^egress_guard_requests_total\{[^}]*decision="allow"[^}]*kind="request"[^}]*\} [1-9]'
        deadline = time.monotonic() + 10  # counted from committed rows: the row's batch may be pending
        while not re.search(counted, metrics := engine.docker("exec", pod, "python3", "-c", scrape).stdout, re.M):
            assert time.monotonic() < deadline, metrics[-3000:]  # the port the manifest annotates for Prometheus
            time.sleep(0.5)
        # a kill through replica 2 holds on replica 1 (and on 2)
        killed = cli("egress-guard-2", "kill", "--agent", "agent")
        assert "revoked" in killed.stdout and "key(s) of agent agent" in killed.stdout, killed.stdout + killed.stderr
        started = time.monotonic()
        refused = through("agent-1", key_1)
        engine.timings["kill via replica 2 -> refusal on replica 1 (incl. docker-compose run)"] = (
            time.monotonic() - started
        )
        assert refused.startswith(("RESULT 401", "RESULT 403")) and "revoked" in refused, refused
        assert "revoked" in through("agent-2", key_2)
        assert "revoked" in through_pod(pod_ip, ca, key_2)
        # the audit log through either replica holds both replicas' rows
        for replica in ("egress-guard-1", "egress-guard-2"):
            rows = json.loads(cli(replica, "audit", "--format", "json", "--limit", "1000").stdout)
            sessions = {(r["session"], r["decision"]) for r in rows if r["kind"] == "request"}
            assert {("minted-on-1", "allow"), ("minted-on-2", "allow"), ("fleet-test", "allow")} <= sessions, sessions
            assert ("minted-on-1", "deny") in sessions and ("minted-on-2", "deny") in sessions, sessions
        chains = run(
            "exec", "-T", "db", "psql", "-d", "egress_guard", "-Atc",
            "SELECT session, string_agg(DISTINCT chain, ',') FROM audit WHERE kind = 'request' GROUP BY session",
        ).stdout  # fmt: skip
        log(f"fleet: audit chains by session: {chains.split()}")
        pod_chain = "egress-guard-5d8f7c9b6-x2kqp"  # EG_REPLICA: the pod's name
        assert f"minted-on-1|eg-1,eg-2,{pod_chain}" in chains.split(), chains
        assert f"minted-on-2|eg-1,eg-2,{pod_chain}" in chains.split(), chains
        # the password: in no log, no audit row, no container's environment
        everything = run("logs", "--no-color").stdout + run("logs", "--no-color").stderr
        everything += cli("egress-guard-1", "audit", "--format", "json", "--limit", "1000").stdout
        for name in ("egress-guard-1", "egress-guard-2", "db"):
            everything += engine.docker("inspect", run("ps", "-q", name).stdout.strip()).stdout
        everything += "".join(getattr(engine.docker("logs", pod), f) for f in ("stdout", "stderr"))
        assert password not in everything
        assert "pg-password" in everything  # the inspect output was looked at: it names the secret's file
    finally:
        if pod:
            engine.docker("rm", "-f", pod, check=False)
        if relay:
            relay.close()
        run("down", "-v", "-t", "5", check=False)


def test_kubernetes_manifest_parses_and_its_config_loads(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    kinds = {d["kind"]: d for d in docs if d}
    assert {"Deployment", "Service", "Secret", "ConfigMap"} <= kinds.keys(), kinds.keys()
    deployment, configmap = kinds["Deployment"], kinds["ConfigMap"]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "egress-guard"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    # the config: the ConfigMap's file, loaded by egress-guard itself, with the Secret's
    # password file where the ConfigMap's store.password_file says
    text = next(iter(configmap["data"].values()))
    raw = yaml.safe_load(text)
    secret_mount = next(m for m in mounts.values() if "secret" in volumes[m["name"]])
    password_file = Path(raw["store"]["password_file"])
    assert password_file.parent == Path(secret_mount["mountPath"])
    secret_name = volumes[secret_mount["name"]]["secret"]["secretName"]
    assert any(d["kind"] == "Secret" and d["metadata"]["name"] == secret_name for d in docs)
    config_mount = next(m for m in mounts.values() if "configMap" in volumes[m["name"]])
    assert volumes[config_mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]

    # relocate the absolute paths under tmp_path and load it
    def moved(p: str) -> str:
        return str(tmp_path / p.lstrip("/"))

    raw["store"]["password_file"] = moved(raw["store"]["password_file"])
    Path(raw["store"]["password_file"]).parent.mkdir(parents=True)
    Path(raw["store"]["password_file"]).write_text("x\n")
    for key in ("ca_dir",):
        if key in raw:
            raw[key] = moved(raw[key])
    if "audit" in raw and "path" in raw["audit"]:
        raw["audit"]["path"] = moved(raw["audit"]["path"])
    (tmp_path / "egress-guard.yaml").write_text(yaml.safe_dump(raw))
    loaded = load_config(tmp_path / "egress-guard.yaml")
    assert loaded.store is not None and loaded.store.url.startswith("postgresql://")
    assert loaded.store.password_file == Path(raw["store"]["password_file"])
    # every replica listens where the Service sends agents
    service = kinds["Service"]
    port = service["spec"]["ports"][0]
    target = port.get("targetPort", port["port"])
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    target = named.get(target, target)
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["EG_LISTEN"] == f"0.0.0.0:{target}" and loaded.listen == f"0.0.0.0:{target}"
    assert container["command"] == ["start-fleet-replica"] and "EG_CA_SOURCE" in env
    assert loaded.metrics_listen == ("0.0.0.0", named["metrics"])
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
