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
    # (base64 whose '/' and '+' a JSON encoder or a URL escaped: see the PASSWORD test below)
    "hex": [
        lambda r: r.hex().encode(),
        lambda r: r.hex().upper().encode(),
        lambda r: "".join(c.upper() if i % 3 else c for i, c in enumerate(r.hex())).encode(),  # mixed case
    ],
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


PASSWORD = "p4ss?w0rd~with>chars/and+more-0123456789"  # a basic-auth or database password


@pytest.mark.parametrize("offset", [b"", b"x", b"xy"])
def test_base64_with_escaped_slash_and_plus_is_masked(offset: bytes) -> None:
    forms = SecretForms(PASSWORD)
    b64 = base64.b64encode(offset + PASSWORD.encode())
    assert b"/" in b64 or b"+" in b64
    for written in (b64.replace(b"/", b"\\/"), b64.replace(b"+", b"%2B").replace(b"/", b"%2F")):
        assert forms.scrub(written) != written
        for cut in range(len(written) + 1):
            stream = ScrubStream(forms)
            out = stream.feed(written[:cut]) + stream.feed(written[cut:]) + stream.flush()
            assert forms.scrub(out) == out, cut  # nothing recoverable left


def _random_secret(rng: random.Random) -> str:
    alphabet = rng.choice(["abcdef0123456789", "sk-proj_ABCxyz019/+", "u0%\\/7a", "".join(map(chr, range(33, 127)))])
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(8, 40)))


def _escaped(raw: bytes, rng: random.Random) -> bytes:
    return b"".join(rng.choice([bytes([b]), b"%%%02x" % b, b"%%%02X" % b, b"\\u00%02x" % b]) for b in raw)


def test_streamed_scrubbing_never_leaves_a_form_fuzz() -> None:
    """Random secrets (also holding '%', '\\', '/', '+'), bodies of fragments of every form,
    random splits: what streams out never still holds a form."""
    rng = random.Random(20261122)
    for _ in range(1500):
        secret = _random_secret(rng)
        raw = secret.encode()
        forms = SecretForms(secret)
        encoded = [raw, raw.hex().encode(), raw.hex().upper().encode(), _escaped(raw, rng)]
        encoded += [base64.b64encode(p + raw) for p in (b"", b"x", b"xy")]
        body = b"".join(rng.choice(encoded)[: rng.randrange(1, 200)] + b" %\\u0" for _ in range(rng.randrange(1, 5)))
        cuts = sorted(rng.sample(range(len(body) + 1), min(len(body), rng.randrange(0, 12))))
        stream = ScrubStream(forms)
        out = b"".join(stream.feed(body[a:b]) for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True))
        out += stream.flush()
        assert forms.scrub(out) == out, (secret, body)


def test_body_stream_aborts_on_bytes_after_its_end() -> None:
    """An empty piece is the end; if bytes follow, the end was not one and a stage may have
    flushed what it held: the connection is aborted, nothing more is sent."""
    aborted: list[bool] = []
    stream = BodyStream(lambda: aborted.append(True))
    stream.add(lambda data, end: data)
    assert stream(b"a") == [b"a"]
    assert stream(b"") == b""
    assert stream(b"more") == [] and aborted == [True]


def test_overlapping_escaped_forms_are_all_masked() -> None:
    """A secret holding escape characters can be written so that two forms overlap; masking
    one must not leave the other (found by fuzzing)."""
    forms = SecretForms("u0\\7/a%0")
    body = b"%75\\u0030\\%37\\/%61%250\\u0030\\%37\\/%61%250 s %75\\u0030\\\\eHUwXDcvYSUwx"
    scrubbed = forms.scrub(body)
    assert forms.scrub(scrubbed) == scrubbed
