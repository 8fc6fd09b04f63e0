"""HTTP sinks: Splunk HTTP Event Collector, Elasticsearch/OpenSearch ``_bulk``
and a generic NDJSON webhook.

All three share ``HttpSink``: one urllib3 ``PoolManager`` per sink (the sink
runs on its own shipper thread), no urllib3 retries and no redirects (the
shipper retries; a redirect could carry credentials elsewhere), connect/read
timeouts (5 s / 30 s by default), TLS verification always on (system trust
store, or the ``ca`` file), optional gzip request bodies (``compress: true``).

Outcome of a request (``DeliveryError`` carries two extra attributes on every
error raised here: ``retry_after`` (seconds from a Retry-After header, or None)
and ``split`` (bool)):

* 2xx: delivered (after the sink has checked the API's own response body);
* 408, 429, 5xx, connection/TLS/timeout errors: retryable;
* 401, 403: retryable, "credentials refused": an operator fixes the
  credentials and nothing is dropped;
* 3xx, 404, 405: retryable: the URL is wrong (an operator fixes it), this is
  no refusal of the events' content;
* 413: with more than one event in the batch, retryable with ``split=True``:
  the shipper should halve the batch and send the halves (a too-large request
  says nothing about the events' content); with a single event, non-retryable
  (that event can never be delivered);
* 400 and other 4xx: non-retryable (the receiver refused the content).

Sink-specific refinements (see each class): HEC error codes, per-item results
of ``_bulk``.

Secrets (``token``, ``password``, ``api_key``, header values) are secret
references in the configuration (``env:NAME``, ``file:/PATH``, ``local:NAME``,
``vault:MOUNT/PATH#field``), resolved once, when the sink is built, through
the ``resolve`` callable given to ``from_config`` (it receives the reference's
canonical text and returns the value). Their values never appear in
exception messages or ``describe()``: messages are built from the sink's
origin, statuses and receiver replies, and every message is scrubbed of the
resolved values as a last line of defence.
"""

from __future__ import annotations

import base64
import calendar
import datetime as _dt
import email.utils
import gzip
import json
import re
import socket
import ssl
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import urllib3

from gateway.audit.sinks.base import DeliveryError, Event, Sink, render
from gateway.secrets.refs import RefError, SCHEMES, parse_ref, parse_template

DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 30.0
MAX_TIMEOUT = 600.0
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
SECRET_REF_HELP = "use env:NAME, file:PATH, local:PATH or vault:PATH#field"
_SECRET_SCHEMES = ("env", "file", "local", "vault")  # vault-dynamic: leases are not renewed by sinks

Resolver = Callable[[str], str]

_UTC = _dt.timezone.utc


def delivery_error(message: str, *, retryable: bool = True, rejected: Sequence[int] = (),
                   retry_after: float | None = None, split: bool = False) -> DeliveryError:
    """A ``DeliveryError`` with this module's extra attributes ``retry_after`` and ``split``."""
    err = DeliveryError(message, retryable=retryable, rejected=rejected)
    err.retry_after = retry_after  # type: ignore[attr-defined]
    err.split = split  # type: ignore[attr-defined]
    return err


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), 86400))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_UTC)
    return min(86400.0, max(0.0, when.timestamp() - (time.time() if now is None else now)))


def event_datetime(ev: Event) -> _dt.datetime | None:
    """The event's ``ts`` as an aware UTC datetime (None when missing or unparsable)."""
    ts = ev.ts
    if not ts:
        return None
    try:
        dt = _dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_UTC)
    return dt.astimezone(_UTC)


def epoch_text(dt: _dt.datetime) -> str:
    """Epoch seconds with microseconds as exact JSON number text (no float rounding)."""
    return f"{calendar.timegm(dt.utctimetuple())}.{dt.microsecond:06d}"


# --------------------------------------------------------------------------- options


