"""Sandbox lifecycle: states, legal transitions, the reaper's decisions (pure, no I/O).

The daemon keeps one ``SandboxRecord`` per sandbox and changes it only through
``apply``/``transition``; every change of state yields a ``LifecycleEvent`` for
the event stream and the audit. Illegal transitions raise ``IllegalTransition``
with a message meant for the API caller ("cannot exec sandbox sb-1: it is
asleep; resume it first").

States and the events that move between them (``TRANSITIONS`` is the truth)::

    creating --created--> ready --exec_start--> busy --exec_end (last one)--> ready
    ready --sleep--> sleeping --slept--> asleep --resume--> resuming --resumed--> ready
    resuming --resume_failed--> asleep (snapshot intact; retry or destroy)
    creating/sleeping/destroying --*_failed--> failed (destroy again to retry)
    creating/ready/busy/sleeping/asleep/resuming --fail--> failed
    ready/busy/asleep/failed --destroy--> destroying --destroyed--> destroyed (terminal)

Time is passed in (``now``, unix seconds as float); nothing here reads a clock,
a file or the environment, except ``new_sandbox_id`` which draws randomness.
Records never hold an identity token, only its id (``token_id``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable, Mapping

from sandboxd.tiers.base import Limits


# -- states and events ----------------------------------------------------------

class State(str, Enum):
    CREATING = "creating"      # the backend is creating it
    READY = "ready"            # alive, no exec running
    BUSY = "busy"              # alive, at least one exec running
    SLEEPING = "sleeping"      # being snapshotted; resources being released
    ASLEEP = "asleep"          # only its snapshot exists
    RESUMING = "resuming"      # being restored from its snapshot
    DESTROYING = "destroying"  # resources and snapshot being released
    DESTROYED = "destroyed"    # gone (terminal)
    FAILED = "failed"          # a backend operation failed; only destroy is possible

    def __str__(self) -> str:  # "asleep", not "State.ASLEEP"
        return self.value


class Event(str, Enum):
    CREATED = "created"
    CREATE_FAILED = "create_failed"
    EXEC_START = "exec_start"
    EXEC_END = "exec_end"
    TOUCH = "touch"                # put/get/list files: activity, no state change
    SLEEP = "sleep"
    SLEPT = "slept"
    SLEEP_FAILED = "sleep_failed"
    RESUME = "resume"
    RESUMED = "resumed"
    RESUME_FAILED = "resume_failed"  # the backend cleaned up; the snapshot is intact
    DESTROY = "destroy"
    DESTROYED = "destroyed"
    DESTROY_FAILED = "destroy_failed"
    FAIL = "fail"                  # the daemon found the sandbox broken (e.g. lost at restart)

    def __str__(self) -> str:
        return self.value


S, E = State, Event

TERMINAL_STATES = frozenset({S.DESTROYED})
TRANSITIONAL_STATES = frozenset({S.CREATING, S.SLEEPING, S.RESUMING, S.DESTROYING})
ALIVE_STATES = frozenset({S.READY, S.BUSY})  # the backend holds resources and can run code

# (state, event) -> next state. Anything not in this table is illegal.
TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (S.CREATING, E.CREATED): S.READY,
    (S.CREATING, E.CREATE_FAILED): S.FAILED,
    (S.CREATING, E.FAIL): S.FAILED,

    (S.READY, E.EXEC_START): S.BUSY,
    (S.READY, E.TOUCH): S.READY,
    (S.READY, E.SLEEP): S.SLEEPING,
    (S.READY, E.DESTROY): S.DESTROYING,
    (S.READY, E.FAIL): S.FAILED,

    (S.BUSY, E.EXEC_START): S.BUSY,   # concurrent execs: active_execs counts them
    (S.BUSY, E.EXEC_END): S.BUSY,     # becomes READY when the last one ends (see apply)
    (S.BUSY, E.TOUCH): S.BUSY,
    (S.BUSY, E.DESTROY): S.DESTROYING,
    (S.BUSY, E.FAIL): S.FAILED,

    (S.SLEEPING, E.SLEPT): S.ASLEEP,
    (S.SLEEPING, E.SLEEP_FAILED): S.FAILED,
    (S.SLEEPING, E.FAIL): S.FAILED,

    (S.ASLEEP, E.RESUME): S.RESUMING,
    (S.ASLEEP, E.DESTROY): S.DESTROYING,
    (S.ASLEEP, E.FAIL): S.FAILED,

    (S.RESUMING, E.RESUMED): S.READY,
    (S.RESUMING, E.RESUME_FAILED): S.ASLEEP,
    (S.RESUMING, E.FAIL): S.FAILED,

    (S.FAILED, E.DESTROY): S.DESTROYING,

    (S.DESTROYING, E.DESTROYED): S.DESTROYED,
    (S.DESTROYING, E.DESTROY_FAILED): S.FAILED,
}

# Events that count as activity (reset the idle clock).
ACTIVITY_EVENTS = frozenset({E.CREATED, E.EXEC_START, E.EXEC_END, E.TOUCH, E.RESUMED})

# What a caller-facing verb is called in error messages.
_VERB = {
    E.EXEC_START: "exec", E.TOUCH: "access files of", E.SLEEP: "sleep", E.RESUME: "resume",
    E.DESTROY: "destroy",
}

# Why a caller's request cannot proceed in a state, and what to do instead.
_WHY = {
    S.CREATING: "it is still being created; retry when it is ready",
    S.READY: "it is ready",
    S.BUSY: "an exec is running; wait for it to finish",
    S.SLEEPING: "it is going to sleep; wait until it is asleep",
    S.ASLEEP: "it is asleep; resume it first",
    S.RESUMING: "it is resuming; retry when it is ready",
    S.DESTROYING: "it is being destroyed",
    S.DESTROYED: "it has been destroyed",
    S.FAILED: "it has failed; destroy it",
}


class IllegalTransition(Exception):
    """The event is not allowed in the record's state. The message is for the API caller."""

    def __init__(self, sandbox_id: str, state: State, event: Event, message: str):
        self.sandbox_id = sandbox_id
        self.state = state
        self.event = event
        super().__init__(message)


