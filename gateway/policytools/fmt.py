"""``egress policy fmt``: canonical formatting of policy files, keeping comments.

The canonical layout: keys in a fixed order (policy: apiVersion, kind, name,
description, mode, selector, rules; rule: name, description, action, when,
reason, allow_internal, inject; inject: headers, placeholders,
allow_plaintext), two-space indentation with list items indented under their
key, one blank-line-free document per policy separated by ``---``, a final
newline. Expressions and other strings are not rewritten (their quoting is
kept), and comments stay where they were. Formatting never changes what a
policy means: the set's fingerprint (gateway.policy.canonical) is the same
before and after, and ``fmt`` refuses files that do not load.
"""

from __future__ import annotations

import difflib
import io
import sys
from pathlib import Path

from gateway.policy.canonical import INJECT_KEY_ORDER, POLICY_KEY_ORDER, RULE_KEY_ORDER

EPILOG = """examples:
  egress policy fmt policies/             rewrite the files that are not in canonical form
  egress policy fmt --check policies/     CI: list them and show the diff, change nothing
  egress policy fmt --diff policies/acme.yaml

Files that do not load (see `egress policy check`) are left alone and reported.
Test files (*.test.yaml, *_test.yaml) are not touched.

exit status: 0 nothing to change (or changed, without --check), 1 --check found files to
change, 2 bad input (a file does not parse or the set does not load)"""


def _yaml():
    from ruamel.yaml import YAML
    y = YAML(typ="rt")
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 4096  # never re-wrap expressions
    y.preserve_quotes = True
    y.explicit_start = False
    return y


def _reorder(m, order: tuple[str, ...]) -> None:
    """Put the known keys of a ruamel CommentedMap in ``order`` (unknown keys keep
    their relative order after them); comments stay attached to their keys."""
    if not hasattr(m, "move_to_end"):
        return
    keys = list(m.keys())
    known = [k for k in order if k in m]
    rest = [k for k in keys if k not in order]
    for k in known + rest:
        m.move_to_end(k)


def format_text(text: str) -> str:
    """The canonical text of one policy file (raises ValueError if it is not YAML)."""
    from ruamel.yaml.error import YAMLError
    y = _yaml()
    try:
        docs = [d for d in y.load_all(text)]
    except YAMLError as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else "not valid YAML") from None
    for d in docs:
        if not hasattr(d, "keys"):
            continue
        _reorder(d, POLICY_KEY_ORDER)
        for r in d.get("rules") or []:
            if hasattr(r, "keys"):
                _reorder(r, RULE_KEY_ORDER)
                inj = r.get("inject")
                if hasattr(inj, "keys"):
                    _reorder(inj, INJECT_KEY_ORDER)
    buf = io.StringIO()
    if len(docs) == 1:
        y.dump(docs[0], buf)
    else:
        y.explicit_start = True
        y.dump_all(docs, buf)
    out = buf.getvalue()
    out = "\n".join(line.rstrip() for line in out.splitlines()) + "\n"
    if y.explicit_start and not text.lstrip().startswith("---"):
        out = out[4:] if out.startswith("---\n") else out  # keep a leading "---" only if there was one
    return out


def plan(directory: Path) -> list[tuple[Path, str, str]]:
    """(file, current text, canonical text) for every policy file of ``directory``."""
    from gateway.policy.loader import policy_files
    out = []
    for p in policy_files(directory):
        text = p.read_text(encoding="utf-8")
        out.append((p, text, format_text(text)))
    return out


def cmd_fmt(args) -> int:
    from gateway.clierror import CliError
    from gateway.policy.loader import PolicyLoadError, compile_sources, load_directory, policy_files

    paths = [Path(p) for p in args.paths]
    targets: list[Path] = []
    for p in paths:
        if p.is_dir():
            targets.extend(policy_files(p))
        elif p.is_file():
            targets.append(p)
        else:
            raise CliError(f"{p}: no such file or directory")
    if not targets:
        raise CliError(f"no policy files in {', '.join(map(str, paths))}")
    changed = 0
    for f in targets:
        text = f.read_text(encoding="utf-8")
        try:
            new = format_text(text)
        except ValueError as e:
            raise CliError(f"{f}: {e}") from None
        if new == text:
            continue
        # never write a file whose meaning would change (or that does not load)
        try:
            before = compile_sources([(str(f), text)])
            after = compile_sources([(str(f), new)])
        except PolicyLoadError as e:
            for prob in e.problems:
                print(prob, file=sys.stderr)
            raise CliError(f"{f} does not load; fix it first (egress policy check)") from None
        if before.fingerprint != after.fingerprint:  # pragma: no cover - a formatter bug
            raise CliError(f"{f}: formatting would change its meaning ({before.fingerprint} -> "
                           f"{after.fingerprint}); file left unchanged, please report this")
        changed += 1
        if args.check or args.diff:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                       f"{f}", f"{f} (formatted)"))
        if not args.check and not args.diff:
            tmp = f.with_name(f".{f.name}.fmt-tmp")
            tmp.write_text(new, encoding="utf-8")
            tmp.replace(f)
            print(f"formatted {f}", file=sys.stderr)
    for p in paths:  # the whole set still loads (and keeps its meaning) after the rewrite
        if p.is_dir() and not args.check and not args.diff and changed:
            try:
                load_directory(p)
            except PolicyLoadError as e:  # pragma: no cover - guarded per file above
                raise CliError(f"{p} no longer loads after formatting: {e.problems[0]}") from None
    word = "would change" if (args.check or args.diff) else "changed"
    print(f"{changed} of {len(targets)} file(s) {word}", file=sys.stderr)
    return 1 if (args.check and changed) else 0


def register(policy_subparsers, fmt) -> None:
    p = policy_subparsers.add_parser("fmt", formatter_class=fmt, help="format policy files canonically (keeps comments)",
                                     description=__doc__.split("\n\n")[1].replace("\n", " "), epilog=EPILOG)
    p.add_argument("paths", nargs="+", metavar="PATH", help="policy directories or files")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if any file is not formatted")
    p.add_argument("--diff", action="store_true", help="print the changes as a unified diff instead of writing")
    p.set_defaults(func=cmd_fmt)
