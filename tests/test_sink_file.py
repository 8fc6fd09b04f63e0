"""The rotating JSON-lines file sink (gateway.audit.sinks.file)."""

from __future__ import annotations

import calendar
import errno
import gzip
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit import GENESIS, verify_chain
from gateway.audit.sinks import file as filemod
from gateway.audit.sinks.base import DeliveryError, Event
from gateway.audit.sinks.file import FileSink, audit_files, open_audit_file, parse_duration, parse_size

ROTATED = re.compile(r"audit-(\d{8}T\d{6}Z)-(\d{6})\.jsonl(\.gz)?")
T0 = calendar.timegm((2026, 11, 24, 10, 59, 59))  # a UTC wall clock for injected clocks


class Chain:
    """Spool-like events: seq 1..n, prev = SHA-256 of the previous line."""

    def __init__(self, pad: int = 0):
        self.seq, self.prev, self.pad = 0, GENESIS, pad
        self.lines: list[bytes] = []

    def batch(self, n: int, **extra) -> list[Event]:
        out = []
        for _ in range(n):
            self.seq += 1
            ev = {"seq": self.seq, "prev": self.prev, "id": f"ev-{self.seq}", "ts": "2026-11-24T01:02:03.000001Z",
                  "event": "policy_reload", "pad": "x" * self.pad, **extra}
            line = json.dumps(ev, separators=(",", ":")).encode()
            self.prev = hashlib.sha256(line).hexdigest()
            self.lines.append(line)
            out.append(Event(line))
        return out


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def read_lines(files) -> list[bytes]:
    out = []
    for f in files:
        with open_audit_file(f) as fh:
            out += [line.rstrip(b"\n") for line in fh]
    return out


def sink(tmp_path, **kw) -> FileSink:
    kw.setdefault("path", tmp_path / "logs" / "audit.jsonl")
    return FileSink("f", kw.pop("fmt", "json"), **kw)


# -- writing -----------------------------------------------------------------------------------

def test_writes_batches_untouched_with_fsync_and_the_chain_verifies(tmp_path, monkeypatch):
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd))[1])
    s = sink(tmp_path, compress=False)
    c = Chain()
    for n in (3, 1, 5):
        s.send(c.batch(n))
    path = tmp_path / "logs" / "audit.jsonl"
    assert path.read_bytes() == b"".join(line + b"\n" for line in c.lines)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert fsynced.count(s._fd) == 3  # one fsync per batch
    assert audit_files(path) == [path] and s.rotated_files() == []
    assert verify_chain(audit_files(path)) == (9, None)
    assert s.describe() == f"file:{path}"
    s.close()


def test_fsync_can_be_turned_off(tmp_path, monkeypatch):
    s = sink(tmp_path, fsync=False)
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    s.send(Chain().batch(2))
    assert calls == []
    assert len((tmp_path / "logs" / "audit.jsonl").read_bytes().splitlines()) == 2


def test_empty_batch_creates_nothing(tmp_path):
    s = sink(tmp_path)
    s.send([])
    assert not (tmp_path / "logs" / "audit.jsonl").exists()


# -- size rotation -----------------------------------------------------------------------------

def test_size_rotation_keeps_batches_whole_and_files_in_order(tmp_path):
    c = Chain(pad=150)
    line_len = len(c.batch(1)[0].raw) + 1
    c = Chain(pad=150)
    s = sink(tmp_path, max_bytes=line_len * 7, compress=False)
    for _ in range(10):
        s.send(c.batch(3))  # two batches (6 lines) fit a file, the third rotates
    path = tmp_path / "logs" / "audit.jsonl"
    rotated = s.rotated_files()
    assert len(rotated) == 4
    assert [int(ROTATED.fullmatch(f.name).group(2)) for f in rotated] == [1, 2, 3, 4]
    for f in rotated + [path]:
        n = len(f.read_bytes().splitlines())
        assert n % 3 == 0 and f.stat().st_size <= line_len * 7
    assert audit_files(path) == rotated + [path]
    assert read_lines(audit_files(path)) == c.lines
    assert verify_chain(audit_files(path)) == (30, None)


