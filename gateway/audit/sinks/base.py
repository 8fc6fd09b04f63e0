"""The contract between the audit shipper and a sink.

The shipper (gateway.audit.shipper) reads events from the durable spool in
order and hands each sink a *batch*: a list of ``Event`` (the raw JSON line as
written to the spool, without the newline, plus its parsed form on demand).
A sink delivers the whole batch or raises ``DeliveryError``:

* ``retryable=True`` (the default): nothing is acknowledged; the shipper backs
  off (exponential, with jitter) and sends the same batch again, so delivery is
  at-least-once and in order. Receivers de-duplicate by the event id (``id``).
* ``retryable=False``: the batch (or the events listed in ``rejected``) can
  never be delivered as is (the receiver refused its content); the shipper
  writes them to the sink's dead-letter file, counts them as failed and moves
  on. Use it only for a definite refusal of content, never for a receiver that
  is down, overloaded or refusing credentials (those are retryable: an operator
  fixes them and nothing is lost).

Sinks run on the shipper's thread (one thread per sink), never on the proxy's
event loop: they may block on I/O, bounded by their own timeouts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

FORMATS = ("json", "ocsf", "ecs")


class DeliveryError(Exception):
    def __init__(self, message: str, *, retryable: bool = True, rejected: Sequence[int] = ()):
        super().__init__(message)
        self.retryable = retryable
        self.rejected = tuple(rejected)  # indexes into the batch; empty = the whole batch


# The prefix every per-request event has as the spool writes it (gateway.runtime.record):
# id, seq, prev, ts, event, then for decisions request_id and decision. Read without
# parsing the whole line (sinks that need only these fields stay cheap).
_HEAD = re.compile(rb'^\{"id":"([^"\\]*)","seq":(\d+),"prev":"[0-9a-f]{64}","ts":"([^"\\]*)","event":"([^"\\]*)"'
                   rb'(?:,"request_id":"[^"\\]*","decision":"([a-z]+)")?')


class Head(tuple):
    """(id, seq, ts, event, decision) of an event."""

    __slots__ = ()

    def __new__(cls, id, seq, ts, event, decision):
        return tuple.__new__(cls, (id, seq, ts, event, decision))

    id = property(lambda self: self[0])
    seq = property(lambda self: self[1])
    ts = property(lambda self: self[2])
    event = property(lambda self: self[3])
    decision = property(lambda self: self[4])


@dataclass
class Event:
    raw: bytes  # one spool line, no newline: our JSON event with "id", "seq", "prev", "ts", "event", ...
    _parsed: dict | None = field(default=None, repr=False)

    @property
    def data(self) -> dict[str, Any]:
        if self._parsed is None:
            self._parsed = json.loads(self.raw)
        return self._parsed

    @property
    def head(self) -> Head:
        """id, seq, ts, event type and decision: from the line's prefix when it has the
        spool's layout, else from the parsed event."""
        m = _HEAD.match(self.raw)
        if m is not None:
            return Head(m.group(1).decode(), int(m.group(2)), m.group(3).decode(), m.group(4).decode(),
                        m.group(5).decode() if m.group(5) else None)
        d = self.data
        seq = d.get("seq")
        return Head(str(d.get("id", "")), seq if isinstance(seq, int) else None, str(d.get("ts", "")),
                    str(d.get("event", "")), d.get("decision") if isinstance(d.get("decision"), str) else None)

    @property
    def id(self) -> str:
        m = _HEAD.match(self.raw)
        return m.group(1).decode() if m is not None else str(self.data.get("id", ""))

    @property
    def ts(self) -> str:
        return str(self.data.get("ts", ""))


def render(ev: Event, fmt: str) -> bytes:
    """The event as one line of JSON in ``fmt`` (json passes the spool line through untouched,
    so the hash chain can still be verified on the receiving side)."""
    if fmt == "json":
        return ev.raw
    from gateway.audit.formats import convert
    out = convert(ev.data, fmt)
    if out is not ev.data:
        # keep the de-duplication key and the chain position on converted events
        out.setdefault("egress", {}).update({"event_id": ev.id, "seq": ev.data.get("seq")})
    return json.dumps(out, separators=(",", ":"), default=str).encode()


class Sink:
    """Base class. Subclasses set ``kind`` and implement ``send``."""

    kind = "base"

    def __init__(self, name: str, fmt: str = "json"):
        if fmt not in FORMATS:
            raise ValueError(f"sink {name}: unknown format {fmt!r} (use {', '.join(FORMATS)})")
        self.name = name
        self.fmt = fmt

    def send(self, batch: list[Event]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass

    def describe(self) -> str:
        """Where it delivers, for logs and `egress audit sinks` (no credentials)."""
        return self.kind
