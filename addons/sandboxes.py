"""Sandboxes: the proxy side of `egress-guard run --isolate`.

`run --isolate` (egress_guard.sandbox) asks the running proxy for a way out over a root-only
control socket (`<ca_dir>/control.sock`, JSON lines), then runs the agent in network, mount
and PID namespaces of its own whose only network device is a TUN this process holds:

  -> {"op": "open", "agent": A, "session": S}
  <- {"ok": true, "sandbox": ID, "tun": "egs-ID", "addr": "10.77.N.2", "dns": ..., "proxy": ...}
     (run moves the TUN into the sandbox's netns, routes everything into it)
  -> {"op": "started", "pid": P, "pidns": INODE}   (the sandbox's PID 1 and its PID namespace)
  <- {"ok": true}
  the connection's end: the sandbox is gone (its TUN mode removed, its connections cut)

mitmproxy's `tun` mode hands every packet from the TUN to the proxy; `Sandboxes` knows which
sandbox, and so which agent and session, each TUN belongs to. A connection's identity comes
from where it came in (`client.proxy_mode`), which nothing inside the sandbox can forge.
`SandboxGuard` (addons/sandbox_guard.py, first in the chain) then:

- names the sandbox's agent and session on every flow and refusal from it;
- answers every DNS query itself: names an allow rule covers get an address of its own from
  198.18.0.0/16 (per sandbox), AAAA and other types no data, every other name NXDOMAIN and
  an audit row — no lookup leaves the machine;
- turns a captured TCP connection to such an address into a tunnel to (name, port), so
  RequestGuard's Host/SNI checks and address pinning decide as for a CONNECT; the explicit
  proxy address gets mitmproxy's regular HTTP proxy layer (ConnectGuard as usual); any other
  TCP destination, and UDP to any port but 53, is refused with an audit row.

The kill switch (`kill --agent A` / `--session S`) SIGKILLs the PID 1 of each of the agent's
sandboxes (the kernel then kills every process in its PID namespace) and records it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import connection
from mitmproxy.proxy.mode_specs import ProxyMode, TunMode

from egress_guard.addons._flow import safe_text
from egress_guard.addons.attribution import Attribution
from egress_guard.addons.killswitch import cut_client
from egress_guard.config import Config
from egress_guard.credential_verdict import Origin
from egress_guard.policy import Verdict
from egress_guard.store import AuditLog, AuditRow
from egress_guard.timeutil import now_iso

log = logging.getLogger("egress_guard")

FAKE_NET = ipaddress.ip_network("198.18.0.0/16")  # what DNS answers; inside, routed into the TUN
FAKE_FIRST = 256  # 198.18.1.0 on: clear of the DNS and proxy addresses
FAKE_LAST = FAKE_NET.num_addresses - 512
DNS_ADDR = "198.18.0.53"  # the sandbox's nameserver (any address reaches us; this one is in resolv.conf)
PROXY_ADDR = ("198.18.255.254", 3128)  # the explicit proxy inside (HTTP(S)_PROXY)
CONTROL_SOCKET = "control.sock"
MAX_SANDBOXES = 254  # 10.77.N.2, N = 1..254


def control_path(ca_dir: Path) -> Path:
    return ca_dir / CONTROL_SOCKET


REFUSALS_PER_SECOND = 50.0  # refusal rows and log lines a sandbox gets, sustained ...
REFUSAL_BURST = 200.0  # ... and at once; past it, one aggregated row a second (a flood's cost)


@dataclass
class RefusalBudget:
    """A token bucket for one sandbox's refusal rows and log lines (a flood of unique
    addresses or names must not write one row each)."""

    tokens: float = REFUSAL_BURST
    at: float = 0.0
    suppressed: int = 0  # refusals since the last aggregated row, none written
    flushing: bool = False  # an aggregated row is scheduled

    def take(self, now: float) -> bool:
        if self.at:
            self.tokens = min(REFUSAL_BURST, self.tokens + (now - self.at) * REFUSALS_PER_SECOND)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        return False


@dataclass
class Sandbox:
    id: str
    n: int
    agent: str | None
    session: str | None
    opened_at: str  # UTC ISO, as revocations' ts: a kill written before the sandbox opened is not its
    pid: int | None = None  # host PID of the sandbox's PID 1
    pidns: int | None = None  # inode of its PID namespace (guards against PID reuse)
    killed: bool = False
    killed_pid: int | None = None  # the PID 1 a kill reached (a kill before `started` reaches none)
    closed: bool = False  # being closed: its TUN mode is being removed
    fake_by_name: dict[str, str] = field(default_factory=dict)
    name_by_fake: dict[str, str] = field(default_factory=dict)
    denied_names: dict[str, float] = field(default_factory=dict)
    refusals: RefusalBudget = field(default_factory=RefusalBudget)

    @property
    def tun(self) -> str:
        return f"egs-{self.id}"

    @property
    def addr(self) -> str:
        return f"10.77.{self.n}.2"

    def fake_ip(self, name: str) -> str | None:
        ip = self.fake_by_name.get(name)
        if ip is None:
            i = FAKE_FIRST + len(self.fake_by_name)
            if i > FAKE_LAST:
                return None
            ip = self.fake_by_name[name] = str(FAKE_NET[i])
            self.name_by_fake[ip] = name
        return ip


class Sandboxes:
    """The TUN registry and the control server; a background task of the proxy (`running`,
    `done`), shared with SandboxGuard (the flows) and KillSwitch (kills)."""

    name = "sandboxes"

    def __init__(self, config: Config, audit: AuditLog, proxyserver: Any, attribution: Attribution) -> None:
        self.config = config
        self.audit = audit
        self.proxyserver = proxyserver
        self.attribution = attribution
        self.by_tun: dict[str, Sandbox] = {}
        self.used_tun = False  # a TUN existed: `up` leaves with os._exit (mitmproxy_rs exit crash)
        self._server: asyncio.AbstractServer | None = None
        self._start: asyncio.Task[None] | None = None
        self._modes = asyncio.Lock()

    # --- identity --------------------------------------------------------------------------

    def of(self, client: connection.Client) -> Sandbox | None:
        mode = client.proxy_mode
        return self.by_tun.get(mode.data) if isinstance(mode, TunMode) else None

    def origin(self, client: connection.Client) -> str | None:
        """The agent a connection came from by where it came in ("" for a sandbox with no
        agent), with its session, None when it did not come from a sandbox."""
        sb = self.of(client)
        return None if sb is None else Origin(sb.agent or "", sb.session)

    # --- the control server ----------------------------------------------------------------

    def running(self) -> None:
        self._start = asyncio.create_task(self._listen(), name="egress-guard sandboxes")

    async def _listen(self) -> None:
        path = control_path(self.config.ca_dir)
        if os.geteuid() != 0:
            log.info("not running as root: no control socket %s, so no `run --isolate` (it needs root)", path)
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(path))
        except OSError as exc:
            log.error("cannot create the control socket %s (%s): `run --isolate` will not work", path, exc)
            return
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        log.info("control socket for `run --isolate`: %s", path)

    async def done(self) -> None:
        if self._start is not None:
            self._start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._start
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                control_path(self.config.ca_dir).unlink()
        for sb in list(self.by_tun.values()):
            self.kill(sb, "egress-guard stopped")
            await self.close(sb)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sb: Sandbox | None = None
        try:
            sock = writer.get_extra_info("socket")
            _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != 0:
                await self._reply(writer, {"ok": False, "error": "only root may open a sandbox"})
                return
            while line := await reader.readline():
                try:
                    msg = json.loads(line)
                    op = msg.get("op") if isinstance(msg, dict) else None
                except ValueError:
                    op, msg = None, {}
                if op == "open" and sb is None:
                    answer, sb = await self._open(msg.get("agent"), msg.get("session"))
                elif op == "started" and sb is not None and sb.pid is None:
                    pid, pidns = msg.get("pid"), msg.get("pidns")
                    if isinstance(pid, int) and isinstance(pidns, int) and pid > 1:
                        sb.pid, sb.pidns = pid, pidns
                        if sb.killed:  # a kill landed between open and started: it holds
                            self.kill(sb, "killed before it started")
                            answer = {"ok": False, "error": "the sandbox was killed (kill switch)"}
                        else:
                            answer = {"ok": True}
                    else:
                        answer = {"ok": False, "error": "started: pid and pidns must be integers"}
                else:
                    answer = {"ok": False, "error": f"unexpected request {str(op)[:40]!r}"}
                await self._reply(writer, answer)
        except Exception as exc:
            log.error("sandbox control connection failed: %r", exc)
        finally:
            if sb is not None:
                await self.close(sb)
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()

    async def _open(self, agent: Any, session: Any) -> tuple[dict[str, Any], Sandbox | None]:
        if agent is not None and (not isinstance(agent, str) or agent not in self.config.agents):
            return {"ok": False, "error": f"unknown agent {str(agent)[:60]!r}: not in the config's agents"}, None
        if session is not None and not isinstance(session, str):
            return {"ok": False, "error": "session must be a string"}, None
        taken = {sb.n for sb in self.by_tun.values()}
        n = next((i for i in range(1, MAX_SANDBOXES + 1) if i not in taken), None)
        if n is None:
            return {"ok": False, "error": f"too many sandboxes at once (at most {MAX_SANDBOXES})"}, None
        sb = Sandbox(secrets.token_hex(4), n, agent, session, now_iso())
        self.by_tun[sb.tun] = sb
        self.used_tun = True
        try:
            async with self._modes:
                await self._set_modes([*self._mode_list(), f"tun:{sb.tun}"])
                instance = next((s for s in self.proxyserver.servers if s.mode.data == sb.tun), None)
                if instance is None or not instance.is_running:
                    why = getattr(instance, "last_exception", None) or "mitmproxy did not start it"
                    raise RuntimeError(f"cannot create TUN {sb.tun}: {why}")
        except Exception as exc:
            del self.by_tun[sb.tun]
            with contextlib.suppress(Exception):
                async with self._modes:
                    await self._set_modes([m for m in self._mode_list() if m != f"tun:{sb.tun}"])
            return {"ok": False, "error": safe_text(str(exc))}, None
        log.info("sandbox %s opened for agent %s (session %s): %s %s", sb.id, agent, session, sb.tun, sb.addr)
        return {
            "ok": True,
            "sandbox": sb.id,
            "tun": sb.tun,
            "addr": sb.addr,
            "dns": DNS_ADDR,
            "proxy": f"{PROXY_ADDR[0]}:{PROXY_ADDR[1]}",
        }, sb

    def _mode_list(self) -> list[str]:
        from mitmproxy import ctx

        return list(ctx.options.mode)

    async def _set_modes(self, modes: list[str]) -> None:
        from mitmproxy import ctx

        ctx.options.update(mode=modes)
        await self.proxyserver.servers.update([ProxyMode.parse(m) for m in modes])  # wait until it is done

    async def close(self, sb: Sandbox) -> None:
        """Forget a sandbox: cut its connections (a vanished TUN sends no FIN or RST), remove its mode."""
        if sb.closed or self.by_tun.get(sb.tun) is not sb:
            return  # closed already (done() and the control connection's end both close it)
        sb.closed = True  # before awaiting: a second close is a no-op; its connections are refused
        self.cut(sb)
        async with self._modes:
            with contextlib.suppress(Exception):
                await self._set_modes([m for m in self._mode_list() if m != f"tun:{sb.tun}"])
        self.by_tun.pop(sb.tun, None)
        log.info("sandbox %s closed", sb.id)

    def cut(self, sb: Sandbox) -> int:
        ids = [
            cid
            for cid, handler in list(self.proxyserver.connections.items())
            if getattr(handler.client.proxy_mode, "data", None) == sb.tun
        ]
        return sum(cut_client(self.proxyserver, cid) for cid in ids)

    # --- the kill switch -------------------------------------------------------------------

    def kill_matching(self, agent: str | None, session: str | None, since: str, reason: str | None) -> None:
        """A revocation of `agent`, `session` or both (that agent's session only) written at
        `since`: kill each such sandbox opened before it."""
        if agent is None and session is None:
            return
        for sb in list(self.by_tun.values()):
            hit = (agent is None or sb.agent == agent) and (session is None or sb.session == session)
            if hit and not (sb.killed and sb.killed_pid == sb.pid) and sb.opened_at <= since:
                self.kill(sb, reason or "revoked")

    def kill(self, sb: Sandbox, reason: str) -> None:
        """SIGKILL the sandbox's PID 1: the kernel kills every process in its PID namespace."""
        sb.killed = True
        sb.killed_pid = sb.pid
        if sb.pid is None or sb.pidns is None:
            what = "no process started in it yet: its network is cut"
        else:
            try:
                same = os.stat(f"/proc/{sb.pid}/ns/pid").st_ino == sb.pidns
            except OSError:
                same = False
            if same:
                try:
                    os.kill(sb.pid, signal.SIGKILL)
                    what = f"SIGKILLed its PID 1 (host pid {sb.pid}) and so every process in it"
                except OSError as exc:
                    what = f"its PID 1 (host pid {sb.pid}) could not be killed ({exc.strerror})"
            else:
                what = f"its PID 1 (host pid {sb.pid}) had already exited"
        cut = self.cut(sb)
        log.warning("sandbox %s of agent %s killed (%s): %s; cut %d connection(s)", sb.id, sb.agent, reason, what, cut)
        self.audit.record(
            AuditRow(
                ts=now_iso(),
                request_id=str(uuid.uuid4()),
                kind="connect",
                decision=Verdict.DENY.value,
                reason=safe_text(f"kill: sandbox {sb.id} ({reason}): {what}", 300),
                client=sb.addr,
                agent=sb.agent,
                session=sb.session,
            )
        )