def test_a_batch_larger_than_max_bytes_goes_into_one_file(tmp_path):
    c = Chain(pad=100)
    s = sink(tmp_path, max_bytes=300, compress=False)
    s.send(c.batch(1))
    s.send(c.batch(10))  # > 300 bytes: rotates first, then all ten in one file
    path = tmp_path / "logs" / "audit.jsonl"
    assert len(s.rotated_files()) == 1
    assert len(path.read_bytes().splitlines()) == 10
    s.send(c.batch(1))
    assert len(s.rotated_files()) == 2
    assert verify_chain(audit_files(path)) == (12, None)


def test_rotation_numbers_continue_across_restarts_and_order_beats_the_clock(tmp_path):
    clock = Clock()
    c = Chain()
    s = sink(tmp_path, max_bytes=1, compress=False, clock=clock)
    s.send(c.batch(1))
    s.send(c.batch(1))
    s.close()
    clock.t -= 86400  # the clock went back a day
    s2 = sink(tmp_path, max_bytes=1, compress=False, clock=clock)
    s2.send(c.batch(1))
    rotated = s2.rotated_files()
    assert [ROTATED.fullmatch(f.name).group(2) for f in rotated] == ["000001", "000002"]
    assert ROTATED.fullmatch(rotated[1].name).group(1) < ROTATED.fullmatch(rotated[0].name).group(1)
    assert verify_chain(audit_files(tmp_path / "logs" / "audit.jsonl")) == (3, None)


# -- time rotation -----------------------------------------------------------------------------

def test_time_rotation_at_utc_interval_boundaries(tmp_path):
    clock = Clock(T0)  # 10:59:59Z
    c = Chain()
    s = sink(tmp_path, rotate_interval=3600, compress=False, clock=clock)
    s.send(c.batch(2))
    clock.t = T0 + 0.5
    s.send(c.batch(1))
    assert s.rotated_files() == []
    clock.t = T0 + 1  # 11:00:00Z: a new hour
    s.send(c.batch(1))
    rotated = s.rotated_files()
    assert [f.name for f in rotated] == ["audit-20261124T110000Z-000001.jsonl"]
    assert len(rotated[0].read_bytes().splitlines()) == 3
    clock.t = T0 + 3600  # 11:59:59Z, same hour
    s.send(c.batch(1))
    assert len(s.rotated_files()) == 1
    clock.t = T0 + 3 * 3600  # idle hours: one rotation, not one per hour
    s.send(c.batch(1))
    assert len(s.rotated_files()) == 2
    assert verify_chain(audit_files(tmp_path / "logs" / "audit.jsonl")) == (6, None)


def test_daily_rotation_from_config_and_an_old_file_at_start(tmp_path):
    path = tmp_path / "audit.jsonl"
    c = Chain()
    path.write_bytes(b"".join(e.raw + b"\n" for e in c.batch(2)))
    yesterday = T0 - 86400
    os.utime(path, (yesterday, yesterday))
    clock = Clock(T0)
    s = FileSink.from_config("f", "json", {"path": str(path), "rotate_interval": "daily", "compress": False}, None)
    s.clock = clock
    s.send(c.batch(1))
    assert [f.name for f in s.rotated_files()] == ["audit-20261124T105959Z-000001.jsonl"]
    assert path.read_bytes() == c.lines[2] + b"\n"
    assert verify_chain(audit_files(path)) == (3, None)


def test_an_empty_file_is_not_rotated(tmp_path):
    clock = Clock(T0)
    s = sink(tmp_path, rotate_interval=60, clock=clock)
    s.send([])
    clock.t += 600
    s.send(Chain().batch(1))
    assert s.rotated_files() == []


