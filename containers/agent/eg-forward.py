#!/usr/bin/env python3
"""Entrypoint of an agent container that has no network (`network_mode: none`).

    eg-forward [--listen 127.0.0.1:8080] [--socket /run/egress-guard/proxy.sock]
               [--env-file FILE] [--] CMD ARGS...

Starts a forwarder in the background — TCP 127.0.0.1:8080 inside the container to
egress-guard's Unix socket mounted at /run/egress-guard/proxy.sock — waits until it
listens, then execs CMD (its exit status is the container's). The proxy variables
(`egress-guard env`) point at http://127.0.0.1:PORT, so every client that honours them
reaches egress-guard, and nothing else exists to reach: the container has only `lo`.
Without --listen (or EG_FORWARD_LISTEN) it listens where HTTPS_PROXY points when that is
a loopback address, else on 127.0.0.1:8080.
With --env-file (or EG_ENV_FILE), CMD also gets the variables of that dotenv file (what
`egress-guard env --agent A --format dotenv` printed: fake keys, proxy, CA). Without CMD,
it only forwards (in the foreground).

Python standard library only (runs on any python3 >= 3.8). It logs no bytes it relays.
"""

import argparse
import asyncio
import os
import sys
import urllib.parse

CHUNK = 65536


async def _pipe(reader, writer):
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()
        raise


def _handler(socket_path):
    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(socket_path, limit=CHUNK)
        except OSError as exc:
            print(f"eg-forward: cannot reach egress-guard at {socket_path}: {exc}", file=sys.stderr, flush=True)
            writer.transport.abort()
            return
        results = await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True)
        if any(isinstance(r, BaseException) for r in results):
            up_writer.transport.abort()
            writer.transport.abort()
        up_writer.close()
        writer.close()

    return handle


async def forward(host, port, socket_path, ready_fd=None):
    server = await asyncio.start_server(_handler(socket_path), host, port, limit=CHUNK)
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    async with server:
        await server.serve_forever()


def read_env_file(path):
    """KEY=VALUE lines (dotenv as `egress-guard env --format dotenv` writes it)."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def proxy_listen(env):
    """Where the agent's proxy variables point, if that is loopback; else 127.0.0.1:8080."""
    url = urllib.parse.urlsplit(env.get("HTTPS_PROXY") or env.get("https_proxy") or "")
    try:
        port = url.port
    except ValueError:
        port = None
    if url.hostname in ("127.0.0.1", "localhost") and port:
        return f"127.0.0.1:{port}"
    return "127.0.0.1:8080"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="eg-forward", description=__doc__.split("\n\n")[1])
    parser.add_argument("--listen", default=os.environ.get("EG_FORWARD_LISTEN"))
    parser.add_argument("--socket", default=os.environ.get("EG_SOCKET", "/run/egress-guard/proxy.sock"))
    parser.add_argument("--env-file", default=os.environ.get("EG_ENV_FILE"))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    env = dict(os.environ)
    if args.env_file:
        try:
            env.update(read_env_file(args.env_file))
        except OSError as exc:
            print(f"eg-forward: cannot read {args.env_file}: {exc.strerror}", file=sys.stderr)
            return 1
    listen = args.listen or proxy_listen(env)
    host, _, port = listen.rpartition(":")
    if not command:
        asyncio.run(forward(host, int(port), args.socket))
        return 0
    ready_r, ready_w = os.pipe()
    if os.fork() == 0:  # the forwarder: outlives the exec below, dies with the container
        os.close(ready_r)
        os.setsid()
        try:
            asyncio.run(forward(host, int(port), args.socket, ready_w))
        except BaseException as exc:  # report why, then leave
            print(f"eg-forward: forwarder stopped: {exc!r}", file=sys.stderr, flush=True)
        os._exit(1)
    os.close(ready_w)
    ready = os.read(ready_r, 1)  # b"" when the forwarder died before listening
    os.close(ready_r)
    if not ready:
        print(f"eg-forward: could not listen on {listen}", file=sys.stderr)
        return 1
    if not os.path.exists(args.socket):
        print(f"eg-forward: warning: {args.socket} does not exist (mount egress-guard's socket there)", file=sys.stderr)
    try:
        os.execvpe(command[0], command, env)  # noqa: S606 - the agent command, as given
    except OSError as exc:
        print(f"eg-forward: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
