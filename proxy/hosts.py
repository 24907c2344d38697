"""Host name normalisation and IP-literal parsing, shared by config loading and policy.

Every host the proxy compares — from an allowlist entry, a CONNECT line, a Host header or a
TLS SNI — goes through `normalize_host` first, so that `API.OpenAI.com.`, `api.openai.com`
and a punycode form all compare equal, and every spelling of an IP address (`2130706433`,
`0x7f.1`, `0177.0.0.1`, `[::ffff:127.0.0.1]`) is recognised as the address it is.

Never returns a "best effort" value for input it does not understand: it raises `HostError`,
and callers deny.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_PART = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")


class HostError(ValueError):
    """A host that cannot be normalised; the message says why."""


@dataclass(frozen=True, slots=True)
class Host:
    """A normalised host: `name` is lowercase ASCII (punycode) without a trailing dot,
    or the canonical text of an IP address, in which case `ip` is set."""

    name: str
    ip: IPAddress | None = None

    def __str__(self) -> str:
        return self.name


def parse_ipv4_any_form(text: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address `text` denotes in any form inet_aton(3) accepts, or None.

    Accepts 1–4 dot-separated parts in decimal, octal (leading 0) or hex (0x); the last
    part fills the remaining bytes (`127.1` is 127.0.0.1, `2130706433` is 127.0.0.1).
    Returns None when `text` is not numeric in that sense (it is then a name).
    """
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_NUMERIC_PART.match(p) for p in parts):
        return None
    values: list[int] = []
    for part in parts:
        try:
            if part[:2].lower() == "0x":
                values.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                values.append(int(part, 8))
            else:
                values.append(int(part, 10))
        except ValueError as exc:  # e.g. "09": looks octal, is not
            raise HostError(f"{text!r} is neither a host name nor a valid IP address") from exc
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        raise HostError(f"{text!r} is neither a host name nor a valid IP address")
    number = 0
    for v in head:
        number = number * 256 + v
    number = number * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(number)


@functools.lru_cache(maxsize=4096)  # pure, and called for every request (Host, SNI, CONNECT)
def normalize_host(raw: str) -> Host:
    """Normalise a host as written in a URL, CONNECT line, Host header or SNI (no port).

    Lowercases, drops one trailing dot, converts international names to punycode, and
    recognises IP literals in every form. Raises HostError for anything else.
    """
    text = raw.strip()
    if not text:
        raise HostError("empty host")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        try:
            ip6 = ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError as exc:
            raise HostError(f"{raw!r} is not a valid IPv6 address") from exc
        return Host(str(ip6), ip6)
    if ":" in text:
        try:
            ip6 = ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError as exc:
            raise HostError(f"{raw!r} is not a valid host") from exc
        return Host(str(ip6), ip6)
    if text.endswith("."):
        text = text[:-1]
    ip4 = parse_ipv4_any_form(text)
    if ip4 is not None:
        return Host(str(ip4), ip4)
    try:
        ascii_name = text.encode("idna").decode("ascii").lower() if not text.isascii() else text
    except UnicodeError as exc:
        raise HostError(f"{raw!r} is not a valid international host name") from exc
    name = ascii_name.lower()
    if len(name) > 253:
        raise HostError(f"host {raw!r} is longer than 253 characters")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise HostError(f"{raw!r} is not a valid host name (bad label {label!r})")
    # A name whose last label is all digits would be read as an address by some resolvers.
    if labels[-1].isdigit():
        raise HostError(f"{raw!r} is not a valid host name (numeric top-level label)")
    return Host(name)


def split_host_port(authority: str, default_port: int | None = None) -> tuple[str, int | None]:
    """Split `host:port` / `[v6]:port` / `host` into (host, port). Raises HostError."""
    text = authority.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise HostError(f"{authority!r}: unterminated IPv6 literal")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise HostError(f"{authority!r} is not host:port")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise HostError(f"{authority!r}: port must be a number from 1 to 65535")
    return host, int(port_text)


# --- the Public Suffix List -----------------------------------------------------------------
# A wildcard rule directly under a public suffix (`*.co.uk`, `*.github.io`), or above one
# (`*.amazonaws.com` spans s3.amazonaws.com, whose names belong to every AWS customer),
# matches hosts of many unrelated owners. The list is the one publicsuffix2 ships (a
# mitmproxy dependency). Its own lookup counts every intermediate label of a rule as a
# suffix, so the rules are read here and applied as publicsuffix.org specifies.


@dataclass(frozen=True, slots=True)
class _SuffixList:
    rules: frozenset[str]  # exact suffixes: co.uk, github.io, s3.amazonaws.com
    wildcard_parents: frozenset[str]  # "*.ck": every label directly under ck is a suffix
    exceptions: frozenset[str]  # "!www.ck": registrable after all
    above: dict[str, str]  # a name -> one suffix strictly below it (the shortest)


@functools.cache
def _suffix_list() -> _SuffixList:
    from importlib import resources

    text = resources.files("publicsuffix2").joinpath("public_suffix_list.dat").read_text(encoding="utf-8")
    rules: set[str] = set()
    wild: set[str] = set()
    exceptions: set[str] = set()
    above: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip().split(" ", 1)[0]
        if not line or line.startswith("//"):
            continue
        try:
            line = line.encode("idna").decode("ascii").lower()
        except UnicodeError:
            continue
        if line.startswith("!"):
            exceptions.add(line[1:])
            continue
        if line.startswith("*."):
            base = line[2:]
            wild.add(base)
            suffix, ancestors = f"*.{base}", [base, *_ancestors(base)]
        else:
            rules.add(line)
            suffix, ancestors = line, _ancestors(line)
        for name in ancestors:
            if name not in above or len(suffix) < len(above[name]):
                above[name] = suffix
    return _SuffixList(frozenset(rules), frozenset(wild), frozenset(exceptions), above)


def _ancestors(name: str) -> list[str]:
    labels = name.split(".")
    return [".".join(labels[i:]) for i in range(1, len(labels))]


def is_public_suffix(name: str) -> bool:
    """True if `name` (normalised) is on the Public Suffix List: names directly under it
    are registered by different owners."""
    psl = _suffix_list()
    if name in psl.exceptions:
        return False
    return name in psl.rules or name.partition(".")[2] in psl.wildcard_parents


def public_suffix_below(name: str) -> str | None:
    """A public suffix strictly below `name` (`s3.amazonaws.com` for `amazonaws.com`), or None."""
    return _suffix_list().above.get(name)
