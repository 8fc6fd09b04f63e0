"""Audit records back into policy inputs: read decision events from audit
files and rebuild the (principal, request, destination) the gateway decided on.

Pure functions over files; no gateway needed. Used by ``egress policy replay``
(gateway.policytools.replay) and by anything else that wants to re-decide a
recorded request.

Reading (``Reader`` / ``iter_events``)
--------------------------------------

A path is one of:

* a file: ``*.jsonl`` (or any other name: read as JSON lines), ``*.gz``
  (``*.jsonl.gz``) decompressed on the fly;
* a spool directory: its ``seg-<digits>.jsonl`` segments, oldest first
  (gateway.audit.spool.segment_files); a gateway state directory works too
  (its ``audit/`` spool is used);
* any other directory: its ``*.jsonl`` and ``*.jsonl.gz`` files in name order
  (e.g. a file sink's directory with its rotated files).

Blank lines and lines that are not a JSON object (a torn last line after a
crash, a truncated ``.gz``) are skipped and counted: ``Reader.stats`` (a
``ReadStats``) has ``skipped`` (all skipped lines), ``torn`` (the non-JSON
ones) and the first ``problems`` as ``file:line: ...`` strings. A path that
does not exist raises ``AuditPathError`` before anything is read.

Rebuilding (``case_from_event``)
--------------------------------

For a ``"event": "decision"`` event, ``case_from_event`` returns a ``Case``:
the ``Principal``, ``Request`` and ``Destination`` as the gateway had them,
as far as the record gives them back, the recorded outcome (``Recorded``) and
``unknowns``, the names of the inputs the record cannot give back:

* ``request.headers``: header values are never recorded; the rebuilt request
  has no headers at all (always listed);
* ``request.query``: query values were redacted (``name=REDACTED``, the
  default ``audit.query_string: redact``); listed when the recorded query has
  a redacted value. (With ``query_string: drop`` no query is recorded at all
  and the request is rebuilt with an empty query: that cannot be told apart
  from a request without a query.)
* ``now``: the time of the decision is approximated by the event's ``ts``
  (written just after deciding; ``Request.at`` is set to it) (always listed);
* ``destination``: the recorded address classes do not match what
  gateway.addresses.classify says about the recorded addresses now (a
  ``gateway_self`` address the heuristic below cannot place, or a changed
  address table).

Whether an unknown matters depends on the rules: a rule that never reads
``request.headers`` decides the same without them (replay.py checks the rules
on each request's route).

Events that cannot be rebuilt raise ``NotReplayable`` (never return None), with
``kind``: ``not_decision`` (another event type), ``no_principal`` (refused
before an identity was established: identity errors, raw TCP),
``no_request`` (nothing about the request on record) or ``malformed`` (a
field of the wrong type, an address that does not parse).
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from gateway.addresses import AddressClass, classify
from gateway.audit.spool import segment_files
from gateway.policy.model import Destination, Principal, Request

UNKNOWN_HEADERS = "request.headers"
UNKNOWN_QUERY = "request.query"
UNKNOWN_NOW = "now"
UNKNOWN_DESTINATION = "destination"
REDACTED = "REDACTED"

MAX_PROBLEMS = 20
NO_ADDRESS_ERROR = "the destination did not resolve (no address on record)"


class AuditPathError(ValueError):
    """An --audit path that does not exist or cannot be read."""


class NotReplayable(ValueError):
    """An event that cannot be rebuilt into a Case. ``kind``: not_decision,
    no_principal, no_request, malformed."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# -- reading ------------------------------------------------------------------------------------

@dataclass
class ReadStats:
    files: int = 0
    lines: int = 0  # every line read, blank and torn ones included
    events: int = 0  # JSON objects yielded
    skipped: int = 0  # blank + torn
    torn: int = 0  # not a JSON object (a torn write, a truncated .gz)
    problems: list[str] = field(default_factory=list)  # the first MAX_PROBLEMS, "file:line: what"

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files to read for ``paths`` (see the module doc), in order.
    Raises AuditPathError for a path that does not exist."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            segs = segment_files(p)
            if not segs and (p / "audit").is_dir():
                segs = segment_files(p / "audit")  # a gateway state dir
            if segs:
                out.extend(segs)
                continue
            out.extend(sorted(f for f in p.iterdir() if f.is_file()
                              and (f.name.endswith(".jsonl") or f.name.endswith(".jsonl.gz"))))
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise AuditPathError(f"{p}: not a file or directory")
        else:
            raise AuditPathError(f"{p}: no such file or directory")
    return out


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


