"""sandboxd.lifecycle: state machine, reaper, recovery, ids and create validation."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings, strategies as st

from sandboxd import lifecycle as L
from sandboxd.lifecycle import Event as E, State as S
from sandboxd.tiers.base import Limits

T0 = 1_000_000.0


def rec(state: S = S.READY, **kw) -> L.SandboxRecord:
    base = dict(id="sb-1", tenant="acme", agent="bot", labels={"team": "x"}, tier="namespace",
                limits=Limits(), created_at=T0, ttl_s=3600.0, idle_timeout_s=600.0,
                on_timeout="sleep", state=state, last_activity=T0, expires_at=T0 + 3600.0,
                state_since=T0, active_execs=1 if state is S.BUSY else 0,
                snapshot_id="snap-1" if state in (S.ASLEEP, S.RESUMING) else "")
    base.update(kw)
    return L.SandboxRecord(**base)


# -- transitions -------------------------------------------------------------------

@pytest.mark.parametrize("state,event", sorted(L.TRANSITIONS, key=str))
def test_every_legal_transition(state, event):
    r = rec(state)
    extra = {"snapshot_id": "snap-2"} if event is E.SLEPT else {}
    new, ev = L.apply(r, event, T0 + 5, **extra)
    expected = L.TRANSITIONS[(state, event)]
    if event is E.EXEC_END and r.active_execs == 1:
        expected = S.READY
    assert new.state is expected
    if expected is state:
        assert ev is None
    else:
        assert ev == L.LifecycleEvent("sb-1", state, expected, str(event), T0 + 5)
        assert new.state_since == T0 + 5
    assert (new.active_execs > 0) == (new.state is S.BUSY)


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("event", list(E))
def test_illegal_transitions_are_rejected(state, event):
    if (state, event) in L.TRANSITIONS:
        return
    r = rec(state)
    with pytest.raises(L.IllegalTransition) as ei:
        L.apply(r, event, T0 + 1, snapshot_id="s")
    assert ei.value.state is state and ei.value.event is event
    assert "sb-1" in str(ei.value)


@pytest.mark.parametrize("state,event,message", [
    (S.ASLEEP, E.EXEC_START, "cannot exec sandbox sb-1: it is asleep; resume it first"),
    (S.ASLEEP, E.TOUCH, "cannot access files of sandbox sb-1: it is asleep; resume it first"),
    (S.ASLEEP, E.SLEEP, "cannot sleep sandbox sb-1: it is already asleep"),
    (S.READY, E.RESUME, "cannot resume sandbox sb-1: it is ready (not asleep)"),
    (S.BUSY, E.SLEEP, "cannot sleep sandbox sb-1: an exec is running; wait for it to finish"),
    (S.CREATING, E.EXEC_START,
     "cannot exec sandbox sb-1: it is still being created; retry when it is ready"),
    (S.SLEEPING, E.DESTROY,
     "cannot destroy sandbox sb-1: it is going to sleep; wait until it is asleep"),
    (S.DESTROYED, E.DESTROY, "cannot destroy sandbox sb-1: it has been destroyed"),
    (S.FAILED, E.EXEC_START, "cannot exec sandbox sb-1: it has failed; destroy it"),
    (S.READY, E.SLEPT, "sandbox sb-1: event slept is not allowed in state ready"),
])
def test_illegal_transition_messages(state, event, message):
    with pytest.raises(L.IllegalTransition, match="^" + re.escape(message) + "$"):
        L.transition(rec(state), event, T0)


def test_unknown_event_is_illegal():
    with pytest.raises(L.IllegalTransition, match="unknown event 'explode'"):
        L.transition(rec(), "explode", T0)


def test_concurrent_execs_are_counted():
    r = L.transition(rec(S.READY), E.EXEC_START, T0 + 1)
    r, ev = L.apply(r, E.EXEC_START, T0 + 2)
    assert (r.state, r.active_execs, ev) == (S.BUSY, 2, None)
    r, ev = L.apply(r, E.EXEC_END, T0 + 3)
    assert (r.state, r.active_execs, ev) == (S.BUSY, 1, None)
    r, ev = L.apply(r, E.EXEC_END, T0 + 4)
    assert (r.state, r.active_execs) == (S.READY, 0)
    assert ev.from_state is S.BUSY and ev.to_state is S.READY
    assert r.last_activity == T0 + 4


def test_activity_updates_last_activity_only_for_activity_events():
    r = L.transition(rec(S.READY), E.TOUCH, T0 + 10)
    assert r.last_activity == T0 + 10
    r = L.transition(r, E.SLEEP, T0 + 20)
    assert r.last_activity == T0 + 10


def test_sleep_resume_cycle_keeps_identity_and_tracks_snapshot():
    r0 = rec(S.READY, token_id="tok_12345678")
    r = L.transition(r0, E.SLEEP, T0 + 1)
    with pytest.raises(ValueError, match="snapshot id"):
        L.transition(r, E.SLEPT, T0 + 2)
    r = L.transition(r, E.SLEPT, T0 + 2, snapshot_id="snap-a")
    assert (r.state, r.snapshot_id) == (S.ASLEEP, "snap-a")
    r = L.transition(r, E.RESUME, T0 + 3)
    r = L.transition(r, E.RESUME_FAILED, T0 + 4, error="disk full")
    assert (r.state, r.snapshot_id, r.error) == (S.ASLEEP, "snap-a", "disk full")
    r = L.transition(L.transition(r, E.RESUME, T0 + 5), E.RESUMED, T0 + 6)
    assert (r.state, r.snapshot_id, r.error) == (S.READY, "", "")
    for f in ("id", "tenant", "agent", "labels", "tier", "limits", "token_id", "expires_at"):
        assert getattr(r, f) == getattr(r0, f)


def test_sleep_can_plan_the_snapshot_id_for_recovery():
    r = L.transition(rec(S.READY), E.SLEEP, T0, snapshot_id="snap-plan")
    assert (r.state, r.snapshot_id) == (S.SLEEPING, "snap-plan")
    out = L.recover(r, adopted=False, snapshot_complete=True, now=T0 + 1)
    assert out.record.state is S.ASLEEP and out.record.snapshot_id == "snap-plan"
    with pytest.raises(ValueError, match="another snapshot"):
        L.transition(r, E.SLEPT, T0 + 1, snapshot_id="snap-other")
    assert L.transition(r, E.SLEPT, T0 + 1).snapshot_id == "snap-plan"
    failed = L.transition(r, E.SLEEP_FAILED, T0 + 1, error="disk full")
    assert failed.snapshot_id == "snap-plan"  # destroy must delete a partial snapshot too


def test_orphan_snapshots():
    rs = [rec(S.ASLEEP, id="sb-a", snapshot_id="snap-a"),
          rec(S.DESTROYED, id="sb-b", snapshot_id="snap-b"), rec(S.READY, id="sb-c")]
    assert L.orphan_snapshots(rs, ["snap-a", "snap-b", "snap-z"]) == {"snap-b", "snap-z"}
    assert L.orphan_snapshots([], ["snap-a"]) == {"snap-a"}


def test_errors_and_reasons_are_scrubbed_of_tokens():
    tok = "egt1.eyJhbGciOiJFZERTQSJ9.c2lnbmF0dXJl"
    r, ev = L.apply(rec(S.CREATING), E.CREATE_FAILED, T0, error=f"proxy refused {tok}",
                    reason=f"boom {tok}")
    assert tok not in r.error and "[redacted token]" in r.error
    assert tok not in ev.reason


def test_destroyed_is_terminal():
    assert L.allowed_events(S.DESTROYED) == frozenset()


# Hypothesis: random event sequences
events_st = st.lists(st.tuples(st.sampled_from(list(E)), st.floats(0, 100)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(start=st.sampled_from(list(S)), seq=events_st)
def test_random_event_sequences_stay_defined(start, seq):
    r = rec(start)
    now = T0
    for event, dt in seq:
        now += dt
        before = r
        try:
            r, ev = L.apply(r, event, now, snapshot_id="snap-x")
        except L.IllegalTransition as e:
            assert (before.state, event) not in L.TRANSITIONS
            assert str(e)
            assert r is before
            continue
        assert (before.state, event) in L.TRANSITIONS
        assert isinstance(r.state, S)
        assert before.state is not S.DESTROYED
        assert (r.active_execs > 0) == (r.state is S.BUSY)
        assert r.last_activity <= now
        if ev is not None:
            assert ev.from_state is before.state and ev.to_state is r.state
            assert ev.from_state is not ev.to_state and ev.ts == now
        else:
            assert r.state is before.state
        if r.state is S.ASLEEP:
            assert r.snapshot_id
    if r.state is S.DESTROYED:
        for event in E:
            with pytest.raises(L.IllegalTransition):
                L.apply(r, event, now + 1, snapshot_id="s")


# -- reaper ------------------------------------------------------------------------------

def test_reap_ttl_destroys_regardless_of_on_timeout():
    rs = [rec(S.READY, id="sb-a", on_timeout="sleep"), rec(S.ASLEEP, id="sb-b"),
          rec(S.FAILED, id="sb-c"), rec(S.SLEEPING, id="sb-d"), rec(S.DESTROYED, id="sb-e")]
    acts = L.reap(rs, T0 + 3600)
    assert acts == [L.Action("sb-a", "destroy", "ttl expired"),
                    L.Action("sb-b", "destroy", "ttl expired"),
                    L.Action("sb-c", "destroy", "ttl expired")]


def test_reap_idle_follows_on_timeout():
    rs = [rec(S.READY, id="sb-a", on_timeout="sleep"), rec(S.READY, id="sb-b", on_timeout="destroy"),
          rec(S.READY, id="sb-c", idle_timeout_s=0.0), rec(S.ASLEEP, id="sb-d"),
          rec(S.BUSY, id="sb-e", last_activity=T0 - 5000)]
    assert L.reap(rs, T0 + 599.9) == []
    assert L.reap(rs, T0 + 600) == [L.Action("sb-a", "sleep", "idle timeout"),
                                    L.Action("sb-b", "destroy", "idle timeout")]


def test_reap_busy_past_ttl_only_after_exec_could_have_ended():
    r = rec(S.BUSY, limits=Limits(exec_timeout_s=60.0))
    assert L.reap([r], T0 + 3600 + 60 + L.BUSY_TTL_GRACE_S - 0.001) == []
    assert L.reap([r], T0 + 3600 + 60 + L.BUSY_TTL_GRACE_S) == [
        L.Action("sb-1", "destroy", "ttl expired (exec overran)")]


record_st = st.builds(
    lambda i, state, on_timeout, ttl, idle, age, busy_for, et: rec(
        state, id=f"sb-{i}", on_timeout=on_timeout, ttl_s=ttl, expires_at=T0 + ttl,
        idle_timeout_s=idle, last_activity=T0 + age, limits=Limits(exec_timeout_s=et)),
    st.integers(0, 10**6), st.sampled_from(list(S)), st.sampled_from(["sleep", "destroy"]),
    st.floats(10, 10_000), st.sampled_from([0.0, 10.0, 100.0, 1000.0]), st.floats(0, 5000),
    st.floats(0, 100), st.floats(1, 600))


@settings(max_examples=300, deadline=None)
@given(records=st.lists(record_st, max_size=12, unique_by=lambda r: r.id),
       now=st.floats(T0, T0 + 20_000))
def test_reap_properties(records, now):
    acts = L.reap(records, now)
    by_id = {a.sandbox_id: a for a in acts}
    assert len(by_id) == len(acts)
    for r in records:
        a = by_id.get(r.id)
        expired = now >= r.expires_at
        if r.state is S.BUSY:
            if now < r.expires_at + r.limits.exec_timeout_s + L.BUSY_TTL_GRACE_S:
                assert a is None  # never touches a busy sandbox whose exec may still run
        elif r.state in (S.READY, S.ASLEEP, S.FAILED) and expired:
            assert a == L.Action(r.id, "destroy", "ttl expired")
        elif r.state in L.TRANSITIONAL_STATES or r.state is S.DESTROYED:
            assert a is None
        elif r.state is S.ASLEEP:
            assert a is None  # idle never applies to an asleep sandbox
        elif r.state is S.READY and r.idle_timeout_s > 0 and now - r.last_activity >= r.idle_timeout_s:
            assert a == L.Action(r.id, r.on_timeout, "idle timeout")
        elif r.state is S.READY:
            assert a is None
        if a is not None:
            # whatever the reaper decides must be a legal transition
            ev = E.DESTROY if a.kind == "destroy" else E.SLEEP
            assert (r.state, ev) in L.TRANSITIONS
    nd = L.next_deadline(records)
    if acts:
        assert nd is not None and nd <= now


# -- recovery at start --------------------------------------------------------------------

@pytest.mark.parametrize("state,adopted,snap,to,destroy_backend", [
    (S.READY, True, False, S.READY, False),
    (S.BUSY, True, False, S.READY, False),
    (S.READY, False, False, S.FAILED, False),
    (S.CREATING, True, False, S.FAILED, True),
    (S.CREATING, False, False, S.FAILED, False),
    (S.SLEEPING, True, True, S.READY, False),
    (S.SLEEPING, False, True, S.ASLEEP, False),
    (S.SLEEPING, False, False, S.FAILED, False),
    (S.ASLEEP, False, True, S.ASLEEP, False),
    (S.ASLEEP, False, False, S.FAILED, False),
    (S.RESUMING, True, True, S.ASLEEP, True),
    (S.RESUMING, False, False, S.FAILED, False),
    (S.DESTROYING, False, False, S.DESTROYED, True),
    (S.DESTROYED, False, False, S.DESTROYED, False),
    (S.FAILED, True, False, S.FAILED, True),
])
def test_recover(state, adopted, snap, to, destroy_backend):
    r = rec(state, snapshot_id="snap-1" if state in (S.SLEEPING, S.ASLEEP, S.RESUMING) else "")
    out = L.recover(r, adopted=adopted, snapshot_complete=snap, now=T0 + 9)
    assert out.record.state is to
    assert out.destroy_backend is destroy_backend
    assert out.record.active_execs == 0
    if to is not state:
        assert out.events == (L.LifecycleEvent("sb-1", state, to, out.events[0].reason, T0 + 9),)
        if to is S.FAILED:
            assert out.record.error
    else:
        assert out.events == ()
    if state is S.SLEEPING and adopted:
        assert out.delete_snapshot == "snap-1" and out.record.snapshot_id == ""


# -- ids, validation, serialisation -----------------------------------------------------------

def test_new_sandbox_id():
    ids = {L.new_sandbox_id() for _ in range(500)}
    assert len(ids) == 500
    for i in ids:
        assert re.fullmatch(r"sb-[a-z0-9]+", i) and len(i) <= 40 and L.is_valid_sandbox_id(i)


@pytest.mark.parametrize("bad", ["", "sb-", "SB-1", "sb-A", "sb-../x", "sb-1/2", "x" * 41,
                                 "sb-" + "a" * 38, None, 5])
def test_invalid_sandbox_ids(bad):
    assert not L.is_valid_sandbox_id(bad)


def test_name_syntax_matches_the_gateway_tokens():
    from gateway import tokens
    assert L.NAME_RE.pattern == tokens._NAME_RE.pattern
    assert L.LABEL_KEY_RE.pattern == tokens._LABEL_KEY_RE.pattern
    assert L.TOKEN_ID_RE.pattern == tokens._TOKEN_ID_RE.pattern
    assert (L.MAX_LABELS, L.MAX_LABEL_VALUE_LENGTH) == (tokens.MAX_LABELS,
                                                         tokens.MAX_LABEL_VALUE_LENGTH)


def test_validate_create_defaults_and_values():
    req = L.validate_create({"tenant": "acme", "agent": "bot-1", "labels": {"env": "dev"},
                             "tier": "isolate", "limits": {"memory_mb": 256}, "ttl_s": 120,
                             "idle_timeout_s": 0, "on_timeout": "destroy"})
    assert req == L.CreateRequest("acme", "bot-1", {"env": "dev"}, "isolate",
                                  Limits(memory_mb=256), 120.0, 0.0, "destroy")
    d = L.validate_create({"tenant": "t", "agent": "a"})
    assert (d.tier, d.ttl_s, d.idle_timeout_s, d.on_timeout, d.limits) == (
        "namespace", 3600.0, 600.0, "sleep", Limits())
    r = L.new_record(d, "sb-abc", T0, token_id="jti_12345678")
    assert (r.state, r.expires_at, r.last_activity, r.token_id) == (S.CREATING, T0 + 3600, T0,
                                                                    "jti_12345678")


@pytest.mark.parametrize("patch,field,fragment", [
    ({"tenant": ""}, "tenant", "must match"),
    ({"tenant": "a b"}, "tenant", "must match"),
    ({"agent": "-x"}, "agent", "must match"),
    ({"agent": None}, "agent", "required"),
    ({"tier": "microvm"}, "tier", "must be one of isolate, namespace"),
    ({"ttl_s": 5}, "ttl_s", "between 10 and 604800"),
    ({"ttl_s": float("inf")}, "ttl_s", "finite"),
    ({"ttl_s": True}, "ttl_s", "finite number"),
    ({"ttl_s": 100, "idle_timeout_s": 200}, "idle_timeout_s", "and ttl_s"),
    ({"idle_timeout_s": 1}, "idle_timeout_s", "0 (none)"),
    ({"on_timeout": "pause"}, "on_timeout", '"destroy" or "sleep"'),
    ({"labels": {"Bad": "x"}}, "labels", "keys must match"),
    ({"labels": {"k": "\n"}}, "labels.k", "printable"),
    ({"labels": {"k": "egt1.abcdefghijkl.mnop"}}, "labels.k", "identity token"),
    ({"labels": {f"k{i}": "" for i in range(65)}}, "labels", "at most 64"),
    ({"limits": {"memory_mb": 0}}, "limits.memory_mb", "> 0"),
    ({"limits": {"pids": 1.5}}, "limits.pids", "integer"),
    ({"limits": {"cpu_millicores": 10**6}}, "limits.cpu_millicores", "<= 8000"),
    ({"limits": {"gpu": 1}}, "limits", "unknown field(s): gpu"),
    ({"token": "x"}, "request", "unknown field(s): token"),
])
def test_validate_create_rejects(patch, field, fragment):
    req = {"tenant": "acme", "agent": "bot", **patch}
    with pytest.raises(L.InvalidRequest) as ei:
        L.validate_create(req)
    assert ei.value.field == field
    assert fragment in str(ei.value)


def test_custom_bounds():
    b = L.Bounds(tiers=frozenset({"microvm"}), max_ttl_s=60.0, default_ttl_s=60.0)
    assert L.validate_create({"tenant": "t", "agent": "a", "tier": "microvm"}, b).ttl_s == 60.0
    with pytest.raises(L.InvalidRequest, match="tier"):
        L.validate_create({"tenant": "t", "agent": "a"}, b)


@settings(max_examples=200, deadline=None)
@given(r=record_st, token_id=st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9_-]{8,64}",
                                                                  fullmatch=True)))
def test_record_dict_round_trip(r, token_id):
    r = dataclasses.replace(r, token_id=token_id)
    assert L.record_from_dict(L.record_to_dict(r)) == r


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(L.RECORD_FIELDS),
       value=st.one_of(st.none(), st.integers(), st.text(max_size=5), st.floats(allow_nan=True),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                            st.text(max_size=3))))
def test_record_from_dict_never_accepts_garbage_silently(key, value):
    d = L.record_to_dict(rec(S.READY))
    d[key] = value
    try:
        r = L.record_from_dict(d)
    except L.InvalidRequest as e:
        assert str(e)
        return
    # accepted: then it is a well-formed record again
    assert L.record_from_dict(L.record_to_dict(r)) == r
    assert isinstance(r.state, S) and L.is_valid_sandbox_id(r.id)


def test_record_from_dict_rejects_unknown_and_missing_fields():
    d = L.record_to_dict(rec())
    with pytest.raises(L.InvalidRequest, match="unknown field.*token"):
        L.record_from_dict({**d, "token": "x"})
    del d["state"]
    with pytest.raises(L.InvalidRequest, match="missing field.*state"):
        L.record_from_dict(d)
