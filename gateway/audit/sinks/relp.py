"""RELP sink: RFC 5424 messages over the Reliable Event Logging Protocol
(rsyslog's imrelp), where the receiver acknowledges every message.

Plain TCP syslog has no acknowledgement: bytes the kernel accepted can still be
lost when the receiver stops before reading them. RELP closes that window: a
batch is acknowledged to the spool only after the receiver answered ``200 OK``
for every message in it, so with RELP delivery is at-least-once end to end
(a resend after a lost answer is de-duplicated by the event id).

Protocol (https://www.rsyslog.com/doc/relp.html): frames are
``TXNR SP COMMAND SP DATALEN [SP DATA] LF``; the client opens a session
(``open`` with ``relp_version=0``, ``commands=syslog``), sends ``syslog``
frames (pipelined up to ``window`` unanswered, default 1024), each answered by ``rsp`` with
the same TXNR and ``200 OK``; ``close`` ends it. TLS (``tls: true``) wraps the
TCP connection, as imrelp's ``tls="on"`` expects.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from typing import Callable

from gateway.audit.sinks.base import DeliveryError, Event, Sink
from gateway.audit.sinks.syslog import (
    DEFAULT_APP_NAME, DEFAULT_FACILITY, build_message, facility_code, parse_address,
)

OFFERS = b"relp_version=0\nrelp_software=egress-gateway\ncommands=syslog"
MAX_TXNR = 999_999_999
COALESCE = 0.003  # seconds to wait for answers after sending a burst


class RelpError(Exception):
    pass


def encode_frame(txnr: int, command: bytes, data: bytes = b"") -> bytes:
    if data:
        return b"%d %s %d %s\n" % (txnr, command, len(data), data)
    return b"%d %s 0\n" % (txnr, command)


_HEADER = re.compile(rb"(\d{1,9}) ([a-z]{1,32}) (\d{1,9})([ \n])")


class FrameReader:
    """Parses RELP frames from a byte stream: ``feed`` bytes, get the complete frames."""

    def __init__(self):
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes, bytes]]:
        buf = self.buf + data if self.buf else data
        out = []
        i, n = 0, len(buf)
        match = _HEADER.match
        while i < n:
            m = match(buf, i)
            if m is None:
                if n - i > 64 or (n - i and not buf[i:i + 1].isdigit()):
                    raise RelpError(f"bad RELP frame header {buf[i:i + 40]!r}")
                break  # an incomplete header
            length = int(m.group(3))
            if length == 0:
                if m.group(4) != b"\n":
                    raise RelpError("bad RELP frame: no trailer")
                out.append((int(m.group(1)), m.group(2), b""))
                i = m.end()
                continue
            if m.group(4) != b" ":
                raise RelpError("bad RELP frame: no space before data")
            start = m.end()
            end = start + length
            if end + 1 > n:
                break  # the data is not all here yet
            if buf[end:end + 1] != b"\n":
                raise RelpError("bad RELP frame: no trailer")
            out.append((int(m.group(1)), m.group(2), buf[start:end]))
            i = end + 1
        self.buf = buf[i:]
        return out


class RelpSink(Sink):
    kind = "relp"

    def __init__(self, name: str, fmt: str = "json", *, address: str, tls: bool = False, ca: str | None = None,
                 cert: str | None = None, key: str | None = None, server_name: str | None = None,
                 hostname: str | None = None, app_name: str = DEFAULT_APP_NAME, facility=DEFAULT_FACILITY,
                 timeout: float = 10.0, window: int = 1024):
        super().__init__(name, fmt)
        self.host, self.port = parse_address(address)
        self.tls, self.ca, self.cert, self.key = tls, ca, cert, key
        self.server_name = server_name or self.host
        self.hostname = hostname or socket.gethostname() or "-"
        self.app_name = app_name
        self.facility = facility_code(facility)
        self.timeout = timeout
        self.window = max(1, window)
        self._sock: socket.socket | None = None
        self._reader = FrameReader()
        self._txnr = 0
        import os
        self.procid = str(os.getpid())

    @classmethod
    def from_config(cls, name: str, fmt: str, options: dict, resolve: Callable[[str], str] | None = None
                    ) -> "RelpSink":
        known = {"address", "tls", "ca", "cert", "key", "server_name", "hostname", "app_name", "facility",
                 "timeout", "window"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"audit.sinks.{name}: unknown option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        if "address" not in options:
            raise ValueError(f"audit.sinks.{name}: address (HOST:PORT of the RELP receiver) is required")
        if "tls" in options and not isinstance(options["tls"], bool):
            raise ValueError(f"audit.sinks.{name}: tls must be true or false")
        try:
            return cls(name, fmt, **options)
        except (ValueError, TypeError) as e:
            raise ValueError(f"audit.sinks.{name}: {e}") from None

    def describe(self) -> str:
        return f"relp{'+tls' if self.tls else ''}://{self.host}:{self.port}"

    # -- session ----------------------------------------------------------------------

    def _next(self) -> int:
        self._txnr = self._txnr + 1 if self._txnr < MAX_TXNR else 1
        return self._txnr

    def _recv_frames(self, sock) -> list[tuple[int, bytes, bytes]]:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the receiver closed the connection")
        return self._reader.feed(data)

    def _open(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            if self.tls:
                ctx = ssl.create_default_context(cafile=self.ca)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                if self.cert:
                    ctx.load_cert_chain(self.cert, self.key)
                sock = ctx.wrap_socket(sock, server_hostname=self.server_name)
            self._txnr = 0
            self._reader = FrameReader()
            t = self._next()
            sock.sendall(encode_frame(t, b"open", OFFERS))
            while True:
                for txnr, cmd, data in self._recv_frames(sock):
                    if cmd == b"serverclose":
                        raise ConnectionError("the receiver refused the session")
                    if txnr == t and cmd == b"rsp":
                        if not data.startswith(b"200"):
                            raise RelpError(f"session refused: {data[:80].decode('utf-8', 'replace')}")
                        return sock
        except BaseException:
            sock.close()
            raise

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        sock = self._sock
        if sock is not None:
            try:
                sock.sendall(encode_frame(self._next(), b"close"))
            except OSError:
                pass
        self._drop()

    # -- delivery -----------------------------------------------------------------------

    def send(self, batch: list[Event]) -> None:
        msgs = [build_message(ev, self.fmt, facility=self.facility, hostname=self.hostname,
                              app_name=self.app_name, procid=self.procid) for ev in batch]
        try:
            if self._sock is None:
                self._sock = self._open()
            self._deliver(self._sock, msgs)
        except (OSError, RelpError, ConnectionError) as e:
            self._drop()
            raise DeliveryError(f"relp {self.host}:{self.port}: {_why(e)}") from None

    def _deliver(self, sock, msgs: list[bytes]) -> None:
        pending: dict[int, int] = {}  # txnr -> index
        refused: list[int] = []
        why = ""
        i = 0
        while i < len(msgs) or pending:
            out = []
            if len(pending) <= self.window // 2:  # refill in bursts, not one frame per answer
                while i < len(msgs) and len(pending) < self.window:
                    t = self._next()
                    pending[t] = i
                    out.append(encode_frame(t, b"syslog", msgs[i]))
                    i += 1
            if out:
                sock.sendall(b"".join(out))
                # Let the answers (one per message) pile up: one wake-up and one recv for
                # many of them instead of one each (the shipper's CPU, on a shared machine).
                time.sleep(COALESCE)
            for txnr, cmd, data in self._recv_frames(sock):
                if cmd == b"serverclose":
                    raise ConnectionError("the receiver is closing the session")
                if cmd != b"rsp" or txnr not in pending:
                    continue
                idx = pending.pop(txnr)
                if not data.startswith(b"200"):
                    refused.append(idx)
                    why = data[:80].decode("utf-8", "replace")
        if refused:  # the receiver answered, and said no: resending would not help
            raise DeliveryError(f"relp {self.host}:{self.port} refused {len(refused)} message(s): {why}",
                                retryable=False, rejected=sorted(refused))


def _why(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    return str(e) or type(e).__name__
