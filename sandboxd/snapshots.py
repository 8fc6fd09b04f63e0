"""Snapshot store: where a sleeping sandbox's workspace (and an isolate's state) waits.

``SnapshotStore`` is the pluggable interface; ``LocalSnapshotStore`` keeps each
snapshot in a directory::

    <root>/<snapshot_id>/workspace.tar.gz   the files (gzip'd tar, PAX format)
    <root>/<snapshot_id>/snapshot.json      metadata, incl. SHA-256 and size of the archive

Atomicity: a snapshot is built in ``<root>/.tmp-<id>-<random>/`` and renamed
to ``<root>/<id>/`` only when both files are written and fsync'd, so a
snapshot directory that exists is complete; a crash leaves a ``.tmp-*``
directory that ``cleanup_incomplete`` removes. Snapshots are immutable: saving
an existing id fails (use a new id per sleep, delete the old one after).

Restore verifies size and SHA-256 before extracting, refuses members that
would escape the target (absolute names, ``..``, links pointing outside,
device files, FIFOs) — first by its own checks, then by ``tarfile.data_filter``
— and extracts into a temp sibling that is renamed to the target only when
complete. Regular file modes are kept (minus setuid/setgid/sticky and
group/other write, which the data filter strips), directory modes too, and
symlinks inside the workspace. Ownership is not stored.

Save skips what cannot be restored safely and lists it in
``SnapshotInfo.skipped``: sockets, FIFOs, devices, and symlinks whose target
is absolute or leaves the workspace.
"""

from __future__ import annotations

import abc
import errno
import gzip
import hashlib
import json
import os
import posixpath
import re
import secrets
import shutil
import stat
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sandboxd.lifecycle import looks_like_token

SNAPSHOT_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,127}")
ARCHIVE_NAME = "workspace.tar.gz"
META_NAME = "snapshot.json"
FORMAT = "sandboxd-snapshot"
VERSION = 1
DEFAULT_MAX_BYTES = 8 * 1024**3      # uncompressed workspace size limit
DEFAULT_MAX_MEMBERS = 1_000_000
MAX_METADATA_BYTES = 1024 * 1024
MAX_DEPTH = 256
_CHUNK = 1024 * 1024


class SnapshotError(Exception):
    """A snapshot operation failed; the message is for the operator/API caller."""


class SnapshotNotFound(SnapshotError):
    pass


class SnapshotExists(SnapshotError):
    pass


class SnapshotCorrupt(SnapshotError):
    """The archive or its metadata failed verification; nothing was restored."""


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    created_at: float
    sha256: str
    archive_bytes: int
    files: int                     # members archived (files, dirs, links)
    content_bytes: int             # sum of regular file sizes
    metadata: Mapping[str, Any] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # "path: reason" of entries not archived


def validate_snapshot_id(snapshot_id: object) -> str:
    if type(snapshot_id) is not str or not SNAPSHOT_ID_RE.fullmatch(snapshot_id):
        raise SnapshotError("invalid snapshot id: must match [a-z0-9][a-z0-9_-]{0,127}")
    return snapshot_id


def new_snapshot_id(sandbox_id: str) -> str:
    """A fresh id for one sleep of ``sandbox_id`` (ids are never reused)."""
    return validate_snapshot_id(f"{sandbox_id}-{int(time.time())}-{secrets.token_hex(4)}")


def _check_metadata(metadata: Mapping[str, Any]) -> bytes:
    try:
        data = json.dumps(dict(metadata), sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"snapshot metadata must be plain JSON ({e})") from None
    if len(data) > MAX_METADATA_BYTES:
        raise SnapshotError("snapshot metadata is too large")
    if looks_like_token(data.decode()):
        raise SnapshotError("snapshot metadata must not contain an identity token")
    return data


# -- pure checks on archive members ------------------------------------------------

def member_problem(m: tarfile.TarInfo) -> str | None:
    """Why ``m`` must not be extracted into a workspace, or None (pure)."""
    name = m.name
    if not name or "\x00" in name:
        return "empty or NUL in name"
    if name.startswith("/"):
        return "absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "'..' in path"
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        return "not a regular file, directory or link"
    norm = posixpath.normpath(name)
    if norm == "." and not m.isdir():
        return "names the workspace root"
    if m.issym() or m.islnk():
        target = m.linkname
        if not target or "\x00" in target or target.startswith("/"):
            return "link target is absolute or empty"
        base = posixpath.dirname(norm) if m.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, target))
        if resolved == ".." or resolved.startswith("../") or resolved.startswith("/"):
            return "link points outside the workspace"
    return None


