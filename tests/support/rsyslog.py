"""A real rsyslogd for tests: plain TCP, TLS (GnuTLS), mutual TLS, UDP and
(optionally) RELP inputs on free loopback ports, writing every received message
as one JSON object per line.

The daemon runs in the foreground (``rsyslogd -n -f <conf> -i <pidfile>``)
with a generated configuration in its own directory: no imuxsock/imklog (the
system log is never touched), no include of /etc/rsyslog.d. Each record in
``received.jsonl`` holds what rsyslog itself parsed (so a test proves the
message was understood as RFC 5424, not just that bytes arrived)::

    {"input": "tcp"|"tls"|"mtls"|"udp"|"relp", "pri": "134", "facility": "16", "severity": "6",
     "ver": "1", "ts": ..., "host": ..., "app": ..., "procid": ..., "msgid": ...,
     "sd": "[egress@32473 id=\\"...\\" seq=\\"...\\"]",
     "sd_id": <id parsed by mmpstrucdata, unescaped>, "sd_seq": ...,
     "msg": <MSG part>, "raw": <the whole message without framing>}

Example::

    rs = Rsyslog(tmp_path / "rsyslog")      # skips the test if rsyslogd/gtls is missing
    rs.start()                               # returns once all inputs accept
    try:
        sink = SyslogSink("s", host="127.0.0.1", port=rs.tls_port, protocol="tls",
                          ca=str(rs.ca_path), server_name="localhost")
        sink.send(batch)
        recs = rs.wait_for(len(batch))       # the parsed records
        assert rs.event_ids() == [ev.id for ev in batch]
    finally:
        rs.stop()

``restart()`` keeps the ports and appends to the same output file. Plain
syslog has no acknowledgement: what rsyslog has not read from its sockets when
it stops (even on SIGTERM), or holds in memory when it is killed, is lost, so
wait for a batch to arrive (``wait_for``, ``records()``) before stopping it if
the test counts on it. ``Rsyslog(dir, relp=True)`` adds an imrelp input
(``relp_port``; skips without the Debian package rsyslog-relp).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from .certs import CertPaths, issue_server_cert, make_test_ca
from .procs import ManagedProcess

RSYSLOGD_CANDIDATES = ("/usr/sbin/rsyslogd", "/sbin/rsyslogd")
GTLS_MODULE = "lmnsd_gtls.so"
RELP_MODULE = "imrelp.so"
MODULE_DIRS = (
    "/usr/lib/x86_64-linux-gnu/rsyslog/",
    "/usr/lib/*-linux-gnu/rsyslog/",
    "/usr/lib/rsyslog/",
    "/usr/lib64/rsyslog/",
)
SERVER_NAMES = ["localhost", "rsyslog.test"]
SERVER_IPS = ["127.0.0.1", "::1"]
PROBE_MSGID = "harness-probe"


def rsyslogd_path() -> str | None:
    for p in (shutil.which("rsyslogd"), *RSYSLOGD_CANDIDATES):
        if p and os.access(p, os.X_OK):
            return p
    return None


def module_path(name: str) -> str | None:
    for d in MODULE_DIRS:
        hits = sorted(glob.glob(d + name))
        if hits:
            return hits[0]
    return None


def gtls_module_path() -> str | None:
    return module_path(GTLS_MODULE)


def missing_reason(*, relp: bool = False) -> str | None:
    """Why a real rsyslog cannot run here (None when it can); ``relp``: imrelp needed too."""
    if rsyslogd_path() is None:
        return "rsyslogd not installed (Debian package 'rsyslog')"
    if gtls_module_path() is None:
        return f"rsyslog GnuTLS driver {GTLS_MODULE} not installed (Debian package 'rsyslog-gnutls')"
    if relp and module_path(RELP_MODULE) is None:
        return f"rsyslog RELP input {RELP_MODULE} not installed (Debian package 'rsyslog-relp')"
    return None


def require_rsyslog(*, relp: bool = False) -> str:
    """The rsyslogd path, or skip the calling test naming the missing package."""
    reason = missing_reason(relp=relp)
    if reason:
        import pytest

        pytest.skip(reason)
    return rsyslogd_path()  # type: ignore[return-value]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _free_ports(host: str, tcp: int, udp: int) -> tuple[list[int], list[int]]:
    """Distinct free TCP and UDP ports (all held open while choosing, so no duplicates)."""
    held: list[socket.socket] = []
    try:
        tcp_ports, udp_ports = [], []
        for kind, n, out in ((socket.SOCK_STREAM, tcp, tcp_ports), (socket.SOCK_DGRAM, udp, udp_ports)):
            for _ in range(n):
                s = socket.socket(_family(host), kind)
                held.append(s)
                s.bind((host, 0))
                out.append(s.getsockname()[1])
        return tcp_ports, udp_ports
    finally:
        for s in held:
            s.close()


def _q(value: object) -> str:
    """A RainerScript string constant."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