class InvalidRequest(ValueError):
    """A create request (or a record read back) is not valid; ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


# -- records and events ---------------------------------------------------------

ON_TIMEOUT_CHOICES = ("destroy", "sleep")


@dataclass(frozen=True)
class SandboxRecord:
    id: str
    tenant: str
    agent: str
    labels: Mapping[str, str]
    tier: str
    limits: Limits
    created_at: float
    ttl_s: float
    idle_timeout_s: float  # 0: no idle timeout
    on_timeout: str        # what the idle timeout does: "destroy" | "sleep"
    state: State = S.CREATING
    last_activity: float = 0.0
    expires_at: float = 0.0
    token_id: str = ""     # the id (jti) of the sandbox's identity token, never the token
    snapshot_id: str = ""  # set while asleep (and while resuming from it)
    error: str = ""        # why it failed (or why the last resume failed)
    active_execs: int = 0
    state_since: float = 0.0


@dataclass(frozen=True)
class LifecycleEvent:
    sandbox_id: str
    from_state: State
    to_state: State
    reason: str
    ts: float

    def to_dict(self) -> dict[str, Any]:
        return {"sandbox_id": self.sandbox_id, "from": self.from_state.value,
                "to": self.to_state.value, "reason": self.reason, "ts": self.ts}


def _illegal(record: SandboxRecord, event: Event) -> IllegalTransition:
    st = record.state
    if event in _VERB:
        verb = _VERB[event]
        if event is E.RESUME and st in ALIVE_STATES:
            why = f"it is {st} (not asleep)"
        elif event is E.SLEEP and st is S.ASLEEP:
            why = "it is already asleep"
        else:
            why = _WHY[st]
        msg = f"cannot {verb} sandbox {record.id}: {why}"
    else:  # an internal event out of order: a daemon bug, still a clear message
        msg = f"sandbox {record.id}: event {event} is not allowed in state {st}"
    return IllegalTransition(record.id, st, event, msg)


def apply(record: SandboxRecord, event: Event | str, now: float, *, reason: str = "",
          snapshot_id: str = "", error: str = "") -> tuple[SandboxRecord, LifecycleEvent | None]:
    """Apply ``event`` to ``record`` at time ``now``.

    Returns the new record and the ``LifecycleEvent`` describing the change of
    state (None when the state did not change, e.g. a file access or a second
    concurrent exec). Raises ``IllegalTransition`` when the event is not allowed.
    ``snapshot_id``: with SLEEP, the id the sleep will write (recorded so a
    restarted daemon can find it); with SLEPT, required unless SLEEP gave it.
    ``error`` is recorded with the *_FAILED and FAIL events. After RESUMED the
    record no longer names the snapshot: the daemon deletes it (and a restart
    cleans up any it missed with ``orphan_snapshots``).
    """
    try:
        ev = Event(event)
    except ValueError:
        raise IllegalTransition(record.id, record.state, event,  # type: ignore[arg-type]
                                f"sandbox {record.id}: unknown event {event!r}") from None
    nxt = TRANSITIONS.get((record.state, ev))
    if nxt is None:
        raise _illegal(record, ev)
    if not math.isfinite(now):
        raise ValueError("now must be a finite number")

    changes: dict[str, Any] = {}
    if ev in ACTIVITY_EVENTS:
        changes["last_activity"] = max(record.last_activity, now)
    if ev is E.EXEC_START:
        changes["active_execs"] = record.active_execs + 1
    elif ev is E.EXEC_END:
        left = max(record.active_execs - 1, 0)
        changes["active_execs"] = left
        if left == 0:
            nxt = S.READY
    elif ev is E.SLEEP and snapshot_id:
        changes["snapshot_id"] = snapshot_id  # planned: recovery can find a finished snapshot
    elif ev is E.SLEPT:
        if snapshot_id and record.snapshot_id and snapshot_id != record.snapshot_id:
            raise ValueError("the slept event names another snapshot than the sleep planned")
        if not (snapshot_id or record.snapshot_id):
            raise ValueError("the slept event needs the snapshot id")
        changes["snapshot_id"] = snapshot_id or record.snapshot_id
    elif ev is E.RESUMED:
        changes["snapshot_id"] = ""  # the snapshot is consumed; the daemon deletes it
        changes["error"] = ""
    elif ev in (E.CREATE_FAILED, E.SLEEP_FAILED, E.RESUME_FAILED, E.DESTROY_FAILED, E.FAIL):
        changes["error"] = scrub(error or reason or str(ev))
    if nxt not in ALIVE_STATES:
        changes["active_execs"] = 0
    if nxt is not record.state:
        changes["state"] = nxt
        changes["state_since"] = now
    new = dataclasses.replace(record, **changes)
    if nxt is record.state:
        return new, None
    return new, LifecycleEvent(record.id, record.state, nxt, scrub(reason or str(ev)), now)


def transition(record: SandboxRecord, event: Event | str, now: float, **details: str) -> SandboxRecord:
    """``apply`` without the event: the new record (or ``IllegalTransition``)."""
    return apply(record, event, now, **details)[0]


def allowed_events(state: State) -> frozenset[Event]:
    return frozenset(ev for (st, ev) in TRANSITIONS if st is state)


# -- the reaper -------------------------------------------------------------------

# A busy sandbox past its TTL is left alone while its exec may still legitimately
# run (exec_timeout_s); after that plus this grace, a stuck exec count does not
# keep it alive: it is destroyed.
BUSY_TTL_GRACE_S = 30.0


@dataclass(frozen=True)
class Action:
    sandbox_id: str
    kind: str    # "destroy" | "sleep"
    reason: str  # "ttl expired" | "idle timeout" | "ttl expired (exec overran)"


def reap(records: Iterable[SandboxRecord], now: float) -> list[Action]:
    """Decide what the reaper does now.

    - TTL expiry destroys, whatever ``on_timeout`` says, in every state that
      allows destroy (ready, asleep, failed). A busy sandbox is not touched
      until its exec could no longer be running (expires_at + exec timeout +
      grace); sandboxes in a transitional state are reconsidered later.
    - Idle timeout (``idle_timeout_s`` > 0, nothing since ``last_activity``)
      sleeps or destroys a ready sandbox per ``on_timeout``, and destroys a
      failed one (it cannot sleep). Never a busy, asleep or transitional one.
    """
    actions: list[Action] = []
    for r in records:
        if r.state in TERMINAL_STATES or r.state in TRANSITIONAL_STATES:
            continue
        expired = now >= r.expires_at
        if r.state is S.BUSY:
            if expired and now >= r.expires_at + r.limits.exec_timeout_s + BUSY_TTL_GRACE_S:
                actions.append(Action(r.id, "destroy", "ttl expired (exec overran)"))
            continue
        if expired:
            actions.append(Action(r.id, "destroy", "ttl expired"))
            continue
        if r.idle_timeout_s > 0 and now - r.last_activity >= r.idle_timeout_s:
            if r.state is S.READY:
                actions.append(Action(r.id, r.on_timeout, "idle timeout"))
            elif r.state is S.FAILED:
                actions.append(Action(r.id, "destroy", "idle timeout"))
    actions.sort(key=lambda a: a.sandbox_id)
    return actions


def next_deadline(records: Iterable[SandboxRecord]) -> float | None:
    """The earliest time at which ``reap`` could decide something new (for the reaper's sleep)."""
    best: float | None = None
    for r in records:
        if r.state in TERMINAL_STATES or r.state in TRANSITIONAL_STATES:
            continue
        cands = [r.expires_at]
        if r.state is S.BUSY:
            cands = [r.expires_at + r.limits.exec_timeout_s + BUSY_TTL_GRACE_S]
        elif r.idle_timeout_s > 0 and r.state in (S.READY, S.FAILED):
            cands.append(r.last_activity + r.idle_timeout_s)
        t = min(cands)
        best = t if best is None else min(best, t)
    return best


# -- recovery at daemon start -----------------------------------------------------

@dataclass(frozen=True)
class Recovery:
    record: SandboxRecord
    events: tuple[LifecycleEvent, ...]
    destroy_backend: bool     # the daemon must call backend.destroy(id) (idempotent)
    delete_snapshot: str = ""  # a snapshot id the daemon must delete


def recover(record: SandboxRecord, *, adopted: bool, snapshot_complete: bool,
            now: float) -> Recovery:
    """What to make of a record found in the state file at daemon start.

    ``adopted``: the backend found the sandbox alive (``adopt_or_clean``).
    ``snapshot_complete``: the record's snapshot exists in the snapshot store.
    Nothing that was in flight when the predecessor died is trusted: execs are
    gone, half-done creations fail, a half-done sleep is undone or completed
    depending on what survived, a half-done resume goes back to asleep.
    """
    st = record.state
    events: list[LifecycleEvent] = []

    def to(state: State, reason: str, **changes: Any) -> SandboxRecord:
        r = dataclasses.replace(record, state=state, state_since=now, active_execs=0, **changes)
        if state is not st:
            events.append(LifecycleEvent(record.id, st, state, reason, now))
        return r

    lost = "sandbox was lost when sandboxd restarted"
    if st in (S.DESTROYED,):
        return Recovery(record, (), False)
    if st is S.DESTROYING:
        return Recovery(to(S.DESTROYED, "destroy completed after restart"), tuple(events), True,
                        record.snapshot_id)
    if st is S.CREATING:
        r = to(S.FAILED, "creation interrupted by a sandboxd restart",
               error="creation interrupted by a sandboxd restart")
        return Recovery(r, tuple(events), adopted)
    if st in (S.READY, S.BUSY):
        if adopted:
            return Recovery(to(S.READY, "adopted after restart"), tuple(events), False)
        return Recovery(to(S.FAILED, lost, error=lost), tuple(events), False)
    if st is S.SLEEPING:
        if adopted:  # still alive: the sleep did not finish; drop any partial snapshot
            return Recovery(to(S.READY, "sleep interrupted by a restart; adopted", snapshot_id=""),
                            tuple(events), False, record.snapshot_id if snapshot_complete else "")
        if snapshot_complete and record.snapshot_id:
            return Recovery(to(S.ASLEEP, "sleep completed before restart"), tuple(events), False)
        err = "sleep interrupted by a sandboxd restart; no snapshot survived"
        return Recovery(to(S.FAILED, err, error=err), tuple(events), False)
    if st in (S.ASLEEP, S.RESUMING):
        if snapshot_complete and record.snapshot_id:
            reason = "resume interrupted by a restart" if st is S.RESUMING else "asleep"
            return Recovery(to(S.ASLEEP, reason), tuple(events), adopted)
        err = "snapshot missing after sandboxd restart"
        return Recovery(to(S.FAILED, err, error=err), tuple(events), adopted)
    # FAILED
    return Recovery(record, (), adopted)


def orphan_snapshots(records: Iterable[SandboxRecord], snapshot_ids: Iterable[str]) -> set[str]:
    """Snapshots no record refers to (left by a crash between resume/destroy and delete).

    Only meaningful when the state file loaded cleanly: after a corrupt state
    file every snapshot looks orphaned, and deleting them would lose the
    workspaces of asleep sandboxes.
    """
    referenced = {r.snapshot_id for r in records if r.snapshot_id and r.state is not S.DESTROYED}
    return set(snapshot_ids) - referenced


# -- ids and create requests --------------------------------------------------------

SANDBOX_ID_RE = re.compile(r"sb-[a-z0-9]{1,37}")
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_ID_RANDOM_LEN = 20  # 36^20 ~ 2^103

# Same syntax as the gateway's identity tokens (gateway/tokens.py: _NAME_RE,
# _LABEL_KEY_RE, _TOKEN_ID_RE, MAX_LABELS, MAX_LABEL_VALUE_LENGTH), so every
# sandbox's identity can be minted into a token.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
LABEL_KEY_RE = re.compile(r"[a-z0-9]([a-z0-9._/-]{0,62}[a-z0-9])?")
TOKEN_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
MAX_LABELS = 64
MAX_LABEL_VALUE_LENGTH = 256
_TOKEN_LIKE_RE = re.compile(r"egt1\.[A-Za-z0-9_-]{8,}")


def new_sandbox_id() -> str:
    return "sb-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_RANDOM_LEN))


def is_valid_sandbox_id(value: object) -> bool:
    return type(value) is str and SANDBOX_ID_RE.fullmatch(value) is not None


def looks_like_token(value: str) -> bool:
    return _TOKEN_LIKE_RE.search(value) is not None


def scrub(text: str) -> str:
    """``text`` with anything shaped like an identity token replaced (errors, reasons)."""
    return _TOKEN_LIKE_RE.sub("[redacted token]", text)


@dataclass(frozen=True)
class Bounds:
    """What a create request may ask for."""
    tiers: frozenset[str] = frozenset({"namespace", "isolate"})
    min_ttl_s: float = 10.0
    max_ttl_s: float = 7 * 86400.0
    default_ttl_s: float = 3600.0
    min_idle_timeout_s: float = 10.0
    default_idle_timeout_s: float = 600.0
    max_limits: Limits = Limits(cpu_millicores=8000, memory_mb=16384, pids=4096,
                                exec_timeout_s=3600.0)
    default_limits: Limits = Limits()


@dataclass(frozen=True)
class CreateRequest:
    tenant: str
    agent: str
    labels: Mapping[str, str] = field(default_factory=dict)
    tier: str = "namespace"
    limits: Limits = Limits()
    ttl_s: float = 3600.0
    idle_timeout_s: float = 600.0
    on_timeout: str = "sleep"


_CREATE_FIELDS = frozenset({"tenant", "agent", "labels", "tier", "limits", "ttl_s",
                            "idle_timeout_s", "on_timeout"})
_LIMIT_FIELDS = {"cpu_millicores": int, "memory_mb": int, "pids": int, "exec_timeout_s": float}


def _number(field_name: str, v: Any) -> float:
    if type(v) not in (int, float) or not math.isfinite(v):
        raise InvalidRequest(field_name, "must be a finite number")
    return float(v)


def validate_labels(labels: Any) -> dict[str, str]:
    if not isinstance(labels, Mapping):
        raise InvalidRequest("labels", "must be an object of strings")
    if len(labels) > MAX_LABELS:
        raise InvalidRequest("labels", f"at most {MAX_LABELS} labels")
    out: dict[str, str] = {}
    for k, v in labels.items():
        if type(k) is not str or not LABEL_KEY_RE.fullmatch(k):
            raise InvalidRequest("labels", "keys must match [a-z0-9]([a-z0-9._/-]{0,62}[a-z0-9])?")
        if type(v) is not str or len(v) > MAX_LABEL_VALUE_LENGTH or not (v == "" or v.isprintable()):
            raise InvalidRequest(f"labels.{k}", f"values must be strings of at most "
                                 f"{MAX_LABEL_VALUE_LENGTH} printable characters")
        if looks_like_token(v):
            raise InvalidRequest(f"labels.{k}", "must not contain an identity token")
        out[k] = v
    return out


def validate_limits(limits: Any, bounds: Bounds) -> Limits:
    if limits is None:
        return bounds.default_limits
    if isinstance(limits, Limits):
        limits = dataclasses.asdict(limits)
    if not isinstance(limits, Mapping):
        raise InvalidRequest("limits", "must be an object")
    unknown = set(limits) - set(_LIMIT_FIELDS)
    if unknown:
        raise InvalidRequest("limits", "unknown field(s): " + ", ".join(sorted(map(str, unknown))))
    vals: dict[str, Any] = {}
    for name, typ in _LIMIT_FIELDS.items():
        if name not in limits:
            vals[name] = getattr(bounds.default_limits, name)
            continue
        v = limits[name]
        if typ is int:
            if type(v) is not int:
                raise InvalidRequest(f"limits.{name}", "must be an integer")
        else:
            v = _number(f"limits.{name}", v)
        top = getattr(bounds.max_limits, name)
        if not 0 < v <= top:
            raise InvalidRequest(f"limits.{name}", f"must be > 0 and <= {top}")
        vals[name] = v
    return Limits(**vals)


def validate_create(request: Mapping[str, Any], bounds: Bounds = Bounds()) -> CreateRequest:
    """Check a create request (decoded JSON); the first problem raises ``InvalidRequest``."""
    if not isinstance(request, Mapping):
        raise InvalidRequest("request", "must be an object")
    unknown = set(request) - _CREATE_FIELDS
    if unknown:
        raise InvalidRequest("request", "unknown field(s): " + ", ".join(sorted(map(str, unknown))))
    for name in ("tenant", "agent"):
        v = request.get(name)
        if type(v) is not str or not NAME_RE.fullmatch(v):
            raise InvalidRequest(name, "required; must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
    labels = validate_labels(request.get("labels", {}))
    tier = request.get("tier", "namespace")
    if type(tier) is not str or tier not in bounds.tiers:
        raise InvalidRequest("tier", "must be one of " + ", ".join(sorted(bounds.tiers)))
    limits = validate_limits(request.get("limits"), bounds)
    ttl = _number("ttl_s", request.get("ttl_s", bounds.default_ttl_s))
    if not bounds.min_ttl_s <= ttl <= bounds.max_ttl_s:
        raise InvalidRequest("ttl_s", f"must be between {bounds.min_ttl_s:g} and "
                             f"{bounds.max_ttl_s:g} seconds")
    idle = _number("idle_timeout_s", request.get("idle_timeout_s",
                                                 min(bounds.default_idle_timeout_s, ttl)))
    if idle != 0 and not bounds.min_idle_timeout_s <= idle <= ttl:
        raise InvalidRequest("idle_timeout_s", f"must be 0 (none) or between "
                             f"{bounds.min_idle_timeout_s:g} seconds and ttl_s")
    on_timeout = request.get("on_timeout", "sleep")
    if on_timeout not in ON_TIMEOUT_CHOICES:
        raise InvalidRequest("on_timeout", 'must be "destroy" or "sleep"')
    return CreateRequest(request["tenant"], request["agent"], labels, tier, limits, ttl, idle,
                         on_timeout)


def new_record(req: CreateRequest, sandbox_id: str, now: float, token_id: str = "") -> SandboxRecord:
    """The record of a sandbox about to be created (state CREATING)."""
    if not is_valid_sandbox_id(sandbox_id):
        raise InvalidRequest("id", "must match sb-[a-z0-9]{1,37}")
    if token_id and not TOKEN_ID_RE.fullmatch(token_id):
        raise InvalidRequest("token_id", "must match [A-Za-z0-9_-]{8,64}")
    return SandboxRecord(
        id=sandbox_id, tenant=req.tenant, agent=req.agent, labels=dict(req.labels), tier=req.tier,
        limits=req.limits, created_at=now, ttl_s=req.ttl_s, idle_timeout_s=req.idle_timeout_s,
        on_timeout=req.on_timeout, state=S.CREATING, last_activity=now,
        expires_at=now + req.ttl_s, token_id=token_id, state_since=now)


# -- (de)serialisation (for the state file and the API) ------------------------------

RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(SandboxRecord))


def record_to_dict(r: SandboxRecord) -> dict[str, Any]:
    d = {name: getattr(r, name) for name in RECORD_FIELDS}
    d["state"] = r.state.value
    d["labels"] = dict(r.labels)
    d["limits"] = dataclasses.asdict(r.limits)
    return d


def record_from_dict(d: Any) -> SandboxRecord:
    """Strictly rebuild a record; ``InvalidRequest`` names the first bad field."""
    if not isinstance(d, Mapping):
        raise InvalidRequest("record", "must be an object")
    missing = set(RECORD_FIELDS) - set(d)
    extra = set(d) - set(RECORD_FIELDS)
    if missing:
        raise InvalidRequest("record", "missing field(s): " + ", ".join(sorted(missing)))
    if extra:
        raise InvalidRequest("record", "unknown field(s): " + ", ".join(sorted(map(str, extra))))
    if not is_valid_sandbox_id(d["id"]):
        raise InvalidRequest("id", "must match sb-[a-z0-9]{1,37}")
    for name in ("tenant", "agent"):
        if type(d[name]) is not str or not NAME_RE.fullmatch(d[name]):
            raise InvalidRequest(name, "must match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
    labels = validate_labels(d["labels"])
    if type(d["tier"]) is not str or not d["tier"]:
        raise InvalidRequest("tier", "must be a non-empty string")
    lim = d["limits"]
    if not isinstance(lim, Mapping) or set(lim) != set(_LIMIT_FIELDS):
        raise InvalidRequest("limits", "must have exactly " + ", ".join(_LIMIT_FIELDS))
    for name, typ in _LIMIT_FIELDS.items():
        if (type(lim[name]) is not int) if typ is int else type(lim[name]) not in (int, float):
            raise InvalidRequest(f"limits.{name}", "has the wrong type")
    limits = Limits(**{k: (float(v) if _LIMIT_FIELDS[k] is float else v) for k, v in lim.items()})
    nums = {n: _number(n, d[n]) for n in ("created_at", "ttl_s", "idle_timeout_s",
                                          "last_activity", "expires_at", "state_since")}
    try:
        state = State(d["state"])
    except ValueError:
        raise InvalidRequest("state", "unknown state") from None
    if d["on_timeout"] not in ON_TIMEOUT_CHOICES:
        raise InvalidRequest("on_timeout", 'must be "destroy" or "sleep"')
    if type(d["token_id"]) is not str or (d["token_id"] and not TOKEN_ID_RE.fullmatch(d["token_id"])):
        raise InvalidRequest("token_id", "must be empty or match [A-Za-z0-9_-]{8,64}")
    for name in ("snapshot_id", "error"):
        if type(d[name]) is not str:
            raise InvalidRequest(name, "must be a string")
        if looks_like_token(d[name]):
            raise InvalidRequest(name, "must not contain an identity token")
    if type(d["active_execs"]) is not int or d["active_execs"] < 0:
        raise InvalidRequest("active_execs", "must be a non-negative integer")
    return SandboxRecord(
        id=d["id"], tenant=d["tenant"], agent=d["agent"], labels=labels, tier=d["tier"],
        limits=limits, state=state, on_timeout=d["on_timeout"], token_id=d["token_id"],
        snapshot_id=d["snapshot_id"], error=d["error"], active_execs=d["active_execs"], **nums)
