"""A Unix-socket entrance to the proxy: every connection to the socket is relayed, byte for
byte, to the proxy's TCP listener.

Why: an agent container with `network_mode: none` has no network at all; a Unix socket
bind-mounted into it (or shared through a volume) is then its only way out, and it leads
to egress-guard. mitmproxy cannot listen on a Unix socket itself, hence this relay.
Stdlib only (no mitmproxy): it reads nothing it relays and logs no bytes.

The socket is created mode 0666: it leads to the same proxy the TCP listener offers to
every local user, so a narrower mode would protect nothing and would lock out agents that
run as another uid (a container's non-root user). Limit who can reach it with the
permissions of the directory it is in. It is bound and chmod'ed inside a private (0700)
directory of its own, then renamed into place: no chmod ever follows a path another user
could swap for a symlink, and the process umask (shared with every thread) is never
touched. A directory others can write that is not sticky (they could replace the socket)
is refused.

At most MAX_CONNECTIONS connections are relayed at once per socket; one over is accepted
and closed at once, so an agent cannot exhaust the proxy's file descriptors. Running out
of them anyway (EMFILE) is logged at most once every LOG_EVERY seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import tempfile
import time
from pathlib import Path

log = logging.getLogger("egress_guard")

MAX_PATH_BYTES = 107  # sockaddr_un.sun_path is 108 bytes, the last one a NUL
SOCKET_MODE = 0o666
CHUNK = 65536
MAX_CONNECTIONS = 256  # relayed at once, per socket
LOG_EVERY = 10.0  # seconds between two log lines about refused connections or accept() errors


class UnixRelayError(Exception):
    """The socket cannot be created; the message names the fix."""


def check_path(path: Path) -> None:
    """Refuse a path the kernel cannot bind (too long), a path held by something that is
    not a socket, and a socket another process still listens on."""
    size = len(os.fsencode(str(path)))
    if size > MAX_PATH_BYTES:
        raise UnixRelayError(
            f"Unix socket path {str(path)!r} is {size} bytes; at most {MAX_PATH_BYTES} fit in a socket address. "
            "Fix: choose a shorter path (e.g. /run/egress-guard/proxy.sock)"
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UnixRelayError(f"{path} exists and is not a socket. Fix: remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(str(path))
    except OSError:
        return  # a stale socket a stopped proxy left: it is replaced
    finally:
        probe.close()
    raise UnixRelayError(f"{path} is in use by another process. Fix: stop it or choose another path")


def check_directory(directory: Path) -> None:
    """Refuse a directory group or others may write unless it is sticky: they could replace
    the socket (or what its name points to) with their own."""
    st = directory.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise UnixRelayError(
            f"{directory} (the Unix socket's directory) is writable by group or others and not sticky: "
            f"they could replace the socket. Fix: chmod go-w {directory} (or chmod +t), or choose another directory"
        )


def bind_socket(path: Path) -> socket.socket:
    """A listening socket at `path`, mode 0666: bound and chmod'ed in a private directory
    next to `path` (same filesystem), then renamed over `path` (a rename never follows a
    symlink)."""
    private = Path(tempfile.mkdtemp(prefix=".eg-sock-", dir=path.parent))  # 0700, ours
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        staged = private / "s"
        sock.bind(str(staged))
        os.chmod(staged, SOCKET_MODE)  # nobody else can put anything in `private`
        sock.listen(128)
        sock.setblocking(False)
        os.rename(staged, path)
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            (private / "s").unlink()
        os.rmdir(private)
    return sock


def dial_host(host: str) -> str:
    """The address to dial for a listener bound to `host` (a wildcard is not dialable)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104


class UnixRelay:
    """Listens on `path`; relays each connection to `target` (the proxy's TCP address)."""

    def __init__(self, path: Path, target: tuple[str, int]) -> None:
        self.path = Path(path)
        self.target = (dial_host(target[0]), target[1])
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.active = 0  # connections being relayed
        self.refused = 0  # connections closed at once: MAX_CONNECTIONS were being relayed
        self._last_log: dict[str, float] = {}

    async def start(self) -> None:
        check_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            check_directory(self.path.parent)
            self._sock = bind_socket(self.path)  # replaces a stale one (check_path found nobody listening)
            self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())
        except OSError as exc:
            await self.stop()
            raise UnixRelayError(
                f"cannot listen on Unix socket {self.path}: {exc.strerror or exc}. "
                "Fix: make its directory writable or choose another path"
            ) from None

    async def stop(self) -> None:
        """Stop listening, cut the relayed connections, remove the socket file."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(BaseException):
                await self._accepting
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            for writer in list(self._writers):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
            if self._handlers:
                with contextlib.suppress(Exception):
                    await asyncio.wait(list(self._handlers), timeout=2)
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(self.path.lstat().st_mode):
                    self.path.unlink()

    def _log_rarely(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log.get(kind, -LOG_EVERY) >= LOG_EVERY:
            self._last_log[kind] = now
            log.warning(message, *args)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        listener = self._sock
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait, do not spin or spew
                self._log_rarely("accept", "unix relay: cannot accept on %s: %s; retrying", self.path, exc.strerror)
                await asyncio.sleep(0.1)
                continue
            if self.active >= MAX_CONNECTIONS:
                conn.close()
                self.refused += 1
                self._log_rarely(
                    "cap",
                    "unix relay: %d connections on %s already; closing new ones (%d so far)",
                    MAX_CONNECTIONS,
                    self.path,
                    self.refused,
                )
                continue
            self.active += 1
            task = loop.create_task(self._serve(conn))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                reader, writer = await asyncio.open_unix_connection(sock=conn, limit=CHUNK)
            except OSError:
                conn.close()
                return
            await self._handle(reader, writer)
        finally:
            self.active -= 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target, limit=CHUNK)
            except OSError as exc:
                self._log_rarely("dial", "unix relay: cannot reach the proxy at %s:%d: %s", *self.target, exc)
                writer.transport.abort()
                return
            self._writers.add(up_writer)
            try:
                results = await asyncio.gather(
                    _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
                )
                if any(isinstance(r, BaseException) for r in results):
                    up_writer.transport.abort()
                    writer.transport.abort()
            finally:
                self._writers.discard(up_writer)
                up_writer.close()
        finally:
            self._writers.discard(writer)
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the EOF on (half-close); an error aborts both directions."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()
        raise
