"""Secrets never show themselves; fake keys cannot be forged, altered or moved between
services; credentials are found where each API sends them; the scrubber catches a secret
split across chunks."""

from __future__ import annotations

import base64
import pickle

import pytest

from egress_guard.addons.flow import FlowState
from egress_guard.addons.streaming import Counter, Scrubber
from egress_guard.credentials import FakeKeyScanner, Service, Slot, find_credentials, header_value
from egress_guard.fakekeys import KeyShape, looks_like, make_key, new_key_id, parse_key
from egress_guard.forms import SecretForms, mask
from egress_guard.secrets import EnvBackend, Secret, SecretRef, SecretUnavailable

HMAC = b"k" * 32
OPENAI = KeyShape("sk-proj-", 156, "base64url")
GEMINI = KeyShape("AIza", 35, "base64url")
ANTHROPIC = KeyShape("sk-ant-api03-", 93, "base64url", "AA")


def test_secret_never_shows_itself() -> None:
    s = Secret("sk-REAL-value-123")
    for text in (repr(s), str(s), f"{s}", f"{s!r}", "%s" % (s,), str([s]), str({"k": s})):
        assert "REAL" not in text
    with pytest.raises(TypeError):
        pickle.dumps(s)
    assert s.reveal() == "sk-REAL-value-123" and s == Secret("sk-REAL-value-123")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("env:OPENAI_API_KEY", SecretRef("env", name="OPENAI_API_KEY")),
        ("vault:secret/llm/openai#api_key", SecretRef("vault", mount="secret", path="llm/openai", field="api_key")),
        ("vault:/kv1/a/b/c#f", SecretRef("vault", mount="kv1", path="a/b/c", field="f")),
    ],
)
def test_secret_refs(text: str, expected: SecretRef) -> None:
    assert SecretRef.parse(text) == expected and str(SecretRef.parse(text)) == text.replace(":/", ":")


@pytest.mark.parametrize("text", ["OPENAI_API_KEY", "env:1BAD", "vault:secret#f", "vault:secret/x", "file:/x"])
def test_bad_secret_refs(text: str) -> None:
    with pytest.raises(ValueError):
        SecretRef.parse(text)


def test_env_backend_names_the_missing_variable_only() -> None:
    with pytest.raises(SecretUnavailable, match="OPENAI_API_KEY is not set"):
        EnvBackend({}).read(SecretRef("env", name="OPENAI_API_KEY"))
    assert EnvBackend({"X": " v "}).read(SecretRef("env", name="X")).reveal() == "v"


@pytest.mark.parametrize("shape", [OPENAI, GEMINI, ANTHROPIC, KeyShape("ghp_", 36)])
def test_fake_keys_round_trip_and_resist_tampering(shape: KeyShape) -> None:
    key_id = new_key_id()
    key = make_key(HMAC, shape, "svc", key_id)
    assert key.startswith(shape.prefix) and key.endswith(shape.suffix)
    assert len(key) == len(shape.prefix) + shape.length + len(shape.suffix) and looks_like(shape, key)
    assert parse_key(HMAC, shape, "svc", key) == key_id
    assert parse_key(HMAC, shape, "other-service", key) is None  # bound to its service
    assert parse_key(b"x" * 32, shape, "svc", key) is None  # only this proxy's HMAC key makes them
    body_start = len(shape.prefix)
    for i in range(body_start, body_start + shape.length):  # every character is covered by the tag
        other = shape.chars[(shape.chars.index(key[i]) + 1) % len(shape.chars)]
        assert parse_key(HMAC, shape, "svc", key[:i] + other + key[i + 1 :]) is None
    assert shape.tag_bits() >= 120


def test_scanner_finds_keys_inside_text_only_when_genuine() -> None:
    svc = Service(
        "openai",
        frozenset({"api.openai.com"}),
        (Slot("header", "authorization", "Bearer"),),
        OPENAI,
        "OPENAI_API_KEY",
        SecretRef("env", name="OPENAI_API_KEY"),
    )
    key_id = new_key_id()
    key = make_key(HMAC, OPENAI, "openai", key_id)
    scanner = FakeKeyScanner(HMAC, [svc])
    assert scanner.scan(f'{{"text": "look {key}!"}}'.encode()) == [(svc, key_id)]
    assert scanner.scan(("sk-proj-" + "A" * 156).encode()) == []  # right shape, wrong tag


def test_find_credentials_in_each_slot_kind() -> None:
    slots = (
        Slot("header", "authorization", "Bearer"),
        Slot("query", "key"),
        Slot("basic", "authorization", username="u"),
    )
    svc = Service("s", frozenset({"h"}), slots, OPENAI, "X", SecretRef("env", name="X"))
    basic = "Basic " + base64.b64encode(b"x-access-token:KEY3").decode()
    found = find_credentials(svc, {"authorization": ["token KEY1", basic]}, {"key": ["KEY2"]})
    assert {(f.slot.kind, f.value, f.scheme) for f in found} == {
        ("header", "KEY1", "token"),
        ("query", "KEY2", None),
        ("basic", "KEY3", "Basic"),
    }
    assert header_value(slots[0], "REAL", "token") == "token REAL"
    assert header_value(slots[0], "REAL", None) == "Bearer REAL"
    assert header_value(slots[2], "REAL", "Basic") == "Basic " + base64.b64encode(b"u:REAL").decode()


def test_scrubber_catches_a_secret_split_across_chunks_and_keeps_length() -> None:
    secret = "sk-proj-REALsecretVALUE_0123456789"
    st = FlowState()
    scrub, count = Scrubber(SecretForms(secret)), Counter(st)
    stream = [
        b'data: {"echo": "' + secret[:10].encode(),
        secret[10:].encode() + b'"}\n\n',
        b"b64: " + base64.b64encode(secret.encode()) + b"\n",
        b"",
    ]
    out = b"".join(count(scrub(chunk, chunk == b""), chunk == b"") for chunk in stream)
    assert secret.encode() not in out and base64.b64encode(secret.encode()) not in out
    assert mask(len(secret)) in out
    assert len(out) == sum(len(c) for c in stream) == st.response_bytes  # framing intact


def test_scrubber_does_not_hold_back_sse_events() -> None:
    scrub = Scrubber(SecretForms("sk-proj-REALsecretVALUE_0123456789"))
    event = b'data: {"x": 1}\n\n'
    assert scrub(event, False) == event  # delivered at once, nothing held for the next chunk


def test_key_lifetimes_parse_with_the_one_duration_parser() -> None:
    from egress_guard.keys import KeyCommandError, parse_ttl

    assert [parse_ttl(t) for t in ("90", "90s", "30m", "8h", "7d", "2w")] == [90, 90, 1800, 28800, 604800, 1209600]
    for bad, why in [("0", "not a duration"), ("8 hours", "not a duration"), ("91d", "longer than the 90 days")]:
        with pytest.raises(KeyCommandError, match=why):
            parse_ttl(bad)
