"""The checks behind ``egress policy lint``: findings over a policy directory.

The loader (gateway.policy.loader) decides what compiles; everything it
rejects becomes an error finding with the loader's position. On top of that
this module re-reads the YAML (to keep every expression's node and position),
turns each expression's cel-python Lark tree into a small AST (``N``) and runs:

* per expression: unknown variables and fields (with "did you mean"), type
  misuse (a small type inference over the documented variables), functions
  the policy language does not have, values a normalised field never takes,
  conditions that are always false, contradictory conjunctions, ``in []``,
  and the constructs on which the two CEL engines differ;
* across rules: allows that an enforcing deny always beats, allows that
  reach every host or every tenant, overlapping allows that inject different
  credentials, injection without a pinned host, and (optionally) secret
  references whose names do not resolve.

Positions are those of the file (1-based line and column, columns counted in
characters), mapped from offsets inside an expression with the loader's own
helpers, whatever the YAML style of the scalar. Nothing here ever reads a
secret value.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import lark
import yaml

from gateway import celexpr
from gateway.addresses import AddressClass
from gateway.policy import loader
from gateway.secrets.refs import RefError, SecretRef, parse_ref

ERROR = "error"
WARNING = "warning"
SEVERITIES = (ERROR, WARNING)


# ---------------------------------------------------------------------------
# The catalogue of finding codes


@dataclass(frozen=True)
class Check:
    code: str
    name: str
    severity: str
    summary: str


CHECKS: dict[str, Check] = {c.code: c for c in (
    Check("EG100", "invalid-policy", ERROR, "The policy set does not load: invalid YAML, an unknown or missing "
                                            "key, a bad name, mode, action or CIDR range."),
    Check("EG101", "expression-does-not-compile", ERROR, "A selector or when expression does not compile "
                                                         "(syntax error, invalid literal regular expression)."),
    Check("EG102", "invalid-inject", ERROR, "An inject block is invalid: a malformed secret reference or a "
                                            "header that cannot be injected."),
    Check("EG201", "unknown-variable", ERROR, "An identifier that is not a variable: evaluating it is an error."),
    Check("EG202", "unknown-field", ERROR, "A field that principal, request or destination does not have: "
                                           "evaluating it is an error."),
    Check("EG203", "variable-not-in-selector", ERROR, "A selector reads request, destination or now: "
                                                      "selectors see only principal."),
    Check("EG204", "header-name-case", WARNING, "A request header name with upper-case letters: header names are "
                                                "lower case, so it never matches."),
    Check("EG301", "type-mismatch", ERROR, "Operands of types that do not go together: a comparison that is never "
                                           "true, an operator that is an evaluation error."),
    Check("EG302", "wrong-receiver", ERROR, "A method, field or index applied to a value of the wrong type "
                                            "(request.port.startsWith(...), \"abc\"[0])."),
    Check("EG303", "unknown-function", ERROR, "A function or method the policy language does not have (or called "
                                              "with the wrong number of arguments): an evaluation error."),
    Check("EG304", "invalid-literal-argument", ERROR, "timestamp() or duration() of a literal that does not parse."),
    Check("EG401", "always-false", WARNING, "A condition or selector that is always false: the rule never "
                                            "matches, the policy never applies."),
    Check("EG402", "contradiction", WARNING, "Contradictory constraints on one field in one conjunction: it is "
                                             "never true."),
    Check("EG403", "empty-list-membership", WARNING, "x in []: always false."),
    Check("EG404", "allow-shadowed-by-deny", WARNING, "An allow rule that can never allow: an enforcing deny rule "
                                                      "matches every request it matches."),
    Check("EG405", "impossible-value", WARNING, "A field compared with a value it never takes (request.scheme is "
                                                "lower case, request.host has no upper case or trailing dot)."),
    Check("EG501", "allows-every-host", WARNING, "An allow rule whose condition does not constrain the host "
                                                 "(request.host, request.sni or destination)."),
    Check("EG502", "allows-every-tenant", WARNING, "A policy that applies to every tenant (its selector reads "
                                                   "neither principal.tenant, agent nor labels) has allow rules."),
    Check("EG601", "inject-overlap", WARNING, "Two allow rules that can match the same requests inject different "
                                              "credentials: only the first in order ever injects there."),
    Check("EG602", "secret-unresolved", ERROR, "A secret reference whose name does not resolve (--secrets)."),
    Check("EG603", "inject-any-host", ERROR, "An allow rule injects credentials but does not pin the host: the "
                                             "sandbox can send them anywhere."),
    Check("EG801", "engine-difference", WARNING, "A construct on which the rust and python CEL engines (or the CEL "
                                                 "spec) differ; see 'Known engine differences'."),
)}

# What an evaluation error does, by where it is (docs: "Errors fail closed").
_FAILS = {"allow": " (an evaluation error: this allow rule never matches)",
          "deny": " (an evaluation error: this deny rule denies every request it is evaluated for)",
          "selector": " (an evaluation error: only this policy's deny rules apply, never its allow rules)"}
EVALUATION_ERRORS = {"EG201": _FAILS, "EG202": _FAILS, "EG203": _FAILS, "EG303": _FAILS}

# Load problems cannot be suppressed: the gateway refuses such a set whatever the linter says.
UNSUPPRESSIBLE = frozenset({"EG100", "EG101", "EG102"})


@dataclass
class Finding:
    code: str
    severity: str
    file: str
    line: int
    column: int
    message: str
    end_line: int = 0
    end_column: int = 0  # exclusive; 0 when unknown
    help: str = ""
    policy: str = ""
    rule: str = ""

    @property
    def name(self) -> str:
        return CHECKS[self.code].name

    def sort_key(self):
        return (self.file, self.line, self.column, self.code, self.message)

    def to_dict(self) -> dict:
        return {"code": self.code, "name": self.name, "severity": self.severity, "file": self.file,
                "line": self.line, "column": self.column, "end_line": self.end_line,
                "end_column": self.end_column, "message": self.message, "help": self.help,
                "policy": self.policy, "rule": self.rule}


@dataclass
class LintResult:
    findings: list[Finding]
    files: list[str]
    suppressed: list[Finding] = field(default_factory=list)
    lines: dict[str, list[str]] = field(default_factory=dict)  # file -> its lines, for showing sources

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)


# ---------------------------------------------------------------------------
# Variables (docs/policy-language.md, "Variables")

DYN = "dyn"
NUMERIC = ("int", "uint", "double")
ORDERED = NUMERIC + ("string", "bytes", "bool", "timestamp", "duration")

FIELDS: dict[str, dict[str, Any]] = {
    "principal": {"tenant": "string", "agent": "string", "session": "string",
                  "labels": ("map", "string", "string"), "token_id": "string", "source": "string"},
    "request": {"host": "string", "port": "int", "scheme": "string", "method": "string", "path": "string",
                "query": "string", "headers": ("map", "string", "string"), "sni": "string", "mode": "string"},
    "destination": {"ip": "string", "ips": ("list", "string"), "ip_class": "string", "internal": "bool",
                    "via": "string"},
}
VARIABLES: dict[str, Any] = {"principal": ("obj", "principal"), "request": ("obj", "request"),
                             "destination": ("obj", "destination"), "now": "timestamp"}
SELECTOR_VARIABLES = frozenset({"principal"})
TYPE_NAMES = frozenset({"int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type"})

# Values a field can take (EG405). request.host is checked separately (lower case, no trailing dot).
DOMAINS: dict[tuple[str, ...], frozenset[str]] = {
    ("request", "scheme"): frozenset({"http", "https", "ws", "wss"}),
    ("request", "mode"): frozenset({"explicit", "transparent"}),
    ("principal", "source"): frozenset({"token", "binding"}),
    ("destination", "via"): frozenset({"dns", "override", "literal", "localhost", "given"}),
    ("destination", "ip_class"): frozenset({c.value for c in AddressClass} | {""}),
}
HOST_PATH = ("request", "host")
HEADERS_PATH = ("request", "headers")
TENANT_FIELDS = frozenset({"tenant", "agent", "labels"})

STRING_METHODS = ("startsWith", "endsWith", "contains", "matches")
TIMESTAMP_ACCESSORS = ("getFullYear", "getMonth", "getDate", "getDayOfMonth", "getDayOfWeek", "getDayOfYear",
                       "getHours", "getMinutes", "getSeconds", "getMilliseconds")
DURATION_ACCESSORS = ("getHours", "getMinutes", "getSeconds", "getMilliseconds")
MACROS = ("all", "exists", "exists_one", "map", "filter")
METHODS = STRING_METHODS + ("size",) + TIMESTAMP_ACCESSORS + MACROS
FUNCTIONS = ("size", "int", "uint", "double", "string", "bytes", "bool", "dyn", "type", "timestamp", "duration",
             "matches", "has")
# Documented as not available ("Functions and operators"): an evaluation error.
UNAVAILABLE = frozenset({"lowerAscii", "upperAscii", "split", "substring", "indexOf", "lastIndexOf", "replace",
                         "format", "join", "trim", "charAt", "quote", "reverse", "min", "max", "optMap",
                         "optFlatMap", "orValue", "hasValue", "value", "or"})

INT64 = (-(1 << 63), (1 << 63) - 1)
UINT64_MAX = (1 << 64) - 1
_TIMESTAMP_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")
_DURATION_RE = re.compile(r"-?(\d+(\.\d+)?(h|ms|us|µs|ns|m|s))+|-?0")
_DURATION_DAYS_RE = re.compile(r"-?(\d+(\.\d+)?(d|h|ms|us|µs|ns|m|s))+")


# ---------------------------------------------------------------------------
# A small AST over cel-python's Lark tree


@dataclass(eq=False)
class N:
    kind: str  # lit ident select index call list map binop unop cond struct
    start: int
    end: int  # exclusive offsets into the expression source
    name: str = ""  # identifier, field, function or operator
    args: list = field(default_factory=list)  # operands, arguments, items (map: k, v, k, v ...)
    target: "N | None" = None  # operand of select/index, receiver of a method call
    value: Any = None  # literal value (None when it could not be read)
    ltype: str = ""  # literal type: int uint double string bytes bool null
    name_start: int = -1
    name_end: int = -1
    memo: dict = field(default_factory=dict, repr=False)  # canon / constraints / const, computed once


_REL = {"relation_lt": "<", "relation_le": "<=", "relation_gt": ">", "relation_ge": ">=", "relation_eq": "==",
        "relation_ne": "!=", "relation_in": "in", "addition_add": "+", "addition_sub": "-",
        "multiplication_mul": "*", "multiplication_div": "/", "multiplication_mod": "%"}
_WRAPPERS = ("member", "primary")


def _bool_literal_positions(source: str) -> list[tuple[int, int]]:
    """Offsets of the ``true``/``false`` tokens: celpy's lexer callback drops
    their positions. Skips strings and comments the way the grammar does."""
    out = []
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "/" and source.startswith("//", i):
            j = source.find("\n", i)
            i = n if j < 0 else j
            continue
        m = re.compile(r"[bB]?[rR]?[bB]?(\"\"\"|'''|\"|')").match(source, i)
        if m and (m.end() - i == len(m.group(1)) or c in "bBrR"):
            quote = m.group(1)
            j = m.end()
            while j < n and not source.startswith(quote, j):
                j += 2 if source[j] == "\\" else 1
            i = j + len(quote)
            continue
        m = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*").match(source, i)
        if m:
            if m.group() in ("true", "false"):
                out.append((m.start(), m.end()))
            i = m.end()
            continue
        i += 1
    return out


def build_ast(tree: lark.Tree, source: str) -> N:
    bools = iter(_bool_literal_positions(source))
    bool_pos: dict[int, tuple[int, int]] = {}
    for tok in tree.scan_values(lambda v: isinstance(v, lark.Token)):
        if tok.type == "BOOL_LIT":
            bool_pos[id(tok)] = next(bools, (0, len(source)))

    spans: dict[int, tuple[int, int]] = {}

    def span(t) -> tuple[int, int]:
        if isinstance(t, lark.Token):
            if t.start_pos is None:
                return bool_pos.get(id(t), (0, len(source)))
            return t.start_pos, t.end_pos
        hit = spans.get(id(t))
        if hit is not None:
            return hit
        starts, ends = [], []
        for c in t.children:
            s, e = span(c)
            starts.append(s)
            ends.append(e)
        meta = t.meta
        if not getattr(meta, "empty", True) and getattr(meta, "start_pos", None) is not None \
                and getattr(meta, "end_pos", None) is not None:
            starts.append(meta.start_pos)
            ends.append(meta.end_pos)
        out = (min(starts), max(ends)) if starts else (0, len(source))
        spans[id(t)] = out
        return out

    def exprs(t) -> list:
        if t is None:
            return []
        return [build(c) for c in t.children]

    def build(t) -> N:
        if isinstance(t, lark.Token):  # should not happen: tokens sit under rules
            s, e = span(t)
            return N("ident", s, e, name=str(t))
        d, ch = t.data, t.children
        s, e = span(t)
        if d in _WRAPPERS or (d in ("expr", "conditionalor", "conditionaland", "relation", "addition",
                                      "multiplication", "unary") and len(ch) == 1):
            return build(ch[0])
        if d == "expr":
            return N("cond", s, e, name="?:", args=[build(c) for c in ch])
        if d in ("conditionalor", "conditionaland"):
            return N("binop", s, e, name="||" if d == "conditionalor" else "&&", args=[build(ch[0]), build(ch[1])])
        if d in ("relation", "addition", "multiplication"):
            op = ch[0]
            return N("binop", s, e, name=_REL[op.data], args=[build(op.children[0]), build(ch[1])])
        if d == "unary":
            return N("unop", s, e, name="!" if ch[0].data == "unary_not" else "-", args=[build(ch[1])])
        if d == "member_dot":
            tok = ch[1]
            return N("select", s, e, name=str(tok), target=build(ch[0]), name_start=tok.start_pos,
                     name_end=tok.end_pos)
        if d == "member_dot_arg":
            tok = ch[1]
            return N("call", s, e, name=str(tok), target=build(ch[0]),
                     args=exprs(ch[2] if len(ch) > 2 else None), name_start=tok.start_pos, name_end=tok.end_pos)
        if d == "member_index":
            return N("index", s, e, target=build(ch[0]), args=[build(ch[1])])
        if d == "member_object":
            return N("struct", s, e, target=build(ch[0]))
        if d in ("ident_arg", "dot_ident_arg"):
            tok = ch[0]
            return N("call", s, e, name=str(tok), args=exprs(ch[1] if len(ch) > 1 else None),
                     name_start=tok.start_pos, name_end=tok.end_pos)
        if d in ("ident", "dot_ident"):
            tok = ch[0]
            return N("ident", tok.start_pos, tok.end_pos, name=str(tok), name_start=tok.start_pos,
                     name_end=tok.end_pos)
        if d == "paren_expr":
            inner = build(ch[0])
            return inner
        if d == "list_lit":
            return N("list", s, e, args=exprs(ch[0] if ch else None))
        if d == "map_lit":
            return N("map", s, e, args=exprs(ch[0] if ch else None))
        if d == "literal":
            tok = ch[0]
            ts, te = span(tok)
            ltype, value = _literal(tok)
            return N("lit", ts, te, value=value, ltype=ltype)
        # anything else: keep the children so nothing is lost
        return N("struct", s, e, args=[build(c) for c in ch if isinstance(c, lark.Tree)])

    return build(tree)


def _literal(tok: lark.Token) -> tuple[str, Any]:
    text, ty = str(tok), tok.type
    if ty in ("INT_LIT", "UINT_LIT"):
        body = text[:-1] if ty == "UINT_LIT" else text
        sign = -1 if body.startswith("-") else 1
        body = body.lstrip("-")
        value = sign * (int(body[2:], 16) if body[:2].lower() == "0x" else int(body))
        return ("int" if ty == "INT_LIT" else "uint"), value
    if ty == "FLOAT_LIT":
        return "double", float(text)
    if ty == "BOOL_LIT":
        return "bool", text == "true"
    if ty == "NULL_LIT":
        return "null", None
    kind = "bytes" if ty == "BYTES_LIT" else "string"
    try:
        value = celexpr._literal_value(tok)
    except Exception:
        value = None  # the rust engine cannot read it (e.g. an unknown escape)
    if kind == "string" and not isinstance(value, str):
        value = None
    if kind == "bytes" and not isinstance(value, (bytes, bytearray)):
        value = None
    return kind, value


def walk(n: N):
    yield n
    if n.target is not None:
        yield from walk(n.target)
    for a in n.args:
        yield from walk(a)


def path_of(n: N) -> tuple[str, ...] | None:
    """``request.headers["x"]`` -> ("request", "headers", "x"); None if not a plain path."""
    if n.kind == "ident":
        return (n.name,)
    if n.kind == "select":
        base = path_of(n.target)
        return None if base is None else base + (n.name,)
    if n.kind == "index" and n.args and n.args[0].kind == "lit" and n.args[0].ltype == "string" \
            and n.args[0].value is not None:
        base = path_of(n.target)
        return None if base is None else base + (n.args[0].value,)
    return None


def canon(n: N) -> str:
    """A canonical text: the same for expressions that differ only in spacing,
    parentheses, quotes or ``m.f`` vs ``m["f"]``."""
    c = n.memo.get("canon")
    if c is None:
        c = n.memo["canon"] = _canon(n)
    return c


def _canon(n: N) -> str:
    k = n.kind
    if k == "lit":
        return f"{n.ltype}:{n.value!r}"
    if k == "ident":
        return n.name
    if k == "select":
        return f"{canon(n.target)}[{n.name!r}]"
    if k == "index":
        a = n.args[0]
        if a.kind == "lit" and a.ltype == "string" and a.value is not None:
            return f"{canon(n.target)}[{a.value!r}]"
        return f"{canon(n.target)}[{canon(a)}]"
    if k == "call":
        head = f"{canon(n.target)}." if n.target is not None else ""
        return f"{head}{n.name}({','.join(canon(a) for a in n.args)})"
    if k == "list":
        return f"[{','.join(canon(a) for a in n.args)}]"
    if k == "map":
        return "{" + ",".join(canon(a) for a in n.args) + "}"
    if k == "binop":
        return f"({canon(n.args[0])}{n.name}{canon(n.args[1])})"
    if k == "unop":
        return f"{n.name}{canon(n.args[0])}"
    if k == "cond":
        return "(" + "?".join(canon(a) for a in n.args) + ")"
    return f"<{k}:{n.start}:{n.end}>"  # struct: never equal to anything else


def conjuncts(n: N) -> list[N]:
    if n.kind == "binop" and n.name == "&&":
        return conjuncts(n.args[0]) + conjuncts(n.args[1])
    return [n]


def disjuncts(n: N) -> list[N]:
    if n.kind == "binop" and n.name == "||":
        return disjuncts(n.args[0]) + disjuncts(n.args[1])
    return [n]


def const_bool(n: N) -> bool | None:
    """The value of an expression that does not depend on its input, if it is a bool."""
    if "const" not in n.memo:
        n.memo["const"] = _const_bool(n)
    return n.memo["const"]


def _const_bool(n: N) -> bool | None:
    if n.kind == "lit" and n.ltype == "bool":
        return n.value
    if n.kind == "unop" and n.name == "!":
        v = const_bool(n.args[0])
        return None if v is None else not v
    if n.kind == "binop" and n.name in ("&&", "||"):
        a, b = const_bool(n.args[0]), const_bool(n.args[1])
        if n.name == "&&":
            if a is False or b is False:
                return False
            return True if a is True and b is True else None
        if a is True or b is True:
            return True
        return False if a is False and b is False else None
    if n.kind == "binop" and n.name in ("==", "!=") and all(a.kind == "lit" for a in n.args):
        a, b = n.args
        if a.ltype == b.ltype and a.value is not None and b.value is not None:
            return (a.value == b.value) == (n.name == "==")
    return None


def const_int(n: N) -> int | None:
    """The exact (unbounded) value of int arithmetic over int literals, else None."""
    if n.kind == "lit" and n.ltype == "int":
        return n.value
    if n.kind == "unop" and n.name == "-":
        v = const_int(n.args[0])
        return None if v is None else -v
    if n.kind == "binop" and n.name in ("+", "-", "*"):
        a, b = const_int(n.args[0]), const_int(n.args[1])
        if a is None or b is None:
            return None
        return a + b if n.name == "+" else (a - b if n.name == "-" else a * b)
    return None


# ---------------------------------------------------------------------------
# Literal constraints: which values a path can have when an expression is true


def _norm(ltype: str, value: Any) -> tuple:
    return (ltype, value)


@dataclass(frozen=True)
class ValueSet:
    """Values a path may take: one of ``exact``, or a string ending with one of ``suffixes``."""

    exact: frozenset = frozenset()  # of (ltype, value)
    suffixes: frozenset = frozenset()  # of str

    def empty(self) -> bool:
        return not self.exact and not self.suffixes

    def _suffix_ok(self, item: tuple, suffixes) -> bool:
        return item[0] == "string" and any(item[1].endswith(s) for s in suffixes)

    def intersect(self, o: "ValueSet") -> "ValueSet":
        exact = (self.exact & o.exact) | {e for e in self.exact if self._suffix_ok(e, o.suffixes)} | \
            {e for e in o.exact if self._suffix_ok(e, self.suffixes)}
        suffixes = set()
        for a in self.suffixes:
            for b in o.suffixes:
                if a.endswith(b):
                    suffixes.add(a)
                elif b.endswith(a):
                    suffixes.add(b)
        return ValueSet(frozenset(exact), frozenset(suffixes))

    def union(self, o: "ValueSet") -> "ValueSet":
        return ValueSet(self.exact | o.exact, self.suffixes | o.suffixes)

    def subset_of(self, o: "ValueSet") -> bool:
        return all(e in o.exact or self._suffix_ok(e, o.suffixes) for e in self.exact) and \
            all(any(s.endswith(t) for t in o.suffixes) for s in self.suffixes)

    def describe(self, limit: int = 3) -> str:
        items = sorted(repr(v) if t != "string" else f'"{v}"' for t, v in self.exact)
        items += sorted(f'*{s}' for s in self.suffixes)
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more


def _lit_key(n: N) -> tuple | None:
    if n.kind == "lit" and n.value is not None or (n.kind == "lit" and n.ltype == "null"):
        return _norm(n.ltype, n.value)
    return None


def _atom(n: N) -> tuple[tuple[str, ...], ValueSet] | None:
    if n.kind == "binop" and n.name == "==":
        a, b = n.args
        for p_node, l_node in ((a, b), (b, a)):
            p, k = path_of(p_node), _lit_key(l_node)
            if p is not None and k is not None:
                return p, ValueSet(frozenset([k]))
        return None
    if n.kind == "binop" and n.name == "in":
        p = path_of(n.args[0])
        lst = n.args[1]
        if p is not None and lst.kind == "list":
            keys = [_lit_key(x) for x in lst.args]
            if all(k is not None for k in keys):
                return p, ValueSet(frozenset(keys))
        return None
    if n.kind == "call" and n.name == "endsWith" and n.target is not None and len(n.args) == 1:
        p = path_of(n.target)
        a = n.args[0]
        if p is not None and a.kind == "lit" and a.ltype == "string" and a.value is not None:
            return p, ValueSet(suffixes=frozenset([a.value]))
    return None


def constraints(n: N) -> dict[tuple[str, ...], ValueSet]:
    """For each path, the values it can have whenever ``n`` is true (sound
    under CEL's error semantics: a true ``a && b`` has both sides true).
    The result is shared: do not modify it."""
    c = n.memo.get("constraints")
    if c is None:
        c = n.memo["constraints"] = _constraints(n)
    return c


def _constraints(n: N) -> dict[tuple[str, ...], ValueSet]:
    if n.kind == "binop" and n.name == "&&":
        a, b = constraints(n.args[0]), constraints(n.args[1])
        out = dict(a)
        for p, vs in b.items():
            out[p] = out[p].intersect(vs) if p in out else vs
        return out
    if n.kind == "binop" and n.name == "||":
        a, b = constraints(n.args[0]), constraints(n.args[1])
        return {p: a[p].union(b[p]) for p in a.keys() & b.keys()}
    at = _atom(n)
    return {at[0]: at[1]} if at else {}


def implies(a: N, d: N, depth: int = 0) -> bool:
    """Whether ``a`` true guarantees ``d`` true (sound, incomplete)."""
    if depth > 40:
        return False
    if const_bool(d) is True or const_bool(a) is False:
        return True
    if canon(a) == canon(d):
        return True
    if d.kind == "binop" and d.name == "&&":
        return all(implies(a, x, depth + 1) for x in conjuncts(d))
    if d.kind == "binop" and d.name == "||":
        if any(implies(a, x, depth + 1) for x in disjuncts(d)):
            return True
    if a.kind == "binop" and a.name == "&&":
        if any(implies(x, d, depth + 1) for x in conjuncts(a)):
            return True
    if a.kind == "binop" and a.name == "||":
        return all(implies(x, d, depth + 1) for x in disjuncts(a))
    at = _atom(d)
    if at is not None:
        ca = constraints(a)
        return at[0] in ca and ca[at[0]].subset_of(at[1])
    return False


def never_true(n: N) -> bool:
    """Whether an expression is false whatever its input (constant false, a
    contradiction among its top-level conjuncts, ``x in []``)."""
    return const_bool(n) is False or any(vs.empty() for vs in constraints(n).values())


def compatible(a: dict, b: dict) -> bool:
    """Whether two constraint maps can both hold (no path forced to disjoint values)."""
    return all(not a[p].intersect(b[p]).empty() for p in a.keys() & b.keys())


def reads(n: N) -> set[tuple[str, ...]]:
    """The variable paths an expression reads: (var, field) or (var,) for the whole variable."""
    out: set[tuple[str, ...]] = set()

    def visit(x: N, bound: frozenset) -> None:
        if x.kind in ("select", "index"):
            p = path_of(x)
            if p is not None and p[0] in VARIABLES and p[0] not in bound:
                out.add(p[:2])
                if x.kind == "index":
                    for a in x.args:
                        visit(a, bound)
                return
        if x.kind == "ident" and x.name in VARIABLES and x.name not in bound:
            out.add((x.name,))
            return
        if x.kind == "call" and x.name in MACROS and x.target is not None and x.args and x.args[0].kind == "ident":
            visit(x.target, bound)
            for a in x.args[1:]:
                visit(a, bound | {x.args[0].name})
            return
        if x.target is not None:
            visit(x.target, bound)
        for a in x.args:
            visit(a, bound)

    visit(n, frozenset())
    return out


def _reads_any(paths: set, var: str, fields: Iterable[str]) -> bool:
    fields = set(fields)
    return any(p[0] == var and (len(p) == 1 or p[1] in fields) for p in paths)


# ---------------------------------------------------------------------------
# Did you mean


def _distance(a: str, b: str) -> int:
    """Damerau-Levenshtein distance (optimal string alignment)."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def suggest(name: str, candidates: Iterable[str]) -> list[str]:
    """Close matches for a misspelt name: difflib's, plus every candidate one
    edit away (difflib's ratio misses typos of short names such as ``ip``).
    The closest by edit distance come first; ties are all kept."""
    cands = sorted(set(candidates))
    found = set(difflib.get_close_matches(name, cands, n=3, cutoff=0.6))
    found |= set(difflib.get_close_matches(name.lower(), cands, n=3, cutoff=0.6))
    found |= {c for c in cands if _distance(name.lower(), c.lower()) <= 1}
    if not found:
        return []
    ranked = sorted(found, key=lambda c: (_distance(name.lower(), c.lower()),
                                          -difflib.SequenceMatcher(None, name, c).ratio(), c))
    best = _distance(name.lower(), ranked[0].lower())
    return [c for c in ranked if _distance(name.lower(), c.lower()) == best]


def _did_you_mean(options: list[str]) -> str:
    if not options:
        return ""
    return "did you mean " + " or ".join(f"`{o}`" for o in options) + "?"


# ---------------------------------------------------------------------------
# Per-expression checks


@dataclass
class Raw:
    code: str
    start: int
    end: int
    message: str
    help: str = ""


def _a(t: Any) -> str:
    name = tname(t)
    return ("an " if name[:1] in "aeio" else "a ") + name


def tname(t: Any) -> str:
    if isinstance(t, tuple):
        if t[0] == "list":
            return f"list({tname(t[1])})"
        if t[0] == "map":
            return f"map({tname(t[1])}, {tname(t[2])})"
        return f"map (`{t[1]}`)"
    return str(t)


def relate(a: Any, b: Any) -> str:
    """'ok', 'numeric' (numbers of different types) or 'mismatch'."""
    if a == DYN or b == DYN:
        return "ok"
    if a in NUMERIC and b in NUMERIC:
        return "ok" if a == b else "numeric"
    if isinstance(a, tuple) and isinstance(b, tuple):
        ka = "map" if a[0] in ("map", "obj") else a[0]
        kb = "map" if b[0] in ("map", "obj") else b[0]
        if ka != kb:
            return "mismatch"
        if a[0] == "list":
            return relate(a[1], b[1])
        if a[0] == "map" and b[0] == "map":
            r1, r2 = relate(a[1], b[1]), relate(a[2], b[2])
            return "mismatch" if "mismatch" in (r1, r2) else ("numeric" if "numeric" in (r1, r2) else "ok")
        return "ok"
    if isinstance(a, tuple) or isinstance(b, tuple):
        return "mismatch"
    return "ok" if a == b else "mismatch"


class ExprChecker:
    """Type inference and local checks over one expression's AST."""

    def __init__(self, source: str, context: str, engine: str = "rust"):
        self.src = source
        self.context = context  # "selector" or "when"
        self.engine = engine
        self.available = SELECTOR_VARIABLES if context == "selector" else frozenset(VARIABLES)
        self.out: list[Raw] = []

    # -- helpers
    def emit(self, code: str, where, message: str, help: str = "") -> None:
        start, end = (where.start, where.end) if isinstance(where, N) else where
        self.out.append(Raw(code, start, max(end, start + 1), message, help))

    def text(self, n: N, limit: int = 60) -> str:
        s = " ".join(self.src[n.start:n.end].split())
        return s if len(s) <= limit else s[:limit - 3] + "..."

    def pathtext(self, n: N) -> str:
        p = path_of(n)
        if p is not None and all(re.fullmatch(r"[_A-Za-z][_A-Za-z0-9]*", x) for x in p):
            return ".".join(p)
        return self.text(n)

    def run(self, root: N) -> list[Raw]:
        self.infer(root, {})
        self.structure(root)
        return self.out

    # -- structural checks: always false, contradictions, in []
    def structure(self, root: N) -> None:
        verdict = const_bool(root)
        if verdict is False:
            if self.context == "selector":
                self.emit("EG401", root, "this selector is always false: the policy never applies",
                          "remove the policy, or write the selector it needs")
            else:
                self.emit("EG401", root, "this condition is always false: the rule never matches",
                          "remove the rule, or write the condition it needs")
            return

        def visit(n: N, in_and: bool) -> None:
            if n.kind == "binop" and n.name == "&&" and not in_and:
                self.contradictions(conjuncts(n), top=n is root)
            for a in ([n.target] if n.target is not None else []) + list(n.args):
                visit(a, n.kind == "binop" and n.name == "&&" and a in n.args)

        visit(root, False)

    def contradictions(self, parts: list[N], top: bool) -> None:
        state: dict[tuple, ValueSet] = {}
        first: dict[tuple, N] = {}
        excluded: dict[tuple, tuple[set, N]] = {}
        for c in parts:
            cons = constraints(c)
            neq = None
            if c.kind == "binop" and c.name == "!=":
                a, b = c.args
                for p_node, l_node in ((a, b), (b, a)):
                    p, k = path_of(p_node), _lit_key(l_node)
                    if p is not None and k is not None:
                        neq = (p, k)
            for p, vs in cons.items():
                cur = state.get(p)
                new = vs if cur is None else cur.intersect(vs)
                ex = excluded.get(p)
                if ex is not None and not new.suffixes:
                    new = ValueSet(frozenset(new.exact - ex[0]), new.suffixes)
                if new.empty():
                    other = first.get(p) or (ex[1] if ex else c)
                    self._contradiction(c, other, p, top)
                    return
                state[p] = new
                first.setdefault(p, c)
            if neq is not None:
                p, k = neq
                ex = excluded.setdefault(p, (set(), c))
                ex[0].add(k)
                cur = state.get(p)
                if cur is not None and not cur.suffixes and not (cur.exact - ex[0]):
                    self._contradiction(c, first.get(p, c), p, top)
                    return

    def _contradiction(self, c: N, other: N, p: tuple, top: bool) -> None:
        what = ".".join(p)
        tail = ": the rule never matches" if top and self.context == "when" else \
            (": the policy never applies" if top else ": this part is never true")
        self.emit("EG402", c, f"`{self.text(c)}` contradicts `{self.text(other)}` (both constrain `{what}`){tail}",
                  f"`{what}` cannot satisfy both; did you mean `||`, or `in [...]`?")

    # -- type inference
    def infer(self, n: N, env: dict) -> Any:
        return getattr(self, "_" + n.kind)(n, env)

    def _lit(self, n: N, env) -> Any:
        if n.ltype == "int" and not INT64[0] <= n.value <= INT64[1]:
            self.emit("EG801", n, f"int literal {self.text(n)} is out of range: a load error with the rust engine, "
                                  "an evaluation error with python", "use a value in the 64-bit range")
        elif n.ltype == "uint" and not 0 <= n.value <= UINT64_MAX:
            self.emit("EG801", n, f"uint literal {self.text(n)} is out of range", "use a value in the 64-bit range")
        elif n.ltype in ("string", "bytes") and n.value is None:
            self.emit("EG801", n, f"{n.ltype} literal {self.text(n)} is rejected by the rust engine (an unknown "
                                  "escape?) but accepted by python",
                      "use only the CEL escapes \\a \\b \\f \\n \\r \\t \\v \\\\ \\\" \\' \\xHH \\uHHHH \\ooo")
        return n.ltype

    def _ident(self, n: N, env) -> Any:
        name = n.name
        if name in env:
            return env[name]
        if name in VARIABLES:
            if name not in self.available:
                self.emit("EG203", n, f"a selector sees only `principal`: `{name}` is not defined here",
                          "move the condition on the request into the rules' `when`")
                return DYN
            return VARIABLES[name]
        if name in TYPE_NAMES:
            return "type"
        options = suggest(name, set(VARIABLES) | set(env))
        note = ""
        if options and not all(o in self.available or o in env for o in options):
            note = " (a selector sees only `principal`)"
        self.emit("EG201", n, f"unknown variable `{name}`" + (": " + _did_you_mean(options) if options else "")
                  + note, f"the variables are {', '.join(sorted(self.available))}")
        return DYN

    def _member(self, n: N, t: Any, fname: str, span: tuple[int, int], target: N) -> Any:
        if t == DYN:
            return DYN
        if isinstance(t, tuple) and t[0] == "obj":
            fields = FIELDS[t[1]]
            if fname in fields:
                return fields[fname]
            base = self.pathtext(target)
            options = suggest(fname, fields)
            msg = f"unknown field `{base}.{fname}`"
            if options:
                msg += ": " + _did_you_mean([f"{base}.{o}" for o in options])
            self.emit("EG202", span, msg, f"`{base}` has the fields: {', '.join(sorted(fields))}")
            return DYN
        if isinstance(t, tuple) and t[0] == "map":
            if path_of(target) == HEADERS_PATH and fname != fname.lower():
                self.emit("EG204", span, f"header names are lower case: request.headers.{fname} is never "
                                         "present (reading it is an evaluation error)", f"write `{fname.lower()}`")
            return t[2]
        self.emit("EG302", span, f"`{self.text(target)}` is {_a(t)}: it has no field `{fname}`")
        return DYN

    def _select(self, n: N, env) -> Any:
        t = self.infer(n.target, env)
        return self._member(n, t, n.name, (n.name_start, n.name_end), n.target)

    def _index(self, n: N, env) -> Any:
        t = self.infer(n.target, env)
        key = n.args[0]
        kt = self.infer(key, env)
        if t == DYN:
            return DYN
        if t in ("string", "bytes"):
            self.emit("EG302", n, f"{t}s have no index operator: `{self.text(n)}` is an error in the CEL spec and "
                                  "the rust engine (python returns a character)",
                      "use startsWith(), endsWith(), contains() or matches()")
            return DYN
        if isinstance(t, tuple) and t[0] == "list":
            if kt not in ("int", "uint", DYN):
                self.emit("EG301", key, f"a list index must be an int, not {_a(kt)}")
            elif key.kind == "lit" and isinstance(key.value, int) and key.value < 0:
                self.emit("EG801", key, f"negative list index {self.text(key)}: an error in the CEL spec and the "
                                        "rust engine, python counts from the end", "use a non-negative index")
            return t[1]
        if isinstance(t, tuple) and t[0] == "obj":
            if key.kind == "lit" and key.ltype == "string" and key.value is not None:
                return self._member(n, t, key.value, (key.start, key.end), n.target)
            if kt not in ("string", DYN):
                self.emit("EG301", key, f"the keys of `{self.pathtext(n.target)}` are strings, not {tname(kt)}s")
            return DYN
        if isinstance(t, tuple) and t[0] == "map":
            if relate(kt, t[1]) == "mismatch":
                self.emit("EG301", key, f"the keys of `{self.pathtext(n.target)}` are {tname(t[1])}s, "
                                        f"not {tname(kt)}s: the key is never found",
                          f'quote it: "{key.value}"' if key.kind == "lit" and key.ltype == "int" else "")
            elif path_of(n.target) == HEADERS_PATH and key.kind == "lit" and isinstance(key.value, str) \
                    and key.value != key.value.lower():
                self.emit("EG204", key, f"header names are lower case: request.headers[{self.text(key)}] is "
                                        "never present (reading it is an evaluation error)",
                          f'write "{key.value.lower()}"')
            return t[2]
        self.emit("EG302", n, f"`{self.text(n.target)}` is {_a(t)}: it cannot be indexed")
        return DYN

    def _list(self, n: N, env) -> Any:
        types = [self.infer(a, env) for a in n.args]
        if types and all(x == types[0] for x in types):
            return ("list", types[0])
        return ("list", DYN)

    def _map(self, n: N, env) -> Any:
        keys, values = n.args[0::2], n.args[1::2]
        kts = [self.infer(k, env) for k in keys]
        vts = [self.infer(v, env) for v in values]
        seen = set()
        for k in keys:
            lk = _lit_key(k)
            if lk is not None:
                if lk in seen:
                    self.emit("EG801", k, f"map key {self.text(k)} is repeated: the rust engine accepts it, python "
                                          "and the CEL spec reject it", "give each key once")
                seen.add(lk)
        kt = kts[0] if kts and all(x == kts[0] for x in kts) else DYN
        vt = vts[0] if vts and all(x == vts[0] for x in vts) else DYN
        return ("map", kt, vt)

    def _struct(self, n: N, env) -> Any:
        self.emit("EG303", n, f"`{self.text(n)}`: messages (protobuf types) are not available")
        return DYN

    def overflow(self, n: N) -> None:
        v = const_int(n)
        if v is not None and not INT64[0] <= v <= INT64[1] and all(
                const_int(a) is None or INT64[0] <= const_int(a) <= INT64[1] for a in n.args):
            self.emit("EG801", n, f"`{self.text(n)}` overflows 64-bit ints: the rust engine wraps around, python "
                                  "(and the CEL spec) report an error", "keep int arithmetic in range")

    def _unop(self, n: N, env) -> Any:
        t = self.infer(n.args[0], env)
        if n.name == "-":
            self.overflow(n)
        if n.name == "!":
            if t not in ("bool", DYN):
                self.emit("EG301", n.args[0], f"`!` needs a bool, but `{self.text(n.args[0])}` is {_a(t)}")
            return "bool"
        if t not in NUMERIC + ("duration", DYN):
            self.emit("EG301", n.args[0], f"`-` needs a number, but `{self.text(n.args[0])}` is {_a(t)}")
            return DYN
        return t

    def _cond(self, n: N, env) -> Any:
        c, a, b = (self.infer(x, env) for x in n.args)
        if c not in ("bool", DYN):
            self.emit("EG301", n.args[0], f"the condition of `? :` must be a bool, not {_a(c)}")
        return a if a == b else DYN

    def _binop(self, n: N, env) -> Any:
        op = n.name
        left, right = n.args
        lt, rt = self.infer(left, env), self.infer(right, env)
        if op in ("&&", "||"):
            for side, t in ((left, lt), (right, rt)):
                if t not in ("bool", DYN):
                    self.emit("EG301", side, f"`{op}` takes bools, but `{self.text(side)}` is {_a(t)} (an error; "
                                             "the python engine even returns the value)",
                              f"compare it: `{self.text(side)} == ...`")
            return "bool"
        if op in ("==", "!=", "<", "<=", ">", ">="):
            self.compare(n, left, lt, right, rt)
            if op in ("==", "!="):
                self.value_domain(left, right)
            return "bool"
        if op == "in":
            self.membership(n, left, lt, right, rt)
            return "bool"
        return self.arith(n, op, left, lt, right, rt)

    def compare(self, n: N, left: N, lt, right: N, rt) -> None:
        op = n.name
        verdict = relate(lt, rt)
        if verdict == "numeric":
            self.emit("EG801", n, f"`{self.text(n)}` compares {_a(lt)} with {_a(rt)}: the rust engine compares "
                                  "numbers across types, python reports an error",
                      "write both sides with the same numeric type (443, not 443u or 443.0)")
            return
        if verdict == "mismatch":
            lit_left, lit_right = left.kind == "lit", right.kind == "lit"
            blame, other, bt, ot = (left, right, lt, rt) if lit_left and not lit_right else (right, left, rt, lt)
            outcome = {"==": "never true", "!=": "always true"}.get(op, "an evaluation error")
            help = ""
            if blame.kind == "lit" and blame.ltype == "string" and ot == "int" and blame.value is not None \
                    and re.fullmatch(r"-?\d+", blame.value):
                help = f"write the number without quotes: `{self.text(other)} {op} {blame.value}`"
            elif blame.kind == "lit" and blame.ltype in ("int", "uint", "double") and ot == "string":
                help = f'quote it: `{self.text(other)} {op} "{self.text(blame)}"`'
            self.emit("EG301", blame, f"`{self.text(other)}` is {_a(ot)} but is compared with {_a(bt)} "
                                      f"(`{self.text(blame)}`): {outcome}", help)
            return
        if left.kind == right.kind == "list" and len(left.args) == len(right.args):
            for a, b in zip(left.args, right.args):
                if a.kind == b.kind == "lit" and relate(a.ltype, b.ltype) == "numeric":
                    self.emit("EG801", n, f"`{self.text(n)}` compares {_a(a.ltype)} ({self.text(a)}) with "
                                          f"{_a(b.ltype)} ({self.text(b)}): the rust engine compares numbers "
                                          "across types, python reports an error",
                              "write both sides with the same numeric type")
                    return
        if op in ("<", "<=", ">", ">=") and lt != DYN and lt not in ORDERED:
            self.emit("EG301", n, f"`{op}` cannot order {tname(lt)} values")

    def value_domain(self, left: N, right: N) -> None:
        for p_node, l_node in ((left, right), (right, left)):
            p = path_of(p_node)
            if p is None or l_node.kind != "lit" or l_node.ltype != "string" or l_node.value is None:
                continue
            self.check_value(p, l_node)

    def check_value(self, p: tuple, lit: N) -> None:
        v = lit.value
        if p in DOMAINS and v not in DOMAINS[p]:
            dom = ", ".join(f'"{x}"' for x in sorted(DOMAINS[p]))
            options = [o for o in suggest(v, DOMAINS[p]) if o]
            self.emit("EG405", lit, f"`{'.'.join(p)}` is never {self.text(lit)}: its values are {dom}",
                      _did_you_mean([f'"{o}"' for o in options]).replace("`", "") if options else "")
        elif p == HOST_PATH and (v != v.lower() or v.endswith(".")):
            fixed = v.lower().rstrip(".")
            self.emit("EG405", lit, f"`request.host` is lower case without a trailing dot: it is never "
                                    f"{self.text(lit)}", f'write "{fixed}"')

    def membership(self, n: N, left: N, lt, right: N, rt) -> None:
        if right.kind == "list" and not right.args:
            self.emit("EG403", right, f"`{self.text(n)}` is always false: the list is empty",
                      "list the values, or remove the condition")
            return
        if right.kind == "list":
            for item in right.args:
                it = self.infer_quiet(item)
                v = relate(lt, it)
                if v == "numeric":
                    self.emit("EG801", item, f"`{self.text(left)}` is {_a(lt)} but {self.text(item)} is "
                                             f"{_a(it)}: the engines differ on comparing numbers across types",
                              "write the values with the same numeric type")
                    break
                if v == "mismatch":
                    help = ""
                    if item.kind == "lit" and item.ltype == "string" and lt == "int" and item.value is not None \
                            and re.fullmatch(r"-?\d+", item.value):
                        help = f"write the number without quotes: {item.value}"
                    elif item.kind == "lit" and item.ltype in NUMERIC and lt == "string":
                        help = f'quote it: "{self.text(item)}"'
                    self.emit("EG301", item, f"`{self.text(left)}` is {_a(lt)} but the list holds {_a(it)} "
                                             f"({self.text(item)}): never equal", help)
                    break
            p = path_of(left)
            if p is not None:
                for item in right.args:
                    if item.kind == "lit" and item.ltype == "string" and item.value is not None:
                        self.check_value(p, item)
            return
        if rt == DYN:
            return
        if isinstance(rt, tuple) and rt[0] == "list":
            v = relate(lt, rt[1])
            if v == "numeric":
                self.emit("EG801", n, f"`{self.text(n)}` compares {_a(lt)} with elements of type {tname(rt[1])}: "
                                      "the engines differ on comparing numbers across types")
            elif v == "mismatch":
                self.emit("EG301", left, f"`{self.text(left)}` is {_a(lt)} but `{self.text(right)}` holds "
                                         f"{tname(rt[1])}s: never equal")
            return
        if isinstance(rt, tuple) and rt[0] in ("map", "obj"):
            kt = rt[1] if rt[0] == "map" else "string"
            if relate(lt, kt) == "mismatch":
                self.emit("EG301", left, f"the keys of `{self.text(right)}` are {tname(kt)}s, not {tname(lt)}s")
            elif path_of(right) == HEADERS_PATH and left.kind == "lit" and isinstance(left.value, str) \
                    and left.value != left.value.lower():
                self.emit("EG204", left, f"header names are lower case: {self.text(left)} is never in "
                                         "request.headers", f'write "{left.value.lower()}"')
            return
        if rt == "string":
            self.emit("EG301", n, f"`in` does not search strings: `{self.text(right)}` is a string",
                      f"use `{self.text(right)}.contains({self.text(left)})`")
            return
        self.emit("EG301", right, f"`in` needs a list or a map, but `{self.text(right)}` is {_a(rt)}")

    def infer_quiet(self, n: N) -> Any:
        saved = self.out
        self.out = []
        try:
            return self.infer(n, {})
        finally:
            self.out = saved

    def arith(self, n: N, op: str, left: N, lt, right: N, rt) -> Any:
        self.overflow(n)
        if lt == DYN or rt == DYN:
            return DYN
        if op == "+":
            if lt == rt and lt in ("string", "bytes", "duration") + NUMERIC:
                return lt
            if isinstance(lt, tuple) and isinstance(rt, tuple) and lt[0] == rt[0] == "list":
                return lt if lt == rt else ("list", DYN)
            if {lt, rt} == {"timestamp", "duration"}:
                return "timestamp"
        elif op == "-":
            if lt == rt and lt in NUMERIC + ("duration",):
                return lt
            if lt == "timestamp" and rt == "timestamp":
                return "duration"
            if lt == "timestamp" and rt == "duration":
                return "timestamp"
        else:
            if lt == rt and lt in NUMERIC and not (op == "%" and lt == "double"):
                return lt
            if op in ("*", "/") and ((lt == "duration" and rt in NUMERIC) or (rt == "duration" and lt in NUMERIC)):
                self.emit("EG801", n, f"`{self.text(n)}`: multiplying or dividing a duration works with python "
                                      "only (an error with rust and in the CEL spec)",
                          'write the duration you mean: duration("2h")')
                return "duration"
        self.emit("EG301", n, f"`{op}` cannot combine {_a(lt)} (`{self.text(left)}`) and {_a(rt)} "
                              f"(`{self.text(right)}`): an evaluation error",
                  "convert one side: int(...), string(...), double(...)" if lt in NUMERIC + ("string",) else "")
        return DYN

    # -- calls
    def _call(self, n: N, env) -> Any:
        name = n.name
        span = (n.name_start, n.name_end)
        if n.target is not None:
            if name in MACROS:
                return self.macro(n, env)
            t = self.infer(n.target, env)
            argt = [self.infer(a, env) for a in n.args]
            return self.method(n, span, name, t, argt)
        if name == "has":
            return self.has(n, env)
        argt = [self.infer(a, env) for a in n.args]
        return self.function(n, span, name, argt)

    def arity(self, n: N, span, name: str, want: tuple[int, ...]) -> bool:
        if len(n.args) in want:
            return True
        exp = " or ".join(str(w) for w in want)
        self.emit("EG303", span, f"`{name}()` takes {exp} argument{'s' if want != (1,) else ''}, "
                                 f"got {len(n.args)}")
        return False

    def method(self, n: N, span, name: str, t, argt) -> Any:
        target = n.target
        if name in STRING_METHODS:
            self.arity(n, span, name, (1,))
            if t not in ("string", DYN):
                help = "compare numbers with ==, <, >, or convert: string(...)" if t in NUMERIC else ""
                self.emit("EG302", span, f"`.{name}()` needs a string, but `{self.pathtext(target)}` is {_a(t)}",
                          help)
            for a, at in zip(n.args, argt):
                if at not in ("string", DYN):
                    self.emit("EG301", a, f"`.{name}()` takes a string argument, not {_a(at)}")
            if name == "matches" and n.args and not self.literal_string(n.args[0]):
                self.nonliteral_pattern(n.args[0])
            if name in ("endsWith", "startsWith") and path_of(target) == HOST_PATH and n.args:
                a = n.args[0]
                if a.kind == "lit" and isinstance(a.value, str) and a.value != a.value.lower():
                    self.emit("EG405", a, f"`request.host` is lower case: it never {name[:-4].lower()}s with "
                                          f"{self.text(a)}", f'write "{a.value.lower()}"')
            return "bool"
        if name == "size":
            self.arity(n, span, name, (0,))
            self.sized(target, t, span)
            return "int"
        if name in TIMESTAMP_ACCESSORS:
            if t == "timestamp":
                if len(n.args) == 1:
                    self.emit("EG801", n, f"`.{name}()` with a time zone works with python only (the rust engine "
                                          "has no time-zone argument)", "use UTC: the accessor without argument")
                elif n.args:
                    self.arity(n, span, name, (0, 1))
                return "int"
            if t == "duration" and name in DURATION_ACCESSORS:
                self.arity(n, span, name, (0,))
                return "int"
            if t == DYN:
                return "int"
            what = "a timestamp or a duration" if name in DURATION_ACCESSORS else "a timestamp"
            self.emit("EG302", span, f"`.{name}()` needs {what}, but `{self.pathtext(target)}` is {_a(t)}")
            return DYN
        self.unknown_function(n, span, name, method=True)
        return DYN

    def sized(self, target: N, t, span) -> None:
        if t not in ("string", "bytes", DYN) and not (isinstance(t, tuple)):
            self.emit("EG302", span, f"`size()` needs a string, bytes, list or map, but `{self.text(target)}` is "
                                     f"{_a(t)}")
        if target.kind == "lit" and isinstance(target.value, str) and not target.value.isascii():
            self.emit("EG801", target, "size() of a non-ASCII string: rust counts UTF-8 bytes, python and the CEL "
                                       "spec count code points", "compare with the ASCII text, or avoid size()")

    def literal_string(self, n: N) -> bool:
        return n.kind == "lit" and n.ltype == "string"

    def nonliteral_pattern(self, n: N) -> None:
        self.emit("EG801", n, f"the pattern `{self.text(n)}` is not a literal: it is compiled at evaluation, and a "
                              "pattern valid in RE2 only (\\pL) fails with rust but runs with python",
                  "use a literal pattern, checked when the policy loads")

    def function(self, n: N, span, name: str, argt) -> Any:
        args = n.args
        if name == "size":
            if self.arity(n, span, name, (1,)):
                self.sized(args[0], argt[0], span)
            return "int"
        if name == "matches":
            if self.arity(n, span, name, (2,)):
                for a, at in zip(args, argt):
                    if at not in ("string", DYN):
                        self.emit("EG301", a, f"`matches()` takes strings, not {_a(at)}")
                if not self.literal_string(args[1]):
                    self.nonliteral_pattern(args[1])
            return "bool"
        if name in ("int", "uint", "double"):
            if self.arity(n, span, name, (1,)) and argt[0] == "timestamp" and name == "int":
                self.emit("EG801", n, f"`{self.text(n)}`: int() of a timestamp works with python only",
                          "compare timestamps directly: now > timestamp(\"...\")")
            return name
        if name == "string":
            if self.arity(n, span, name, (1,)):
                a, at = args[0], argt[0]
                if at == "timestamp":
                    self.emit("EG801", n, f"`{self.text(n)}`: the engines format timestamps differently "
                                          "(+00:00 vs Z)", "compare timestamps, not their text")
                elif at == "bool":
                    self.emit("EG801", n, f"`{self.text(n)}`: string() of a bool is an error with rust and "
                                          "\"True\" with python", "use the bool itself")
                elif a.kind == "lit" and a.ltype == "bytes" and isinstance(a.value, (bytes, bytearray)):
                    try:
                        bytes(a.value).decode("utf-8")
                    except UnicodeDecodeError:
                        self.emit("EG801", n, f"`{self.text(n)}`: bytes that are not UTF-8; rust substitutes "
                                              "\\ufffd, python (and the spec) report an error")
            return "string"
        if name == "bool":
            self.arity(n, span, name, (1,))
            self.emit("EG801", span, "bool() works with python only (an error with rust)",
                      'compare instead: x == "true"')
            return "bool"
        if name == "bytes":
            self.arity(n, span, name, (1,))
            return "bytes"
        if name == "dyn":
            self.arity(n, span, name, (1,))
            return DYN
        if name == "type":
            self.arity(n, span, name, (1,))
            return "type"
        if name in ("timestamp", "duration"):
            if self.arity(n, span, name, (1,)):
                a = args[0]
                if a.kind == "lit" and a.ltype == "string" and a.value is not None:
                    self.time_literal(name, a)
                elif argt[0] not in ("string", DYN) and not (name == "timestamp" and argt[0] == "int"):
                    self.emit("EG301", a, f"`{name}()` takes a string, not {_a(argt[0])}")
            return name
        self.unknown_function(n, span, name, method=False)
        return DYN

    def time_literal(self, name: str, a: N) -> None:
        v = a.value
        if name == "timestamp":
            if not _TIMESTAMP_RE.fullmatch(v):
                self.emit("EG304", a, f"timestamp({self.text(a)}) is not an RFC 3339 time: an evaluation error",
                          'write e.g. timestamp("2030-01-01T00:00:00Z")')
            return
        if _DURATION_RE.fullmatch(v):
            return
        if _DURATION_DAYS_RE.fullmatch(v):
            self.emit("EG801", a, f"duration({self.text(a)}): the unit d is accepted by python only (an error with "
                                  "rust and in the CEL spec)", "write hours: duration(\"24h\")")
            return
        self.emit("EG304", a, f"duration({self.text(a)}) does not parse: an evaluation error",
                  'units are h m s ms us ns, e.g. duration("1h30m")')

    def unknown_function(self, n: N, span, name: str, method: bool) -> None:
        shown = f".{name}()" if method else f"{name}()"
        if name in UNAVAILABLE:
            self.emit("EG303", span, f"`{shown}` is not available (the CEL string extensions, min/max and optional "
                                     "types are not part of the policy language)",
                      "see 'Functions and operators'; e.g. startsWith/endsWith/contains/matches")
            return
        options = suggest(name, METHODS if method else FUNCTIONS)
        shown_opts = [f".{o}()" if method else f"{o}()" for o in options]
        self.emit("EG303", span, f"unknown {'method' if method else 'function'} `{shown}`"
                  + (": " + _did_you_mean(shown_opts) if options else ""))

    def has(self, n: N, env) -> Any:
        span = (n.name_start, n.name_end)
        if not self.arity(n, span, "has", (1,)):
            return "bool"
        a = n.args[0]
        if a.kind != "select":
            self.emit("EG801", n, f"`{self.text(n)}`: has() needs a field selection such as has(m.f); the rust "
                                  "engine rejects it, python accepts it",
                      "test a key with `\"k\" in m`, or select a field: has(m.f)")
            self.infer(a, env)
            return "bool"
        self.infer(a, env)
        return "bool"

    def macro(self, n: N, env) -> Any:
        name = n.name
        span = (n.name_start, n.name_end)
        t = self.infer(n.target, env)
        want = (2, 3) if name == "map" else (2,)
        if not self.arity(n, span, name, want):
            return DYN
        var = n.args[0]
        if var.kind != "ident":
            self.emit("EG303", var, f"the first argument of `.{name}()` must be a variable name")
            return DYN
        if t == DYN:
            elem = DYN
        elif isinstance(t, tuple) and t[0] == "list":
            elem = t[1]
        elif isinstance(t, tuple) and t[0] in ("map", "obj"):
            elem = t[1] if t[0] == "map" else "string"
            if name == "map":
                self.emit("EG801", span, f"`.map()` over a map (`{self.text(n.target)}`): the engines visit the "
                                         "keys in different orders", "do not rely on the order of the result")
        else:
            self.emit("EG302", span, f"`.{name}()` needs a list or a map, but `{self.text(n.target)}` is {_a(t)}")
            elem = DYN
        inner = dict(env)
        inner[var.name] = elem
        bodies = [self.infer(a, inner) for a in n.args[1:]]
        preds = n.args[1:] if name != "map" else n.args[1:-1]
        for p in preds:
            pt = bodies[n.args.index(p) - 1]
            if pt not in ("bool", DYN):
                self.emit("EG301", p, f"the condition of `.{name}()` must be a bool, not {_a(pt)}")
        if name in ("all", "exists", "exists_one"):
            return "bool"
        if name == "filter":
            return ("list", elem)
        return ("list", bodies[-1])


def check_expression(source: str, context: str = "when", engine: str = "rust") -> list[Raw]:
    """Parse and check one expression; raw findings carry offsets into ``source``.
    Raises celexpr.CelCompileError when it does not parse."""
    tree = celexpr.parse(source)
    return ExprChecker(source, context, engine).run(build_ast(tree, source))


# ---------------------------------------------------------------------------
# The policy set, re-read from YAML with positions


@dataclass(eq=False)
class Expr:
    file: str
    node: yaml.ScalarNode
    lines: list[str]
    source: str
    what: str  # "selector" or "when"
    tree: Any = None
    ast: N | None = None
    broken: bool = False
    _positions: Any = False

    def position(self, offset: int) -> tuple[int, int]:
        if self._positions is False:
            self._positions = loader._value_positions(self.node, self.lines, self.source)
        pos = self._positions
        if pos:
            li, ci = pos[max(0, min(offset, len(pos) - 1))]
            return li + 1, ci + 1
        before = self.source[:offset]
        eline = before.count("\n") + 1
        ecol = offset - (before.rfind("\n") + 1) + 1
        return loader._expr_position(self.node, self.lines, eline, ecol)

    def span(self, start: int, end: int) -> tuple[int, int, int, int]:
        line, col = self.position(start)
        if end <= start:
            return line, col, line, col + 1
        eline, ecol = self.position(end - 1)
        return line, col, eline, ecol + 1

    def contains(self, line: int, column: int) -> bool:
        return _node_contains(self.node, line, column)


def _node_contains(node: yaml.Node, line: int, column: int) -> bool:
    start = (node.start_mark.line, node.start_mark.column)
    end = (node.end_mark.line, node.end_mark.column)
    return start <= (line - 1, column - 1) <= end


@dataclass
class RefUse:
    ref: SecretRef
    line: int
    column: int
    end_line: int
    end_column: int


@dataclass(eq=False)
class RuleM:
    policy: "PolicyM"
    index: int
    name: str
    action: str | None
    when: Expr | None
    node: yaml.Node
    inject_key: yaml.Node | None = None
    inject_node: yaml.Node | None = None
    refs: list[RefUse] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.policy.name}/{self.name}"

    @property
    def where(self) -> str:
        return f"{self.policy.file}:{self.node.start_mark.line + 1}"


