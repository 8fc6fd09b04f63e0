"""sandboxd.snapshots (LocalSnapshotStore) and sandboxd.statefile."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from sandboxd import lifecycle as L
from sandboxd import snapshots as snap
from sandboxd import statefile as sf
from sandboxd.snapshots import LocalSnapshotStore, SnapshotCorrupt, SnapshotError, SnapshotExists
from sandboxd.tiers.base import Limits


# -- helpers -------------------------------------------------------------------------

def tree(root: Path) -> dict[str, tuple]:
    """Everything observable about a directory tree (relative path -> kind, mode, content)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            s = os.lstat(p)
            if stat.S_ISLNK(s.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(s.st_mode):
                out[rel] = ("dir", stat.S_IMODE(s.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(s.st_mode), p.read_bytes())
    return out


def make_workspace(ws: Path) -> None:
    (ws / "src/pkg").mkdir(parents=True)
    (ws / "empty/nested-empty").mkdir(parents=True)
    (ws / "src/main.py").write_text("print('hi')\n")
    (ws / "src/pkg/data.bin").write_bytes(bytes(range(256)) * 100)
    (ws / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(ws / "run.sh", 0o755)
    (ws / "secret.txt").write_text("mine")
    os.chmod(ws / "secret.txt", 0o600)
    (ws / "zero").write_bytes(b"")
    os.chmod(ws / "empty", 0o750)
    os.symlink("src/main.py", ws / "link-to-main")
    os.symlink("../main.py", ws / "src/pkg/up-link")
    os.symlink("pkg", ws / "src/dirlink")
    (ws / "ünïcode name.txt").write_text("ok")


def plant(store: LocalSnapshotStore, sid: str, members: list[tuple[tarfile.TarInfo, bytes | None]]):
    """Write a snapshot with a hand-made archive and *matching* metadata (a forged snapshot)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(ti)
    raw = buf.getvalue()
    d = store.root / sid
    d.mkdir()
    (d / snap.ARCHIVE_NAME).write_bytes(raw)
    (d / snap.META_NAME).write_text(json.dumps({
        "format": snap.FORMAT, "version": snap.VERSION, "id": sid, "created_at": 1.0,
        "archive": snap.ARCHIVE_NAME, "sha256": hashlib.sha256(raw).hexdigest(),
        "archive_bytes": len(raw), "files": len(members), "content_bytes": 0, "skipped": [],
        "metadata": {"forged": True}}))


def ti(name, type_=tarfile.REGTYPE, linkname="", mode=0o644):
    t = tarfile.TarInfo(name)
    t.type, t.linkname, t.mode = type_, linkname, mode
    return t


@pytest.fixture
def store(tmp_path):
    return LocalSnapshotStore(tmp_path / "store")


@pytest.fixture
def ws(tmp_path):
    w = tmp_path / "ws"
    w.mkdir()
    make_workspace(w)
    return w


# -- round trips -----------------------------------------------------------------------------

def test_round_trip_preserves_bytes_modes_empty_dirs_and_symlinks(store, ws, tmp_path):
    before = tree(ws)
    info = store.save("snap-1", ws, {"sandbox_id": "sb-1", "tier": "namespace"})
    assert info.snapshot_id == "snap-1" and info.skipped == ()
    assert info.content_bytes == sum(len(v[2]) for v in before.values() if v[0] == "file")
    assert store.exists("snap-1")
    assert [i.snapshot_id for i in store.list()] == ["snap-1"]
    meta = store.restore("snap-1", tmp_path / "out")
    assert meta == {"sandbox_id": "sb-1", "tier": "namespace"}
    assert tree(tmp_path / "out") == before
    assert (tmp_path / "out/src/dirlink/data.bin").read_bytes() == bytes(range(256)) * 100


def test_odd_but_legal_names_round_trip(store, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    for name in ("c:x", "\\back", "a..b", "...", " lead", "tab\tname", "-dash"):
        (w / name).write_text(name)
    store.save("odd", w, {})
    store.restore("odd", tmp_path / "o")
    assert tree(tmp_path / "o") == tree(w)


def test_hard_links_survive(store, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    (w / "a").write_text("same")
    os.link(w / "a", w / "b")
    store.save("h", w, {})
    store.restore("h", tmp_path / "o")
    assert os.stat(tmp_path / "o/a").st_ino == os.stat(tmp_path / "o/b").st_ino
    assert (tmp_path / "o/b").read_text() == "same"


def test_restore_into_existing_empty_dir_and_refuse_non_empty(store, ws, tmp_path):
    store.save("s", ws, {})
    (tmp_path / "empty-target").mkdir()
    store.restore("s", tmp_path / "empty-target")
    assert tree(tmp_path / "empty-target") == tree(ws)
    with pytest.raises(SnapshotError, match="target is not empty"):
        store.restore("s", tmp_path / "empty-target")


def test_three_sleep_resume_cycles_keep_every_file(store, ws, tmp_path):
    current = ws
    expected = tree(ws)
    for cycle in range(3):
        # the sandbox changes things between cycles
        (current / f"cycle-{cycle}.txt").write_text(f"written in cycle {cycle}")
        (current / "src/main.py").write_text(f"print({cycle})\n")
        (current / f"dir-{cycle}").mkdir()
        os.chmod(current / "run.sh", 0o700 if cycle % 2 else 0o755)
        if cycle == 1:
            (current / "zero").unlink()
        expected = tree(current)
        sid = f"sb-1-{cycle}"
        store.save(sid, current, {"cycle": cycle})
        nxt = tmp_path / f"resumed-{cycle}"
        assert store.restore(sid, nxt) == {"cycle": cycle}
        assert tree(nxt) == expected
        store.delete(sid)
        assert not store.exists(sid)
        current = nxt
    for c in range(3):
        assert (current / f"cycle-{c}.txt").read_text() == f"written in cycle {c}"
        assert (current / f"dir-{c}").is_dir()
    assert not (current / "zero").exists()
    assert store.list() == []


def test_skips_what_cannot_be_restored_safely(store, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    (w / "ok").write_text("x")
    os.symlink("/etc/passwd", w / "abs-link")
    os.symlink("../../outside", w / "rel-escape")
    os.mkfifo(w / "fifo")
    info = store.save("s", w, {})
    assert sorted(s.split(":")[0] for s in info.skipped) == ["abs-link", "fifo", "rel-escape"]
    store.restore("s", tmp_path / "o")
    assert sorted(os.listdir(tmp_path / "o")) == ["ok"]
    assert store.info("s").skipped == info.skipped


def test_setuid_and_world_writable_bits_are_dropped(store, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    (w / "suid").write_text("x")
    os.chmod(w / "suid", 0o4777)
    store.save("s", w, {})
    store.restore("s", tmp_path / "o")
    assert stat.S_IMODE(os.lstat(tmp_path / "o/suid").st_mode) == 0o755


# -- atomicity and concurrency ------------------------------------------------------------------

def test_failed_save_leaves_nothing_that_looks_complete(store, ws, monkeypatch):
    calls = {"n": 0}
    orig = tarfile.TarFile.addfile

    def boom(self, tarinfo, fileobj=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return orig(self, tarinfo, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", boom)
    with pytest.raises(OSError, match="disk full"):
        store.save("s", ws, {})
    assert not store.exists("s")
    assert list(store.root.iterdir()) == []


def test_half_written_snapshot_is_not_listed_and_is_cleaned(store, ws):
    half = store.root / ".tmp-s-abc"
    half.mkdir()
    (half / snap.ARCHIVE_NAME).write_bytes(b"partial")
    assert not store.exists("s") and store.list() == []
    with pytest.raises(snap.SnapshotNotFound):
        store.restore("s", store.root.parent / "o")
    assert store.cleanup_incomplete() == [".tmp-s-abc"]
    assert not half.exists()


def test_saving_an_existing_id_is_refused(store, ws):
    store.save("s", ws, {})
    with pytest.raises(SnapshotExists, match="snapshot s already exists"):
        store.save("s", ws, {})


def test_concurrent_saves_of_different_ids(store, ws, tmp_path):
    errors = []

    def work(i):
        try:
            store.save(f"c-{i}", ws, {"i": i})
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [i.snapshot_id for i in store.list()] == sorted(f"c-{i}" for i in range(8))
    expected = tree(ws)
    for i in range(8):
        assert store.restore(f"c-{i}", tmp_path / f"o{i}") == {"i": i}
        assert tree(tmp_path / f"o{i}") == expected


def test_concurrent_saves_of_the_same_id_one_wins(store, ws):
    results = []
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()
        try:
            store.save("same", ws, {})
            results.append("ok")
        except SnapshotExists:
            results.append("exists")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["exists"] * 3 + ["ok"]
    assert store.cleanup_incomplete() == []


def test_delete_is_idempotent(store, ws):
    store.save("s", ws, {})
    store.delete("s")
    store.delete("s")
    assert not store.exists("s") and list(store.root.iterdir()) == []


# -- verification ----------------------------------------------------------------------------------

def test_tampered_archive_refused(store, ws, tmp_path):
    store.save("s", ws, {})
    a = store.root / "s" / snap.ARCHIVE_NAME
    data = bytearray(a.read_bytes())
    data[len(data) // 2] ^= 0x01
    a.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt, match="does not match its SHA-256"):
        store.restore("s", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".restore")] == []


def test_truncated_archive_refused(store, ws, tmp_path):
    store.save("s", ws, {})
    a = store.root / "s" / snap.ARCHIVE_NAME
    a.write_bytes(a.read_bytes()[:-100])
    with pytest.raises(SnapshotCorrupt, match="tampered or truncated"):
        store.restore("s", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_truncated_archive_with_forged_hash_still_fails_cleanly(store, ws, tmp_path):
    store.save("s", ws, {})
    d = store.root / "s"
    raw = (d / snap.ARCHIVE_NAME).read_bytes()[:-100]
    (d / snap.ARCHIVE_NAME).write_bytes(raw)
    meta = json.loads((d / snap.META_NAME).read_text())
    meta.update(sha256=hashlib.sha256(raw).hexdigest(), archive_bytes=len(raw))
    (d / snap.META_NAME).write_text(json.dumps(meta))
    with pytest.raises(SnapshotCorrupt, match="unreadable"):
        store.restore("s", tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mutate", [
    lambda m: m.update(sha256="zz"), lambda m: m.update(id="other"), lambda m: m.pop("metadata"),
    lambda m: m.update(version=99)])
def test_bad_metadata_refused(store, ws, tmp_path, mutate):
    store.save("s", ws, {})
    p = store.root / "s" / snap.META_NAME
    m = json.loads(p.read_text())
    mutate(m)
    p.write_text(json.dumps(m))
    with pytest.raises(SnapshotCorrupt, match="metadata is not valid"):
        store.restore("s", tmp_path / "o")
    assert store.list() == []


# -- hostile archives ------------------------------------------------------------------------------

@pytest.mark.parametrize("members,fragment", [
    ([(ti("/etc/evil"), b"x")], "absolute path"),
    ([(ti("../evil"), b"x")], "'..' in path"),
    ([(ti("a/../../evil"), b"x")], "'..' in path"),
    ([(ti("l", tarfile.SYMTYPE, "/etc"), None)], "link target is absolute"),
    ([(ti("l", tarfile.SYMTYPE, "../outside"), None)], "link points outside"),
    ([(ti("d/l", tarfile.SYMTYPE, "../../outside"), None)], "link points outside"),
    ([(ti("h", tarfile.LNKTYPE, "/etc/passwd"), None)], "link target is absolute"),
    ([(ti("dev", tarfile.CHRTYPE), None)], "not a regular file"),
    ([(ti("blk", tarfile.BLKTYPE), None)], "not a regular file"),
    ([(ti("fifo", tarfile.FIFOTYPE), None)], "not a regular file"),
    ([(ti(".", tarfile.SYMTYPE, ".."), None)], "names the workspace root"),
    ([(ti("./", tarfile.REGTYPE), b"x")], "names the workspace root"),
    # lexically inside, really outside: caught by tarfile.data_filter
    ([(ti("l", tarfile.SYMTYPE, "."), None), (ti("up", tarfile.SYMTYPE, "l/.."), None)],
     "LinkOutsideDestinationError"),
])
def test_escaping_archives_are_refused(store, tmp_path, members, fragment):
    plant(store, "evil", members)
    with pytest.raises(SnapshotCorrupt, match=fragment.replace("(", r"\(")):
        store.restore("evil", tmp_path / "sub" / "o")
    assert not (tmp_path / "sub" / "o").exists()
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()
    assert list((tmp_path / "sub").iterdir()) == []  # staging removed


def test_writing_through_a_link_that_stays_inside_is_allowed(store, tmp_path):
    plant(store, "ok", [(ti("sub", tarfile.DIRTYPE, mode=0o755), None),
                        (ti("l", tarfile.SYMTYPE, "sub"), None), (ti("l/f"), b"data")])
    store.restore("ok", tmp_path / "o")
    assert (tmp_path / "o/sub/f").read_bytes() == b"data"


def test_size_limits_on_restore(tmp_path):
    store = LocalSnapshotStore(tmp_path / "store", max_bytes=1000)
    plant(store, "big", [(ti("a"), b"x" * 600), (ti("b"), b"y" * 600)])
    with pytest.raises(SnapshotCorrupt, match="size limits"):
        store.restore("big", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_size_limit_on_save(tmp_path):
    store = LocalSnapshotStore(tmp_path / "store", max_bytes=1000)
    w = tmp_path / "w"
    w.mkdir()
    (w / "a").write_bytes(b"x" * 1001)
    with pytest.raises(SnapshotError, match="larger than 1000"):
        store.save("s", w, {})
    assert list(store.root.iterdir()) == []


# -- ids, metadata, sources --------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "/abs", "A", "a.b", "-x", "a" * 129,
                                 "a\x00", None])
def test_invalid_snapshot_ids(store, ws, tmp_path, bad):
    with pytest.raises(SnapshotError, match="invalid snapshot id"):
        store.save(bad, ws, {})
    with pytest.raises(SnapshotError, match="invalid snapshot id"):
        store.restore(bad, tmp_path / "o")
    with pytest.raises(SnapshotError, match="invalid snapshot id"):
        store.delete(bad)
    with pytest.raises(SnapshotError, match="invalid snapshot id"):
        store.exists(bad)


def test_new_snapshot_id_is_valid_and_unique():
    ids = {snap.new_snapshot_id(L.new_sandbox_id()) for _ in range(100)}
    assert len(ids) == 100 and all(snap.SNAPSHOT_ID_RE.fullmatch(i) for i in ids)


def test_metadata_with_a_token_is_refused(store, ws):
    with pytest.raises(SnapshotError, match="must not contain an identity token"):
        store.save("s", ws, {"egress": "egt1.eyJ2IjoxfQ.c2lnbmF0dXJlc2ln"})
    with pytest.raises(SnapshotError, match="plain JSON"):
        store.save("s", ws, {"x": object()})
    assert list(store.root.iterdir()) == []


def test_source_must_be_a_real_directory(store, ws, tmp_path):
    os.symlink(ws, tmp_path / "wslink")
    with pytest.raises(SnapshotError, match="source is not a directory"):
        store.save("s", tmp_path / "wslink", {})
    with pytest.raises(SnapshotError, match="source is not a directory"):
        store.save("s", tmp_path / "nope", {})


def test_store_implements_the_interface():
    assert issubclass(LocalSnapshotStore, snap.SnapshotStore)
    with pytest.raises(TypeError):
        snap.SnapshotStore()  # abstract


# -- state file ----------------------------------------------------------------------------------------

T0 = 1_700_000_000.0


def record(i: int, state=L.State.READY, **kw) -> L.SandboxRecord:
    base = dict(id=f"sb-{i}", tenant="acme", agent="bot", labels={"k": "v"}, tier="namespace",
                limits=Limits(), created_at=T0, ttl_s=60.0, idle_timeout_s=0.0,
                on_timeout="destroy", state=state, last_activity=T0, expires_at=T0 + 60,
                token_id="jti_0123456789", state_since=T0)
    base.update(kw)
    return L.SandboxRecord(**base)


def test_statefile_round_trip_and_permissions(tmp_path):
    f = sf.StateFile(tmp_path / "state" / "state.json")
    assert f.load().records == {} and f.load().problem == ""
    recs = [record(1), record(2, L.State.ASLEEP, snapshot_id="snap-x")]
    f.save(recs, now=T0)
    res = f.load()
    assert res.problem == "" and res.records == {r.id: r for r in recs}
    assert stat.S_IMODE(os.stat(f.path).st_mode) == 0o600
    assert [p.name for p in f.path.parent.iterdir()] == ["state.json"]


def test_statefile_never_contains_a_token(tmp_path):
    f = sf.StateFile(tmp_path / "state.json")
    r = record(1, error="x")
    object.__setattr__(r, "error", "leaked egt1.eyJ2IjoxfQ.c2lnbmF0dXJl")  # bypass scrub
    with pytest.raises(sf.StateFileError, match="would contain an identity token"):
        f.save([r])
    assert not f.path.exists()
    data = sf.encode_state([record(1)], T0).decode()
    assert "token_id" in data and "egt1." not in data


def test_statefile_write_is_atomic(tmp_path, monkeypatch):
    f = sf.StateFile(tmp_path / "state.json")
    f.save([record(1)], now=T0)
    old = f.path.read_bytes()

    def crash(*a, **k):
        raise OSError("power cut")

    monkeypatch.setattr(sf.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        f.save([record(1), record(2)], now=T0)
    monkeypatch.undo()
    assert f.path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # temp removed
    assert list(f.load().records) == ["sb-1"]


def test_statefile_cleans_leftover_temp_files(tmp_path):
    f = sf.StateFile(tmp_path / "state.json")
    (tmp_path / ".state.json.abc123.tmp").write_text("half")
    assert [p.name for p in f.cleanup_temp_files()] == [".state.json.abc123.tmp"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content,fragment", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[]", "not a sandboxd-state document"),
    (b'{"format": "sandboxd-state", "version": 2, "sandboxes": []}', "unsupported version"),
    (b'{"format": "sandboxd-state", "version": 1, "sandboxes": {}}', "must be a list"),
    (b'{"format": "sandboxd-state", "version": 1, "sandboxes": [{"id": "sb-1"}]}',
     "sandbox #0: record: missing field"),
    (b'{"format": "sandboxd-state", "version": 1, "saved_at": NaN, "sandboxes": []}',
     "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_corrupt_statefile_is_moved_aside(tmp_path, content, fragment):
    f = sf.StateFile(tmp_path / "state.json")
    f.path.write_bytes(content)
    res = f.load(now=T0)
    assert res.records == {}
    assert fragment in res.problem and "moved aside" in res.problem
    assert res.moved_to == tmp_path / "state.json.corrupt-20231114T221320Z"
    assert res.moved_to.read_bytes() == content
    assert not f.path.exists()
    # a second corrupt file in the same second gets its own name
    f.path.write_bytes(content)
    assert f.load(now=T0).moved_to.name == "state.json.corrupt-20231114T221320Z.2"


def test_statefile_duplicate_ids_are_corruption(tmp_path):
    d = L.record_to_dict(record(1))
    doc = {"format": "sandboxd-state", "version": 1, "saved_at": T0, "sandboxes": [d, d]}
    f = sf.StateFile(tmp_path / "state.json")
    f.path.write_text(json.dumps(doc))
    res = f.load(now=T0)
    assert res.records == {} and "duplicate id sb-1" in res.problem


def test_statefile_unreadable_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "state.json").mkdir()
    with pytest.raises(sf.StateFileError, match="is a directory"):
        sf.StateFile(tmp_path / "state.json").load()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_decode_state_never_crashes(data):
    try:
        out = sf.decode_state(data)
    except sf.StateFileError as e:
        assert str(e)
    else:
        assert isinstance(out, dict)


@settings(max_examples=200, deadline=None)
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                            max_size=4),
                        max_leaves=20))
def test_decode_state_structured_garbage(doc):
    wrapped = {"format": "sandboxd-state", "version": 1, "sandboxes": [doc]}
    with pytest.raises(sf.StateFileError):
        sf.decode_state(json.dumps(wrapped).encode())


# -- a workspace changing under the save ----------------------------------------------------------

def test_file_swapped_for_symlink_during_save_is_not_followed(store, tmp_path, monkeypatch):
    w = tmp_path / "w"
    w.mkdir()
    (w / "victim").write_text("harmless")
    outside = tmp_path / "host-secret"
    outside.write_text("HOST SECRET")
    real_open = os.open

    def swapping_open(path, flags, *a, **kw):
        if path == "victim" and "dir_fd" in kw:
            os.unlink("victim", dir_fd=kw["dir_fd"])
            os.symlink(str(outside), "victim", dir_fd=kw["dir_fd"])
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(snap.os, "open", swapping_open)
    with pytest.raises(SnapshotError, match=r"workspace changed while being saved \(victim\)"):
        store.save("s", w, {})
    monkeypatch.undo()
    assert list(store.root.iterdir()) == []


def test_dir_swapped_for_symlink_during_save_is_not_followed(store, tmp_path, monkeypatch):
    w = tmp_path / "w"
    (w / "sub").mkdir(parents=True)
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "secret").write_text("HOST SECRET")
    real_open = os.open

    def swapping_open(path, flags, *a, **kw):
        if path == "sub" and "dir_fd" in kw:
            os.rmdir("sub", dir_fd=kw["dir_fd"])
            os.symlink(str(tmp_path / "host"), "sub", dir_fd=kw["dir_fd"])
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(snap.os, "open", swapping_open)
    with pytest.raises(SnapshotError, match=r"workspace changed while being saved \(sub\)"):
        store.save("s", w, {})


def test_too_deep_workspace_is_refused(store, tmp_path, monkeypatch):
    monkeypatch.setattr(snap, "MAX_DEPTH", 5)
    w = tmp_path / "w"
    (w / "a/b/c/d/e").mkdir(parents=True)
    store.save("ok", w, {})
    (w / "a/b/c/d/e/f").mkdir()
    with pytest.raises(SnapshotError, match="nested deeper than 5"):
        store.save("deep", w, {})


def test_missing_archive_is_reported(store, ws, tmp_path):
    store.save("s", ws, {})
    (store.root / "s" / snap.ARCHIVE_NAME).unlink()
    with pytest.raises(SnapshotCorrupt, match="snapshot s: archive missing"):
        store.restore("s", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_restore_unknown_snapshot(store, tmp_path):
    with pytest.raises(snap.SnapshotNotFound, match="snapshot nope not found"):
        store.restore("nope", tmp_path / "o")


def test_long_hostile_member_names_are_bounded_in_errors(store, tmp_path):
    plant(store, "evil", [(ti("../" + "x" * 5000 + "\x1b[31m"), b"x")])
    with pytest.raises(SnapshotCorrupt) as ei:
        store.restore("evil", tmp_path / "o")
    assert len(str(ei.value)) < 400 and "\x1b" not in str(ei.value)


_seg = st.sampled_from(["a", "b", ".", "..", "", "c d", "/"]) | st.text(max_size=3)


@settings(max_examples=500, deadline=None)
@given(name=st.lists(_seg, min_size=1, max_size=5).map("/".join),
       target=st.lists(_seg, min_size=1, max_size=5).map("/".join),
       kind=st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE]))
def test_member_problem_accepts_only_members_that_stay_inside(name, target, kind):
    import posixpath
    m = ti(name, kind, target if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else "")
    if snap.member_problem(m) is not None:
        return
    dest = "/dest"
    where = posixpath.normpath(posixpath.join(dest, name))
    assert where == dest or where.startswith(dest + "/")
    if kind == tarfile.SYMTYPE:
        to = posixpath.normpath(posixpath.join(posixpath.dirname(where), target))
        assert to == dest or to.startswith(dest + "/")
    if kind == tarfile.LNKTYPE:
        to = posixpath.normpath(posixpath.join(dest, target))
        assert to == dest or to.startswith(dest + "/")
