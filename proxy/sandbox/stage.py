"""What runs inside a sandbox: stage 1 (new network and mount namespace; sets them up),
then PID 1 of a new PID namespace, which runs the command as an unprivileged user.

Started by `launcher.start` as `python -I -m egress_guard.sandbox.stage RFD WFD`, as root.
It reads its configuration (JSON, length-prefixed) from RFD and talks to the launcher
over the two pipes:

    stage -> launcher  "U"            network namespace exists: move the TUN in now
    launcher -> stage  "G"            go on
    stage -> launcher  "P<pid>\\n"     PID 1 of the sandbox (host pid); the command starts
                       "E<message>\\n" setup failed (stage exits 125)
    launcher -> stage  "K"            the launcher holds a pidfd for PID 1: only now may
                                      stage 1 reap it (its pid cannot be reused before)

Exit status: the command's (128+N if a signal N ended it, e.g. 137 after SIGKILL).
Sessions and signals: stage 1 runs in a session of its own (the launcher starts it so) and
the command in another (setsid before exec), so no process in the sandbox has a
controlling terminal: TIOCSTI into the caller's terminal fails with EPERM, and the
terminal's ^C reaches `run` only. SIGINT, SIGQUIT, SIGTERM and SIGHUP sent to stage 1 are
forwarded down to the command.

Mounts: "/" is made private, then the directories in `hide` get an empty tmpfs, then /tmp,
/var/tmp, /dev/shm and /run get fresh ones (no host sockets, no shared files between
sandboxes), then `share` (the host directory with the CA copies and resolv.conf) is bound
read-only at /run/egress-guard and its resolv.conf over /etc/resolv.conf (over its target
when that is a symlink into a fresh tmpfs, e.g. /run/systemd/resolve/stub-resolv.conf).
The sandbox has its own System V IPC namespace too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from egress_guard.sandbox.launcher import SHARE_MOUNT, SandboxError, ip_path

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_REMOUNT = 1, 32
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG = 38, 1
SETUP_FAILED = 125
FORWARDED = {signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP}
FRESH = {"/tmp": "1777", "/var/tmp": "1777", "/dev/shm": "1777", "/run": "0755"}  # noqa: S108
_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    if _libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise SetupError(f"mount {src or fstype} on {dst}: {os.strerror(err)}")


def _ip(*args: str) -> None:
    done = subprocess.run([ip_path(), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SetupError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _status(st: int) -> int:
    return os.waitstatus_to_exitcode(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)


def _forward_to(pid: int) -> Callable[[int, object], None]:
    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    return forward


def _read_config(rfd: int) -> dict[str, Any]:
    size = int.from_bytes(_read_exact(rfd, 8), "big")
    return json.loads(_read_exact(rfd, size))


def _read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            os._exit(SETUP_FAILED)  # the launcher went away
        out += chunk
    return out


def _network(cfg: dict[str, Any]) -> None:
    """Inside the new netns: no IPv6 at all (set before lo comes up, so not even ::1),
    loopback, and if a TUN was moved in, the one address and the one route through it."""
    for which in ("all", "default"):
        path = f"/proc/sys/net/ipv6/conf/{which}/disable_ipv6"
        if os.path.exists(path):
            with open(path, "w") as f:
                f.write("1")
    _ip("link", "set", "lo", "up")
    tun = cfg.get("tun")
    if tun:
        addr = cfg["addr"]
        _ip("link", "set", tun, "up")
        _ip("addr", "add", f"{addr}/32", "dev", tun)
        # quickack: mitmproxy_rs's TCP stack uses Nagle; with delayed ACKs every kept-alive
        # request would wait ~40 ms.
        _ip("route", "add", "default", "dev", tun, "src", addr, "quickack", "1")


def _covered(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in FRESH)


def _filesystem(cfg: dict[str, Any]) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    # What the fresh tmpfs mounts will cover, opened now (O_PATH: bound via /proc/self/fd).
    share = os.open(cfg["share"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if cfg.get("share") else None
    resolv_target = os.path.realpath("/etc/resolv.conf")  # may be a symlink into /run
    for path in cfg.get("hide", []):  # e.g. the CA dir: CA key, control socket
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0700,size=4k")
    for path, mode in FRESH.items():  # the host's sockets (tmux, D-Bus, ssh-agent, docker) and files
        if os.path.isdir(path) and not os.path.islink(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode}")
    if share is None:
        return
    if not os.path.ismount("/run"):  # never create SHARE_MOUNT on the host's filesystem
        raise SetupError("no /run directory to mount a fresh tmpfs on")
    os.makedirs(SHARE_MOUNT, mode=0o755)
    _mount(f"/proc/self/fd/{share}", SHARE_MOUNT, None, MS_BIND)
    _mount(None, SHARE_MOUNT, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.close(share)
    if cfg.get("resolv_conf"):
        if _covered(resolv_target) and not os.path.exists(resolv_target):
            os.makedirs(os.path.dirname(resolv_target), mode=0o755, exist_ok=True)
            os.close(os.open(resolv_target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        _mount(f"{SHARE_MOUNT}/{cfg['resolv_conf']}", resolv_target, None, MS_BIND)


def stage1(rfd: int, wfd: int) -> None:
    """Never returns: exits with the command's status."""
    _die_with_parent()
    if os.getppid() == 1:
        os._exit(SETUP_FAILED)
    for fd in (rfd, wfd):
        os.set_inheritable(fd, False)  # the command must not get the pipes
    cfg = _read_config(rfd)
    try:
        os.unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC)  # the PID namespace comes later: see below
        os.write(wfd, b"U")
        if _read_exact(rfd, 1) != b"G":
            os._exit(SETUP_FAILED)
        _network(cfg)
        _filesystem(cfg)
        # CLONE_NEWPID only now: the first fork after it becomes the namespace's PID 1, and
        # once that exits every later fork fails (an `ip` child must not be that first one).
        os.unshare(CLONE_NEWPID)
    except (OSError, SetupError, SandboxError) as exc:
        os.write(wfd, f"E{exc}\n".encode())
        os._exit(SETUP_FAILED)
    # The forwarded signals stay blocked until each stage has its forwarding handler: a PID 1 drops
    # signals from outside its namespace that have no handler, but blocked ones wait.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    init_pid = os.fork()
    if init_pid == 0:
        _init(cfg)
    for s in FORWARDED:
        signal.signal(s, _forward_to(init_pid))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    os.write(wfd, f"P{init_pid}\n".encode())
    with contextlib.suppress(OSError):
        os.read(rfd, 1)  # "K" (or EOF: the launcher is gone)
    while True:
        try:
            _, st = os.waitpid(init_pid, 0)
            break
        except InterruptedError:
            continue
    os._exit(_status(st))


