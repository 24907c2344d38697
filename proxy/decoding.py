"""Content-Encoding, decoded piece by piece: what a body really says.

A body sent with `Content-Encoding: gzip` (or deflate, br, zstd, or a list of them) must be
read decoded before it is searched for egress-guard keys or scrubbed of a secret: the wire
bytes hide what is inside. Every byte is decoded or refused — every gzip member and zstd
frame (as gzip readers read them all), no bytes after the end, no truncated body — and the
output comes in slices of at most `SLICE` bytes, with a total cap (`LIMIT`): a body that
decodes to more is refused, so a 400-byte "bomb" cannot make the proxy inflate gigabytes on
its event loop (brotli's slices are approximate: up to about 2 MiB). An encoding it does not
know, or bytes that do not decode, raise `ValueError` (the caller refuses the body: what
cannot be read cannot be checked).

Pure: no I/O, no mitmproxy.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any

KNOWN = ("gzip", "x-gzip", "deflate", "br", "zstd", "identity")
SLICE = 1 << 20  # at most this much output per step
LIMIT = 64 << 20  # a body that decodes to more is refused

Step = Callable[[bytes, bool], Iterator[bytes]]


def _zlib(gzip_members: bool) -> Step:
    state: dict = {"d": zlib.decompressobj(47), "raw": False, "head": b"", "out": False}

    def feed(data: bytes, end: bool) -> Iterator[bytes]:
        while True:
            d = state["d"]
            if d.eof:
                data = d.unused_data + data
                if not data:
                    break
                if not gzip_members:
                    raise ValueError("bytes follow the end of the compressed body")
                state["d"] = d = zlib.decompressobj(31)  # the next gzip member
            if not state["out"]:
                state["head"] += data  # until the first output: a raw-deflate retry needs every byte
            try:
                out = d.decompress(data, SLICE)
            except zlib.error:
                if state["out"] or state["raw"]:
                    raise ValueError("the body is not valid gzip/deflate data") from None
                state["d"], state["raw"] = zlib.decompressobj(-15), True  # raw deflate, as some clients send
                data, state["head"] = state["head"], b""
                continue
            if out:
                state["out"] = True
                yield out
            data = d.unconsumed_tail
            if not data and not d.eof:
                break
        if end and not state["d"].eof and (state["out"] or state["head"]):
            raise ValueError("the compressed body is truncated")

    return feed


def _brotli() -> Step:
    import brotli

    d = brotli.Decompressor()

    def feed(data: bytes, end: bool) -> Iterator[bytes]:
        try:
            # output_buffer_limit is approximate (about 2 MiB come per call), and
            # can_accept_more_data() is true while output is still held: drain until none comes
            out = d.process(data, output_buffer_limit=SLICE)
            while out:
                yield out
                if d.is_finished():
                    break
                out = d.process(b"", output_buffer_limit=SLICE)
        except brotli.error:
            raise ValueError("the body is not valid brotli data") from None
        if end and not d.is_finished():
            raise ValueError("the brotli body is truncated")

    return feed


def _zstd() -> Step:
    import zstandard

    chunks: list[bytes] = []

    class Sink:
        def write(self, b: bytes) -> int:
            chunks.append(bytes(b))
            return len(b)

    sink: Any = Sink()  # a file-like object with write() is all stream_writer needs
    writer = zstandard.ZstdDecompressor().stream_writer(sink, write_size=SLICE, write_return_read=True)

    def feed(data: bytes, end: bool) -> Iterator[bytes]:
        # stream_writer reads across frames; small input steps keep one step's output bounded
        for i in range(0, len(data), 512):
            try:
                writer.write(data[i : i + 512])
            except zstandard.ZstdError:
                raise ValueError("the body is not valid zstd data") from None
            while chunks:
                yield chunks.pop(0)

    return feed


class StreamDecoder:
    """Decodes a body sent with `Content-Encoding: <header>`, piece by piece."""

    __slots__ = ("steps", "total")

    def __init__(self, header: str) -> None:
        names = [n.strip().lower() for n in header.split(",") if n.strip()]
        unknown = [n for n in names if n not in KNOWN]
        if unknown:
            raise ValueError(f"unknown Content-Encoding {', '.join(unknown)!r} (egress-guard reads {', '.join(KNOWN)})")
        factories: dict[str, Callable[[], Step]] = {
            "gzip": lambda: _zlib(True),
            "x-gzip": lambda: _zlib(True),
            "deflate": lambda: _zlib(False),
            "br": _brotli,
            "zstd": _zstd,
        }
        # the last encoding listed was applied last: undo it first
        self.steps = [factories[n]() for n in reversed(names) if n != "identity"]
        self.total = 0

    def feed(self, data: bytes, end: bool = False) -> Iterator[bytes]:
        """Decoded slices of at most SLICE bytes. ValueError: undecodable, trailing bytes,
        truncated (checked at `end`), or more than LIMIT in all."""

        def run(i: int, piece: bytes) -> Iterator[bytes]:
            if i == len(self.steps):
                yield piece
                return
            for out in self.steps[i](piece, end):
                yield from run(i + 1, out)
            if end and not piece and i + 1 < len(self.steps):
                yield from run(i + 1, b"")  # the end reaches every step

        for out in run(0, data):
            self.total += len(out)
            if self.total > LIMIT:
                raise ValueError(f"the body decodes to more than {LIMIT >> 20} MiB")
            yield out


def decode_all(header: str, data: bytes) -> bytes:
    """A whole body decoded as `Content-Encoding: header` says (ValueError as above)."""
    if not header.strip() or header.strip().lower() == "identity":
        return data
    decoder = StreamDecoder(header)
    return b"".join([*decoder.feed(data), *decoder.feed(b"", True)])
