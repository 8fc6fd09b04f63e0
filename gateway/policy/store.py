"""Holds the active PolicySet and swaps it atomically on reload.

A reload that fails keeps the last good set and records why; the gateway keeps
enforcing the old policies rather than running with none. Change detection polls
the directory (names, sizes, mtimes), so no inotify dependency is needed.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gateway.policy.engine import PolicySet, empty_policy_set
from gateway.policy.loader import POLICY_SUFFIXES, TEST_SUFFIXES, PolicyLoadError, load_directory

log = logging.getLogger("egress.policy")


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    version: str
    changed: bool
    problems: tuple[str, ...] = ()
    trigger: str = "manual"

    def to_dict(self) -> dict:
        return {"ok": self.ok, "version": self.version, "changed": self.changed,
                "problems": list(self.problems), "trigger": self.trigger}


class PolicyStore:
    def __init__(self, directory: str | Path, engine=None,
                 on_reload: Callable[[ReloadResult], None] | None = None):
        self.directory = Path(directory)
        self.engine = engine
        self.current: PolicySet = empty_policy_set(engine)
        self.loaded = False
        self.last_result: ReloadResult | None = None
        self.last_error: tuple[str, ...] = ()
        self._fingerprint: tuple = ()
        self._on_reload = on_reload

    def _dir_fingerprint(self) -> tuple:
        """(name, size, mtime) of every policy file: one stat per file, cheap
        enough to run on the event loop every couple of seconds."""
        try:
            out = []
            with os.scandir(self.directory) as it:
                for e in it:
                    n = e.name
                    if not n.endswith(POLICY_SUFFIXES) or n.endswith(TEST_SUFFIXES) or n.startswith("."):
                        continue
                    st = e.stat()
                    if stat.S_ISREG(st.st_mode):
                        out.append((n, st.st_size, st.st_mtime_ns))
            return tuple(sorted(out))
        except OSError as e:
            return (("<error>", str(e)),)

    def changed(self) -> bool:
        """Whether the directory differs from what was last loaded (no I/O but stats)."""
        return self._dir_fingerprint() != self._fingerprint

    def load_initial(self) -> PolicySet:
        """Load at start-up; raises PolicyLoadError so the caller can refuse to start."""
        fp = self._dir_fingerprint()
        ps = load_directory(self.directory, engine=self.engine)
        self.current, self.loaded, self._fingerprint = ps, True, fp
        self.last_result = ReloadResult(True, ps.version, True, trigger="startup")
        return ps

    def reload(self, trigger: str = "manual") -> ReloadResult:
        fp = self._dir_fingerprint()
        try:
            ps = load_directory(self.directory, engine=self.engine)
        except PolicyLoadError as e:
            self._fingerprint = fp  # do not retry the same broken content in a loop
            problems = tuple(str(p) for p in e.problems)
            self.last_error = problems
            result = ReloadResult(False, self.current.version, False, problems, trigger)
            log.error("policy reload failed (%s), keeping version %s: %s", trigger,
                      self.current.version, problems[0] if problems else "")
        else:
            changed = ps.version != self.current.version
            if changed:
                self.current = ps  # one reference assignment: atomic for readers
            self.loaded = True
            self._fingerprint = fp
            self.last_error = ()
            result = ReloadResult(True, ps.version, changed, (), trigger)
            log.info("policy reload (%s): version %s%s", trigger, ps.version, "" if changed else " (unchanged)")
        self.last_result = result
        if self._on_reload is not None:
            self._on_reload(result)
        return result

    def poll(self) -> ReloadResult | None:
        """Reload if the directory changed since the last load attempt."""
        fp = self._dir_fingerprint()
        if fp == self._fingerprint:
            return None
        # Let editors finish writing: re-check after a short pause.
        time.sleep(0.05)
        if self._dir_fingerprint() != fp:
            return None
        return self.reload(trigger="file-change")