def _init(cfg: dict[str, Any]) -> None:
    """PID 1 of the sandbox: a fresh /proc, the command as its only child, reaps everything,
    exits with the command's status (the kernel then kills whatever is left)."""
    try:
        _die_with_parent()
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # only the sandbox's pids
    except SetupError as exc:
        print(f"egress-guard sandbox: {exc}", file=sys.stderr)
        os._exit(SETUP_FAILED)
    cmd_pid = os.fork()
    if cmd_pid == 0:
        _exec_command(cfg)
    for s in FORWARDED:
        signal.signal(s, _forward_to(cmd_pid))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # what came meanwhile goes on now
    code = None
    while code is None:
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == cmd_pid:
            code = _status(st)
    os._exit(code if code is not None else 0)


def _exec_command(cfg: dict[str, Any]) -> None:
    for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    cmd = cfg["command"]
    try:
        os.setsid()  # no controlling terminal: no TIOCSTI into the caller's shell
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # no setuid/file-cap binaries
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if cfg.get("cwd"):
            os.chdir(cfg["cwd"])
    except OSError as exc:
        print(f"egress-guard sandbox: cannot drop privileges: {exc}", file=sys.stderr)
        os._exit(SETUP_FAILED)
    try:
        os.execvpe(cmd[0], cmd, cfg["env"])  # noqa: S606 - the user's own command
    except OSError as exc:
        print(f"egress-guard sandbox: cannot run {cmd[0]!r}: {exc.strerror}", file=sys.stderr)
        os._exit(127)


if __name__ == "__main__":
    stage1(int(sys.argv[1]), int(sys.argv[2]))
