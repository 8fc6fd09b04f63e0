"""Basic audit: one JSON line per decision in a local file.

Events never hold secrets: no proxy credentials, no header values, no query
string (it often carries keys). The full SIEM export is a separate module.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


_SECOND: list = [0, ""]  # (unix second, "YYYY-MM-DDTHH:MM:SS") formatted once per second


def now_iso() -> str:
    """UTC now as ``2026-11-24T01:02:03.123456Z`` (cheap: on the per-request path)."""
    t = time.time()
    sec = int(t)
    if _SECOND[0] != sec:
        _SECOND[0], _SECOND[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_SECOND[1]}.{int((t - sec) * 1e6):06d}Z"


class AuditLog:
    """Appends JSON lines to a file (mode 0640, O_APPEND).

    Writes made on a running event loop are buffered and flushed to the kernel
    once per loop iteration (``call_soon``), so a burst of decisions costs one
    write(2), and every event reaches the file before the loop waits for I/O
    again: a killed process loses nothing that was audited before its last
    completed iteration. Writes from other threads, or with no loop, are
    flushed at once. Durability against power loss (fsync, spool) belongs to
    the SIEM export."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._file = None
        self._flush_pending = False
        self._prev, self._seq = GENESIS, 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._prev, self._seq = chain_head(self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            self._file = os.fdopen(fd, "a", buffering=1 << 16, encoding="utf-8")
        self.written = 0
        self.failures = 0
        self.on_failure = None  # called with no arguments when buffered events could not be written

    def write(self, event: dict[str, Any]) -> bool:
        """Append one event. Returns False when it could not be written."""
        if self._file is None:
            return True
        event.setdefault("ts", now_iso())
        return self.write_line(json.dumps(event, separators=(",", ":"), sort_keys=True, default=str), flush=True)

    def write_line(self, line: str, *, flush: bool = False) -> bool:
        """Append one already-serialised event (a JSON object, no newline);
        ``flush`` writes it to the kernel before returning."""
        f = self._file
        if f is None:
            return True
        try:
            with self._lock:
                # Hash chain: each event carries its sequence number and the
                # SHA-256 of the line before it (egress audit verify).
                self._seq += 1
                line = f'{{"seq":{self._seq},"prev":"{self._prev}",' + line[1:]
                self._prev = hashlib.sha256(line.encode()).hexdigest()
                f.write(line + "\n")
                self.written += 1
                if flush:
                    f.flush()
                    return True
                if self._flush_pending:
                    return True
                loop = _running_loop()
                if loop is None or threading.current_thread() is not threading.main_thread():
                    f.flush()
                else:
                    self._flush_pending = True
                    loop.call_soon(self.flush)
            return True
        except OSError:
            self._failed()
            return False

    def flush(self) -> None:
        with self._lock:
            self._flush_pending = False
            if self._file is None:
                return
            try:
                self._file.flush()
            except OSError:
                self._failed()

    def _failed(self) -> None:
        self.failures += 1
        if self.on_failure is not None:
            self.on_failure()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    self._failed()
                self._file = None


GENESIS = "0" * 64


def chain_head(path: Path) -> tuple[str, int]:
    """(hash of the last line, its seq) of an existing audit file, to continue its chain."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return GENESIS, 0
            f.seek(max(0, size - 65536))
            tail = f.read().rstrip(b"\n")
    except OSError:
        return GENESIS, 0
    last = tail.rsplit(b"\n", 1)[-1]
    try:
        seq = int(json.loads(last).get("seq", 0))
    except (ValueError, AttributeError):
        seq = 0
    return hashlib.sha256(last).hexdigest(), seq


@dataclass(frozen=True)
class ChainBreak:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


def verify_chain(files) -> tuple[int, ChainBreak | None]:
    """Check the hash chain across ``files`` (in order). Returns (events checked,
    the first break or None). A changed, deleted or reordered event breaks the
    chain at the event after it (the last event is anchored only by later ones)."""
    prev_hash = prev_seq = None
    n = 0
    for name in files:
        with open(name, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                raw = raw.rstrip(b"\n")
                if not raw:
                    continue
                try:
                    ev = json.loads(raw)
                    seq, prev = int(ev["seq"]), str(ev["prev"])
                except (ValueError, KeyError, TypeError):
                    return n, ChainBreak(str(name), lineno, "not a chained audit event")
                if prev_hash is not None:
                    if prev != prev_hash:
                        return n, ChainBreak(str(name), lineno, f"hash chain broken before event {seq}: the "
                                             f"previous event was changed, removed or moved")
                    if seq != prev_seq + 1:
                        what = "missing" if seq > prev_seq + 1 else "out of order"
                        return n, ChainBreak(str(name), lineno, f"event {seq} follows event {prev_seq}: "
                                             f"events {what}")
                prev_hash, prev_seq = hashlib.sha256(raw).hexdigest(), seq
                n += 1
    return n, None


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
