"""The durable audit spool: every event is written here first, on the proxy's
event loop, before anything else happens to the request; sinks read from it.

Layout of the spool directory (``<state dir>/audit`` by default)::

    spool.id                       random id of this spool (event ids are "<spool id>-<seq>")
    lock                           flock held by the one gateway process writing here
    seg-00000000000000000001.jsonl segments: JSON lines, named by the seq of their first event
    acks/<sink>.json               how far each sink has delivered (segment, byte offset, seq)
    deadletter/<sink>.jsonl        events a receiver refused for their content (never retried)

Every line is one event ``{"id":..,"seq":..,"prev":..,"ts":..,"event":..,...}``:
``seq`` counts up by one across segments and restarts, ``prev`` is the SHA-256 of
the previous line, so the set of segments is one hash chain (``verify_chain``).

Writes. Events written on the running event loop are buffered and written to
the kernel (one write(2)) at the end of the loop iteration, before the loop
waits for I/O again; a deny is written at once. So an allowed request's event
is in the file before its first byte goes upstream, and a SIGKILLed process
loses nothing it audited. ``fsync`` decides durability against power loss:
``interval`` (default: a background thread fsyncs every ``fsync_interval``
seconds, so at most that much is at risk in a power cut), ``always`` (fsync on
the event loop after each write: slow, for the paranoid), ``never`` (only at
segment rotation and shutdown).

Bounds. ``max_bytes`` bounds what sinks have not yet delivered (the backlog
of the slowest sink). When it is exceeded, ``on_full`` decides: ``deny``
(default: the gateway refuses new requests with code ``audit_unavailable``
until the sinks catch up, rather than let traffic go unaudited) or
``drop_oldest`` (the oldest undelivered segments are deleted, a
``spool_overflow`` event records the lost seq range). The check runs in the
keeper thread twice a second, so the backlog can overshoot by half a second of
traffic. Delivered segments are kept for local query and verify while they fit
``retain_bytes`` and are younger than ``retain_age``; the active segment is
never deleted.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets as _secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("egress.audit")

GENESIS = "0" * 64
SEGMENT_RE = re.compile(r"^seg-(\d{20})\.jsonl$")
FSYNC_MODES = ("interval", "always", "never")
LINGER = 0.05  # seconds an event written without flush may wait for the next write(2)
ON_FULL = ("deny", "drop_oldest")
_SECOND: list = [0, ""]
_sha256 = hashlib.sha256


def now_iso() -> str:
    """UTC now as ``2026-11-24T01:02:03.123456Z`` (cheap: on the per-request path)."""
    t = time.time()
    sec = int(t)
    if _SECOND[0] != sec:
        _SECOND[0], _SECOND[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_SECOND[1]}.{int((t - sec) * 1e6):06d}Z"


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.jsonl"


def segment_files(directory: str | Path) -> list[Path]:
    """The spool's segments, oldest first."""
    d = Path(directory)
    try:
        names = [n for n in os.listdir(d) if SEGMENT_RE.match(n)]
    except FileNotFoundError:
        return []
    return [d / n for n in sorted(names)]


class SpoolBusy(RuntimeError):
    pass


@dataclass
class Segment:
    first: int
    path: Path
    size: int


@dataclass(frozen=True)
class Position:
    """Where a reader stands: the segment (by its first seq) and a byte offset in it;
    ``seq`` is the last event delivered (0: none)."""
    segment: int
    offset: int
    seq: int = 0


