from __future__ import annotations

import ipaddress

import pytest

from egress_guard.ssrf import classify, covered


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.0.0.5", "private"),
        ("172.16.3.4", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "not globally routable"),  # TEST-NET-1
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fd00:ec2::254", "cloud metadata"),
        ("fc00::1", "unique local"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("::ffff:10.0.0.1", "IPv4-mapped IPv6 address embedding 10.0.0.1 (private"),
        ("::ffff:127.0.0.1", "IPv4-mapped IPv6 address embedding 127.0.0.1 (loopback)"),
        ("::127.0.0.1", "IPv4-compatible"),
        ("64:ff9b::a9fe:a9fe", "NAT64 IPv6 address embedding 169.254.169.254"),
        ("64:ff9b:1::a00:1", "NAT64"),
        ("2002:7f00:1::", "6to4 IPv6 address embedding 127.0.0.1"),
        ("2002:c0a8:101::1", "6to4 IPv6 address embedding 192.168.1.1"),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "Teredo client IPv6 address embedding 10.0.0.1"),
    ],
)
def test_forbidden_addresses(address: str, reason: str) -> None:
    result = classify(ipaddress.ip_address(address))
    assert result is not None and reason in result


@pytest.mark.parametrize("address", ["1.1.1.1", "104.18.6.192", "2606:4700::6810:7b60", "::ffff:1.1.1.1"])
def test_public_addresses(address: str) -> None:
    assert classify(ipaddress.ip_address(address)) is None


def test_covered_by_allow_private_includes_mapped_form() -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8")]
    assert covered(ipaddress.ip_address("10.1.2.3"), nets)
    assert covered(ipaddress.ip_address("::ffff:10.1.2.3"), nets)
    assert not covered(ipaddress.ip_address("11.0.0.1"), nets)


def test_6to4_and_teredo_are_refused_even_when_embedding_public_addresses() -> None:
    # Both are deprecated transition mechanisms that relay through third parties: not global.
    assert classify(ipaddress.ip_address("2002:0101:0101::1")) == "not globally routable"
