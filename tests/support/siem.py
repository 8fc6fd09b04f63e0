"""In-process SIEM receivers for sink tests: Splunk HEC, Elasticsearch/OpenSearch
``_bulk`` and an NDJSON webhook.

Each receiver is an ``http.server.ThreadingHTTPServer`` on a free port of
127.0.0.1 (or ``::1``), served from a background thread, over HTTP or, with
``tls=``, HTTPS (certificates from ``tests.support.certs``). Each validates
requests the way the real API documents them and answers like it, error
bodies included, so a sink that passes here speaks the real protocol:

* ``HecReceiver``: ``/services/collector[/event[/1.0]]``; ``Authorization:
  Splunk <token>`` (or Basic with the token as password); the body is a
  sequence of JSON objects separated by optional whitespace, each with an
  ``event`` (not blank) and optional ``time`` (number or numeric string),
  ``host``/``source``/``sourcetype``/``index`` (strings), ``fields`` (object);
  gzip ``Content-Encoding``; ``X-Splunk-Request-Channel`` must be a GUID.
  Replies ``{"text":..., "code":...}`` with the documented status and code
  (2/3: 401, 4: 403, 5/6/7/12/13/15: 400 with ``invalid-event-number``, 9:
  503). Like Splunk, events before an invalid one are indexed.
* ``BulkReceiver``: ``POST /_bulk`` or ``/{index}/_bulk``; Content-Type
  ``application/x-ndjson`` (or json); action/metadata lines
  (``create``/``index``/``delete``/``update``) each followed by its source,
  final newline required; per-item results like Elasticsearch (201 created,
  409 version_conflict_engine_exception for an existing ``_id`` on create,
  400 for an invalid index name or a document that does not fit the
  index's dynamic mapping), the ``errors`` flag, ES-shaped request errors.
  Basic or ApiKey auth when configured (401 security_exception otherwise).
* ``WebhookReceiver``: NDJSON POSTs (one JSON object per line, final newline),
  optional Bearer token and required headers.

Every receiver keeps ``events`` (parsed documents, in arrival order),
``requests`` (count), ``request_log`` (method, path, headers, sizes, status of
the last 1000 requests), ``ids()``/``unique_ids()``, and offers fault
injection: ``fail_next(n, status=503, body=None, headers=None)`` answers the
next ``n`` requests with that status (the API's own error body by default),
``down()``/``up()`` close and reopen the listening socket on the same port
(connections are refused meanwhile; open keep-alive connections are cut).

``make_events(n)`` builds spool-like ``Event`` objects with unique ids.
"""

from __future__ import annotations

import base64
import collections
import datetime as _dt
import gzip
import json
import os
import re
import socket
import ssl
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

from gateway.audit.sinks.base import Event

from .certs import CertPaths, issue_server_cert, make_test_ca

LOOPBACK_NAMES = ["localhost"]
LOOPBACK_IPS = ["127.0.0.1", "::1"]


# --------------------------------------------------------------------------- helpers


def make_events(n: int, *, start: int = 1, ts: str | None = None, **extra: Any) -> list[Event]:
    """``n`` spool-like decision events with unique ids (``seq`` from ``start``)."""
    base = _dt.datetime(2026, 11, 24, 1, 2, 3, 456789, tzinfo=_dt.timezone.utc)
    run = uuid.uuid4().hex[:12]
    out = []
    for i in range(start, start + n):
        t = ts or (base + _dt.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        ev = {"seq": i, "prev": "0" * 64, "id": f"ev-{run}-{i:06d}", "ts": t, "event": "decision",
              "request_id": f"req-{i}", "decision": "allow" if i % 2 else "deny",
              "code": "allowed" if i % 2 else "policy_deny", "rule": "acme/r1", "reason": "test",
              "policy_version": "sha256:abc", "source": "10.0.0.2",
              "request": {"method": "GET", "scheme": "https", "host": "api.example.com", "port": 443,
                          "path": f"/x/{i}", "sni": "api.example.com", "mode": "explicit"},
              "destination": {"ips": ["93.184.216.34"], "classes": ["public"], "via": "dns"},
              "principal": {"tenant": "acme", "agent": "a1", "session": "s1", "labels": {"team": "red"},
                            "token_id": "tok1", "via": "token"}}
        ev.update(extra)
        out.append(Event(json.dumps(ev, separators=(",", ":"), sort_keys=True).encode()))
    return out


def event_id(doc: Any) -> str | None:
    """The audit event id of a received document (``id``, or ``egress.event_id`` on OCSF/ECS)."""
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("id"), str):
        return doc["id"]
    eg = doc.get("egress")
    if isinstance(eg, dict) and isinstance(eg.get("event_id"), str):
        return eg["event_id"]
    return None


