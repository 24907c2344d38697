"""Content-Encoding, decoded piece by piece: what a streamed request body really says.

A body sent with `Content-Encoding: gzip` (or deflate, br, zstd, or a list of them) must be
read decoded before it is searched for egress-guard keys: scanning the wire bytes would miss
a key inside. `StreamDecoder` decodes incrementally with bounded memory per piece; an
encoding it does not know, or bytes that do not decode, raise `ValueError` (the caller
refuses the body: what cannot be read cannot be checked).

Pure: no I/O, no mitmproxy.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

KNOWN = ("gzip", "x-gzip", "deflate", "br", "zstd", "identity")


def _zlib() -> Callable[[bytes], bytes]:
    # 47 = 32 + 15: gzip or zlib header, detected; a raw deflate body (what some clients
    # send as "deflate") is retried without a header
    state = {"d": zlib.decompressobj(47), "raw": False, "started": False}

    def feed(data: bytes) -> bytes:
        try:
            out = state["d"].decompress(data)  # type: ignore[attr-defined]
        except zlib.error:
            if state["started"] or state["raw"]:
                raise ValueError("the body is not valid gzip/deflate data") from None
            state["d"], state["raw"] = zlib.decompressobj(-15), True
            try:
                out = state["d"].decompress(data)  # type: ignore[attr-defined]
            except zlib.error:
                raise ValueError("the body is not valid gzip/deflate data") from None
        state["started"] = True
        return out

    return feed


def _brotli() -> Callable[[bytes], bytes]:
    import brotli

    d = brotli.Decompressor()

    def feed(data: bytes) -> bytes:
        try:
            return d.process(data)
        except brotli.error:
            raise ValueError("the body is not valid brotli data") from None

    return feed


def _zstd() -> Callable[[bytes], bytes]:
    import zstandard

    d = zstandard.ZstdDecompressor().decompressobj()

    def feed(data: bytes) -> bytes:
        try:
            return d.decompress(data)
        except zstandard.ZstdError:
            raise ValueError("the body is not valid zstd data") from None

    return feed


class StreamDecoder:
    """Decodes a body sent with `Content-Encoding: <header>`, piece by piece."""

    __slots__ = ("steps",)

    def __init__(self, header: str) -> None:
        names = [n.strip().lower() for n in header.split(",") if n.strip()]
        unknown = [n for n in names if n not in KNOWN]
        if unknown:
            raise ValueError(f"unknown Content-Encoding {', '.join(unknown)!r} (egress-guard reads {', '.join(KNOWN)})")
        factories = {"gzip": _zlib, "x-gzip": _zlib, "deflate": _zlib, "br": _brotli, "zstd": _zstd}
        # the last encoding listed was applied last: undo it first
        self.steps = [factories[n]() for n in reversed(names) if n != "identity"]

    def feed(self, data: bytes) -> bytes:
        for step in self.steps:
            data = step(data)
        return data
