"""The syslog sink: RFC 5424 message building (unit and property tests) and
delivery to a real rsyslogd over TCP, TLS, mutual TLS and UDP (tests.support.rsyslog)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit.sinks.base import DeliveryError, Event
from gateway.audit.sinks.syslog import (
    FACILITIES,
    OPTIONS,
    SD_ID,
    SyslogSink,
    build_message,
    facility_code,
    frame,
    parse_address,
    pri,
    rfc5424_timestamp,
    sanitize_msgid,
    sd_escape,
    severity_of,
)
from tests.support.certs import make_test_ca
from tests.support.rsyslog import Rsyslog

TS = "2026-11-24T01:02:03.456789Z"
HOSTNAME = "gw-test-host"


# --------------------------------------------------------------------------- helpers


def make_event(eid: str, seq: int = 1, event: str = "decision", **fields) -> Event:
    data = {"id": eid, "seq": seq, "prev": "0" * 64, "ts": TS, "event": event}
    if event == "decision":
        data.setdefault("decision", "allow")
    data.update(fields)
    return Event(raw=json.dumps(data, separators=(",", ":"), sort_keys=True).encode())


def make_batch(n: int, prefix: str | None = None) -> list[Event]:
    prefix = prefix or uuid.uuid4().hex[:12]
    return [
        make_event(f"{prefix}-{i}", seq=i + 1, decision="deny" if i % 3 == 0 else "allow",
                   request={"method": "GET", "host": "api.example.com", "port": 443, "path": f"/p/{i}"},
                   reason="No deletes." if i % 3 == 0 else "")
        for i in range(n)
    ]


def sd_unescape(escaped: str) -> str:
    """Inverse of RFC 5424 6.3.3 escaping, written independently of the sink."""
    out, i = [], 0
    while i < len(escaped):
        c = escaped[i]
        if c == "\\" and i + 1 < len(escaped) and escaped[i + 1] in '"\\]':
            out.append(escaped[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def param_value_end(text: str) -> int:
    """Index of the quote that closes a PARAM-VALUE starting at text[0] (after the opening quote)."""
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    return -1


def records_for(rs: Rsyslog, ids: list[str], *, timeout: float = 10, settle: float = 0.3) -> list[dict]:
    """Wait until every id arrived, then ``settle`` more seconds; the records of these ids."""
    wanted = set(ids)
    deadline = time.monotonic() + timeout
    while True:
        recs = [r for r in rs.records() if r.get("sd_id") in wanted]
        if {r["sd_id"] for r in recs} >= wanted:
            break
        if time.monotonic() >= deadline:
            missing = sorted(wanted - {r["sd_id"] for r in recs})
            raise AssertionError(f"rsyslog did not receive {len(missing)} event(s), e.g. {missing[:3]};"
                                 f" log:\n{rs.log_text()}")
        time.sleep(0.05)
    time.sleep(settle)
    return [r for r in rs.records() if r.get("sd_id") in wanted]


def assert_exactly_once(recs: list[dict], ids: list[str]) -> None:
    got = [r["sd_id"] for r in recs]
    assert sorted(got) == sorted(ids), f"duplicates or strays: {got}"


@pytest.fixture(scope="module")
def rs(tmp_path_factory):
    r = Rsyslog(tmp_path_factory.mktemp("rsyslog"))
    r.start()
    yield r
    r.stop()


@pytest.fixture
def own_rs(tmp_path):
    """A private rsyslogd for tests that stop, kill or restart it."""
    r = Rsyslog(tmp_path / "rsyslog")
    r.start()
    yield r
    r.stop()


def sink_for(rs: Rsyslog, transport: str, fmt: str = "json", **kw) -> SyslogSink:
    kw.setdefault("hostname", HOSTNAME)
    kw.setdefault("timeout", 5)
    if transport == "tcp":
        return SyslogSink("siem", fmt, host=rs.host, port=rs.tcp_port, protocol="tcp", **kw)
    if transport == "udp":
        return SyslogSink("siem", fmt, host=rs.host, port=rs.udp_port, protocol="udp", **kw)
    kw.setdefault("ca", str(rs.ca_path))
    kw.setdefault("server_name", "localhost")
    if transport == "mtls":
        kw.setdefault("cert", str(rs.client.chain))
        kw.setdefault("key", str(rs.client.key))
        return SyslogSink("siem", fmt, host=rs.host, port=rs.mtls_port, protocol="tls", **kw)
    return SyslogSink("siem", fmt, host=rs.host, port=rs.tls_port, protocol="tls", **kw)


# --------------------------------------------------------------------------- unit: framing, PRI, header


def test_octet_counting_frame_counts_bytes_not_characters():
    assert frame(b"abc") == b"3 abc"
    msg = "é\n]".encode()
    assert frame(msg) == b"4 " + msg
    assert frame(b"") == b"0 "


@pytest.mark.parametrize("facility,severity,expected", [(16, 6, 134), (16, 4, 132), (0, 0, 0), (23, 7, 191),
                                                        (4, 6, 38), (3, 4, 28)])
def test_pri(facility, severity, expected):
    assert pri(facility, severity) == expected


@pytest.mark.parametrize("value,code", [("local0", 16), ("local7", 23), ("LOCAL3", 19), ("auth", 4),
                                        ("daemon", 3), ("authpriv", 10), (5, 5), ("20", 20), (0, 0)])
def test_facility_names_and_numbers(value, code):
    assert facility_code(value) == code


@pytest.mark.parametrize("value", ["local8", "nope", 24, -1, True, None, 1.5, ""])
def test_facility_invalid(value):
    with pytest.raises(ValueError):
        facility_code(value)


def test_severity_warning_only_for_denied_decisions():
    assert severity_of({"event": "decision", "decision": "deny"}) == 4
    assert severity_of({"event": "decision", "decision": "allow"}) == 6
    assert severity_of({"event": "shipper", "decision": "deny"}) == 6
    assert severity_of({}) == 6


@pytest.mark.parametrize("ts,expected", [
    (TS, TS),
    ("2026-11-24T01:02:03Z", "2026-11-24T01:02:03Z"),
    ("2026-11-24T01:02:03.123456789Z", "2026-11-24T01:02:03.123456Z"),
    ("2026-11-24T01:02:03.5+02:00", "2026-11-24T01:02:03.5+02:00"),
    ("yesterday", "-"), ("", "-"), (None, "-"), (12, "-"),
])
def test_timestamp(ts, expected):
    assert rfc5424_timestamp(ts) == expected


def test_message_bytes_exactly():
    ev = make_event('a"b]c\\d', seq=7, decision="deny")
    msg = build_message(ev, "json", facility=16, hostname="h1", app_name="app", procid="42")
    header = f'<132>1 {TS} h1 app 42 decision [{SD_ID} id="a\\"b\\]c\\\\d" seq="7"] '
    assert msg == header.encode() + ev.raw


def test_non_decision_event_is_informational_and_msgid_is_its_type():
    ev = make_event("x1", event="shipper.started")
    msg = build_message(ev, "json", facility=4, hostname="h", app_name="a", procid="1")
    assert msg.startswith(b"<38>1 " + TS.encode() + b" h a 1 shipper.started [")


def test_missing_fields_use_nilvalue():
    ev = Event(raw=b'{"seq":3}')
    msg = build_message(ev, "json", hostname="h", procid="9")
    assert msg == b'<134>1 - h egress-gateway 9 - [egress@32473 id="" seq="3"] {"seq":3}'


def test_sink_defaults(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "box one\n")
    s = SyslogSink("x", host="127.0.0.1", port=514)
    assert (s.protocol, s.facility, s.app_name, s.timeout) == ("tcp", 16, "egress-gateway", 5.0)
    assert s.hostname == "boxone"  # spaces and controls dropped
    assert s.procid == str(os.getpid())
    assert s.max_message_bytes is None
    assert SyslogSink("x", host="127.0.0.1", port=514, protocol="udp").max_message_bytes == 8192
    assert s.message(make_event("i")).split(b" ")[2] == b"boxone"


# --------------------------------------------------------------------------- properties: escaping, MSGID

_PRINTABLE_ASCII = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_sd_escape_round_trips(value):
    escaped = sd_escape(value)
    assert sd_unescape(escaped) == value
    # the value cannot end the PARAM-VALUE or the SD-ELEMENT early: the first unescaped quote
    # is the one we add, and no unescaped "]" is left inside
    assert param_value_end(escaped + '"') == len(escaped)
    stripped = escaped.replace("\\\\", "").replace('\\"', "").replace("\\]", "")
    assert '"' not in stripped and "]" not in stripped


@settings(max_examples=300, deadline=None)
@given(_PRINTABLE_ASCII)
def test_sd_escape_of_ascii_stays_printable_ascii(value):
    escaped = sd_escape(value)
    assert all(32 <= ord(c) <= 126 for c in escaped)
    assert sd_unescape(escaped) == value


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=100), st.none(), st.integers()))
def test_msgid_is_printable_ascii(value):
    out = sanitize_msgid(value)
    assert 1 <= len(out) <= 32
    assert all(33 <= ord(c) <= 126 for c in out)
    assert sanitize_msgid(out) == out  # idempotent


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=32))
def test_valid_msgid_is_kept(value):
    assert sanitize_msgid(value) == value


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40), st.integers(min_value=0, max_value=10**12))
def test_header_parses_back(eid, event, seq):
    """Whatever the event holds, the header splits into exactly the RFC 5424 fields and
    the SD parameters un-escape to the event's values."""
    ev = Event(raw=json.dumps({"id": eid, "seq": seq, "ts": TS, "event": event}).encode())
    msg = build_message(ev, "json", hostname="h", app_name="a", procid="1").decode("utf-8")
    *fields, rest = msg.split(" ", 6)
    assert fields == ["<134>1", TS, "h", "a", "1", sanitize_msgid(event)]
    prefix = f'[{SD_ID} id="'
    assert rest.startswith(prefix)
    rest = rest[len(prefix):]
    end = param_value_end(rest)
    assert sd_unescape(rest[:end]) == eid
    rest = rest[end:]
    assert rest.startswith('" seq="')
    rest = rest[len('" seq="'):]
    end = param_value_end(rest)
    assert rest[:end] == str(seq)
    assert rest[end:] == '"] ' + ev.raw.decode()