def make_server_pki(directory: str | os.PathLike[str]) -> tuple[CertPaths, CertPaths]:
    """A CA and a leaf for localhost/127.0.0.1/::1 in ``directory``: (ca, leaf)."""
    d = Path(directory)
    ca = make_test_ca(d)
    leaf = issue_server_cert(ca, d, LOOPBACK_NAMES, LOOPBACK_IPS, stem="siem")
    return ca, leaf


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Message
    body: bytes  # decoded (gunzipped) body
    raw_size: int  # bytes on the wire


@dataclass
class Reply:
    status: int
    body: Any  # dict/list (JSON) or bytes
    headers: dict[str, str] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, addr, handler, receiver: "_Receiver"):
        self.receiver = receiver
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        super().__init__(addr, handler)

    def finish_request(self, request, client_address):
        rec = self.receiver
        if rec._ssl_ctx is not None:
            request.settimeout(10)
            try:
                request = rec._ssl_ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                rec.tls_failures += 1
                return
        rec._track(request, True)
        try:
            self.RequestHandlerClass(request, client_address, self)
        finally:
            rec._track(request, False)
            try:
                request.close()
            except OSError:
                pass

    def handle_error(self, request, client_address):  # a client that went away is not an error here
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "siem-test-receiver/1"
    timeout = 30  # idle keep-alive connections end
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _dispatch(self):
        self.server.receiver._serve(self)  # type: ignore[attr-defined]

    do_POST = do_PUT = do_GET = do_DELETE = do_HEAD = _dispatch


class _TooLarge(Exception):
    pass


