"""Workspace files, shared by the tiers: what a caller-given path may be, and
reading, writing and listing under a workspace without ever following a
symbolic link (directory descriptors and O_NOFOLLOW at every step: a sandbox
that runs concurrently cannot swap a directory for a link between a check and
a use)."""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path, PurePosixPath

from .base import TierError


def rel_parts(path: str) -> list[str]:
    """The components of a workspace-relative path; refuses absolute paths, ``..``
    and NUL (a tier must still refuse symbolic links on the way when it opens it)."""
    if not isinstance(path, str) or "\x00" in path:
        raise TierError("invalid path")
    if path.startswith("/") or path.startswith("\\") or re.match(r"^[A-Za-z]:", path):
        raise TierError(f"absolute paths are not allowed: {path!r}")
    parts = [p for p in PurePosixPath(path).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise TierError(f"'..' is not allowed in paths: {path!r}")
    return parts


def rmtree(p: Path) -> None:
    """Remove a file, a symbolic link (not its target) or a directory tree; absent is fine."""
    try:
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.exists():
            shutil.rmtree(p)
    except FileNotFoundError:
        pass


def put_file(ws: Path, path: str, data: bytes, max_bytes: int, uid: int | None = None) -> None:
    """Write a workspace file, creating directories; with ``uid``, new directories
    and the file belong to that uid (the namespace tier's sandbox user)."""
    if len(data) > max_bytes:
        raise TierError(f"file too large ({len(data)} bytes > {max_bytes})")
    parts = rel_parts(path)
    if not parts:
        raise TierError("path names the workspace itself, not a file")
    dfd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for p in parts[:-1]:
            try:
                os.mkdir(p, 0o755, dir_fd=dfd)
                if uid is not None:
                    os.chown(p, uid, uid, dir_fd=dfd, follow_symlinks=False)
            except FileExistsError:
                pass
            try:
                nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                raise TierError(f"path {path!r}: {p!r} is not a directory (or is a symbolic link)") from None
            os.close(dfd)
            dfd = nfd
        try:
            fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, 0o644, dir_fd=dfd)
        except OSError as e:
            why = "path is a symbolic link" if e.errno == 40 else (e.strerror or "error")
            raise TierError(f"cannot write {path!r}: {why}") from None
        with os.fdopen(fd, "wb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise TierError(f"cannot write {path!r}: not a regular file")
            if uid is not None:
                os.fchown(f.fileno(), uid, uid)
            f.write(data)
    finally:
        os.close(dfd)


# Reads walk the workspace with directory file descriptors and O_NOFOLLOW at
# every step: the sandbox runs concurrently and could swap a directory for a
# symbolic link between a check and a use; here there is no such window.

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(ws: Path, parts: list[str], path: str) -> int:
    dfd = os.open(ws, _DIR_FLAGS)
    for p in parts:
        try:
            nfd = os.open(p, _DIR_FLAGS, dir_fd=dfd)
        except OSError as e:
            os.close(dfd)
            why = {40: "goes through a symbolic link", 20: "is not a directory (or is a symbolic link)",
                   2: "does not exist"}.get(e.errno, e.strerror or "error")
            raise TierError(f"path {path!r}: {p!r} {why}") from None
        os.close(dfd)
        dfd = nfd
    return dfd


def get_file(ws: Path, path: str, max_bytes: int) -> bytes:
    parts = rel_parts(path)
    if not parts:
        raise TierError("path names the workspace itself, not a file")
    dfd = _open_dir(ws, parts[:-1], path)
    try:
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd)
    except OSError as e:
        why = "path is a symbolic link" if e.errno == 40 else (e.strerror or "error")
        raise TierError(f"cannot read {path!r}: {why}") from None
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise TierError(f"cannot read {path!r}: not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TierError(f"file {path!r} is larger than {max_bytes} bytes")
    return data


def list_files(ws: Path, path: str, max_entries: int = 100_000) -> list[dict]:
    """Entries under path (recursive); symbolic links are never followed nor listed.
    Each directory is (re)opened from the workspace root with O_NOFOLLOW at every
    step, so at most a few descriptors are open at any time."""
    parts = rel_parts(path)
    os.close(_open_dir(ws, parts, path))  # the start must exist and be a real directory
    entries: list[dict] = []
    stack = [parts]
    while stack and len(entries) < max_entries:
        cur = stack.pop()
        try:
            dfd = _open_dir(ws, cur, path)
        except TierError:
            continue  # swapped for a link (or removed) meanwhile: skipped
        try:
            for name in sorted(os.listdir(dfd)):
                if len(entries) >= max_entries:
                    break
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    continue
                child = "/".join([*cur, name])
                if stat.S_ISDIR(st.st_mode):
                    entries.append({"path": child, "size": 0, "type": "dir"})
                    stack.append([*cur, name])
                elif stat.S_ISREG(st.st_mode):
                    entries.append({"path": child, "size": st.st_size, "type": "file"})
        finally:
            os.close(dfd)
    entries.sort(key=lambda x: x["path"])
    return entries