class Reader:
    """Audit events (dicts) from files and directories, in order; see the
    module doc. Iterate it (once); ``stats`` counts as it goes and ``where`` is
    ``file:line`` of the event last yielded.

    >>> r = Reader(["audit/"])
    >>> for ev in r: ...
    >>> r.stats.skipped
    """

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.files = expand_paths(paths)
        self.stats = ReadStats()
        self.where = ""

    def __iter__(self) -> Iterator[dict]:
        st = self.stats
        for path in self.files:
            st.files += 1
            n = 0
            try:
                with _open(path) as fh:
                    for n, raw in enumerate(fh, 1):
                        st.lines += 1
                        if not raw.strip():
                            st.skipped += 1
                            continue
                        try:
                            ev = json.loads(raw)
                        except ValueError:
                            ev = None
                        if not isinstance(ev, dict):
                            st.skipped += 1
                            st.torn += 1
                            st.problem(f"{path}:{n}: not a JSON event (torn or corrupt line), skipped")
                            continue
                        st.events += 1
                        self.where = f"{path}:{n}"
                        yield ev
            except (EOFError, OSError, zlib.error) as e:  # a truncated or corrupt .gz
                if isinstance(e, FileNotFoundError):
                    raise AuditPathError(f"{path}: no such file (deleted while reading?)") from None
                st.skipped += 1
                st.torn += 1
                st.problem(f"{path}:{n + 1}: unreadable from here on ({e}), rest of the file skipped")


def iter_events(paths: Iterable[str | os.PathLike], stats: ReadStats | None = None) -> Iterator[dict]:
    """Every audit event in ``paths`` (see ``Reader``). Pass a ``ReadStats`` to
    get the counts (skipped lines, problems) once iteration is done."""
    r = Reader(paths)
    if stats is not None:
        r.stats = stats
    return iter(r)


# -- rebuilding -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recorded:
    """What the gateway decided, as recorded."""

    decision: str
    code: str
    rule: str | None
    policy_version: str = ""
    policy_fingerprint: str = ""  # what the set meant (gateway.policy.canonical); "" in older records
    request_id: str = ""
    ts: str = ""
    reason: str = ""
    status: int = 0


@dataclass(frozen=True)
class Case:
    """One recorded decision, rebuilt as policy inputs (see the module doc)."""

    principal: Principal
    request: Request
    destination: Destination
    recorded: Recorded
    unknowns: tuple[str, ...] = ()

    @property
    def request_id(self) -> str:
        return self.recorded.request_id

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    @property
    def is_connect(self) -> bool:
        """A CONNECT refused before the tunnel opened (decided by
        PolicySet.could_allow on the host alone, not by PolicySet.decide)."""
        return self.request.method == "CONNECT"

    @property
    def url(self) -> str:
        r = self.request
        default = {"http": 80, "ws": 80, "https": 443, "wss": 443}.get(r.scheme)
        host = f"[{r.host}]" if ":" in r.host else r.host
        netloc = host if r.port == default else f"{host}:{r.port}"
        if self.is_connect:
            return f"CONNECT {netloc}"
        q = f"?{r.query}" if r.query else ""
        return f"{r.scheme}://{netloc}{r.path}{q}"


def _str(obj: dict, key: str, default: str = "", *, where: str) -> str:
    v = obj.get(key, default)
    if v.__class__ is str:
        return v
    if v is None:
        return default
    if not isinstance(v, str):
        raise NotReplayable("malformed", f"{where}.{key} is not a string")
    return v


def parse_ts(ts: str) -> _dt.datetime | None:
    try:
        d = _dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return d if d.tzinfo else d.replace(tzinfo=_dt.timezone.utc)


_DEST_CACHE: dict[tuple, tuple[Destination, bool]] = {}
_PRINCIPAL_CACHE: dict[tuple, Principal] = {}
CACHE_SIZE = 4096


def _destination(dest: Any) -> tuple[Destination, bool]:
    """(Destination, exact): from ``event["destination"]`` (absent: the host did
    not resolve; the gateway records a destination only when it has addresses).
    Memoised: the same Destination object for the same record, which also lets
    the engine reuse its memoised decisions."""
    if not dest:
        return _UNRESOLVED, True
    if not isinstance(dest, dict) or not isinstance(dest.get("ips", []), list) \
            or not isinstance(dest.get("classes", []), list):
        raise NotReplayable("malformed", "destination is not an object with lists of ips and classes")
    key = (tuple(map(str, dest.get("ips") or ())), tuple(map(str, dest.get("classes") or ())),
           dest.get("via"), "classes" in dest)
    hit = _DEST_CACHE.get(key)
    if hit is None:
        hit = _classify_destination(list(key[0]), key[1] if key[3] else None, key[2])
        if len(_DEST_CACHE) >= CACHE_SIZE:
            _DEST_CACHE.clear()
        _DEST_CACHE[key] = hit
    return hit


