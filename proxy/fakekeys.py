"""Fake API keys: the only credential an agent holds.

A fake key looks like the real provider's key (prefix, length, alphabet) so SDKs accept it,
but is `prefix + id + tag [+ suffix]`: `id` names the key's record in the store (agent,
session, services, expiry, revocation: `KeyRecord`) and `tag` is an HMAC over prefix,
service and id with a key that only the proxy has (`certs/fake-key-hmac.key`). Nothing in
the key can be forged, altered or extended: the tag covers every character, and expiry and
services live on the proxy side. Compared in constant time. A fake key is worthless
anywhere but this proxy. Pure: crypto and encoding; the store keeps the records.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

ALPHABETS = {
    "base62": "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "base64url": "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    "hex": "0123456789abcdef",
}
ID_BYTES = 10  # 80 random bits name the key's row
MIN_TAG_BITS = 120
HMAC_KEY_FILE = "fake-key-hmac.key"


@dataclass(frozen=True)
class KeyShape:
    prefix: str
    length: int  # characters between prefix and suffix
    alphabet: str = "base62"
    suffix: str = ""

    @property
    def chars(self) -> str:
        return ALPHABETS[self.alphabet]

    def id_chars(self) -> int:
        n, cap = 0, 1
        while cap < 256**ID_BYTES:
            cap *= len(self.chars)
            n += 1
        return n

    def tag_bits(self) -> float:
        import math

        return (self.length - self.id_chars()) * math.log2(len(self.chars))

    def pattern(self) -> str:
        body = "[" + re.escape(self.chars) + "]{" + str(self.length) + "}"
        return re.escape(self.prefix) + body + re.escape(self.suffix)


def _encode(number: int, chars: str, width: int) -> str:
    out = []
    for _ in range(width):
        number, digit = divmod(number, len(chars))
        out.append(chars[digit])
    return "".join(reversed(out))


def _decode(text: str, chars: str) -> int:
    number = 0
    for ch in text:
        number = number * len(chars) + chars.index(ch)
    return number


def _tag(hmac_key: bytes, shape: KeyShape, service: str, key_id: str, width: int) -> str:
    """`width` characters of the alphabet, derived from HMAC-SHA256 in counter mode."""
    out: list[str] = []
    counter = 0
    while len(out) < width:
        msg = f"egress-guard fake key v1|{service}|{shape.prefix}|{key_id}|{counter}".encode()
        digest = hmac.new(hmac_key, msg, hashlib.sha256).digest()
        # rejection sampling keeps every character uniform over the alphabet
        limit = 256 - 256 % len(shape.chars)
        out.extend(shape.chars[b % len(shape.chars)] for b in digest if b < limit)
        counter += 1
    return "".join(out[:width])


def make_key(hmac_key: bytes, shape: KeyShape, service: str, key_id: str) -> str:
    width = shape.length - shape.id_chars()
    id_text = _encode(int(key_id, 16), shape.chars, shape.id_chars())
    return shape.prefix + id_text + _tag(hmac_key, shape, service, key_id, width) + shape.suffix


def parse_key(hmac_key: bytes, shape: KeyShape, service: str, text: str) -> str | None:
    """The key id if `text` is a genuine fake key for `service`, else None (constant time in the tag)."""
    if not (text.startswith(shape.prefix) and text.endswith(shape.suffix)):
        return None
    body = text[len(shape.prefix) : len(text) - len(shape.suffix)]
    if len(body) != shape.length or any(ch not in shape.chars for ch in body):
        return None
    number = _decode(body[: shape.id_chars()], shape.chars)
    if number >= 256**ID_BYTES:
        return None
    key_id = f"{number:0{ID_BYTES * 2}x}"
    expected = make_key(hmac_key, shape, service, key_id)
    return key_id if hmac.compare_digest(expected.encode(), text.encode()) else None


def looks_like(shape: KeyShape, text: str) -> bool:
    """Has the shape of an egress-guard fake key for this service (tag not checked)."""
    return re.fullmatch(shape.pattern(), text) is not None


def new_key_id() -> str:
    return secrets.token_hex(ID_BYTES)


def load_or_create_hmac_key(ca_dir: Path, *, create: bool = True) -> bytes:
    path = ca_dir / HMAC_KEY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise
        ca_dir.mkdir(parents=True, exist_ok=True)
        data = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    if len(data) < 32:
        raise ValueError(f"{path} is too short to be an egress-guard HMAC key")
    return data


# --- what a key grants -----------------------------------------------------------------


@dataclass(frozen=True)
class KeyRecord:
    """A minted key as the store keeps it: its id and what it grants, never the key."""

    key_id: str
    agent: str
    session: str
    services: tuple[str, ...]
    created_at: str
    expires_at: str
    revoked_at: str | None = None
    revoked_reason: str | None = None

    def status(self, now: str) -> str:
        if self.revoked_at:
            return "revoked"
        return "expired" if self.expires_at <= now else "active"
