"""SSRF classification: is an address one an agent must never reach through the proxy?

`classify(ip)` names the forbidden range an address falls in, or returns None for a public
address. IPv6 forms that embed an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4,
Teredo) are judged by the address they embed as well, so `::ffff:10.0.0.1` is as private as
`10.0.0.1`. Pure functions: no DNS, no sockets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from egress_guard.hosts import IPAddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Checked in order; the first match names the reason. Python's `is_global` is the backstop
# for anything not named here (documentation ranges, benchmarking, 6bone, ...).
_V4: list[tuple[str, ipaddress.IPv4Network]] = [
    (reason, ipaddress.IPv4Network(net))
    for reason, net in [
        ("unspecified", "0.0.0.0/8"),
        ("loopback", "127.0.0.0/8"),
        ("private (RFC 1918)", "10.0.0.0/8"),
        ("private (RFC 1918)", "172.16.0.0/12"),
        ("private (RFC 1918)", "192.168.0.0/16"),
        ("carrier-grade NAT (100.64.0.0/10)", "100.64.0.0/10"),
        ("link-local (incl. cloud metadata 169.254.169.254)", "169.254.0.0/16"),
        ("multicast", "224.0.0.0/4"),
        ("broadcast", "255.255.255.255/32"),
        ("reserved", "240.0.0.0/4"),
    ]
]
_V6: list[tuple[str, ipaddress.IPv6Network]] = [
    (reason, ipaddress.IPv6Network(net))
    for reason, net in [
        ("unspecified", "::/128"),
        ("loopback", "::1/128"),
        ("cloud metadata (fd00:ec2::254)", "fd00:ec2::254/128"),
        ("unique local (fc00::/7)", "fc00::/7"),
        ("link-local", "fe80::/10"),
        ("site-local (deprecated)", "fec0::/10"),
        ("multicast", "ff00::/8"),
    ]
]
_NAT64 = [ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48")]
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, with the name of the form."""
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    if ip.ipv4_mapped is not None:
        found.append(("IPv4-mapped", ip.ipv4_mapped))
    if ip in _V4_COMPATIBLE and int(ip) > 1:
        found.append(("IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    if any(ip in net for net in _NAT64):
        found.append(("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found.extend([("Teredo server", server), ("Teredo client", client)])
    return found


def classify(ip: IPAddress) -> str | None:
    """Why `ip` is forbidden as an upstream address, or None if it is public."""
    if isinstance(ip, ipaddress.IPv4Address):
        for reason, net in _V4:
            if ip in net:
                return reason
        return None if ip.is_global else "not globally routable"
    for reason6, net6 in _V6:
        if ip in net6:
            return reason6
    for form, v4 in embedded_ipv4(ip):
        inner = classify(v4)
        if inner is not None:
            return f"{form} IPv6 address embedding {v4} ({inner})"
    if ip.ipv4_mapped is not None:
        return None  # a mapped public IPv4 address is as public as the address itself
    return None if ip.is_global else "not globally routable"


def covered(ip: IPAddress, networks: Iterable[Network]) -> bool:
    """True if `ip` (or the IPv4 address it maps) lies in one of `networks`."""
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(c.version == n.version and c in n for c in candidates for n in networks)
