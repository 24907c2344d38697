"""`run --isolate`, put together: ask `up` for a TUN, start the sandbox with it, tell `up`
who runs there, watch the command, the deadline and `up`, and return the command's status.

The caller (the CLI) mints the session's fake keys; this module only runs things.
"""

from __future__ import annotations

import os
import pwd
import selectors
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from egress_guard.sandbox.control import ControlClient, Opened
from egress_guard.sandbox.launcher import Sandbox, SandboxError, SandboxSpec, start

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    home: str
    name: str


def sandbox_user(explicit: str | None, environ: Mapping[str, str]) -> User:
    """Who the command runs as: --user if given, else the sudo caller (SUDO_UID/SUDO_GID),
    else nobody (65534). Never root: root in the initial user namespace could re-route or
    leave the namespace."""
    gid: int | None = None
    if explicit is not None:
        spec = explicit
    elif environ.get("SUDO_UID"):
        spec = environ["SUDO_UID"]
        gid = int(environ["SUDO_GID"]) if environ.get("SUDO_GID", "").isdigit() else None
    else:
        spec = "65534"
    try:
        entry: pwd.struct_passwd | None = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except KeyError:
        if not spec.isdigit():
            raise SandboxError(f"no user {spec!r}. Fix: pass --user NAME or a numeric uid") from None
        entry = None
    uid = entry.pw_uid if entry else int(spec)
    if uid == 0:
        raise SandboxError(
            "the isolated command must not run as root (root could leave the sandbox's network). "
            "Fix: pass --user NAME, or run egress-guard with sudo from your own account"
        )
    home = entry.pw_dir if entry and os.path.isdir(entry.pw_dir) else "/tmp"  # noqa: S108
    return User(
        uid, gid if gid is not None else (entry.pw_gid if entry else uid), home, entry.pw_name if entry else spec
    )


@contextmanager
def run_dir() -> Iterator[Path]:
    """A directory the sandbox's user can read (0755; files 0644): the CA copies and the
    resolv.conf. Removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="egress-guard-sandbox-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _publish(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    path.chmod(0o644)
    return path


def sandbox_env(
    base: Mapping[str, str],
    variables: Mapping[str, str],
    opened: Opened,
    directory: Path,
    user: User,
) -> dict[str, str]:
    """`variables` (what `env --agent` prints) over `base`, with the proxy at the address
    `up` gave for this sandbox and every CA path pointing at a copy the user can read."""
    env = dict(base) | dict(variables)
    copies: dict[str, str] = {}
    for key, value in variables.items():
        if key.endswith(("_PROXY", "_proxy")) or key in PROXY_VARS:
            continue
        if value.endswith(".pem") and os.path.isfile(value) and value not in copies:
            copies[value] = str(
                _publish(directory, f"{len(copies)}-{os.path.basename(value)}", Path(value).read_bytes())
            )
        if value in copies:
            env[key] = copies[value]
    url = f"http://{opened.proxy}"
    env |= {var: url for var in PROXY_VARS}
    env |= {"HOME": user.home, "USER": user.name, "LOGNAME": user.name, "EGRESS_GUARD_SANDBOX": opened.sandbox}
    return env


def _kill_message(reason: str) -> None:
    print(f"egress-guard: {reason}: sandbox killed", file=sys.stderr, flush=True)


def supervise(sandbox: Sandbox, control: ControlClient | None, deadline: float | None, max_time: str = "") -> int:
    """Wait for the command; SIGKILL the sandbox at `deadline` (time.monotonic()) or when
    `up` goes away (fail closed). Returns the command's status."""
    pidfd = sandbox.pidfd()
    sel = selectors.DefaultSelector()
    try:
        sel.register(pidfd, selectors.EVENT_READ, "ended")
        if control is not None:
            sel.register(control.fileno(), selectors.EVENT_READ, "control")
        while sandbox.proc.poll() is None:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                sandbox.kill()
                _kill_message(f"--max-time {max_time} reached")
                deadline = None
                continue
            for key, _ in sel.select(timeout):
                if key.data == "control" and control is not None and control.gone():
                    sel.unregister(control.fileno())
                    control = None
                    sandbox.kill()
                    _kill_message("egress-guard up went away (its TUN, the sandbox's only way out, with it)")
        return sandbox.wait()
    finally:
        sel.close()
        os.close(pidfd)


def run_isolated(
    control: ControlClient,
    opened: Opened,
    command: Sequence[str],
    env: Mapping[str, str],
    user: User,
    *,
    resolv_conf: Path,
    hide: Sequence[str] = (),
    deadline: float | None = None,
    max_time: str = "",
) -> int:
    """Start the sandbox on `opened`'s TUN, report it to `up`, supervise it. SIGINT is
    ignored here (a terminal's ^C reaches the command, whose status is returned: 130);
    SIGTERM and SIGHUP are forwarded to the command."""
    spec = SandboxSpec(
        command=command,
        env=env,
        uid=user.uid,
        gid=user.gid,
        tun=opened.tun,
        addr=opened.addr,
        resolv_conf=str(resolv_conf),
        hide=hide,
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    sandbox: Sandbox | None = None
    early: list[int] = []

    def forward(sig: int, _frame: object) -> None:
        if sandbox is not None:
            sandbox.signal(sig)
        else:
            early.append(sig)  # passed on once the sandbox runs

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGHUP, forward)
    try:
        sandbox = start(spec)
        for sig in early:
            sandbox.signal(sig)
        try:
            control.started(sandbox.init_pid, sandbox.pidns)
        except (SandboxError, OSError):
            sandbox.kill()
            sandbox.wait()
            raise
        return supervise(sandbox, control, deadline, max_time)
    finally:
        if sandbox is not None and sandbox.proc.poll() is None:
            sandbox.kill()
            sandbox.wait()
        for s, h in handlers.items():
            signal.signal(s, h)


def write_resolv_conf(directory: Path, nameserver: str) -> Path:
    """The sandbox's /etc/resolv.conf: `up` answers every query sent into the TUN."""
    return _publish(directory, "resolv.conf", f"nameserver {nameserver}\noptions attempts:2 timeout:2\n".encode())


def hidden_dirs(ca_dir: Path, cwd: Path) -> list[str]:
    """Directories to cover with an empty tmpfs inside: the CA dir (CA key, control socket),
    unless the command's working directory is in it."""
    ca = ca_dir.resolve()
    return [] if cwd.resolve().is_relative_to(ca) else [str(ca)]