# --------------------------------------------------------------------------- configuration


def test_from_config_full(tmp_path):
    ca = make_test_ca(tmp_path)
    s = SyslogSink.from_config("siem", "ocsf", {
        "address": "127.0.0.1:6514", "protocol": "tls", "ca": str(ca.cert), "server_name": "logs.example",
        "hostname": "gw1", "app_name": "egress", "facility": "auth", "timeout": 2.5,
        "max_message_bytes": 4096,
    }, resolve=lambda ref: ref)
    assert s.describe() == "syslog+tls://127.0.0.1:6514"
    assert (s.host, s.port, s.server_name, s.hostname, s.app_name) == (
        "127.0.0.1", 6514, "logs.example", "gw1", "egress")
    assert (s.facility, s.timeout, s.max_message_bytes, s.fmt) == (4, 2.5, 4096, "ocsf")


def test_from_config_defaults_and_ipv6():
    s = SyslogSink.from_config("s", "json", {"address": "[::1]:514"}, None)
    assert s.describe() == "syslog+tcp://[::1]:514"
    assert (s.protocol, s.facility, s.timeout) == ("tcp", 16, 5.0)
    assert SyslogSink.from_config("u", "json", {"address": "localhost:514", "protocol": "udp",
                                                "facility": 23}, None).describe() == "syslog+udp://localhost:514"