class _Options:
    """Validation of one sink's options; errors are ``ValueError("audit.sinks.NAME: ...")``."""

    IGNORED = ("kind", "format")  # consumed by the caller (sink kind, event format)

    def __init__(self, name: str, kind: str, options: Mapping[str, Any] | None, known: Sequence[str],
                 resolve: Resolver | None):
        self.name = name
        self.kind = kind
        self.resolve = resolve
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ValueError(f"audit.sinks.{name}: options must be a mapping, not {type(options).__name__}")
        bad = sorted(str(k) for k in options if k not in known and k not in self.IGNORED)
        if bad:
            raise ValueError(f"audit.sinks.{name}: unknown option{'s' if len(bad) > 1 else ''} "
                             f"{', '.join(bad)} for a {kind} sink (known: {', '.join(sorted(known))})")
        self.o = dict(options)

    def err(self, key: str, msg: str) -> ValueError:
        return ValueError(f"audit.sinks.{self.name}: {key}: {msg}")

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        v = self.o.get(key)
        if v is None:
            if required:
                raise self.err(key, f"required for a {self.kind} sink")
            return default
        if not isinstance(v, str) or not v.strip():
            raise self.err(key, "must be a non-empty string")
        if any(c in v for c in "\r\n\x00"):
            raise self.err(key, "cannot contain CR, LF or NUL")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        v = self.o.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.err(key, "must be true or false")
        return v

    def number(self, key: str, default: float, *, lo: float = 0.0, hi: float = MAX_TIMEOUT) -> float:
        v = self.o.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v <= hi):
            raise self.err(key, f"must be a number of seconds greater than {lo:g} and at most {hi:g}")
        return float(v)

    def _ref(self, key: str, text: Any):
        """Parse a secret reference without ever echoing a value that is not one."""
        if not isinstance(text, str):
            raise self.err(key, f"must be a secret reference ({SECRET_REF_HELP}), not a {type(text).__name__}")
        scheme, sep, _ = text.partition(":")
        if not sep or scheme not in SCHEMES:
            raise self.err(key, "must be a secret reference so that the configuration never holds the secret "
                                f"({SECRET_REF_HELP})")
        try:
            ref = parse_ref(text)
        except RefError as e:
            raise self.err(key, f"malformed secret reference: {e.message} ({SECRET_REF_HELP})") from None
        if ref.scheme not in _SECRET_SCHEMES:
            raise self.err(key, f"{ref.scheme}: references are not supported for sinks ({SECRET_REF_HELP})")
        return ref

    def _resolve(self, key: str, ref) -> str:
        if self.resolve is None:
            raise self.err(key, "no secret resolver given")
        try:
            value = self.resolve(str(ref))
        except Exception as e:  # the resolver names references, never values
            raise self.err(key, f"cannot resolve {ref}: {type(e).__name__}: {e}") from None
        if not isinstance(value, str) or not value:
            raise self.err(key, f"{ref} resolved to an empty value")
        if any(c in value for c in "\r\n\x00"):
            raise self.err(key, f"the value of {ref} contains CR, LF or NUL")
        return value

    def secret(self, key: str, *, required: bool = False) -> str | None:
        v = self.o.get(key)
        if v is None:
            if required:
                raise self.err(key, f"required for a {self.kind} sink (a secret reference: {SECRET_REF_HELP})")
            return None
        return self._resolve(key, self._ref(key, v))

    def header_values(self, key: str) -> dict[str, str]:
        """``headers``: name -> a secret reference, or a value embedding ``${REF}`` (e.g. ``Bearer ${env:X}``)."""
        v = self.o.get(key)
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise self.err(key, "must be a mapping of header name to secret reference")
        out: dict[str, str] = {}
        seen: set[str] = set()
        for hname, hval in v.items():
            where = f"{key}.{hname}"
            if not isinstance(hname, str) or not _TOKEN_RE.fullmatch(hname):
                raise self.err(key, f"invalid header name {str(hname)[:64]!r}")
            if hname.lower() in _RESERVED_HEADERS:
                raise self.err(where, "this header is set by the sink and cannot be configured")
            if hname.lower() in seen:
                raise self.err(where, "duplicate header (names are case-insensitive)")
            seen.add(hname.lower())
            if isinstance(hval, str) and "${" in hval:
                try:
                    tpl = parse_template(hval)
                except RefError as e:
                    raise self.err(where, f"malformed value template: {e.message} ({SECRET_REF_HELP})") from None
                refs = tpl.refs
                for r in refs:
                    if r.scheme not in _SECRET_SCHEMES:
                        raise self.err(where, f"{r.scheme}: references are not supported for sinks")
                if not refs:
                    raise self.err(where, "header values may hold secrets: give a secret reference "
                                          f"or embed one as ${{REF}} ({SECRET_REF_HELP})")
                out[hname] = tpl.render({r: self._resolve(where, r) for r in refs})
            else:
                out[hname] = self._resolve(where, self._ref(where, hval))
        return out


