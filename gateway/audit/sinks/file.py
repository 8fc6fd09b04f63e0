"""File sink: audit events appended to a local JSON-lines file, rotated by size
and/or time, optionally gzip-compressed, with retention.

Layout (``path = /var/log/egress/audit.jsonl``)::

    audit.jsonl                                  the active file (appended to)
    audit-20261124T010203Z-000001.jsonl.gz       rotated files: <stem>-<UTC time of the
    audit-20261124T020000Z-000002.jsonl.gz       rotation>-<n>.jsonl[.gz]

``n`` is the rotation number: one more than the highest ``n`` of the rotated
files present when the sink starts, so it keeps growing across restarts and
defines the order of the files (``rotated_files``/``audit_files`` sort by it).
It is zero-padded to six digits, so plain name order is the same as long as the
clock does not go backwards. ``audit_files(path)`` lists a whole set, oldest
first, active file last; in ``json`` format the lines are the spool lines
untouched, so ``verify_chain`` holds across all of them (open them with
``open_audit_file``, which reads .gz transparently).

Writing: each batch is rendered and appended with one write(2) (a loop only for
short writes) to a file opened with O_APPEND, then fsync'ed (``fsync: true``,
the default; the sink runs on the shipper's thread, not the proxy's). A batch
never spans two files: the sink rotates *before* a batch that would take a
non-empty file past ``max_bytes``, so a file exceeds ``max_bytes`` only when one
batch alone is larger. Time rotation (``rotate_interval``: seconds, a duration
such as "6h", or "hourly"/"daily") happens before the first batch written in a
later UTC interval (intervals are aligned to multiples of the interval since the
epoch, i.e. to UTC hour/day boundaries); an idle file is not rotated until the
next event arrives.

Failures: any OSError while writing is a retryable ``DeliveryError`` (a full
disk loses nothing: the spool keeps the batch). The size of the file before the
batch is remembered and the file is truncated back to it, so a partially written
batch never leaves a torn line for the retry to append to; if even that fails,
the truncation is retried before the next batch. When the sink opens an existing
file it also drops a torn last line (no trailing newline: a crash mid-write; the
events in it were not acknowledged and will be sent again), and a redelivered
batch that starts with events already in the file (a crash between the write
and the shipper's acknowledgement) is written only from the first event after
the file's last line, so the chain does not show the duplicate as a break.

Compression (``compress: true``, the default): a rotated file is gzipped to
``<name>.jsonl.gz.tmp``, fsync'ed, renamed to ``<name>.jsonl.gz`` and only then
is the ``.jsonl`` removed. At start the sink finishes what a crash interrupted:
a leftover ``.tmp`` is removed (the ``.jsonl`` is still there), a ``.jsonl``
whose ``.gz`` exists is removed (the ``.gz`` was complete before its rename) and
any other uncompressed rotated file is compressed. Compression and retention
errors are logged and retried later; they never fail a batch.

Retention: ``max_files`` rotated files are kept (default 30; null = no limit)
and, with ``max_age`` (seconds or "7d", "12h"...), rotated files whose rotation
time is older are deleted. The active file is never deleted.
"""

from __future__ import annotations

import calendar
import errno
import gzip
import logging
import math
import os
import re
import shutil
import threading
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any, Callable

from gateway.audit.sinks.base import DeliveryError, Event, Sink, render

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_MAX_BYTES = 100 * MiB
DEFAULT_MAX_FILES = 30
RETENTION_CHECK_S = 60.0  # max_age is also applied at most this often while batches flow

# -- parsers (shared with other config code) ---------------------------------------------------

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20, "gi": 1 << 30, "gib": 1 << 30,
    "ti": 1 << 40, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)", re.ASCII)


def parse_size(s: Any) -> int:
    """A byte count: an int >= 0, or a string such as "512", "64KiB", "100 MiB",
    "1GB", "1.5GiB" (case-insensitive; K/M/G/T[B] are powers of 1000,
    Ki/Mi/Gi/Ti[B] powers of 1024). A fraction must come out as whole bytes.
    Raises ValueError."""
    if isinstance(s, bool):
        raise ValueError(f"not a size: {s!r}")
    if isinstance(s, int):
        if s < 0:
            raise ValueError(f"size must not be negative: {s}")
        return s
    if not isinstance(s, str):
        raise ValueError(f"not a size: {s!r} (use bytes or a string such as \"100MiB\")")
    m = _SIZE_RE.fullmatch(s.strip().lower())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(f"not a size: {s!r} (use e.g. 1048576, \"512KiB\", \"100MiB\", \"1GB\")")
    try:
        value = Decimal(m.group(1)) * _SIZE_UNITS[m.group(2)]
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"not a size: {s!r}") from None
    if value != value.to_integral_value():
        raise ValueError(f"not a whole number of bytes: {s!r}")
    return int(value)


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h|d|w)"
_DURATION_RE = re.compile(rf"(?:{_DURATION_PART})+", re.ASCII)
_DURATION_PART_RE = re.compile(_DURATION_PART, re.ASCII)
_PLAIN_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?|\.\d+", re.ASCII)