@dataclass(eq=False)
class PolicyM:
    name: str
    file: str
    mode: str
    selector: Expr | None
    node: yaml.Node
    rules: list[RuleM] = field(default_factory=list)

    @property
    def enforcing(self) -> bool:
        return self.mode != "shadow"


def _get(node: yaml.Node, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            return k, v
    return None


def _str(node: yaml.Node | None, expression: bool = False) -> str | None:
    if not isinstance(node, yaml.ScalarNode):
        return None
    try:
        value = loader._scalar_value(node)
    except Exception:
        return None
    if isinstance(value, bool) and expression:
        return "true" if value else "false"
    return value if isinstance(value, str) else None


def _expr(file: str, node: yaml.Node | None, lines: list[str], what: str, trees: dict) -> Expr | None:
    source = _str(node, expression=True)
    if source is None or not source.strip():
        return None
    e = Expr(file, node, lines, source, what)
    try:
        e.tree = trees.get(source) or celexpr.parse(source)
        e.ast = build_ast(e.tree, source)
    except Exception:
        e.broken = True
    return e


def read_policies(file: str, text: str, trees: dict | None = None) -> tuple[list[PolicyM], list[str]]:
    """The policies of one file as far as they are well formed (the loader
    reports the rest), and the file's lines. ``trees`` maps expression sources
    to parse trees the loader already made."""
    trees = trees if trees is not None else {}
    lines = loader._LINE_BREAK.split(text)
    try:
        docs = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return [], lines
    out = []
    for doc in docs:
        if not isinstance(doc, yaml.MappingNode):
            continue
        name = _str((_get(doc, "name") or (None, None))[1]) or "?"
        mode = _str((_get(doc, "mode") or (None, None))[1]) or "enforce"
        sel = _get(doc, "selector")
        pol = PolicyM(name, file, mode, _expr(file, sel[1], lines, "selector", trees) if sel else None, doc)
        rules = _get(doc, "rules")
        if rules and isinstance(rules[1], yaml.SequenceNode):
            for i, item in enumerate(rules[1].value):
                if not isinstance(item, yaml.MappingNode):
                    continue
                rname = _str((_get(item, "name") or (None, None))[1]) or f"rule-{i + 1}"
                action = _str((_get(item, "action") or (None, None))[1])
                when = _get(item, "when")
                r = RuleM(pol, i, rname, action, _expr(file, when[1], lines, "when", trees) if when else None, item)
                inj = _get(item, "inject")
                if inj:
                    r.inject_key, r.inject_node = inj
                    r.refs = _inject_refs(inj[1], lines)
                pol.rules.append(r)
        out.append(pol)
    return out, lines


def _inject_refs(node: yaml.Node, lines: list[str]) -> list[RefUse]:
    out: list[RefUse] = []

    def place(vnode: yaml.ScalarNode, text: str, start: int, end: int, ref: SecretRef) -> None:
        pos = loader._value_positions(vnode, lines, text)
        if pos:
            (l1, c1), (l2, c2) = pos[start], pos[max(start, end - 1)]
            out.append(RefUse(ref, l1 + 1, c1 + 1, l2 + 1, c2 + 2))
        else:
            line, col = vnode.start_mark.line + 1, vnode.start_mark.column + 1
            out.append(RefUse(ref, line, col, line, col + 1))

    headers = _get(node, "headers")
    if headers and isinstance(headers[1], yaml.MappingNode):
        for _, v in headers[1].value:
            text = _str(v)
            if text is None:
                continue
            i = 0
            while i < len(text):
                if text.startswith("$${", i):
                    i += 3
                    continue
                if text.startswith("${", i):
                    end = text.find("}", i + 2)
                    if end < 0:
                        break
                    try:
                        place(v, text, i + 2, end, parse_ref(text[i + 2:end]))
                    except RefError:
                        pass
                    i = end + 1
                    continue
                i += 1
    placeholders = _get(node, "placeholders")
    if placeholders and isinstance(placeholders[1], yaml.MappingNode):
        for _, v in placeholders[1].value:
            text = _str(v)
            if text is None:
                continue
            try:
                place(v, text, 0, len(text), parse_ref(text))
            except RefError:
                pass
    return out


# ---------------------------------------------------------------------------
# Suppressions: "# egress-lint: ignore EG501 <why>"

_SUPPRESS_RE = re.compile(r"(?:^|\s)#\s*egress-lint:\s*ignore\s+(EG\d{3}(?:\s*,\s*EG\d{3})*)")


def _suppressions(lines: list[str], policies: list[PolicyM]) -> list[tuple[set[str], int, int]]:
    """(codes, first line, last line) scopes, 1-based. A comment covers the rule
    (else the policy) it is in or that starts on the next line holding code;
    otherwise just that next line."""
    nodes = [(r.node, 0) for p in policies for r in p.rules] + [(p.node, 1) for p in policies]

    def extent(node) -> tuple[int, int]:
        end = node.end_mark.line - (1 if node.end_mark.column == 0 else 0)
        return node.start_mark.line, max(node.start_mark.line, end)

    out = []
    for li, text in enumerate(lines):
        m = _SUPPRESS_RE.search(text)
        if not m:
            continue
        codes = set(re.findall(r"EG\d{3}", m.group(1)))
        nxt = li
        if not text[:m.start()].strip():  # a comment on a line of its own: look at the next code line
            nxt = li + 1
            while nxt < len(lines) and (not lines[nxt].strip() or lines[nxt].lstrip().startswith("#")):
                nxt += 1
        scope = None
        for node, _rank in sorted(nodes, key=lambda x: x[1]):
            s, e = extent(node)
            if s == nxt:
                scope = (s, e)
                break
        if scope is None:
            containing = [(extent(nd), rank) for nd, rank in nodes if extent(nd)[0] <= li <= extent(nd)[1]]
            if containing:
                (s, e), _ = min(containing, key=lambda x: (x[1], x[0][1] - x[0][0]))
                scope = (s, e)
        if scope is None:
            scope = (nxt, nxt)
        out.append((codes, scope[0] + 1, scope[1] + 1))
    return out


# ---------------------------------------------------------------------------
# The whole set


SecretCheck = Callable[[SecretRef], "str | None"]  # a reason when the name does not resolve


def lint_sources(sources: list[tuple[str, str]], engine: str = "rust",
                 secret_check: SecretCheck | None = None) -> LintResult:
    """Lint (file name, text) pairs, in load order."""
    findings: list[Finding] = []
    problems: list[loader.Problem] = []
    trees: dict[str, Any] = {}  # expression source -> the loader's parse tree (not parsed twice)
    try:
        ps = loader.compile_sources(sources, engine=celexpr.make_engine(engine))
    except loader.PolicyLoadError as e:
        problems = e.problems
    else:
        for pol in ps.policies:
            trees[pol.selector.source] = pol.selector_tree
            for r in pol.rules:
                trees[r.when.source] = r.tree

    policies: list[PolicyM] = []
    lines_of: dict[str, list[str]] = {}
    for name, text in sources:
        pols, lines = read_policies(name, text, trees)
        policies += pols
        lines_of[name] = lines
    exprs = [e for p in policies for e in [p.selector] + [r.when for r in p.rules] if e is not None]

    for pr in problems:
        code = "EG100"
        if pr.message.startswith(("when expression", "selector expression")):
            code = "EG101"
        elif any(r.inject_node is not None and r.policy.file == pr.file
                 and _node_contains(r.inject_node, pr.line, pr.column) for p in policies for r in p.rules):
            code = "EG102"
        for e in exprs:
            if e.file == pr.file and e.contains(pr.line, pr.column):
                e.broken = True
        findings.append(Finding(code, CHECKS[code].severity, pr.file, pr.line, pr.column, pr.message))

    def add(code: str, where: Expr | RuleM | tuple, message: str, help: str = "", policy: str = "",
            rule: str = "", span: tuple[int, int] | None = None) -> None:
        if isinstance(where, Expr):
            s, e = span if span is not None else (0, len(where.source.rstrip()))
            line, col, eline, ecol = where.span(s, e)
            file = where.file
        else:
            file, line, col, eline, ecol = where
        findings.append(Finding(code, CHECKS[code].severity, file, line, col, message, eline, ecol, help,
                                policy, rule))

    # per expression
    for p in policies:
        for e, rule in [(p.selector, "")] + [(r.when, r.name) for r in p.rules]:
            if e is None or e.broken or e.ast is None:
                continue
            action = next((r.action for r in p.rules if r.when is e), None)
            for raw in ExprChecker(e.source, e.what, engine).run(e.ast):
                message = raw.message
                if raw.code in EVALUATION_ERRORS:
                    message += EVALUATION_ERRORS[raw.code].get(action if e.what == "when" else "selector", "")
                add(raw.code, e, message, raw.help, p.name, rule, (raw.start, raw.end))
                if CHECKS[raw.code].severity == ERROR:
                    # it fails when evaluated: the cross-rule checks below would only add noise
                    e.broken = True

    ok = [p for p in policies if p.selector is not None and not p.selector.broken and p.selector.ast is not None
          and not never_true(p.selector.ast)]

    def healthy(r: RuleM) -> bool:
        """Compiled, and can match at all (a never-true rule gets EG401/402/403 only)."""
        return r.when is not None and not r.when.broken and r.when.ast is not None and not never_true(r.when.ast)

    # EG404: allow rules that an enforcing deny always beats
    denies = [(q, [d for d in q.rules if d.action == "deny" and healthy(d)]) for q in ok if q.enforcing]
    denies = [(q, ds) for q, ds in denies if ds]
    for p in ok:
        allows = [r for r in p.rules if r.action == "allow" and healthy(r)]
        if not allows:
            continue
        covering = [d for q, ds in denies if implies(p.selector.ast, q.selector.ast) for d in ds]
        if not covering:
            continue
        # host index: a deny pinned to hosts disjoint from the allow's cannot cover it
        by_host: dict[Any, list[int]] = {}
        anywhere: list[int] = []
        for i, d in enumerate(covering):
            hd = constraints(d.when.ast).get(HOST_PATH)
            if hd is None or hd.suffixes:
                anywhere.append(i)
            else:
                for h in hd.exact:
                    by_host.setdefault(h, []).append(i)
        for r in allows:
            ha = constraints(r.when.ast).get(HOST_PATH)
            if ha is None or ha.suffixes:
                candidates = range(len(covering))
            else:
                candidates = sorted(set(anywhere).union(*(by_host.get(h, ()) for h in ha.exact)))
            for d in (covering[i] for i in candidates):
                if implies(r.when.ast, d.when.ast):
                    add("EG404", r.when, f"allow rule {r.id} never allows: the enforcing deny rule {d.id} "
                                         f"({d.where}) matches every request this rule matches, and a deny wins "
                                         "wherever it is",
                        "remove the allow rule, or narrow the deny rule", p.name, r.name)
                    break

    # EG501 / EG502 / EG603 / EG601: what enforcing allow rules let through
    injectors = []
    for p in ok:
        if not p.enforcing:
            continue
        sel_reads = reads(p.selector.ast)
        every_tenant = []
        for r in p.rules:
            if r.action != "allow" or not healthy(r):
                continue
            rr = reads(r.when.ast)
            if not (_reads_any(rr, "request", ("host", "sni")) or _reads_any(rr, "destination", FIELDS["destination"])):
                add("EG501", r.when, f"allow rule {r.id} allows every host: its condition reads neither "
                                     "request.host, request.sni nor destination",
                    'constrain the host: request.host == "api.example.com" (or in [...], or '
                    '.endsWith(".example.com"))', p.name, r.name)
            if not _reads_any(rr, "principal", TENANT_FIELDS):
                every_tenant.append(r)
            if r.inject_node is not None:
                cons = constraints(r.when.ast)
                pinned = any(k in cons for k in (HOST_PATH, ("request", "sni"), ("destination", "ip"))) or any(
                    x.kind == "call" and x.name == "matches" and x.target is not None
                    and path_of(x.target) in (HOST_PATH, ("request", "sni")) for x in walk(r.when.ast))
                if not pinned:
                    k = r.inject_key
                    add("EG603", (p.file, k.start_mark.line + 1, k.start_mark.column + 1, k.start_mark.line + 1,
                                  k.start_mark.column + 1 + len("inject")),
                        f"allow rule {r.id} injects credentials but does not pin the host: the sandbox can send "
                        "them to any host it likes",
                        'pin the host in `when`: request.host == "api.example.com" (or in [...])', p.name, r.name)
                names = frozenset(str(u.ref) for u in r.refs)
                injectors.append((p, r, names, constraints(p.selector.ast), cons))
        if every_tenant and not _reads_any(sel_reads, "principal", TENANT_FIELDS):
            add("EG502", p.selector, f"policy {p.name} applies to every tenant (its selector reads neither "
                                     "principal.tenant, principal.agent nor principal.labels) and "
                                     f"{'rule' if len(every_tenant) == 1 else 'rules'} "
                                     f"{', '.join(r.name for r in every_tenant)} "
                                     f"{'allows' if len(every_tenant) == 1 else 'allow'} for all of them",
                'narrow the selector: principal.tenant == "acme" (or a label)', p.name, "")

    for j, (pj, rj, nj, sj, cj) in enumerate(injectors):
        for pi, ri, ni, si, ci in injectors[:j]:
            if ni == nj or not compatible(si, sj) or not compatible(ci, cj):
                continue
            hi, hj = ci.get(HOST_PATH), cj.get(HOST_PATH)
            if hi is not None and hj is not None:
                where = "host " + hi.intersect(hj).describe()
            elif hi is not None or hj is not None:
                where = "host " + (hi or hj).describe()
            else:
                where = "any host"
            k = rj.inject_key
            add("EG601", (pj.file, k.start_mark.line + 1, k.start_mark.column + 1, k.start_mark.line + 1,
                          k.start_mark.column + 1 + len("inject")),
                f"allow rules {ri.id} ({ri.where}) and {rj.id} can match the same requests ({where}) but inject "
                f"different credentials ({', '.join(sorted(ni)) or 'none'} vs {', '.join(sorted(nj)) or 'none'}): "
                f"the first allow in order wins, so {rj.id} never injects there",
                "make the host (or principal) constraints disjoint, or inject the same references", pj.name, rj.name)
            break

    # EG602: references whose names do not resolve
    if secret_check is not None:
        for p in policies:
            for r in p.rules:
                for u in r.refs:
                    reason = secret_check(u.ref)
                    if reason:
                        fix = {"local": f"store it: egress secret put {u.ref.name}",
                               "env": f"set {u.ref.name} in the gateway's environment",
                               "file": "create the file (readable by the gateway)"}.get(u.ref.scheme, "")
                        add("EG602", (p.file, u.line, u.column, u.end_line, u.end_column),
                            f"secret reference `{u.ref}` does not resolve: {reason}",
                            (fix + ", or fix the name") if fix else "fix the name", p.name, r.name)

    # suppressions
    scopes: dict[str, list] = {}
    for name, _ in sources:
        scopes[name] = _suppressions(lines_of[name], [p for p in policies if p.file == name])
    kept, suppressed = [], []
    for f in findings:
        hit = f.code not in UNSUPPRESSIBLE and any(
            f.code in codes and lo <= f.line <= hi for codes, lo, hi in scopes.get(f.file, ()))
        (suppressed if hit else kept).append(f)
    kept.sort(key=Finding.sort_key)
    return LintResult(kept, [n for n, _ in sources], suppressed, lines_of)


def lint_directory(directory, engine: str = "rust", secret_check: SecretCheck | None = None) -> LintResult:
    """Lint every policy file of a directory (the loader's file selection and order)."""
    from pathlib import Path

    directory = Path(directory)
    sources, unreadable = [], []
    for path in loader.policy_files(directory):
        try:
            sources.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            unreadable.append(Finding("EG100", ERROR, str(path), 0, 0, f"cannot read: {e}"))
    result = lint_sources(sources, engine=engine, secret_check=secret_check)
    if unreadable:
        result.findings = sorted(unreadable + result.findings, key=Finding.sort_key)
        result.files += [f.file for f in unreadable]
    return result
