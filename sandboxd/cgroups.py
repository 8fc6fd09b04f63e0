"""Per-sandbox cgroups with CPU, memory and pids limits (cgroup v2 or v1).

Layout: ``<hierarchy>/<parent>/<sandbox id>`` holds the sandbox's limits; every
exec runs in a leaf ``<parent>/<sandbox id>/<leaf>`` below it (limits are
hierarchical in both versions), so a timeout kills exactly that exec's
processes and nothing else of the sandbox.

* v2 is used when ``/sys/fs/cgroup`` is a cgroup2 mount whose
  ``cgroup.controllers`` has ``cpu``, ``memory`` and ``pids`` (they are
  enabled in ``cgroup.subtree_control`` of the root and the parent):
  ``memory.max`` (+ ``memory.swap.max`` 0), ``cpu.max``, ``pids.max``;
  kill with ``cgroup.kill`` when the kernel has it.
* otherwise v1: the ``memory``, ``cpu`` and ``pids`` hierarchies (found in
  /proc/self/mountinfo): ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes`` when swap accounting exists),
  ``cpu.cfs_period_us``/``cpu.cfs_quota_us``, ``pids.max``. A process is placed
  by writing its pid to ``cgroup.procs`` of the leaf in every hierarchy.

Killing a cgroup: SIGKILL every pid in it until it is empty (the pids limit
bounds how many can appear meanwhile), bounded in time. Needs root.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CGROUP2_MAGIC = 0x63677270
DEFAULT_PARENT = "egress-sandboxd"
CONTROLLERS = ("memory", "cpu", "pids")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
CPU_PERIOD_US = 100_000


class CgroupError(Exception):
    """A cgroup operation failed (one line)."""


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise CgroupError(f"invalid cgroup name {name!r}")


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise CgroupError(f"write {path}: {e.strerror or e}") from None


def _v1_mounts() -> dict[str, Path]:
    """controller -> mount point of its v1 hierarchy."""
    found: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, post_f = pre.split(), post.split()
        if len(post_f) < 3 or post_f[0] != "cgroup":
            continue
        opts = set(post_f[2].split(","))
        for c in CONTROLLERS:
            if c in opts and c not in found:
                found[c] = Path(fields[4])
    return found


def _is_cgroup2(path: Path) -> bool:
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            if pre.split()[4] == str(path) and post.split()[0] == "cgroup2":
                return True
    except (OSError, IndexError):
        pass
    return False


@dataclass(frozen=True)
class Layout:
    version: int  # 1 or 2
    hierarchies: dict  # controller -> hierarchy root (v2: all the same path)

    def roots(self) -> list[Path]:
        return sorted(set(self.hierarchies.values()))


def detect(root: Path = ROOT) -> Layout:
    """Which cgroup version to use here, or CgroupError with the reason."""
    if _is_cgroup2(root):
        try:
            have = set((root / "cgroup.controllers").read_text().split())
        except OSError as e:
            raise CgroupError(f"{root}/cgroup.controllers: {e.strerror}") from None
        missing = [c for c in CONTROLLERS if c not in have]
        if missing:
            raise CgroupError(f"cgroup v2 at {root} lacks controllers: {', '.join(missing)}")
        return Layout(2, {c: root for c in CONTROLLERS})
    mounts = _v1_mounts()
    missing = [c for c in CONTROLLERS if c not in mounts]
    if missing:
        raise CgroupError(f"no cgroup v2 with {'/'.join(CONTROLLERS)} and no v1 hierarchy for: {', '.join(missing)}")
    return Layout(1, mounts)


class CgroupManager:
    """The daemon's cgroups: ``<parent>/<sandbox id>`` in every hierarchy used."""

    def __init__(self, parent: str = DEFAULT_PARENT, layout: Layout | None = None):
        _check_name(parent)
        self.parent = parent
        self.layout = layout or detect()

    # -- paths ---------------------------------------------------------------------------
    def dirs(self, sandbox_id: str, leaf: str | None = None) -> list[Path]:
        _check_name(sandbox_id)
        rel = Path(self.parent) / sandbox_id
        if leaf is not None:
            _check_name(leaf)
            rel = rel / leaf
        return [r / rel for r in self.layout.roots()]

    def procs_files(self, sandbox_id: str, leaf: str) -> list[str]:
        """Where to write a pid to place it in the leaf (one per hierarchy)."""
        return [str(d / "cgroup.procs") for d in self.dirs(sandbox_id, leaf)]

    def _ctl(self, controller: str, sandbox_id: str) -> Path:
        return self.layout.hierarchies[controller] / self.parent / sandbox_id

    # -- create / limits ---------------------------------------------------------------------
    def create(self, sandbox_id: str, *, cpu_millicores: int, memory_mb: int, pids: int) -> None:
        """The sandbox's cgroup with its limits (replacing a leftover of the same id)."""
        for v, name in ((cpu_millicores, "cpu_millicores"), (memory_mb, "memory_mb"), (pids, "pids")):
            if not isinstance(v, int) or v <= 0:
                raise CgroupError(f"{name} must be a positive integer, got {v!r}")
        self.remove(sandbox_id)
        try:
            self._ensure_parent()
            for d in self.dirs(sandbox_id):
                d.mkdir()
            self._limits(sandbox_id, cpu_millicores, memory_mb, pids)
        except BaseException:
            self.remove(sandbox_id)
            raise

    def _ensure_parent(self) -> None:
        for r in self.layout.roots():
            (r / self.parent).mkdir(exist_ok=True)
        if self.layout.version == 2:
            r = self.layout.roots()[0]
            for d in (r, r / self.parent):
                ctl = (d / "cgroup.subtree_control").read_text().split()
                need = [c for c in CONTROLLERS if c not in ctl]
                if need:
                    _write(d / "cgroup.subtree_control", " ".join("+" + c for c in need))

    def _limits(self, sid: str, cpu_millicores: int, memory_mb: int, pids: int) -> None:
        mem = memory_mb * 1024 * 1024
        quota = max(1000, cpu_millicores * CPU_PERIOD_US // 1000)
        if self.layout.version == 2:
            d = self._ctl("memory", sid)
            _write(d / "memory.max", str(mem))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            _write(d / "pids.max", str(pids))
            # the leaves below get the controllers too (v2: processes only in leaves)
            _write(d / "cgroup.subtree_control", "+memory +cpu +pids")
            return
        m = self._ctl("memory", sid)
        _write(m / "memory.limit_in_bytes", str(mem))
        if (m / "memory.memsw.limit_in_bytes").exists():
            _write(m / "memory.memsw.limit_in_bytes", str(mem))
        c = self._ctl("cpu", sid)
        _write(c / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(c / "cpu.cfs_quota_us", str(quota))
        _write(self._ctl("pids", sid) / "pids.max", str(pids))

    def limits(self, sandbox_id: str) -> dict:
        """The limits as the kernel has them (for tests and inspection)."""
        if self.layout.version == 2:
            d = self._ctl("memory", sandbox_id)
            return {"memory": (d / "memory.max").read_text().strip(), "cpu": (d / "cpu.max").read_text().strip(),
                    "pids": (d / "pids.max").read_text().strip()}
        return {"memory": (self._ctl("memory", sandbox_id) / "memory.limit_in_bytes").read_text().strip(),
                "cpu": (self._ctl("cpu", sandbox_id) / "cpu.cfs_quota_us").read_text().strip() + " "
                + (self._ctl("cpu", sandbox_id) / "cpu.cfs_period_us").read_text().strip(),
                "pids": (self._ctl("pids", sandbox_id) / "pids.max").read_text().strip()}

    def memory_peak(self, sandbox_id: str) -> int | None:
        """The sandbox's peak memory use in bytes (v1 ``memory.max_usage_in_bytes``,
        v2 ``memory.peak`` where the kernel has it; else None)."""
        d = self._ctl("memory", sandbox_id)
        f = d / ("memory.max_usage_in_bytes" if self.layout.version == 1 else "memory.peak")
        try:
            return int(f.read_text())
        except (OSError, ValueError):
            return None

    # -- leaves (one per exec) ----------------------------------------------------------------
    def add_leaf(self, sandbox_id: str, leaf: str) -> list[str]:
        for d in self.dirs(sandbox_id):
            if not d.is_dir():
                raise CgroupError(f"cgroup of sandbox {sandbox_id} is missing")
        made = []
        try:
            for d in self.dirs(sandbox_id, leaf):
                d.mkdir()
                made.append(d)
        except OSError as e:
            for d in made:
                _rmdir(d)
            raise CgroupError(f"cannot create cgroup leaf {leaf}: {e.strerror}") from None
        return self.procs_files(sandbox_id, leaf)

    def remove_leaf(self, sandbox_id: str, leaf: str, timeout: float = 5.0) -> bool:
        dirs = self.dirs(sandbox_id, leaf)
        ok = _kill_dirs(dirs, timeout)
        for d in dirs:
            ok = _rmdir(d) and ok
        return ok

    def clear_leaves(self, sandbox_id: str) -> bool:
        """Kill and remove every exec leaf of a sandbox (an adopted sandbox's
        execs died with the previous daemon; anything left of them goes)."""
        ok = True
        for d in self.dirs(sandbox_id):
            if not d.is_dir():
                continue
            subs = [p for p in d.iterdir() if p.is_dir()]
            ok = _kill_dirs(subs, 5.0) and ok
            for sub in subs:
                ok = _rmdir(sub) and ok
        return ok

    def pids(self, sandbox_id: str) -> set[int]:
        """Every process in the sandbox's cgroup (all leaves)."""
        out: set[int] = set()
        for d in self.dirs(sandbox_id):
            out |= _procs_tree(d)
        return out

    # -- removal / leftovers ----------------------------------------------------------------------
    def exists(self, sandbox_id: str) -> bool:
        return all(d.is_dir() for d in self.dirs(sandbox_id))

    def remove(self, sandbox_id: str, timeout: float = 5.0) -> bool:
        """Kill whatever is left in the sandbox's cgroup, then remove it; idempotent.
        Returns False if something could not be removed."""
        dirs = [d for d in self.dirs(sandbox_id) if d.exists()]
        if not dirs:
            return True
        ok = _kill_dirs(dirs, timeout)
        for d in dirs:
            for sub in sorted((p for p in d.iterdir() if p.is_dir()), reverse=True):
                ok = _rmdir(sub) and ok
            ok = _rmdir(d) and ok
        return ok

    def list_ids(self) -> set[str]:
        ids: set[str] = set()
        for r in self.layout.roots():
            p = r / self.parent
            if p.is_dir():
                ids |= {e.name for e in p.iterdir() if e.is_dir() and _NAME_RE.match(e.name)}
        return ids


def _procs_tree(d: Path) -> set[int]:
    out: set[int] = set()
    for cur, subdirs, files in os.walk(d):
        try:
            text = (Path(cur) / "cgroup.procs").read_text()
        except OSError:
            continue
        out |= {int(x) for x in text.split()}
    return out


def _kill_dirs(dirs: list[Path], timeout: float) -> bool:
    """SIGKILL everything in these cgroups (and below) until empty."""
    for d in dirs:
        k = d / "cgroup.kill"
        if k.exists():
            try:
                _write(k, "1")
            except CgroupError:
                pass
    deadline = time.monotonic() + timeout
    while True:
        pids: set[int] = set()
        for d in dirs:
            if d.exists():
                pids |= _procs_tree(d)
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def _rmdir(d: Path, tries: int = 50) -> bool:
    for _ in range(tries):
        try:
            os.rmdir(d)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY:
                return False
            time.sleep(0.02)
    return False