class _Receiver:
    """Common machinery: server thread, body reading, request log, faults, down/up."""

    name = "receiver"
    MAX_LOG = 1000

    def __init__(self, *, host: str = "127.0.0.1", tls: CertPaths | str | os.PathLike[str] | None = None,
                 max_body: int = 100 * 1024 * 1024):
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("test receivers listen on loopback only")
        self.host = "127.0.0.1" if host == "localhost" else host
        self.max_body = max_body
        self.lock = threading.RLock()
        self.events: list[Any] = []
        self.requests = 0
        self.request_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.MAX_LOG)
        self.tls_failures = 0
        self._faults: collections.deque[Reply] = collections.deque()
        self._conns: set = set()
        self.ca: CertPaths | None = None
        self.leaf: CertPaths | None = None
        self._ssl_ctx: ssl.SSLContext | None = None
        if tls is not None:
            if isinstance(tls, CertPaths):
                self.leaf = tls
            else:
                self.ca, self.leaf = make_server_pki(tls)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.leaf.chain or self.leaf.cert), str(self.leaf.key))
            self._ssl_ctx = ctx
        self._state = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.up()

    # ---- lifecycle

    @property
    def scheme(self) -> str:
        return "https" if self._ssl_ctx else "http"

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{h}:{self.port}"

    @property
    def ca_file(self) -> str | None:
        return str(self.ca.cert) if self.ca else None

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def up(self) -> None:
        """(Re)open the listening socket (on the same port after ``down()``) and serve."""
        with self._state:
            if self._server is not None:
                return
            deadline = time.monotonic() + 5
            while True:
                try:
                    srv = _Server((self.host, self.port), _Handler, self)
                    break
                except OSError:
                    if not self.port or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self.port = srv.server_address[1]
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 name=f"{self.name}-{self.port}", daemon=True)
            t.start()
            self._server, self._thread = srv, t

    def down(self) -> None:
        """Stop serving: close the listening socket and cut open connections (refused until ``up()``)."""
        with self._state:
            srv, t = self._server, self._thread
            self._server = self._thread = None
            if srv is None:
                return
            srv.shutdown()
            srv.server_close()
            if t is not None:
                t.join(5)
            with self.lock:
                conns = list(self._conns)
            for c in conns:
                try:
                    socket.socket.shutdown(c, socket.SHUT_RDWR)  # not SSLSocket.shutdown: no TLS state change
                except OSError:
                    pass

    def close(self) -> None:
        self.down()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _track(self, conn, add: bool) -> None:
        with self.lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # ---- faults and records

    def fail_next(self, n: int = 1, status: int = 503, body: Any = None,
                  headers: dict[str, str] | None = None) -> None:
        """Answer the next ``n`` requests with ``status`` (``body`` defaults to the API's error body)."""
        with self.lock:
            for _ in range(n):
                self._faults.append(Reply(status, self.error_body(status) if body is None else body,
                                          dict(headers or {})))

    def error_body(self, status: int) -> Any:
        return {"error": f"HTTP {status}"}

    def ids(self) -> list[str | None]:
        """Event ids of the received documents, duplicates included, in arrival order."""
        with self.lock:
            return [event_id(d) for d in self.events]

    def unique_ids(self) -> list[str]:
        """Distinct event ids in first-arrival order."""
        seen: dict[str, None] = {}
        for i in self.ids():
            if i is not None:
                seen.setdefault(i, None)
        return list(seen)

    def duplicates(self) -> int:
        ids = [i for i in self.ids() if i is not None]
        return len(ids) - len(set(ids))

    def reset(self) -> None:
        with self.lock:
            self.events.clear()
            self.request_log.clear()
            self._faults.clear()
            self.requests = 0

    @property
    def last_request(self) -> dict[str, Any] | None:
        with self.lock:
            return self.request_log[-1] if self.request_log else None

    # ---- HTTP

    def _read_body(self, h: BaseHTTPRequestHandler) -> bytes:
        te = (h.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks, total = [], 0
            while True:
                line = h.rfile.readline(1024)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > self.max_body:
                    raise _TooLarge(total)
                chunks.append(h.rfile.read(size))
                h.rfile.readline(16)
        length = int(h.headers.get("Content-Length") or 0)
        if length > self.max_body:
            # read the body anyway (up to 256 MiB) so that the client sees the 413, not a reset
            left = length if length <= 256 * 1024 * 1024 else 0
            while left > 0:
                chunk = h.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
            raise _TooLarge(length)
        return h.rfile.read(length) if length else b""

    def too_large_body(self, size: int) -> Any:
        return {"error": f"request of {size} bytes exceeds {self.max_body}"}

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        u = urlsplit(h.path)
        entry: dict[str, Any] = {"method": h.command, "path": u.path, "query": u.query,
                                 "headers": {k.lower(): v for k, v in h.headers.items()}}
        try:
            raw = self._read_body(h)
        except _TooLarge as e:
            h.close_connection = True
            with self.lock:
                self.requests += 1
                entry.update(bytes=e.args[0], status=413)
                self.request_log.append(entry)
            self._respond(h, Reply(413, self.too_large_body(e.args[0])))
            return
        except (ValueError, OSError):
            h.close_connection = True
            return
        entry["bytes"] = len(raw)
        with self.lock:
            self.requests += 1
            fault = self._faults.popleft() if self._faults else None
        if fault is not None:
            reply = fault
        else:
            body, enc_error = raw, None
            enc = (h.headers.get("Content-Encoding") or "").strip().lower()
            if enc in ("gzip", "x-gzip"):
                try:
                    body = gzip.decompress(raw)
                except (OSError, EOFError, zlib.error) as e:
                    enc_error = f"invalid gzip body: {e}"
            elif enc not in ("", "identity"):
                enc_error = f"unsupported Content-Encoding {enc}"
            entry["decoded_bytes"] = len(body)
            req = Request(h.command, u.path, parse_qs(u.query), h.headers, body, len(raw))
            try:
                reply = self.bad_encoding(req, enc_error) if enc_error else self.handle(req)
            except Exception as e:  # a bug in the receiver: make it visible to the test
                reply = Reply(500, {"receiver_bug": f"{type(e).__name__}: {e}"})
        entry["status"] = reply.status
        with self.lock:
            self.request_log.append(entry)
        self._respond(h, reply)

    def _respond(self, h: BaseHTTPRequestHandler, reply: Reply) -> None:
        if isinstance(reply.body, (bytes, bytearray)):
            data, ctype = bytes(reply.body), "text/plain; charset=UTF-8"
        else:
            data, ctype = json.dumps(reply.body, separators=(",", ":")).encode(), "application/json; charset=UTF-8"
        try:
            h.send_response(reply.status)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(data)))
            for k, v in reply.headers.items():
                h.send_header(k, v)
            if h.close_connection:
                h.send_header("Connection", "close")
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        except OSError:
            h.close_connection = True

    # ---- to override

    def handle(self, req: Request) -> Reply:  # pragma: no cover - abstract
        raise NotImplementedError

    def bad_encoding(self, req: Request, why: str) -> Reply:
        return Reply(400, {"error": why})


# --------------------------------------------------------------------------- Splunk HEC

HEC_TEXT = {0: "Success", 1: "Token disabled", 2: "Token is required", 3: "Invalid authorization",
            4: "Invalid token", 5: "No data", 6: "Invalid data format", 7: "Incorrect index",
            8: "Internal server error", 9: "Server is busy", 10: "Data channel is missing",
            11: "Invalid data channel", 12: "Event field is required", 13: "Event field cannot be blank",
            14: "ACK is disabled", 15: "Error in handling indexed fields",
            16: "Query string authorization is not enabled", 17: "HEC is healthy"}
