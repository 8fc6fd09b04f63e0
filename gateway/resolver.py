"""Resolve a destination once and classify every address (the SSRF guard's input).

The gateway dials the address it checked: the adapter pins the first allowed
address from the Destination this returns and never resolves the name again
for that request. Order of lookup:

1. IP literals in any spelling (decimal, hex, octal, short forms) are parsed,
   never sent to DNS; an out-of-range numeric spelling is an error.
2. Static overrides from configuration (``name -> address``), for private
   services and tests.
3. ``localhost`` and ``*.localhost`` are loopback (RFC 6761), without DNS.
4. The system resolver (getaddrinfo), with a timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import Iterable, Mapping

from gateway.addresses import classify, parse_ip_literal
from gateway.policy.model import Destination


class HostError(ValueError):
    """A host name that cannot be used at all (bad characters, bad IDN)."""


_NORMALISED: dict[str, str] = {}


def normalise_host(host: str) -> str:
    """Lowercase, no brackets, no trailing dot, IDNA (punycode) for non-ASCII."""
    hit = _NORMALISED.get(host)
    if hit is not None:
        return hit
    h = _normalise(host)
    if len(_NORMALISED) >= 8192:
        _NORMALISED.clear()
    _NORMALISED[host] = h
    return h


def _normalise(host: str) -> str:
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h.endswith(".") and not h.endswith(".."):
        h = h[:-1]
    if not h:
        raise HostError("empty host")
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            raise HostError("host is not a valid internationalised domain name") from None
    h = h.lower()
    if any(c in h for c in " /\\@?#\t\r\n\x00"):
        raise HostError("host contains characters a host name cannot have")
    return h


class Resolver:
    def __init__(self, overrides: Mapping[str, Iterable[str]] | None = None, *,
                 self_addresses: Iterable[str] = (), timeout: float = 5.0,
                 cache_seconds: float = 10.0, cache_size: int = 4096):
        self.overrides: dict[str, tuple[ipaddress._BaseAddress, ...]] = {}
        for name, addrs in (overrides or {}).items():
            if isinstance(addrs, str):
                addrs = [addrs]
            self.overrides[normalise_host(name)] = tuple(ipaddress.ip_address(a) for a in addrs)
        self.self_addresses = frozenset(ipaddress.ip_address(a) for a in self_addresses)
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        self._cache: dict[str, tuple[float, Destination]] = {}  # DNS answers, classified
        self._static: dict[str, Destination] = {}  # literals, overrides, localhost: never change

    def _classified(self, addrs, via: str) -> Destination:
        return Destination(tuple(classify(a, self_addresses=self.self_addresses) for a in addrs), via=via)

    def resolve_static(self, host: str) -> Destination | None:
        """Resolve without I/O when possible (literal, override, localhost)."""
        try:
            ip = parse_ip_literal(host)
        except ValueError as e:
            return Destination(error=str(e), via="literal")
        if ip is not None:
            return self._classified([ip], "literal")
        if host in self.overrides:
            return self._classified(self.overrides[host], "override")
        if host == "localhost" or host.endswith(".localhost"):
            return self._classified([ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")], "localhost")
        return None

    def lookup_cached(self, host: str) -> Destination | None:
        """Without I/O: a static destination, or a DNS answer still in the cache."""
        d = self._static.get(host)
        if d is not None:
            return d
        d = self.resolve_static(host)
        if d is not None:
            if len(self._static) >= self.cache_size:
                self._static.clear()
            self._static[host] = d
            return d
        hit = self._cache.get(host)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return None

    async def resolve(self, host: str, port: int = 443) -> Destination:
        cached = self.lookup_cached(host)
        if cached is not None:
            return cached
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP),
                self.timeout)
        except asyncio.TimeoutError:
            return Destination(error=f"resolving {host} timed out")
        except (socket.gaierror, UnicodeError, OSError) as e:
            return Destination(error=f"cannot resolve {host}: {getattr(e, 'strerror', None) or e}")
        addrs = []
        for family, _, _, _, sockaddr in infos:
            a = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            if a not in addrs:
                addrs.append(a)
        if not addrs:
            return Destination(error=f"{host} resolved to no address")
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        d = self._classified(addrs, "dns")
        self._cache[host] = (now + self.cache_seconds, d)
        return d
