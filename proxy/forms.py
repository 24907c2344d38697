"""The encodings a secret can travel in, recognised both ways with one definition.

Two directions use the same set (`ENCODINGS`):
- to the agent: `SecretForms(secret).scrub(data)` masks every form of a real secret a
  (possibly hostile) upstream could send back — as is, base64 or base64url at any of the
  three byte offsets, hex in either case, and any mix of percent-encoding and JSON `\\u00XX`
  escapes, character by character;
- from the agent: `views(data)` yields `data` decoded under each of those encodings, so the
  fake-key scanner finds a key an agent percent-encoded, escaped, hexed or base64'd before
  sending it to a host it is not bound to.

What it cannot catch is stated in the README's threat model: a value split into pieces the
receiver reassembles, encrypted or compressed by the agent itself (Content-Encoding is
decoded elsewhere), or transformed in ways not listed here.

Pure: no I/O, no mitmproxy. It never raises on any input bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Iterator

# One name per encoding, in the order both directions apply them. Tests assert that every
# one is scrubbed (to the agent) and decoded (from the agent).
ENCODINGS = ("raw", "base64", "base64url", "hex", "percent", "json-escape")

_MASK = b"[REDACTED-by-egress-guard]"


def mask(length: int) -> bytes:
    """A replacement of the same length, so a body's framing (Content-Length) stays valid."""
    return _MASK[:length].ljust(length, b"*")


