"""Syslog sink: RFC 5424 messages over UDP, TCP or TLS.

Each event becomes one RFC 5424 message::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [egress@32473 id="..." seq="..."] MSG

* PRI = facility * 8 + severity; severity is warning (4) for decisions that
  denied, informational (6) for everything else; facility defaults to local0.
* TIMESTAMP is the event's ``ts`` (RFC 3339, UTC), NILVALUE if it has none.
* MSGID is the event's type (``event``: ``decision``, ...), reduced to
  printable US-ASCII, at most 32 characters.
* The structured-data element carries the event id (the receivers'
  de-duplication key) and its position in the hash chain, escaped per RFC 5424
  section 6.3.3.
* MSG is the event rendered in the sink's format (json: the spool line itself,
  so the hash chain can be verified on the receiving side). No BOM is added.

Transports
----------
``udp``
    one message per datagram. A message larger than ``max_message_bytes``
    (default 8192) is never truncated: the others of the batch are sent and
    the oversize events are reported with a non-retryable ``DeliveryError``
    (``rejected=`` their indexes), so the shipper dead-letters them. UDP has
    no delivery guarantee at all; a receiver that is down shows up (at best)
    as an ICMP-refused error on a later send, which is reported as retryable.
``tcp`` / ``tls``
    octet-counting framing (RFC 6587 section 3.4.1, RFC 5425:
    ``MSG-LEN SP SYSLOG-MSG``), so messages may contain any byte, including
    newlines. One persistent connection; a batch is written with a single
    ``sendall``. Any socket error closes the connection and raises a retryable
    ``DeliveryError``: the shipper resends the whole batch (at-least-once) and
    the next send reconnects. TLS uses TLS >= 1.2, verifies the server
    certificate against ``ca`` (or the system store) and checks the server
    name (``server_name``, else the host of ``address``); ``cert``/``key``
    present a client certificate. ``max_message_bytes`` is not enforced
    unless set (then oversize events are rejected as for UDP).

Delivery guarantees over TCP/TLS, and the remaining window
----------------------------------------------------------
Syslog over TCP has no application-level acknowledgement: ``sendall``
returning means the local kernel accepted the bytes, not that the receiver
processed them. Two checks keep batches out of connections known to be dead:

* before each batch, a non-blocking look at the socket: if the peer already
  closed it (EOF or reset pending, e.g. the receiver was restarted since the
  last batch), the sink reconnects first instead of writing into it;
* after each new connection, a short wait (about two round trips, 0.1 s to
  1 s) for the receiver to drop it again, which is how rsyslog refuses a
  client it does not permit, e.g. a missing client certificate checked after
  a TLS 1.3 handshake that has already completed on our side: that is a
  retryable ``DeliveryError``, not a silently lost batch.

What remains is the window in which the receiver stops, crashes or closes
*after* these checks: bytes accepted by our kernel, or by the receiver's
kernel but not yet read by the receiving process, are lost without an error
and the shipper counts them as delivered. rsyslog discards what it has not
read from its sockets even on a clean stop (SIGTERM), and what sits in its
memory queue when it is killed. Closing this window needs an acknowledging
protocol (RELP, HTTP); with plain syslog, keep it small with a disk-assisted
queue on the receiver. In the other direction, every failure we *do* see makes
the shipper resend the whole batch, so receivers get duplicates, which they
drop by the event ``id`` carried in the structured data
(``[egress@32473 id="..."]``).
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import ssl
import threading
import time
from typing import Any, Callable, Mapping

from .base import DeliveryError, Event, Sink, render

# Private Enterprise Number used in the SD-ID (RFC 5424 section 7.2.2 requires name@PEN).
SD_ID = "egress@32473"
DEFAULT_APP_NAME = "egress-gateway"
DEFAULT_FACILITY = 16  # local0
DEFAULT_TIMEOUT = 5.0
DEFAULT_UDP_MAX = 8192
UDP_HARD_MAX = 65507  # largest IPv4 UDP payload
MIN_MESSAGE_BYTES = 480  # every RFC 5424 receiver must accept this much
PROTOCOLS = ("udp", "tcp", "tls")
SEV_WARNING = 4
SEV_INFO = 6

FACILITIES: dict[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "security": 13, "audit": 13,
    "console": 14, "alert": 14, "clock": 15, "solaris-cron": 15,
    **{f"local{i}": 16 + i for i in range(8)},
}

OPTIONS = ("address", "protocol", "ca", "cert", "key", "server_name", "hostname", "app_name",
           "facility", "timeout", "max_message_bytes")

_TS_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})$", re.ASCII)


# --------------------------------------------------------------------------- message building


def printable_ascii(value: str, max_len: int) -> str:
    """``value`` reduced to RFC 5424 PRINTUSASCII (%d33-126), cut to ``max_len``;
    NILVALUE ("-") when nothing is left."""
    out = "".join(c for c in value if 33 <= ord(c) <= 126)[:max_len]
    return out or "-"


_MSGIDS: dict[str, str] = {}


def sanitize_msgid(value: Any) -> str:
    """MSGID: printable US-ASCII, 1..32 characters, "-" if empty."""
    if isinstance(value, str):
        hit = _MSGIDS.get(value)
        if hit is None:
            hit = printable_ascii(value, 32)
            if len(_MSGIDS) < 256:  # event types are few
                _MSGIDS[value] = hit
        return hit
    return printable_ascii("" if value is None else str(value), 32)


def sd_escape(value: Any) -> str:
    """A PARAM-VALUE with ``"``, ``\\`` and ``]`` escaped (RFC 5424 section 6.3.3)."""
    s = "" if value is None else str(value)
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def facility_code(value: Any) -> int:
    """A facility name (local0..local7, auth, daemon, ...) or number 0..23."""
    if isinstance(value, bool):
        raise ValueError(f"facility must be a name or a number 0..23, not {value!r}")
    if isinstance(value, int):
        code = value
    elif isinstance(value, str) and value.strip().isdigit():
        code = int(value.strip())
    elif isinstance(value, str) and value.strip().lower() in FACILITIES:
        return FACILITIES[value.strip().lower()]
    else:
        raise ValueError(f"unknown facility {value!r} (use a number 0..23 or one of "
                         f"{', '.join(FACILITIES)})")
    if not 0 <= code <= 23:
        raise ValueError(f"facility {code} out of range 0..23")
    return code