# -- compression -------------------------------------------------------------------------------

def test_rotated_files_are_gzipped_and_the_set_verifies(tmp_path):
    c = Chain(pad=50)
    s = sink(tmp_path, max_bytes=500)
    for _ in range(8):
        s.send(c.batch(2))
    logs = tmp_path / "logs"
    rotated = s.rotated_files()
    assert len(rotated) >= 3 and all(f.name.endswith(".jsonl.gz") for f in rotated)
    assert not [p for p in logs.iterdir() if p.name.endswith((".tmp",)) or ROTATED.fullmatch(p.name)
                and not p.name.endswith(".gz")]
    assert rotated[0].read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
    assert gzip.decompress(rotated[0].read_bytes()).splitlines() == c.lines[:2 * (500 // (2 * len(c.lines[0]) + 2))]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o640 for f in rotated)
    assert read_lines(audit_files(logs / "audit.jsonl")) == c.lines
    assert verify_chain(audit_files(logs / "audit.jsonl")) == (16, None)


def test_open_audit_file_reads_plain_and_gz(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"a":1}\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as g:
        g.write(b'{"b":2}\n')
    assert read_lines([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"]) == [b'{"a":1}', b'{"b":2}']


def test_a_failed_compression_does_not_fail_the_batch_and_is_finished_at_start(tmp_path, monkeypatch):
    c = Chain()

    def broken(src):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filemod, "_compress", broken)
    s = sink(tmp_path, max_bytes=1)
    s.send(c.batch(1))
    s.send(c.batch(1))  # rotates; compression fails but the batch is delivered
    assert [f.name.endswith(".jsonl") for f in s.rotated_files()] == [True]
    s.close()
    monkeypatch.undo()
    s2 = sink(tmp_path, max_bytes=1)  # start: finishes the compression
    assert [f.name.endswith(".jsonl.gz") for f in s2.rotated_files()] == [True]
    assert verify_chain(audit_files(tmp_path / "logs" / "audit.jsonl")) == (2, None)


def test_start_finishes_every_kind_of_interrupted_compression(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    c = Chain()
    b1, b2, b3 = (b"".join(e.raw + b"\n" for e in c.batch(2)) for _ in range(3))
    f1 = logs / "audit-20261124T010000Z-000001.jsonl"  # rotated, never compressed
    f2 = logs / "audit-20261124T020000Z-000002.jsonl"  # crash while writing the .gz.tmp
    f3 = logs / "audit-20261124T030000Z-000003.jsonl"  # crash after the rename, before the unlink
    f1.write_bytes(b1)
    f2.write_bytes(b2)
    (logs / (f2.name + ".gz.tmp")).write_bytes(gzip.compress(b2)[:10])
    f3.write_bytes(b3)
    (logs / (f3.name + ".gz")).write_bytes(gzip.compress(b3))
    assert [f.name for f in audit_files(logs / "audit.jsonl")] == [f1.name, f2.name, f3.name + ".gz"]
    s = sink(tmp_path)
    assert sorted(p.name for p in logs.iterdir()) == [f1.name + ".gz", f2.name + ".gz", f3.name + ".gz"]
    assert read_lines(s.rotated_files()) == c.lines
    s.send(c.batch(1))
    assert verify_chain(audit_files(logs / "audit.jsonl")) == (7, None)


def test_without_compress_start_only_cleans_up(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    f1 = logs / "audit-20261124T010000Z-000001.jsonl"
    f1.write_bytes(b'{"seq":1}\n')
    (logs / (f1.name + ".gz.tmp")).write_bytes(b"junk")
    sink(tmp_path, compress=False)
    assert sorted(p.name for p in logs.iterdir()) == [f1.name]


# -- retention ---------------------------------------------------------------------------------

def test_retention_by_count_keeps_the_newest(tmp_path):
    c = Chain()
    s = sink(tmp_path, max_bytes=1, max_files=2)
    for _ in range(6):
        s.send(c.batch(1))
    rotated = s.rotated_files()
    assert [ROTATED.fullmatch(f.name).group(2) for f in rotated] == ["000004", "000005"]
    path = tmp_path / "logs" / "audit.jsonl"
    assert read_lines(audit_files(path)) == c.lines[3:]
    assert verify_chain(audit_files(path)) == (3, None)  # the kept tail is one intact chain
    assert len(list(path.parent.iterdir())) == 3


def test_max_files_zero_keeps_only_the_active_file(tmp_path):
    c = Chain()
    s = sink(tmp_path, max_bytes=1, max_files=0)
    for _ in range(3):
        s.send(c.batch(1))
    path = tmp_path / "logs" / "audit.jsonl"
    assert [p.name for p in path.parent.iterdir()] == ["audit.jsonl"]
    assert path.read_bytes() == c.lines[-1] + b"\n"


def test_retention_by_age(tmp_path):
    clock = Clock(T0)
    c = Chain()
    s = sink(tmp_path, max_bytes=1, max_age=parse_duration("1h"), max_files=None, clock=clock)
    s.send(c.batch(1))
    s.send(c.batch(1))           # rotated at T0
    clock.t = T0 + 1800
    s.send(c.batch(1))           # rotated at T0+30m
    assert len(s.rotated_files()) == 2
    clock.t = T0 + 3601 + 60     # T0's file is older than an hour (retention runs at most once a minute)
    s.send(c.batch(1))
    kept = s.rotated_files()
    assert [ROTATED.fullmatch(f.name).group(1) for f in kept] == ["20261124T112959Z", "20261124T120100Z"]
    clock.t = T0 + 10 * 3600     # everything rotated is old now; the active file stays
    s.send(c.batch(1))
    assert len(s.rotated_files()) == 1  # only the file rotated just now
    assert (tmp_path / "logs" / "audit.jsonl").read_bytes() == c.lines[-1] + b"\n"


def test_retention_applies_at_start(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    for i in range(1, 5):
        (logs / f"audit-20261124T0{i}0000Z-{i:06d}.jsonl.gz").write_bytes(gzip.compress(b"{}\n"))
    s = sink(tmp_path, max_files=1)
    assert [f.name for f in s.rotated_files()] == ["audit-20261124T040000Z-000004.jsonl.gz"]


# -- failures ----------------------------------------------------------------------------------

def _enospc_after_half(monkeypatch, s: FileSink, times: int = 1):
    real_write = os.write
    state = {"left": times}

    def write(fd, data):
        if fd == s._fd and state["left"] > 0:
            state["left"] -= 1
            real_write(fd, bytes(data[:len(data) // 2]))  # a torn batch on disk...
            raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk is full
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_disk_full_is_retryable_and_leaves_no_torn_line(tmp_path, monkeypatch):
    c = Chain(pad=40)
    s = sink(tmp_path, compress=False)
    s.send(c.batch(2))
    path = tmp_path / "logs" / "audit.jsonl"
    size = path.stat().st_size
    batch = c.batch(4)
    _enospc_after_half(monkeypatch, s)
    with pytest.raises(DeliveryError) as ei:
        s.send(batch)
    assert ei.value.retryable and "No space left" in str(ei.value)
    assert path.stat().st_size == size  # truncated back
    s.send(batch)  # the shipper's retry
    assert path.read_bytes() == b"".join(line + b"\n" for line in c.lines)
    assert verify_chain([path]) == (6, None)


def test_a_failed_truncation_is_repaired_before_the_next_batch(tmp_path, monkeypatch):
    c = Chain(pad=40)
    s = sink(tmp_path, compress=False)
    s.send(c.batch(1))
    path = tmp_path / "logs" / "audit.jsonl"
    size = path.stat().st_size
    batch = c.batch(3)
    _enospc_after_half(monkeypatch, s)
    real_truncate = os.ftruncate
    fail = {"n": 1}

    def ftruncate(fd, n):
        if fail["n"]:
            fail["n"] -= 1
            raise OSError(errno.EIO, "I/O error")
        return real_truncate(fd, n)

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    with pytest.raises(DeliveryError) as ei:
        s.send(batch)
    assert ei.value.retryable
    assert path.stat().st_size > size  # the torn bytes are still there...
    s.send(batch)                       # ...and are cut off before the retry is appended
    assert verify_chain([path]) == (4, None)
    assert path.read_bytes().count(b"\n") == 4


def test_a_parent_that_is_a_file_is_a_retryable_error(tmp_path):
    (tmp_path / "blocker").write_text("not a directory")
    s = FileSink("f", path=tmp_path / "blocker" / "audit.jsonl")
    with pytest.raises(DeliveryError) as ei:
        s.send(Chain().batch(1))
    assert ei.value.retryable and "cannot open" in str(ei.value)


def test_a_failed_rename_at_rotation_is_retryable_and_loses_nothing(tmp_path, monkeypatch):
    c = Chain()
    s = sink(tmp_path, max_bytes=1, compress=False)
    s.send(c.batch(1))
    real_rename = os.rename

    def rename(a, b):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "rename", rename)
    batch = c.batch(1)
    with pytest.raises(DeliveryError) as ei:
        s.send(batch)
    assert ei.value.retryable and "rotate" in str(ei.value)
    monkeypatch.setattr(os, "rename", real_rename)
    s.send(batch)
    assert verify_chain(audit_files(tmp_path / "logs" / "audit.jsonl")) == (2, None)


def test_a_torn_last_line_from_a_crash_is_dropped_at_start(tmp_path):
    path = tmp_path / "logs" / "audit.jsonl"
    path.parent.mkdir()
    c = Chain()
    first = c.batch(2)
    torn = c.batch(2)  # written halfway when the process died, never acknowledged
    whole = b"".join(e.raw + b"\n" for e in torn)
    path.write_bytes(b"".join(e.raw + b"\n" for e in first) + whole[:len(whole) // 2 + 3])
    s = sink(tmp_path, compress=False)
    s.send(torn)  # redelivered by the shipper
    assert verify_chain([path]) == (4, None)
    assert path.read_bytes() == b"".join(line + b"\n" for line in c.lines)


def test_a_redelivered_batch_is_not_duplicated(tmp_path):
    """A crash between the write and the shipper's acknowledgement: the batch comes again."""
    c = Chain()
    s = sink(tmp_path, compress=False)
    s.send(c.batch(2))
    batch = c.batch(3)
    s.send(batch)
    s.close()
    s2 = sink(tmp_path, compress=False)
    s2.send(batch + c.batch(2))  # at-least-once: the unacknowledged batch plus new events
    path = tmp_path / "logs" / "audit.jsonl"
    assert path.read_bytes() == b"".join(line + b"\n" for line in c.lines)
    again = c.lines[-2:]
    s2.send([Event(again[0]), Event(again[1])] + c.batch(1))  # redelivered from mid-batch
    s2.send([Event(c.lines[-1])])                             # a batch entirely already written
    assert path.read_bytes() == b"".join(line + b"\n" for line in c.lines)
    assert verify_chain([path]) == (8, None)


# -- formats -----------------------------------------------------------------------------------

DECISION = {
    "event": "decision", "request_id": "req-1", "decision": "deny", "code": "policy_deny", "rule": "acme/x",
    "reason": "no", "source": "10.0.0.2",
    "request": {"method": "GET", "scheme": "https", "host": "api.example.com", "port": 443, "path": "/x"},
    "principal": {"tenant": "acme", "agent": "a1", "session": "s1", "token_id": "t1"},
}


@pytest.mark.parametrize("fmt,check", [
    ("ocsf", lambda o: o["class_uid"] == 4002 and o["activity_id"] == 3),
    ("ecs", lambda o: o["ecs"]["version"].startswith("8.") and o["http"]["request"]["method"] == "GET"),
])
def test_ocsf_and_ecs_write_one_json_object_per_line(tmp_path, fmt, check):
    c = Chain()
    s = sink(tmp_path, fmt=fmt, max_bytes=2000)
    for _ in range(4):
        s.send(c.batch(2, **DECISION))
    files = audit_files(tmp_path / "logs" / "audit.jsonl")
    assert len(files) > 1  # rotated and compressed too
    lines = read_lines(files)
    assert len(lines) == 8
    for i, line in enumerate(lines, 1):
        o = json.loads(line)
        assert check(o)
        assert o["egress"] == {"event_id": f"ev-{i}", "seq": i}


# -- configuration -----------------------------------------------------------------------------

def test_from_config_parses_every_option(tmp_path):
    s = FileSink.from_config("main", "ecs", {
        "path": str(tmp_path / "a.jsonl"), "max_bytes": "1GB", "rotate_interval": "hourly", "compress": False,
        "max_files": 7, "max_age": "7d", "fsync": False}, None)
    assert (s.name, s.fmt, s.path) == ("main", "ecs", tmp_path / "a.jsonl")
    assert (s.max_bytes, s.rotate_interval, s.compress, s.max_files, s.max_age, s.fsync) == \
        (10**9, 3600.0, False, 7, 7 * 86400.0, False)
    d = FileSink.from_config("d", "json", {"path": str(tmp_path / "b.jsonl")}, None)
    assert (d.max_bytes, d.rotate_interval, d.compress, d.max_files, d.max_age, d.fsync) == \
        (100 << 20, None, True, 30, None, True)
    assert FileSink.from_config("d", "json", {"path": str(tmp_path / "b.jsonl"), "max_bytes": 4096,
                                              "rotate_interval": 900, "max_files": None}, None).max_files is None


@pytest.mark.parametrize("options,message", [
    ({}, "path is required"),
    ({"path": ""}, "path is required"),
    ({"path": 5}, "path is required"),
    ({"path": "{d}"}, "is a directory"),
    ({"path": "{d}/a.jsonl", "max_bytes": "lots"}, "max_bytes: not a size"),
    ({"path": "{d}/a.jsonl", "max_bytes": 0}, "max_bytes must be > 0"),
    ({"path": "{d}/a.jsonl", "max_bytes": -1}, "max_bytes: size must not be negative"),
    ({"path": "{d}/a.jsonl", "rotate_interval": "weekly"}, "rotate_interval: not a duration"),
    ({"path": "{d}/a.jsonl", "rotate_interval": 0}, "rotate_interval: rotation interval must be > 0"),
    ({"path": "{d}/a.jsonl", "compress": "yes"}, "compress must be true or false"),
    ({"path": "{d}/a.jsonl", "fsync": 1}, "fsync must be true or false"),
    ({"path": "{d}/a.jsonl", "max_files": -1}, "max_files must be a whole number"),
    ({"path": "{d}/a.jsonl", "max_files": "3"}, "max_files must be a whole number"),
    ({"path": "{d}/a.jsonl", "max_files": True}, "max_files must be a whole number"),
    ({"path": "{d}/a.jsonl", "max_age": "forever"}, "max_age: not a duration"),
    ({"path": "{d}/a.jsonl", "max_age": "0s"}, "max_age must be > 0"),
    ({"path": "{d}/a.jsonl", "maxbytes": 1, "colour": "red"},
     "unknown option(s) colour, maxbytes (known: path, max_bytes, rotate_interval, compress, max_files, "
     "max_age, fsync)"),
])
def test_from_config_rejects_bad_options(tmp_path, options, message):
    options = {k: v.format(d=tmp_path) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(ValueError) as ei:
        FileSink.from_config("siem1", "json", options, None)
    assert str(ei.value).startswith("audit.sinks.siem1: ")
    assert message in str(ei.value)


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        FileSink.from_config("x", "cef", {"path": str(tmp_path / "a.jsonl")}, None)


# -- parse_size / parse_duration ---------------------------------------------------------------

SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
              "T": 10**12, "TB": 10**12, "Ki": 1024, "KiB": 1024, "Mi": 1 << 20, "MiB": 1 << 20,
              "Gi": 1 << 30, "GiB": 1 << 30, "Ti": 1 << 40, "TiB": 1 << 40}
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@given(st.integers(min_value=0, max_value=10**15), st.sampled_from(sorted(SIZE_UNITS)),
       st.sampled_from(["", " "]), st.booleans())
def test_parse_size_round_trips(n, unit, space, lower):
    text = f"{n}{space}{unit}"
    assert parse_size(text.lower() if lower else text) == n * SIZE_UNITS[unit]
    assert parse_size(n) == n


def test_parse_size_examples():
    assert parse_size("100MiB") == 100 * 1024 * 1024
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size(" 1GB ") == 10**9
    assert parse_size(".5KiB") == 512


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(sorted(DURATION_UNITS)))
def test_parse_duration_round_trips(n, unit):
    assert parse_duration(f"{n}{unit}") == pytest.approx(n * DURATION_UNITS[unit])
    assert parse_duration(n) == float(n)
    assert parse_duration(str(n)) == float(n)


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=1000), st.sampled_from(sorted(DURATION_UNITS))),
                min_size=1, max_size=4))
def test_parse_duration_compound(parts):
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == pytest.approx(sum(n * DURATION_UNITS[u] for n, u in parts))


def test_parse_duration_examples():
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    assert parse_duration(2.5) == 2.5


GARBAGE = ["", " ", "MB", "ten", "-1", "-1MB", "1.5.5MB", "1e3", "10XB", "1 0", "nan", "inf", "0x10",
           "1,000", "1MB2", "1.5B", "--", "1_000"]


@pytest.mark.parametrize("text", GARBAGE + [None, True, 1.5, -3, [1], {"a": 1}])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text", ["", " ", "h", "ten", "-1", "-1h", "1.5.5h", "1e3", "1y", "1H", "1 h", "1h 30m",
                                  "nan", "inf", "9" * 400, "h1", None, True, -1, float("nan"), float("inf"),
                                  10**400, [1]])
def test_parse_duration_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@settings(max_examples=300)
@given(st.one_of(st.text(), st.text(alphabet="0123456789.kKmMgGtTiIbBsShHdDwW -+e")))
def test_parsers_return_a_value_or_raise_value_error(text):
    for parse in (parse_size, parse_duration):
        try:
            v = parse(text)
        except ValueError:
            continue
        assert v >= 0 and any(ch.isdigit() for ch in text)


@given(st.text(alphabet=st.characters(blacklist_categories=("Nd",))))
def test_text_without_digits_is_never_a_size_or_duration(text):
    with pytest.raises(ValueError):
        parse_size(text)
    with pytest.raises(ValueError):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**6),
       st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=4)
       .filter(lambda u: u not in {k.lower() for k in SIZE_UNITS}))
def test_unknown_size_units_are_rejected(n, unit):
    with pytest.raises(ValueError):
        parse_size(f"{n}{unit}")


def test_audit_files_order_is_the_chain_order(tmp_path):
    c = Chain()
    s = sink(tmp_path, max_bytes=1)
    for _ in range(3):
        s.send(c.batch(2))
    files = audit_files(tmp_path / "logs" / "audit.jsonl")
    assert [f.name.endswith(".gz") for f in files] == [True, True, False]
    assert verify_chain(files) == (6, None)
    n, brk = verify_chain(files[::-1])  # any other order breaks the chain
    assert brk is not None and brk.file == str(files[1]) and "chain broken" in brk.reason
