"""Workspace path rules shared by the tiers: what a caller-given path may be."""

from __future__ import annotations

import re
import shutil
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
