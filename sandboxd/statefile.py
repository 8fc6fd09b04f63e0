"""The daemon's durable state: its sandbox records in one JSON file.

- ``encode_state``/``decode_state`` are pure (bytes in, records out, or a
  ``StateFileError`` naming the problem).
- ``StateFile`` is the shell: ``save`` writes atomically (temp file in the
  same directory, fsync, rename, fsync of the directory; mode 0600), so a
  crash leaves either the old or the new file, never a mix. ``load`` never
  crashes on a corrupt file: it moves it aside as
  ``<name>.corrupt-<UTC timestamp>`` and returns no records plus the reason,
  which the daemon must report. An I/O error other than "no such file" (e.g.
  permission denied) is raised: starting empty then would make the daemon
  clean up sandboxes it merely could not read about.

No secrets: records carry a token's id, never a token; ``encode_state``
refuses to write anything shaped like an identity token.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from sandboxd.lifecycle import (InvalidRequest, SandboxRecord, looks_like_token, record_from_dict,
                                record_to_dict)

FORMAT = "sandboxd-state"
VERSION = 1
MAX_STATE_BYTES = 64 * 1024 * 1024


class StateFileError(Exception):
    """The state file cannot be used; the message says why (never quoting secrets)."""


def encode_state(records: Iterable[SandboxRecord], saved_at: float) -> bytes:
    recs = sorted(records, key=lambda r: r.id)
    ids = [r.id for r in recs]
    if len(set(ids)) != len(ids):
        raise StateFileError("duplicate sandbox id in the records to save")
    doc = {"format": FORMAT, "version": VERSION, "saved_at": saved_at,
           "sandboxes": [record_to_dict(r) for r in recs]}
    data = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode()
    if looks_like_token(data.decode()):
        raise StateFileError("refusing to write the state file: it would contain an identity token")
    return data


def decode_state(data: bytes) -> dict[str, SandboxRecord]:
    if len(data) > MAX_STATE_BYTES:
        raise StateFileError(f"state file is larger than {MAX_STATE_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"),
                         parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except UnicodeDecodeError:
        raise StateFileError("state file is not UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise StateFileError(f"state file is not valid JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateFileError(f"state file is not a {FORMAT} document")
    if doc.get("version") != VERSION:
        raise StateFileError(f"state file has unsupported version (expected {VERSION})")
    sandboxes = doc.get("sandboxes")
    if not isinstance(sandboxes, list):
        raise StateFileError("state file: 'sandboxes' must be a list")
    out: dict[str, SandboxRecord] = {}
    for i, d in enumerate(sandboxes):
        try:
            r = record_from_dict(d)
        except InvalidRequest as e:
            raise StateFileError(f"state file: sandbox #{i}: {e}") from None
        if r.id in out:
            raise StateFileError(f"state file: sandbox #{i}: duplicate id {r.id}")
        out[r.id] = r
    return out


@dataclass
class LoadResult:
    records: dict[str, SandboxRecord] = field(default_factory=dict)
    problem: str = ""            # why the file was not used ("" when it was, or did not exist)
    moved_to: Path | None = None  # where the corrupt file now is


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new bytes, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


class StateFile:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    def save(self, records: Iterable[SandboxRecord], now: float | None = None) -> None:
        data = encode_state(records, time.time() if now is None else now)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path, data)

    def load(self, now: float | None = None) -> LoadResult:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return LoadResult()
        except IsADirectoryError:
            raise StateFileError(f"state file {self.path} is a directory") from None
        except OSError as e:
            raise StateFileError(f"cannot read state file {self.path}: {e.strerror}") from None
        try:
            return LoadResult(decode_state(data))
        except StateFileError as e:
            moved = self._move_aside(time.time() if now is None else now)
            return LoadResult({}, f"{e}; moved aside to {moved.name}, starting with no sandboxes",
                              moved)

    def _move_aside(self, now: float) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        base = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        target, n = base, 1
        while target.exists():
            n += 1
            target = base.with_name(f"{base.name}.{n}")
        os.replace(self.path, target)
        _fsync_dir(self.path.parent)
        return target

    def cleanup_temp_files(self) -> list[Path]:
        """Remove temp files a crash during ``save`` left behind; returns what was removed."""
        removed = []
        for p in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
        return removed