HEC_STATUS = {0: 200, 1: 403, 2: 401, 3: 401, 4: 403, 5: 400, 6: 400, 7: 400, 8: 500, 9: 503, 10: 400, 11: 400,
              12: 400, 13: 400, 14: 400, 15: 400, 16: 400, 17: 200}
HEC_PATHS = ("/services/collector", "/services/collector/event", "/services/collector/event/1.0")
_JSON_WS = re.compile(r"[ \t\n\r]*")
_NUMERIC = re.compile(r"[0-9]+(\.[0-9]+)?")


class HecFormatError(ValueError):
    """A HEC body refused with ``code`` at event number ``index`` (0-based)."""

    def __init__(self, code: int, index: int):
        super().__init__(f"{HEC_TEXT[code]} (event {index})")
        self.code = code
        self.index = index


def _hec_check(obj: Any, i: int, indexes: set[str] | None) -> None:
    if not isinstance(obj, dict):
        raise HecFormatError(6, i)
    if "event" not in obj:
        raise HecFormatError(12, i)
    if obj["event"] is None or obj["event"] == "":
        raise HecFormatError(13, i)
    t = obj.get("time")
    if t is not None:
        if isinstance(t, bool) or not (isinstance(t, (int, float)) or (isinstance(t, str) and _NUMERIC.fullmatch(t))):
            raise HecFormatError(6, i)
    for k in ("host", "source", "sourcetype", "index"):
        if k in obj and not isinstance(obj[k], str):
            raise HecFormatError(6, i)
    if "fields" in obj:
        f = obj["fields"]
        if not isinstance(f, dict) or not all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool)
                or isinstance(v, list) and all(isinstance(x, str) for x in v) for v in f.values()):
            raise HecFormatError(15, i)
    if indexes is not None and "index" in obj and obj["index"] not in indexes:
        raise HecFormatError(7, i)


