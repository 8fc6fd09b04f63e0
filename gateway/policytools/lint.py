"""``egress policy lint DIR``: compiler-style diagnostics for a policy directory.

The checks live in gateway.policytools.lint_checks; this module renders the
findings (text with the source line and a caret under the spot, JSON, or
SARIF 2.1.0 for code-scanning tools) and decides the exit status:

* 0: no finding at or above ``--fail-on`` (default ``error``: warnings are
  shown but do not fail; ``--fail-on warning`` fails on them too);
* 1: at least one finding at or above ``--fail-on``;
* 2: bad input (the directory does not exist, the secret store is unreadable).

Secret references are only ever shown by name (``local:github/token``); no
value is read or printed. ``--secrets`` checks that the names resolve: local:
names against the local store of ``--state-dir`` (its names are stored in the
clear, so the store key is not needed), env: names in this environment, file:
paths on this machine. vault: references are not contacted from the linter
(``egress secret check`` resolves them through Vault).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from urllib.parse import quote

from gateway.policytools.lint_checks import (
    CHECKS, ERROR, SEVERITIES, WARNING, Finding, LintResult, lint_directory,
)

DEFAULT_DIRECTORY = str(Path(__file__).resolve().parent.parent.parent / "policies" / "default")
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_RANK = {WARNING: 1, ERROR: 2}

EPILOG = """\
examples:
  egress policy lint policies/default
  egress policy lint policies/acme --fail-on warning          # CI: warnings fail the build too
  egress policy lint policies/acme --format sarif > lint.sarif  # upload to code scanning
  egress policy lint policies/acme --secrets --state-dir .state  # local: names must exist

Silence one finding on purpose with a comment on the rule (or policy) it is
about, saying why:
  # egress-lint: ignore EG501 - the demo tenant browses the public web on purpose

