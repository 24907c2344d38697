"""What the fake APIs share: the real keys (the only ones they accept; only egress-guard
knows them), a request as a route sees it, the route table's types, the JSON and SSE
writer with its test switches (X-Test-Compress, X-Test-Split), and the routes every host
answers before any key check: `/echo` and `/echo-forms`, the hostile upstream that sends
the injected key back."""

from __future__ import annotations

import base64
import fnmatch
import gzip
import json
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Any

import brotli

from support.upstream import GenericHandler

REAL = {
    "openai": "sk-proj-REALopenaiSECRET0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ",
    "anthropic": "sk-ant-api03-REALanthropicSECRET0123456789abcdefghijklmnopqrstuvwxyz-AA",
    "google-gemini": "AIzaREALgeminiSECRET0123456789abcdefgh",
    "github": "ghp_REALgithubSECRET0123456789abcdefghijkl",
}
REAL_ENV = {
    "OPENAI_API_KEY": REAL["openai"],
    "ANTHROPIC_API_KEY": REAL["anthropic"],
    "GEMINI_API_KEY": REAL["google-gemini"],
    "GH_TOKEN": REAL["github"],
}


@dataclass(frozen=True)
class Request:
    """One request as a route sees it."""

    method: str
    path: str
    query: str  # as sent
    params: dict[str, list[str]]  # the query, parsed
    headers: Message  # case-insensitive .get()
    body: dict[str, Any]  # the JSON object sent; {} for any other body

    @property
    def auth(self) -> str:
        return self.headers.get("authorization", "")


Handle = Callable[["FakeAPI", Request], None]
Route = tuple[str, str, Handle]  # (method or "*", path pattern (fnmatch: "*" spans "/"), handler)


@dataclass(frozen=True)
class Fake:
    """One provider's API: the hosts it answers on, its key check, the 401 body it answers
    any other key with, and its routes, tried in order (the first match answers)."""

    hosts: tuple[str, ...]
    authorized: Callable[[Request], bool]
    unauthorized: dict[str, Any]
    routes: list[Route]


def route_for(routes: list[Route], method: str, path: str) -> Handle | None:
    for want, pattern, handle in routes:
        if want in ("*", method) and fnmatch.fnmatchcase(path, pattern):
            return handle
    return None


class FakeAPI(GenericHandler):
    """The writer the routes answer with: JSON, and SSE streamed in chunks (every byte its
    own chunk with X-Test-Split; sent whole and compressed with X-Test-Compress)."""

    compress: str | None = None  # X-Test-Compress: gzip, br or deflate
    split = False  # X-Test-Split
    buffer: bytearray

    def _json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _sse_start(self) -> None:
        self.compress = self.headers.get("x-test-compress")
        self.split = bool(self.headers.get("x-test-split"))
        if self.compress:
            self.buffer = bytearray()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _raw_chunk(self, data: bytes) -> None:
        """One HTTP chunk, whatever the test switches say."""
        super()._chunk(data)

    def _chunk(self, data: bytes) -> None:
        if self.compress:
            self.buffer += data
        elif self.split:
            for i in range(len(data)):
                self._raw_chunk(data[i : i + 1])
        else:
            self._raw_chunk(data)

    def _event(self, data: Any, event: str | None = None) -> None:
        text = (
            f"event: {event}\n" if event else ""
        ) + f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
        self._chunk(text.encode())

    def _end(self) -> None:
        if self.compress:
            encode = {"gzip": gzip.compress, "br": brotli.compress, "deflate": zlib.compress}[self.compress]
            body = encode(bytes(self.buffer))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Encoding", self.compress)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _runaway(self, n: int, event: Callable[[str], None]) -> bool:
        """A model that writes `n` text events ("tok ", one token each), whatever max_tokens
        said, until the reader goes away. Records how many it wrote; True if it wrote all."""
        written = 0
        try:
            for _ in range(n):
                event("tok ")
                written += 1
                time.sleep(0.003)
            return True
        except OSError:  # the proxy cut the connection
            return False
        finally:
            with self.server.state.lock:
                self.server.state.runaway.append(written)


# --- the hostile upstream, on every host ---------------------------------------------------


def echo_forms(api: FakeAPI, req: Request) -> None:
    """The injected key sent back in every encoding egress-guard knows, in pieces of 1 to 7
    bytes so that every form straddles pieces."""
    key = REAL["openai"].encode()
    forms = [
        base64.b64encode(b"Bearer " + key),
        base64.b64encode(b"x" + key),
        base64.urlsafe_b64encode(b"xy" + key),
        key.hex().encode(),
        key.hex().upper().encode(),
        "".join(f"%{b:02X}" for b in key).encode(),
        "".join(f"\\u{b:04x}" if i % 2 else chr(b) for i, b in enumerate(key)).encode(),
        "".join(f"%{b:02x}" if i % 3 else chr(b) for i, b in enumerate(key)).encode(),
    ]
    text = b"data: " + b" | ".join(forms) + b"\n\n"
    api.send_response(200)
    api.send_header("Content-Type", "text/event-stream")
    api.send_header("Transfer-Encoding", "chunked")
    api.end_headers()
    rng, i = random.Random(7), 0
    while i < len(text):
        n = rng.randint(1, 7)
        api._raw_chunk(text[i : i + n])
        i += n
    api._end()


def echo(api: FakeAPI, req: Request) -> None:
    """The credentials received, in the body and in a header; the key in the body split
    across two chunks and base64'd: all must be scrubbed."""
    got = {"authorization": req.auth, "x-api-key": req.headers.get("x-api-key"), "query": req.query}
    key = REAL["openai"]
    api.send_response(200)
    api.send_header("Content-Type", "application/json")
    api.send_header("X-Echo-Authorization", req.auth)
    api.send_header("Transfer-Encoding", "chunked")
    api.end_headers()
    text = json.dumps({"received": got, "b64": base64.b64encode(key.encode()).decode()})
    api._chunk(text[: len(text) // 2].encode())
    time.sleep(0.05)
    api._chunk(text[len(text) // 2 :].encode())
    api._end()


ANY_HOST: list[Route] = [
    ("*", "/echo-forms", echo_forms),
    ("*", "/echo", echo),
]
