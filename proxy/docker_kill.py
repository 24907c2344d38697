"""The kill switch's container half: SIGKILL every running container labelled with an agent
(`egress-guard.agent=A`) or a session (`egress-guard.session=S`), through the Docker
Engine API — no cooperation from the agent, nothing it can trap.

Stdlib only (no Docker SDK, no CLI): the API over the Unix socket DOCKER_HOST names
(default /var/run/docker.sock), or plain tcp://. No engine there is no error (nothing to
kill); an engine that is there but refuses us, or a container that does not die, is.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

AGENT_LABEL = "egress-guard.agent"
SESSION_LABEL = "egress-guard.session"
DEFAULT_HOST = "unix:///var/run/docker.sock"
TIMEOUT = 2.0  # seconds per API call: a kill must not hang on a wedged engine


class EngineUnreachable(Exception):
    """No Docker engine answers at the address (none running there): nothing to kill."""


@dataclass
class ContainerKill:
    engine: str  # the DOCKER_HOST asked (an address, never a credential)
    selector: str  # the label filter, as `label=value`
    killed: list[str] = field(default_factory=list)  # "name (id12)"
    failed: list[str] = field(default_factory=list)  # "name (id12): why"
    unreachable: str | None = None  # why no engine was asked
    error: str | None = None  # an engine that is there but could not be asked

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
        self.host = host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        url = urllib.parse.urlsplit(self.host)
        if url.scheme == "unix":
            return _UnixConnection(url.path, self.timeout)
        if url.scheme == "tcp" and url.hostname:
            if os.environ.get("DOCKER_TLS_VERIFY"):
                raise EngineUnreachable(f"{self.host} needs TLS, which the kill switch does not speak")
            return http.client.HTTPConnection(url.hostname, url.port or 2375, timeout=self.timeout)
        raise EngineUnreachable(f"DOCKER_HOST {self.host!r} is neither unix:// nor tcp://")

    def call(self, method: str, path: str) -> tuple[int, bytes]:
        conn = self._connection()
        try:
            try:
                conn.connect()
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise EngineUnreachable(f"no Docker engine at {self.host} ({exc.strerror})") from None
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


def kill_containers(agent: str | None = None, session: str | None = None, host: str | None = None) -> ContainerKill:
    """SIGKILL the running containers labelled with the agent (and, with both, the session)."""
    label = f"{AGENT_LABEL}={agent}" if agent else f"{SESSION_LABEL}={session}"
    api = DockerAPI(host)
    result = ContainerKill(api.host, label)
    try:
        found = api.running(label)
        if agent and session:
            found = [c for c in found if (c.get("Labels") or {}).get(SESSION_LABEL) == session]
    except EngineUnreachable as exc:
        result.unreachable = str(exc)
        return result
    except (OSError, ValueError) as exc:
        result.error = f"cannot list containers at {api.host}: {exc}"
        return result

    def one(container: dict) -> tuple[str, str | None]:
        name = ((container.get("Names") or ["?"])[0]).lstrip("/")
        shown = f"{name} ({container['Id'][:12]})"
        try:
            return shown, api.kill(container["Id"])
        except (OSError, EngineUnreachable) as exc:
            return shown, str(exc)

    if found:
        with ThreadPoolExecutor(max_workers=min(8, len(found))) as pool:
            for shown, problem in pool.map(one, found):
                if problem is None:
                    result.killed.append(shown)
                else:
                    result.failed.append(f"{shown}: {problem}")
    return result
