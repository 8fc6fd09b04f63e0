"""Reading audit events back: from a spool directory or exported files (plain
or ``.gz``), filtered (egress audit tail | query | export). Pure functions over
files; no gateway needed."""

from __future__ import annotations

import datetime as _dt
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gateway.audit import open_lines
from gateway.audit.spool import segment_files

_REL = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: float | None = None) -> float:
    """``2026-12-01T10:00:00Z``, ``2026-12-01`` or a relative ``15m`` / ``2h`` / ``7d`` (ago) -> unix time."""
    t = text.strip()
    m = _REL.match(t)
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        d = _dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use e.g. 2026-12-01T10:00:00Z, 2026-12-01, 15m, 2h, 7d)") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=_dt.timezone.utc)
    return d.timestamp()


def event_time(ev: dict) -> float | None:
    ts = ev.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return _dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class Filter:
    tenant: str | None = None
    agent: str | None = None
    decision: str | None = None
    event: str | None = None
    request_id: str | None = None
    host: str | None = None
    since: float | None = None
    until: float | None = None

    def match(self, ev: dict, joined: set | None = None) -> bool:
        """``joined``: collects the request ids of decisions that pass the filters on
        who and what; their ``request_completed`` events (which carry neither) then
        match too. Pass the same set for every event of a scan, in order."""
        kind = ev.get("event")
        if joined is not None and kind == "request_completed":
            return (ev.get("request_id") in joined and self._in_time(ev)
                    and self.event in (None, "request_completed") and self.request_id in (None, ev.get("request_id")))
        ok = self._match(ev, check_event=False)
        if ok and joined is not None and kind == "decision" and ev.get("request_id"):
            if len(joined) > 100_000:
                joined.clear()
            joined.add(ev["request_id"])
        return ok and (self.event is None or kind == self.event)

    def _in_time(self, ev: dict) -> bool:
        if self.since is None and self.until is None:
            return True
        t = event_time(ev)
        return t is not None and (self.since is None or t >= self.since) and (self.until is None or t <= self.until)

    @property
    def joins(self) -> bool:
        """Whether completion events must be joined to decisions to be filtered."""
        return any(v is not None for v in (self.tenant, self.agent, self.decision, self.host)) \
            and self.event in (None, "request_completed")

    def _match(self, ev: dict, check_event: bool = True) -> bool:
        p = ev.get("principal") or {}
        if self.tenant is not None and p.get("tenant") != self.tenant:
            return False
        if self.agent is not None and p.get("agent") != self.agent:
            return False
        if self.decision is not None and ev.get("decision") != self.decision:
            return False
        if check_event and self.event is not None and ev.get("event") != self.event:
            return False
        if self.request_id is not None and ev.get("request_id") != self.request_id:
            return False
        if self.host is not None and (ev.get("request") or {}).get("host") != self.host:
            return False
        return self._in_time(ev)


def default_files(spool_dir: str | Path) -> list[Path]:
    return segment_files(spool_dir)


def iter_events(files, problems: list[str] | None = None) -> Iterator[tuple[dict, bytes]]:
    """(event, raw line) for every JSON line of ``files`` in order; lines that are
    not JSON objects are reported in ``problems`` (file:line) and skipped."""
    for name in files:
        with open_lines(name) as fh:
            for n, raw in enumerate(fh, 1):
                raw = raw.rstrip(b"\n")
                if not raw.strip():
                    continue
                try:
                    ev = json.loads(raw)
                    if not isinstance(ev, dict):
                        raise ValueError
                except ValueError:
                    if problems is not None:
                        problems.append(f"{name}:{n}: not a JSON event, skipped")
                    continue
                yield ev, raw


def tail_raw(files, n: int) -> list[bytes]:
    """The last ``n`` lines across ``files`` (reads from the end of the newest files)."""
    out: list[bytes] = []
    for name in reversed(list(files)):
        with open_lines(name) as fh:
            lines = [x.rstrip(b"\n") for x in fh.readlines() if x.strip()]
        out = lines[-(n - len(out)):] + out if n > len(out) else out
        if len(out) >= n:
            break
    return out[-n:] if n else []
