"""The one interface every sandbox tier implements.

sandboxd (the daemon, its API and its reaper) drives sandboxes only through
``Backend``; a tier (``namespace``: bubblewrap + network namespace + cgroup
limits; ``isolate``: V8 isolates; later ``microvm``) is one implementation. The
daemon owns identity, state transitions and snapshots' bookkeeping; a backend
owns the resources of its sandboxes.

Conventions:
- Every method may raise ``TierError`` with a clear one-line message; the daemon
  turns it into an API error. A backend never leaves half-created resources
  behind when ``create`` or ``resume`` fails: it cleans up, then raises.
- ``exec`` streams output through ``on_output(stream, data)`` as it comes
  (stream is "stdout" or "stderr"), and returns when the command ends or its
  timeout passes (then the command is killed and ``timed_out`` is True).
- ``sleep`` writes everything the sandbox needs to come back (its workspace
  files; an isolate's persisted state) under ``snapshot_dir`` and releases
  every resource; ``resume`` brings it back from there. Identity is the
  daemon's: it is passed in ``Egress`` at create and resume.
- ``adopt_or_clean`` is called once at daemon start with the ids the daemon's
  state file knows: a backend removes whatever it finds of sandboxes not in
  that set (namespaces, processes, mounts, cgroups a crashed predecessor left)
  and returns the ids it found alive and could adopt.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping


class TierError(Exception):
    """A tier operation failed; the message is for the API caller."""


@dataclass(frozen=True)
class Limits:
    cpu_millicores: int = 1000  # 1000 = one core
    memory_mb: int = 512
    pids: int = 256
    exec_timeout_s: float = 60.0  # default per exec call (an exec may ask for less)


@dataclass(frozen=True)
class Egress:
    """How the sandbox reaches the world: only through the gateway, as itself."""
    proxy_host: str  # the gateway's proxy address as seen from the sandbox
    proxy_port: int
    token: str = ""  # the sandbox's identity token (explicit proxy credentials); never logged
    ca_cert: Path | None = None  # the gateway CA the sandbox must trust
    transparent_port: int = 0  # the gateway's transparent listener, 0: none
    dns_port: int = 0  # the gateway's DNS answerer, 0: none


@dataclass(frozen=True)
class SandboxSpec:
    id: str  # assigned by the daemon: lower-case letters, digits and '-', <= 40 chars
    tenant: str
    agent: str
    labels: Mapping[str, str] = field(default_factory=dict)
    tier: str = "namespace"
    limits: Limits = Limits()


@dataclass
class ExecResult:
    exit_code: int
    timed_out: bool = False
    duration_s: float = 0.0


OutputCallback = Callable[[str, bytes], None]


class Backend(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec, egress: Egress) -> None:
        """Make the sandbox ready to run code (or raise TierError, leaving nothing behind)."""

    @abc.abstractmethod
    async def exec(self, sandbox_id: str, command: list[str] | str, *, timeout_s: float,
                   on_output: OutputCallback, stdin: bytes | None = None,
                   env: Mapping[str, str] | None = None) -> ExecResult:
        """Run a command (a program and its arguments; an isolate: JavaScript source)."""

    @abc.abstractmethod
    async def put_file(self, sandbox_id: str, path: str, data: bytes) -> None:
        """Write a file under the sandbox's workspace (path relative to it; no escaping it)."""

    @abc.abstractmethod
    async def get_file(self, sandbox_id: str, path: str) -> bytes:
        ...

    @abc.abstractmethod
    async def list_files(self, sandbox_id: str, path: str = ".") -> list[dict]:
        """Entries under path: {"path", "size", "type": "file"|"dir"}."""

    @abc.abstractmethod
    async def sleep(self, sandbox_id: str, snapshot_dir: Path) -> None:
        """Save what resume needs under snapshot_dir, then release every resource."""

    @abc.abstractmethod
    async def resume(self, spec: SandboxSpec, egress: Egress, snapshot_dir: Path) -> None:
        """Bring a slept sandbox back from snapshot_dir."""

    @abc.abstractmethod
    async def destroy(self, sandbox_id: str) -> None:
        """Release everything; idempotent (destroying an unknown id is not an error)."""

    @abc.abstractmethod
    async def adopt_or_clean(self, known_ids: set[str]) -> set[str]:
        """At daemon start: clean up leftovers of unknown sandboxes; return the ids adopted."""