class Spool:
    enabled = True

    def __init__(self, directory: str | Path, *, segment_bytes: int = 16 << 20, max_bytes: int = 1 << 30,
                 on_full: str = "deny", fsync: str = "interval", fsync_interval: float = 1.0,
                 retain_bytes: int = 256 << 20, retain_age: float = 7 * 86400.0, keeper: bool = True):
        if fsync not in FSYNC_MODES:
            raise ValueError(f"audit.fsync: use one of {', '.join(FSYNC_MODES)}")
        if on_full not in ON_FULL:
            raise ValueError(f"audit.on_full: use one of {', '.join(ON_FULL)}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.dir / "acks").mkdir(exist_ok=True, mode=0o700)
        self.segment_bytes, self.max_bytes, self.on_full = segment_bytes, max_bytes, on_full
        self.fsync_mode, self.fsync_interval = fsync, fsync_interval
        self.retain_bytes, self.retain_age = retain_bytes, retain_age
        self._lockfile = self._take_lock()
        self.spool_id = self._spool_id()
        self._sid = self.spool_id
        self._lock = threading.Lock()
        self._buf: list[bytes] = []  # chained lines not yet written
        self._pending: list[str] = []  # events not yet chained (until the end of the loop iteration)
        self._flush_pending = False
        self.written = 0  # events written by this process
        self.failures = 0
        self.dropped_bytes = 0  # drop_oldest: undelivered bytes deleted
        self.full = False  # backlog over max_bytes (on_full=deny: traffic is refused)
        self.write_error: str | None = None  # the last write failure, until a write succeeds
        self.on_failure: Callable[[], None] | None = None
        self.readers: dict[str, "SpoolReader"] = {}
        self._dirty = False  # written since the last fsync
        self._segments: list[Segment] = []
        self._fd = -1
        self._prev, self._seq = GENESIS, 0
        self.recovered_bytes = self._recover()
        self._stop = threading.Event()
        self._keeper = None
        if keeper:
            self._keeper = threading.Thread(target=self._keep, name="egress-spool-keeper", daemon=True)
            self._keeper.start()

    # -- set-up ------------------------------------------------------------------------------

    def _take_lock(self):
        f = open(self.dir / "lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise SpoolBusy(f"audit spool {self.dir} is in use by another gateway process (pid {holder}); "
                            f"give each process its own state dir or audit.dir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        return f

    def _spool_id(self) -> str:
        p = self.dir / "spool.id"
        try:
            sid = p.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{16}", sid):
                return sid
        except FileNotFoundError:
            pass
        sid = _secrets.token_hex(8)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(sid + "\n")
        os.replace(tmp, p)
        return sid

    def _recover(self) -> int:
        """Find the chain head; cut a torn last line (a write the process died in)."""
        cut = 0
        files = segment_files(self.dir)
        for p in files:
            self._segments.append(Segment(int(SEGMENT_RE.match(p.name).group(1)), p, p.stat().st_size))
        for seg in reversed(self._segments):
            if seg.size == 0:
                continue
            with open(seg.path, "r+b") as f:
                f.seek(max(0, seg.size - (1 << 20)))
                tail = f.read()
                if not tail.endswith(b"\n"):
                    keep = tail.rfind(b"\n") + 1
                    cut = len(tail) - keep
                    seg.size -= cut
                    f.truncate(seg.size)
                    tail = tail[:keep]
                    log.warning("audit spool: cut a torn last line (%d bytes) from %s", cut, seg.path.name)
            lines = tail.rstrip(b"\n").rsplit(b"\n", 1)
            if lines and lines[-1]:
                last = lines[-1]
                try:
                    self._seq = int(json.loads(last)["seq"])
                    self._prev = hashlib.sha256(last).hexdigest()
                except (ValueError, KeyError, TypeError):
                    raise RuntimeError(f"audit spool: the last event of {seg.path} is not a chained event; "
                                       f"move the file away to start a new chain") from None
                break
        if self._segments and self._segments[-1].size < self.segment_bytes:
            seg = self._segments[-1]
        else:
            seg = Segment(self._seq + 1, self.dir / segment_name(self._seq + 1), 0)
            self._segments.append(seg)
        self._fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        return cut

    # -- writing (the proxy's event loop) ---------------------------------------------------

    @property
    def head(self) -> Position:
        with self._lock:
            seg = self._segments[-1]
            return Position(seg.first, seg.size + sum(map(len, self._buf)), self._seq)

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def accepting(self) -> bool:
        """False when traffic must be refused: the spool is full (on_full=deny) or cannot be written."""
        return self.write_error is None and not self.full

    def refusal_reason(self) -> str:
        if self.write_error is not None:
            return f"the audit spool cannot be written ({self.write_error}); traffic is refused until it can"
        return (f"the audit spool is full ({self.pending_bytes() >> 20} MiB not yet delivered to the audit "
                f"sinks, limit {self.max_bytes >> 20} MiB); traffic is refused rather than left unaudited")

    def write(self, event: dict[str, Any]) -> bool:
        """Append one event (a dict; ``ts`` is added) and write it out at once."""
        event.setdefault("ts", now_iso())
        return self.write_line(json.dumps(event, separators=(",", ":"), sort_keys=True, default=str), flush=True)

    def write_line(self, line: str, *, flush: bool = False) -> bool:
        """Append one serialised event (a JSON object, no newline). With ``flush``, it
        (and everything before it) is chained and written to the kernel before this
        returns; without, it goes out with the next flushed event or within
        ``LINGER`` seconds (on the event loop), or at once from another thread."""
        with self._lock:
            self._pending.append(line)
            self.written += 1
            if flush:
                return self._flush_locked()
            if self._flush_pending:
                return True
            loop = _running_loop()
            if loop is not None and threading.current_thread() is threading.main_thread():
                self._flush_pending = True
                loop.call_later(LINGER, self.flush)
                return True
            return self._flush_locked()

    def _chain_pending(self) -> None:
        """Give the pending events their id, seq and prev (the hash chain), in order:
        one bytes chunk of whole lines (on the per-request path: kept lean)."""
        sid, prev, seq, sha = self._sid, self._prev, self._seq, _sha256
        out = []
        for line in self._pending:
            seq += 1
            rec = f'{{"id":"{sid}-{seq}","seq":{seq},"prev":"{prev}",{line[1:]}'.encode()
            prev = sha(rec).hexdigest()
            out.append(rec)
        out.append(b"")
        self._buf.append(b"\n".join(out))
        self._pending.clear()
        self._seq, self._prev = seq, prev

    def flush(self) -> bool:
        with self._lock:
            self._flush_pending = False
            return self._flush_locked()

    def _flush_locked(self) -> bool:
        if self._pending:
            self._chain_pending()
        if not self._buf or self._fd < 0:
            return self._fd >= 0 or not self._buf
        buf = self._buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        seg = self._segments[-1]
        done = 0
        try:
            done = os.write(self._fd, data)
            while done < len(data):  # short write (rare): the rest
                done += os.write(self._fd, memoryview(data)[done:])
        except OSError as e:
            # Keep what was not written (in order) for the next attempt; refuse traffic meanwhile.
            self._buf = [data[done:]]
            seg.size += done
            self.write_error = e.strerror or str(e)
            self.failures += 1
            if self.on_failure is not None:
                self.on_failure()
            return False
        self._buf.clear()
        seg.size += len(data)
        self.write_error = None
        self._dirty = True
        if self.fsync_mode == "always":
            self._fsync()
        if seg.size >= self.segment_bytes:
            self._rotate()
        return True

    def _fsync(self) -> None:
        try:
            os.fsync(self._fd)
            self._dirty = False
        except OSError as e:
            self.write_error = f"fsync: {e.strerror}"

    def _rotate(self) -> None:
        self._fsync()
        os.close(self._fd)
        seg = Segment(self._seq + 1, self.dir / segment_name(self._seq + 1), 0)
        self._fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._segments.append(seg)
        _fsync_dir(self.dir)

    # -- sinks' view ------------------------------------------------------------------------

    def segments(self) -> list[Segment]:
        """A snapshot (oldest first); the last one is being written."""
        with self._lock:
            return [Segment(s.first, s.path, s.size) for s in self._segments]

    def pending_bytes(self) -> int:
        """The slowest reader's backlog (0 with no readers)."""
        with self._lock:
            segs = list(self._segments)
        worst = 0
        for r in list(self.readers.values()):
            worst = max(worst, _backlog(segs, r.acked))
        return worst

    def reader(self, name: str) -> "SpoolReader":
        r = self.readers.get(name)
        if r is None:
            r = self.readers[name] = SpoolReader(self, name)
        return r

    # -- keeper thread: fsync, bounds, retention ---------------------------------------------

    def _keep(self) -> None:
        last_sync = time.monotonic()
        while not self._stop.wait(0.5):
            try:
                if self.fsync_mode == "interval" and time.monotonic() - last_sync >= self.fsync_interval:
                    last_sync = time.monotonic()
                    if self._dirty:
                        fd = self._fd
                        self._dirty = False
                        try:
                            os.fsync(fd)
                        except OSError:
                            pass  # rotated/closed meanwhile: rotation fsyncs itself
                self.maintain()
            except Exception:  # pragma: no cover - the keeper must keep going
                log.exception("audit spool keeper failed")

    def maintain(self, now: float | None = None) -> None:
        """Enforce ``max_bytes`` and retention (the keeper calls it twice a second)."""
        now = time.time() if now is None else now
        if self.write_error is not None:  # retry what could not be written: success reopens traffic
            with self._lock:
                self._flush_locked()
        for r in list(self.readers.values()):
            if r.external:
                r.refresh()
        pending = self.pending_bytes()
        if pending > self.max_bytes and self.on_full == "drop_oldest":
            self._drop_oldest(pending)
            pending = self.pending_bytes()
        self.full = pending > self.max_bytes and self.on_full == "deny"
        # delivered segments: before every reader's segment (all, with no reader), never the active one
        with self._lock:
            segs = list(self._segments[:-1])
        floor = min((r.acked.segment for r in list(self.readers.values())), default=None)
        delivered = [s for s in segs if floor is None or s.first < floor]
        total = sum(s.size for s in delivered)
        for s in delivered:  # oldest first
            too_old = self.retain_age and _mtime(s.path) < now - self.retain_age
            if total > self.retain_bytes or too_old:
                self._delete(s)
                total -= s.size
            else:
                break

    def _drop_oldest(self, pending: int) -> None:
        with self._lock:
            segs = list(self._segments[:-1])
        lost_first = lost_last = None
        for s in segs:
            if pending <= self.max_bytes:
                break
            behind = [r for r in self.readers.values() if r.acked.segment <= s.first]
            if not behind:
                continue
            self._delete(s)
            self.dropped_bytes += s.size
            pending -= s.size
            lost_first = s.first if lost_first is None else lost_first
            nxt = self._next_first(s.first)
            lost_last = (nxt - 1) if nxt else s.first
        if lost_first is not None:
            log.error("audit spool full: dropped undelivered events %s..%s", lost_first, lost_last)
            self.write({"event": "spool_overflow", "lost_first_seq": lost_first, "lost_last_seq": lost_last,
                        "reason": f"spool over {self.max_bytes} bytes with on_full=drop_oldest"})

    def _next_first(self, first: int) -> int | None:
        with self._lock:
            for s in self._segments:
                if s.first > first:
                    return s.first
        return None

    def _delete(self, seg: Segment) -> None:
        with self._lock:
            if seg.first == self._segments[-1].first:
                return
            self._segments = [s for s in self._segments if s.first != seg.first]
        try:
            seg.path.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=2)
        with self._lock:
            if self._fd >= 0:
                self._flush_locked()
                self._fsync()
                os.close(self._fd)
                self._fd = -1
        for r in list(self.readers.values()):
            r.close()
        try:
            self._lockfile.close()
        except OSError:
            pass


class SpoolReader:
    """One sink's cursor over the spool. A new sink starts at the current head
    (its acknowledgement file is written at once, so a crash before its first
    delivery does not skip anything); later it resumes where it acknowledged."""

    def __init__(self, spool: Spool, name: str):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValueError(f"audit sink name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
        self.spool, self.name = spool, name
        self.path = spool.dir / "acks" / f"{name}.json"
        self._fh = None
        self._fh_segment = None
        self.external = False  # delivered by another process: refresh() from the file
        self.skipped = 0  # segments that vanished under this reader (drop_oldest)
        pos = self._load()
        if pos is None:
            spool.flush()
            pos = spool.head
            self.acked = self.position = Position(-1, -1, -1)  # nothing on disk yet: ack() writes the file
            self.ack(pos)
        self.acked = self.position = pos

    def _load(self) -> Position | None:
        try:
            d = json.loads(self.path.read_text())
            return Position(int(d["segment"]), int(d["offset"]), int(d.get("seq", 0)))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"audit sink {self.name}: acknowledgement file {self.path} is corrupt; "
                               f"fix or delete it (deleting resumes delivery at the current end)") from None

    def ack(self, pos: Position, *, durable: bool = True) -> None:
        """Record that everything up to ``pos`` was delivered. ``durable`` also writes
        it to the acknowledgement file (what a restart resumes from); without it, only
        this process's cursor moves (the shipper persists at most once a second: a
        crash re-delivers that much, which receivers de-duplicate)."""
        self.position = pos
        if durable and pos != self.acked:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"segment": pos.segment, "offset": pos.offset, "seq": pos.seq}, f)
            os.replace(tmp, self.path)
            self.acked = pos

    def refresh(self) -> None:
        """Re-read the acknowledgement file (another process delivers for this sink)."""
        try:
            pos = self._load()
        except RuntimeError:
            return
        if pos is not None and pos != self.acked:
            self.acked = self.position = pos

    def backlog(self) -> int:
        return _backlog(self.spool.segments(), self.position)

    def read(self, max_events: int = 500, max_bytes: int = 1 << 20) -> tuple[list[bytes], Position]:
        """Up to ``max_events`` complete lines after the current position, and the
        position after them (pass it to ``ack`` once delivered). Does not move the
        reader by itself."""
        pos = self.position
        segs = self.spool.segments()
        firsts = [s.first for s in segs]
        if pos.segment not in firsts:
            later = [s for s in segs if s.first > pos.segment]
            if not later:
                return [], pos
            if pos.segment < segs[0].first:
                self.skipped += 1
                log.error("audit sink %s: events from seq %d were dropped from the spool before delivery",
                          self.name, pos.seq + 1)
            pos = Position(later[0].first, 0, pos.seq)
        out: list[bytes] = []
        while len(out) < max_events:
            idx = [s.first for s in segs].index(pos.segment)
            seg = segs[idx]
            last = idx == len(segs) - 1
            avail = seg.size - pos.offset
            if avail > 0:
                data = self._read(seg, pos.offset, min(avail, max_bytes))
                end = data.rfind(b"\n") + 1
                if end == 0:
                    if len(data) >= max_bytes and not out:  # one line longer than max_bytes
                        data = self._read(seg, pos.offset, avail)
                        end = data.rfind(b"\n") + 1
                    if end == 0:
                        break
                lines = data[:end].split(b"\n")[:-1]
                room = max_events - len(out)
                if len(lines) > room:
                    lines = lines[:room]
                    end = sum(len(x) + 1 for x in lines)
                out.extend(lines)
                seq = pos.seq
                if lines:
                    m = re.search(rb'"seq":(\d+)', lines[-1])
                    seq = int(m.group(1)) if m else seq + len(lines)
                pos = Position(seg.first, pos.offset + end, seq)
                if sum(map(len, out)) >= max_bytes:
                    break
                continue
            if last:
                break
            pos = Position(segs[idx + 1].first, 0, pos.seq)
        return out, pos

    def _read(self, seg: Segment, offset: int, n: int) -> bytes:
        if self._fh_segment != seg.first:
            if self._fh is not None:
                self._fh.close()
            self._fh = open(seg.path, "rb")
            self._fh_segment = seg.first
        self._fh.seek(offset)
        return self._fh.read(n)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self._fh_segment = None