def _classify_destination(ips: list[str], recorded, via) -> tuple[Destination, bool]:
    if via is not None and not isinstance(via, str):
        raise NotReplayable("malformed", "destination.via is not a string")
    via = via or "dns"
    try:
        classes = [classify(ip) for ip in ips]
    except ValueError as e:
        raise NotReplayable("malformed", f"destination.ips: {e}") from None
    if recorded is None:
        exact = True
    else:
        want = set(recorded)
        if AddressClass.GATEWAY_SELF.value in want:
            # The gateway's own addresses are configuration, not in the record: the
            # addresses whose class now is not among the recorded ones were it.
            selves = [ip for ip, c in zip(ips, classes) if c.klass.value not in want]
            if selves:
                classes = [classify(ip, self_addresses=selves) for ip in ips]
        exact = {c.klass.value for c in classes} == want
    if not ips:
        return Destination((), error=NO_ADDRESS_ERROR, via=via), exact
    return Destination(tuple(classes), via=via), exact


_UNRESOLVED = Destination((), error=NO_ADDRESS_ERROR, via="dns")


def _principal(p: dict) -> Principal:
    labels = p.get("labels") or {}
    if not isinstance(labels, dict):
        raise NotReplayable("malformed", "principal.labels is not an object")
    key = (p.get("tenant"), p.get("agent"), p.get("session"), tuple(labels.items()), p.get("token_id"), p.get("via"))
    try:
        hit = _PRINCIPAL_CACHE.get(key)
    except TypeError:  # a label value that is not a string (not memoised)
        key, hit = None, None
    if hit is not None:
        return hit
    tenant = _str(p, "tenant", where="principal")
    if not tenant:
        raise NotReplayable("no_principal", "principal without a tenant")
    hit = Principal.make(tenant, _str(p, "agent", where="principal"), _str(p, "session", where="principal"),
                         {str(k): str(v) for k, v in labels.items()},
                         _str(p, "token_id", where="principal"),
                         _str(p, "via", "token", where="principal") or "token")
    if key is None:
        return hit
    if len(_PRINCIPAL_CACHE) >= CACHE_SIZE:
        _PRINCIPAL_CACHE.clear()
    _PRINCIPAL_CACHE[key] = hit
    return hit


def case_from_event(event: dict) -> Case:
    """The Case of one ``decision`` event; raises NotReplayable (see the module doc)."""
    if not isinstance(event, dict) or event.get("event") != "decision":
        kind = event.get("event") if isinstance(event, dict) else type(event).__name__
        raise NotReplayable("not_decision", f"not a decision event ({kind})")
    p = event.get("principal")
    if not p:
        raise NotReplayable("no_principal", "no principal on record (refused before identity was established)")
    r = event.get("request")
    if not r:
        raise NotReplayable("no_request", "no request on record")
    if not isinstance(p, dict) or not isinstance(r, dict):
        raise NotReplayable("malformed", "principal or request is not an object")
    principal = _principal(p)
    host = _str(r, "host", where="request")
    if not host:
        raise NotReplayable("no_request", "request without a host")
    port = r.get("port")
    if isinstance(port, bool) or not isinstance(port, int):
        try:
            port = int(port)
        except (TypeError, ValueError):
            raise NotReplayable("malformed", f"request.port is not a number: {port!r}") from None
    query = _str(r, "query", where="request")
    ts = _str(event, "ts", where="event")
    request = Request(host=host, port=port, scheme=_str(r, "scheme", "https", where="request") or "https",
                      method=_str(r, "method", "GET", where="request") or "GET",
                      path=_str(r, "path", where="request"), query=query, headers={},
                      sni=_str(r, "sni", where="request"),
                      mode=_str(r, "mode", "explicit", where="request") or "explicit",
                      at=parse_ts(ts))
    destination, exact = _destination(event.get("destination"))
    unknowns = [UNKNOWN_HEADERS]
    if query and any(part.partition("=")[2] == REDACTED for part in query.split("&")):
        unknowns.append(UNKNOWN_QUERY)
    unknowns.append(UNKNOWN_NOW)
    if not exact:
        unknowns.append(UNKNOWN_DESTINATION)
    status = event.get("status", 0)
    rule = event.get("rule")
    recorded = Recorded(decision=_str(event, "decision", where="event"), code=_str(event, "code", where="event"),
                        rule=rule if isinstance(rule, str) else None,
                        policy_version=_str(event, "policy_version", where="event"),
                        policy_fingerprint=_str(event, "policy_fingerprint", where="event"),
                        request_id=_str(event, "request_id", where="event"), ts=ts,
                        reason=_str(event, "reason", where="event"),
                        status=status if isinstance(status, int) and not isinstance(status, bool) else 0)
    return Case(principal, request, destination, recorded, tuple(unknowns))


__all__ = ["AuditPathError", "Case", "NotReplayable", "ReadStats", "Reader", "Recorded", "case_from_event",
           "expand_paths", "iter_events", "parse_ts", "UNKNOWN_HEADERS", "UNKNOWN_QUERY", "UNKNOWN_NOW",
           "UNKNOWN_DESTINATION"]