def parse_duration(s: Any) -> float:
    """Seconds: a number >= 0, or a string such as "30", "30s", "500ms", "5m",
    "12h", "7d", "2w", "1h30m" (units ms, s, m, h, d, w; lower case: "m" is
    minutes). Raises ValueError."""
    if isinstance(s, bool):
        raise ValueError(f"not a duration: {s!r}")
    if isinstance(s, (int, float)):
        try:
            v = float(s)
        except OverflowError:
            v = math.inf
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"duration must be a finite number >= 0: {s!r}")
        return v
    if not isinstance(s, str):
        raise ValueError(f"not a duration: {s!r} (use seconds or a string such as \"12h\", \"7d\")")
    text = s.strip()
    if _PLAIN_NUMBER_RE.fullmatch(text):
        v = float(text)
    elif _DURATION_RE.fullmatch(text):
        v = float(sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(text)))
    else:
        raise ValueError(f"not a duration: {s!r} (use e.g. 30, \"30s\", \"5m\", \"12h\", \"7d\", \"1h30m\")")
    if not math.isfinite(v):
        raise ValueError(f"duration too large: {s!r}")
    return v


def parse_interval(s: Any) -> float:
    """A rotation interval: "hourly", "daily", or a duration > 0 (``parse_duration``)."""
    named = {"hourly": 3600.0, "daily": 86400.0}
    if isinstance(s, str) and s.strip().lower() in named:
        return named[s.strip().lower()]
    v = parse_duration(s)
    if v <= 0:
        raise ValueError(f"rotation interval must be > 0: {s!r}")
    return v


# -- reading a rotated set ---------------------------------------------------------------------

def _rotated_re(stem: str) -> re.Pattern:
    return re.compile(rf"{re.escape(stem)}-(\d{{8}}T\d{{6}}Z)-(\d+)\.jsonl(\.gz)?(\.tmp)?")


