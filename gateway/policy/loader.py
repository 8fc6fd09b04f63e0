"""Load policy files (YAML holding CEL) into a compiled PolicySet.

Every problem is reported with its file, line and column (1-based); one bad
expression rejects the whole set, so a partially loaded policy never enforces.
The only I/O here is reading the files; compilation itself is pure.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway import celexpr
from gateway.policy.canonical import canonical_policy, fingerprint_of
from gateway.policy.engine import CompiledPolicy, CompiledRule, PolicySet

POLICY_SUFFIXES = (".yaml", ".yml")
TEST_SUFFIXES = (".test.yaml", ".test.yml", "_test.yaml", "_test.yml")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")
API_VERSION = "egress/v1"

POLICY_KEYS = {"apiVersion", "kind", "name", "description", "mode", "selector", "rules"}
RULE_KEYS = {"name", "action", "when", "reason", "allow_internal", "description", "inject"}
INJECT_KEYS = {"headers", "placeholders", "allow_plaintext"}
MODES = ("enforce", "shadow")
ACTIONS = ("allow", "deny")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class PolicyLoadError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        first = str(problems[0]) if problems else "invalid policy set"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(first + more)


def policy_files(directory: Path) -> list[Path]:
    """The policy files of a directory, in name order (tests excluded)."""
    files = []
    for p in sorted(directory.iterdir(), key=lambda p: p.name):
        if not p.is_file() or not p.name.endswith(POLICY_SUFFIXES):
            continue
        if p.name.endswith(TEST_SUFFIXES) or p.name.startswith("."):
            continue
        files.append(p)
    return files


def load_directory(directory: str | Path, engine=None) -> PolicySet:
    """Load and compile every policy file in ``directory``.

    Raises PolicyLoadError listing every problem found (all files are checked).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PolicyLoadError([Problem(str(directory), 0, 0, "policy directory does not exist")])
    sources = []
    for path in policy_files(directory):
        try:
            sources.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            raise PolicyLoadError([Problem(str(path), 0, 0, f"cannot read: {e}")]) from None
    return compile_sources(sources, engine=engine)


def version_of(sources: list[tuple[str, str]]) -> str:
    """A content hash of the policy set: file base names and contents."""
    h = hashlib.sha256()
    for name, text in sources:
        h.update(Path(name).name.encode() + b"\0" + text.encode() + b"\0")
    return "sha256:" + h.hexdigest()[:16]


def compile_sources(sources: list[tuple[str, str]], engine=None) -> PolicySet:
    """Compile (file name, text) pairs, in the given order."""
    engine = engine or celexpr.RustEngine()
    problems: list[Problem] = []
    policies: list[CompiledPolicy] = []
    seen: dict[str, str] = {}
    for name, text in sources:
        for pol in _load_file(name, text, engine, problems):
            if pol.name in seen:
                problems.append(Problem(name, pol.line, 1,
                                        f"policy name {pol.name!r} is already used in {seen[pol.name]}"))
                continue
            seen[pol.name] = name
            policies.append(pol)
    if problems:
        raise PolicyLoadError(problems)
    ps = PolicySet(policies, version=version_of(sources), engine=engine, files=[n for n, _ in sources])
    try:
        ps.fingerprint, ps.policy_fingerprints = fingerprints(sources)
    except Exception as e:  # pragma: no cover - the sources loaded above; never let a reload fail open or crash
        raise PolicyLoadError([Problem(sources[0][0] if sources else "", 0, 0,
                                       f"cannot compute the policy fingerprint: {e}")]) from None
    return ps


def canonical_documents(sources: list[tuple[str, str]]) -> list[dict]:
    """Every policy of the (already valid) sources in canonical form, in set order."""
    out = []
    for _name, text in sources:
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict):
                out.append(canonical_policy(doc))
    return out


def fingerprints(sources: list[tuple[str, str]]) -> tuple[str, dict[str, str]]:
    """The set's fingerprint and each policy's (gateway.policy.canonical)."""
    docs = canonical_documents(sources)
    return fingerprint_of(docs), {str(d["name"]): fingerprint_of([d]) for d in docs}


# ---------------------------------------------------------------------------


class _Node:
    """A YAML node with its position, converted lazily."""


