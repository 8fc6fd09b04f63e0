"""Reflection scrubbing: an upstream that echoes an injected credential back
(in a header, a body, a streamed body or a WebSocket message) must not hand it
to the sandbox.

Every occurrence of an injected value, and of its JSON-escaped and
percent-encoded spellings, is overwritten with a mask of the same length (so
Content-Length stays valid). Streamed bodies are scrubbed chunk by chunk with
a carry-over of ``longest secret - 1`` bytes, so an occurrence split across
chunks is still found. Requests that carry injected credentials ask for an
uncompressed response (``Accept-Encoding: identity``), so bodies can be
scanned as sent.
"""

from __future__ import annotations

import json
from urllib.parse import quote

MASK = b"[egress:redacted]"


def variants(values) -> list[bytes]:
    """The byte spellings of each value to look for, longest first."""
    out: set[bytes] = set()
    for v in values:
        if not v:
            continue
        out.add(v.encode())
        out.add(json.dumps(v)[1:-1].encode())
        out.add(quote(v, safe="").encode())
    return sorted(out, key=len, reverse=True)


def _mask(n: int) -> bytes:
    return (MASK * (n // len(MASK) + 1))[:n]


def scrub_bytes(data: bytes, needles: list[bytes]) -> tuple[bytes, int]:
    hits = 0
    for s in needles:
        if s in data:
            hits += data.count(s)
            data = data.replace(s, _mask(len(s)))
    return data, hits


class StreamScrubber:
    """A callable for ``flow.response.stream``: bytes in, scrubbed bytes out;
    called with b"" at the end of the body to flush the carry-over."""

    def __init__(self, needles: list[bytes], on_hit=None):
        self.needles = needles
        self.keep = max((len(s) for s in needles), default=1) - 1
        self.buf = b""
        self.hits = 0
        self.on_hit = on_hit
        self.bytes = 0  # body bytes seen (for the audit's byte count)

    def __call__(self, data: bytes):
        """Scrubbed bytes to send now; ``[]`` when there are none yet (mitmproxy
        sends each returned bytes object as a chunk, and an empty chunk would end
        a chunked HTTP/1 body)."""
        self.bytes += len(data)
        buf, hits = scrub_bytes(self.buf + data, self.needles)
        if hits:
            self.hits += hits
            if self.on_hit is not None:
                self.on_hit(hits)
        if not data:  # end of body
            self.buf = b""
            return [buf] if buf else []
        cut = max(0, len(buf) - self.keep)
        self.buf = buf[cut:]
        return [buf[:cut]] if cut else []