_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
_RESERVED_HEADERS = frozenset({"host", "content-type", "content-length", "content-encoding", "transfer-encoding",
                               "connection", "keep-alive", "te", "trailer", "upgrade", "expect"})


def _check_url(opts: _Options, key: str = "url") -> str:
    url = opts.string(key, required=True)
    assert url is not None
    try:
        u = urlsplit(url)
        u.port  # noqa: B018 - validates the port
    except ValueError as e:
        raise opts.err(key, f"not a valid URL ({e})") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise opts.err(key, "must be an http:// or https:// URL with a host")
    if u.username is not None or u.password is not None:
        raise opts.err(key, "cannot hold credentials (use the sink's secret options)")
    if u.query or u.fragment:
        raise opts.err(key, "cannot have a query string or fragment (they may carry secrets; "
                            "use the sink's secret options)")
    return url


# --------------------------------------------------------------------------- base


class HttpSink(Sink):
    """Common HTTP delivery; subclasses build the request and judge the response."""

    kind = "http"
    COMMON_OPTIONS = ("url", "ca", "compress", "connect_timeout", "read_timeout")
    content_type = "application/x-ndjson"

    def __init__(self, name: str, fmt: str = "json", *, url: str, ca: str | None = None, compress: bool = False,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 headers: Mapping[str, str] | None = None, secrets: Sequence[str] = ()):
        super().__init__(name, fmt)
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"sink {name}: url must be an http:// or https:// URL with a host")
        if u.username is not None or u.password is not None or u.query or u.fragment:
            raise ValueError(f"sink {name}: url cannot hold credentials, a query string or a fragment")
        self.scheme = u.scheme
        self.origin = f"{u.scheme}://{u.netloc}"
        self.url_path = u.path or "/"
        self.base_path = u.path.rstrip("/")
        self.compress = compress
        self.ca = ca
        self._headers = {"Content-Type": self.content_type, "User-Agent": "egress-gateway-audit"}
        self._headers.update(headers or {})
        # Resolved secret values (and their encodings) scrubbed from every message.
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)
        timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        kw: dict[str, Any] = dict(num_pools=1, maxsize=1, block=False, timeout=timeout, retries=False)
        if self.scheme == "https":
            try:
                kw["ssl_context"] = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"sink {name}: cannot load the CA file {ca}: {e}") from None
        elif ca:
            raise ValueError(f"sink {name}: ca is only used with an https:// url")
        self._pool = urllib3.PoolManager(**kw)
        self.endpoint = self.origin + self.endpoint_path()

    # ---- to override

    def endpoint_path(self) -> str:
        return self.base_path or "/"

    def build_body(self, batch: list[Event]) -> bytes:
        raise NotImplementedError

    def request_headers(self, batch: list[Event]) -> dict[str, str]:
        return {}

    def check_response(self, batch: list[Event], status: int, headers, data: bytes) -> None:
        """Called for every response; the default applies the common status table."""
        self.check_status(batch, status, headers, data)

    # ---- common

    def describe(self) -> str:
        return f"{self.kind} {self.origin}"

    def close(self) -> None:
        self._pool.clear()

    def send(self, batch: list[Event]) -> None:
        if not batch:
            return
        self.deliver(batch)

    def deliver(self, batch: list[Event]) -> None:
        """One request for ``batch``; raises DeliveryError unless delivered."""
        body = self.build_body(batch)
        status, headers, data = self.post(body, self.request_headers(batch))
        self.check_response(batch, status, headers, data)

    def scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def error(self, message: str, **kw: Any) -> DeliveryError:
        return delivery_error(self.scrub(f"{self.describe()}: {message}"), **kw)

    def snippet(self, data: bytes, limit: int = 300) -> str:
        text = data[:limit].decode("utf-8", "replace")
        text = "".join(c if c.isprintable() else " " for c in text).strip()
        return text + ("..." if len(data) > limit else "")

    def post(self, body: bytes, extra_headers: Mapping[str, str]) -> tuple[int, Any, bytes]:
        headers = dict(self._headers)
        headers.update(extra_headers)
        if self.compress:
            body = gzip.compress(body, compresslevel=6, mtime=0)
            headers["Content-Encoding"] = "gzip"
        try:
            resp = self._pool.request("POST", self.endpoint, body=body, headers=headers,
                                      preload_content=False, redirect=False, retries=False)
        except urllib3.exceptions.SSLError as e:
            raise self.error(f"TLS failure: {_reason(e)}") from None
        except urllib3.exceptions.NewConnectionError as e:
            raise self.error(f"cannot connect: {_reason(e)}") from None
        except urllib3.exceptions.TimeoutError as e:
            raise self.error(f"timed out: {_reason(e)}") from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise self.error(f"cannot connect or send: {_reason(e)}") from None
        try:
            data = resp.read(MAX_RESPONSE_BYTES + 1)
            if len(data) > MAX_RESPONSE_BYTES:
                resp.close()  # the rest is unread: this connection is not reused
        except (urllib3.exceptions.HTTPError, OSError) as e:
            resp.close()
            raise self.error(f"reading the response (HTTP {resp.status}) failed: {_reason(e)}") from None
        finally:
            resp.release_conn()
        if len(data) > MAX_RESPONSE_BYTES:
            raise self.error(f"HTTP {resp.status} response larger than {MAX_RESPONSE_BYTES} bytes")
        return resp.status, resp.headers, data

    def check_status(self, batch: list[Event], status: int, headers, data: bytes) -> None:
        if 200 <= status < 300:
            return
        retry_after = retry_after_seconds(headers.get("Retry-After"))
        detail = f"HTTP {status}" + (f": {self.snippet(data)}" if data else "")
        if status in (401, 403):
            raise self.error(f"credentials refused ({detail}); fix the sink's credentials, the batch is kept "
                             "and retried", retry_after=retry_after)
        if status in (408, 429) or status >= 500:
            raise self.error(f"receiver unavailable or overloaded ({detail})", retry_after=retry_after)
        if 300 <= status < 400:
            raise self.error(f"redirected ({detail}) to {headers.get('Location', '?')!s:.200}; redirects are "
                             "not followed: fix the url")
        if status in (404, 405):
            raise self.error(f"endpoint not found ({detail}); fix the url")
        if status == 413:
            if len(batch) > 1:
                raise self.error(f"request too large ({detail}); split the batch", split=True)
            raise self.error(f"a single event is too large for the receiver ({detail})", retryable=False)
        raise self.error(f"refused ({detail})", retryable=False)

    @staticmethod
    def common_options(o: _Options) -> dict[str, Any]:
        url = _check_url(o)
        ca = o.string("ca")
        if ca is not None:
            p = Path(ca)
            if not p.is_absolute():
                raise o.err("ca", "must be an absolute path to a PEM file")
            if not p.is_file():
                raise o.err("ca", f"{ca} is not a readable file")
            if urlsplit(url).scheme != "https":
                raise o.err("ca", "only used with an https:// url")
        return dict(url=url, ca=ca, compress=o.boolean("compress", False),
                    connect_timeout=o.number("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
                    read_timeout=o.number("read_timeout", DEFAULT_READ_TIMEOUT))


def _reason(e: BaseException) -> str:
    """A short reason for a urllib3/socket error (no request headers are ever part of it)."""
    reason = getattr(e, "reason", None)
    if isinstance(reason, BaseException) and reason is not e:
        e = reason
    text = str(e)
    # urllib3 prefixes connection objects: "HTTPConnection(host=..., port=...): Failed to ..."
    text = re.sub(r"^<?[\w.]+(Connection|Pool)[^:]*>?: ", "", text)
    return f"{type(e).__name__}: {text}"[:400]


class _ContentRefused(Exception):
    """HEC refused the content of the request (an event in it is invalid)."""

    def __init__(self, error: DeliveryError):
        super().__init__(str(error))
        self.error = error


# --------------------------------------------------------------------------- Splunk HEC

HEC_SOURCETYPES = {"json": "egress:audit", "ocsf": "egress:ocsf", "ecs": "egress:ecs"}
# HEC reply codes (Splunk "Troubleshoot HTTP Event Collector"), grouped by how the sink treats them
HEC_CONTENT_CODES = {5: "No data", 6: "Invalid data format", 12: "Event field is required",
                     13: "Event field cannot be blank", 15: "Error in handling indexed fields"}
HEC_CONFIG_CODES = {1: "Token disabled", 2: "Token is required", 3: "Invalid authorization", 4: "Invalid token",
                    7: "Incorrect index", 10: "Data channel is missing", 11: "Invalid data channel",
                    14: "ACK is disabled", 16: "Query string authorization is not enabled"}
HEC_BUSY_CODES = {8: "Internal server error", 9: "Server is busy"}


class HecSink(HttpSink):
    """Splunk HTTP Event Collector (``POST {url}/services/collector/event``).

    Options: ``url`` (base, e.g. ``https://splunk:8088``), ``token`` (secret
    reference, sent as ``Authorization: Splunk <token>``), ``index``, ``host``
    (default: this machine's hostname), ``source`` (default ``egress-gateway``),
    ``sourcetype`` (default ``egress:audit``, ``egress:ocsf`` or ``egress:ecs``
    by format), ``channel`` (a GUID, or ``true`` for a random one, sent as
    ``X-Splunk-Request-Channel``), plus the common ``ca``, ``compress``,
    ``connect_timeout``, ``read_timeout``.

    The body is one JSON envelope per event, one per line::

        {"time":1795482123.456789,"host":...,"source":...,"sourcetype":...,"index":...,"event":<event>}

    ``event`` is the rendered event; for the ``json`` format the spool line is
    embedded byte for byte (hash chain verifiable in Splunk).

    Replies: ``{"text":"Success","code":0}`` on 200 (anything else is a
    retryable error). A 400 with a content code (5, 6, 12, 13, 15) means an
    event is invalid; Splunk stops at that event (``invalid-event-number``)
    and may already have indexed the ones before it, so the sink bisects the
    batch within ``send`` to isolate the invalid events and raises a
    non-retryable error whose ``rejected`` lists them, once every other event
    was accepted (events before an invalid one may thus be indexed twice:
    at-least-once, receivers de-duplicate by ``id``). Codes about the token,
    index, channel or acknowledgement settings (1-4, 7, 10, 11, 14, 16) are
    configuration problems: retryable. Code 8/9 (internal error, busy):
    retryable. Indexer acknowledgement (``ackId``) is not polled.
    """

    kind = "splunk_hec"
    content_type = "application/json"
    OPTIONS = HttpSink.COMMON_OPTIONS + ("token", "index", "host", "source", "sourcetype", "channel")

    def __init__(self, name: str, fmt: str = "json", *, url: str, token: str, index: str | None = None,
                 host: str | None = None, source: str = "egress-gateway", sourcetype: str | None = None,
                 channel: str | None = None, **kw: Any):
        headers = {"Authorization": f"Splunk {token}"}
        if channel:
            headers["X-Splunk-Request-Channel"] = channel
        super().__init__(name, fmt, url=url, headers=headers, secrets=[token], **kw)
        self.channel = channel
        meta: dict[str, str] = {"host": host or socket.gethostname(), "source": source,
                                "sourcetype": sourcetype or HEC_SOURCETYPES[fmt]}
        if index:
            meta["index"] = index
        self.meta = meta
        self._meta_json = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)[1:-1].encode()

    def endpoint_path(self) -> str:
        return self.base_path + "/services/collector/event"

    def build_body(self, batch: list[Event]) -> bytes:
        parts: list[bytes] = []
        for ev in batch:
            parts.append(b"{")
            dt = event_datetime(ev)
            if dt is not None:
                parts += [b'"time":', epoch_text(dt).encode(), b","]
            parts += [self._meta_json, b',"event":', render(ev, self.fmt), b"}\n"]
        return b"".join(parts)

    def send(self, batch: list[Event]) -> None:
        if not batch:
            return
        rejected: list[int] = []
        reasons: list[str] = []
        self._send_part(batch, list(range(len(batch))), rejected, reasons)
        if rejected:
            rejected.sort()
            whole = len(rejected) == len(batch)
            what = "every event" if whole else f"{len(rejected)} of {len(batch)} events"
            raise self.error(f"refused the content of {what} (indexes {rejected[:20]}"
                             f"{'...' if len(rejected) > 20 else ''}): "
                             f"{reasons[0].removeprefix(self.describe() + ': ')}",
                             retryable=False, rejected=() if whole else rejected)

    def _send_part(self, batch: list[Event], idx: list[int], rejected: list[int], reasons: list[str]) -> None:
        try:
            self.deliver([batch[i] for i in idx])
        except _ContentRefused as e:
            if len(idx) == 1:
                rejected.append(idx[0])
                reasons.append(str(e.error))
                return
            mid = len(idx) // 2
            self._send_part(batch, idx[:mid], rejected, reasons)
            self._send_part(batch, idx[mid:], rejected, reasons)
        except DeliveryError as e:
            if e.retryable:
                raise  # the whole batch is resent (at-least-once)
            rejected.extend(idx)  # e.g. 413 for a single event, or a 400 without a HEC code
            reasons.append(str(e))

    def check_response(self, batch: list[Event], status: int, headers, data: bytes) -> None:
        reply = _json_or_none(data)
        code = reply.get("code") if isinstance(reply, dict) else None
        text = str(reply.get("text", ""))[:200] if isinstance(reply, dict) else ""
        if status == 200:
            if code == 0:
                return
            raise self.error(f"unexpected reply to HTTP 200: {self.snippet(data)}")
        if not isinstance(code, int) or isinstance(code, bool):
            self.check_status(batch, status, headers, data)  # raises unless 2xx
            raise self.error(f"unexpected reply to HTTP {status}: {self.snippet(data)}")
        detail = f"HTTP {status}, HEC code {code}: {text or HEC_CONTENT_CODES.get(code, '?')}"
        if isinstance(reply, dict) and "invalid-event-number" in reply:
            detail += f" (invalid-event-number {reply['invalid-event-number']})"
        retry_after = retry_after_seconds(headers.get("Retry-After"))
        if status == 400 and code in HEC_CONTENT_CODES:
            raise _ContentRefused(self.error(f"refused: {detail}", retryable=False))
        if code in (1, 2, 3, 4) or status in (401, 403):
            raise self.error(f"credentials refused ({detail}); fix the token, the batch is kept and retried",
                             retry_after=retry_after)
        if code in HEC_CONFIG_CODES:
            raise self.error(f"configuration refused ({detail}); fix the sink or the HEC input, the batch is "
                             "kept and retried", retry_after=retry_after)
        if code in HEC_BUSY_CODES:
            raise self.error(f"receiver unavailable or overloaded ({detail})", retry_after=retry_after)
        self.check_status(batch, status, headers, data)
        raise self.error(f"unexpected reply ({detail})")

    @classmethod
    def from_config(cls, name: str, fmt: str, options: Mapping[str, Any], resolve: Resolver) -> "HecSink":
        o = _Options(name, cls.kind, options, cls.OPTIONS, resolve)
        common = cls.common_options(o)
        if urlsplit(common["url"]).path.rstrip("/").endswith(("/services/collector", "/services/collector/event",
                                                              "/services/collector/raw")):
            raise o.err("url", "give the base URL (e.g. https://splunk:8088); the sink adds /services/collector/event")
        channel = o.o.get("channel")
        if channel is True:
            channel = str(uuid.uuid4())
        elif channel is False or channel is None:
            channel = None
        else:
            if not isinstance(channel, str):
                raise o.err("channel", "must be a GUID or true (a random GUID)")
            try:
                channel = str(uuid.UUID(channel))
            except ValueError:
                raise o.err("channel", "must be a GUID (e.g. 0aeeac95-ac74-4aa9-b30d-6c4c0ac581ba) or true") from None
        return cls(name, fmt, token=o.secret("token", required=True) or "", index=o.string("index"),
                   host=o.string("host"), source=o.string("source", "egress-gateway") or "egress-gateway",
                   sourcetype=o.string("sourcetype"), channel=channel, **common)


