"""The policy loader: every problem is rejected with its file, line and column
(1-based, pointing into the YAML file), the whole set is refused on any
problem, files are read in name order and the version is a content hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import celexpr
from gateway.policy import PolicyLoadError, Principal, Problem, Request, compile_sources, load_directory
from gateway.policy.loader import policy_files, version_of

ENGINES = [pytest.param(celexpr.RustEngine, id="rust"), pytest.param(celexpr.PyEngine, id="python")]

HEAD = "apiVersion: egress/v1\nkind: Policy\nname: p\n"
GOOD = HEAD + "selector: 'true'\nrules:\n  - name: r\n    action: allow\n    when: 'true'\n"


def rule_file(when_line: str, *, selector: str = "'true'", action: str = "allow") -> str:
    """A policy whose single rule has the given ``when`` line(s), indented 4."""
    return (HEAD + f"selector: {selector}\nrules:\n  - name: r\n    action: {action}\n"
            + "".join("    " + line + "\n" for line in when_line.split("\n")))


def at(text: str, needle: str, nth: int = 0, shift: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the nth occurrence of needle, plus shift columns."""
    idx = -1
    for _ in range(nth + 1):
        idx = text.index(needle, idx + 1)
    line = text.count("\n", 0, idx) + 1
    col = idx - (text.rfind("\n", 0, idx) + 1) + 1
    return line, col + shift


def problems(text: str, name: str = "p.yaml", engine=None) -> list[Problem]:
    with pytest.raises(PolicyLoadError) as ei:
        compile_sources([(name, text)], engine=engine() if engine else None)
    return ei.value.problems


def one_problem(text: str, engine=None) -> Problem:
    ps = problems(text, engine=engine)
    assert len(ps) == 1, ps
    return ps[0]


def where(p: Problem) -> tuple[str, int, int]:
    return p.file, p.line, p.column


# ---------------------------------------------------------------------------
# structure


def test_a_good_file_loads():
    ps = compile_sources([("p.yaml", GOOD)])
    (pol,) = ps.policies
    assert (pol.name, pol.mode, pol.file, pol.line, pol.description) == ("p", "enforce", "p.yaml", 1, "")
    (r,) = pol.rules
    assert (r.name, r.action, r.reason, r.allow_internal, r.line) == ("r", "allow", "", (), 6)


def test_every_key_is_accepted():
    text = HEAD + (
        "description: all keys\nmode: shadow\nselector: principal.tenant == 'a'\nrules:\n"
        "  - name: lan\n    description: the office network\n    action: allow\n"
        "    when: request.host.endsWith('.corp')\n    reason: office\n"
        "    allow_internal: [10.0.0.0/8, 'fd00::/8']\n"
        "  - action: deny\n    when: true\n")
    (pol,) = compile_sources([("p.yaml", text)]).policies
    assert (pol.mode, pol.description) == ("shadow", "all keys")
    lan, unnamed = pol.rules
    assert (lan.reason, [str(n) for n in lan.allow_internal]) == ("office", ["10.0.0.0/8", "fd00::/8"])
    assert unnamed.name == "rule-2"  # rules without a name are numbered


def test_invalid_yaml():
    text = GOOD.replace("    action: allow\n", "   action: allow\n")
    p = one_problem(text)
    assert where(p) == ("p.yaml", *at(text, "action"))
    assert p.message.startswith("invalid YAML")
    text = rule_file("when: [unclosed")
    p = one_problem(text)
    assert p.message.startswith("invalid YAML") and p.line == text.count("\n") + 1  # at the end of the stream


@pytest.mark.parametrize("tagged", ['selector: !foo "true"', "selector: !!python/name:os.system ''"])
def test_a_tag_yaml_cannot_construct_is_a_positioned_problem_not_a_crash(tagged):
    text = GOOD.replace(GOOD[GOOD.index("selector:"):GOOD.index("\n", GOOD.index("selector:"))], tagged)
    assert tagged in text
    p = one_problem(text)
    assert p.message.startswith("invalid YAML") and "constructor" in p.message
    assert (p.line, p.column) == at(text, "!")