@pytest.mark.parametrize("options,message", [
    ({}, "address (HOST:PORT) is required"),
    ({"address": "127.0.0.1"}, "has no port"),
    ({"address": "127.0.0.1:0"}, "port must be 1..65535"),
    ({"address": "127.0.0.1:70000"}, "port must be 1..65535"),
    ({"address": "::1:514"}, "brackets"),
    ({"address": ":514"}, "has no host"),
    ({"address": 514}, "HOST:PORT"),
    ({"address": "h:1", "protocol": "relp"}, "protocol must be one of udp, tcp, tls"),
    ({"address": "h:1", "ca": "/x"}, "only apply to protocol tls"),
    ({"address": "h:1", "protocol": "tls", "cert": "/x"}, "cert and key must be given together"),
    ({"address": "h:1", "protocol": "tls", "ca": "/nonexistent/ca.pem"}, "ca: no such file"),
    ({"address": "h:1", "facility": "local9"}, "unknown facility"),
    ({"address": "h:1", "timeout": 0}, "timeout must be"),
    ({"address": "h:1", "timeout": "5"}, "timeout must be"),
    ({"address": "h:1", "max_message_bytes": 100}, "max_message_bytes must be"),
    ({"address": "h:1", "protocol": "udp", "max_message_bytes": 70000}, "max_message_bytes must be"),
    ({"address": "h:1", "app_name": "a b"}, "app_name must be"),
    ({"address": "h:1", "app_name": "a" * 49}, "app_name must be"),
    ({"address": "h:1", "hostname": ""}, "hostname must be"),
])
def test_from_config_errors(options, message):
    with pytest.raises(ValueError) as ei:
        SyslogSink.from_config("siem", "json", options, None)
    assert str(ei.value).startswith("audit.sinks.siem: ")
    assert message in str(ei.value)


