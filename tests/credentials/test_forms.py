"""The encodings a secret is recognised in, both ways, from one definition (forms.ENCODINGS):
each is masked on the way to the agent and decoded on the way out; and BodyStream's framing
rules."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable

import pytest

from egress_guard.addons.bodies import BodyStream
from egress_guard.forms import ENCODINGS, ScrubStream, SecretForms, views

SECRET = "sk-proj-REALsecretVALUE_0123456789abcdefghijklmnopqrstuvwxyz/ABC"
RAW = SECRET.encode()


def _mixed_escapes(raw: bytes) -> bytes:
    out = []
    for i, b in enumerate(raw):
        out.append(chr(b) if i % 3 == 0 else f"%{b:02x}" if i % 3 == 1 else f"\\u{b:04X}")
    return "".join(out).encode()


# every encoding in ENCODINGS, with each of its variants
ENCODERS: dict[str, list[Callable[[bytes], bytes]]] = {
    "raw": [lambda r: r],
    "base64": [lambda r, p=p: base64.b64encode(p + r) for p in (b"", b"x", b"xy", b"Bearer ")],
    "base64url": [lambda r, p=p: base64.urlsafe_b64encode(p + r).rstrip(b"=") for p in (b"", b"x", b"xy")],
    "hex": [lambda r: r.hex().encode(), lambda r: r.hex().upper().encode()],
    "percent": [
        lambda r: "".join(f"%{b:02X}" for b in r).encode(),
        lambda r: "".join(f"%{b:02x}" if i % 2 else chr(b) for i, b in enumerate(r)).encode(),
    ],
    "json-escape": [
        lambda r: json.dumps(r.decode()).replace("/", "\\/").encode(),
        lambda r: "".join(f"\\u{b:04x}" for b in r).encode(),
        _mixed_escapes,
    ],
}
CASES = [(name, i) for name in ENCODERS for i in range(len(ENCODERS[name]))]


def test_every_encoding_has_cases() -> None:
    assert set(ENCODERS) == set(ENCODINGS)


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_scrubbed_to_the_agent_and_found_from_the_agent(name: str, variant: int) -> None:
    encoded = ENCODERS[name][variant](RAW)
    body = b'{"before": "' + encoded + b'", "after": 1}'
    forms = SecretForms(SECRET)
    scrubbed = forms.scrub(body)
    assert len(scrubbed) == len(body)
    assert not any(RAW in v for v in views(scrubbed, 16)), "left a recoverable form"
    assert any(RAW in v for v in views(body, 16)), "the scanner's views miss it"


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_scrubbed_when_split_at_every_offset(name: str, variant: int) -> None:
    body = b"data: " + ENCODERS[name][variant](RAW) + b"\n\n"
    whole = SecretForms(SECRET).scrub(body)
    for cut in range(len(body) + 1):
        stream = ScrubStream(SecretForms(SECRET))
        assert stream.feed(body[:cut]) + stream.feed(body[cut:]) + stream.flush() == whole


def test_ordinary_text_is_untouched_and_not_held() -> None:
    forms = SecretForms(SECRET)
    text = b'data: {"delta": "caf\\u00e9 100% s k-proj sure \\/ path"}\n\n'
    assert forms.scrub(text) == text and forms.partial(text) == 0
    assert "REAL" not in repr(forms)


def test_body_stream_never_sends_an_empty_piece_mid_stream() -> None:
    stream = BodyStream(lambda: None)
    stream.add(lambda data, end: data[:-1] if data and not end else data)  # holds/loses bytes
    stream.add(lambda data, end: b"" if data == b"x" else data)
    rng = random.Random(1)
    for _ in range(200):
        piece = bytes(rng.choice(b"xyz") for _ in range(rng.randint(1, 3)))
        out = stream(piece)
        assert out == [] or (isinstance(out, list) and all(out))
    assert stream(b"") == b""


def test_a_failing_stage_aborts_and_sends_nothing_more() -> None:
    aborted: list[bool] = []
    stream = BodyStream(lambda: aborted.append(True))

    def boom(data: bytes, end: bool) -> bytes:
        if b"!" in data:
            raise ValueError("broken")
        return data

    stream.add(boom)
    assert stream(b"ok") == [b"ok"]
    assert stream(b"!") == [] and aborted == [True]
    assert stream(b"more") == [] and stream(b"") == []
