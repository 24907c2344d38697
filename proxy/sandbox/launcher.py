"""Start a sandbox from the host side and control it: `start(spec)` returns a running
`Sandbox` whose PID 1 is known; `kill()` is the kill it cannot refuse.

Needs Linux and root (in the initial user namespace): creating namespaces, moving a TUN
device and mounting take CAP_SYS_ADMIN/CAP_NET_ADMIN, and /dev/net/tun is 0600 root, so
there is no rootless variant (an unprivileged user namespace cannot get a TUN that the
proxy outside holds).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

STAGE_MODULE = "egress_guard.sandbox.stage"  # run as its own process: not imported here
SHARE_MOUNT = "/run/egress-guard"  # where SandboxSpec.share appears inside
TUN_NAME = re.compile(r"^egs-[A-Za-z0-9_-]{1,11}$")


class SandboxError(Exception):
    """Cannot start a sandbox; the message names the fix."""


def ip_path() -> str:
    """iproute2's `ip`, by absolute path (this runs as root: no PATH lookup)."""
    for path in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"):
        if os.access(path, os.X_OK):
            return path
    raise SandboxError("no `ip` command (iproute2). Fix: install iproute2")


@dataclass(frozen=True)
class SandboxSpec:
    """What to run and how. `tun`/`addr`: the TUN device (in the host netns now) to move
    in and the sandbox's address on it; without them the sandbox has loopback only.
    `share`: a host directory bound read-only at /run/egress-guard inside (the CA copies);
    `resolv_conf`: the name of a file in it bound over /etc/resolv.conf. `hide`: directories
    covered by an empty tmpfs inside (the CA dir with its key and control socket); /tmp,
    /var/tmp, /dev/shm and /run always get fresh ones."""

    command: Sequence[str]
    env: Mapping[str, str]
    uid: int = 65534
    gid: int = 65534
    tun: str | None = None
    addr: str | None = None
    share: str | None = None
    resolv_conf: str | None = None
    hide: Sequence[str] = ()
    cwd: str | None = None

    def wire(self) -> dict[str, object]:
        return {
            "command": list(self.command),
            "env": dict(self.env),
            "uid": self.uid,
            "gid": self.gid,
            "tun": self.tun,
            "addr": self.addr,
            "share": self.share,
            "resolv_conf": self.resolv_conf,
            "hide": list(self.hide),
            "cwd": self.cwd,
        }


def preflight() -> None:
    """Raise SandboxError (naming the fix) where a sandbox cannot be made."""
    if not sys.platform.startswith("linux"):
        raise SandboxError("--isolate needs Linux (network, mount and PID namespaces). Fix: run on Linux")
    if os.geteuid() != 0:
        raise SandboxError(
            "--isolate needs root: it creates namespaces and moves a TUN device, and /dev/net/tun is "
            "0600 root, so a rootless sandbox (user namespace) cannot be given one. "
            "Fix: run it with sudo (the command itself runs as nobody, or as --user)"
        )
    if not os.path.exists("/dev/net/tun"):
        raise SandboxError("no /dev/net/tun: the kernel has no TUN support here. Fix: `modprobe tun`")


class Sandbox:
    """A running sandbox. `pid`: stage 1 (our child); `init_pid`: the sandbox's PID 1
    (host pid), `init_fd` a pidfd for it (kill() signals through it: no PID reuse);
    `pidns`: the inode of its PID namespace."""

    def __init__(self, proc: subprocess.Popen[bytes], init_pid: int, pidns: int, init_fd: int | None = None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.init_pid = init_pid
        self.init_fd = init_fd
        self.pidns = pidns
        self.killed_at: float | None = None
        self.start_ms = 0.0  # from start() called to PID 1 running

    def kill(self) -> None:
        """SIGKILL PID 1 through its pidfd: the kernel then kills every process in the PID
        namespace. The pidfd was opened before stage 1 may reap PID 1, so it names that
        process or a dead one, never a reused pid."""
        if self.init_fd is None or self.proc.poll() is not None:
            return
        if self.killed_at is None:
            self.killed_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.init_fd, signal.SIGKILL)

    def close(self) -> None:
        if self.init_fd is not None:
            os.close(self.init_fd)
            self.init_fd = None

    def signal(self, sig: int) -> None:
        """Send `sig` to stage 1, which forwards SIGTERM/SIGHUP to the command."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def pidfd(self) -> int:
        """A pidfd for stage 1: readable when the sandbox has ended (for select)."""
        return os.pidfd_open(self.pid)

    def wait(self, timeout: float | None = None) -> int:
        """The command's exit status (128+N after signal N). Raises subprocess.TimeoutExpired."""
        code = self.proc.wait(timeout)
        self.close()
        return code if code >= 0 else 128 - code


def _read_line(fd: int) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        out += chunk
    return out


def start(spec: SandboxSpec) -> Sandbox:
    """Create the namespaces, move the TUN in, start PID 1 and the command. Raises
    SandboxError if any step fails (nothing is left behind: stage 1 is killed)."""
    if spec.tun is not None and not TUN_NAME.match(spec.tun):
        raise SandboxError(f"bad TUN device name {spec.tun!r}")
    t0 = time.monotonic()
    to_stage_r, to_stage_w = os.pipe()
    from_stage_r, from_stage_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-m", STAGE_MODULE, str(to_stage_r), str(from_stage_w)],
            pass_fds=(to_stage_r, from_stage_w),
            close_fds=True,
            start_new_session=True,  # no controlling terminal in the sandbox; ^C comes through run
        )
    finally:
        os.close(to_stage_r)
        os.close(from_stage_w)
    try:
        blob = json.dumps(spec.wire()).encode()
        os.write(to_stage_w, len(blob).to_bytes(8, "big") + blob)
        if os.read(from_stage_r, 1) != b"U":
            raise SandboxError(f"sandbox stage 1 failed to start (exit {proc.wait()})")
        if spec.tun is not None:
            move = [ip_path(), "link", "set", spec.tun, "netns", str(proc.pid)]
            moved = subprocess.run(move, capture_output=True, text=True, check=False)
            if moved.returncode != 0:
                raise SandboxError(f"cannot move {spec.tun} into the sandbox: {moved.stderr.strip()}")
        os.write(to_stage_w, b"G")
        line = _read_line(from_stage_r).decode(errors="replace").rstrip("\n")
        if not line.startswith("P"):
            detail = line[1:] if line.startswith("E") else f"exit {proc.wait()}"
            raise SandboxError(f"sandbox setup failed: {detail}")
        init_pid = int(line[1:])
        init_fd = os.pidfd_open(init_pid)  # stage 1 reaps PID 1 only after "K"
        os.write(to_stage_w, b"K")
        try:
            pidns = os.stat(f"/proc/{init_pid}/ns/pid").st_ino
        except FileNotFoundError:  # the command has already ended
            pidns = 0
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(to_stage_w)
        os.close(from_stage_r)
    sandbox = Sandbox(proc, init_pid, pidns, init_fd)
    sandbox.start_ms = (time.monotonic() - t0) * 1000
    return sandbox
