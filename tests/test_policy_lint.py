"""``egress policy lint``: one fixture per class of problem (each file holds
exactly that problem) with its code, severity, line and column; the default
bundle; the text, JSON and SARIF outputs; exit codes; suppressions; secret
names (never values); and a property: a typo of any documented field is
answered with a did-you-mean naming that field."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cli import main
from gateway.policy import PolicyLoadError, compile_sources
from gateway.policytools import lint_checks
from gateway.policytools.lint_checks import CHECKS, FIELDS, VARIABLES, lint_sources
from tests.conftest import register_secret

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "policies" / "default"

HEAD = 'apiVersion: egress/v1\nkind: Policy\nname: acme\nselector: principal.tenant == "acme"\nrules:\n'


def rule(when: str, *, action: str = "allow", name: str = "r", extra: str = "") -> str:
    return f"  - name: {name}\n    action: {action}\n    when: {when}\n" + extra


def at(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the nth occurrence of needle."""
    idx = -1
    for _ in range(nth + 1):
        idx = text.index(needle, idx + 1)
    return text.count("\n", 0, idx) + 1, idx - (text.rfind("\n", 0, idx) + 1) + 1


def run_lint(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["policy", "lint", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def lint_dir(capsys, directory: Path, *extra: str) -> tuple[int, list[dict]]:
    rc, out, _ = run_lint(capsys, str(directory), "--format", "json", *extra)
    return rc, json.loads(out)["findings"]


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path


def only(findings: list[dict]) -> dict:
    assert len(findings) == 1, findings
    return findings[0]


# ---------------------------------------------------------------------------
# one fixture per class of problem: (code, severity, policy text, needle, nth)

GUARD = ('apiVersion: egress/v1\nkind: Policy\nname: guard\nselector: "true"\nrules:\n'
         + rule('request.host == "evil.example"', action="deny", name="no-evil"))

FIXTURES = {
    "EG100-invalid-action": ("EG100", "error", HEAD + rule('request.host == "a.com"').replace("allow", "permit"),
                             "permit", 0),
    "EG101-syntax": ("EG101", "error", HEAD + rule('request.host == "a.com" && (request.method == "GET"'),
                     None, 0),
    "EG102-bad-reference": ("EG102", "error", HEAD + rule(
        'request.host == "api.github.com"',
        extra='    inject:\n      headers:\n        authorization: "Bearer ${vault:nope}"\n'), "nope", 0),
    "EG201-unknown-variable": ("EG201", "error", HEAD + rule('reqest.host == "a.com"'), "reqest", 0),
    "EG202-unknown-field": ("EG202", "error", HEAD + rule('request.hots == "a.com"'), "hots", 0),
    "EG203-selector-reads-request": ("EG203", "error", HEAD.replace(
        'selector: principal.tenant == "acme"', 'selector: principal.tenant == "acme" && request.port == 443')
        + rule('request.host == "a.com"'), "request.port", 0),
    "EG204-header-case": ("EG204", "warning", HEAD + rule(
        'request.host == "a.com" && request.headers["User-Agent"] == "x"'), '"User-Agent"', 0),
    "EG301-header-vs-int": ("EG301", "error", HEAD + rule(
        "'request.host == \"a.com\" && request.headers[\"x-n\"] == 5'"), "5'", 0),
    "EG301-port-vs-string": ("EG301", "error", HEAD + rule(
        'request.host == "a.com" && request.port == "443"'), '"443"', 0),
    "EG301-host-vs-int": ("EG301", "error", HEAD + rule("request.host == 7"), "7", 0),
    "EG302-startswith-on-int": ("EG302", "error", HEAD + rule(
        'request.host == "a.com" && request.port.startsWith("4")'), "startsWith", 0),
    "EG303-unavailable-function": ("EG303", "error", HEAD + rule('request.host.lowerAscii() == "a.com"'),
                                   "lowerAscii", 0),
    "EG304-bad-timestamp": ("EG304", "error", HEAD + rule(
        'request.host == "a.com" && now < timestamp("2030-01-01")'), '"2030-01-01"', 0),
    "EG401-when-false": ("EG401", "warning", HEAD + rule("false"), "false", 0),
    "EG402-contradiction": ("EG402", "warning", HEAD + rule(
        'request.host == "a.com" && request.method == "GET" && request.method == "POST"'),
        'request.method == "POST"', 0),
    "EG403-in-empty-list": ("EG403", "warning", HEAD + rule("request.host in []"), "[]", 0),
    "EG404-shadowed-allow": ("EG404", "warning", GUARD + "---\n" + HEAD + rule(
        'request.host == "evil.example" && request.method == "GET"', name="evil"),
        'request.host == "evil.example" && request.method', 0),
    "EG405-impossible-scheme": ("EG405", "warning", HEAD + rule(
        'request.host == "a.com" && request.scheme == "HTTPS"'), '"HTTPS"', 0),
    "EG501-any-host": ("EG501", "warning", HEAD + rule('request.method == "GET"'), 'request.method', 0),
    "EG502-any-tenant": ("EG502", "warning", HEAD.replace('principal.tenant == "acme"', '"true"')
                         + rule('request.host == "a.com"'), "true", 0),
    "EG601-inject-overlap": ("EG601", "warning", HEAD + rule(
        'request.host == "api.github.com"', name="gh-a",
        extra='    inject:\n      headers:\n        authorization: "Bearer ${local:gh/a}"\n') + rule(
        'request.host == "api.github.com" && request.method == "POST"', name="gh-b",
        extra='    inject:\n      headers:\n        authorization: "Bearer ${local:gh/b}"\n'), "inject", 1),
    "EG603-inject-any-host": ("EG603", "error", HEAD + rule(
        'request.host.startsWith("api.")',
        extra='    inject:\n      placeholders:\n        gh: local:gh/a\n'), "inject", 0),
    "EG801-engine-difference": ("EG801", "warning", HEAD + rule(
        'request.host == "a.com" && request.port == 443u'), "request.port == 443u", 0),
}


@pytest.mark.parametrize("case", FIXTURES)
def test_each_problem_is_found_where_it_is(case, tmp_path, capsys):
    code, severity, text, needle, nth = FIXTURES[case]
    rc, findings = lint_dir(capsys, write(tmp_path, text))
    f = only(findings)
    if needle is None:  # where the loader puts it
        with pytest.raises(PolicyLoadError) as ei:
            compile_sources([(str(tmp_path / "p.yaml"), text)])
        line, col = ei.value.problems[0].line, ei.value.problems[0].column
    else:
        line, col = at(text, needle, nth)
    assert (f["code"], f["severity"], f["line"], f["column"]) == (code, severity, line, col)
    assert f["file"] == str(tmp_path / "p.yaml")
    assert rc == (1 if severity == "error" else 0)


def test_positions_are_literal_numbers(tmp_path, capsys):
    """The same checks with positions written out, not computed by a helper."""
    text = HEAD + rule('request.hots == "a.com"')  # line 8: '    when: request.hots == "a.com"'
    f = only(lint_dir(capsys, write(tmp_path, text))[1])
    assert (f["line"], f["column"], f["end_column"]) == (8, 19, 23)
    assert f["message"] == ("unknown field `request.hots`: did you mean `request.host`? "
                            "(an evaluation error: this allow rule never matches)")
    text = HEAD + rule('request.host == "a.com" && request.port == "443"')
    f = only(lint_dir(capsys, write(tmp_path, text))[1])
    assert (f["code"], f["line"], f["column"]) == ("EG301", 8, 54)


def test_syntax_error_position_is_the_loaders(tmp_path, capsys):
    text = HEAD + rule('request.host == "a.com" && (request.method == "GET"')
    f = only(lint_dir(capsys, write(tmp_path, text))[1])
    assert (f["code"], f["line"], f["column"]) == ("EG101", 8, 62)
    assert "syntax error" in f["message"]


@pytest.mark.parametrize("style", ["folded", "literal", "double-quoted", "single-quoted"])
def test_positions_inside_every_yaml_style(style, tmp_path, capsys):
    expr_lines = ['request.host == "a.com"', '&& request.hots == "x"']
    if style == "folded":
        when = ">\n      " + "\n      ".join(expr_lines)
    elif style == "literal":
        when = "|\n      " + "\n      ".join(expr_lines)
    elif style == "double-quoted":
        when = '"request.host == \\"a.com\\"\n      && request.hots == \\"x\\""'
    else:
        when = "'request.host == \"a.com\"\n      && request.hots == \"x\"'"
    text = HEAD + rule(when)
    f = only(lint_dir(capsys, write(tmp_path, text))[1])
    assert f["code"] == "EG202"
    assert (f["line"], f["column"]) == at(text, "hots")


def test_unknown_field_in_has_and_index_forms(tmp_path, capsys):
    text = HEAD + rule("'request.host == \"a.com\" && has(destination.ipz) && request[\"methd\"] == \"GET\"'")
    findings = lint_dir(capsys, write(tmp_path, text))[1]
    assert [(f["code"], f["line"], f["column"]) for f in findings] == [
        ("EG202", *at(text, "ipz")), ("EG202", *at(text, '"methd"'))]
    assert "`destination.ip` or `destination.ips`" in findings[0]["message"]
    assert "`request.method`" in findings[1]["message"]


def test_type_misuse_variants(tmp_path, capsys):
    cases = {
        'request.host == "a.com" && request.port > "80"': ("EG301", '"80"'),
        'request.host == "a.com" && request.port in ["80", "443"]': ("EG301", '"80"'),
        'request.host == "a.com" && request.port + "1" == "4431"': ("EG301", "request.port +"),
        "'request.host == \"a.com\" && \"x\" in request.path'": ("EG301", '"x" in'),
        'request.host == "a.com" && now.getHours() == 1 && request.method.getHours() == 1': ("EG302", "getHours", 1),
        'request.host == "a.com" && request.port && true': ("EG301", "request.port &&"),
        "'request.host == \"a.com\" && \"abc\"[0] == \"a\"'": ("EG302", '"abc"[0]'),
    }
    for when, (code, needle, *nth) in cases.items():
        text = HEAD + rule(when)
        f = only(lint_dir(capsys, write(tmp_path, text))[1])
        assert (f["code"], f["line"], f["column"]) == (code, *at(text, needle, *nth)), when


def test_shadowing_by_same_selector_and_by_deny_true(tmp_path, capsys):
    same = HEAD + rule("'request.host == \"a.com\"'", name="deny-a", action="deny") + rule(
        'request.host == "a.com"', name="allow-a")
    f = only(lint_dir(capsys, write(tmp_path, same))[1])
    assert (f["code"], f["rule"]) == ("EG404", "allow-a")
    assert "acme/deny-a" in f["message"]
    everything = ('apiVersion: egress/v1\nkind: Policy\nname: lockdown\nselector: "true"\nrules:\n'
                  + rule("true", action="deny", name="all") + "---\n" + HEAD + rule('request.host == "b.com"'))
    f = only(lint_dir(capsys, write(tmp_path, everything))[1])
    assert (f["code"], f["policy"], f["rule"]) == ("EG404", "acme", "r")


def test_no_shadowing_when_the_deny_does_not_cover(tmp_path, capsys):
    narrower = HEAD + rule('request.host == "a.com" && request.method == "POST"', name="no-post", action="deny") \
        + rule('request.host == "a.com"', name="allow-a")
    assert lint_dir(capsys, write(tmp_path, narrower))[1] == []
    shadow_mode = GUARD.replace("rules:", "mode: shadow\nrules:") + "---\n" + HEAD + rule(
        'request.host == "evil.example"')
    assert lint_dir(capsys, write(tmp_path, shadow_mode))[1] == []
    other_tenant = GUARD.replace('selector: "true"', 'selector: principal.tenant == "beta"') + "---\n" + HEAD \
        + rule('request.host == "evil.example"')
    assert lint_dir(capsys, write(tmp_path, other_tenant))[1] == []


def test_inject_overlap_needs_overlapping_hosts_and_principals(tmp_path, capsys):
    def injector(name, tenant, host, ref):
        return (f'apiVersion: egress/v1\nkind: Policy\nname: {name}\nselector: principal.tenant == "{tenant}"\n'
                f"rules:\n" + rule(f'request.host == "{host}"', name="gh",
                                   extra=f'    inject:\n      headers:\n        authorization: "${{{ref}}}"\n'))
    disjoint_tenants = injector("a", "acme", "api.github.com", "local:a") + "---\n" + \
        injector("b", "beta", "api.github.com", "local:b")
    assert lint_dir(capsys, write(tmp_path, disjoint_tenants))[1] == []
    disjoint_hosts = injector("a", "acme", "api.github.com", "local:a") + "---\n" + \
        injector("b", "acme", "gitlab.com", "local:b")
    assert lint_dir(capsys, write(tmp_path, disjoint_hosts))[1] == []
    same_refs = injector("a", "acme", "api.github.com", "local:a") + "---\n" + \
        injector("b", "acme", "api.github.com", "local:a")
    assert lint_dir(capsys, write(tmp_path, same_refs))[1] == []
    overlap = injector("a", "acme", "api.github.com", "local:a") + "---\n" + \
        injector("b", "acme", "api.github.com", "local:b")
    f = only(lint_dir(capsys, write(tmp_path, overlap))[1])
    assert (f["code"], f["policy"], f["line"]) == ("EG601", "b", at(overlap, "inject", 1)[0])
    assert "local:a" in f["message"] and "local:b" in f["message"]


# ---------------------------------------------------------------------------
# engine differences


@pytest.mark.parametrize("when,needle,nth", [
    ('request.host == "a.com" && size("é") == 1', '"é"', 0),
    ('request.host == "a.com" && [1, 2][-1] == 2', "-1", 0),
    ('request.host == "a.com" && string(now) != ""', "string(now)", 0),
    ('request.host == "a.com" && now.getHours("Europe/Paris") == 1', 'now.getHours("Europe/Paris")', 0),
    ('request.host == "a.com" && int(now) > 0', "int(now)", 0),
    ('request.host == "a.com" && string(true) == "true"', "string(true)", 0),
    ('request.host == "a.com" && bool("true")', "bool", 0),
    ('request.host == "a.com" && now - timestamp("2030-01-01T00:00:00Z") > duration("1d")', '"1d"', 0),
    ('request.host == "a.com" && duration("1h") * 2 > duration("1h")', 'duration("1h") * 2', 0),
    ('request.host == "a.com" && request.path.matches(principal.labels.re)', "principal.labels.re", 0),
    ('request.host == "a.com" && principal.labels.map(k, k).size() > 0', "map", 0),
    ('request.host == "a.com" && {"a": 1, "a": 2}.size() == 1', '"a"', 1),
    ('request.host == "a.com" && request.port > 1.5', "request.port > 1.5", 0),
    ('request.host == "a.com" && [1, 2] == [1, 2.0]', "[1, 2] == [1, 2.0]", 0),
    ('request.host == "a.com" && -(-9223372036854775807 - 1) < 0', "-(-9223372036854775807 - 1)", 0),
])
def test_engine_differences_are_warned(when, needle, nth, tmp_path, capsys):
    text = HEAD + rule("'" + when.replace("'", "''") + "'")
    f = only(lint_dir(capsys, write(tmp_path, text))[1])
    assert (f["code"], f["severity"]) == ("EG801", "warning")
    assert (f["line"], f["column"]) == at(text, needle, nth)


@pytest.mark.parametrize("when", ['has(request)', '9223372036854775808 > 1', r'"\q" == "q"'])
def test_rust_only_load_errors_are_warnings_with_python(when, tmp_path, capsys):
    text = HEAD + rule("'request.host == \"a.com\" && " + when.replace("'", "''") + "'")
    assert only(lint_dir(capsys, write(tmp_path, text))[1])["code"] == "EG101"
    assert only(lint_dir(capsys, write(tmp_path, text), "--engine", "python")[1])["code"] == "EG801"


# ---------------------------------------------------------------------------
# the default bundle

# The one finding the bundled policies have today, reported to the owner of
# policies/default: demo/web-read lets the demo tenant read every host on
# purpose ("browse the public web read-only"), so it should say so with a
# suppression comment (see test_default_bundle_is_clean_with_the_proposed_suppression).
KNOWN_DEFAULT_FINDINGS = {("EG501", "20-demo.yaml", "demo", "web-read")}


def test_default_bundle_has_no_errors(capsys):
    rc, findings = lint_dir(capsys, DEFAULT)
    assert rc == 0
    assert [f for f in findings if f["severity"] == "error"] == []
    for engine in ("rust", "python"):
        rc, out, _ = run_lint(capsys, str(DEFAULT), "--engine", engine)
        assert rc == 0, out
    rc, out, _ = run_lint(capsys)  # no directory: the bundled default
    assert rc == 0 and out.splitlines()[-1].startswith(str(DEFAULT) + ": 3 files")


def test_default_bundle_reports_nothing_but_the_known_warning(capsys):
    rc, findings = lint_dir(capsys, DEFAULT, "--fail-on", "warning")
    got = {(f["code"], Path(f["file"]).name, f["policy"], f["rule"]) for f in findings}
    assert got <= KNOWN_DEFAULT_FINDINGS, findings
    assert rc == (1 if findings else 0)


def test_default_bundle_is_clean_with_the_proposed_suppression(tmp_path, capsys):
    for p in DEFAULT.iterdir():
        shutil.copy(p, tmp_path / p.name)
    demo = tmp_path / "20-demo.yaml"
    text = demo.read_text()
    if "egress-lint: ignore EG501" not in text:
        text = text.replace("  - name: web-read\n", "  # egress-lint: ignore EG501 - the demo tenant browses the "
                                                    "public web (read-only) on purpose\n  - name: web-read\n")
        demo.write_text(text)
    rc, out, _ = run_lint(capsys, str(tmp_path), "--fail-on", "warning", "--format", "json")
    doc = json.loads(out)
    assert (rc, doc["findings"], doc["summary"]["suppressed"]) == (0, [], 1)
    rc, out, _ = run_lint(capsys, str(tmp_path), "--fail-on", "warning")
    assert rc == 0 and "no findings" in out


# ---------------------------------------------------------------------------
# outputs


def test_text_output_puts_a_caret_under_the_column(tmp_path, capsys):
    text = HEAD + rule("'request.host == \"a.com\" &&\n      request.hots == \"x\"'")
    rc, out, _ = run_lint(capsys, str(write(tmp_path, text)))
    line, col = at(text, "hots")
    lines = out.splitlines()
    assert lines[0] == ("error[EG202]: unknown field `request.hots`: did you mean `request.host`? "
                        "(an evaluation error: this allow rule never matches)")
    assert lines[1] == f"  --> {tmp_path / 'p.yaml'}:{line}:{col}"
    src_i = next(i for i, s in enumerate(lines) if s.startswith(f"{line} | "))
    src, caret = lines[src_i], lines[src_i + 1]
    prefix = f"{line} | "
    assert src[len(prefix):] == text.splitlines()[line - 1]
    assert caret.startswith(" " * len(str(line)) + " | ")
    assert caret.index("^") - len(prefix) == col - 1
    assert caret.strip(" |") == "^^^^"  # under "hots"
    assert src[caret.index("^"):caret.index("^") + 4] == "hots"
    assert lines[-1] == f"{tmp_path}: 1 file, 1 error, 0 warnings"
    assert rc == 1


def test_text_caret_lines_up_after_a_tab(tmp_path):
    from gateway.policytools.lint import render_finding
    f = lint_checks.Finding("EG202", "error", "x.yaml", 1, 5, "m", 1, 6)
    out = render_finding(f, ["\tab x"]).splitlines()
    assert out[3] == "1 | \tab x" and out[4] == "  | \t   ^"


def test_json_output(tmp_path, capsys):
    text = HEAD + rule('request.hots == "a.com"')
    rc, out, _ = run_lint(capsys, str(write(tmp_path, text)), "--format", "json")
    doc = json.loads(out)
    assert doc["summary"] == {"errors": 1, "warnings": 0, "suppressed": 0}
    assert doc["failed"] is True and doc["fail_on"] == "error" and rc == 1
    f = doc["findings"][0]
    assert set(f) == {"code", "name", "severity", "file", "line", "column", "end_line", "end_column", "message",
                      "help", "policy", "rule"}
    assert (f["name"], f["policy"], f["rule"]) == ("unknown-field", "acme", "r")


def validate_sarif(doc: dict) -> None:
    """The parts of SARIF 2.1.0 that code-scanning tools rely on."""
    assert doc["version"] == "2.1.0" and doc["$schema"].endswith("sarif-2.1.0.json")
    (run,) = doc["runs"]
    driver = run["tool"]["driver"]
    assert isinstance(driver["name"], str) and driver["name"]
    rules = driver["rules"]
    ids = [r["id"] for r in rules]
    assert len(ids) == len(set(ids))
    for r in rules:
        assert re.fullmatch(r"EG\d{3}", r["id"]) and r["shortDescription"]["text"]
        assert r["defaultConfiguration"]["level"] in ("error", "warning")
        assert "helpUri" not in r
    for res in run["results"]:
        assert res["ruleId"] in ids
        assert rules[res["ruleIndex"]]["id"] == res["ruleId"]
        assert res["level"] in ("error", "warning", "note", "none")
        assert isinstance(res["message"]["text"], str) and res["message"]["text"]
        (loc,) = res["locations"]
        phys = loc["physicalLocation"]
        uri = phys["artifactLocation"]["uri"]
        assert uri and not uri.startswith("/") and "\\" not in uri
        region = phys["region"]
        assert region["startLine"] >= 1 and region["startColumn"] >= 1
        if "endLine" in region:
            assert (region["endLine"], region["endColumn"]) >= (region["startLine"], region["startColumn"])


def test_sarif_output_is_structurally_valid(tmp_path, capsys):
    text = GUARD + "---\n" + HEAD + rule('request.hots == "a.com"') + rule(
        'request.host == "evil.example"', name="evil") + rule("request.host in []", name="never")
    rc, out, _ = run_lint(capsys, str(write(tmp_path, text)), "--format", "sarif")
    doc = json.loads(out)
    validate_sarif(doc)
    results = doc["runs"][0]["results"]
    assert {r["ruleId"] for r in results} == {"EG202", "EG404", "EG403"}
    r = next(r for r in results if r["ruleId"] == "EG202")
    assert r["level"] == "error"
    assert r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "p.yaml"
    region = r["locations"][0]["physicalLocation"]["region"]
    assert (region["startLine"], region["startColumn"]) == at(text, "hots")
    assert {x["id"] for x in doc["runs"][0]["tool"]["driver"]["rules"]} == set(CHECKS)
    assert rc == 1


def test_sarif_uri_is_relative_to_the_repository(capsys):
    rc, out, _ = run_lint(capsys, str(DEFAULT), "--format", "sarif")
    doc = json.loads(out)
    validate_sarif(doc)
    for r in doc["runs"][0]["results"]:
        assert r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].startswith("policies/default/")


# ---------------------------------------------------------------------------
# exit codes and suppressions


def test_exit_codes(tmp_path, capsys):
    warn_only = write(tmp_path, HEAD + rule('request.method == "GET"'))
    assert run_lint(capsys, str(warn_only))[0] == 0
    assert run_lint(capsys, str(warn_only), "--fail-on", "warning")[0] == 1
    clean = tmp_path / "clean"
    clean.mkdir()
    write(clean, HEAD + rule('request.host == "a.com"'))
    assert run_lint(capsys, str(clean), "--fail-on", "warning")[0] == 0
    rc, out, err = run_lint(capsys, str(tmp_path / "missing"))
    assert rc == 2 and "is not a directory" in err and out == ""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_lint(capsys, str(empty), "--fail-on", "warning")[0] == 0


def test_suppression_comment_covers_its_rule_only(tmp_path, capsys):
    text = HEAD + "  # egress-lint: ignore EG501 - a crawler, on purpose\n" + rule(
        'request.method == "GET"', name="crawl") + rule('request.method == "HEAD"', name="other")
    rc, out, _ = run_lint(capsys, str(write(tmp_path, text)), "--format", "json")
    doc = json.loads(out)
    assert [(f["code"], f["rule"]) for f in doc["findings"]] == [("EG501", "other")]
    assert doc["summary"]["suppressed"] == 1
    inside = HEAD + rule('request.method == "GET"', name="crawl").replace(
        "    action", "    # egress-lint: ignore EG501, EG204\n    action")
    assert lint_dir(capsys, write(tmp_path, inside))[1] == []


def test_load_errors_cannot_be_suppressed(tmp_path, capsys):
    text = HEAD + "  # egress-lint: ignore EG101\n" + rule('request.host == "a.com" &&')
    assert only(lint_dir(capsys, write(tmp_path, text))[1])["code"] == "EG101"


# ---------------------------------------------------------------------------
# secrets: names only


def test_secret_names_are_checked_against_the_local_store(tmp_path, capsys, monkeypatch):
    from gateway.secrets.local import LocalStore
    value = register_secret("s3cr3t-lint-value-9f2c")
    state = tmp_path / "state"
    LocalStore(state).put("gh/a", value)
    monkeypatch.setenv("LINT_TEST_TOKEN", value)
    policies = tmp_path / "policies"
    policies.mkdir()
    text = HEAD + rule('request.host == "api.github.com"', extra=(
        '    inject:\n      headers:\n        authorization: "Bearer ${local:gh/a} ${local:gh/b}"\n'
        '        x-env: "${env:LINT_TEST_TOKEN}${env:LINT_TEST_MISSING}"\n'
        '      placeholders:\n        f: file:/nonexistent/lint-secret\n'))
    write(policies, text)
    # without --secrets: syntax only
    assert lint_dir(capsys, policies)[1] == []
    rc, findings = lint_dir(capsys, policies, "--secrets", "--state-dir", str(state))
    got = [(f["code"], f["severity"], f["line"], f["column"]) for f in findings]
    assert got == [("EG602", "error", *at(text, "local:gh/b")), ("EG602", "error", *at(text, "env:LINT_TEST_MISSING")),
                   ("EG602", "error", *at(text, "file:/nonexistent"))]
    assert rc == 1
    assert findings[0]["end_column"] == at(text, "local:gh/b")[1] + len("local:gh/b")
    for fmt in ("text", "json", "sarif"):
        _, out, err = run_lint(capsys, str(policies), "--state-dir", str(state), "--format", fmt)
        assert value not in out and value not in err
        assert "local:gh/b" in out


def test_secret_store_that_is_not_one_is_bad_input(tmp_path, capsys):
    state = tmp_path / "state"
    (state / "secrets").mkdir(parents=True)
    (state / "secrets" / "store.json").write_text("not json")
    write(tmp_path, HEAD + rule('request.host == "a.com"'))
    rc, _, err = run_lint(capsys, str(tmp_path), "--state-dir", str(state))
    assert rc == 2 and "not a valid secret store" in err
    assert not (state / "secrets" / "store.key").exists()  # linting never creates a key


# ---------------------------------------------------------------------------
# the variables' fields are the documented ones


def test_known_fields_match_the_docs_and_the_model():
    doc = (ROOT / "docs" / "policy-language.md").read_text()
    section = doc.split("## Variables", 1)[1].split("\n## ", 1)[0]
    for var, fields in FIELDS.items():
        documented = set(re.findall(rf"^\| `{var}\.([a-z_]+)` \|", section, re.M))
        assert documented == set(fields), var
    assert set(VARIABLES) == {"principal", "request", "destination", "now"}
    from gateway.policy.model import Destination, Principal, Request
    assert set(Principal.make("t", "a").to_cel()) == set(FIELDS["principal"])
    assert set(Request(host="h", port=443).to_cel()) == set(FIELDS["request"])
    assert set(Destination(()).to_cel()) == set(FIELDS["destination"])


# ---------------------------------------------------------------------------
# property: a typo of a known field gets a did-you-mean naming it

RESERVED = {"as", "break", "const", "continue", "else", "for", "function", "if", "import", "let", "loop",
            "package", "namespace", "return", "var", "void", "while", "in", "true", "false", "null"}
LETTERS = "abcdefghijklmnopqrstuvwxyz_"


@st.composite
def typo(draw, words):
    word = draw(st.sampled_from(sorted(words)))
    op = draw(st.sampled_from(["delete", "insert", "substitute", "transpose"]))
    i = draw(st.integers(0, len(word) - 1))
    c = draw(st.sampled_from(LETTERS))
    if op == "delete":
        out = word[:i] + word[i + 1:]
    elif op == "insert":
        out = word[:i] + c + word[i:]
    elif op == "substitute":
        out = word[:i] + c + word[i + 1:]
    else:
        i = min(i, len(word) - 2)
        out = word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word, out


def _ok_identifier(s: str, known) -> bool:
    return bool(re.fullmatch(r"[a-z_][a-z0-9_]*", s)) and s not in RESERVED and s not in known


FIELD_WORDS = [(v, f) for v, fs in FIELDS.items() for f in fs]


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.sampled_from(FIELD_WORDS).flatmap(lambda vf: st.tuples(st.just(vf[0]), typo([vf[1]]))))
def test_a_typo_of_a_field_suggests_the_field(case):
    var, (field, wrong) = case
    if not _ok_identifier(wrong, FIELDS[var]):
        return
    when = f"has({var}.{wrong})"
    text = HEAD + rule(when, action="deny")
    result = lint_sources([("p.yaml", text)])
    (f,) = [f for f in result.findings if f.code == "EG202"]
    line, col = at(text, f"has({var}.{wrong})")
    assert (f.line, f.column) == (line, col + len(f"has({var}.")) == (8, len(f"    when: has({var}.") + 1)
    suggested = re.findall(r"`([a-z_]+\.[a-z_]+)`", f.message.split("did you mean", 1)[1])
    assert f"{var}.{field}" in suggested, f.message