_FIELDS = [
    ("input", "inputname"), ("pri", "pri"), ("facility", "syslogfacility"),
    ("severity", "syslogseverity"), ("ver", "protocol-version"), ("ts", "timereported"),
    ("host", "hostname"), ("app", "app-name"), ("procid", "procid"), ("msgid", "msgid"),
    ("sd", "structured-data"), ("sd_id", "$!rfc5424-sd!egress@32473!id"),
    ("sd_seq", "$!rfc5424-sd!egress@32473!seq"), ("msg", "msg"), ("raw", "rawmsg"),
]


def _template() -> str:
    parts = []
    for i, (key, prop) in enumerate(_FIELDS):
        lead = "{" if i == 0 else '",'
        parts.append(f'  constant(value={_q(lead + json.dumps(key) + ":" + chr(34))})')
        extra = ' dateFormat="rfc3339"' if prop == "timereported" else ""
        parts.append(f'  property(name={_q(prop)} format="json"{extra})')
    parts.append('  constant(value="\\"}\\n")')
    return 'template(name="harness_record" type="list") {\n' + "\n".join(parts) + "\n}\n"


class Rsyslog:
    """One rsyslogd. Ports are chosen in the constructor and kept across restarts."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        udp: bool = True,
        relp: bool = False,
        skip_if_missing: bool = True,
    ) -> None:
        if skip_if_missing:
            self.rsyslogd = require_rsyslog(relp=relp)
        else:
            reason = missing_reason(relp=relp)
            if reason:
                raise RuntimeError(reason)
            self.rsyslogd = rsyslogd_path()
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.work_dir = self.dir / "work"
        self.work_dir.mkdir(exist_ok=True)
        self.ca: CertPaths = make_test_ca(self.dir / "pki")
        self.leaf: CertPaths = issue_server_cert(self.ca, self.dir / "pki", SERVER_NAMES, SERVER_IPS,
                                                 stem="rsyslog")
        # a certificate the sink can present on the mutual-TLS input (signed by the same CA)
        self.client: CertPaths = issue_server_cert(self.ca, self.dir / "pki", ["sink.test"], [],
                                                   stem="client")
        tcp_ports, udp_ports = _free_ports(host, 4 if relp else 3, 1 if udp else 0)
        self._tcp_port, self._tls_port, self._mtls_port = tcp_ports[:3]
        self._relp_port = tcp_ports[3] if relp else None
        self._udp_port = udp_ports[0] if udp else None
        self.output_path = self.dir / "received.jsonl"
        self.probe_path = self.dir / "probe.jsonl"
        self.internal_log_path = self.dir / "rsyslogd-internal.log"
        self.conf_path = self.dir / "rsyslog.conf"
        self.pid_path = self.dir / "rsyslogd.pid"
        self.conf_path.write_text(self._config())
        self.proc: ManagedProcess | None = None
        self._probe_n = 0

    # ---- properties

    @property
    def tcp_port(self) -> int:
        return self._tcp_port

    @property
    def tls_port(self) -> int:
        """TLS, server authentication only (gtls, authMode anon)."""
        return self._tls_port

    @property
    def mtls_port(self) -> int:
        """TLS requiring a client certificate signed by ``ca_path`` (authMode x509/certvalid)."""
        return self._mtls_port

    @property
    def udp_port(self) -> int:
        if self._udp_port is None:
            raise RuntimeError("started without UDP")
        return self._udp_port

    @property
    def relp_port(self) -> int:
        """Plain RELP (imrelp): every message is acknowledged."""
        if self._relp_port is None:
            raise RuntimeError("constructed without relp=True")
        return self._relp_port

    @property
    def ca_path(self) -> Path:
        return self.ca.cert

    @property
    def log_path(self) -> Path:
        return self.dir / "rsyslogd.log"

    # ---- configuration

    def _config(self) -> str:
        h = self.host
        tls_files = (f"streamDriver.CAFile={_q(self.ca.cert)} streamDriver.CertFile={_q(self.leaf.chain)} "
                     f"streamDriver.KeyFile={_q(self.leaf.key)}")
        extra = ""
        if self._udp_port is not None:
            extra += ('module(load="imudp")\n'
                   f'input(type="imudp" address={_q(h)} port="{self._udp_port}" name="udp" ruleset="harness")\n')
        if self._relp_port is not None:
            extra += ('module(load="imrelp")\n'
                    f'input(type="imrelp" address={_q(h)} port="{self._relp_port}" name="relp" ruleset="harness")\n')
        return f"""# generated by tests/support/rsyslog.py