def test_from_config_unknown_key_lists_known_ones():
    with pytest.raises(ValueError) as ei:
        SyslogSink.from_config("siem", "json", {"address": "h:1", "port": 514, "tls": True}, None)
    text = str(ei.value)
    assert "unknown option(s) port, tls" in text
    for key in OPTIONS:
        assert key in text


def test_from_config_unusable_key_file(tmp_path):
    ca = make_test_ca(tmp_path)
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a key")
    with pytest.raises(ValueError, match=r"^audit\.sinks\.siem: "):
        SyslogSink.from_config("siem", "json", {"address": "h:1", "protocol": "tls", "ca": str(ca.cert),
                                                "cert": str(bogus), "key": str(bogus)}, None)


def test_unknown_format_rejected():
    with pytest.raises(ValueError, match="unknown format"):
        SyslogSink.from_config("siem", "cef", {"address": "h:1"}, None)


def test_parse_address():
    assert parse_address("[::1]:6514") == ("::1", 6514)
    assert parse_address("logs.example.com:514") == ("logs.example.com", 514)


def test_facility_table_has_all_locals():
    assert [FACILITIES[f"local{i}"] for i in range(8)] == list(range(16, 24))


# --------------------------------------------------------------------------- against a local socket


def test_connect_refused_is_retryable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        sink = SyslogSink("x", host="127.0.0.1", port=port, timeout=2)
        with pytest.raises(DeliveryError) as ei:
            sink.send([make_event("a")])
    assert ei.value.retryable and ei.value.rejected == ()
    assert "cannot connect" in str(ei.value)


def test_tls_handshake_timeout_is_retryable():
    """A listener that never answers the ClientHello: bounded by the timeout, retryable."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        sink = SyslogSink("x", host="127.0.0.1", port=srv.getsockname()[1], protocol="tls", timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(DeliveryError) as ei:
            sink.send([make_event("a")])
        assert time.monotonic() - t0 < 3
    assert ei.value.retryable
    assert sink._sock is None


def test_peer_that_closes_at_once_is_a_retryable_error():
    """Accept, then close before we send (like rsyslog refusing a client certificate
    after a TLS 1.3 handshake): no batch is written into that connection."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        sink = SyslogSink("x", host="127.0.0.1", port=srv.getsockname()[1], timeout=2)
        def accept_and_close():
            c, _ = srv.accept()
            c.close()

        t = threading.Thread(target=accept_and_close)
        t.start()
        with pytest.raises(DeliveryError) as ei:
            sink.send([make_event("a")])
        t.join(5)
    assert ei.value.retryable and "closed the connection" in str(ei.value)


