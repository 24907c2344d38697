"""Resolve-then-vet: the proxy picks the address it dials, so DNS cannot rebind it later.

`Resolver.vet(host, port)` resolves a name once (or takes an operator-pinned address),
refuses if *any* resolved address is forbidden by the SSRF guard, and returns the address
the proxy must connect to. The caller connects to exactly that address — there is no second
lookup for a rebinding attacker to answer differently.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass, field

from egress_guard.hosts import Host, IPAddress
from egress_guard.ssrf import Network, classify, covered


class Refused(Exception):
    """The destination's address is not one the proxy will connect to. `str()` says why."""


@dataclass
class Resolver:
    pinned: dict[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    allow_private: tuple[Network, ...] = ()
    cache_seconds: float = 30.0
    _cache: dict[str, tuple[float, tuple[IPAddress, ...]]] = field(default_factory=dict)

    def check(self, host: Host, addresses: tuple[IPAddress, ...]) -> IPAddress:
        """Vet resolved `addresses` of `host`; return the one to dial or raise Refused."""
        if not addresses:
            raise Refused(f"{host} did not resolve to any address")
        for ip in addresses:
            reason = classify(ip)
            if reason is not None and not covered(ip, self.allow_private):
                where = f"{ip} is" if host.ip is not None else f"{host} resolves to {ip}, which is"
                raise Refused(f"{where} {reason}; list it in network.allow_private to permit it")
        return addresses[0]

    async def lookup(self, host: Host, port: int) -> tuple[IPAddress, ...]:
        if host.ip is not None:
            return (host.ip,)
        now = time.monotonic()
        hit = self._cache.get(host.name)
        if hit is not None and hit[0] > now:
            return hit[1]
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host.name, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise Refused(f"{host} does not resolve ({exc.strerror})") from None
        addrs: list[IPAddress] = []
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if ip not in addrs:
                addrs.append(ip)
        # IPv4 first: most upstreams and most sandboxes have no IPv6 route.
        result = tuple(sorted(addrs, key=lambda a: a.version))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[host.name] = (now + self.cache_seconds, result)
        return result

    async def vet(self, host: Host, port: int) -> IPAddress:
        """The address to dial for `host`, or Refused. Pinned names are operator-trusted."""
        pinned = self.pinned.get(host.name)
        if pinned is not None:
            return pinned[0]
        return self.check(host, await self.lookup(host, port))
