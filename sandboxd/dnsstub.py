"""A stub DNS answerer for sandboxes (until the gateway has its own).

Every A query is answered with ONE fixed address (the gateway's, as the sandbox
sees it), so names resolve only to the gateway and the gateway decides by
SNI/Host; AAAA queries get an empty NOERROR answer (no IPv6 in sandboxes; an
empty answer keeps dual-stack resolvers from failing the A result); everything
else, and any name longer than ``max_name_len`` characters or with a label
over 63, is REFUSED. Nothing is ever forwarded: a query (and whatever data a
tunnelling client encodes in it) stops here. Queries seen are kept in a bounded
deque (``seen``) for tests and debugging.

Runs UDP and TCP (RFC 7766 length-prefixed) on one address:port in a daemon
thread; ``start()`` / ``stop()``; ``answer(bytes)`` is the pure core.
"""

from __future__ import annotations

import collections
import ipaddress
import socket
import struct
import threading

QTYPE_A, QTYPE_AAAA = 1, 28
RCODE_FORMERR, RCODE_REFUSED = 1, 5
MAX_QUERY = 512


def _parse_question(msg: bytes) -> tuple[int, int, str, int, int, int] | None:
    """(id, flags, name, qtype, qclass, end offset) of the single question, or None."""
    if len(msg) < 12:
        return None
    qid, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", msg[:12])
    if flags & 0x8000 or qd != 1:
        return None
    labels, i = [], 12
    while True:
        if i >= len(msg):
            return None
        n = msg[i]
        i += 1
        if n == 0:
            break
        if n & 0xC0 or n > 63 or i + n > len(msg):
            return None  # no compression in a question; label too long
        labels.append(msg[i:i + n])
        i += n
    if i + 4 > len(msg):
        return None
    qtype, qclass = struct.unpack("!HH", msg[i:i + 4])
    try:
        name = b".".join(labels).decode("ascii")
    except UnicodeDecodeError:
        name = b".".join(labels).decode("latin-1")
    return qid, flags, name, qtype, qclass, i + 4


def answer(query: bytes, address: str, *, max_name_len: int = 100, ttl: int = 60,
           seen: collections.deque | None = None) -> bytes | None:
    """The response to one DNS query (None: not worth answering)."""
    q = _parse_question(query)
    if q is None:
        if len(query) >= 12:
            qid = struct.unpack("!H", query[:2])[0]
            return struct.pack("!HHHHHH", qid, 0x8000 | RCODE_FORMERR, 0, 0, 0, 0)
        return None
    qid, flags, name, qtype, qclass, end = q
    if seen is not None:
        seen.append((name[:max_name_len + 1], qtype))
    opcode = (flags >> 11) & 0xF
    rd = flags & 0x0100
    question = query[12:end]
    base = 0x8000 | 0x0400 | rd | 0x0080  # QR, AA, RD copied, RA
    if opcode != 0 or qclass != 1 or len(name) > max_name_len:
        return struct.pack("!HHHHHH", qid, 0x8000 | rd | RCODE_REFUSED, 1, 0, 0, 0) + question
    if qtype == QTYPE_A:
        rr = b"\xc0\x0c" + struct.pack("!HHIH", QTYPE_A, 1, ttl, 4) + ipaddress.IPv4Address(address).packed
        return struct.pack("!HHHHHH", qid, base, 1, 1, 0, 0) + question + rr
    if qtype == QTYPE_AAAA:
        return struct.pack("!HHHHHH", qid, base, 1, 0, 0, 0) + question
    return struct.pack("!HHHHHH", qid, 0x8000 | rd | RCODE_REFUSED, 1, 0, 0, 0) + question


class DnsStub:
    def __init__(self, host: str, port: int, address: str, *, max_name_len: int = 100, ttl: int = 60,
                 keep: int = 256):
        ipaddress.IPv4Address(address)
        self.host, self.port, self.address = host, port, address
        self.max_name_len, self.ttl = max_name_len, ttl
        self.seen: collections.deque = collections.deque(maxlen=keep)
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _answer(self, q: bytes) -> bytes | None:
        return answer(q, self.address, max_name_len=self.max_name_len, ttl=self.ttl, seen=self.seen)

    def start(self) -> "DnsStub":
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            udp.bind((self.host, self.port))
            self.port = udp.getsockname()[1]
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((self.host, self.port))
            tcp.listen(16)
        except OSError:
            udp.close()
            tcp.close()
            raise
        udp.settimeout(0.2)
        tcp.settimeout(0.2)
        self._udp, self._tcp = udp, tcp
        for target in (self._udp_loop, self._tcp_loop):
            t = threading.Thread(target=target, daemon=True, name=f"dnsstub-{self.host}")
            t.start()
            self._threads.append(t)
        return self

    def _udp_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._udp.recvfrom(MAX_QUERY)
            except (TimeoutError, OSError):
                continue
            resp = self._answer(data)
            if resp is not None:
                try:
                    self._udp.sendto(resp, peer)
                except OSError:
                    pass

    def _tcp_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except (TimeoutError, OSError):
                continue
            with conn:  # one query per connection, 2 s to send it: bounded work
                conn.settimeout(2)
                try:
                    hdr = _recv_exact(conn, 2)
                    n = struct.unpack("!H", hdr)[0]
                    if n > MAX_QUERY:
                        continue
                    resp = self._answer(_recv_exact(conn, n))
                    if resp is not None:
                        conn.sendall(struct.pack("!H", len(resp)) + resp)
                except (OSError, ConnectionError):
                    continue

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()

    def __enter__(self) -> "DnsStub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def build_query(name: str, qtype: int = QTYPE_A, qid: int = 0x1234) -> bytes:
    """A standard recursive query (for clients and tests)."""
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".") if p) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)
