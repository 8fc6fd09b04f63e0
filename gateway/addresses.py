"""SSRF address classification: is this IP address internal, and why?

The threat: code in the sandbox wants to reach something it must not (the
cloud metadata service, the gateway itself, loopback services, the private
network) and tries to get past a check that compares strings or only knows the
obvious spellings. The usual tricks are

* alternative IPv4 spellings that ``inet_aton``, curl and browsers all accept:
  ``2130706433``, ``0x7f000001``, ``017700000001``, ``127.1``,
  ``0x7f.0.0.1``, ``0177.0.0.01``, ``127.0.0.1.`` -- all of them 127.0.0.1;
* IPv6 addresses that carry an IPv4 address inside them and end up talking to
  it: IPv4-mapped ``::ffff:169.254.169.254``, IPv4-compatible ``::a.b.c.d``,
  6to4 ``2002:a9fe:a9fe::``, NAT64 ``64:ff9b::a9fe:a9fe`` and Teredo
  ``2001:0:...`` (whose client address is stored XOR 0xffffffff);
* IPv6 zone ids (``fe80::1%eth0``), brackets and trailing dots that defeat
  naive parsing.

``parse_ip_literal`` turns every spelling of an IP literal into an address (or
refuses it outright), and ``classify`` unwraps embedded IPv4 addresses and
reports the most severe class found, outer or inner. Everything here is a pure
function: no DNS, no sockets.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import unicodedata
import functools
from dataclasses import dataclass
from typing import Iterable, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

__all__ = [
    "AddressClass", "Classification", "INTERNAL_CLASSES",
    "classify", "is_internal", "parse_ip_literal",
]


class AddressClass(str, enum.Enum):
    """What kind of destination an address is. Every class but PUBLIC is internal."""

    PUBLIC = "public"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link_local"
    METADATA = "metadata"
    CGNAT = "cgnat"
    MULTICAST = "multicast"
    UNSPECIFIED = "unspecified"
    RESERVED = "reserved"
    GATEWAY_SELF = "gateway_self"


INTERNAL_CLASSES: frozenset[AddressClass] = frozenset(AddressClass) - {AddressClass.PUBLIC}

# Most severe first: when an address falls into several classes (an outer IPv6
# address and the IPv4 address inside it, both halves of a Teredo address) the
# earliest one in this list is reported.
_PRECEDENCE = (
    AddressClass.GATEWAY_SELF,
    AddressClass.METADATA,
    AddressClass.LOOPBACK,
    AddressClass.UNSPECIFIED,
    AddressClass.LINK_LOCAL,
    AddressClass.PRIVATE,
    AddressClass.CGNAT,
    AddressClass.MULTICAST,
    AddressClass.RESERVED,
    AddressClass.PUBLIC,
)
_RANK = {klass: i for i, klass in enumerate(_PRECEDENCE)}


def _most_severe(classes: Iterable[AddressClass]) -> AddressClass:
    return min(classes, key=_RANK.__getitem__)


@dataclass(frozen=True)
class Classification:
    """The verdict on one address.

    ``address`` is the address as resolved (zone id stripped); ``effective`` is
    the IPv4 address embedded in it that decided the class (the address itself
    when nothing is embedded); ``embedding`` names the embedding ("" if none).
    """

    address: IPAddress
    effective: IPAddress
    klass: AddressClass
    embedding: str = ""

    @property
    def internal(self) -> bool:
        return self.klass in INTERNAL_CLASSES

    @functools.cached_property
    def text(self) -> str:
        """``str(address)``, computed once (it is on the per-request path)."""
        return str(self.address)


# ---------------------------------------------------------------------------
# Range tables. First match wins, so more specific ranges come first. Sources:
# the IANA IPv4/IPv6 Special-Purpose Address Registries (RFC 6890 and later),
# the IANA IPv6 Address Space registry, and Python's ipaddress is_private /
# is_reserved tables. Some IANA entries are marked "globally reachable" inside
# otherwise special blocks (192.0.0.9/32, 192.0.0.10/32 and a few 2001::/23
# sub-blocks such as 2001:3::/32 AMT, 2001:4:112::/48 AS112, 2001:20::/28
# ORCHIDv2): they are deliberately left in RESERVED here (fail closed; a policy
# rule naming the range can still allow them).
# ---------------------------------------------------------------------------

_v4 = ipaddress.IPv4Network
_v6 = ipaddress.IPv6Network

# Cloud metadata / platform credential endpoints. These are reported as
# METADATA whatever range they sit in.
_METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure IMDS, OpenStack, DigitalOcean, Oracle, ...
    "169.254.170.2",    # AWS ECS task metadata and credentials
    "169.254.170.23",   # AWS EKS Pod Identity agent (credentials)
    "fd00:ec2::254",    # AWS IMDS over IPv6 (Nitro)
    "fd00:ec2::23",     # AWS EKS Pod Identity agent over IPv6
    "100.100.100.200",  # Alibaba Cloud metadata
    "192.0.0.192",      # Oracle Cloud legacy metadata
    "168.63.129.16",    # Azure WireServer (platform endpoint; public-looking address)
))

_V4_TABLE: tuple[tuple[ipaddress.IPv4Network, AddressClass], ...] = (
    (_v4("0.0.0.0/8"), AddressClass.UNSPECIFIED),        # "this network" (RFC 791, RFC 1122)
    (_v4("10.0.0.0/8"), AddressClass.PRIVATE),           # RFC 1918
    (_v4("100.64.0.0/10"), AddressClass.CGNAT),          # shared address space (RFC 6598)
    (_v4("127.0.0.0/8"), AddressClass.LOOPBACK),         # RFC 1122
    (_v4("169.254.0.0/16"), AddressClass.LINK_LOCAL),    # RFC 3927
    (_v4("172.16.0.0/12"), AddressClass.PRIVATE),        # RFC 1918
    (_v4("192.0.0.0/24"), AddressClass.RESERVED),        # IETF protocol assignments (RFC 6890): DS-Lite
                                                         # 192.0.0.0/29, dummy .8, PCP/TURN anycast .9/.10,
                                                         # NAT64 discovery .170/31, ...
    (_v4("192.0.2.0/24"), AddressClass.RESERVED),        # TEST-NET-1 documentation (RFC 5737)
    (_v4("192.88.99.0/24"), AddressClass.RESERVED),      # deprecated 6to4 relay anycast (RFC 7526)
    (_v4("192.168.0.0/16"), AddressClass.PRIVATE),       # RFC 1918
    (_v4("198.18.0.0/15"), AddressClass.RESERVED),       # benchmarking (RFC 2544)
    (_v4("198.51.100.0/24"), AddressClass.RESERVED),     # TEST-NET-2 documentation (RFC 5737)
    (_v4("203.0.113.0/24"), AddressClass.RESERVED),      # TEST-NET-3 documentation (RFC 5737)
    (_v4("224.0.0.0/4"), AddressClass.MULTICAST),        # RFC 5771
    (_v4("255.255.255.255/32"), AddressClass.RESERVED),  # limited broadcast (RFC 919)
    (_v4("240.0.0.0/4"), AddressClass.RESERVED),         # reserved for future use (RFC 1112)
)

_V6_TABLE: tuple[tuple[ipaddress.IPv6Network, AddressClass], ...] = (
    (_v6("::/128"), AddressClass.UNSPECIFIED),           # RFC 4291
    (_v6("::1/128"), AddressClass.LOOPBACK),             # RFC 4291
    # Embeddings whose outer prefix is neutral: the embedded IPv4 decides.
    (_v6("::ffff:0:0/96"), AddressClass.PUBLIC),         # IPv4-mapped (RFC 4291)
    (_v6("64:ff9b::/96"), AddressClass.PUBLIC),          # NAT64 well-known prefix (RFC 6052)
    (_v6("2001::/32"), AddressClass.PUBLIC),             # Teredo (RFC 4380)
    (_v6("2002::/16"), AddressClass.PUBLIC),             # 6to4 (RFC 3056)
    # Embeddings that are internal in themselves; the embedded IPv4 can only
    # make them more severe.
    (_v6("::/96"), AddressClass.RESERVED),               # IPv4-compatible, deprecated (RFC 4291 2.5.5.1)
    (_v6("64:ff9b:1::/48"), AddressClass.RESERVED),      # local-use NAT64 (RFC 8215)
    # Other special-purpose ranges.
    (_v6("100::/64"), AddressClass.RESERVED),            # discard-only (RFC 6666)
    (_v6("2001::/23"), AddressClass.RESERVED),           # IETF protocol assignments (RFC 2928): benchmarking
                                                         # 2001:2::/48, ORCHID 2001:10::/28, ...
    (_v6("2001:db8::/32"), AddressClass.RESERVED),       # documentation (RFC 3849)
    (_v6("3fff::/20"), AddressClass.RESERVED),           # documentation (RFC 9637)
    (_v6("fc00::/7"), AddressClass.PRIVATE),             # unique local addresses (RFC 4193)
    (_v6("fe80::/10"), AddressClass.LINK_LOCAL),         # RFC 4291
    (_v6("fec0::/10"), AddressClass.RESERVED),           # site-local, deprecated (RFC 3879)
    (_v6("ff00::/8"), AddressClass.MULTICAST),           # RFC 4291
    (_v6("2000::/3"), AddressClass.PUBLIC),              # global unicast (IANA IPv6 address space)
    (_v6("::/0"), AddressClass.RESERVED),                # everything else is "Reserved by IETF": the rest
                                                         # of ::/8, 100::/8, 200::/7, 4000::/3 (incl. SRv6
                                                         # SIDs 5f00::/16, RFC 9602), ...
)


def _table_class(ip: IPAddress) -> AddressClass:
    if ip in _METADATA:
        return AddressClass.METADATA
    table = _V4_TABLE if ip.version == 4 else _V6_TABLE
    for network, klass in table:
        if ip in network:
            return klass
    return AddressClass.PUBLIC  # IPv4 not in any special range


# ---------------------------------------------------------------------------
# Embedded IPv4 addresses
# ---------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_V4_MAPPED = _v6("::ffff:0:0/96")
_V4_COMPATIBLE = _v6("::/96")
_NAT64_WELL_KNOWN = _v6("64:ff9b::/96")
_NAT64_LOCAL = _v6("64:ff9b:1::/48")
_TEREDO = _v6("2001::/32")
_SIX_TO_FOUR = _v6("2002::/16")


def _rfc6052_candidates(n: int) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an address in 64:ff9b:1::/48 may carry.

    RFC 8215 lets operators use any prefix inside the /48, so the RFC 6052
    layout (which bits hold the IPv4 address) is not known from the address
    alone. Candidates: the /64, /56 and /48 layouts when their u-octet (bits
    64-71) and suffix are zero as RFC 6052 section 2.2 requires, and the /96
    layout (last 32 bits) unless those are zero and another layout fits.
    classify() reports the most severe reading, because the sender picks the
    address and we do not know the translator's layout (an address in /48
    layout also reads as valid /56 and /64 layouts, with other IPv4 values).
    The /48 is RESERVED in any case, so this only sharpens the label (e.g.
    METADATA); it never makes an address public.
    """
    out = []
    if not (n >> 56) & 0xFF:
        for prefix_len in (64, 56, 48):
            hi_bits = 64 - prefix_len            # IPv4 bits before the u-octet
            lo_bits = 32 - hi_bits               # IPv4 bits after it, from bit 72
            suffix_bits = 56 - lo_bits
            if n & ((1 << suffix_bits) - 1):
                continue
            hi = (n >> 64) & ((1 << hi_bits) - 1)
            lo = (n >> suffix_bits) & ((1 << lo_bits) - 1)
            out.append(ipaddress.IPv4Address((hi << lo_bits) | lo))
    if n & _M32 or not out:
        out.insert(0, ipaddress.IPv4Address(n & _M32))
    return out