exit status: 0 no finding at or above --fail-on, 1 some, 2 bad input"""


def register(policy_subparsers, fmt) -> None:
    p = policy_subparsers.add_parser(
        "lint", formatter_class=fmt, help="find mistakes in a policy directory (for CI and code review)",
        description="Report every problem of a policy directory with its file:line:column: what the\n"
                    "loader rejects, unknown fields (with did-you-mean), type misuse, rules that can never\n"
                    "match or are beaten by a deny, allows that reach every host or tenant, conflicting\n"
                    "credential injection, unresolved secret names, and constructs the CEL engines\n"
                    "disagree on. Codes and fixes: docs/policy-tools.md (egress policy lint).",
        epilog=EPILOG)
    p.add_argument("directory", nargs="?", default=DEFAULT_DIRECTORY,
                   help="policy directory (default: the bundled policies/default)")
    p.add_argument("--format", choices=("text", "json", "sarif"), default="text",
                   help="text (with source and caret, default), json, or sarif (SARIF 2.1.0)")
    p.add_argument("--fail-on", choices=("error", "warning"), default="error",
                   help="lowest severity that makes the exit status 1 (default: error)")
    p.add_argument("--engine", choices=("rust", "python"), default="rust",
                   help="CEL engine that compiles the expressions (default: rust)")
    p.add_argument("--secrets", action="store_true",
                   help="check that secret reference names resolve (local: in --state-dir's store, env:, file:)")
    p.add_argument("--state-dir", default=None,
                   help="gateway state dir holding the local secret store (implies --secrets; "
                        "default .state or $EGRESS_STATE_DIR)")
    p.set_defaults(func=cmd_policy_lint)


# ---------------------------------------------------------------------------


class BadInput(Exception):
    pass


def local_secret_names(state_dir: str | Path) -> set[str]:
    """Names in the local store (never values; no key is read or created)."""
    from gateway.secrets.local import LocalStore, StoreError

    # LocalStore() would create a key when there is none: only its reader is used here.
    store = LocalStore.__new__(LocalStore)
    store.dir = Path(state_dir) / "secrets"
    store.path = store.dir / "store.json"
    try:
        return set(store.names())
    except StoreError as e:
        raise BadInput(str(e)) from None


def secret_checker(state_dir: str | Path):
    names = local_secret_names(state_dir)
    store = Path(state_dir) / "secrets" / "store.json"

    def check(ref) -> str | None:
        if ref.scheme == "local":
            return None if ref.name in names else f"no secret of that name in the local store {store}"
        if ref.scheme == "env":
            return None if os.environ.get(ref.name) else "the environment variable is not set here"
        if ref.scheme == "file":
            return None if Path(ref.name).is_file() else "no such file here"
        return None  # vault: resolved by `egress secret check`, not by the linter
    return check


def run(directory: str, engine: str = "rust", secrets: bool = False, state_dir: str | None = None) -> LintResult:
    if not Path(directory).is_dir():
        raise BadInput(f"{directory} is not a directory")
    check = None
    if secrets or state_dir is not None:
        check = secret_checker(state_dir or os.environ.get("EGRESS_STATE_DIR", ".state"))
    return lint_directory(directory, engine=engine, secret_check=check)


def failed(result: LintResult, fail_on: str) -> bool:
    return any(_RANK[f.severity] >= _RANK[fail_on] for f in result.findings)


def cmd_policy_lint(args) -> int:
    try:
        result = run(args.directory, args.engine, args.secrets, args.state_dir)
    except BadInput as e:
        print(f"egress: error: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        out = render_json(result, args.directory, args.engine, args.fail_on)
    elif args.format == "sarif":
        out = json.dumps(render_sarif(result, args.directory), indent=1) + "\n"
    else:
        out = render_text(result, args.directory)
    sys.stdout.write(out)
    return 1 if failed(result, args.fail_on) else 0


# ---------------------------------------------------------------------------
# text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render_finding(f: Finding, lines: list[str] | None) -> str:
    """One finding the way rustc shows a diagnostic: the source line and a caret
    under the spot (columns counted in characters; tabs kept so it lines up)."""
    out = [f"{f.severity}[{f.code}]: {f.message}"]
    if f.line <= 0:
        out.append(f"  --> {f.file}")
    else:
        out.append(f"  --> {f.file}:{f.line}:{f.column}")
        if lines is not None and 0 < f.line <= len(lines):
            src = lines[f.line - 1]
            gutter = " " * len(str(f.line))
            col = max(f.column, 1)
            if f.end_line == f.line and f.end_column > col:
                width = f.end_column - col
            elif f.end_line > f.line:
                width = max(1, len(src) - col + 1)
            else:
                width = 1
            pad = "".join("\t" if ch == "\t" else " " for ch in src[:col - 1])
            pad += " " * max(0, col - 1 - len(src))
            out += [f"{gutter} |", f"{f.line} | {src}", f"{gutter} | {pad}{'^' * width}"]
            if f.help:
                out.append(f"{gutter} = help: {f.help}")
            return "\n".join(out)
    if f.help:
        out.append(f"   = help: {f.help}")
    return "\n".join(out)


def render_text(result: LintResult, directory: str) -> str:
    parts = [render_finding(f, result.lines.get(f.file)) for f in result.findings]
    errors, warnings = result.count(ERROR), result.count(WARNING)
    summary = f"{directory}: {_plural(len(result.files), 'file')}, "
    if not result.findings:
        summary += "no findings"
    else:
        summary += f"{_plural(errors, 'error')}, {_plural(warnings, 'warning')}"
    if result.suppressed:
        summary += f" ({len(result.suppressed)} suppressed)"
    return "".join(p + "\n\n" for p in parts) + summary + "\n"


# ---------------------------------------------------------------------------
# json


def render_json(result: LintResult, directory: str, engine: str, fail_on: str) -> str:
    doc = {
        "directory": directory,
        "engine": engine,
        "files": result.files,
        "findings": [f.to_dict() for f in result.findings],
        "summary": {"errors": result.count(ERROR), "warnings": result.count(WARNING),
                    "suppressed": len(result.suppressed)},
        "fail_on": fail_on,
        "failed": failed(result, fail_on),
    }
    return json.dumps(doc, indent=1) + "\n"


# ---------------------------------------------------------------------------
# SARIF 2.1.0


def _repo_root(start: Path) -> Path | None:
    for d in [start, *start.parents]:
        if (d / ".git").exists():
            return d
    return None


def artifact_uri(file: str, directory: str) -> str:
    """The file relative to the repository that holds the directory (what code
    scanning expects), else relative to the directory itself."""
    path = Path(file).resolve()
    base = Path(directory).resolve()
    root = _repo_root(base)
    for b in (root, base):
        if b is None:
            continue
        try:
            return quote(path.relative_to(b).as_posix())
        except ValueError:
            continue
    return quote(path.as_posix())


def render_sarif(result: LintResult, directory: str) -> dict:
    codes = sorted(CHECKS)
    index = {c: i for i, c in enumerate(codes)}
    rules = [{"id": c, "name": CHECKS[c].name, "shortDescription": {"text": CHECKS[c].summary},
              "defaultConfiguration": {"level": CHECKS[c].severity}} for c in codes]
    results = []
    for f in result.findings:
        text = f.message
        if f.help:
            text += ("" if text.endswith((".", "?", "!")) else ".") + f" Help: {f.help}"
        loc: dict = {"physicalLocation": {"artifactLocation": {"uri": artifact_uri(f.file, directory)}}}
        if f.line > 0:
            region = {"startLine": f.line, "startColumn": max(f.column, 1)}
            if f.end_line >= f.line and f.end_column > 0:
                region["endLine"] = f.end_line
                region["endColumn"] = f.end_column
            loc["physicalLocation"]["region"] = region
        r = {"ruleId": f.code, "ruleIndex": index[f.code], "level": f.severity, "message": {"text": text},
             "locations": [loc]}
        props = {k: v for k, v in (("policy", f.policy), ("rule", f.rule)) if v}
        if props:
            r["properties"] = props
        results.append(r)
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "egress policy lint", "rules": rules}},
            "columnKind": "unicodeCodePoints",
            "results": results,
        }],
    }


assert set(SEVERITIES) == set(_RANK)