def _scalar_value(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _load_file(name: str, text: str, engine, problems: list[Problem]) -> list[CompiledPolicy]:
    try:
        docs = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        col = mark.column + 1 if mark else 1
        problems.append(Problem(name, line, col, f"invalid YAML: {getattr(e, 'problem', e)}"))
        return []
    # Split the way YAML breaks lines (str.splitlines also breaks on \v, \f...)
    lines = _LINE_BREAK.split(text)
    out = []
    for doc in docs:
        if doc is None:
            continue
        try:
            pol = _load_policy(name, doc, lines, engine, problems)
        except yaml.YAMLError as e:  # e.g. a tag SafeLoader cannot construct (!foo "x")
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            problems.append(Problem(name, mark.line + 1 if mark else 1, mark.column + 1 if mark else 1,
                                    f"invalid YAML: {getattr(e, 'problem', None) or e}"))
            continue
        if pol is not None:
            out.append(pol)
    return out


def _pos(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _mapping(name: str, node: yaml.Node, what: str, allowed: set[str] | None,
             problems: list[Problem]) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
    if not isinstance(node, yaml.MappingNode):
        problems.append(Problem(name, *_pos(node), f"{what} must be a mapping"))
        return None
    out = {}
    for k, v in node.value:
        key = k.value if isinstance(k, yaml.ScalarNode) else None
        if allowed is None and key is None:
            problems.append(Problem(name, *_pos(k), f"keys of {what} must be strings"))
            continue
        if allowed is not None and key not in allowed:
            problems.append(Problem(name, *_pos(k), f"unknown key {key!r} in {what} "
                                                     f"(expected one of: {', '.join(sorted(allowed))})"))
            continue
        if key in out:
            problems.append(Problem(name, *_pos(k), f"duplicate key {key!r} in {what}"))
            continue
        out[key] = (k, v)
    return out


def _string(name: str, node: yaml.Node, what: str, problems: list[Problem]) -> str | None:
    if not isinstance(node, yaml.ScalarNode):
        problems.append(Problem(name, *_pos(node), f"{what} must be a string"))
        return None
    value = _scalar_value(node)
    if isinstance(value, bool) and what.endswith("expression"):
        return "true" if value else "false"
    if not isinstance(value, str):
        problems.append(Problem(name, *_pos(node), f"{what} must be a string, got {type(value).__name__}"))
        return None
    return value


_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")
_ESCAPE_LENGTH = {"x": 4, "u": 6, "U": 10}


def _value_positions(node: yaml.ScalarNode, lines: list[str], value: str) -> list[tuple[int, int]] | None:
    """The 0-based (line, column) in the file of each character of ``value``
    (the scalar's text after YAML processing), plus one for its end.

    Walks the source from the node's start, skipping what YAML removes
    (quotes, indentation, folded line breaks, escape sequences). Returns None
    if the source and the value cannot be aligned.
    """
    style = node.style
    li, ci = node.start_mark.line, node.start_mark.column
    if style in ('"', "'"):
        ci += 1
    elif style in ("|", ">"):
        li, ci = li + 1, 0  # content starts on the line after the indicator
    out: list[tuple[int, int]] = []
    for v in value:
        while True:
            if li >= len(lines):
                return None
            line = lines[li]
            s = line[ci] if ci < len(line) else "\n"
            if style == '"' and s == "\\":
                nxt = line[ci + 1] if ci + 1 < len(line) else "\n"
                if nxt == "\n":  # escaped line break: contributes nothing
                    li, ci = li + 1, 0
                    continue
                out.append((li, ci))
                ci += _ESCAPE_LENGTH.get(nxt, 2)
                break
            if style == "'" and s == "'" and line[ci + 1:ci + 2] == "'":
                out.append((li, ci))
                ci += 2
                break
            if s == v or (v == " " and s == "\n"):  # a folded line break reads as a space
                out.append((li, ci))
                li, ci = (li + 1, 0) if s == "\n" else (li, ci + 1)
                break
            if s in " \t\n":
                li, ci = (li + 1, 0) if s == "\n" else (li, ci + 1)
                continue
            return None
    out.append((li, ci))
    return out


def _expr_position(node: yaml.ScalarNode, lines: list[str], eline: int, ecol: int,
                   source: str | None = None) -> tuple[int, int]:
    """Map a 1-based (line, column) inside an expression to the file."""
    if source is not None:
        positions = _value_positions(node, lines, source)
        if positions is not None:
            expr_lines = source.split("\n")
            eline = max(1, min(eline, len(expr_lines)))
            offset = sum(len(x) + 1 for x in expr_lines[:eline - 1]) + max(ecol, 1) - 1
            li, ci = positions[min(offset, len(positions) - 1)]
            return li + 1, ci + 1
    # Fallback: exact for single-line scalars without escapes.
    line0, col0 = node.start_mark.line, node.start_mark.column
    style = node.style
    if style in ("|", ">"):
        first = line0 + 1  # content starts on the line after the indicator
        idx = first + eline - 1
        indent = 0
        if 0 <= first < len(lines):
            indent = len(lines[first]) - len(lines[first].lstrip(" "))
        return idx + 1, indent + ecol
    if eline == 1:
        return line0 + 1, col0 + ecol + (1 if style in ('"', "'") else 0)
    return line0 + eline, ecol


def _compile_expr(name: str, node: yaml.Node, what: str, lines, engine,
                  problems: list[Problem]):
    source = _string(name, node, what, problems)
    if source is None:
        return None, None
    if not source.strip():
        problems.append(Problem(name, *_pos(node), f"{what} is empty"))
        return None, None
    try:
        tree = celexpr.parse(source)
        compiled = engine.compile(source, tree)
    except celexpr.CelCompileError as e:
        line, col = _expr_position(node, lines, e.line, e.column, source)
        problems.append(Problem(name, line, col, f"{what}: {e.message}"))
        return None, None
    return compiled, tree


def _load_policy(name: str, doc: yaml.Node, lines, engine, problems: list[Problem]):
    n_before = len(problems)
    m = _mapping(name, doc, "policy", POLICY_KEYS, problems)
    if m is None:
        return None
    line, column = _pos(doc)
    if "apiVersion" in m:
        v = _string(name, m["apiVersion"][1], "apiVersion", problems)
        if v is not None and v != API_VERSION:
            problems.append(Problem(name, *_pos(m["apiVersion"][1]),
                                    f"unsupported apiVersion {v!r} (expected {API_VERSION!r})"))
    if "kind" in m:
        v = _string(name, m["kind"][1], "kind", problems)
        if v is not None and v != "Policy":
            problems.append(Problem(name, *_pos(m["kind"][1]), f"unsupported kind {v!r} (expected 'Policy')"))
    for required in ("name", "selector", "rules"):
        if required not in m:
            problems.append(Problem(name, line, column, f"policy is missing required key {required!r}"))
    pname = None
    if "name" in m:
        pname = _string(name, m["name"][1], "policy name", problems)
        if pname is not None and not NAME_RE.match(pname):
            problems.append(Problem(name, *_pos(m["name"][1]),
                                    f"policy name {pname!r} must be lowercase letters, digits, '.', '_' or '-'"))
    mode = "enforce"
    if "mode" in m:
        mode = _string(name, m["mode"][1], "mode", problems) or "enforce"
        if mode not in MODES:
            problems.append(Problem(name, *_pos(m["mode"][1]), f"mode must be one of {', '.join(MODES)}, got {mode!r}"))
    description = ""
    if "description" in m:
        description = _string(name, m["description"][1], "description", problems) or ""
    selector = selector_tree = None
    if "selector" in m:
        selector, selector_tree = _compile_expr(name, m["selector"][1], "selector expression", lines, engine, problems)
    rules: list[CompiledRule] = []
    if "rules" in m:
        rnode = m["rules"][1]
        if not isinstance(rnode, yaml.SequenceNode) or not rnode.value:
            problems.append(Problem(name, *_pos(rnode), "rules must be a non-empty list"))
        else:
            names = set()
            for i, item in enumerate(rnode.value):
                r = _load_rule(name, item, i, lines, engine, problems)
                if r is None:
                    continue
                if r.name in names:
                    problems.append(Problem(name, *_name_pos(item),
                                            f"rule name {r.name!r} is used twice in this policy"))
                names.add(r.name)
                rules.append(r)
    if len(problems) > n_before or pname is None:
        return None
    return CompiledPolicy(name=pname, file=name, line=line, mode=mode, description=description,
                          selector=selector, selector_tree=selector_tree, rules=rules)


def _name_pos(node: yaml.Node) -> tuple[int, int]:
    """Where a mapping's ``name`` value is (else where the mapping starts)."""
    for k, v in getattr(node, "value", ()):
        if isinstance(k, yaml.ScalarNode) and k.value == "name":
            return _pos(v)
    return _pos(node)


def _load_rule(name: str, node: yaml.Node, index: int, lines, engine, problems: list[Problem]):
    n_before = len(problems)
    m = _mapping(name, node, "rule", RULE_KEYS, problems)
    if m is None:
        return None
    line, column = _pos(node)
    rname = f"rule-{index + 1}"
    if "name" in m:
        rname = _string(name, m["name"][1], "rule name", problems) or rname
        if not NAME_RE.match(rname):
            problems.append(Problem(name, *_pos(m["name"][1]),
                                    f"rule name {rname!r} must be lowercase letters, digits, '.', '_' or '-'"))
    action = None
    if "action" not in m:
        problems.append(Problem(name, line, column, "rule is missing required key 'action'"))
    else:
        action = _string(name, m["action"][1], "action", problems)
        if action is not None and action not in ACTIONS:
            problems.append(Problem(name, *_pos(m["action"][1]), f"action must be allow or deny, got {action!r}"))
    when = tree = None
    if "when" not in m:
        problems.append(Problem(name, line, column,
                                "rule is missing required key 'when' (use 'true' to match everything)"))
    else:
        when, tree = _compile_expr(name, m["when"][1], "when expression", lines, engine, problems)
    reason = ""
    if "reason" in m:
        reason = _string(name, m["reason"][1], "reason", problems) or ""
    internal: list[ipaddress._BaseNetwork] = []
    if "allow_internal" in m:
        inode = m["allow_internal"][1]
        if action == "deny":
            problems.append(Problem(name, *_pos(inode), "allow_internal only makes sense on an allow rule"))
        if not isinstance(inode, yaml.SequenceNode):
            problems.append(Problem(name, *_pos(inode), "allow_internal must be a list of CIDR ranges"))
        else:
            for item in inode.value:
                s = _string(name, item, "allow_internal entry", problems)
                if s is None:
                    continue
                try:
                    internal.append(ipaddress.ip_network(s, strict=True))
                except ValueError as e:
                    problems.append(Problem(name, *_pos(item), f"invalid CIDR range {s!r}: {e}"))
    injection = None
    if "inject" in m:
        inode = m["inject"][1]
        if action == "deny":
            problems.append(Problem(name, *_pos(inode), "inject only makes sense on an allow rule"))
        injection = _load_inject(name, inode, problems)
    if len(problems) > n_before:
        return None
    return CompiledRule(name=rname, action=action, when=when, tree=tree, reason=reason,
                        allow_internal=tuple(internal), line=line, inject=injection)


def _load_inject(name: str, node: yaml.Node, problems: list[Problem]):
    from gateway.secrets import inject as inj
    from gateway.secrets.refs import RefError, parse_ref, parse_template

    n_before = len(problems)
    m = _mapping(name, node, "inject", INJECT_KEYS, problems)
    if m is None:
        return None
    headers, placeholders, plaintext = [], [], False
    if "headers" in m:
        hm = _mapping(name, m["headers"][1], "inject.headers", None, problems)
        for hname, (knode, vnode) in (hm or {}).items():
            h = hname.lower()
            if not inj.HEADER_NAME_RE.fullmatch(h) or h in inj.FORBIDDEN_HEADERS:
                problems.append(Problem(name, *_pos(knode), f"cannot inject header {hname!r}"))
                continue
            text = _string(name, vnode, f"inject.headers.{hname}", problems)
            if text is None:
                continue
            try:
                t = parse_template(text)
            except RefError as e:
                line, col = _pos(vnode)
                problems.append(Problem(name, line, col + e.column - 1 + _quote_offset(vnode), e.message))
                continue
            headers.append((h, t))
    if "placeholders" in m:
        pm = _mapping(name, m["placeholders"][1], "inject.placeholders", None, problems)
        for alias, (knode, vnode) in (pm or {}).items():
            if not inj.ALIAS_RE.fullmatch(alias):
                problems.append(Problem(name, *_pos(knode), f"placeholder alias {alias!r} must be lowercase "
                                                            "letters, digits, '.', '_' or '-'"))
                continue
            text = _string(name, vnode, f"inject.placeholders.{alias}", problems)
            if text is None:
                continue
            try:
                placeholders.append((alias, parse_ref(text)))
            except RefError as e:
                line, col = _pos(vnode)
                problems.append(Problem(name, line, col + e.column - 1 + _quote_offset(vnode), e.message))
    if "allow_plaintext" in m:
        v = m["allow_plaintext"][1]
        if not (isinstance(v, yaml.ScalarNode) and v.tag.endswith(":bool")):
            problems.append(Problem(name, *_pos(v), "allow_plaintext must be true or false"))
        else:
            plaintext = v.value.lower() == "true"
    if not headers and not placeholders and len(problems) == n_before:
        problems.append(Problem(name, *_pos(node), "inject needs headers or placeholders"))
    return inj.Injection(tuple(headers), tuple(placeholders), plaintext)


def _quote_offset(node: yaml.Node) -> int:
    return 1 if getattr(node, "style", None) in ("'", '"') else 0
