"""A Unix-socket entrance to the proxy: every connection to the socket is relayed, byte for
byte, to the proxy's TCP listener.

Why: an agent container with `network_mode: none` has no network at all; a Unix socket
bind-mounted into it (or shared through a volume) is then its only way out, and it leads
to egress-guard. mitmproxy cannot listen on a Unix socket itself, hence this relay.
Stdlib only (no mitmproxy): it reads nothing it relays and logs no bytes.

The socket is created mode 0666: it leads to the same proxy the TCP listener offers to
every local user, so a narrower mode would protect nothing and would lock out agents that
run as another uid (a container's non-root user). Limit who can reach it with the
permissions of the directory it is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from pathlib import Path

log = logging.getLogger("egress_guard")

MAX_PATH_BYTES = 107  # sockaddr_un.sun_path is 108 bytes, the last one a NUL
SOCKET_MODE = 0o666
CHUNK = 65536


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


def dial_host(host: str) -> str:
    """The address to dial for a listener bound to `host` (a wildcard is not dialable)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104


class UnixRelay:
    """Listens on `path`; relays each connection to `target` (the proxy's TCP address)."""

    def __init__(self, path: Path, target: tuple[str, int]) -> None:
        self.path = Path(path)
        self.target = (dial_host(target[0]), target[1])
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        check_path(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # stale (check_path found nobody listening)
            self._server = await asyncio.start_unix_server(self._handle, str(self.path), limit=CHUNK)
            os.chmod(self.path, SOCKET_MODE)
        except OSError as exc:
            await self.stop()
            raise UnixRelayError(
                f"cannot listen on Unix socket {self.path}: {exc.strerror or exc}. "
                "Fix: make its directory writable or choose another path"
            ) from None

    async def stop(self) -> None:
        """Stop listening, cut the relayed connections, remove the socket file."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(self.path.lstat().st_mode):
                    self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target, limit=CHUNK)
            except OSError as exc:
                log.error("unix relay: cannot reach the proxy at %s:%d: %s", *self.target, exc)
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