@settings(deadline=None, max_examples=100)
@given(typo(VARIABLES))
def test_a_typo_of_a_variable_suggests_the_variable(case):
    var, wrong = case
    if not _ok_identifier(wrong, set(VARIABLES) | lint_checks.TYPE_NAMES):
        return
    text = HEAD + rule(f"has({wrong}.x)", action="deny")
    (f,) = [f for f in lint_sources([("p.yaml", text)]).findings if f.code == "EG201"]
    assert (f.line, f.column) == (8, len("    when: has(") + 1)
    assert f"`{var}`" in f.message.split("did you mean", 1)[1], f.message


# ---------------------------------------------------------------------------
# the worked example in the docs prints what the docs show


def test_documented_lint_example(tmp_path, capsys, monkeypatch):
    doc = (ROOT / "docs" / "policy-tools.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```(\w+)\n(.*?)```", doc, re.S)
    at_example = [i for i, (lang, text) in enumerate(blocks) if lang == "yaml" and "name: lint-example\n" in text]
    assert len(at_example) == 1, "the lint example is missing from docs/policy-tools.md"
    (i,) = at_example
    lang, expected = next(b for b in blocks[i + 1:] if b[0] == "text")
    policies = tmp_path / "policies" / "acme"
    policies.mkdir(parents=True)
    (policies / "github.yaml").write_text(blocks[i][1])
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run_lint(capsys, "policies/acme")
    assert out.strip() == expected.strip()
    assert rc == 1
    assert compile_sources([("github.yaml", blocks[i][1])])  # not a load error