def _shown(name: str) -> str:
    """An archive member's name for an error message: quoted, escaped, bounded."""
    return repr(name[:200] + ("..." if len(name) > 200 else ""))


def _restore_filter(m: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    problem = member_problem(m)
    if problem:
        raise SnapshotCorrupt(f"refusing archive member {_shown(m.name)}: {problem}")
    try:
        out = tarfile.data_filter(m, dest)
    except tarfile.FilterError as e:
        raise SnapshotCorrupt(f"refusing archive member {_shown(m.name)}: {type(e).__name__}") from None
    if out.isdir():  # the data filter drops directory modes; keep them (owner always rwx)
        out = out.replace(mode=(m.mode & 0o755) | 0o700, deep=False)
    return out


# -- the interface ---------------------------------------------------------------------

class SnapshotStore(abc.ABC):
    @abc.abstractmethod
    def save(self, snapshot_id: str, source_dir: Path, metadata: Mapping[str, Any]) -> SnapshotInfo:
        """Archive ``source_dir`` as ``snapshot_id`` (which must not exist yet)."""

    @abc.abstractmethod
    def restore(self, snapshot_id: str, target_dir: Path) -> dict[str, Any]:
        """Recreate the files in ``target_dir`` (absent or empty); returns the metadata."""

    @abc.abstractmethod
    def delete(self, snapshot_id: str) -> None:
        """Remove the snapshot; deleting an unknown id is not an error."""

    @abc.abstractmethod
    def list(self) -> list[SnapshotInfo]:
        ...

    @abc.abstractmethod
    def exists(self, snapshot_id: str) -> bool:
        ...


# -- the local directory store -----------------------------------------------------------

def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """File wrapper that hashes and counts what is written through it."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


class LocalSnapshotStore(SnapshotStore):
    def __init__(self, root: Path | str, *, compresslevel: int = 6,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_members: int = DEFAULT_MAX_MEMBERS):
        self.root = Path(root)
        self.compresslevel = compresslevel
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _dir(self, snapshot_id: str) -> Path:
        return self.root / validate_snapshot_id(snapshot_id)

    # save ---------------------------------------------------------------------------

    def save(self, snapshot_id: str, source_dir: Path, metadata: Mapping[str, Any]) -> SnapshotInfo:
        final = self._dir(snapshot_id)
        meta_bytes = _check_metadata(metadata)
        src = Path(source_dir)
        st = os.lstat(src) if os.path.lexists(src) else None
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise SnapshotError(f"cannot save snapshot {snapshot_id}: source is not a directory")
        if final.exists():
            raise SnapshotExists(f"snapshot {snapshot_id} already exists")
        tmp = self.root / f".tmp-{snapshot_id}-{secrets.token_hex(6)}"
        tmp.mkdir(mode=0o700)
        try:
            with open(tmp / ARCHIVE_NAME, "wb") as raw:
                hw = _HashingWriter(raw)
                with tarfile.open(fileobj=hw, mode="w:gz", compresslevel=self.compresslevel,
                                  format=tarfile.PAX_FORMAT) as tar:
                    files, content, skipped = self._add_tree(tar, src)
                raw.flush()
                os.fsync(raw.fileno())
            info = SnapshotInfo(snapshot_id, time.time(), hw.h.hexdigest(), hw.n, files, content,
                                json.loads(meta_bytes), tuple(skipped))
            doc = {"format": FORMAT, "version": VERSION, "id": snapshot_id,
                   "created_at": info.created_at, "archive": ARCHIVE_NAME, "sha256": info.sha256,
                   "archive_bytes": info.archive_bytes, "files": files, "content_bytes": content,
                   "skipped": list(skipped), "metadata": info.metadata}
            with open(tmp / META_NAME, "wb") as f:
                f.write(json.dumps(doc, indent=1, sort_keys=True).encode())
                f.flush()
                os.fsync(f.fileno())
            _fsync_path(tmp, directory=True)
            try:
                os.rename(tmp, final)  # fails if another save of the same id won
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise SnapshotExists(f"snapshot {snapshot_id} already exists") from None
                raise SnapshotError(f"cannot save snapshot {snapshot_id}: {e.strerror}") from None
            _fsync_path(self.root, directory=True)
            return info
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _add_tree(self, tar: tarfile.TarFile, src: Path) -> tuple[int, int, list[str]]:
        """Archive the tree under ``src`` through directory fds, never following a symlink
        (a workspace changing under us cannot make us read outside it)."""
        counts = {"files": 0, "content": 0}
        skipped: list[str] = []
        root_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            self._add_dir(tar, root_fd, "", counts, skipped)
        finally:
            os.close(root_fd)
        return counts["files"], counts["content"], skipped

    def _count(self, counts: dict[str, int], size: int) -> None:
        counts["files"] += 1
        counts["content"] += size
        if counts["content"] > self.max_bytes:
            raise SnapshotError(f"workspace is larger than {self.max_bytes} bytes")
        if counts["files"] > self.max_members:
            raise SnapshotError(f"workspace has more than {self.max_members} entries")

    @staticmethod
    def _open(entry: str, flags: int, dir_fd: int, name: str) -> int:
        try:
            return os.open(entry, flags, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.ENXIO):
                raise SnapshotError(f"workspace changed while being saved ({name})") from None
            raise

    def _add_dir(self, tar: tarfile.TarFile, dir_fd: int, rel: str, counts: dict[str, int],
                 skipped: list[str], depth: int = 0) -> None:
        names = sorted(os.listdir(dir_fd))
        for entry in names:
            name = f"{rel}/{entry}" if rel else entry
            st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
            mode = st.st_mode
            if stat.S_ISLNK(mode):
                ti = tarfile.TarInfo(name)
                ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(entry, dir_fd=dir_fd)
                ti.mode, ti.mtime = 0o777, int(st.st_mtime)
                if member_problem(ti):
                    skipped.append(f"{name}: symlink pointing outside the workspace")
                    continue
                self._count(counts, 0)
                tar.addfile(ti)
            elif stat.S_ISREG(mode):
                fd = self._open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd, name)
                with os.fdopen(fd, "rb") as f:
                    fst = os.fstat(fd)
                    if not stat.S_ISREG(fst.st_mode) or (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev):
                        raise SnapshotError(f"workspace changed while being saved ({name})")
                    ti = tar.gettarinfo(arcname=name, fileobj=f)
                    ti.uid = ti.gid = 0
                    ti.uname = ti.gname = ""
                    self._count(counts, ti.size if ti.isreg() else 0)
                    tar.addfile(ti, f if ti.isreg() else None)
            elif stat.S_ISDIR(mode):
                if depth >= MAX_DEPTH:
                    raise SnapshotError(f"workspace is nested deeper than {MAX_DEPTH} directories")
                sub = self._open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd, name)
                try:
                    fst = os.fstat(sub)
                    if (fst.st_ino, fst.st_dev) != (st.st_ino, st.st_dev):
                        raise SnapshotError(f"workspace changed while being saved ({name})")
                    ti = tarfile.TarInfo(name)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, stat.S_IMODE(fst.st_mode), fst.st_mtime
                    self._count(counts, 0)
                    tar.addfile(ti)
                    self._add_dir(tar, sub, name, counts, skipped, depth + 1)
                finally:
                    os.close(sub)
            else:
                skipped.append(f"{name}: special file (socket, FIFO or device)")

    # restore ---------------------------------------------------------------------------

    def _read_meta(self, d: Path, snapshot_id: str) -> dict[str, Any]:
        try:
            raw = (d / META_NAME).read_bytes()
        except FileNotFoundError:
            if not d.exists():
                raise SnapshotNotFound(f"snapshot {snapshot_id} not found") from None
            raise SnapshotCorrupt(f"snapshot {snapshot_id}: metadata missing") from None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise SnapshotCorrupt(f"snapshot {snapshot_id}: metadata is not valid JSON") from None
        ok = (isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("version") == VERSION
              and doc.get("id") == snapshot_id and doc.get("archive") == ARCHIVE_NAME
              and isinstance(doc.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", doc["sha256"])
              and type(doc.get("archive_bytes")) is int and isinstance(doc.get("metadata"), dict))
        if not ok:
            raise SnapshotCorrupt(f"snapshot {snapshot_id}: metadata is not valid")
        return doc

    def _info(self, doc: dict[str, Any]) -> SnapshotInfo:
        return SnapshotInfo(doc["id"], float(doc.get("created_at", 0)), doc["sha256"],
                            doc["archive_bytes"], int(doc.get("files", 0)),
                            int(doc.get("content_bytes", 0)), doc["metadata"],
                            tuple(doc.get("skipped", ())))

    def restore(self, snapshot_id: str, target_dir: Path) -> dict[str, Any]:
        d = self._dir(snapshot_id)
        doc = self._read_meta(d, snapshot_id)
        target = Path(target_dir)
        if os.path.lexists(target):
            if target.is_symlink() or not target.is_dir():
                raise SnapshotError(f"cannot restore snapshot {snapshot_id}: target is not a directory")
            if any(target.iterdir()):
                raise SnapshotError(f"cannot restore snapshot {snapshot_id}: target is not empty")
        try:
            f = open(d / ARCHIVE_NAME, "rb")
        except FileNotFoundError:
            raise SnapshotCorrupt(f"snapshot {snapshot_id}: archive missing") from None
        with f:
            self._restore_from(f, doc, snapshot_id, target)
        return dict(doc["metadata"])

    def _restore_from(self, f, doc: dict[str, Any], snapshot_id: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".restore-{target.name}-{secrets.token_hex(6)}"
        staging.mkdir(mode=0o700)
        try:
            h, n = hashlib.sha256(), 0
            while chunk := f.read(_CHUNK):  # verify, then extract from the same open file
                h.update(chunk)
                n += len(chunk)
            if n != doc["archive_bytes"] or h.hexdigest() != doc["sha256"]:
                raise SnapshotCorrupt(f"snapshot {snapshot_id}: archive does not match its "
                                      "SHA-256 (tampered or truncated); nothing restored")
            f.seek(0)
            self._extract(f, staging, snapshot_id)
            if target.exists():
                staging.chmod(target.stat().st_mode & 0o777)
                target.rmdir()
            else:
                staging.chmod(0o755)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _extract(self, f, staging: Path, snapshot_id: str) -> None:
        try:
            with tarfile.open(fileobj=f, mode="r:gz") as tar:
                members, total = [], 0
                for m in tar:
                    problem = member_problem(m)
                    if problem:
                        raise SnapshotCorrupt(f"snapshot {snapshot_id}: refusing archive member "
                                              f"{_shown(m.name)}: {problem}")
                    total += m.size if m.isreg() else 0
                    members.append(m)
                    if total > self.max_bytes or len(members) > self.max_members:
                        raise SnapshotCorrupt(f"snapshot {snapshot_id}: archive exceeds the "
                                              "size limits")
                tar.extractall(staging, members=members, filter=_restore_filter)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise SnapshotCorrupt(f"snapshot {snapshot_id}: archive is unreadable "
                                  f"({type(e).__name__})") from None
        except OSError as e:
            raise SnapshotError(f"cannot restore snapshot {snapshot_id}: {e.strerror or e}") from None

    # the rest -------------------------------------------------------------------------------

    def delete(self, snapshot_id: str) -> None:
        d = self._dir(snapshot_id)
        gone = self.root / f".del-{snapshot_id}-{secrets.token_hex(6)}"
        try:
            os.rename(d, gone)  # atomically no longer a snapshot
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)

    def exists(self, snapshot_id: str) -> bool:
        return (self._dir(snapshot_id) / META_NAME).is_file()

    def info(self, snapshot_id: str) -> SnapshotInfo:
        return self._info(self._read_meta(self._dir(snapshot_id), snapshot_id))

    def list(self) -> list[SnapshotInfo]:
        """Complete snapshots with readable metadata, by id (others are left out)."""
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or not SNAPSHOT_ID_RE.fullmatch(p.name):
                continue
            try:
                out.append(self._info(self._read_meta(p, p.name)))
            except SnapshotError:
                continue
        return out

    def cleanup_incomplete(self) -> list[str]:
        """Remove what interrupted saves/deletes left; returns the names removed."""
        removed = []
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".del-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return sorted(removed)