def pri(facility: int, severity: int) -> int:
    return facility * 8 + severity


def severity_of(data: Mapping[str, Any]) -> int:
    if data.get("event") == "decision" and data.get("decision") == "deny":
        return SEV_WARNING
    return SEV_INFO


def rfc5424_timestamp(ts: Any) -> str:
    """The event's RFC 3339 ``ts`` as an RFC 5424 TIMESTAMP (at most 6 fraction digits),
    NILVALUE if it is missing or malformed."""
    if isinstance(ts, str) and len(ts) == 27 and ts[26] == "Z" and ts[19] == "." and ts[10] == "T":
        return ts  # the spool's own format is already a valid TIMESTAMP
    m = _TS_RE.match(ts) if isinstance(ts, str) else None
    if not m:
        return "-"
    base, frac, zone = m.groups()
    return base + (f".{frac[:6]}" if frac else "") + zone


def frame(msg: bytes) -> bytes:
    """Octet-counting framing (RFC 6587 3.4.1 / RFC 5425): ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d %s" % (len(msg), msg)


def build_message(ev: Event, fmt: str, *, facility: int = DEFAULT_FACILITY, hostname: str = "-",
                  app_name: str = DEFAULT_APP_NAME, procid: str = "-") -> bytes:
    h = ev.head  # from the line's prefix: no full JSON parse per event
    seq = h.seq
    sev = SEV_WARNING if h.event == "decision" and h.decision == "deny" else SEV_INFO
    header = (
        f"<{pri(facility, sev)}>1 {rfc5424_timestamp(h.ts or None)} {hostname} "
        f"{app_name} {procid} {sanitize_msgid(h.event)} "
        f'[{SD_ID} id="{sd_escape(h.id)}" seq="{sd_escape("" if seq is None else seq)}"]'
    )
    # The SD values may hold non-ASCII (PARAM-VALUE is UTF-8); everything else is ASCII.
    # (lone surrogates, possible from JSON \ud800 escapes, are written as escapes)
    return header.encode("utf-8", "backslashreplace") + b" " + render(ev, fmt)


# --------------------------------------------------------------------------- the sink


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``."""
    if not isinstance(address, str) or not address:
        raise ValueError("address must be HOST:PORT")
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"address {address!r}: use [IPv6]:PORT")
        port_s = rest[1:]
    else:
        host, sep, port_s = address.rpartition(":")
        if not sep:
            raise ValueError(f"address {address!r} has no port (use HOST:PORT)")
        if ":" in host:
            raise ValueError(f"address {address!r}: put an IPv6 address in brackets, [::1]:514")
    if not host:
        raise ValueError(f"address {address!r} has no host")
    if not (port_s.isascii() and port_s.isdigit()) or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"address {address!r}: port must be 1..65535")
    return host, int(port_s)


