"""`run --isolate`, put together: ask `up` for a TUN, start the sandbox with it, tell `up`
who runs there, watch the command, the deadline and `up`, and return the command's status.

The caller (the CLI) mints the session's fake keys; this module only runs things.
"""

from __future__ import annotations

import contextlib
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
from egress_guard.sandbox.launcher import SHARE_MOUNT, Sandbox, SandboxError, SandboxSpec, start

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    home: str
    name: str


def sandbox_user(explicit: str | None) -> User:
    """Who the command runs as: nobody (65534), or --user if given. Never the sudo caller
    implicitly: as that user the agent could act through the caller's files (~/.bashrc,
    .git/hooks, venvs) and sockets. Never root: root in the initial user namespace could
    re-route or leave the namespace."""
    gid: int | None = None
    spec = explicit if explicit is not None else "65534"
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
    home = entry.pw_dir if explicit is not None and entry and os.path.isdir(entry.pw_dir) else "/tmp"  # noqa: S108
    return User(
        uid, gid if gid is not None else (entry.pw_gid if entry else uid), home, entry.pw_name if entry else spec
    )


# What the command inherits from run's environment (allowlist: no cloud credentials, agent
# sockets, session buses or tokens of the caller); `env --agent`'s variables come on top.
INHERITED = frozenset({"PATH", "LANG", "TERM", "TZ", "COLORTERM", "NO_COLOR"})


def inherited(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k in INHERITED or k.startswith("LC_")}


@contextmanager
def run_dir() -> Iterator[Path]:
    """A directory the sandbox's user can read (0755; files 0644): the CA copies and the
    resolv.conf, bound read-only at SHARE_MOUNT inside. Removed afterwards."""
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
    """`variables` (what `env --agent` prints) over the allowed part of `base`, with the
    proxy at the address `up` gave for this sandbox and every CA path pointing at a copy the
    user can read (in `directory`, seen inside at SHARE_MOUNT)."""
    env = inherited(base) | dict(variables)
    copies: dict[str, str] = {}
    for key, value in variables.items():
        if key.endswith(("_PROXY", "_proxy")) or key in PROXY_VARS:
            continue
        if value.endswith(".pem") and os.path.isfile(value) and value not in copies:
            name = f"{len(copies)}-{os.path.basename(value)}"
            _publish(directory, name, Path(value).read_bytes())
            copies[value] = f"{SHARE_MOUNT}/{name}"
        if value in copies:
            env[key] = copies[value]
    url = f"http://{opened.proxy}"
    env |= {var: url for var in PROXY_VARS}
    env |= {"HOME": user.home, "USER": user.name, "LOGNAME": user.name, "EGRESS_GUARD_SANDBOX": opened.sandbox}
    return env


def _kill_message(reason: str) -> None:
    print(f"egress-guard: {reason}: sandbox killed", file=sys.stderr, flush=True)


TERM_GRACE = 3.0  # seconds a command has to obey SIGTERM/SIGHUP before the sandbox is killed


class Signals:
    """What `run` received while the sandbox ran: the first ^C (SIGINT/SIGQUIT) and SIGTERM/
    SIGHUP are forwarded to the command; a second ^C kills the sandbox, and so does a
    SIGTERM/SIGHUP not obeyed within TERM_GRACE. A pipe wakes `supervise`."""

    def __init__(self) -> None:
        self.sandbox: Sandbox | None = None
        self.early: list[int] = []
        self.interrupts = 0
        self.term_deadline: float | None = None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    def close(self) -> None:
        os.close(self.wake_r)
        os.close(self.wake_w)

    def handle(self, sig: int, _frame: object) -> None:
        if self.sandbox is None:
            self.early.append(sig)  # passed on once the sandbox runs
            return
        self.deliver(sig)

    def deliver(self, sig: int) -> None:
        assert self.sandbox is not None
        if sig in (signal.SIGINT, signal.SIGQUIT):
            self.interrupts += 1
            if self.interrupts >= 2:
                self.sandbox.kill()
                _kill_message("interrupted twice")
                return
        elif self.term_deadline is None:
            self.term_deadline = time.monotonic() + TERM_GRACE
            with contextlib.suppress(BlockingIOError):
                os.write(self.wake_w, b"t")
        self.sandbox.signal(sig)


def supervise(
    sandbox: Sandbox,
    control: ControlClient | None,
    deadline: float | None,
    max_time: str = "",
    signals: Signals | None = None,
) -> int:
    """Wait for the command; SIGKILL the sandbox at `deadline` (time.monotonic()), when
    `up` goes away (fail closed), or TERM_GRACE after a SIGTERM it does not obey. Returns
    the command's status."""
    pidfd = sandbox.pidfd()
    sel = selectors.DefaultSelector()
    try:
        sel.register(pidfd, selectors.EVENT_READ, "ended")
        if control is not None:
            sel.register(control.fileno(), selectors.EVENT_READ, "control")
        if signals is not None:
            sel.register(signals.wake_r, selectors.EVENT_READ, "signal")
        while sandbox.proc.poll() is None:
            now = time.monotonic()
            term = signals.term_deadline if signals is not None else None
            if term is not None and term <= now:
                sandbox.kill()
                _kill_message(f"the command did not end within {TERM_GRACE:.0f} s of SIGTERM")
                assert signals is not None
                signals.term_deadline = float("inf")
                continue
            if deadline is not None and deadline <= now:
                sandbox.kill()
                _kill_message(f"--max-time {max_time} reached")
                deadline = None
                continue
            ends = [t for t in (deadline, term) if t is not None and t != float("inf")]
            timeout = min(ends) - now if ends else None
            for key, _ in sel.select(timeout):
                if key.data == "signal" and signals is not None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(signals.wake_r, 64)
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
    """Start the sandbox on `opened`'s TUN, report it to `up`, supervise it. The command
    has no controlling terminal: the terminal's ^C reaches `run`, which forwards it (the
    command's status is returned: 130); see `Signals` for the rest."""
    spec = SandboxSpec(
        command=command,
        env=env,
        uid=user.uid,
        gid=user.gid,
        tun=opened.tun,
        addr=opened.addr,
        share=str(resolv_conf.parent),
        resolv_conf=resolv_conf.name,
        hide=hide,
    )
    caught = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)
    handlers = {s: signal.getsignal(s) for s in caught}
    signals = Signals()
    sandbox: Sandbox | None = None
    for s in caught:
        signal.signal(s, signals.handle)
    try:
        sandbox = start(spec)
        signals.sandbox = sandbox
        for sig in signals.early:
            signals.deliver(sig)
        try:
            control.started(sandbox.init_pid, sandbox.pidns)
        except (SandboxError, OSError):
            sandbox.kill()
            sandbox.wait()
            raise
        return supervise(sandbox, control, deadline, max_time, signals)
    finally:
        if sandbox is not None and sandbox.proc.poll() is None:
            sandbox.kill()
            sandbox.wait()
        for s, h in handlers.items():
            signal.signal(s, h)
        signals.close()


def write_resolv_conf(directory: Path, nameserver: str) -> Path:
    """The sandbox's /etc/resolv.conf: `up` answers every query sent into the TUN."""
    return _publish(directory, "resolv.conf", f"nameserver {nameserver}\noptions attempts:2 timeout:2\n".encode())


def hidden_dirs(ca_dir: Path, cwd: Path) -> list[str]:
    """Directories to cover with an empty tmpfs inside: the CA dir (CA key, control socket),
    unless the command's working directory is in it."""
    ca = ca_dir.resolve()
    return [] if cwd.resolve().is_relative_to(ca) else [str(ca)]
