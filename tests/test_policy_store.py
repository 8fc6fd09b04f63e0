"""PolicyStore: start-up load, reload keeping the last good set, change polling."""

from __future__ import annotations

import os
import shutil

import pytest

from gateway import celexpr
from gateway.addresses import classify
from gateway.policy import Destination, PolicyLoadError, PolicyStore, Principal, Request, ReloadResult

PUBLIC = Destination((classify("93.184.216.34"),))
WHO = Principal.make("acme", "agent")


def policy(host: str, name: str = "p") -> str:
    return (f"apiVersion: egress/v1\nkind: Policy\nname: {name}\nselector: 'true'\nrules:\n"
            f"  - name: r\n    action: allow\n    when: request.host == '{host}'\n")


BROKEN = ("apiVersion: egress/v1\nkind: Policy\nname: p\nselector: 'true'\nrules:\n"
          "  - name: r\n    action: permit\n    when: 'true'\n")


def allowed(store: PolicyStore, host: str) -> bool:
    return store.current.decide(WHO, Request(host, 443), PUBLIC).allowed


def bump_mtime(path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


@pytest.fixture
def pdir(tmp_path):
    d = tmp_path / "policies"
    d.mkdir()
    (d / "10-p.yaml").write_text(policy("a.example"))
    return d


@pytest.fixture
def results():
    return []


@pytest.fixture
def store(pdir, results):
    s = PolicyStore(pdir, on_reload=results.append)
    s.load_initial()
    return s


def test_before_loading_everything_is_denied(pdir):
    s = PolicyStore(pdir)
    assert (s.loaded, s.current.version) == (False, "none")
    assert not allowed(s, "a.example")


def test_load_initial_failure_raises(pdir):
    (pdir / "10-p.yaml").write_text(BROKEN)
    s = PolicyStore(pdir)
    with pytest.raises(PolicyLoadError) as ei:
        s.load_initial()
    assert ei.value.problems[0].line == 7 and ei.value.problems[0].file.endswith("10-p.yaml")
    assert (s.loaded, s.current.version) == (False, "none")
    assert not allowed(s, "a.example")
    with pytest.raises(PolicyLoadError):
        PolicyStore(pdir / "missing").load_initial()


def test_load_initial(store, pdir):
    assert store.loaded and allowed(store, "a.example") and not allowed(store, "b.example")
    r = store.last_result
    assert (r.ok, r.changed, r.trigger, r.version) == (True, True, "startup", store.current.version)
    assert store.current.version.startswith("sha256:")
    assert store.poll() is None  # nothing changed since the load


def test_reload_with_a_broken_file_keeps_the_last_good_set(store, pdir, results):
    good = store.current
    (pdir / "10-p.yaml").write_text(BROKEN)
    r = store.reload()
    assert (r.ok, r.changed, r.version, r.trigger) == (False, False, good.version, "manual")
    assert len(r.problems) == 1
    assert r.problems[0] == f"{pdir / '10-p.yaml'}:7:13: action must be allow or deny, got 'permit'"
    assert store.current is good and allowed(store, "a.example")
    assert store.last_error == r.problems and store.last_result is r
    assert results == [r]
    assert r.to_dict() == {"ok": False, "version": good.version, "changed": False,
                           "problems": list(r.problems), "trigger": "manual"}


def test_reload_with_a_good_change_swaps_and_bumps_the_version(store, pdir, results):
    old = store.current
    (pdir / "10-p.yaml").write_text(BROKEN)
    store.reload()
    (pdir / "10-p.yaml").write_text(policy("b.example"))
    r = store.reload(trigger="admin")
    assert (r.ok, r.changed, r.problems, r.trigger) == (True, True, (), "admin")
    assert r.version == store.current.version != old.version
    assert allowed(store, "b.example") and not allowed(store, "a.example")
    assert store.last_error == ()
    # a reader that still holds the old set keeps a consistent view
    assert old.decide(WHO, Request("a.example", 443), PUBLIC).allowed
    assert [x.ok for x in results] == [False, True]


def test_reload_without_change(store):
    before = store.current
    r = store.reload()
    assert (r.ok, r.changed, r.version) == (True, False, before.version)
    assert store.current is before


def test_reload_before_a_successful_start(pdir):
    (pdir / "10-p.yaml").write_text(BROKEN)
    s = PolicyStore(pdir)
    assert not s.reload().ok and s.current.version == "none"
    (pdir / "10-p.yaml").write_text(policy("a.example"))
    r = s.reload()
    assert r.ok and r.changed and s.loaded and allowed(s, "a.example")


def test_poll_detects_file_changes(store, pdir, results):
    v0 = store.current.version
    assert store.poll() is None
    (pdir / "10-p.yaml").write_text(policy("b.example"))  # another size
    r = store.poll()
    assert isinstance(r, ReloadResult) and (r.ok, r.changed, r.trigger) == (True, True, "file-change")
    assert store.current.version != v0 and allowed(store, "b.example")
    assert store.poll() is None

    # same size, new mtime
    (pdir / "10-p.yaml").write_text(policy("c.example"))
    bump_mtime(pdir / "10-p.yaml")
    r = store.poll()
    assert r is not None and r.ok and allowed(store, "c.example")

    # a new file, then a removed file
    (pdir / "20-q.yaml").write_text(policy("q.example", name="q"))
    assert store.poll().ok and allowed(store, "q.example")
    (pdir / "20-q.yaml").unlink()
    assert store.poll().ok and not allowed(store, "q.example")
    assert [x.trigger for x in results] == ["file-change"] * 4


def test_poll_ignores_files_that_are_not_policies(store, pdir):
    (pdir / "10-p.test.yaml").write_text("anything: [")
    (pdir / "notes.txt").write_text("hello")
    assert store.poll() is None


def test_poll_reports_a_broken_file_once_and_keeps_the_good_set(store, pdir, results):
    good = store.current
    (pdir / "10-p.yaml").write_text(BROKEN)
    r = store.poll()
    assert r is not None and not r.ok and r.trigger == "file-change"
    assert store.current is good
    assert store.poll() is None  # the same broken content is not retried in a loop
    (pdir / "10-p.yaml").write_text(policy("d.example"))
    r = store.poll()
    assert r.ok and r.changed and allowed(store, "d.example")
    assert [x.ok for x in results] == [False, True]


def test_a_vanished_directory_keeps_the_last_good_set(store, pdir):
    good = store.current
    shutil.rmtree(pdir)
    r = store.poll()
    assert r is not None and not r.ok and "does not exist" in r.problems[0]
    assert store.current is good and allowed(store, "a.example")


def test_the_store_uses_the_engine_it_is_given(pdir):
    s = PolicyStore(pdir, engine=celexpr.PyEngine())
    ps = s.load_initial()
    assert isinstance(ps.engine, celexpr.PyEngine) and allowed(s, "a.example")
    assert ps.version == PolicyStore(pdir).load_initial().version