# --------------------------------------------------------------------------- Elasticsearch / OpenSearch

_INDEX_FORBIDDEN = set('\\/*?"<>| ,#:')
_SAMPLE_DATES = (_dt.datetime(2026, 12, 31, 23, 59, 59, tzinfo=_UTC), _dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=_UTC))


def index_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid Elasticsearch/OpenSearch index name (None if valid)."""
    if not name:
        return "is empty"
    if name != name.lower():
        return "must be lowercase"
    if any(c in _INDEX_FORBIDDEN for c in name):
        return 'cannot contain \\ / * ? " < > | space , # :'
    if name[0] in "-_+":
        return "cannot start with -, _ or +"
    if name in (".", ".."):
        return "cannot be . or .."
    if len(name.encode()) > 255:
        return "is longer than 255 bytes"
    return None


class BulkSink(HttpSink):
    """Elasticsearch ``_bulk`` (also OpenSearch, kind ``opensearch``).

    Options: ``url`` (base, e.g. ``https://es:9200``), ``index`` (default
    ``egress-audit``; strftime patterns such as ``egress-audit-%Y.%m.%d`` are
    filled from each event's ``ts`` in UTC), ``username`` + ``password``
    (secret reference; HTTP basic) or ``api_key`` (secret reference: the
    encoded API key, sent as ``Authorization: ApiKey <key>``), plus the common
    ``ca``, ``compress``, ``connect_timeout``, ``read_timeout``.

    Body: per event an action line ``{"create":{"_index":...,"_id":<event id>}}``
    and the rendered document, each ending with a newline. ``create`` with the
    event id makes redelivery idempotent: an item answered 409
    (version_conflict_engine_exception: the document exists) was delivered
    before and counts as delivered.

    Per-item results (``errors: true``): 2xx/409 delivered; 401/403/404/408/
    429/5xx (credentials, missing index, rejected execution, unavailable
    shards) make the whole batch retryable (resending is idempotent); any other
    item failure (e.g. 400 document_parsing_exception / mapper_parsing_exception)
    is a refusal of that document: non-retryable with ``rejected`` listing
    those items, but only when every other item was delivered.
    """

    kind = "elasticsearch"
    OPTIONS = HttpSink.COMMON_OPTIONS + ("index", "username", "password", "api_key")
    TRANSIENT_ITEM = frozenset({401, 403, 404, 408, 429})

    def __init__(self, name: str, fmt: str = "json", *, url: str, index: str = "egress-audit",
                 username: str | None = None, password: str | None = None, api_key: str | None = None, **kw: Any):
        headers: dict[str, str] = {}
        secrets: list[str] = []
        if api_key and (username or password):
            raise ValueError(f"sink {name}: use either username/password or api_key, not both")
        if api_key:
            headers["Authorization"] = f"ApiKey {api_key}"
            secrets.append(api_key)
        elif username is not None or password is not None:
            if not username or not password:
                raise ValueError(f"sink {name}: username and password go together")
            basic = base64.b64encode(f"{username}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
            secrets += [password, basic]
        super().__init__(name, fmt, url=url, headers=headers, secrets=secrets, **kw)
        self.index = index
        self.dated = "%" in index
        self.username = username

    def endpoint_path(self) -> str:
        return self.base_path + "/_bulk"

    def describe(self) -> str:
        return f"{self.kind} {self.origin} index={self.index}"

    def index_for(self, ev: Event) -> str:
        if not self.dated:
            return self.index
        return (event_datetime(ev) or _dt.datetime.now(_UTC)).strftime(self.index)

    def build_body(self, batch: list[Event]) -> bytes:
        parts: list[bytes] = []
        for ev in batch:
            meta: dict[str, str] = {"_index": self.index_for(ev)}
            if ev.id:
                meta["_id"] = ev.id
            parts += [json.dumps({"create": meta}, separators=(",", ":"), ensure_ascii=False).encode(), b"\n",
                      render(ev, self.fmt), b"\n"]
        return b"".join(parts)

    def check_response(self, batch: list[Event], status: int, headers, data: bytes) -> None:
        self.check_status(batch, status, headers, data)
        reply = _json_or_none(data)
        if not isinstance(reply, dict) or not isinstance(reply.get("errors"), bool):
            raise self.error(f"unexpected reply to HTTP {status}: {self.snippet(data)}")
        if reply["errors"] is False:
            return
        items = reply.get("items")
        if not isinstance(items, list) or len(items) != len(batch):
            raise self.error(f"reply with errors but {len(items) if isinstance(items, list) else 'no'} items "
                             f"for {len(batch)} events")
        transient: list[tuple[int, int, str]] = []
        refused: list[tuple[int, int, str]] = []
        for i, item in enumerate(items):
            result = next(iter(item.values()), None) if isinstance(item, dict) and len(item) == 1 else None
            st = result.get("status") if isinstance(result, dict) else None
            if not isinstance(st, int):
                transient.append((i, 0, "malformed item"))
                continue
            if 200 <= st < 300 or st == 409:
                continue
            err = result.get("error")
            why = (f"{err.get('type', '?')}: {str(err.get('reason', ''))[:200]}" if isinstance(err, dict)
                   else str(err)[:200])
            (transient if st in self.TRANSIENT_ITEM or st >= 500 else refused).append((i, st, why))
        if transient:
            i, st, why = transient[0]
            raise self.error(f"{len(transient)} of {len(batch)} items not stored yet (first: item {i}, "
                             f"status {st}, {why}); the batch is resent (idempotent)",
                             retry_after=retry_after_seconds(headers.get("Retry-After")))
        if refused:
            i, st, why = refused[0]
            raise self.error(f"refused {len(refused)} of {len(batch)} documents (first: item {i}, status {st}, "
                             f"{why})", retryable=False, rejected=[r[0] for r in refused])

    @classmethod
    def from_config(cls, name: str, fmt: str, options: Mapping[str, Any], resolve: Resolver) -> "BulkSink":
        o = _Options(name, cls.kind, options, cls.OPTIONS, resolve)
        common = cls.common_options(o)
        if urlsplit(common["url"]).path.rstrip("/").endswith("/_bulk"):
            raise o.err("url", "give the base URL (e.g. https://es:9200); the sink adds /_bulk")
        index = o.string("index", "egress-audit") or "egress-audit"
        for sample in _SAMPLE_DATES:
            try:
                rendered = sample.strftime(index)
            except ValueError as e:
                raise o.err("index", f"bad date pattern: {e}") from None
            problem = index_name_problem(rendered)
            if problem:
                raise o.err("index", f"{index!r} gives index names like {rendered!r}, which {problem}")
        username = o.string("username")
        has_password = o.o.get("password") is not None
        has_key = o.o.get("api_key") is not None
        if has_key and (username is not None or has_password):
            raise o.err("api_key", "use either username + password or api_key, not both")
        if (username is None) != (not has_password):
            raise o.err("username" if username is None else "password", "username and password go together")
        if username is not None and ":" in username:
            raise o.err("username", "cannot contain ':'")
        return cls(name, fmt, index=index, username=username, password=o.secret("password"),
                   api_key=o.secret("api_key"), **common)


class OpenSearchSink(BulkSink):
    """OpenSearch ``_bulk``: the same API and options as ``BulkSink``."""

    kind = "opensearch"


# --------------------------------------------------------------------------- webhook


class WebhookSink(HttpSink):
    """NDJSON webhook: ``POST url`` with the rendered events, one per line
    (trailing newline), ``Content-Type: application/x-ndjson``.

    Options: ``url`` (no query string: it could carry secrets), ``token``
    (secret reference, sent as ``Authorization: Bearer <token>``), ``headers``
    (name -> secret reference, or a value embedding references as ``${REF}``,
    e.g. ``"Bearer ${env:X}"``), plus the common ``ca``, ``compress``,
    ``connect_timeout``, ``read_timeout``. Any 2xx is success. ``describe()``
    shows the origin only (webhook paths sometimes embed a key).
    """

    kind = "webhook"
    OPTIONS = HttpSink.COMMON_OPTIONS + ("token", "headers")

    def __init__(self, name: str, fmt: str = "json", *, url: str, token: str | None = None,
                 headers: Mapping[str, str] | None = None, **kw: Any):
        hdrs = dict(headers or {})
        secrets = list(hdrs.values())
        if token:
            if any(k.lower() == "authorization" for k in hdrs):
                raise ValueError(f"sink {name}: token and an Authorization header are exclusive")
            hdrs["Authorization"] = f"Bearer {token}"
            secrets.append(token)
        super().__init__(name, fmt, url=url, headers=hdrs, secrets=secrets, **kw)

    def endpoint_path(self) -> str:
        return self.url_path  # exactly as configured

    def build_body(self, batch: list[Event]) -> bytes:
        return b"".join(render(ev, self.fmt) + b"\n" for ev in batch)

    @classmethod
    def from_config(cls, name: str, fmt: str, options: Mapping[str, Any], resolve: Resolver) -> "WebhookSink":
        o = _Options(name, cls.kind, options, cls.OPTIONS, resolve)
        common = cls.common_options(o)
        headers = o.header_values("headers")
        if o.o.get("token") is not None and any(k.lower() == "authorization" for k in headers):
            raise o.err("token", "token sets the Authorization header; do not also give it in headers")
        return cls(name, fmt, token=o.secret("token"), headers=headers, **common)


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


# kind -> class, for the sink registry
SINK_CLASSES: dict[str, type[HttpSink]] = {
    "splunk_hec": HecSink,
    "elasticsearch": BulkSink,
    "opensearch": OpenSearchSink,
    "webhook": WebhookSink,
}
