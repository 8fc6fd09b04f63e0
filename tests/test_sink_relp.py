"""RELP sink: the frame codec (Hypothesis), and delivery to a real rsyslog (imrelp)
including a receiver restart between batches."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from gateway.audit.sinks.base import DeliveryError
from gateway.audit.sinks.relp import FrameReader, RelpError, RelpSink, encode_frame
from tests.support.procs import free_port
from tests.support.rsyslog import Rsyslog, missing_reason
from tests.support.siem import make_events


@given(frames=st.lists(st.tuples(st.integers(1, 999_999_999), st.sampled_from([b"rsp", b"syslog", b"open"]),
                                 st.binary(max_size=300)), max_size=20),
       cuts=st.lists(st.integers(0, 4000), max_size=6))
def test_frames_round_trip_however_the_stream_is_cut(frames, cuts):
    stream = b"".join(encode_frame(t, c, d) for t, c, d in frames)
    r = FrameReader()
    got = []
    last = 0
    for c in sorted(set(min(c, len(stream)) for c in cuts)) + [len(stream)]:
        got += r.feed(stream[last:c])
        last = c
    assert got == [(t, c, d) for t, c, d in frames]
    assert r.buf == b""


def test_garbage_is_refused():
    with pytest.raises(RelpError):
        FrameReader().feed(b"1 rsp 5 abc\x00\x00\x00\x00")  # data of the wrong length: no trailer
    with pytest.raises(RelpError):
        FrameReader().feed(b"x" * 100)


def test_from_config_validation():
    with pytest.raises(ValueError, match="address"):
        RelpSink.from_config("r", "json", {}, None)
    with pytest.raises(ValueError, match="unknown option"):
        RelpSink.from_config("r", "json", {"address": "127.0.0.1:1", "protocol": "tcp"}, None)
    s = RelpSink.from_config("r", "ocsf", {"address": "127.0.0.1:2514", "tls": True}, None)
    assert s.describe() == "relp+tls://127.0.0.1:2514"


def test_unreachable_receiver_is_a_retryable_error():
    s = RelpSink("r", address=f"127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(DeliveryError) as e:
        s.send(make_events(2))
    assert e.value.retryable and "connection refused" in str(e.value)


@pytest.mark.skipif(missing_reason() is not None, reason=f"real rsyslog needed: {missing_reason()}")
def test_delivery_to_real_rsyslog_and_across_its_restart(tmp_path):
    rs = Rsyslog(tmp_path / "rsyslog", relp=True)
    try:
        rs.start()
        s = RelpSink("r", address=f"127.0.0.1:{rs.relp_port}", window=16)
        first = make_events(300)  # more than the window: pipelined in several rounds
        s.send(first)
        assert rs.event_ids()[:300] == [e.id for e in first]  # acknowledged = already written
        rs.stop()
        with pytest.raises(DeliveryError) as e:
            s.send(make_events(1))
        assert e.value.retryable
        rs.start()
        second = make_events(5)
        s.send(second)  # reconnects
        recs = rs.wait_for(305, settle=0)
        assert [r["sd_id"] for r in recs][-5:] == [e.id for e in second]
        assert json.loads(recs[0]["msg"])["id"] == first[0].id
        assert recs[0]["app"] == "egress-gateway" and recs[0]["msgid"] == first[0].data["event"]
        s.close()
    finally:
        rs.stop()
