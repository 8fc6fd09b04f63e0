"""Audit: every decision and notable event, durable, hash-chained, exported.

* ``spool``    - the durable local spool every event is written to first (hot path)
* ``shipper``  - one delivery thread per sink, reading the spool, acknowledging what was delivered
* ``sinks/``   - file (rotating JSONL), syslog (RFC 5424), Splunk HEC, Elasticsearch/OpenSearch, webhook
* ``formats``  - OCSF HTTP Activity (4002) and ECS renderings of our events
* ``config``   - the ``audit:`` configuration section
* ``query``    - reading spools and exported files back (egress audit tail|query|export)

Events never hold secrets: no proxy credentials, no header values, query string
values redacted by default, secret references by name only.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass

from gateway.audit.spool import GENESIS, Spool, now_iso

__all__ = ["GENESIS", "Spool", "now_iso", "ChainBreak", "verify_chain", "open_lines"]


@dataclass(frozen=True)
class ChainBreak:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


def open_lines(name):
    """A binary file object over an audit file (``.gz`` read transparently)."""
    return gzip.open(name, "rb") if str(name).endswith(".gz") else open(name, "rb")


def verify_chain(files) -> tuple[int, ChainBreak | None]:
    """Check the hash chain across ``files`` (in order). Returns (events checked,
    the first break or None). A changed, deleted or reordered event breaks the
    chain at the event after it (the last event is anchored only by later ones)."""
    prev_hash = prev_seq = None
    n = 0
    for name in files:
        with open_lines(name) as fh:
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
