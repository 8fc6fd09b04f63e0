"""Basic audit: one JSON line per decision in a local file.

Events never hold secrets: no proxy credentials, no header values, no query
string (it often carries keys). The full SIEM export is a separate module.
"""

from __future__ import annotations

import datetime as _dt
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
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            self._file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
        self.written = 0
        self.failures = 0

    def write(self, event: dict[str, Any]) -> bool:
        """Append one event. Returns False when it could not be written."""
        if self._file is None:
            return True
        event.setdefault("ts", now_iso())
        line = json.dumps(event, separators=(",", ":"), sort_keys=True, default=str)
        try:
            with self._lock:
                self._file.write(line + "\n")
            self.written += 1
            return True
        except OSError:
            self.failures += 1
            return False

    def write_line(self, line: str) -> bool:
        """Append one already-serialised event (a JSON object, no newline)."""
        if self._file is None:
            return True
        try:
            with self._lock:
                self._file.write(line + "\n")
            self.written += 1
            return True
        except OSError:
            self.failures += 1
            return False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