def test_tcp_batch_is_one_write_of_framed_messages():
    """Bytes on the wire: the frames of all events, back to back, on one persistent connection."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        sink = SyslogSink("x", host="127.0.0.1", port=srv.getsockname()[1], hostname="h", timeout=2)
        batch1, batch2 = make_batch(3, "one"), make_batch(2, "two")
        sink.send(batch1)
        conn, _ = srv.accept()
        with conn:
            sink.send(batch2)
            sink.close()
            conn.settimeout(5)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        assert sink._sock is None
    expected = b"".join(frame(sink.message(ev)) for ev in batch1 + batch2)
    assert data == expected
    # parse the octet counting back
    out, rest = [], data
    while rest:
        n, _, rest = rest.partition(b" ")
        out.append(rest[: int(n)])
        rest = rest[int(n):]
    assert [m.rsplit(b"] ", 1)[1] for m in out] == [ev.raw for ev in batch1 + batch2]


def test_unrenderable_events_are_rejected_and_the_rest_sent():
    """An event that is not JSON (or cannot be converted to the format) can never be
    delivered: non-retryable for that index only; the others go out."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        sink = SyslogSink("x", "ocsf", host="127.0.0.1", port=srv.getsockname()[1], hostname="h", timeout=2)
        good1, good2 = make_event("g1"), make_event("g2", event="shipper.note")
        no_ts = Event(raw=b'{"id":"nots","seq":2,"event":"decision","decision":"deny"}')  # ocsf needs ts
        batch = [good1, Event(raw=b"{not json"), no_ts, good2]
        with pytest.raises(DeliveryError) as ei:
            sink.send(batch)
        conn, _ = srv.accept()
        sink.close()
        with conn:
            conn.settimeout(5)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    assert (ei.value.retryable, ei.value.rejected) == (False, (1, 2))
    assert "cannot be rendered as ocsf" in str(ei.value)
    assert data == frame(sink.message(good1)) + frame(sink.message(good2))


def test_lone_surrogate_in_id_does_not_break_encoding():
    ev = Event(raw=b'{"id":"a\\ud800b","seq":1,"ts":"2026-11-24T01:02:03Z","event":"decision"}')
    assert ev.id == "a\ud800b"
    msg = build_message(ev, "json", hostname="h", procid="1")
    assert b'id="a\\ud800b"' in msg
    msg.decode("utf-8")  # valid UTF-8


# --------------------------------------------------------------------------- real rsyslog


