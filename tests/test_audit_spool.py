"""The durable audit spool and the shipper: write behaviour, hash chain across
segments and restarts, recovery, readers and acknowledgements, bounds, retention,
delivery with retries and dead letters."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
from hypothesis import given, settings, strategies as st

from gateway.audit import verify_chain
from gateway.audit.shipper import Delivery, Shipper
from gateway.audit.sinks.base import DeliveryError, Sink
from gateway.audit.spool import Spool, SpoolBusy, segment_files
from gateway.metrics import Metrics


def text(d) -> str:
    return "".join(p.read_text() for p in segment_files(d))


def events(d) -> list[dict]:
    return [json.loads(x) for x in text(d).splitlines()]


def spool(tmp_path, **kw) -> Spool:
    kw.setdefault("keeper", False)
    return Spool(tmp_path / "audit", **kw)


class Recorder(Sink):
    """A test receiver: keeps what it is sent; fails while ``fail`` is set."""

    kind = "recorder"

    def __init__(self, name="rec", fail=None):
        super().__init__(name, "json")
        self.got: list[bytes] = []
        self.fail = fail  # None | "retry" | "reject"
        self.calls = 0

    def send(self, batch):
        self.calls += 1
        if self.fail == "retry":
            raise DeliveryError("receiver down")
        if self.fail == "reject":
            raise DeliveryError("bad content", retryable=False, rejected=[0])
        self.got.extend(ev.raw for ev in batch)


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


# -- writing --------------------------------------------------------------------------------

def test_flushed_lines_are_written_at_once_and_others_within_the_linger_time(tmp_path):
    from gateway.audit.spool import LINGER
    sp = spool(tmp_path)

    async def main():
        sp.write_line('{"n":1}')  # a completion: may wait for the next write(2)
        sp.write_line('{"n":2}')
        held = text(sp.dir)
        await asyncio.sleep(LINGER * 2)
        lingered = text(sp.dir)
        sp.write_line('{"n":3}')
        sp.write_line('{"n":4}', flush=True)  # a decision: written now, with what waited before it
        return held, lingered, text(sp.dir)

    held, lingered, flushed = asyncio.run(main())
    assert held == ""  # batched, not one write(2) per line
    assert [json.loads(x)["n"] for x in lingered.splitlines()] == [1, 2]
    assert [json.loads(x)["n"] for x in flushed.splitlines()] == [1, 2, 3, 4]
    assert os.stat(segment_files(sp.dir)[0]).st_mode & 0o777 == 0o640
    sp.close()


def test_event_ids_seq_and_chain(tmp_path):
    sp = spool(tmp_path)
    for i in range(5):
        sp.write({"event": "decision", "i": i})
    sp.close()
    evs = events(tmp_path / "audit")
    assert [e["seq"] for e in evs] == [1, 2, 3, 4, 5]
    assert len({e["id"] for e in evs}) == 5 and all(e["id"] == f"{sp.spool_id}-{e['seq']}" for e in evs)
    assert all(e["ts"].endswith("Z") for e in evs)
    assert verify_chain(segment_files(tmp_path / "audit")) == (5, None)


def test_chain_continues_across_segments_and_restarts(tmp_path):
    sp = spool(tmp_path, segment_bytes=4096, max_bytes=1 << 20)
    for i in range(60):
        sp.write({"event": "decision", "i": i, "pad": "x" * 100})
    sid = sp.spool_id
    sp.close()
    sp = spool(tmp_path, segment_bytes=4096, max_bytes=1 << 20)  # restarted
    assert sp.spool_id == sid
    sp.write({"event": "decision", "i": 60})
    sp.close()
    files = segment_files(tmp_path / "audit")
    assert len(files) > 2
    n, brk = verify_chain(files)
    assert brk is None and n == 61
    # segment names carry the seq of their first event
    for f in files:
        first = json.loads(f.read_text().splitlines()[0])["seq"]
        assert f.name == f"seg-{first:020d}.jsonl"


def test_torn_last_line_is_cut_on_restart(tmp_path):
    sp = spool(tmp_path)
    for i in range(3):
        sp.write({"event": "decision", "i": i})
    sp.close()
    seg = segment_files(tmp_path / "audit")[-1]
    with open(seg, "ab") as f:
        f.write(b'{"id":"x-4","seq":4,"prev":"ab')  # killed in the middle of a write
    sp = spool(tmp_path)
    assert sp.recovered_bytes > 0
    sp.write({"event": "decision", "i": 3})
    sp.close()
    n, brk = verify_chain(segment_files(tmp_path / "audit"))
    assert brk is None and n == 4


def test_a_second_writer_is_refused(tmp_path):
    sp = spool(tmp_path)
    with pytest.raises(SpoolBusy, match="in use by another gateway process"):
        Spool(tmp_path / "audit", keeper=False)
    sp.close()
    Spool(tmp_path / "audit", keeper=False).close()  # free again


def test_write_failure_refuses_traffic_until_a_write_succeeds(tmp_path):
    m = Metrics()
    sp = spool(tmp_path)
    sp.on_failure = m.audit_failures.inc
    real = sp._fd
    sp._fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    assert sp.write({"event": "x"}) is False
    assert not sp.accepting and "cannot be written" in sp.refusal_reason()
    assert "egress_audit_write_failures_total 1.0" in m.render().decode()
    os.close(sp._fd)
    sp._fd = real  # space again: the kept event goes out first, in order
    assert sp.write({"event": "y"}) is True and sp.accepting
    sp.close()
    assert [e["event"] for e in events(tmp_path / "audit")] == ["x", "y"]
    assert verify_chain(segment_files(tmp_path / "audit"))[1] is None


# -- readers ------------------------------------------------------------------------------

def test_a_new_reader_starts_at_the_head_and_resumes_from_its_ack(tmp_path):
    sp = spool(tmp_path, segment_bytes=4096, max_bytes=1 << 20)
    sp.write({"event": "before"})
    r = sp.reader("siem")
    # its position is on disk at once, so another process (the shipper) starts there too
    assert json.loads((sp.dir / "acks" / "siem.json").read_text())["seq"] == 1
    fresh = spool(tmp_path / "empty")
    fresh.reader("s")
    assert json.loads((fresh.dir / "acks" / "s.json").read_text()) == {"segment": 1, "offset": 0, "seq": 0}
    fresh.close()
    assert r.read() == ([], r.position)  # starts at the current end
    for i in range(50):
        sp.write({"event": "decision", "i": i, "pad": "y" * 100})
    lines, pos = r.read(max_events=20)
    assert [json.loads(x)["i"] for x in lines] == list(range(20))
    r.ack(pos)
    sp.close()
    sp = spool(tmp_path, segment_bytes=4096, max_bytes=1 << 20)
    r = sp.reader("siem")
    got = []
    while True:
        lines, pos = r.read(max_events=7)
        if not lines:
            break
        got += [json.loads(x)["i"] for x in lines]
        r.ack(pos)
    assert got == list(range(20, 50))  # across segments, in order, nothing twice
    assert r.position.seq == 51 and r.backlog() == 0
    sp.close()


def test_reader_never_returns_a_partial_line(tmp_path):
    sp = spool(tmp_path)
    r = sp.reader("a")
    sp.write({"event": "one"})
    with open(segment_files(sp.dir)[-1], "ab") as f:  # another write in progress (not yet complete)
        f.write(b'{"id":"z","seq":2')
    sp._segments[-1].size += len(b'{"id":"z","seq":2')
    lines, pos = r.read()
    assert [json.loads(x)["event"] for x in lines] == ["one"]
    sp.close()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 400), min_size=1, max_size=40), batch=st.integers(1, 9))
def test_reading_in_any_batch_size_yields_every_event_once_in_order(tmp_path_factory, sizes, batch):
    d = tmp_path_factory.mktemp("spool")
    sp = Spool(d, segment_bytes=4096, max_bytes=1 << 20, keeper=False)
    r = sp.reader("x")
    for i, n in enumerate(sizes):
        sp.write({"event": "e", "i": i, "pad": "p" * n})
    got = []
    while True:
        lines, pos = r.read(max_events=batch, max_bytes=600)
        if not lines:
            break
        got += [json.loads(x)["i"] for x in lines]
        r.ack(pos)
    sp.close()
    assert got == list(range(len(sizes)))


# -- bounds and retention ------------------------------------------------------------------

def test_full_spool_refuses_traffic_with_on_full_deny(tmp_path):
    sp = spool(tmp_path, segment_bytes=4096, max_bytes=8192)
    sp.reader("slow")
    for i in range(100):
        sp.write({"event": "decision", "pad": "z" * 100})
    sp.maintain()
    assert sp.full and not sp.accepting
    assert "audit spool is full" in sp.refusal_reason()
    r = sp.readers["slow"]
    while True:  # the sink catches up
        lines, pos = r.read(max_events=1000)
        if not lines:
            break
        r.ack(pos)
    sp.maintain()
    assert not sp.full and sp.accepting
    sp.close()


def test_drop_oldest_deletes_undelivered_segments_and_records_it(tmp_path):
    sp = spool(tmp_path, segment_bytes=4096, max_bytes=8192, on_full="drop_oldest")
    r = sp.reader("slow")
    for i in range(200):
        sp.write({"event": "decision", "i": i, "pad": "z" * 100})
    sp.maintain()
    assert sp.accepting and sp.dropped_bytes > 0 and sp.pending_bytes() <= 8192 + 4096
    lines, _ = r.read(max_events=10_000, max_bytes=1 << 24)
    evs = [json.loads(x) for x in lines]
    assert evs[0]["i"] > 0 and r.skipped == 1  # the reader jumped over what was dropped
    overflow = [e for e in evs if e["event"] == "spool_overflow"]
    assert overflow and overflow[0]["lost_first_seq"] == 1
    sp.close()


def test_delivered_segments_are_kept_only_within_retention(tmp_path):
    sp = spool(tmp_path, segment_bytes=4096, max_bytes=1 << 20, retain_bytes=10_000, retain_age=86400)
    for i in range(200):
        sp.write({"event": "decision", "i": i, "pad": "q" * 100})
    before = len(segment_files(sp.dir))
    sp.maintain()  # no sinks: everything is delivered
    after = segment_files(sp.dir)
    assert len(after) < before
    assert sum(p.stat().st_size for p in after[:-1]) <= 10_000
    assert after[-1].name == segment_files(sp.dir)[-1].name  # the active segment stays
    n, brk = verify_chain(after)
    assert brk is None and n > 0  # what is kept still verifies
    r = sp.reader("late")
    old = [s for s in sp.segments() if s.first < r.position.segment]
    assert old  # delivered segments kept within retain_bytes
    sp.write({"event": "x"})
    sp.maintain(now=time.time() + 10 * 86400)  # too old now: delivered segments go, undelivered stay
    assert [s.first for s in sp.segments()] == [r.position.segment]
    assert [json.loads(x)["event"] for x in r.read()[0]] == ["x"]  # the undelivered event is still there
    sp.close()


# -- the shipper ------------------------------------------------------------------------

FAST = Delivery(batch_events=50, batch_wait=0.02, backoff_initial=0.02, backoff_max=0.1)


def test_shipper_delivers_in_order_and_survives_an_outage(tmp_path):
    sp = spool(tmp_path)
    sink = Recorder()
    sh = Shipper(sp, [(sink, FAST)]).start()
    for i in range(120):
        sp.write({"event": "decision", "i": i})
    assert wait_for(lambda: len(sink.got) == 120)
    sink.fail = "retry"
    for i in range(120, 200):
        sp.write({"event": "decision", "i": i})
    assert wait_for(lambda: sh.workers[0].stats.retries >= 3)
    assert not sh.workers[0].stats.up
    sink.fail = None
    assert wait_for(lambda: any(b'"sink_recovered"' in x for x in sink.got))
    sh.stop()
    got = [json.loads(x) for x in sink.got]
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))  # in order, no gaps or repeats
    assert [e["i"] for e in got if e["event"] == "decision"] == list(range(200))
    kinds = [e["event"] for e in events(sp.dir)]
    assert "sink_failure" in kinds and "sink_recovered" in kinds
    sp.close()


def test_shipper_resumes_after_a_restart_without_loss(tmp_path):
    sp = spool(tmp_path)
    sink = Recorder()
    sh = Shipper(sp, [(sink, FAST)]).start()
    for i in range(30):
        sp.write({"event": "decision", "i": i})
    assert wait_for(lambda: len(sink.got) == 30)
    sh.stop()
    for i in range(30, 60):
        sp.write({"event": "decision", "i": i})  # written while no shipper runs
    sp.close()
    sp = spool(tmp_path)
    sink2 = Recorder()
    sh = Shipper(sp, [(sink2, FAST)]).start()
    assert wait_for(lambda: len(sink2.got) >= 30)
    sh.stop()
    sp.close()
    assert [json.loads(x)["i"] for x in sink2.got] == list(range(30, 60))


def test_refused_events_go_to_the_dead_letter_file(tmp_path):
    sp = spool(tmp_path)
    sink = Recorder(fail="reject")
    sh = Shipper(sp, [(sink, Delivery(batch_events=1, batch_wait=0.02))]).start()
    sp.write({"event": "decision", "i": 0})
    assert wait_for(lambda: sh.workers[0].stats.failed >= 1)
    sink.fail = None
    sp.write({"event": "decision", "i": 1})
    assert wait_for(lambda: any(b'"i":1' in x for x in sink.got))
    sh.stop()
    dl = (sp.dir / "deadletter" / "rec.jsonl").read_text().splitlines()
    assert json.loads(dl[0])["i"] == 0
    assert any(e["event"] == "sink_failure" and e["state"] == "rejected" for e in events(sp.dir))
    sp.close()


def test_metrics_show_spool_and_sinks(tmp_path):
    sp = spool(tmp_path)
    sink = Recorder()
    sh = Shipper(sp, [(sink, FAST)]).start()
    m = Metrics()
    m.audit = (sp, sh)
    for i in range(5):
        sp.write({"event": "decision", "i": i})
    assert wait_for(lambda: sh.workers[0].stats.delivered == 5)
    text_ = m.render().decode()
    assert 'egress_audit_sink_delivered_events_total{sink="rec",type="recorder"} 5.0' in text_
    assert 'egress_audit_sink_up{sink="rec",type="recorder"} 1.0' in text_
    assert "egress_audit_events_total 5.0" in text_
    assert 'egress_audit_sink_backlog_bytes{sink="rec",type="recorder"} 0.0' in text_
    sh.stop()
    sp.close()


def test_keeper_thread_fsyncs_and_enforces_bounds(tmp_path):
    sp = Spool(tmp_path / "audit", segment_bytes=4096, max_bytes=8192, fsync_interval=0.1)
    sp.reader("stuck")
    for i in range(100):
        sp.write({"event": "decision", "pad": "k" * 100})
    assert wait_for(lambda: sp.full, timeout=5)
    assert wait_for(lambda: not sp._dirty, timeout=5)
    sp.close()


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder"])
def test_verify_finds_an_edited_deleted_or_reordered_event_across_segments(tmp_path, tamper):
    sp = spool(tmp_path, segment_bytes=4096, max_bytes=1 << 20)
    for i in range(80):
        sp.write({"event": "decision", "i": i, "pad": "v" * 80})
    sp.close()
    files = segment_files(tmp_path / "audit")
    assert len(files) >= 3 and verify_chain(files) == (80, None)
    target = files[1]
    lines = target.read_text().splitlines()
    if tamper == "edit":
        lines[2] = lines[2].replace('"decision"', '"decisioN"')
    elif tamper == "delete":
        del lines[2]
    else:
        lines[2], lines[3] = lines[3], lines[2]
    target.write_text("\n".join(lines) + "\n")
    n, brk = verify_chain(files)
    assert brk is not None and brk.file == str(target) and brk.line in (3, 4)
    assert "changed, removed or moved" in brk.reason
    first_seq = json.loads(files[1].read_text().splitlines()[0])["seq"]
    # everything before the break verified (an edited event is caught by the one after it)
    assert n == first_seq - 1 + (3 if tamper == "edit" else 2)


def test_secret_fetches_are_audited_by_name_only(tmp_path, monkeypatch):
    from dataclasses import replace as dc_replace

    from gateway.config import load_config
    from gateway.runtime import Gateway
    from gateway.secrets.refs import parse_ref
    monkeypatch.setenv("EGRESS_TEST_SECRET_VALUE", "s3cr3t-value-123")
    cfg = load_config(None, state_dir=str(tmp_path / "state"))
    gw = Gateway(dc_replace(cfg))
    try:
        async def fetch():
            v = await gw.secrets.resolve(parse_ref("env:EGRESS_TEST_SECRET_VALUE"), owner="tok-1")
            await gw.secrets.resolve(parse_ref("env:EGRESS_TEST_SECRET_VALUE"), owner="tok-1")  # cached
            try:
                await gw.secrets.resolve(parse_ref("env:EGRESS_TEST_MISSING_VALUE"))
            except Exception:
                pass
            return v
        assert asyncio.run(fetch()) == "s3cr3t-value-123"
    finally:
        gw.close()
    evs = [e for e in events(tmp_path / "state" / "audit") if e["event"] == "secret_fetched"]
    assert [(e["ref"], e["ok"]) for e in evs] == [("env:EGRESS_TEST_SECRET_VALUE", True),
                                                   ("env:EGRESS_TEST_MISSING_VALUE", False)]
    assert "reason" in evs[1] and evs[0]["ms"] >= 0
    assert "s3cr3t-value-123" not in text(tmp_path / "state" / "audit")