def _b64_stable(raw: bytes, offset: int, urlsafe: bool) -> bytes:
    """The part of base64(prefix of `offset` bytes + raw + anything) that depends on `raw`
    alone: the characters whose six bits all come from `raw`."""
    encoded = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(b"\0" * offset + raw)
    first = -(-8 * offset // 6)  # ceil: the first character with no bit of the prefix
    last = (8 * (offset + len(raw)) - 6) // 6  # the last character with no bit of what follows
    return encoded[first : last + 1]


# One way a byte of a form may be written: (bytes, compare case-insensitively)
Alternative = tuple[bytes, bool]


def _escapes(byte: int) -> list[Alternative]:
    """`byte` as %XX or \\u00XX (hex in either case), and '/' also as JSON's \\/."""
    hx = b"%02x" % byte
    out = [(b"%" + hx, True), (b"\\u00" + hx, True)]
    if byte == 0x2F:
        out.append((b"\\/", False))
    return out


def _spec_pattern(spec: list[list[Alternative]]) -> re.Pattern[bytes]:
    """A regex matching every way of writing `spec` (each position: one of its alternatives)."""
    parts = []
    for alts in spec:
        options = []
        for text, fold in alts:
            esc = re.escape(text).decode("latin-1")
            if fold:  # hex digits in either case, the rest as is
                esc = "".join(f"[{c}{c.upper()}]" if c in "abcdef" else c for c in esc)
            options.append(esc)
        parts.append(options[0] if len(options) == 1 else f"(?:{'|'.join(options)})")
    return re.compile("".join(parts).encode("latin-1"))


def _is_proper_prefix(spec: list[list[Alternative]], data: bytes, i: int) -> bool:
    """True if data[i:] is a proper prefix of some way of writing `spec`: follows every
    alternative at once (a literal '%' and an escape start alike), so it is linear."""
    n = len(data)
    states = {i}
    for alts in spec:
        following = set()
        for p in states:
            if p == n:
                return True  # the data ended between two positions of the form
            for text, fold in alts:
                seg = data[p : p + len(text)]
                if fold:
                    seg = seg.lower()
                if len(seg) < len(text):
                    if text.startswith(seg):
                        return True  # the data ends inside this position's writing
                elif seg == text:
                    following.add(p + len(text))
        if not following:
            return False
        states = following
    return False  # a whole form: scrub() masks it; nothing to hold


class SecretForms:
    """Every form of one secret that must never reach the agent. `repr` never shows it."""

    __slots__ = ("_hex", "_literals", "_patterns", "_raw", "_specs", "_starts", "max_len")

    def __init__(self, secret: str) -> None:
        raw = secret.encode()
        self._raw = raw
        b64 = {_b64_stable(raw, offset, urlsafe) for offset in (0, 1, 2) for urlsafe in (False, True)}
        # longest first: a longer form is never left half-masked by a shorter one inside it
        self._literals = tuple(sorted((f for f in {raw} | b64 if len(f) >= 8), key=len, reverse=True))
        self._hex = raw.hex().encode()  # searched case-insensitively: 736B2d… decodes too
        # escaped forms: every byte of the secret as itself, %XX or \u00XX in any mix; and the
        # base64 forms with their '/' and '+' escaped (a JSON encoder's \/, a URL's %2F)
        specs = [[[(bytes([c]), False), *_escapes(c)] for c in raw]]
        for form in self._literals:
            if form != raw and (b"/" in form or b"+" in form):
                specs.append([[(bytes([c]), False), *(_escapes(c) if c in b"/+" else [])] for c in form])
        hex_spec = [[(bytes([c]), True)] for c in self._hex]
        self._specs = [*specs, hex_spec]
        self._patterns = [_spec_pattern(spec) for spec in specs]
        firsts = {alt[0][:1] for spec in self._specs for alt in spec[0]} | {f[:1] for f in self._literals}
        firsts |= {f.upper() for f in firsts}
        self._starts = re.compile(b"[" + b"".join(re.escape(f) for f in sorted(firsts)) + b"]")
        self.max_len = max(6 * len(raw), 2 * len(raw), *(len(f) for f in self._literals))

    def __repr__(self) -> str:
        return f"SecretForms(<{len(self._raw)} bytes, redacted>)"

    def scrub(self, data: bytes) -> bytes:
        """`data` with every form masked (same length). Returns `data` itself if none was found."""
        for _ in range(4):  # forms can overlap (a secret holding '%' or '\\'): mask until none is left
            masked = self._scrub_once(data)
            if masked is data:
                return data
            data = masked
        return data

    def _scrub_once(self, data: bytes) -> bytes:
        for form in self._literals:
            if form in data:
                data = data.replace(form, mask(len(form)))
        if b"%" in data or b"\\u00" in data or b"\\/" in data:
            for pattern in self._patterns:
                masked, n = pattern.subn(lambda m: mask(m.end() - m.start()), data)
                data = masked if n else data
        lower = data.lower()
        i = lower.find(self._hex)
        if i != -1:
            buf = bytearray(data)
            while i != -1:
                buf[i : i + len(self._hex)] = mask(len(self._hex))
                i = lower.find(self._hex, i + len(self._hex))
            data = bytes(buf)
        return data

    def partial(self, data: bytes) -> int:
        """Length of the longest tail of `data` that could be the beginning of a form (and
        so must be held back until the next piece shows whether it is one)."""
        n = len(data)
        for m in self._starts.finditer(data, max(0, n - self.max_len)):
            i = m.start()
            if any(f.startswith(data[i:]) for f in self._literals) or any(
                _is_proper_prefix(spec, data, i) for spec in self._specs
            ):
                return n - i  # the leftmost start holds the most
        return 0


class ScrubStream:
    """Scrubs a byte stream piece by piece: a form split across pieces is still masked,
    by holding back only a tail that could be the start of one."""

    __slots__ = ("forms", "pending")

    def __init__(self, forms: SecretForms) -> None:
        self.forms, self.pending = forms, b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.forms.scrub(self.pending + chunk)
        hold = self.forms.partial(data)
        out, self.pending = data[: len(data) - hold], data[len(data) - hold :]
        return out

    def flush(self) -> bytes:
        """The end of the stream: what was held back (it was no secret: the stream ended)."""
        out, self.pending = self.pending, b""
        return out


# --- from the agent: decoded views ---------------------------------------------------------

_JSON_ESCAPE = re.compile(rb"\\u00([0-9a-fA-F]{2})|\\(/)")
_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _class_table(alphabet: bytes) -> bytes:
    """A translate() table: bytes of `alphabet` -> b"a", every other byte -> b" "."""
    table = bytearray(b" " * 256)
    for c in alphabet:
        table[c] = ord("a")
    return bytes(table)


_HEX_TABLE = _class_table(b"0123456789abcdefABCDEF")
_B64_TABLE = _class_table(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-")


def _runs(text: bytes, table: bytes, min_run: int) -> Iterator[bytes]:
    """The runs of at least `min_run` bytes of one alphabet in `text`. Found at C speed
    (translate + find): a regex over a large body would cost ~20 ns a byte."""
    classes = text.translate(table)
    needle = b"a" * min_run
    pos = classes.find(needle)
    while pos != -1:
        end = classes.find(b" ", pos)
        end = len(text) if end == -1 else end
        yield text[pos:end]
        pos = classes.find(needle, end)


def _unescape_json(data: bytes) -> bytes:
    return _JSON_ESCAPE.sub(lambda m: bytes([int(m[1], 16)]) if m[1] else b"/", data)


def _binary_views(text: bytes, min_len: int) -> Iterator[bytes]:
    """Hex and base64 (either alphabet, any alignment) runs of `text`, decoded; only runs
    long enough to hold a value of `min_len` bytes."""
    for run in _runs(text, _HEX_TABLE, 2 * min_len):
        for skip in (0, 1):
            part = run[skip:]
            yield bytes.fromhex(part[: len(part) // 2 * 2].decode())
    for run in _runs(text, _B64_TABLE, -(-4 * min_len // 3)):
        run = run.translate(_URLSAFE)
        for skip in range(4):
            part = run[skip:]
            extra = len(part) % 4
            part = part[:-1] if extra == 1 else part + b"=" * ((4 - extra) % 4)
            try:
                yield binascii.a2b_base64(part)
            except (binascii.Error, ValueError):
                continue


def views(data: bytes, min_len: int = 16) -> Iterator[bytes]:
    """`data`, then `data` decoded under every encoding in ENCODINGS that could hide a value
    of at least `min_len` bytes: percent-decoded, JSON-unescaped, and the hex and base64
    runs of each of those. Cheap when nothing is encoded: each decoder is gated on the
    characters its encoding needs."""
    yield data
    texts = [data]
    if b"%" in data:
        texts.append(urllib.parse.unquote_to_bytes(data))
    if b"\\" in data:
        texts.extend([_unescape_json(t) for t in texts])
    yield from texts[1:]
    for text in texts:
        yield from _binary_views(text, min_len)