def iter_hec_events(body: bytes, indexes: set[str] | None = None,
                    reject: Callable[[dict], int | None] | None = None) -> Iterator[dict]:
    """The event envelopes of a HEC ``/event`` body, in order; raises ``HecFormatError``
    at the first invalid one (the ones before it have been yielded, as Splunk indexes them)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HecFormatError(6, 0) from None
    dec = json.JSONDecoder()
    pos = _JSON_WS.match(text, 0).end()
    if pos == len(text):
        raise HecFormatError(5, 0)
    i = 0
    while pos < len(text):
        try:
            obj, pos = dec.raw_decode(text, pos)
        except ValueError:
            raise HecFormatError(6, i) from None
        _hec_check(obj, i, indexes)
        code = reject(obj) if reject is not None else None
        if code:
            raise HecFormatError(code, i)
        yield obj
        i += 1
        pos = _JSON_WS.match(text, pos).end()


def parse_hec_body(body: bytes, indexes: set[str] | None = None) -> list[dict]:
    """All envelopes of a HEC body, or ``HecFormatError``."""
    return list(iter_hec_events(body, indexes))


class HecReceiver(_Receiver):
    """Splunk HTTP Event Collector. ``events``: the ``event`` values; ``envelopes``: the whole objects.

    ``indexes``: the token's allowed indexes (None: any); ``require_channel``:
    like a token with indexer acknowledgement (a channel is then mandatory)."""

    name = "hec"

    def __init__(self, token: str, *, indexes: list[str] | None = None, require_channel: bool = False,
                 **kw: Any):
        self.token = token
        self.indexes = set(indexes) if indexes is not None else None
        self.require_channel = require_channel
        self.envelopes: list[dict] = []
        self.channels: list[str | None] = []
        self.disabled = False  # token disabled (code 1)
        self._reject: Callable[[dict], int | None] | None = None
        super().__init__(**kw)

    def reject_events(self, predicate: Callable[[dict], bool] | None, code: int = 6) -> None:
        """Refuse envelopes matching ``predicate`` with HEC ``code`` (as Splunk refuses an
        event it cannot parse); None stops refusing."""
        self._reject = None if predicate is None else (lambda env: code if predicate(env) else None)

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self.envelopes.clear()
            self.channels.clear()

    @staticmethod
    def reply(code: int, **extra: Any) -> Reply:
        return Reply(HEC_STATUS[code], {"text": HEC_TEXT[code], "code": code, **extra})

    def error_body(self, status: int) -> Any:
        code = {503: 9, 500: 8, 401: 2, 403: 4, 400: 6}.get(status)
        if code is not None:
            return {"text": HEC_TEXT[code], "code": code}
        return {"text": f"HTTP {status}", "code": status}

    def too_large_body(self, size: int) -> Any:
        return {"text": f"Content-Length of {size} too large (maximum is {self.max_body})", "code": 413}

    def bad_encoding(self, req: Request, why: str) -> Reply:
        return self.reply(6, **{"invalid-event-number": 0})

    def _auth(self, req: Request) -> Reply | None:
        auth = req.headers.get("Authorization")
        if auth is None:
            return self.reply(2)
        scheme, _, cred = auth.strip().partition(" ")
        if scheme == "Splunk":
            token = cred.strip()
        elif scheme.lower() == "basic":
            try:
                token = base64.b64decode(cred.strip(), validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return self.reply(3)
        else:
            return self.reply(3)
        if token != self.token:
            return self.reply(4)
        if self.disabled:
            return self.reply(1)
        return None

    def handle(self, req: Request) -> Reply:
        if req.path.rstrip("/") == "/services/collector/health" and req.method == "GET":
            return self.reply(17)
        if req.path.rstrip("/") not in HEC_PATHS:
            return Reply(404, {"text": "The requested URL was not found on this server.", "code": 404})
        if req.method != "POST":
            return Reply(405, {"text": "Method Not Allowed", "code": 405})
        denied = self._auth(req)
        if denied:
            return denied
        channel = req.headers.get("X-Splunk-Request-Channel") or (req.query.get("channel") or [None])[0]
        if channel is not None:
            try:
                uuid.UUID(channel)
            except ValueError:
                return self.reply(11)
        elif self.require_channel:
            return self.reply(10)
        try:
            for env in iter_hec_events(req.body, self.indexes, self._reject):
                with self.lock:
                    self.envelopes.append(env)
                    self.events.append(env["event"])
                    self.channels.append(channel)
        except HecFormatError as e:
            if e.code == 5:
                return self.reply(5)
            return self.reply(e.code, **{"invalid-event-number": e.index})
        return self.reply(0)


# --------------------------------------------------------------------------- Elasticsearch / OpenSearch _bulk

BULK_CONTENT_TYPES = ("application/x-ndjson", "application/json", "application/vnd.elasticsearch+x-ndjson",
                      "application/vnd.elasticsearch+json")
BULK_ACTIONS = ("create", "delete", "index", "update")
BULK_META = frozenset({"_index", "_id", "routing", "pipeline", "require_alias", "require_data_stream",
                       "if_seq_no", "if_primary_term", "version", "version_type", "dynamic_templates",
                       "retry_on_conflict", "_source", "list_executed_pipelines"})
_DATE_RE = re.compile(r"\d{4}[-/]\d{2}[-/]\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?(Z|[+-]\d{2}:?\d{2})?")
_INDEX_FORBIDDEN = set('\\/*?"<>| ,#:')


class BulkRequestError(ValueError):
    """A whole ``_bulk`` request refused (HTTP 400 with an ES error body)."""

    def __init__(self, type_: str, reason: str):
        super().__init__(reason)
        self.type = type_
        self.reason = reason


@dataclass
class BulkOp:
    action: str
    meta: dict
    source: bytes | None  # the raw source line (None for delete)
    line: int  # 1-based line of the action


def parse_bulk_body(body: bytes, default_index: str | None = None) -> list[BulkOp]:
    """The operations of a ``_bulk`` body (validates the framing, not the documents)."""
    if not body:
        raise BulkRequestError("parse_exception", "request body is required")
    if not body.endswith(b"\n"):
        raise BulkRequestError("illegal_argument_exception", "The bulk request must be terminated by a newline [\\n]")
    lines = body[:-1].split(b"\n")
    ops: list[BulkOp] = []
    n = 0
    while n < len(lines):
        raw = lines[n].rstrip(b"\r")
        n += 1
        if not raw.strip():
            continue
        try:
            action = json.loads(raw)
        except ValueError:
            raise BulkRequestError("x_content_parse_exception",
                                   f"[{n}:1] Malformed action/metadata line [{n}], expected START_OBJECT") from None
        if not isinstance(action, dict) or len(action) != 1:
            raise BulkRequestError("illegal_argument_exception",
                                   f"Malformed action/metadata line [{n}], expected START_OBJECT or END_OBJECT "
                                   f"but found [{type(action).__name__}]")
        (name, meta), = action.items()
        if name not in BULK_ACTIONS:
            raise BulkRequestError("illegal_argument_exception",
                                   f"Malformed action/metadata line [{n}], expected one of [create, delete, "
                                   f"index, update] but found [{name}]")
        if not isinstance(meta, dict):
            raise BulkRequestError("illegal_argument_exception",
                                   f"Malformed action/metadata line [{n}], expected START_OBJECT but found "
                                   f"[{type(meta).__name__}]")
        for k in meta:
            if k not in BULK_META:
                raise BulkRequestError("illegal_argument_exception",
                                       f"Action/metadata line [{n}] contains an unknown parameter [{k}]")
        meta = dict(meta)
        if "_index" not in meta:
            if default_index is None:
                raise BulkRequestError("action_request_validation_exception", "Validation Failed: 1: index is missing;")
            meta["_index"] = default_index
        if not isinstance(meta["_index"], str) or ("_id" in meta and not isinstance(meta["_id"], str)):
            raise BulkRequestError("illegal_argument_exception", f"Malformed action/metadata line [{n}]")
        if name == "delete" and "_id" not in meta:
            raise BulkRequestError("action_request_validation_exception", "Validation Failed: 1: id is missing;")
        source = None
        if name != "delete":
            if n >= len(lines):
                raise BulkRequestError("illegal_argument_exception",
                                       f"Action/metadata line [{n}] is not followed by a source line")
            source = lines[n].rstrip(b"\r")
            n += 1
        ops.append(BulkOp(name, meta, source, n))
    if not ops:
        raise BulkRequestError("action_request_validation_exception", "Validation Failed: 1: no requests added;")
    return ops


def _index_problem(name: str) -> str | None:
    if name != name.lower():
        return "must be lowercase"
    if not name or any(c in _INDEX_FORBIDDEN for c in name):
        return 'must not contain the following characters [ , ", *, \\, <, |, ,, >, /, ?, #, :]'
    if name[0] in "-_+":
        return "must not start with '_', '-', or '+'"
    if name in (".", "..") or len(name.encode()) > 255:
        return "must not be '.' or '..' or longer than 255 bytes"
    return None


def _value_type(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "long"
    if isinstance(v, float):
        return "float"
    if isinstance(v, dict):
        return "object"
    if isinstance(v, str):
        return "date" if _DATE_RE.fullmatch(v) else "text"
    return None


def _fits(mapped: str, v: Any) -> bool:
    if v is None:
        return True
    if mapped == "object":
        return isinstance(v, dict)
    if isinstance(v, dict):
        return False
    if mapped in ("long", "float"):
        if isinstance(v, bool):
            return False
        if isinstance(v, (int, float)):
            return True
        try:
            float(v)
            return True
        except (TypeError, ValueError):
            return False
    if mapped == "boolean":
        return isinstance(v, bool) or v in ("true", "false")
    if mapped == "date":
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return True  # epoch millis
        return isinstance(v, str) and bool(_DATE_RE.fullmatch(v))
    return True  # text takes any scalar


class BulkReceiver(_Receiver):
    """Elasticsearch/OpenSearch ``_bulk``. ``indices``: index -> {_id: document}; ``events``:
    the documents stored (created or indexed), in order; dynamic mapping per index
    (the first value of a field fixes its type, like ES dynamic mapping).

    ``username``/``password`` and/or ``api_key``: required credentials (None: no
    security). ``flavor``: ``elasticsearch`` (document_parsing_exception) or
    ``opensearch`` (mapper_parsing_exception)."""

    name = "bulk"

    def __init__(self, *, username: str | None = None, password: str | None = None, api_key: str | None = None,
                 flavor: str = "elasticsearch", **kw: Any):
        self.username, self.password, self.api_key = username, password, api_key
        self.flavor = flavor
        self.indices: dict[str, dict[str, dict]] = {}
        self.mappings: dict[str, dict[str, str]] = {}
        self.item_faults: dict[str, collections.deque[int]] = {}
        self.seq_no = 0
        super().__init__(**kw)

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self.indices.clear()
            self.mappings.clear()
            self.item_faults.clear()

    def fail_ids(self, ids, status: int = 429, times: int = 1) -> None:
        """The items with these ``_id`` get ``status`` (instead of being stored) ``times`` times."""
        with self.lock:
            for i in ids:
                self.item_faults.setdefault(i, collections.deque()).extend([status] * times)

    def doc(self, index: str, id_: str) -> dict | None:
        with self.lock:
            return self.indices.get(index, {}).get(id_)

    @staticmethod
    def es_error(status: int, type_: str, reason: str, **extra: Any) -> Reply:
        cause = {"type": type_, "reason": reason, **extra}
        return Reply(status, {"error": {"root_cause": [cause], **cause}, "status": status})

    def error_body(self, status: int) -> Any:
        if status == 429:
            return self.es_error(429, "es_rejected_execution_exception", "rejected execution of coordinating "
                                 "operation [coordinating_and_primary_bytes=0, max_coordinating_and_primary_bytes=0]"
                                 ).body
        if status in (401, 403):
            return self._auth_error(status).body
        if status >= 500:
            return self.es_error(status, "cluster_block_exception" if status == 503 else "exception",
                                 "blocked by: [SERVICE_UNAVAILABLE/1/state not recovered / initialized];"
                                 if status == 503 else "internal error").body
        return self.es_error(status, "illegal_argument_exception", f"HTTP {status}").body

    def too_large_body(self, size: int) -> Any:
        return b""  # ES answers 413 with an empty body when http.max_content_length is exceeded

    def bad_encoding(self, req: Request, why: str) -> Reply:
        return self.es_error(400, "illegal_argument_exception", why)

    def _auth_error(self, status: int = 401, user: str | None = None) -> Reply:
        reason = (f"unable to authenticate user [{user}] for REST request [/_bulk]" if user
                  else "missing authentication credentials for REST request [/_bulk]")
        if status == 403:
            reason = "action [indices:data/write/bulk] is unauthorized"
        hdr = {"WWW-Authenticate": 'Basic realm="security", charset="UTF-8", ApiKey'}
        r = self.es_error(status, "security_exception", reason, header={"WWW-Authenticate": [hdr["WWW-Authenticate"]]})
        r.headers.update(hdr if status == 401 else {})
        return r

    def _auth(self, req: Request) -> Reply | None:
        if self.username is None and self.api_key is None:
            return None
        auth = (req.headers.get("Authorization") or "").strip()
        scheme, _, cred = auth.partition(" ")
        if scheme.lower() == "basic" and self.username is not None:
            try:
                user, _, pw = base64.b64decode(cred, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return self._auth_error()
            if (user, pw) == (self.username, self.password):
                return None
            return self._auth_error(user=user)
        if scheme == "ApiKey" and self.api_key is not None:
            return None if cred == self.api_key else self._auth_error(user="_api_key")
        return self._auth_error()

    def handle(self, req: Request) -> Reply:
        parts = [p for p in req.path.split("/") if p]
        if req.method == "GET" and not parts:
            return Reply(200, {"name": "siem-test", "cluster_name": "test", "version": {
                "number": "8.15.0" if self.flavor == "elasticsearch" else "2.17.0",
                "distribution": self.flavor}, "tagline": "You Know, for Search"})
        if not parts or parts[-1] != "_bulk" or len(parts) > 2:
            return Reply(400, {"error": f"no handler found for uri [{req.path}] and method [{req.method}]"})
        if req.method not in ("POST", "PUT"):
            return Reply(405, {"error": f"Incorrect HTTP method for uri [{req.path}] and method [{req.method}], "
                                        "allowed: [POST, PUT]", "status": 405})
        denied = self._auth(req)
        if denied:
            return denied
        ctype = req.headers.get("Content-Type")
        if not ctype:
            return Reply(406, {"error": "Content-Type header is missing", "status": 406})
        if ctype.split(";")[0].strip().lower() not in BULK_CONTENT_TYPES:
            return Reply(406, {"error": f"Content-Type header [{ctype}] is not supported", "status": 406})
        t0 = time.monotonic()
        try:
            ops = parse_bulk_body(req.body, parts[0] if len(parts) == 2 else None)
        except BulkRequestError as e:
            return self.es_error(400, e.type, e.reason)
        with self.lock:
            items = [self._apply(op) for op in ops]
        errors = any("error" in next(iter(i.values())) for i in items)
        return Reply(200, {"took": int((time.monotonic() - t0) * 1000), "errors": errors, "items": items})

    def _item_error(self, op: BulkOp, status: int, type_: str, reason: str, id_: str | None) -> dict:
        res = {"_index": op.meta["_index"], "_id": id_, "status": status,
               "error": {"type": type_, "reason": reason, "index": op.meta["_index"]}}
        return {op.action: res}

    def _apply(self, op: BulkOp) -> dict:
        index = op.meta["_index"]
        id_ = op.meta.get("_id")
        problem = _index_problem(index)
        if problem:
            return self._item_error(op, 400, "invalid_index_name_exception", f"Invalid index name [{index}], {problem}",
                                    id_)
        if id_ is not None and id_ in self.item_faults and self.item_faults[id_]:
            st = self.item_faults[id_].popleft()
            kind = {429: "es_rejected_execution_exception", 503: "unavailable_shards_exception"}.get(st, "exception")
            return self._item_error(op, st, kind, f"injected failure {st}", id_)
        docs = self.indices.setdefault(index, {})
        if op.action == "delete":
            found = docs.pop(id_, None) is not None
            return {"delete": self._ok(index, id_, 200 if found else 404, "deleted" if found else "not_found")}
        parse_type = "document_parsing_exception" if self.flavor == "elasticsearch" else "mapper_parsing_exception"
        try:
            doc = json.loads(op.source or b"")
        except ValueError:
            return self._item_error(op, 400, parse_type, "failed to parse", id_)
        if not isinstance(doc, dict):
            return self._item_error(op, 400, parse_type, "failed to parse: source is not an object", id_)
        if op.action == "update":
            if id_ is None or id_ not in docs:
                return self._item_error(op, 404, "document_missing_exception", f"[{id_}]: document missing", id_)
            if not isinstance(doc.get("doc"), dict):
                return self._item_error(op, 400, "action_request_validation_exception",
                                        "Validation Failed: 1: script or doc is missing;", id_)
            doc = {**docs[id_], **doc["doc"]}
        if id_ is None:
            id_ = base64.urlsafe_b64encode(os.urandom(15)).decode()
        if op.action == "create" and id_ in docs:
            return self._item_error(op, 409, "version_conflict_engine_exception",
                                    f"[{id_}]: version conflict, document already exists (current version [1])", id_)
        bad = self._map(index, doc)
        if bad:
            return self._item_error(op, 400, parse_type, bad.replace("{id}", id_), id_)
        existed = id_ in docs
        docs[id_] = doc
        self.events.append(doc)
        return {op.action: self._ok(index, id_, 200 if existed else 201, "updated" if existed else "created")}

    def _ok(self, index: str, id_: str, status: int, result: str) -> dict:
        self.seq_no += 1
        return {"_index": index, "_id": id_, "_version": 1, "result": result,
                "_shards": {"total": 2, "successful": 1, "failed": 0}, "_seq_no": self.seq_no,
                "_primary_term": 1, "status": status}

    def _map(self, index: str, doc: dict) -> str | None:
        """Dynamic mapping: None if ``doc`` fits, else the ES reason. Updates the mapping only on success."""
        mapping = self.mappings.setdefault(index, {})
        new: dict[str, str] = {}

        def walk(obj: dict, prefix: str) -> str | None:
            for k, v in obj.items():
                path = f"{prefix}{k}"
                for item in (v if isinstance(v, list) else [v]):
                    mapped = mapping.get(path) or new.get(path)
                    if mapped is None:
                        t = _value_type(item)
                        if t is not None:
                            new[path] = t
                            mapped = t
                    elif not _fits(mapped, item):
                        if mapped == "object":
                            return (f"object mapping for [{path}] tried to parse field [{k}] as object, "
                                    "but found a concrete value")
                        return (f"[1:1] failed to parse field [{path}] of type [{mapped}] in document with "
                                "id '{id}'")
                    if isinstance(item, dict):
                        bad = walk(item, path + ".")
                        if bad:
                            return bad
            return None

        bad = walk(doc, "")
        if bad is None:
            mapping.update(new)
        return bad


# --------------------------------------------------------------------------- webhook


class WebhookReceiver(_Receiver):
    """NDJSON webhook: ``POST path``, ``Content-Type: application/x-ndjson``, one JSON
    object per line and a final newline (all-or-nothing). ``token``: required
    ``Authorization: Bearer`` value; ``headers``: other required header values."""

    name = "webhook"

    def __init__(self, *, path: str = "/", token: str | None = None, headers: dict[str, str] | None = None,
                 **kw: Any):
        self.path = path
        self.token = token
        self.required_headers = dict(headers or {})
        super().__init__(**kw)

    def handle(self, req: Request) -> Reply:
        if req.path != self.path:
            return Reply(404, {"error": "not found"})
        if req.method != "POST":
            return Reply(405, {"error": "method not allowed"}, {"Allow": "POST"})
        if self.token is not None and req.headers.get("Authorization") != f"Bearer {self.token}":
            return Reply(401, {"error": "unauthorized"}, {"WWW-Authenticate": "Bearer"})
        for k, v in self.required_headers.items():
            if req.headers.get(k) != v:
                return Reply(403, {"error": f"header {k} missing or wrong"})
        ctype = (req.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-ndjson":
            return Reply(415, {"error": f"expected application/x-ndjson, got {ctype or 'nothing'}"})
        if not req.body:
            return Reply(400, {"error": "empty body"})
        if not req.body.endswith(b"\n"):
            return Reply(400, {"error": "NDJSON body must end with a newline"})
        docs = []
        for n, line in enumerate(req.body[:-1].split(b"\n"), 1):
            try:
                doc = json.loads(line)
            except ValueError:
                return Reply(400, {"error": f"line {n}: not JSON"})
            if not isinstance(doc, dict):
                return Reply(400, {"error": f"line {n}: not a JSON object"})
            docs.append(doc)
        with self.lock:
            self.events.extend(docs)
        return Reply(200, {"accepted": len(docs)})

