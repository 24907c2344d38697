from __future__ import annotations

import pytest

from egress_guard.hosts import HostError, normalize_host, split_host_port


@pytest.mark.parametrize(
    ("raw", "name", "is_ip"),
    [
        ("API.OpenAI.com", "api.openai.com", False),
        ("api.openai.com.", "api.openai.com", False),
        ("bücher.example", "xn--bcher-kva.example", False),
        ("xn--bcher-kva.example", "xn--bcher-kva.example", False),
        ("127.0.0.1", "127.0.0.1", True),
        ("2130706433", "127.0.0.1", True),
        ("0x7f000001", "127.0.0.1", True),
        ("0x7f.0.0.1", "127.0.0.1", True),
        ("0177.0.0.1", "127.0.0.1", True),
        ("0177.1", "127.0.0.1", True),
        ("127.1", "127.0.0.1", True),
        ("10.1", "10.0.0.1", True),
        ("169.254.43518", "169.254.169.254", True),
        ("[::1]", "::1", True),
        ("::1", "::1", True),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1", True),
        ("[::ffff:7f00:1]", "::ffff:127.0.0.1", True),
        ("[fe80::1%eth0]", "fe80::1", True),
        ("127.0.0.1.", "127.0.0.1", True),
    ],
)
def test_normalize(raw: str, name: str, is_ip: bool) -> None:
    host = normalize_host(raw)
    assert host.name == name
    assert (host.ip is not None) == is_ip


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "a..b",
        "-bad.example",
        "exa mple.com",
        "evil.com%2f",
        "256.1.1.1",
        "1.2.3.4.5",
        "09.1.1.1",
        "[::g]",
        "foo.123",
        "a" * 64 + ".com",
        "host/path",
        "user@host",
    ],
)
def test_invalid_hosts_raise(raw: str) -> None:
    with pytest.raises(HostError):
        normalize_host(raw)


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("api.x.com:443", ("api.x.com", 443)),
        ("api.x.com", ("api.x.com", 80)),
        ("[::1]:8080", ("[::1]", 8080)),
        ("[::1]", ("[::1]", 80)),
    ],
)
def test_split_host_port(authority: str, expected: tuple[str, int]) -> None:
    assert split_host_port(authority, 80) == expected


@pytest.mark.parametrize("authority", ["api.x.com:0", "api.x.com:99999", "api.x.com:http", "[::1", "[::1]x"])
def test_split_host_port_rejects(authority: str) -> None:
    with pytest.raises(HostError):
        split_host_port(authority)


@pytest.mark.parametrize(
    ("name", "suffix", "below"),
    [
        ("co.uk", True, "barsy.co.uk"),  # (and below it: a private-section entry)
        ("github.io", True, None),
        ("s3.amazonaws.com", True, None),
        ("x.ck", True, None),  # "*.ck": every name directly under ck
        ("www.ck", False, None),  # "!www.ck": the exception
        ("amazonaws.com", False, "s3.amazonaws.com"),  # not a suffix, but holds some
        ("compute.amazonaws.com", False, "*.compute.amazonaws.com"),
        ("openai.com", False, None),
        ("mybucket.s3.amazonaws.com", False, None),
    ],
)
def test_public_suffix_list(name: str, suffix: bool, below: str | None) -> None:
    from egress_guard.hosts import is_public_suffix, public_suffix_below

    assert is_public_suffix(name) is suffix
    assert public_suffix_below(name) == below
