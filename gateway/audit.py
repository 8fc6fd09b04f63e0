"""Basic audit: one JSON line per decision in a local file.

Events never hold secrets: no proxy credentials, no header values, no query
string (it often carries keys). The full SIEM export is a separate module.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
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
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
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


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