@pytest.mark.parametrize("text,needle,what", [
    (GOOD.replace("selector:", "selectr:"), "selectr", "policy"),
    (GOOD + "    whne: 'true'\n", "whne", "rule"),
    (GOOD.replace("name: p\n", "name: p\nmetadata: {}\n"), "metadata", "policy"),
])
def test_unknown_key(text, needle, what):
    ps = problems(text)
    assert where(ps[0]) == ("p.yaml", *at(text, needle))
    assert f"unknown key {needle!r} in {what}" in ps[0].message


@pytest.mark.parametrize("text,needle,nth", [
    (GOOD.replace("selector: 'true'\n", "selector: 'true'\nselector: 'false'\n"), "selector", 1),
    (GOOD + "    when: 'false'\n", "when", 1),
    (GOOD + "    action: deny\n", "action", 1),
])
def test_duplicate_key(text, needle, nth):
    p = one_problem(text)
    assert where(p) == ("p.yaml", *at(text, needle, nth))
    assert f"duplicate key {needle!r}" in p.message


@pytest.mark.parametrize("key", ["name", "selector", "rules"])
def test_missing_policy_key(key):
    text = "# comment\n" + "".join(line + "\n" for line in GOOD.splitlines()
                                   if not line.startswith(key) and not (key == "rules" and line.startswith(" ")))
    ps = problems(text)
    assert any(where(p) == ("p.yaml", 2, 1) and f"missing required key {key!r}" in p.message for p in ps), ps


@pytest.mark.parametrize("key", ["when", "action"])
def test_missing_rule_key(key):
    text = GOOD + "  - name: second\n" + ("    when: 'true'\n" if key == "action" else "    action: deny\n")
    p = one_problem(text)
    assert where(p) == ("p.yaml", *at(text, "name: second"))
    assert f"missing required key {key!r}" in p.message


def test_bad_action():
    text = GOOD.replace("action: allow", "action: permit")
    p = one_problem(text)
    assert where(p) == ("p.yaml", *at(text, "permit"))
    assert "action must be allow or deny, got 'permit'" in p.message


def test_bad_mode():
    text = GOOD.replace("selector:", "mode: audit\nselector:")
    p = one_problem(text)
    assert where(p) == ("p.yaml", *at(text, "audit"))
    assert "mode must be one of enforce, shadow" in p.message


@pytest.mark.parametrize("text,needle,message", [
    (GOOD.replace("egress/v1", "egress/v2"), "egress/v2", "unsupported apiVersion"),
    (GOOD.replace("kind: Policy", "kind: Rule"), "Rule", "unsupported kind"),
    (GOOD.replace("name: p", "name: My Policy"), "My Policy", "policy name 'My Policy' must be"),
    (GOOD.replace("name: r", "name: Rule_1"), "Rule_1", "rule name 'Rule_1' must be"),
    (GOOD.replace("rules:\n", "rules: []\n").split("  - name")[0], "[]", "rules must be a non-empty list"),
    (GOOD.replace("when: 'true'", "when: ''"), "''", "when expression is empty"),
    (GOOD.replace("when: 'true'", "when: 42"), "42", "when expression must be a string, got int"),
    (GOOD.replace("selector: 'true'", "selector: [a]"), "[a]", "selector expression must be a string"),
    (GOOD.replace("  - name: r\n    action: allow\n    when: 'true'\n", "  - just a string\n"), "just",
     "rule must be a mapping"),
    ("- a list\n", "- a list", "policy must be a mapping"),
])
def test_other_structure_errors(text, needle, message):
    p = problems(text)[0]
    assert where(p) == ("p.yaml", *at(text, needle))
    assert message in p.message


def test_duplicate_rule_and_policy_names():
    text = GOOD + "  - name: r\n    action: deny\n    when: 'true'\n"
    p = one_problem(text)
    assert where(p) == ("p.yaml", *at(text, "name: r", 1, shift=6))
    assert "rule name 'r' is used twice" in p.message
    with pytest.raises(PolicyLoadError) as ei:
        compile_sources([("a.yaml", GOOD), ("b.yaml", "# second\n" + GOOD)])
    (p,) = ei.value.problems
    assert where(p) == ("b.yaml", 2, 1) and "'p' is already used in a.yaml" in p.message
    # two documents in one file
    text = GOOD + "---\n" + GOOD
    p = one_problem(text)
    assert where(p) == ("p.yaml", 10, 1)