class SyslogSink(Sink):
    kind = "syslog"

    def __init__(
        self,
        name: str,
        fmt: str = "json",
        *,
        host: str,
        port: int,
        protocol: str = "tcp",
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
        hostname: str | None = None,
        app_name: str = DEFAULT_APP_NAME,
        facility: int | str = DEFAULT_FACILITY,
        timeout: float = DEFAULT_TIMEOUT,
        max_message_bytes: int | None = None,
    ):
        super().__init__(name, fmt)
        if protocol not in PROTOCOLS:
            raise ValueError(f"sink {name}: unknown protocol {protocol!r} (use {', '.join(PROTOCOLS)})")
        if protocol != "tls" and (ca or cert or key or server_name):
            raise ValueError(f"sink {name}: ca, cert, key and server_name need protocol tls")
        if (cert is None) != (key is None):
            raise ValueError(f"sink {name}: cert and key go together")
        self.host, self.port, self.protocol = host, int(port), protocol
        self.ca, self.cert, self.key = ca, cert, key
        self.server_name = server_name or host
        self.hostname = printable_ascii(hostname or socket.gethostname(), 255)
        self.app_name = printable_ascii(app_name, 48)
        self.facility = facility_code(facility)
        self.procid = str(os.getpid())
        self.timeout = float(timeout)
        if max_message_bytes is None and protocol == "udp":
            max_message_bytes = DEFAULT_UDP_MAX
        self.max_message_bytes = max_message_bytes
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        if protocol == "tls":
            self._ssl_context()  # fail fast on unreadable or invalid files

    # ---- configuration

    @classmethod
    def from_config(cls, name: str, fmt: str, options: dict, resolve: Callable[[str], str] | None = None
                    ) -> "SyslogSink":
        """Build from the ``audit.sinks.<name>`` options; ``ValueError`` names the problem.
        ``resolve`` (secret references) is accepted for the common sink interface and unused."""
        where = f"audit.sinks.{name}"

        def fail(msg: str) -> ValueError:
            return ValueError(f"{where}: {msg}")

        if not isinstance(options, Mapping):
            raise fail("options must be a mapping")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise fail(f"unknown option(s) {', '.join(map(str, unknown))} (known: {', '.join(OPTIONS)})")
        if "address" not in options:
            raise fail("address (HOST:PORT) is required")
        try:
            host, port = parse_address(options["address"])
        except ValueError as e:
            raise fail(str(e)) from None
        protocol = options.get("protocol", "tcp")
        if protocol not in PROTOCOLS:
            raise fail(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")

        def text(key: str, max_len: int | None = None) -> str | None:
            v = options.get(key)
            if v is None:
                return None
            if not isinstance(v, str) or not v:
                raise fail(f"{key} must be a non-empty string")
            if max_len is not None and (len(v) > max_len or any(not 33 <= ord(c) <= 126 for c in v)):
                raise fail(f"{key} must be 1..{max_len} printable ASCII characters without spaces")
            return v

        files = {k: text(k) for k in ("ca", "cert", "key")}
        server_name = text("server_name")
        if protocol != "tls":
            given = [k for k in ("ca", "cert", "key", "server_name") if options.get(k) is not None]
            if given:
                raise fail(f"{', '.join(given)} only apply to protocol tls (protocol is {protocol})")
        if (files["cert"] is None) != (files["key"] is None):
            raise fail("cert and key must be given together")
        for k, path in files.items():
            if path is not None and not os.path.isfile(path):
                raise fail(f"{k}: no such file {path}")
            if path is not None and not os.access(path, os.R_OK):
                raise fail(f"{k}: cannot read {path}")
        hostname = text("hostname", 255)
        app_name = text("app_name", 48) or DEFAULT_APP_NAME
        try:
            facility = facility_code(options.get("facility", DEFAULT_FACILITY))
        except ValueError as e:
            raise fail(str(e)) from None
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 300:
            raise fail(f"timeout must be a number of seconds in (0, 300], not {timeout!r}")
        mmb = options.get("max_message_bytes")
        if mmb is not None:
            limit = UDP_HARD_MAX if protocol == "udp" else 1 << 30
            if isinstance(mmb, bool) or not isinstance(mmb, int) or not MIN_MESSAGE_BYTES <= mmb <= limit:
                raise fail(f"max_message_bytes must be an integer {MIN_MESSAGE_BYTES}..{limit}"
                           f" for protocol {protocol}, not {mmb!r}")
        try:
            return cls(name, fmt, host=host, port=port, protocol=protocol, server_name=server_name,
                       hostname=hostname, app_name=app_name, facility=facility, timeout=float(timeout),
                       max_message_bytes=mmb, **files)
        except (ValueError, OSError) as e:  # bad format, unusable certificate/key files
            raise fail(str(e)) from None

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"syslog+{self.protocol}://{host}:{self.port}"

    # ---- messages

    def message(self, ev: Event) -> bytes:
        """One RFC 5424 message (unframed)."""
        return build_message(ev, self.fmt, facility=self.facility, hostname=self.hostname,
                             app_name=self.app_name, procid=self.procid)

    # ---- connection

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def _connect(self) -> socket.socket:
        if self.protocol == "udp":
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
            last: OSError | None = None
            for family, type_, proto, _, addr in infos:
                s = socket.socket(family, type_, proto)
                try:
                    s.settimeout(self.timeout)
                    s.connect(addr)
                    return s
                except OSError as e:
                    s.close()
                    last = e
            raise last or OSError(f"cannot resolve {self.host}")
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.protocol == "tls":
                # A fresh context per connection picks up rotated certificate files.
                return self._ssl_context().wrap_socket(raw, server_hostname=self.server_name)
            return raw
        except BaseException:
            raw.close()
            raise

    def _peer_closed(self, sock: socket.socket) -> bool:
        """True when the stream peer has already closed the connection (EOF or reset
        pending). Never blocks."""
        try:
            readable, _, errored = select.select([sock], [], [sock], 0)
        except (OSError, ValueError):
            return True
        if errored:
            return True
        if not readable:
            return False
        try:
            if isinstance(sock, ssl.SSLSocket):
                # TLS records (a close_notify, or TLS 1.3 session tickets) have to go
                # through the TLS layer; tickets alone leave nothing to read.
                sock.setblocking(False)
                try:
                    data = sock.recv(1)
                finally:
                    sock.settimeout(self.timeout)
                return data == b""
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return data == b""
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False
        except OSError:
            return True

    def _closed_within(self, sock: socket.socket, window: float) -> bool:
        """Wait up to ``window`` seconds for the peer to close a new connection."""
        deadline = time.monotonic() + window
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                readable, _, errored = select.select([sock], [], [sock], remaining)
            except (OSError, ValueError):
                return True
            if not readable and not errored:
                return False
            if self._peer_closed(sock):
                return True
            if not isinstance(sock, ssl.SSLSocket):
                return False  # the peer sent data: it is alive
            time.sleep(0.005)  # TLS post-handshake records (session tickets) were consumed

    def _close_locked(self) -> None:
        s, self._sock = self._sock, None
        if s is None:
            return
        try:
            if isinstance(s, ssl.SSLSocket):
                s.settimeout(min(self.timeout, 1.0))
                try:
                    s.unwrap()  # send close_notify; best effort
                except (OSError, ValueError):
                    pass
        finally:
            try:
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    # ---- delivery

    def send(self, batch: list[Event]) -> None:
        if not batch:
            return
        messages: list[bytes] = []
        oversize: list[int] = []
        broken: list[int] = []
        for i, ev in enumerate(batch):
            try:
                msg = self.message(ev)
            except (ValueError, TypeError, KeyError) as e:  # not JSON, or not convertible to fmt
                broken.append(i)
                reason = f"{type(e).__name__}"
                continue
            if self.max_message_bytes is not None and len(msg) > self.max_message_bytes:
                oversize.append(i)
            else:
                messages.append(msg)
        with self._lock:
            if messages:
                self._deliver_locked(messages)
        if oversize or broken:
            why = []
            if oversize:
                why.append(f"{len(oversize)} larger than max_message_bytes={self.max_message_bytes}"
                           " (a syslog message is never truncated)")
            if broken:
                why.append(f"{len(broken)} that cannot be rendered as {self.fmt} ({reason})")
            raise DeliveryError(
                f"{self.describe()}: rejected {len(oversize) + len(broken)} event(s): {'; '.join(why)};"
                f" the {len(messages)} other event(s) of the batch were sent",
                retryable=False, rejected=sorted(oversize + broken))

    def _deliver_locked(self, messages: list[bytes]) -> None:
        where = self.describe()
        if self._sock is not None and self.protocol != "udp" and self._peer_closed(self._sock):
            self._close_locked()
        if self._sock is None:
            started = time.monotonic()
            try:
                self._sock = self._connect()
            except ssl.SSLCertVerificationError as e:
                raise DeliveryError(f"{where}: TLS certificate verification failed: "
                                    f"{e.verify_message or e}") from e
            except (OSError, ValueError) as e:
                raise DeliveryError(f"{where}: cannot connect: {_describe_error(e)}") from e
            if self.protocol != "udp":
                # A receiver that refuses us after accepting (rsyslog checks the client
                # certificate after a TLS 1.3 handshake has completed on our side, and its
                # permitted-peer lists after the TCP accept) just closes the connection:
                # anything sent on it would be lost without an error. Give it about two
                # round trips to do so before trusting the connection with a batch.
                window = min(self.timeout, 1.0, max(0.1, 2 * (time.monotonic() - started) + 0.05))
                if self._closed_within(self._sock, window):
                    self._close_locked()
                    hint = " (client certificate missing or refused?)" if self.protocol == "tls" else ""
                    raise DeliveryError(f"{where}: the receiver closed the connection right after "
                                        f"accepting it{hint}")
        sock = self._sock
        try:
            if self.protocol == "udp":
                for m in messages:
                    sock.send(m)
            else:
                sock.sendall(b"".join(frame(m) for m in messages))
        except (OSError, ValueError) as e:
            self._close_locked()
            raise DeliveryError(f"{where}: send failed: {_describe_error(e)}") from e


def _describe_error(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.errno in errno.errorcode and not e.strerror:
        return errno.errorcode[e.errno]
    return str(e) or type(e).__name__
