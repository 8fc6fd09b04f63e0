"""The policy authoring toolchain: ``egress policy test|explain|lint|replay``.

Each module here registers one ``egress policy`` sub-command (``register``) and
keeps its logic as plain functions over the compiled policy set
(gateway.policy.engine), so the gateway, the tests and these tools decide with
the same engine code.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from gateway.clierror import CliError

COMMANDS = ("ptest", "explain", "lint", "replay", "fmt")


def register_all(policy_subparsers, fmt) -> None:
    for name in COMMANDS:
        importlib.import_module(f"gateway.policytools.{name}").register(policy_subparsers, fmt)


def load_policy_set(directory: str, engine: str = "rust", *, code: int = 1):
    """Load a policy directory for a command: each problem on stderr with its
    file:line:column, then one CliError with exit status ``code``."""
    from gateway import celexpr
    from gateway.policy.loader import PolicyLoadError, load_directory

    if not Path(directory).is_dir():
        raise CliError(f"{directory} is not a directory")
    try:
        return load_directory(directory, engine=celexpr.make_engine(engine))
    except PolicyLoadError as e:
        for p in e.problems:
            print(f"{p}", file=sys.stderr)
        raise CliError(f"{len(e.problems)} problem(s) in {directory}", code) from None