global(workDirectory={_q(self.work_dir)} maxMessageSize="64k" processInternalMessages="on")
module(load="imtcp" maxSessions="200")
module(load="mmpstrucdata")
{_template()}
ruleset(name="harness") {{
  if $msgid == "{PROBE_MSGID}" then {{
    action(type="omfile" file={_q(self.probe_path)} template="harness_record")
    stop
  }}
  action(type="mmpstrucdata")
  action(type="omfile" file={_q(self.output_path)} template="harness_record")
}}
input(type="imtcp" address={_q(h)} port="{self._tcp_port}" name="tcp" ruleset="harness")
input(type="imtcp" address={_q(h)} port="{self._tls_port}" name="tls" ruleset="harness"
      streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon" {tls_files})
input(type="imtcp" address={_q(h)} port="{self._mtls_port}" name="mtls" ruleset="harness"
      streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid" {tls_files})
{extra}
# rsyslogd's own messages (default ruleset; processInternalMessages="on" keeps them
# here instead of sending them to the system log socket)
action(type="omfile" file={_q(self.internal_log_path)})
"""

    # ---- lifecycle

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(self, timeout: float = 20) -> "Rsyslog":
        """Start rsyslogd; returns once the TCP, TLS (a full handshake) and RELP inputs
        accept connections and a UDP probe went through."""
        if self.running():
            return self
        self.pid_path.unlink(missing_ok=True)
        self.proc = ManagedProcess(
            [self.rsyslogd, "-n", "-f", self.conf_path, "-i", self.pid_path], self.dir, name="rsyslogd"
        )
        deadline = time.monotonic() + timeout
        try:
            for port, tls in ((self._tcp_port, False), (self._tls_port, True), (self._mtls_port, True)):
                self._wait(lambda: self._accepts(port, tls), deadline, f"port {port}")
            if self._relp_port is not None:
                self._wait(lambda: self._accepts(self._relp_port, False), deadline, f"RELP port {self._relp_port}")
            if self._udp_port is not None:
                self._probe_n += 1
                token = f"probe-{os.getpid()}-{self._probe_n}"
                self._wait(lambda: self._udp_probe(token), deadline, f"UDP port {self._udp_port}")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, ready, deadline: float, what: str) -> None:
        while True:
            if not self.running():
                raise RuntimeError(f"rsyslogd exited with status {self.proc.returncode}"
                                   f" before {what} was ready; log:\n{self.log_text()}")
            if ready():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"rsyslogd: {what} not ready in time; log:\n{self.log_text()}")
            time.sleep(0.05)

    def _accepts(self, port: int, tls: bool) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=2) as s:
                if tls:  # a full handshake (with the client certificate, for the mTLS input)
                    ctx = ssl.create_default_context(cafile=str(self.ca.cert))
                    ctx.load_cert_chain(self.client.chain, self.client.key)
                    with ctx.wrap_socket(s, server_hostname="localhost") as t:
                        try:
                            t.unwrap()  # rsyslog closes without a close_notify of its own
                        except (OSError, ssl.SSLError):
                            pass
                return True
        except (OSError, ssl.SSLError):
            return False

    def _udp_probe(self, token: str) -> bool:
        if token in self._read(self.probe_path):
            return True
        msg = f"<134>1 - - harness - {PROBE_MSGID} - {token}".encode()
        with socket.socket(_family(self.host), socket.SOCK_DGRAM) as s:
            try:
                s.sendto(msg, (self.host, self._udp_port))
            except OSError:
                return False
        time.sleep(0.05)
        return token in self._read(self.probe_path)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``). Returns the exit status."""
        if self.proc is None:
            return None
        return self.proc.stop(timeout)

    def kill(self) -> int | None:
        """SIGKILL: messages in rsyslog's memory queue are lost, as in a crash."""
        if self.proc is None:
            return None
        if self.proc.alive():
            self.proc.popen.send_signal(signal.SIGKILL)
        try:
            return self.proc.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - kernel trouble
            return None

    def restart(self, timeout: float = 20) -> "Rsyslog":
        """Stop and start again: same ports, same output file (appended to)."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> "Rsyslog":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- output

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def records(self) -> list[dict]:
        """Every complete record written so far (a line still being written is left out)."""
        text = self._read(self.output_path)
        lines = text.split("\n")[:-1]  # the part after the last newline is incomplete
        return [json.loads(line) for line in lines if line]

    def messages(self) -> list[str]:
        """The MSG part of every received message (our rendered event), in arrival order."""
        return [r["msg"] for r in self.records()]

    def raw_messages(self) -> list[str]:
        """Every received syslog message as sent (without the octet-count framing)."""
        return [r["raw"] for r in self.records()]

    def event_ids(self) -> list[str]:
        """The ``id`` parameter of each message's [egress@32473] element, as parsed by
        rsyslog (unescaped); messages without one are left out."""
        return [r["sd_id"] for r in self.records() if r.get("sd_id")]

    def wait_for(self, count: int, timeout: float = 10, settle: float = 0.3) -> list[dict]:
        """Wait until at least ``count`` records are written, then ``settle`` seconds more
        (so duplicates have a chance to show up); returns all records."""
        deadline = time.monotonic() + timeout
        while len(self.records()) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"rsyslog wrote {len(self.records())} of {count} records within"
                                   f" {timeout}s; log:\n{self.log_text()}")
            time.sleep(0.05)
        if settle:
            time.sleep(settle)
        return self.records()

    def log_text(self) -> str:
        return (self._read(self.log_path) + self._read(self.internal_log_path))[-20000:]

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return (f"<Rsyslog pid={pid} tcp={self._tcp_port} tls={self._tls_port} mtls={self._mtls_port}"
                f" udp={self._udp_port} relp={self._relp_port} dir={self.dir}>")
