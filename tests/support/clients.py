"""Small clients through the proxy: curl, and raw sockets for what curl and httpx cannot send
(a hand-made CONNECT, a mismatched SNI, an absolute-form authority no client rewrites)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess

from support.proxy import RunningProxy


def curl(proxy: RunningProxy, url: str, *args: str, timeout: float = 20) -> tuple[int, dict[str, str], str]:
    """curl through the proxy; returns (status, lowercase headers, body)."""
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--proxy",
            proxy.url,
            "--cacert",
            str(proxy.ca_cert),
            "-D",
            "-",
            "--max-time",
            str(timeout),
            *args,
            url,
        ],
        capture_output=True,
        timeout=timeout + 5,
        check=False,
    )
    if out.returncode not in (0, 22, 56):
        raise AssertionError(f"curl failed ({out.returncode}): {out.stderr.decode()}")
    blocks = out.stdout.decode().split("\r\n\r\n")
    # with a CONNECT, the proxy's "200 Connection established" block comes first
    while len(blocks) > 1 and " 200 Connection established" in blocks[0]:
        blocks = blocks[1:]
    head, body = blocks[0], "\r\n\r\n".join(blocks[1:])
    lines = head.split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    return status, headers, body


def raw_connect(proxy_port: int, target: str, timeout: float = 10) -> tuple[socket.socket, bytes]:
    """Send a CONNECT by hand; returns the socket and the proxy's whole response head + body."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return sock, head + b"\r\n\r\n" + rest


def read_http_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    with contextlib.suppress(OSError, ssl.SSLError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/"):
        return 0, {}, data
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    return int(lines[0].split()[1]), headers, body


def tunnel_request(
    proxy: RunningProxy, target: str, *, sni: str | None, host_header: str, path: str = "/json"
) -> tuple[int, dict[str, str], bytes]:
    """CONNECT to `target`, TLS with `sni` (trusting the proxy's CA), one request with `host_header`."""
    sock, head = raw_connect(proxy.port, target)
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = proxy.client_context()
    ctx.check_hostname = False  # the point is to send an SNI that differs from the target
    tls = ctx.wrap_socket(sock, server_hostname=sni)
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
    try:
        return read_http_response(tls)
    finally:
        tls.close()


def plain_proxy_request(proxy: RunningProxy, authority: str, path: str = "/json") -> tuple[int, dict[str, str], bytes]:
    """An absolute-form plain-HTTP proxy request, sent by hand so no client rewrites the
    authority (curl normalises `2130706433` to `127.0.0.1` before sending)."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(f"GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
    try:
        return read_http_response(sock)
    finally:
        sock.close()
