"""Content-Encoding decoding for what egress-guard checks: every member, every byte, bounded."""

from __future__ import annotations

import gzip
import time
import zlib

import brotli
import pytest
import zstandard

from egress_guard.decoding import LIMIT, StreamDecoder, decode_all

KEY = b"sk-proj-" + b"K" * 156
COVER = b'{"messages": "hello"}'


def decode(header: str, body: bytes, piece: int = 7) -> bytes:
    decoder, out = StreamDecoder(header), b""
    for i in range(0, len(body), piece):
        out += b"".join(decoder.feed(body[i : i + piece]))
    return out + b"".join(decoder.feed(b"", True))


@pytest.mark.parametrize("piece", [1, 7, 4096])
@pytest.mark.parametrize(
    ("header", "body"),
    [
        ("gzip", gzip.compress(COVER)),
        ("x-gzip", gzip.compress(COVER)),
        ("deflate", zlib.compress(COVER)),
        ("deflate", zlib.compress(COVER)[2:-4]),  # raw deflate, as some clients send it
        ("br", brotli.compress(COVER)),
        ("zstd", zstandard.ZstdCompressor().compress(COVER)),
        ("gzip, br", brotli.compress(gzip.compress(COVER))),
        ("identity", COVER),
    ],
)
def test_valid_bodies_decode(header: str, body: bytes, piece: int) -> None:
    assert decode(header, body, piece) == COVER


def test_every_gzip_member_and_zstd_frame_is_decoded() -> None:
    """mitmproxy's own decoding stops after the first gzip member: a key after it was unseen."""
    assert KEY in decode("gzip", gzip.compress(COVER) + gzip.compress(KEY))
    z = zstandard.ZstdCompressor()
    assert KEY in decode("zstd", z.compress(COVER) + z.compress(KEY))


@pytest.mark.parametrize(
    ("header", "body"),
    [
        ("gzip", gzip.compress(COVER) + KEY),
        ("deflate", zlib.compress(COVER) + KEY),
        ("br", brotli.compress(COVER) + KEY),
        ("zstd", zstandard.ZstdCompressor().compress(COVER) + KEY),
        ("gzip", gzip.compress(COVER)[:-6]),
        ("br", brotli.compress(COVER)[:-2]),
        ("gzip", b"not gzip at all"),
        ("compress", b"x"),
    ],
)
def test_trailing_truncated_undecodable_or_unknown_is_refused(header: str, body: bytes) -> None:
    with pytest.raises(ValueError):
        decode(header, body)
    with pytest.raises(ValueError):
        decode_all(header, body)


@pytest.mark.parametrize("header", ["gzip", "br", "zstd"])
def test_a_bomb_is_refused_quickly_in_bounded_slices(header: str) -> None:
    plain = b"\0" * (LIMIT + (1 << 20))
    body = {"gzip": gzip.compress, "br": brotli.compress, "zstd": zstandard.ZstdCompressor().compress}[header](plain)
    started = time.monotonic()
    decoder = StreamDecoder(header)
    with pytest.raises(ValueError, match="more than 64 MiB"):
        for piece in decoder.feed(body, True):
            assert len(piece) <= 4 << 20  # a slice (brotli rounds its limit up)
    assert time.monotonic() - started < 10  # bounded work, not a hang (generous: shared CI cores)