@pytest.mark.parametrize("transport", ["tcp", "tls", "mtls", "udp"])
def test_batch_delivered_exactly_once_and_parsed_as_rfc5424(rs, transport):
    batch = make_batch(12)
    # an id that needs SD escaping on the wire
    batch.append(make_event(f'{uuid.uuid4().hex[:8]}-odd"]\\id', seq=13, event="shipper.note"))
    sink = sink_for(rs, transport, app_name="egress-gw-test", facility="local3")
    try:
        sink.send(batch)
    finally:
        sink.close()
    ids = [ev.id for ev in batch]
    recs = records_for(rs, ids)
    assert_exactly_once(recs, ids)
    by_id = {r["sd_id"]: r for r in recs}
    for ev in batch:
        r = by_id[ev.id]
        deny = ev.data.get("decision") == "deny" and ev.data["event"] == "decision"
        assert r["input"] == transport
        assert r["ver"] == "1"
        assert r["pri"] == str(19 * 8 + (4 if deny else 6))
        assert (r["facility"], r["severity"]) == ("19", "4" if deny else "6")
        assert r["ts"] == TS
        assert r["host"] == HOSTNAME
        assert r["app"] == "egress-gw-test"
        assert r["procid"] == str(os.getpid())
        assert r["msgid"] == ev.data["event"]
        assert r["sd_seq"] == str(ev.data["seq"])
        assert r["sd"].startswith(f"[{SD_ID} id=")
        assert r["msg"] == ev.raw.decode()  # json: the spool line, untouched
        assert json.loads(r["msg"]) == ev.data
    # order is kept on stream transports
    if transport != "udp":
        assert [r["sd_id"] for r in recs] == ids


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_persistent_connection_several_batches(rs, transport):
    sink = sink_for(rs, transport)
    try:
        batches = [make_batch(5) for _ in range(4)]
        sink.send(batches[0])
        first = sink._sock
        for b in batches[1:]:
            sink.send(b)
        assert sink._sock is first  # reused, not reconnected per batch
    finally:
        sink.close()
    ids = [ev.id for b in batches for ev in b]
    assert_exactly_once(records_for(rs, ids), ids)


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_framing_with_newlines_and_large_messages(rs, transport):
    prefix = uuid.uuid4().hex[:8]
    big = make_event(f"{prefix}-big", seq=1, reason="x" * 20_000 + "\nend")  # ~20 KB, escaped newline
    escaped_nl = make_event(f"{prefix}-nl", seq=2, reason="line one\nline two\r\n\ttab ]\"\\ é 日本")
    # JSON may also carry literal newlines between tokens; with octet counting they stay
    # inside one message (a newline-framed transport would cut it in three).
    data = {"id": f"{prefix}-lit", "seq": 3, "ts": TS, "event": "decision", "decision": "allow"}
    literal = Event(raw=json.dumps(data, indent=1).encode())
    assert literal.raw.count(b"\n") >= 3
    batch = [big, escaped_nl, literal, make_event(f"{prefix}-after", seq=4)]
    sink = sink_for(rs, transport)
    try:
        sink.send(batch)
    finally:
        sink.close()
    ids = [ev.id for ev in batch]
    recs = records_for(rs, ids)
    assert_exactly_once(recs, ids)
    by_id = {r["sd_id"]: r for r in recs}
    assert by_id[big.id]["msg"] == big.raw.decode()
    assert len(by_id[big.id]["msg"]) > 20_000
    assert json.loads(by_id[big.id]["msg"])["reason"].endswith("x\nend")
    assert json.loads(by_id[escaped_nl.id]["msg"]) == escaped_nl.data
    # rsyslog escapes control characters on receipt (#012 for LF) but kept one message
    assert by_id[literal.id]["msg"].replace("#012", "\n") == literal.raw.decode()
    assert by_id[f"{prefix}-after"]["msg"] == batch[3].raw.decode()
    # no stray record was made from a fragment
    assert not [r for r in rs.records() if prefix in r["raw"] and r.get("sd_id") not in ids]


def test_ocsf_format(rs):
    prefix = uuid.uuid4().hex[:8]
    decision = make_event(f"{prefix}-d", seq=5, decision="deny", code="policy_deny", rule="acme/no-delete",
                          request={"method": "DELETE", "scheme": "https", "host": "api.example.com",
                                   "port": 443, "path": "/x"})
    other = make_event(f"{prefix}-o", seq=6, event="shipper.note")
    sink = sink_for(rs, "tcp", fmt="ocsf")
    try:
        sink.send([decision, other])
    finally:
        sink.close()
    recs = records_for(rs, [decision.id, other.id])
    by_id = {r["sd_id"]: r for r in recs}
    o = json.loads(by_id[decision.id]["msg"])
    assert (o["class_uid"], o["activity_id"], o["action"]) == (4002, 2, "Denied")
    assert o["egress"] == {"event_id": decision.id, "seq": 5}
    assert o["http_request"]["url"]["hostname"] == "api.example.com"
    assert by_id[decision.id]["pri"] == "132" and by_id[decision.id]["msgid"] == "decision"
    # non-decision events pass through unconverted
    assert json.loads(by_id[other.id]["msg"]) == other.data


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_reconnect_after_rsyslog_restart(own_rs, transport):
    """Each batch is confirmed received before rsyslog goes down: what rsyslog has not
    read from its socket when it stops (even on SIGTERM) or holds in memory when it is
    killed is lost without an error (the window documented in the sink module)."""
    rs = own_rs

    def batch(name):
        return make_batch(4, f"{name}-{uuid.uuid4().hex[:8]}")

    def received(b):
        records_for(rs, [e.id for e in b], settle=0)

    sink = sink_for(rs, transport)
    try:
        b1 = batch("b1")
        sink.send(b1)
        received(b1)
        # receiver down: the dead connection is noticed, the reconnect is refused
        rs.stop()
        b2 = batch("b2")
        with pytest.raises(DeliveryError) as ei:
            sink.send(b2)
        assert ei.value.retryable and ei.value.rejected == ()
        assert sink._sock is None
        rs.start()
        sink.send(b2)  # the shipper resends the failed batch
        received(b2)
        # restart between two batches: the connection closed by the old rsyslog is
        # noticed before sending, so the next batch is not written into it and lost
        rs.restart()
        b3 = batch("b3")
        sink.send(b3)
        received(b3)
        # and after a crash (SIGKILL)
        rs.kill()
        rs.start()
        b4 = batch("b4")
        sink.send(b4)
    finally:
        sink.close()
    ids = [e.id for b in (b1, b2, b3, b4) for e in b]
    assert_exactly_once(records_for(rs, ids), ids)