def test_yaml_booleans_are_accepted_as_expressions():
    ps = compile_sources([("p.yaml", GOOD.replace("'true'", "true"))])
    d = ps.decide(Principal.make("t", "a"), Request("x", 443), _public())
    assert d.allowed


def _public():
    from gateway.addresses import classify
    from gateway.policy import Destination
    return Destination((classify("93.184.216.34"),))


# ---------------------------------------------------------------------------
# CEL errors: the position is inside the YAML file, at the expression error,
# whatever the scalar style


CEL_CASES = {
    "plain": ('when: request.host == "a" &&& x', "&&&", 2),
    "single-quoted": ("when: 'request.host == ''a'' &&& x'", "&&&", 2),
    "double-quoted": ('when: "request.host == \\"a\\" &&& x"', "&&&", 2),
    "double-quoted-unicode-escape": ('when: "request.host == \\u0022a\\u0022 &&& x"', "&&&", 2),
    # after "&&" or "(", the unexpected token is the first "&&" of "&&&"
    "literal-block": ('when: |\n  request.host == "a"\n    && &&& x', "&&&", 0),
    "literal-block-comment": ('when: |-  # a comment\n  request.host == "a"\n    && &&& x', "&&&", 0),
    "folded-block": ('when: >\n  request.host == "a"\n  && (&&& x)', "&&&", 0),
    "folded-block-more-indented": ('when: >\n  request.host in ["a",\n                   "b"] &&& x', "&&&", 2),
    "plain-multi-line": ('when: request.host == "a"\n  && (&&& x)', "&&&", 0),
    "double-quoted-multi-line": ('when: "request.host == \\"a\\"\n  && (&&& x)"', "&&&", 0),
    "single-quoted-multi-line": ("when: 'request.host == ''a''\n\n  && (&&& x)'", "&&&", 0),
    "double-quoted-escaped-line-break": ('when: "request.host == \\"a\\" \\\n  && (&&& x)"', "&&&", 0),
    "unclosed-string": ('when: request.host == "a', '"a', 0),
    "bad-token": ("when: request.host == 'a' ; true", ";", 0),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", list(CEL_CASES))
def test_cel_syntax_error_position(case, engine):
    when, needle, shift = CEL_CASES[case]
    text = rule_file(when)
    p = one_problem(text, engine)
    assert where(p) == ("p.yaml", *at(text, needle, shift=shift)), (p, text)
    assert p.message.startswith("when expression: syntax error")


def test_cel_syntax_error_position_with_crlf_line_endings():
    text = rule_file('when: >\n  request.host == "a"\n  && (&&& x)').replace("\n", "\r\n")
    p = one_problem(text)
    assert (p.line, p.column) == at(text.replace("\r\n", "\n"), "&&&")


def test_cel_syntax_error_in_selector():
    text = GOOD.replace("selector: 'true'", "selector: >\n  principal.tenant == 'a' &&\n  principal.agent ==")
    p = one_problem(text)
    # an unexpected end of input is reported just after the last character
    assert where(p) == ("p.yaml", *at(text, "==", 1, shift=2))
    assert p.message == "selector expression: syntax error: unexpected end of expression"


REGEX_CASES = {
    "plain": ('when: request.path.matches("(")', "missing )"),
    "global-function": ('when: matches(request.path, "[a-")', "missing ]"),
    "folded-second-line": ('when: >\n  request.host == "a" &&\n  request.path.matches("a**")', "bad repetition"),
    "lookahead-not-re2": ('when: request.path.matches("^(?=/admin)")', "invalid RE2"),
    "backreference-not-re2": (r'when: request.path.matches(r"(a)\1")', "invalid RE2"),
    "unicode-class-not-python": (r'when: request.path.matches("\\pL")', "not supported"),
    "named-group-re2-only-spelling": ('when: request.path.matches("(?<n>a)")', "not supported"),
    "too-many-repeats-for-re2": ('when: request.path.matches("a{1001}")', "invalid RE2"),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", list(REGEX_CASES))
def test_bad_regex_in_matches(case, engine):
    when, message = REGEX_CASES[case]
    text = rule_file(when)
    p = one_problem(text, engine)
    assert where(p) == ("p.yaml", *at(text, "matches")), (p, text)
    assert p.message.startswith("when expression: ") and message in p.message


def test_valid_regexes_load():
    text = rule_file(r'when: request.path.matches("^/v[0-9]+/(users|teams)/[^/]+$") && '
                     r'request.host.matches(r"(?i)^API\.EXAMPLE\.COM$") && matches(request.query, "[[:alpha:]]")')
    compile_sources([("p.yaml", text)])


# ---------------------------------------------------------------------------
# allow_internal


def test_allow_internal_on_a_deny_rule():
    text = rule_file("when: 'true'\nallow_internal: [10.0.0.0/8]", action="deny")
    p = one_problem(text)
    assert where(p) == ("p.yaml", *at(text, "[10.0.0.0/8]"))
    assert "allow_internal only makes sense on an allow rule" in p.message


@pytest.mark.parametrize("entries,bad,message", [
    ("[10.0.0.1/8]", "10.0.0.1/8", "has host bits set"),
    ("[10.0.0.0/8, nope]", "nope", "invalid CIDR range 'nope'"),
    ("['::1/129']", "'::1/129'", "invalid CIDR range '::1/129'"),
    ("[10.0.0.0/33]", "10.0.0.0/33", "invalid CIDR range"),
    ("[[10.0.0.0/8]]", "[10.0.0.0/8]]", "allow_internal entry must be a string"),
    ("10.0.0.0/8", "10.0.0.0/8", "allow_internal must be a list of CIDR ranges"),
])
def test_bad_cidr(entries, bad, message):
    text = rule_file(f"when: 'true'\nallow_internal: {entries}")
    p = one_problem(text)
    assert where(p) == ("p.yaml", *at(text, bad, shift=0)), p
    assert message in p.message


# ---------------------------------------------------------------------------
# directories


def test_every_problem_of_every_file_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD.replace("action: allow", "action: permit"))
    (tmp_path / "b.yaml").write_text(GOOD.replace("name: p", "name: q").replace("'true'\n", "'1 +'\n", 1))
    (tmp_path / "c.yaml").write_text(GOOD.replace("name: p", "name: c"))
    with pytest.raises(PolicyLoadError) as ei:
        load_directory(tmp_path)
    got = [(Path(p.file).name, p.line, p.column) for p in ei.value.problems]
    assert got == [("a.yaml", 7, 13), ("b.yaml", 4, 15)]
    assert str(ei.value).endswith("(and 1 more)")
    assert str(ei.value.problems[0]) == f"{tmp_path / 'a.yaml'}:7:13: action must be allow or deny, got 'permit'"


def test_test_files_and_other_files_are_ignored(tmp_path):
    (tmp_path / "10-p.yaml").write_text(GOOD)
    (tmp_path / "20-q.yml").write_text(GOOD.replace("name: p", "name: q"))
    for ignored in ("p.test.yaml", "p.test.yml", "p_test.yaml", "p_test.yml", ".hidden.yaml", "README.md",
                    "p.json", "p.yaml.bak"):
        (tmp_path / ignored).write_text("this is: [not a policy")
    (tmp_path / "sub.yaml").mkdir()
    (tmp_path / "sub.yaml" / "x.yaml").write_text("broken: [")
    assert [p.name for p in policy_files(tmp_path)] == ["10-p.yaml", "20-q.yml"]
    ps = load_directory(tmp_path)
    assert [p.name for p in ps.policies] == ["p", "q"]


def test_files_are_read_in_name_order(tmp_path):
    for fname, pname in (("b.yaml", "b"), ("a.yml", "a"), ("2-y.yaml", "y"), ("10-x.yaml", "x"), ("B.yaml", "cap")):
        (tmp_path / fname).write_text(GOOD.replace("name: p", f"name: {pname}"))
    ps = load_directory(tmp_path)
    assert [Path(f).name for f in ps.files] == ["10-x.yaml", "2-y.yaml", "B.yaml", "a.yml", "b.yaml"]
    assert [p.name for p in ps.policies] == ["x", "y", "cap", "a", "b"]
    assert ps.decide(Principal.make("t", "a"), Request("h", 443), _public()).rule == "x/r"


def test_missing_directory_and_unreadable_file(tmp_path):
    with pytest.raises(PolicyLoadError) as ei:
        load_directory(tmp_path / "nope")
    assert "does not exist" in str(ei.value)
    (tmp_path / "bad.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(PolicyLoadError) as ei:
        load_directory(tmp_path)
    assert ei.value.problems[0].file.endswith("bad.yaml") and "cannot read" in ei.value.problems[0].message


def test_an_empty_directory_is_an_empty_set(tmp_path):
    ps = load_directory(tmp_path)
    assert ps.policies == [] and ps.version == version_of([])
    assert ps.decide(Principal.make("t", "a"), Request("h", 443), _public()).code == "default_deny"


# ---------------------------------------------------------------------------
# versions


def test_version_is_stable_and_follows_content(tmp_path):
    d1, d2 = tmp_path / "one", tmp_path / "two"
    for d in (d1, d2):
        d.mkdir()
        (d / "10-p.yaml").write_text(GOOD)
    v = load_directory(d1).version
    assert v.startswith("sha256:") and len(v) == len("sha256:") + 16
    assert load_directory(d1).version == v  # stable
    assert load_directory(d2).version == v  # the directory's path does not count
    assert load_directory(d1, engine=celexpr.PyEngine()).version == v  # nor does the engine
    assert compile_sources([("10-p.yaml", GOOD)]).version == v
    (d2 / "10-p.test.yaml").write_text("whatever")
    assert load_directory(d2).version == v  # ignored files do not count
    (d2 / "10-p.yaml").write_text(GOOD + "# a comment\n")
    assert load_directory(d2).version != v  # any change of content does
    (d2 / "10-p.yaml").write_text(GOOD)
    assert load_directory(d2).version == v
    (d2 / "10-p.yaml").rename(d2 / "20-p.yaml")
    assert load_directory(d2).version != v  # and so does a file name


# ---------------------------------------------------------------------------
# messages, and the examples in docs/policy-language.md


@pytest.mark.parametrize("source,message,column", [
    ('request.host == "a" &&& x', "syntax error: unexpected character '&'", 23),
    ("request.host == 'a' && (&&& x)", "syntax error: unexpected '&&'", 25),
    ("request.host ==", "syntax error: unexpected end of expression", 16),
    ("request.host == 'a' b", "syntax error: unexpected 'b'", 21),
    ('request.host == "a', "syntax error: unexpected character '\"'", 17),
])
def test_syntax_error_messages(source, message, column):
    with pytest.raises(celexpr.CelCompileError) as ei:
        celexpr.parse(source)
    assert (ei.value.message, ei.value.line, ei.value.column) == (message, 1, column)


DOC = Path(__file__).resolve().parent.parent / "docs" / "policy-language.md"


def doc_blocks() -> list[tuple[str, str]]:
    import re
    return re.findall(r"```(\w+)\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_every_yaml_example_in_the_docs_loads():
    blocks = doc_blocks()
    yaml_blocks = [(i, text) for i, (lang, text) in enumerate(blocks) if lang == "yaml"]
    assert len(yaml_blocks) >= 10
    invalid = 0
    for i, text in yaml_blocks:
        if text.startswith("# invalid"):
            invalid += 1
            with pytest.raises(PolicyLoadError) as ei:
                compile_sources([("policies/acme.yaml", text)])
            lang, expected = blocks[i + 1]  # the text block that follows shows the report
            assert lang == "text"
            assert [str(p) for p in ei.value.problems] == expected.strip().splitlines()
        else:
            compile_sources([(f"example-{i}.yaml", text)])
    assert invalid == 1
