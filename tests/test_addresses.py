"""Tests for gateway.addresses: IP literal parsing and SSRF classification."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.addresses import (
    INTERNAL_CLASSES,
    AddressClass,
    Classification,
    classify,
    is_internal,
    parse_ip_literal,
)

M32 = 0xFFFFFFFF
C = AddressClass

# The precedence the spec prescribes, most severe first (kept independent of
# the module's own table on purpose).
PRECEDENCE = [C.GATEWAY_SELF, C.METADATA, C.LOOPBACK, C.UNSPECIFIED, C.LINK_LOCAL,
              C.PRIVATE, C.CGNAT, C.MULTICAST, C.RESERVED, C.PUBLIC]


def most_severe(*classes: AddressClass) -> AddressClass:
    return min(classes, key=PRECEDENCE.index)


def teredo(server: int, client: int, flags: int = 0x8000, port: int = 40000) -> IPv6Address:
    return IPv6Address((0x20010000 << 96) | (server << 64) | (flags << 48)
                       | ((port ^ 0xFFFF) << 32) | (client ^ M32))


# ---------------------------------------------------------------------------
# classify: tables
# ---------------------------------------------------------------------------

CLASS_TABLE = [
    # public
    ("8.8.8.8", C.PUBLIC),
    ("1.1.1.1", C.PUBLIC),
    ("2606:4700::1111", C.PUBLIC),
    ("2001:4860:4860::8888", C.PUBLIC),
    ("192.31.196.1", C.PUBLIC),          # AS112, globally reachable
    ("100.63.255.255", C.PUBLIC),        # just below CGNAT
    ("100.128.0.0", C.PUBLIC),           # just above CGNAT
    ("172.32.0.1", C.PUBLIC),            # just above 172.16/12
    # metadata
    ("169.254.169.254", C.METADATA),
    ("169.254.170.2", C.METADATA),
    ("169.254.170.23", C.METADATA),
    ("fd00:ec2::254", C.METADATA),
    ("fd00:ec2::23", C.METADATA),
    ("100.100.100.200", C.METADATA),
    ("192.0.0.192", C.METADATA),
    ("168.63.129.16", C.METADATA),
    # loopback
    ("127.0.0.1", C.LOOPBACK),
    ("127.255.255.254", C.LOOPBACK),
    ("::1", C.LOOPBACK),
    # unspecified
    ("0.0.0.0", C.UNSPECIFIED),
    ("0.1.2.3", C.UNSPECIFIED),
    ("::", C.UNSPECIFIED),
    # link-local
    ("169.254.0.1", C.LINK_LOCAL),
    ("169.254.169.253", C.LINK_LOCAL),
    ("fe80::1", C.LINK_LOCAL),
    ("febf:ffff::1", C.LINK_LOCAL),
    # private
    ("10.0.0.1", C.PRIVATE),
    ("172.16.0.1", C.PRIVATE),
    ("172.31.255.255", C.PRIVATE),
    ("192.168.1.1", C.PRIVATE),
    ("fc00::1", C.PRIVATE),
    ("fd12:3456::1", C.PRIVATE),
    # CGNAT
    ("100.64.0.1", C.CGNAT),
    ("100.127.255.255", C.CGNAT),
    # multicast
    ("224.0.0.1", C.MULTICAST),
    ("239.255.255.250", C.MULTICAST),
    ("ff02::1", C.MULTICAST),
    ("ff0e::fb", C.MULTICAST),
    # reserved
    ("192.0.0.1", C.RESERVED),
    ("192.0.0.9", C.RESERVED),
    ("192.0.0.171", C.RESERVED),
    ("192.0.2.1", C.RESERVED),
    ("192.88.99.1", C.RESERVED),
    ("198.18.0.1", C.RESERVED),
    ("198.19.255.255", C.RESERVED),
    ("198.51.100.7", C.RESERVED),
    ("203.0.113.9", C.RESERVED),
    ("240.0.0.1", C.RESERVED),
    ("255.255.255.255", C.RESERVED),
    ("2001:db8::1", C.RESERVED),
    ("3fff::1", C.RESERVED),
    ("100::1", C.RESERVED),
    ("2001:2::1", C.RESERVED),           # benchmarking, inside 2001::/23
    ("2001:10::1", C.RESERVED),          # ORCHID
    ("fec0::1", C.RESERVED),             # site-local
    ("5f00::1", C.RESERVED),             # SRv6 SIDs
    ("4000::1", C.RESERVED),             # outside 2000::/3
    ("::ffff:0:7f00:1", C.RESERVED),     # SIIT "IPv4-translated", inside ::/8
    ("64:ff9b:1::808:808", C.RESERVED),  # local-use NAT64: internal even with a public IPv4
]


@pytest.mark.parametrize("text,klass", CLASS_TABLE)
def test_class_table(text, klass):
    c = classify(text)
    assert c.klass is klass
    assert c.internal is (klass is not C.PUBLIC)
    assert c.address == ip_address(text)
    assert classify(ip_address(text)) == c


EMBEDDING_TABLE = [
    # (address, class, embedding, effective)
    ("::ffff:169.254.169.254", C.METADATA, "ipv4_mapped", "169.254.169.254"),
    ("::ffff:127.0.0.1", C.LOOPBACK, "ipv4_mapped", "127.0.0.1"),
    ("::ffff:10.1.2.3", C.PRIVATE, "ipv4_mapped", "10.1.2.3"),
    ("::ffff:8.8.8.8", C.PUBLIC, "ipv4_mapped", "8.8.8.8"),
    ("::127.0.0.1", C.LOOPBACK, "ipv4_compatible", "127.0.0.1"),
    ("::169.254.169.254", C.METADATA, "ipv4_compatible", "169.254.169.254"),
    ("::8.8.8.8", C.RESERVED, "ipv4_compatible", "8.8.8.8"),  # deprecated: never public
    ("::2", C.UNSPECIFIED, "ipv4_compatible", "0.0.0.2"),
    ("2002:7f00:1::", C.LOOPBACK, "6to4", "127.0.0.1"),
    ("2002:a9fe:a9fe:1234::5", C.METADATA, "6to4", "169.254.169.254"),
    ("2002:c0a8:101::1", C.PRIVATE, "6to4", "192.168.1.1"),
    ("2002:808:808::1", C.PUBLIC, "6to4", "8.8.8.8"),
    ("64:ff9b::a9fe:a9fe", C.METADATA, "nat64", "169.254.169.254"),
    ("64:ff9b::127.0.0.1", C.LOOPBACK, "nat64", "127.0.0.1"),
    ("64:ff9b::8.8.8.8", C.PUBLIC, "nat64", "8.8.8.8"),
    ("64:ff9b:1::a9fe:a9fe", C.METADATA, "nat64", "169.254.169.254"),     # /96 layout
    ("64:ff9b:1:a9fe:a9:fe00::", C.METADATA, "nat64", "169.254.169.254"),  # /48 layout (RFC 6052)
    ("64:ff9b:1:7f:0:1::", C.LOOPBACK, "nat64", "127.0.0.1"),             # /56 layout
    ("64:ff9b:1:0:7f:0:100:0", C.LOOPBACK, "nat64", "127.0.0.1"),         # /64 layout
    (str(teredo(0x4136E378, int(IPv4Address("127.0.0.1")))), C.LOOPBACK, "teredo", "127.0.0.1"),
    (str(teredo(0x4136E378, int(IPv4Address("169.254.169.254")))), C.METADATA, "teredo", "169.254.169.254"),
    (str(teredo(int(IPv4Address("10.0.0.1")), 0x08080808)), C.PRIVATE, "teredo", "10.0.0.1"),
    (str(teredo(0x4136E378, 0x08080808)), C.PUBLIC, "teredo", "8.8.8.8"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", C.RESERVED, "teredo", "192.0.2.45"),  # RFC 4380 example
]


@pytest.mark.parametrize("text,klass,embedding,effective", EMBEDDING_TABLE)
def test_embeddings(text, klass, embedding, effective):
    c = classify(text)
    assert (c.klass, c.embedding, c.effective) == (klass, embedding, IPv4Address(effective))
    assert c.address == IPv6Address(text)


def test_local_nat64_ambiguous_layout_takes_most_severe_reading():
    # 10.0.0.1 in the /48 layout reads as 0.1.0.0 in the /64 layout and as
    # 0.0.1.0 in the /56 layout; the most severe reading wins.
    c = classify("64:ff9b:1:a00:0:100::")
    assert c.embedding == "nat64" and c.internal
    assert c.klass is most_severe(C.PRIVATE, C.UNSPECIFIED) is C.UNSPECIFIED
    # Anything in 64:ff9b:1::/48 is internal, whatever it embeds.
    assert classify("64:ff9b:1::808:808").klass is C.RESERVED
    assert classify("64:ff9b:1::").internal


def test_teredo_matches_ipaddress():
    a = teredo(0x4136E378, 0x7F000001)
    assert a.teredo == (IPv4Address("65.54.227.120"), IPv4Address("127.0.0.1"))
    assert classify(a).klass is C.LOOPBACK


def test_zone_id_is_stripped():
    for value in ("fe80::1%eth0", IPv6Address("fe80::1%eth0"), "[fe80::1%25eth0]"):
        c = classify(value)
        assert c.address == IPv6Address("fe80::1") and c.address.scope_id is None
        assert c.klass is C.LINK_LOCAL


def test_classify_accepts_odd_spellings_and_rejects_names():
    assert classify("0x7f000001").klass is C.LOOPBACK
    assert classify("2852039166").klass is C.METADATA  # 169.254.169.254
    assert classify("0251.0376.0251.0376").klass is C.METADATA
    with pytest.raises(ValueError):
        classify("example.com")


def test_gateway_self():
    selves = ["10.0.0.5", IPv6Address("2001:db8:1::5"), "8.8.4.4"]
    assert classify("10.0.0.5", self_addresses=selves).klass is C.GATEWAY_SELF
    assert classify("10.0.0.6", self_addresses=selves).klass is C.PRIVATE
    assert classify("2001:db8:1::5", self_addresses=selves).klass is C.GATEWAY_SELF
    assert classify("8.8.4.4", self_addresses=selves).klass is C.GATEWAY_SELF  # public but ours
    assert classify("8.8.4.4").klass is C.PUBLIC
    # Embeddings of a self address are the gateway too.
    for emb in ("::ffff:10.0.0.5", "64:ff9b::10.0.0.5", "2002:a00:5::1", "::ffff:8.8.4.4",
                str(teredo(0x4136E378, int(IPv4Address("8.8.4.4"))))):
        c = classify(emb, self_addresses=selves)
        assert c.klass is C.GATEWAY_SELF, emb
    # A mapped self address matches the plain IPv4 address.
    assert classify("192.168.9.9", self_addresses=["::ffff:192.168.9.9"]).klass is C.GATEWAY_SELF
    # Outranks metadata.
    assert classify("169.254.169.254", self_addresses=["169.254.169.254"]).klass is C.GATEWAY_SELF
    assert is_internal("8.8.4.4", self_addresses=selves)
    assert not is_internal("8.8.4.4")


def test_internal_classes():
    assert INTERNAL_CLASSES == frozenset(AddressClass) - {C.PUBLIC}
    assert {k.value for k in AddressClass} == {
        "public", "loopback", "private", "link_local", "metadata", "cgnat",
        "multicast", "unspecified", "reserved", "gateway_self"}
    c = classify("10.0.0.1")
    assert isinstance(c, Classification) and c.internal and c.klass.value == "private"
    with pytest.raises(Exception):
        c.klass = C.PUBLIC  # frozen


# ---------------------------------------------------------------------------
# parse_ip_literal: tables
# ---------------------------------------------------------------------------

LITERALS = [
    ("127.0.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0X7F000001", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("10.1", "10.0.0.1"),
    ("10.0x10203", "10.1.2.3"),
    ("0x7f.0.0.1", "127.0.0.1"),
    ("0x7F.0X0.0.0x1", "127.0.0.1"),
    ("0177.0.0.01", "127.0.0.1"),
    ("0000177.0.0.1", "127.0.0.1"),
    ("0x000000007f.1", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),
    ("0x7f000001.", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("4294967295", "255.255.255.255"),
    ("0xa9fea9fe", "169.254.169.254"),
    ("[::1]", "::1"),
    ("::1", "::1"),
    ("[fe80::1%25eth0]", "fe80::1"),
    ("fe80::1%eth0", "fe80::1"),
    ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
    ("[::FFFF:7F00:1]", "::ffff:127.0.0.1"),
    ("\uff11\uff12\uff17\u3002\uff10\u3002\uff10\u3002\uff11", "127.0.0.1"),  # full-width
]


@pytest.mark.parametrize("text,expected", LITERALS)
def test_literals(text, expected):
    assert parse_ip_literal(text) == ip_address(expected)


HOSTNAMES = [
    "example", "example.com", "1.2.3.example.com", "0xg.com", "0x7f.0.0.1.example",
    "localhost", "0xg", "deadbeef", "1e3", "0b101", "a.1b", "xn--bcher-kva.example", "bücher.example",
    "", ".",
]


@pytest.mark.parametrize("text", HOSTNAMES)
def test_hostnames_are_not_literals(text):
    assert parse_ip_literal(text) is None


INVALID = [
    "256.0.0.1", "1.2.3.256", "127.0.0.1.1", "1.2.3.4.5", "4294967296", "0x100000000",
    "040000000000", "1.16777216", "1.2.65536", "08", "0x", "0x.1", "09.1.1.1",
    "1..2", "1.2.3.4..", ".1.2.3", "foo.0x7f", "example.123", "example.0x", "[127.0.0.1]",
    "[::1", "[example.com]", "::g", "1:2", "example.com:443", "fe80::1%", "[fe80::1%eth0/x]",
    "%31%32%37.0.0.1", "127.0.0.1 ", " 127.0.0.1", "127.0.0.1\n", "1" * 5000,
]


@pytest.mark.parametrize("text", INVALID)
def test_invalid_literals_raise(text):
    with pytest.raises(ValueError):
        parse_ip_literal(text)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

u32 = st.integers(0, M32)


@st.composite
def radix_spelling(draw, value: int) -> str:
    radix = draw(st.sampled_from(["dec", "hex", "oct"]))
    zeros = "0" * draw(st.integers(0, 3))
    if radix == "dec":
        return str(value)
    if radix == "hex":
        digits = format(value, draw(st.sampled_from(["x", "X"])))
        return draw(st.sampled_from(["0x", "0X"])) + zeros + digits
    return "0" + zeros + format(value, "o")


@st.composite
def dotted_spelling(draw) -> tuple[int, str]:
    n = draw(u32)
    k = draw(st.integers(1, 4))
    last_bits = 8 * (5 - k)
    values = [(n >> (last_bits + 8 * (k - 2 - i))) & 0xFF for i in range(k - 1)]
    values.append(n & ((1 << last_bits) - 1))
    text = ".".join(draw(radix_spelling(v)) for v in values)
    if draw(st.booleans()):
        text += "."
    return n, text


@settings(deadline=None)
@given(u32)
def test_integer_spellings(n):
    expected = IPv4Address(n)
    for text in (str(n), hex(n), hex(n).upper(), "0" + format(n, "o"), str(IPv4Address(n))):
        assert parse_ip_literal(text) == expected, text


@settings(deadline=None)
@given(dotted_spelling())
def test_dotted_spellings(case):
    n, text = case
    assert parse_ip_literal(text) == IPv4Address(n)


aton_token = st.one_of(
    st.from_regex(r"0[xX][0-9a-fA-F]{0,10}", fullmatch=True),
    st.from_regex(r"0[0-9]{0,12}", fullmatch=True),
    st.integers(0, 2**34).map(str),
    st.text("0123456789xXabcdef", max_size=6),
)
aton_candidate = st.one_of(
    st.lists(aton_token, min_size=1, max_size=6).map(".".join),
    st.text("0123456789.xX", max_size=20),
).flatmap(lambda s: st.sampled_from([s, s + "."]))


@settings(deadline=None, max_examples=500)
@given(aton_candidate)
@example("127.1")
@example("0x")
@example("0x.1")
@example("08")
@example("0x0000000000000000000001")
def test_agrees_with_inet_aton(text):
    try:
        expected = IPv4Address(socket.inet_aton(text))
    except OSError:
        expected = None
    try:
        got = parse_ip_literal(text)
    except ValueError:
        got = "error"
    if expected is not None:
        assert got == expected
    if isinstance(got, (IPv4Address, IPv6Address)) and not text.endswith("."):
        assert got == expected


@settings(deadline=None)
@given(u32, st.integers(0, 2**80 - 1), st.sampled_from([(), ("self",)]))
def test_embedded_v4_classifies_like_v4(n, low, with_self):
    v4 = IPv4Address(n)
    selves = [v4] if with_self else []
    plain = classify(v4, self_addresses=selves)
    if with_self:
        assert plain.klass is C.GATEWAY_SELF
    for ip, embedding in (
        ((0xFFFF << 32) | n, "ipv4_mapped"),
        ((0x64FF9B << 96) | n, "nat64"),
        ((0x2002 << 112) | (n << 80) | low, "6to4"),
    ):
        c = classify(IPv6Address(ip), self_addresses=selves)
        assert (c.klass, c.embedding, c.effective) == (plain.klass, embedding, v4)


@settings(deadline=None)
@given(u32, u32, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_teredo_is_most_severe_of_server_and_client(server, client, flags, port):
    addr = teredo(server, client, flags, port)
    assert addr.teredo == (IPv4Address(server), IPv4Address(client))
    c = classify(addr)
    assert c.embedding == "teredo"
    assert c.klass is most_severe(classify(IPv4Address(server)).klass,
                                  classify(IPv4Address(client)).klass)
    assert classify(c.effective).klass is c.klass


INTERESTING = [ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
    "::/96", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23",
    "2001::/32", "2002::/16", "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    "::/8", "2000::/3",
)]
any_address = st.one_of(
    st.ip_addresses(),
    st.sampled_from(INTERESTING).flatmap(lambda net: st.ip_addresses(network=net)),
)


@settings(deadline=None, max_examples=300)
@given(any_address)
def test_classify_never_raises_and_internal_iff_not_public(ip):
    c = classify(ip)
    assert c.klass in AddressClass
    assert c.internal is (c.klass is not C.PUBLIC)
    assert classify(str(ip)) == c
    assert parse_ip_literal(str(ip)) == ip
    if ip.version == 6:
        assert parse_ip_literal(f"[{ip}]") == ip
    # Never laxer than Python's notion of "globally reachable" (embeddings
    # aside: there the embedded IPv4 address decides).
    if not c.embedding and c.klass is C.PUBLIC:
        assert ip.is_global, ip