def test_tls_wrong_ca_is_retryable(rs, tmp_path):
    other = make_test_ca(tmp_path / "other-ca")
    sink = sink_for(rs, "tls", ca=str(other.cert))
    batch = make_batch(2)
    with pytest.raises(DeliveryError) as ei:
        sink.send(batch)
    assert ei.value.retryable and ei.value.rejected == ()
    assert "certificate verification failed" in str(ei.value)
    assert sink._sock is None
    time.sleep(0.3)
    assert not {e.id for e in batch} & set(rs.event_ids())


def test_tls_server_name_is_checked(rs):
    wrong = sink_for(rs, "tls", server_name="not-the-server.test")
    with pytest.raises(DeliveryError) as ei:
        wrong.send(make_batch(1))
    assert ei.value.retryable and "certificate" in str(ei.value)
    # the default name checked is the address host (127.0.0.1 is in the certificate's SANs)
    by_ip = SyslogSink("siem", host="127.0.0.1", port=rs.tls_port, protocol="tls", ca=str(rs.ca_path))
    # and server_name picks another SAN
    by_name = sink_for(rs, "tls", server_name="rsyslog.test")
    b1, b2 = make_batch(2), make_batch(2)
    try:
        by_ip.send(b1)
        by_name.send(b2)
    finally:
        by_ip.close()
        by_name.close()
    ids = [e.id for e in b1 + b2]
    assert_exactly_once(records_for(rs, ids), ids)


def test_mtls_without_client_certificate_is_not_silently_lost(rs):
    """rsyslog checks the client certificate after the TLS 1.3 handshake completed on our
    side and then drops the connection: the sink must notice, not report success."""
    sink = sink_for(rs, "tls")
    sink.port = rs.mtls_port  # same server, but this input requires a client certificate
    batch = make_batch(2)
    try:
        for _ in range(3):
            with pytest.raises(DeliveryError) as ei:
                sink.send(batch)
            assert ei.value.retryable
    finally:
        sink.close()
    assert "closed the connection" in str(ei.value)
    time.sleep(0.3)
    assert not {e.id for e in batch} & set(rs.event_ids())


def test_udp_oversize_is_rejected_not_truncated(rs):
    prefix = uuid.uuid4().hex[:8]
    small1 = make_event(f"{prefix}-s1", seq=1)
    big = make_event(f"{prefix}-big", seq=2, reason="y" * 9000)
    small2 = make_event(f"{prefix}-s2", seq=3)
    sink = sink_for(rs, "udp")
    try:
        assert len(sink.message(big)) > 8192
        with pytest.raises(DeliveryError) as ei:
            sink.send([small1, big, small2])
    finally:
        sink.close()
    assert ei.value.retryable is False
    assert ei.value.rejected == (1,)
    assert "max_message_bytes=8192" in str(ei.value)
    recs = records_for(rs, [small1.id, small2.id])
    assert_exactly_once(recs, [small1.id, small2.id])
    time.sleep(0.2)
    assert not [r for r in rs.records() if f"{prefix}-big" in r["raw"]]


