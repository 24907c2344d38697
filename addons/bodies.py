"""BodyStream: the one stream callable egress-guard puts on a streamed message body.

Addons do not wrap each other's stream callables; they add *stages* to the message's
BodyStream (`body_stream(message).add(stage)`), and it runs them in order on every piece.
It exists because two of mitmproxy's stream rules fail badly if each addon handles them:
- an empty piece returned mid-stream is framed like any other: on HTTP/1.1 chunked it goes
  out as `0\\r\\n\\r\\n`, the END of the body — the agent sees the response end early and the
  rest arrives as garbage on its kept-alive connection; upstream, a request body ends early
  and the upstream answers a truncated request. So a piece that comes out empty is sent as
  nothing at all (`[]`), and only the real end ends the body;
- an exception in a stream callable is logged and that piece is dropped while the stream
  goes on: here it fails closed instead — the connection is aborted, nothing more is sent.

A stage is `stage(data, end) -> bytes`: `end` is True exactly once, on the last call (with
whatever data is left, often b""), so a stage that holds bytes back can flush them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from mitmproxy import http

from egress_guard.addons._flow import abort_connection

log = logging.getLogger("egress_guard")


class Stage(Protocol):
    def __call__(self, data: bytes, end: bool, /) -> bytes: ...


class _Legacy:
    """A plain mitmproxy stream callable (`fn(bytes) -> bytes`) as a stage."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[bytes], Any]) -> None:
        self.fn = fn

    def __call__(self, data: bytes, end: bool) -> bytes:
        if not data and not end:
            return b""
        out = self.fn(data)
        return out if isinstance(out, bytes) else b"".join(out)


class BodyStream:
    __slots__ = ("abort", "ended", "failed", "stages")

    def __init__(self, abort: Callable[[], object]) -> None:
        self.stages: list[Stage] = []
        self.abort = abort  # closes the connection: the fail-closed answer to a broken stage
        self.failed = False
        self.ended = False

    def add(self, stage: Stage, *, first: bool = False) -> None:
        if first:
            self.stages.insert(0, stage)
        else:
            self.stages.append(stage)

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        if self.failed:
            return []
        if self.ended:
            # b"" meant the end (empty pieces mid-stream are filtered out: addons/_mitm.py);
            # bytes after it mean it was not, and a stage may have flushed what it held: stop
            return self._fail("a body piece arrived after its end") if chunk else []
        end = not chunk  # mitmproxy calls with b"" exactly once, at the end
        self.ended = end
        data = chunk
        try:
            for stage in self.stages:
                data = stage(data, end)
        except Exception:
            log.exception("a body stage failed")
            return self._fail("a body stage failed")
        if end:
            return data  # b"" at the end is nothing; mitmproxy then ends the body itself
        return [data] if data else []

    def _fail(self, why: str) -> list[bytes]:
        self.failed = True
        log.error("%s; aborting the connection (fail closed)", why)
        try:
            self.abort()
        except Exception:
            log.exception("could not abort the connection")
        return []


def body_stream(flow: http.HTTPFlow, message: http.Message) -> BodyStream:
    """The message's BodyStream, installed on first use. Whatever stream setting the message
    had is kept as the first stage, so no stage can be skipped because another addon set
    `message.stream` first."""
    current = message.stream
    if isinstance(current, BodyStream):
        return current
    stream = BodyStream(lambda: abort_connection(flow))
    if callable(current):
        stream.add(_Legacy(current))
    message.stream = stream
    return stream
