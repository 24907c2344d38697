"""The kill switch's container half: SIGKILL every running container labelled with an agent
(`egress-guard.agent=A`) or a session (`egress-guard.session=S`), through the Docker
Engine API — no cooperation from the agent, nothing it can trap.

Stdlib only (no Docker SDK, no CLI). The engine asked, like the docker CLI: DOCKER_HOST;
else the endpoint of the docker context DOCKER_CONTEXT or ~/.docker/config.json's
currentContext names; else /var/run/docker.sock. unix:// and plain tcp:// are spoken.
Fail closed: an engine named (DOCKER_HOST or a context) that cannot be asked — no engine
there, ssh://, TLS — is an error, like an engine that refuses us or a container that does
not die. Only with nothing named and no default socket is there no engine to ask (the
caller says so).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

AGENT_LABEL = "egress-guard.agent"
SESSION_LABEL = "egress-guard.session"
DEFAULT_HOST = "unix:///var/run/docker.sock"
TIMEOUT = 2.0  # seconds per API call: a kill must not hang on a wedged engine


class EngineUnreachable(Exception):
    """No Docker engine answers at the address (none running there)."""


class EngineUnsupported(Exception):
    """An engine address the kill switch cannot speak to (ssh://, TLS, npipe://)."""


def engine_host(env: dict[str, str] | None = None) -> tuple[str, str | None]:
    """(the engine's address, where it was named: "DOCKER_HOST", "docker context NAME" or
    None for the default socket)."""
    env = dict(os.environ) if env is None else env
    if env.get("DOCKER_HOST"):
        return env["DOCKER_HOST"], "DOCKER_HOST"
    config_dir = Path(env.get("DOCKER_CONFIG") or Path(env.get("HOME") or Path.home()) / ".docker")
    name = env.get("DOCKER_CONTEXT")
    if not name:
        try:
            name = json.loads((config_dir / "config.json").read_text()).get("currentContext")
        except (OSError, ValueError, AttributeError):
            name = None
    if name and name != "default":
        digest = hashlib.sha256(name.encode()).hexdigest()
        meta = config_dir / "contexts" / "meta" / digest / "meta.json"
        try:
            endpoint = json.loads(meta.read_text())["Endpoints"]["docker"]
            host = endpoint["Host"]
        except (OSError, ValueError, KeyError, TypeError):
            raise EngineUnsupported(f"docker context {name!r} has no readable endpoint ({meta})") from None
        if (config_dir / "contexts" / "tls" / digest / "docker").exists() or endpoint.get("SkipTLSVerify"):
            raise EngineUnsupported(f"docker context {name!r} uses TLS, which the kill switch does not speak")
        return str(host), f"docker context {name}"
    return DEFAULT_HOST, None


@dataclass
class ContainerKill:
    engine: str  # the DOCKER_HOST asked (an address, never a credential)
    selector: str  # the label filter, as `label=value`
    killed: list[str] = field(default_factory=list)  # "name (id12)"
    failed: list[str] = field(default_factory=list)  # "name (id12): why"
    unreachable: str | None = None  # nothing named and no engine at the default socket: none asked
    error: str | None = None  # an engine named but not asked, or that could not be asked
    unlabelled: list[str] = field(default_factory=list)  # the session's agents' containers, no session label

    def note(self) -> str:
        """One line for the kill record."""
        parts = []
        if self.killed:
            parts.append(f"SIGKILLed container(s) {', '.join(self.killed)}")
        if self.failed:
            parts.append(f"could not kill {', '.join(self.failed)}")
        if self.error:
            parts.append(f"docker: {self.error}")
        return "; ".join(parts)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DockerAPI:
    def __init__(self, host: str | None = None, timeout: float = TIMEOUT) -> None:
        self.named_by: str | None = "the caller"
        if host is None:
            host, self.named_by = engine_host()
        self.host = host
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        url = urllib.parse.urlsplit(self.host)
        if url.scheme == "unix":
            return _UnixConnection(url.path, self.timeout)
        if url.scheme == "tcp" and url.hostname:
            if os.environ.get("DOCKER_TLS_VERIFY") or os.environ.get("DOCKER_CERT_PATH"):
                raise EngineUnsupported(
                    f"{self.host} with DOCKER_TLS_VERIFY/DOCKER_CERT_PATH needs TLS, which the kill switch does not "
                    "speak. Fix: run `egress-guard kill` on the Docker host with its unix socket, or kill with "
                    "`docker kill $(docker ps -q -f label=…)`"
                )
            return http.client.HTTPConnection(url.hostname, url.port or 2375, timeout=self.timeout)
        raise EngineUnsupported(
            f"Docker engine address {self.host!r} is neither unix:// nor tcp:// (ssh:// and others are not spoken). "
            "Fix: run `egress-guard kill` on the Docker host, or kill with `docker kill $(docker ps -q -f label=…)`"
        )

    def call(self, method: str, path: str) -> tuple[int, bytes]:
        conn = self._connection()
        try:
            try:
                conn.connect()
            except OSError as exc:
                raise EngineUnreachable(f"no Docker engine answers at {self.host} ({exc.strerror or exc})") from None
            conn.request(method, path, headers={"Host": "docker"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def running(self, label: str) -> list[dict]:
        query = urllib.parse.urlencode({"filters": json.dumps({"label": [label], "status": ["running"]})})
        status, body = self.call("GET", f"/containers/json?{query}")
        if status != 200:
            raise OSError(f"listing containers answered {status}: {_message(body)}")
        return json.loads(body)

    def kill(self, container_id: str) -> str | None:
        """SIGKILL one container; None when it is dead (or was already), else why not."""
        status, body = self.call("POST", f"/containers/{urllib.parse.quote(container_id)}/kill?signal=SIGKILL")
        if status in (204, 404, 409):  # killed; gone; not running
            return None
        return f"{status} {_message(body)}"


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", ""))[:200]
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


def kill_containers(
    agent: str | None = None, session: str | None = None, host: str | None = None, session_agents: tuple[str, ...] = ()
) -> ContainerKill:
    """SIGKILL the running containers labelled with the agent, the session, or (with both)
    the agent and the session — that agent's session only, never another agent's session of
    the same name. With a session and no container carrying its label, the running
    containers of `session_agents` (the session's agents; with an agent, that agent) that
    carry no session label are counted in `unlabelled` (not killed: which session they run
    is unknown)."""
    if not agent and not session:
        raise ValueError("kill_containers names an agent, a session or both")
    label = f"{AGENT_LABEL}={agent}" if agent else f"{SESSION_LABEL}={session}"
    selector = f"{label},{SESSION_LABEL}={session}" if agent and session else label
    try:
        api = DockerAPI(host)
    except EngineUnsupported as exc:
        return ContainerKill(host or os.environ.get("DOCKER_HOST", "?"), selector, error=str(exc))
    result = ContainerKill(api.host, selector)
    try:
        found = api.running(label)
        if agent and session:
            mine = found
            found = [c for c in mine if (c.get("Labels") or {}).get(SESSION_LABEL) == session]
            if not found:
                result.unlabelled += [
                    f"{((c.get('Names') or ['?'])[0]).lstrip('/')} ({c['Id'][:12]})"
                    for c in mine
                    if SESSION_LABEL not in (c.get("Labels") or {})
                ]
        elif session and not found:
            for name in session_agents:
                result.unlabelled += [
                    f"{((c.get('Names') or ['?'])[0]).lstrip('/')} ({c['Id'][:12]})"
                    for c in api.running(f"{AGENT_LABEL}={name}")
                ]
    except EngineUnreachable as exc:
        if api.named_by is None:
            result.unreachable = str(exc)
        else:
            result.error = f"{exc} (named by {api.named_by})"
        return result
    except EngineUnsupported as exc:
        result.error = str(exc)
        return result
    except (OSError, ValueError) as exc:
        result.error = f"cannot list containers at {api.host}: {exc}"
        return result

    def one(container: dict) -> tuple[str, str | None]:
        name = ((container.get("Names") or ["?"])[0]).lstrip("/")
        shown = f"{name} ({container['Id'][:12]})"
        try:
            return shown, api.kill(container["Id"])
        except (OSError, EngineUnreachable, EngineUnsupported) as exc:
            return shown, str(exc)

    if found:
        with ThreadPoolExecutor(max_workers=min(8, len(found))) as pool:
            for shown, problem in pool.map(one, found):
                if problem is None:
                    result.killed.append(shown)
                else:
                    result.failed.append(f"{shown}: {problem}")
    return result