def _backlog(segs: list[Segment], pos: Position) -> int:
    total = 0
    for s in segs:
        if s.first > pos.segment:
            total += s.size
        elif s.first == pos.segment:
            total += max(0, s.size - pos.offset)
    return total


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class SpoolView:
    """A spool directory seen by a process that reads it but does not write it (the
    shipper process). Notable events it produces go to ``emit`` (the writer process
    records them)."""

    def __init__(self, directory: str | Path, emit: Callable[[dict], None]):
        self.dir = Path(directory)
        self._emit = emit
        self.readers: dict[str, SpoolReader] = {}
        self.seq = 0

    def segments(self) -> list[Segment]:
        out = []
        for p in segment_files(self.dir):
            try:
                out.append(Segment(int(SEGMENT_RE.match(p.name).group(1)), p, p.stat().st_size))
            except FileNotFoundError:
                continue
        return out

    @property
    def head(self) -> Position:
        segs = self.segments()
        if not segs:
            return Position(1, 0, 0)
        last = segs[-1]
        seq = last.first - 1
        if last.size:
            with open(last.path, "rb") as f:
                f.seek(max(0, last.size - 65536))
                tail = f.read(last.size - f.tell()).rstrip(b"\n").rsplit(b"\n", 1)[-1]
            m = re.search(rb'"seq":(\d+)', tail)
            seq = int(m.group(1)) if m else seq
        return Position(last.first, last.size, seq)

    def flush(self) -> bool:
        return True

    def write(self, event: dict) -> bool:
        event.setdefault("ts", now_iso())
        self._emit(event)
        return True

    def reader(self, name: str) -> "SpoolReader":
        r = self.readers.get(name)
        if r is None:
            r = self.readers[name] = SpoolReader(self, name)
        return r


class NullSpool:
    """audit.enabled: false (benchmark baselines only): records nothing."""

    enabled = False
    dir = None
    spool_id = "off"
    written = failures = dropped_bytes = recovered_bytes = 0
    full = False
    write_error = None
    accepting = True
    readers: dict = {}
    seq = 0
    on_failure = None

    def write(self, event) -> bool:
        return True

    def write_line(self, line, *, flush=False) -> bool:
        return True

    def flush(self) -> bool:
        return True

    def pending_bytes(self) -> int:
        return 0

    def segments(self) -> list:
        return []

    def refusal_reason(self) -> str:
        return ""

    def close(self) -> None:
        pass
