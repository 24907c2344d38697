"""The client side of `up`'s control socket (`<ca_dir>/control.sock`, 0600 root): JSON
lines, one object per line.

    -> {"op": "open", "agent": A, "session": S}
    <- {"ok": true, "sandbox": ID, "tun": "egs-…", "addr": "10.77.N.2", "dns": "198.18.0.53",
        "proxy": "198.18.255.254:3128"}            or {"ok": false, "error": "…"}
    -> {"op": "started", "pid": <host pid of PID 1>, "pidns": <PID-ns inode>}
    <- {"ok": true}

The connection stays open for the sandbox's life: closing it tells `up` to remove the TUN
and cut its connections; `up` closing it means the proxy is gone.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egress_guard.sandbox.launcher import TUN_NAME, SandboxError

SOCKET_NAME = "control.sock"
REPLY_TIMEOUT = 15.0


class UpNotRunning(SandboxError):
    pass


@dataclass(frozen=True)
class Opened:
    sandbox: str
    tun: str
    addr: str
    dns: str
    proxy: str  # host:port, as reachable inside the sandbox


def socket_path(ca_dir: Path) -> Path:
    return ca_dir / SOCKET_NAME


class ControlClient:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise UpNotRunning(
                f"egress-guard up is not running (no control socket at {path}): "
                "start it with `egress-guard up`, then run again"
            ) from exc
        except OSError as exc:
            self.sock.close()
            raise SandboxError(f"cannot connect to egress-guard up's control socket at {path}: {exc}") from exc
        self.sock.settimeout(REPLY_TIMEOUT)
        self._buf = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise SandboxError(f"egress-guard up did not answer {message['op']!r} in time") from None
            if not chunk:
                raise SandboxError(f"egress-guard up closed the control connection (after {message['op']!r})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            raise SandboxError("egress-guard up sent a malformed reply on the control socket") from None
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            error = reply.get("error") if isinstance(reply, dict) else None
            raise SandboxError(f"egress-guard up refused {message['op']!r}: {error or reply!r}")
        return reply

    def open(self, agent: str | None, session: str | None) -> Opened:
        reply = self._ask({"op": "open", "agent": agent, "session": session})
        try:
            opened = Opened(
                str(reply["sandbox"]), str(reply["tun"]), str(reply["addr"]), str(reply["dns"]), str(reply["proxy"])
            )
            ipaddress.IPv4Address(opened.addr)
            ipaddress.IPv4Address(opened.dns)
            host, port = opened.proxy.rsplit(":", 1)
            ipaddress.IPv4Address(host)
            int(port)
        except (KeyError, ValueError) as exc:
            raise SandboxError(f"egress-guard up sent an unusable 'open' reply: {exc}") from None
        if not TUN_NAME.match(opened.tun):
            raise SandboxError(f"egress-guard up named a bad TUN device {opened.tun!r}")
        return opened

    def started(self, pid: int, pidns: int) -> None:
        self._ask({"op": "started", "pid": pid, "pidns": pidns})
        self.sock.setblocking(False)  # from now on: only watched for EOF (up gone)

    def gone(self) -> bool:
        """After `started`: True if `up` has closed the connection (call when readable)."""
        try:
            return self.sock.recv(65536) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