def _scan(path: Path) -> list[tuple[int, str, Path]]:
    """(n, timestamp, path) of every rotated file (.gz preferred when both exist), by n."""
    pat = _rotated_re(path.stem)
    found: dict[int, tuple[int, str, Path]] = {}
    try:
        names = os.listdir(path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    for name in sorted(names):
        m = pat.fullmatch(name)
        if not m or m.group(4):
            continue
        n = int(m.group(2))
        if n in found and not m.group(3):
            continue  # keep the .gz (complete: renamed into place only after fsync)
        found[n] = (n, m.group(1), path.parent / name)
    return [found[n] for n in sorted(found)]


def audit_files(path: str | os.PathLike) -> list[Path]:
    """The rotated files of the audit file ``path`` (oldest first), then ``path``
    itself if it exists: the order to read or verify a whole rotated set in."""
    p = Path(path)
    files = [f for _, _, f in _scan(p)]
    if p.exists():
        files.append(p)
    return files


def open_audit_file(p: str | os.PathLike) -> IO[bytes]:
    """Open an audit file for reading binary lines; ``.gz`` files are decompressed."""
    if str(p).endswith(".gz"):
        return gzip.open(p, "rb")
    return open(p, "rb")


# -- the sink ----------------------------------------------------------------------------------

def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FileSink(Sink):
    kind = "file"
    OPTIONS = ("path", "max_bytes", "rotate_interval", "compress", "max_files", "max_age", "fsync")

    def __init__(self, name: str, fmt: str = "json", *, path: str | os.PathLike,
                 max_bytes: int = DEFAULT_MAX_BYTES, rotate_interval: float | None = None,
                 compress: bool = True, max_files: int | None = DEFAULT_MAX_FILES,
                 max_age: float | None = None, fsync: bool = True,
                 clock: Callable[[], float] = time.time):
        super().__init__(name, fmt)
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.rotate_interval = float(rotate_interval) if rotate_interval else None
        self.compress = bool(compress)
        self.max_files = max_files
        self.max_age = float(max_age) if max_age else None
        self.fsync = bool(fsync)
        self.clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0            # bytes in the active file after the last complete batch
        self._interval = 0        # UTC interval (index) the active file was opened in
        self._repair = False      # a failed batch may have left bytes past _size
        self._last_line: bytes | None = None  # the last line written (de-duplicates redelivery)
        self._pending: list[Path] = []  # rotated files still to compress
        self._next_retention = 0.0
        self._next_n = 1          # the next rotation number (at least; see _rotate)
        self.recover()

    # -- configuration

    @classmethod
    def from_config(cls, name: str, fmt: str, options: dict, resolve: Callable | None = None) -> "FileSink":
        where = f"audit.sinks.{name}"
        if not isinstance(options, dict):
            raise ValueError(f"{where}: options must be a mapping")
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(cls.OPTIONS)})")
        path = options.get("path")
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"{where}: path is required (the audit file to write, e.g. /var/log/egress/audit.jsonl)")
        p = Path(path).expanduser()
        if p.is_dir():
            raise ValueError(f"{where}: path {path} is a directory (name a file in it, e.g. {p / 'audit.jsonl'})")
        kw: dict[str, Any] = {"path": p}
        if options.get("max_bytes") is not None:
            try:
                kw["max_bytes"] = parse_size(options["max_bytes"])
            except ValueError as e:
                raise ValueError(f"{where}: max_bytes: {e}") from None
            if kw["max_bytes"] <= 0:
                raise ValueError(f"{where}: max_bytes must be > 0")
        if options.get("rotate_interval") is not None:
            try:
                kw["rotate_interval"] = parse_interval(options["rotate_interval"])
            except ValueError as e:
                raise ValueError(f"{where}: rotate_interval: {e} (or \"hourly\", \"daily\")") from None
        for key in ("compress", "fsync"):
            if key in options:
                if not isinstance(options[key], bool):
                    raise ValueError(f"{where}: {key} must be true or false, not {options[key]!r}")
                kw[key] = options[key]
        if "max_files" in options:
            v = options["max_files"]
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{where}: max_files must be a whole number >= 0 (or null: no limit), not {v!r}")
            kw["max_files"] = v
        if options.get("max_age") is not None:
            try:
                kw["max_age"] = parse_duration(options["max_age"])
            except ValueError as e:
                raise ValueError(f"{where}: max_age: {e}") from None
            if kw["max_age"] <= 0:
                raise ValueError(f"{where}: max_age must be > 0")
        return cls(name, fmt, **kw)

    def describe(self) -> str:
        return f"file:{self.path}"

    # -- reading

    def rotated_files(self) -> list[Path]:
        """Rotated files, oldest first (by rotation number)."""
        return [f for _, _, f in _scan(self.path)]

    # -- writing

    def send(self, batch: list[Event]) -> None:
        if not batch:
            return
        lines = [render(ev, self.fmt) for ev in batch]
        with self._lock:
            try:
                self._open()
                if self._repair:
                    os.ftruncate(self._fd, self._size)
                    self._repair = False
            except OSError as e:
                raise DeliveryError(f"{self.describe()}: cannot open: {e}") from e
            if self._last_line is not None:
                for i in range(len(lines) - 1, -1, -1):
                    if lines[i] == self._last_line:
                        lines = lines[i + 1:]  # redelivered: already in the file up to here
                        break
                if not lines:
                    return
            data = b"".join(line + b"\n" for line in lines)
            now = self.clock()
            try:
                self._maybe_rotate(now, len(data))
            except OSError as e:
                raise DeliveryError(f"{self.describe()}: cannot rotate: {e}") from e
            before = self._size
            try:
                self._write_all(data)
                if self.fsync:
                    os.fsync(self._fd)
            except OSError as e:
                self._rollback(before)
                raise DeliveryError(f"{self.describe()}: write failed: {e}") from e
            self._size = before + len(data)
            self._last_line = lines[-1]
            try:
                self._housekeeping(now)
            except (OSError, ValueError) as e:  # the batch is delivered; tidy up next time
                log.warning("%s: housekeeping: %s", self.describe(), e)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            if n <= 0:  # pragma: no cover - write(2) on a regular file returns >0 or fails
                raise OSError(errno.EIO, "short write")
            view = view[n:]

    def _rollback(self, size: int) -> None:
        """Undo a partly written batch so the retry does not append to a torn line."""
        try:
            os.ftruncate(self._fd, size)
        except OSError as e:
            log.warning("%s: cannot truncate back to %d bytes after a failed write (will retry): %s",
                        self.describe(), size, e)
            self._repair = True

    def _open(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            if not existed:
                os.fchmod(fd, 0o640)
            st = os.fstat(fd)
            size, last = _complete_tail(self.path, st.st_size)
            if size != st.st_size:
                log.warning("%s: dropping %d byte(s) of a torn last line (an interrupted write)",
                            self.describe(), st.st_size - size)
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size = fd, size
        if last is not None:
            self._last_line = last
        opened = st.st_mtime if size else self.clock()
        self._interval = self._interval_of(opened)

    def _interval_of(self, t: float) -> int:
        return int(t // self.rotate_interval) if self.rotate_interval else 0

    def _maybe_rotate(self, now: float, incoming: int) -> None:
        if self._size == 0:
            self._interval = self._interval_of(now)  # nothing to rotate: the file starts now
            return
        if self._size + incoming > self.max_bytes or self._interval_of(now) > self._interval:
            self._rotate(now)

    def _rotate(self, now: float) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        scanned = _scan(self.path)
        if scanned:
            self._next_n = max(self._next_n, scanned[-1][0] + 1)
        while True:
            dest = self.path.with_name(f"{self.path.stem}-{stamp}-{self._next_n:06d}.jsonl")
            if not dest.exists() and not dest.with_name(dest.name + ".gz").exists():
                break
            self._next_n += 1
        os.rename(self.path, dest)
        self._next_n += 1
        os.close(self._fd)
        self._fd = None
        if self.fsync:
            _fsync_dir(self.path.parent)
        if self.compress:
            self._pending.append(dest)
        self._next_retention = 0.0  # apply retention after this batch
        self._open()

    def _housekeeping(self, now: float) -> None:
        if now >= self._next_retention:
            self._next_retention = now + RETENTION_CHECK_S
            self._retention(now)
        while self._pending:
            src = self._pending[0]
            try:
                if src.exists():
                    _compress(src)
            except OSError as e:
                log.warning("%s: cannot compress %s (will retry at the next rotation): %s",
                            self.describe(), src.name, e)
                return
            self._pending.pop(0)

    def _retention(self, now: float) -> None:
        rotated = _scan(self.path)
        doomed = []
        if self.max_files is not None and len(rotated) > self.max_files:
            doomed = rotated[:len(rotated) - self.max_files]
            rotated = rotated[len(doomed):]
        if self.max_age is not None:
            for entry in rotated:
                try:
                    t = calendar.timegm(time.strptime(entry[1], "%Y%m%dT%H%M%SZ"))
                except ValueError:
                    continue  # not a real date: not ours to judge
                if now - t > self.max_age:
                    doomed.append(entry)
        for _, _, f in doomed:
            base = f.name[:-3] if f.name.endswith(".gz") else f.name
            for name in (base, base + ".gz"):
                victim = f.with_name(name)
                try:
                    victim.unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.warning("%s: cannot delete old audit file %s: %s", self.describe(), victim.name, e)
                if victim in self._pending:
                    self._pending.remove(victim)

    def recover(self) -> None:
        """Finish compression that a crash interrupted, then apply retention
        (called at start; errors are logged, not raised)."""
        pat = _rotated_re(self.path.stem)
        try:
            names = set(os.listdir(self.path.parent))
        except OSError:
            return
        for name in sorted(names):
            m = pat.fullmatch(name)
            if not m:
                continue
            p = self.path.parent / name
            try:
                if m.group(4):  # <x>.jsonl.gz.tmp: an unfinished compression
                    if not m.group(3):
                        continue
                    if name[:-len(".gz.tmp")] in names:
                        p.unlink()
                    else:
                        log.warning("%s: leaving %s: its uncompressed original is gone", self.describe(), name)
                elif not m.group(3) and name + ".gz" in names:
                    p.unlink()  # the .gz was complete (fsync'ed before its rename)
                elif not m.group(3) and self.compress:
                    self._pending.append(p)
            except OSError as e:
                log.warning("%s: recovering %s: %s", self.describe(), name, e)
        self._pending.sort(key=lambda f: int(pat.fullmatch(f.name).group(2)))
        try:
            self._housekeeping(self.clock())
        except (OSError, ValueError) as e:
            log.warning("%s: housekeeping: %s", self.describe(), e)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    os.close(self._fd)
                finally:
                    self._fd = None


def _complete_tail(path: Path, size: int) -> tuple[int, bytes | None]:
    """(size up to the end of the last complete line, that line) of an existing file."""
    if size == 0:
        return 0, None
    chunk = 1 << 16
    with open(path, "rb") as f:
        end = size
        tail = b""
        while True:
            start = max(0, end - chunk)
            f.seek(start)
            tail = f.read(end - start) + tail
            end = start
            nl = tail.rfind(b"\n")
            if nl >= 0:
                prev = tail.rfind(b"\n", 0, nl)
                if prev >= 0 or end == 0:
                    good = end + nl + 1
                    return good, tail[prev + 1:nl]
            elif end == 0:
                return 0, None


def _compress(src: Path) -> None:
    """src -> src.gz via a fsync'ed temp file and an atomic rename; then src is removed."""
    dest = src.with_name(src.name + ".gz")
    tmp = src.with_name(src.name + ".gz.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(filename=src.name, mode="wb", fileobj=raw, compresslevel=6) as gz, \
                    open(src, "rb") as fin:
                shutil.copyfileobj(fin, gz, 1 << 20)
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(tmp, dest)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(src.parent)
    src.unlink()
