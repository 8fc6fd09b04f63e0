"""CEL expressions: two engines behind one small interface, plus static analysis.

Engines
-------
``RustEngine`` (the default) evaluates with the ``common-expression-language``
package (a Rust core, ~1-20 us per evaluation). ``PyEngine`` evaluates with
``cel-python`` (pure Python, ~100x slower) and exists as an independent second
implementation for differential tests and as a fallback.

Both expose::

    engine.compile(source) -> Expr        # raises CelCompileError (with line/column)
    engine.activation(variables) -> act    # engine-specific, built once per request
    engine.bind(act, name, value)          # add or replace one variable
    expr.evaluate(act) -> Python value     # raises CelEvalError

Only the Rust engine needs the ``matches()`` rewrite below: its built-in
``matches`` compiles the regular expression on every call (~20 us), so calls are
rewritten at load to ``_re_match``, a function that caches compiled patterns.
Patterns must be valid both as RE2 syntax (what the CEL spec prescribes) and as
Python ``re`` syntax; they run with RE2 semantics, using Python's ``re`` in
ASCII mode as a fast path only where it gives the same answer (see
``_matcher`` and docs/policy-language.md).

Static analysis
---------------
Policies are parsed a second time with cel-python's Lark grammar (which keeps
token positions) to find (a) literal constraints such as ``request.host ==
"api.github.com"`` that let the policy engine index rules, and (b) which fields
of each variable an expression reads, so a request only converts the values
some rule can look at.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import cel as _rcel

# cel-python logs at DEBUG on every evaluation; mitmproxy leaves the root logger
# at DEBUG, which made cel-python ~3x slower. Keep these quiet.
for _name in ("celpy", "celpy.celparser", "celpy.evaluation", "celpy.celtypes", "lark"):
    logging.getLogger(_name).setLevel(logging.WARNING)

import celpy  # noqa: E402  (after the logger settings above)
from celpy import celparser, celtypes  # noqa: E402
import lark  # noqa: E402

try:  # google-re2 comes with cel-python; used to validate patterns as RE2 syntax
    import re2 as _re2  # type: ignore
except Exception:  # pragma: no cover - re2 is a dependency of cel-python
    _re2 = None

REGEX_FUNCTION = "_re_match"

if _re2 is not None:
    _RE2_OPTIONS = _re2.Options()
    _RE2_OPTIONS.log_errors = False  # we report the error ourselves


class CelCompileError(ValueError):
    """An expression that does not parse or uses an invalid regular expression.

    ``line`` and ``column`` are 1-based positions inside the expression text.
    """

    def __init__(self, message: str, line: int = 1, column: int = 1):
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


class CelEvalError(RuntimeError):
    """Evaluation failed (missing key, type mismatch, division by zero...)."""


# --------------------------------------------------------------------------
# Regular expressions for the rewritten matches()


class RegexError(ValueError):
    pass


@functools.lru_cache(maxsize=4096)
def compile_regex(pattern: str) -> re.Pattern:
    """Compile a CEL ``matches`` pattern: must be valid RE2 and valid Python re."""
    if _re2 is not None:
        try:
            _re2.compile(pattern, _RE2_OPTIONS)
        except Exception as e:
            raise RegexError(f"invalid RE2 regular expression {pattern!r}: {e}") from None
    try:
        with warnings.catch_warnings():  # e.g. "possible nested set" for [[:alpha:]]
            warnings.simplefilter("ignore", FutureWarning)
            return re.compile(pattern, re.ASCII)
    except re.error as e:
        raise RegexError(f"regular expression {pattern!r} is not supported: {e}") from None


# Python's re (ASCII mode) is ~20x faster than the RE2 binding but does not read
# every pattern or text the way RE2 does. Pattern constructs both accept with a
# different meaning: POSIX classes ("[[:alpha:]]" is a plain set to re),
# "{,n}" (a repeat to re >= 3.12, literal text to RE2) and "\B" (never matches
# an empty string in re). Text that is read differently: "$" also matches
# before a final "\n" in re, "\s" includes "\v" in re but not in RE2, and
# "(?i)" folds only ASCII letters in re (so "(?i)\u212a", the Kelvin sign,
# matches "k" in RE2 only). Patterns holding one of these constructs or any
# non-ASCII character always run with RE2, and so does any text that is not
# ASCII or holds "\n" or "\v"; what is left gives the same answer with both
# (checked by a differential test).
_RE2_ONLY_CONSTRUCTS = ("[:", "{,", "\\B")


@functools.lru_cache(maxsize=4096)
def _matcher(pattern: str):
    """A function text -> bool with RE2 semantics for a valid pattern."""
    fast = compile_regex(pattern).search
    if _re2 is None:  # pragma: no cover - re2 is a dependency of cel-python
        return lambda text: fast(text) is not None
    exact = _re2.compile(pattern, _RE2_OPTIONS).search
    if not pattern.isascii() or any(c in pattern for c in _RE2_ONLY_CONSTRUCTS):
        return lambda text: exact(text) is not None

    def search(text: str) -> bool:
        if text.isascii() and "\n" not in text and "\x0b" not in text:
            return fast(text) is not None
        return exact(text) is not None

    return search


def _re_match(text: Any, pattern: Any) -> bool:
    if not isinstance(text, str) or not isinstance(pattern, str):
        raise TypeError("matches() takes a string and a string pattern")
    return _matcher(pattern)(text)


# --------------------------------------------------------------------------
# Parsing (cel-python's Lark grammar) shared by both engines and the analysis

_parser_singleton: celparser.CELParser | None = None


def _parser() -> celparser.CELParser:
    global _parser_singleton
    if _parser_singleton is None:
        _parser_singleton = celparser.CELParser()
    return _parser_singleton


def parse(source: str) -> lark.Tree:
    """Parse CEL source into a Lark tree; raise CelCompileError with position."""
    try:
        return _parser().parse(source)
    except celparser.CELParseError as e:
        line = getattr(e, "line", None) or 1
        col = getattr(e, "column", None) or 1
        cause = e.__cause__ or e.__context__
        token = getattr(cause, "token", None)
        if isinstance(cause, lark.exceptions.UnexpectedEOF) or (
                isinstance(token, lark.Token) and token.type == "$END"):
            # point just after the last character rather than at the last token
            text = source.rstrip()
            line = text.count("\n") + 1
            col = len(text) - (text.rfind("\n") + 1) + 1
            message = "syntax error: unexpected end of expression"
        elif isinstance(cause, lark.exceptions.UnexpectedCharacters):
            message = f"syntax error: unexpected character {cause.char!r}"
        elif isinstance(token, lark.Token):
            message = f"syntax error: unexpected {str(token)!r}"
        else:
            message = "syntax error"
        raise CelCompileError(message, line, col) from None
    except Exception as e:  # lark errors that celpy did not wrap
        raise CelCompileError(f"syntax error: {e}", getattr(e, "line", 1) or 1,
                              getattr(e, "column", 1) or 1) from None


def _literal_value(token: lark.Token) -> Any:
    """The Python value of a CEL literal token (evaluated by CEL itself)."""
    return _rcel.evaluate(str(token))


def _iter_matches_calls(tree: lark.Tree):
    """Yield (ident_token, args_exprlist_or_None) for each matches() call."""
    for node in tree.iter_subtrees():
        if node.data == "member_dot_arg":
            name = node.children[1]
            if isinstance(name, lark.Token) and str(name) == "matches":
                args = node.children[2] if len(node.children) > 2 else None
                yield name, args
        elif node.data == "ident_arg":
            name = node.children[0]
            if isinstance(name, lark.Token) and str(name) == "matches":
                args = node.children[1] if len(node.children) > 1 else None
                yield name, args


def _string_literal_of(node: Any) -> str | None:
    """If an expression subtree is just a string literal, return its value."""
    while isinstance(node, lark.Tree) and len(node.children) == 1 and node.data != "literal":
        node = node.children[0]
    if isinstance(node, lark.Tree) and node.data == "literal":
        node = node.children[0]
    if isinstance(node, lark.Token) and node.type in ("STRING_LIT", "MLSTRING_LIT") or (
        isinstance(node, lark.Token) and str(node)[:1] in "\"'rR" and node.type not in ("IDENT",)
    ):
        try:
            value = _literal_value(node)
        except Exception:
            return None
        return value if isinstance(value, str) else None
    return None


def rewrite_matches(source: str, tree: lark.Tree) -> str:
    """Replace each ``matches`` call name with the caching ``_re_match``.

    Literal patterns are validated here so a bad regex fails at load time.
    """
    edits = []
    for token, args in _iter_matches_calls(tree):
        if args is not None:
            exprs = args.children if isinstance(args, lark.Tree) else []
            pat_node = exprs[-1] if exprs else None
            pattern = _string_literal_of(pat_node) if pat_node is not None else None
            if pattern is not None:
                try:
                    compile_regex(pattern)
                except RegexError as e:
                    raise CelCompileError(str(e), token.line, token.column) from None
        edits.append(token.start_pos)
    out = source
    for pos in sorted(edits, reverse=True):
        assert out[pos:pos + 7] == "matches"
        out = out[:pos] + REGEX_FUNCTION + out[pos + 7:]
    return out


# --------------------------------------------------------------------------
# Engines


_RUST_ERROR_POS = re.compile(r"<input>:(\d+):(\d+):\s*(.*)")


class RustExpr:
    __slots__ = ("source", "_program")

    def __init__(self, source: str, program: Any):
        self.source = source
        self._program = program

    def evaluate(self, activation: Any) -> Any:
        try:
            return self._program.execute(activation)
        except Exception as e:  # KeyError, TypeError, ZeroDivisionError, RuntimeError...
            raise CelEvalError(f"{type(e).__name__}: {e}") from None


def _position_before_rewrite(source: str, rewritten: str, tree: lark.Tree, line: int, col: int) -> tuple[int, int]:
    """Map a 1-based (line, column) in the ``matches``-rewritten text back to
    ``source`` (each rewrite makes the text len(REGEX_FUNCTION) - 7 longer)."""
    if rewritten == source:
        return line, col
    lines = rewritten.split("\n")
    if not 1 <= line <= len(lines):
        return line, col
    offset = sum(len(x) + 1 for x in lines[:line - 1]) + col - 1
    grow = len(REGEX_FUNCTION) - len("matches")
    starts = sorted(token.start_pos for token, _ in _iter_matches_calls(tree))
    # the k-th rewritten name starts at its original position + k * grow
    shift = sum(grow for k, pos in enumerate(starts) if pos + k * grow < offset)
    offset = max(0, offset - shift)
    before = source[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


class RustEngine:
    """The fast engine: ``common-expression-language`` (Rust core)."""

    name = "rust"

    def compile(self, source: str, tree: lark.Tree | None = None) -> RustExpr:
        if tree is None:
            tree = parse(source)
        rewritten = rewrite_matches(source, tree)
        try:
            program = _rcel.compile(rewritten)
        except Exception as e:
            msg = str(e)
            m = _RUST_ERROR_POS.search(msg)
            if m:
                line, col = _position_before_rewrite(source, rewritten, tree, int(m.group(1)), int(m.group(2)))
                raise CelCompileError(m.group(3).strip(), line, col) from None
            raise CelCompileError(msg.splitlines()[0] if msg else "invalid expression") from None
        return RustExpr(source, program)

    def activation(self, variables: dict[str, Any] | None = None) -> Any:
        return _rcel.Context(variables or {}, functions={REGEX_FUNCTION: _re_match})

    @staticmethod
    def bind(activation: Any, name: str, value: Any) -> None:
        activation.add_variable(name, value)


class PyExpr:
    __slots__ = ("source", "_program")

    def __init__(self, source: str, program: Any):
        self.source = source
        self._program = program

    def evaluate(self, activation: dict[str, Any]) -> Any:
        try:
            result = self._program.evaluate(activation)
        except Exception as e:
            raise CelEvalError(f"{type(e).__name__}: {e}") from None
        if isinstance(result, celpy.CELEvalError):
            raise CelEvalError(str(result.args[0]) if result.args else "evaluation error")
        return _from_celpy(result)


def _from_celpy(value: Any) -> Any:
    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, (celtypes.IntType, celtypes.UintType)):
        return int(value)
    if isinstance(value, celtypes.DoubleType):
        return float(value)
    if isinstance(value, celtypes.StringType):
        return str(value)
    # Not only ListType/MapType: some celpy operations (list + list) return
    # plain Python lists that still hold celpy values.
    if isinstance(value, (list, tuple)):
        return [_from_celpy(v) for v in value]
    if isinstance(value, dict):
        return {_from_celpy(k): _from_celpy(v) for k, v in value.items()}
    return value


class PyEngine:
    """The reference engine: ``cel-python``."""

    name = "python"

    def __init__(self) -> None:
        self._env = celpy.Environment()

    def compile(self, source: str, tree: lark.Tree | None = None) -> PyExpr:
        if tree is None:
            tree = parse(source)
        # Validate literal regexes the same way the Rust engine does.
        rewrite_matches(source, tree)
        try:
            ast = self._env.compile(source)
            program = self._env.program(ast)
        except celparser.CELParseError as e:
            raise CelCompileError(str(e).splitlines()[0], getattr(e, "line", 1) or 1,
                                  getattr(e, "column", 1) or 1) from None
        return PyExpr(source, program)

    def activation(self, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        return {k: celpy.json_to_cel(v) for k, v in (variables or {}).items()}

    @staticmethod
    def bind(activation: dict[str, Any], name: str, value: Any) -> None:
        activation[name] = celpy.json_to_cel(value)


ENGINES = {"rust": RustEngine, "python": PyEngine}


def make_engine(name: str = "rust"):
    try:
        return ENGINES[name]()
    except KeyError:
        raise ValueError(f"unknown CEL engine {name!r} (choose from {', '.join(ENGINES)})") from None


# --------------------------------------------------------------------------
# Static analysis


ALL = None  # marker: "every field" / "every key"


@dataclass
class FieldUse:
    """Which fields of which top-level variables an expression reads.

    ``fields[var]`` is a set of field names, or ALL (None) when the variable is
    used as a whole (passed to a function, iterated, indexed dynamically).
    ``headers`` is the set of request header names read, or ALL.
    """

    fields: dict[str, set[str] | None] = field(default_factory=dict)
    headers: set[str] | None = field(default_factory=set)

    def merge(self, other: "FieldUse") -> None:
        for var, names in other.fields.items():
            mine = self.fields.get(var, set())
            if var in self.fields and mine is ALL:
                continue
            if names is ALL:
                self.fields[var] = ALL
            else:
                self.fields[var] = (mine or set()) | names
        if self.headers is not ALL:
            self.headers = ALL if other.headers is ALL else self.headers | other.headers

    def variables(self) -> set[str]:
        return set(self.fields)


def _unwrap(node: Any) -> Any:
    """Descend through single-child wrapper rules (expr -> conditionalor -> ... -> member)."""
    while isinstance(node, lark.Tree) and len(node.children) == 1 and node.data in (
        "expr", "conditionalor", "conditionaland", "relation", "addition",
        "multiplication", "unary", "member", "primary", "paren_expr",
    ):
        node = node.children[0]
    return node


def _path_of(node: Any) -> tuple[str, ...] | None:
    """The dotted path of a plain member chain like request.headers, else None."""
    node = _unwrap(node)
    if isinstance(node, lark.Tree) and node.data == "ident":
        return (str(node.children[0]),)
    if isinstance(node, lark.Token) and node.type == "IDENT":
        return (str(node),)
    if isinstance(node, lark.Tree) and node.data == "member_dot":
        base = _path_of(node.children[0])
        if base is None:
            return None
        return base + (str(node.children[1]),)
    return None


def field_use(tree: lark.Tree, variables: Iterable[str]) -> FieldUse:
    """Compute the fields of ``variables`` that the expression can read."""
    variables = set(variables)
    use = FieldUse()
    # Map each node to its parent so we can look upwards from identifiers.
    parent: dict[int, lark.Tree] = {}
    for node in tree.iter_subtrees():
        for child in node.children:
            if isinstance(child, lark.Tree):
                parent[id(child)] = node

    def climb(node: lark.Tree) -> lark.Tree:
        # skip wrapper nodes that hold exactly this one child
        p = parent.get(id(node))
        while p is not None and len(p.children) == 1 and p.data in (
            "primary", "member", "unary", "multiplication", "addition", "relation",
            "conditionaland", "conditionalor", "expr",
        ):
            node, p = p, parent.get(id(p))
        return p, node

    for node in tree.iter_subtrees():
        if node.data != "ident":
            continue
        name = str(node.children[0])
        if name not in variables:
            continue
        # Is this identifier shadowed by a comprehension variable? We cannot
        # tell cheaply, and treating it as a real read is the safe direction.
        p, child = climb(node)
        if p is not None and p.data == "member_dot" and p.children[0] is child:
            fname = str(p.children[1])
            current = use.fields.setdefault(name, set())
            if current is not ALL:
                current.add(fname)
            if name == "request" and fname == "headers":
                _header_use(p, parent, climb, use)
        elif p is not None and p.data == "member_dot_arg" and p.children[0] is child:
            # e.g. request.size() : a method applied to the whole map
            use.fields[name] = ALL
            if name == "request":
                use.headers = ALL
        else:
            use.fields[name] = ALL
            if name == "request":
                use.headers = ALL
    return use


def _header_use(headers_node, parent, climb, use: FieldUse) -> None:
    if use.headers is ALL:
        return
    p, child = climb(headers_node)
    if p is not None and p.data == "member_index" and p.children[0] is child:
        key = _string_literal_of(p.children[1])
        if key is not None:
            use.headers.add(key)
            return
    if p is not None and p.data == "member_dot" and p.children[0] is child:
        use.headers.add(str(p.children[1]))
        return
    if p is not None and p.data == "relation" and len(p.children) == 2 and \
            p.children[1] is child and isinstance(p.children[0], lark.Tree) and \
            p.children[0].data == "relation_in":
        # "name" in request.headers: the right operand is the headers map
        key = _string_literal_of(p.children[0].children[0])
        if key is not None:
            use.headers.add(key)
            return
    # has(request.headers.x) parses as member_dot under a macro; anything else
    # (iteration, size(), dynamic index) needs every header.
    use.headers = ALL


@dataclass(frozen=True)
class Constraint:
    """What a top-level conjunct says about one path: the value must be one of
    ``exact`` or end with one of ``suffixes``. Either may be empty."""

    exact: frozenset = frozenset()
    suffixes: frozenset = frozenset()

    def union(self, other: "Constraint") -> "Constraint":
        return Constraint(self.exact | other.exact, self.suffixes | other.suffixes)


def _conjuncts(node: Any) -> list[Any]:
    node = _unwrap_to(node, "conditionaland")
    if isinstance(node, lark.Tree) and node.data == "conditionaland" and len(node.children) == 2:
        return _conjuncts(node.children[0]) + _conjuncts(node.children[1])
    return [node]


def _disjuncts(node: Any) -> list[Any]:
    node = _unwrap_to(node, "conditionalor")
    if isinstance(node, lark.Tree) and node.data == "conditionalor" and len(node.children) == 2:
        return _disjuncts(node.children[0]) + _disjuncts(node.children[1])
    return [node]


def _unwrap_to(node: Any, stop: str) -> Any:
    while isinstance(node, lark.Tree) and node.data != stop and len(node.children) == 1:
        node = node.children[0]
    if isinstance(node, lark.Tree) and node.data == "primary" and node.children and \
            isinstance(node.children[0], lark.Tree) and node.children[0].data == "paren_expr":
        return _unwrap_to(node.children[0].children[0], stop)
    return node


def _descend(node: Any) -> Any:
    """Go down through every single-child node (wrappers and parentheses)."""
    while isinstance(node, lark.Tree) and len(node.children) == 1:
        node = node.children[0]
    return node


def _atom_constraint(node: Any, path: tuple[str, ...]) -> Constraint | None:
    node = _descend(node)
    # parenthesised conjunction or disjunction
    if isinstance(node, lark.Tree) and node.data in ("conditionalor", "conditionaland"):
        return constraint_on(node, path)
    if isinstance(node, lark.Tree) and node.data == "relation" and len(node.children) == 2:
        op = node.children[0]
        right = node.children[1]
        if isinstance(op, lark.Tree) and op.data == "relation_eq":
            left = op.children[0]
            if _path_of(left) == path:
                v = _string_literal_of(right)
                if v is not None:
                    return Constraint(exact=frozenset([v]))
            if _path_of(right) == path:
                v = _string_literal_of(left)
                if v is not None:
                    return Constraint(exact=frozenset([v]))
        if isinstance(op, lark.Tree) and op.data == "relation_in" and _path_of(op.children[0]) == path:
            values = _string_list_literal(right)
            if values is not None:
                return Constraint(exact=frozenset(values))
        return None
    # path.endsWith("lit")
    inner = node
    if isinstance(inner, lark.Tree) and inner.data == "member_dot_arg" and \
            str(inner.children[1]) == "endsWith" and _path_of(inner.children[0]) == path and \
            len(inner.children) > 2:
        args = inner.children[2].children if isinstance(inner.children[2], lark.Tree) else []
        if len(args) == 1:
            v = _string_literal_of(args[0])
            if v is not None:
                return Constraint(suffixes=frozenset([v]))
    return None


def _string_list_literal(node: Any) -> list[str] | None:
    node = _unwrap(node)
    if isinstance(node, lark.Tree) and node.data == "list_lit":
        if not node.children:
            return []
        exprlist = node.children[0]
        out = []
        for e in exprlist.children:
            v = _string_literal_of(e)
            if v is None:
                return None
            out.append(v)
        return out
    return None


def constraint_on(tree: Any, path: tuple[str, ...]) -> Constraint | None:
    """A constraint on ``path`` that holds whenever the expression is true.

    Sound under CEL semantics: for ``a && b``, if ``a`` is false the whole is
    false even when ``b`` errors, so a top-level conjunct that constrains the
    path constrains the expression. For ``a || b`` both sides must constrain it.
    Returns None when nothing can be said.
    """
    node = _unwrap_to(tree, "conditionalor")
    # a ternary at the top says nothing we use
    if isinstance(node, lark.Tree) and node.data == "expr" and len(node.children) > 1:
        return None
    disjuncts = _disjuncts(node)
    if len(disjuncts) > 1:
        result = Constraint()
        for d in disjuncts:
            c = _and_constraint(d, path)
            if c is None:
                return None
            result = result.union(c)
        return result
    return _and_constraint(node, path)


def _and_constraint(node: Any, path: tuple[str, ...]) -> Constraint | None:
    best: Constraint | None = None
    for conj in _conjuncts(node):
        c = _atom_constraint(conj, path)
        if c is None:
            continue
        # Prefer exact constraints (cheaper to index), else the first one.
        if best is None or (not best.exact and c.exact):
            best = c
    return best