def _embedded_v4(ip: ipaddress.IPv6Address) -> tuple[str, list[ipaddress.IPv4Address]]:
    """(embedding name, IPv4 addresses the IPv6 address leads to)."""
    n = int(ip)
    if ip in _V4_MAPPED:
        return "ipv4_mapped", [ipaddress.IPv4Address(n & _M32)]
    if ip in _NAT64_WELL_KNOWN:
        return "nat64", [ipaddress.IPv4Address(n & _M32)]
    if ip in _NAT64_LOCAL:
        return "nat64", _rfc6052_candidates(n)
    if ip in _TEREDO:
        # Client (the peer actually reached) first, then the Teredo server.
        client = ipaddress.IPv4Address((n & _M32) ^ _M32)
        server = ipaddress.IPv4Address((n >> 64) & _M32)
        return "teredo", [client, server]
    if ip in _SIX_TO_FOUR:
        return "6to4", [ipaddress.IPv4Address((n >> 80) & _M32)]
    if ip in _V4_COMPATIBLE and n > 1:  # not :: or ::1
        return "ipv4_compatible", [ipaddress.IPv4Address(n)]
    return "", []


# ---------------------------------------------------------------------------
# classify
# ---------------------------------------------------------------------------


def _strip_zone(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        return ipaddress.IPv6Address(int(ip))
    return ip


def _to_address(addr: Union[str, IPAddress]) -> IPAddress:
    if isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return _strip_zone(addr)
    if isinstance(addr, str):
        ip = parse_ip_literal(addr)
        if ip is None:
            raise ValueError(f"{addr!r} is not an IP address")
        return ip
    raise TypeError(f"expected an IP address or a string, got {type(addr).__name__}")


def _self_set(self_addresses: Iterable[Union[str, IPAddress]]) -> frozenset[IPAddress]:
    out: set[IPAddress] = set()
    for a in self_addresses:
        ip = _to_address(a)
        out.add(ip)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            out.add(ip.ipv4_mapped)
    return frozenset(out)


def classify(addr: Union[str, IPAddress], *,
             self_addresses: Iterable[Union[str, IPAddress]] = ()) -> Classification:
    """Classify one address; the result class is the most severe of the
    address itself and every IPv4 address embedded in it.

    ``addr`` is an ipaddress object or a string in any spelling
    ``parse_ip_literal`` accepts (a host name is a ValueError). An address equal
    to one of ``self_addresses``, or embedding one, is GATEWAY_SELF.
    """
    ip = _to_address(addr)
    selves = _self_set(self_addresses)

    def one(a: IPAddress) -> AddressClass:
        return AddressClass.GATEWAY_SELF if a in selves else _table_class(a)

    klass = one(ip)
    effective: IPAddress = ip
    embedding = ""
    if isinstance(ip, ipaddress.IPv6Address):
        embedding, inner = _embedded_v4(ip)
        if inner:
            graded = [(one(v4), v4) for v4 in inner]
            inner_klass, effective = min(graded, key=lambda kv: _RANK[kv[0]])
            klass = _most_severe((klass, inner_klass))
    return Classification(address=ip, effective=effective, klass=klass, embedding=embedding)


def is_internal(addr: Union[str, IPAddress], *,
                self_addresses: Iterable[Union[str, IPAddress]] = ()) -> bool:
    return classify(addr, self_addresses=self_addresses).internal


# ---------------------------------------------------------------------------
# parse_ip_literal
# ---------------------------------------------------------------------------

# A label that makes a host "numeric" (the WHATWG URL "ends in a number" rule):
# decimal digits, or 0x/0X followed by hex digits (possibly none).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")
_DIGITS_AND_DOTS = re.compile(r"[0-9.]*[0-9][0-9.]*")
_RADIX_DIGITS = {10: frozenset("0123456789"), 8: frozenset("01234567"),
                 16: frozenset("0123456789abcdefABCDEF")}
_ZONE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%")
_UNICODE_DOTS = ("\u3002", "\uff0e", "\uff61")  # treated as "." by IDNA / UTS 46


def _parse_v4_part(part: str, text: str) -> int:
    """One dot-separated part, C style: 0x = hex, leading 0 = octal, else decimal."""
    if part[:2] in ("0x", "0X"):
        digits, radix, kind = part[2:], 16, "hex"
    elif len(part) > 1 and part[0] == "0":
        digits, radix, kind = part[1:], 8, "octal"
    else:
        digits, radix, kind = part, 10, "decimal"
    if not digits:
        raise ValueError(f"{text!r} looks like an IPv4 address but part {part!r} has no digits")
    if not set(digits) <= _RADIX_DIGITS[radix]:
        raise ValueError(f"{text!r} looks like an IPv4 address but part {part!r} is not a valid {kind} number")
    significant = digits.lstrip("0")
    if len(significant) > 11:  # longer than any 32-bit value in any radix; also keeps int() cheap
        raise ValueError(f"{text!r} looks like an IPv4 address but part {part!r} is out of range")
    return int(digits, radix)


def _parse_v4(text: str, host: str) -> ipaddress.IPv4Address:
    """inet_aton semantics: a.b.c.d, a.b.c (c is 16 bits), a.b (b is 24 bits), a (32 bits)."""
    parts = host.split(".")
    if len(parts) > 4:
        raise ValueError(f"{text!r} looks like an IPv4 address but has more than 4 parts")
    if "" in parts:
        raise ValueError(f"{text!r} looks like an IPv4 address but has an empty part")
    values = [_parse_v4_part(p, text) for p in parts]
    value = 0
    for v in values[:-1]:
        if v > 0xFF:
            raise ValueError(f"{text!r} looks like an IPv4 address but part {v} is out of range (0-255)")
        value = (value << 8) | v
    last_bits = 8 * (5 - len(values))
    if values[-1] >> last_bits:
        raise ValueError(f"{text!r} looks like an IPv4 address but its last part {values[-1]} "
                         f"is out of range (0-{(1 << last_bits) - 1})")
    return ipaddress.IPv4Address((value << last_bits) | values[-1])


def _parse_v6(text: str, body: str) -> ipaddress.IPv6Address:
    address, sep, zone = body.partition("%")
    if sep and (not zone or not set(zone) <= _ZONE_CHARS):
        raise ValueError(f"{text!r} has an invalid IPv6 zone id")
    try:
        return ipaddress.IPv6Address(address)
    except ipaddress.AddressValueError as e:
        raise ValueError(f"{text!r} is not a valid IPv6 address: {e}") from None


def _is_numeric_shaped(host: str) -> bool:
    """WHATWG "ends in a number": the last label (after one trailing dot is
    dropped) is numeric. Also, stricter, anything made of digits and dots only
    (``1..2``, ``1.2.3.4..``)."""
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    return bool(_NUMERIC_LABEL.fullmatch(labels[-1]) or _DIGITS_AND_DOTS.fullmatch(host))


def parse_ip_literal(text: str) -> IPAddress | None:
    """The IP address ``text`` spells, or None when it is a host name.

    Accepts every spelling inet_aton, curl and browsers accept: decimal, hex
    and octal integers, short forms (``127.1``), per-part radix
    (``0x7f.0.0.01``), one trailing dot, ``[IPv6]`` in brackets, IPv6 zone ids
    (``fe80::1%eth0``, ``[fe80::1%25eth0]``, stripped), and full-width Unicode
    digits and dots (folded as IDNA does).

    Raises ValueError when ``text`` is shaped like an IP literal but is not a
    valid one. Following the WHATWG URL standard, a host whose last label is
    numeric (decimal digits, or 0x hex) is an IPv4 address or nothing:
    ``foo.0x7f`` and ``1.2.3.4.5`` are errors, not host names to look up (fail
    closed). Also errors: brackets around something that is not IPv6, a ``:``
    outside an IPv6 address, ``%`` outside a zone id (percent-encoded hosts
    must be decoded first), whitespace and control characters.
    """
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError(f"{text!r} contains whitespace or control characters")
    if not text.isascii():
        folded = unicodedata.normalize("NFKC", text)
        for dot in _UNICODE_DOTS:
            folded = folded.replace(dot, ".")
        if folded.isascii() and (":" in folded or "[" in folded or _is_numeric_shaped(folded)):
            return parse_ip_literal(folded)
        return None  # an internationalised host name
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"{text!r} has an unbalanced '['")
        return _parse_v6(text, text[1:-1])
    if ":" in text:
        return _parse_v6(text, text)
    if "%" in text:
        raise ValueError(f"{text!r}: '%' is not allowed in a host name (decode percent-encoding first)")
    if not text or not _is_numeric_shaped(text):
        return None
    host = text[:-1] if text.endswith(".") and len(text) > 1 else text
    return _parse_v4(text, host)