def test_udp_large_message_within_raised_limit_arrives_whole(rs):
    ev = make_event(uuid.uuid4().hex[:8] + "-udp-big", reason="z" * 15_000)
    sink = sink_for(rs, "udp", max_message_bytes=20_000)
    try:
        sink.send([ev])
    finally:
        sink.close()
    (rec,) = records_for(rs, [ev.id])
    assert rec["msg"] == ev.raw.decode()


def test_tcp_max_message_bytes_when_set(rs):
    prefix = uuid.uuid4().hex[:8]
    ok, big = make_event(f"{prefix}-ok"), make_event(f"{prefix}-big", reason="q" * 2000)
    sink = sink_for(rs, "tcp", max_message_bytes=1024)
    try:
        with pytest.raises(DeliveryError) as ei:
            sink.send([big, ok])
    finally:
        sink.close()
    assert (ei.value.retryable, ei.value.rejected) == (False, (0,))
    assert_exactly_once(records_for(rs, [ok.id]), [ok.id])


def test_close_then_send_reconnects(rs):
    sink = sink_for(rs, "tls")
    b1, b2 = make_batch(2), make_batch(2)
    try:
        sink.send(b1)
        sink.close()
        assert sink._sock is None
        sink.close()  # idempotent
        sink.send(b2)
        assert sink._sock is not None
    finally:
        sink.close()
    ids = [e.id for e in b1 + b2]
    assert_exactly_once(records_for(rs, ids), ids)


def test_empty_batch_sends_nothing(rs):
    sink = sink_for(rs, "tcp")
    sink.send([])
    assert sink._sock is None


def test_harness_restart_keeps_ports_and_appends(own_rs):
    rs = own_rs
    ports = (rs.tcp_port, rs.tls_port, rs.mtls_port, rs.udp_port)
    sink = sink_for(rs, "tcp")
    b1, b2 = make_batch(2), make_batch(2)
    try:
        sink.send(b1)
        records_for(rs, [e.id for e in b1], settle=0)
        old_pid = rs.proc.pid
        rs.restart()
        assert rs.proc.pid != old_pid
        assert (rs.tcp_port, rs.tls_port, rs.mtls_port, rs.udp_port) == ports
        sink.send(b2)
    finally:
        sink.close()
    ids = [e.id for e in b1 + b2]
    assert_exactly_once(records_for(rs, ids), ids)
    assert rs.event_ids() == ids
    assert rs.messages() == [e.raw.decode() for e in b1 + b2]


def test_harness_relp_input(tmp_path):
    """Rsyslog(relp=True) adds an acknowledging imrelp input (used by the RELP sink tests)."""
    rs = Rsyslog(tmp_path / "rsyslog-relp", relp=True, udp=False)
    rs.start()
    try:
        ev = make_event(uuid.uuid4().hex[:8] + "-relp", seq=9)
        msg = build_message(ev, "json", hostname=HOSTNAME, procid="1")
        offers = b"relp_version=0\nrelp_software=test\ncommands=syslog"
        with socket.create_connection(("127.0.0.1", rs.relp_port), timeout=5) as s:
            s.sendall(b"1 open %d %s\n" % (len(offers), offers) + b"2 syslog %d %s\n" % (len(msg), msg))
            answers = b""
            while b"2 rsp 6 200 OK\n" not in answers:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answers += chunk
        assert answers.startswith(b"1 rsp ") and b"200 OK" in answers.split(b"\n", 1)[0]
        assert b"2 rsp 6 200 OK\n" in answers
        (rec,) = records_for(rs, [ev.id])
        assert rec["input"] == "relp" and rec["msg"] == ev.raw.decode()
        with pytest.raises(RuntimeError):
            Rsyslog(tmp_path / "no-relp", udp=False).relp_port
    finally:
        rs.stop()
