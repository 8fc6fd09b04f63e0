"""``egress policy test DIR``: table-driven policy tests next to the policies.

Every test here writes a real policy directory (policies + *.test.yaml) and
runs the command line, as a policy author or CI would."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gateway.policytools.ptest import CaseError, build_case

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "policies" / "default"

POLICY = """\
name: acme
selector: principal.tenant == "acme"
rules:
  - name: no-admin
    action: deny
    when: request.path.startsWith("/admin")
    reason: Admin pages are off limits.
  - name: github-read
    action: allow
    when: request.host == "api.github.com" && request.method in ["GET", "HEAD"]
    reason: GitHub reads.
    inject:
      headers: {authorization: "Bearer ${local:github/token}"}
      placeholders: {llm: "env:LLM_KEY"}
  - name: billing
    action: allow
    when: request.host == "billing.internal"
    allow_internal: ["10.20.0.0/16"]
"""

SHADOW = """\
name: trial
mode: shadow
selector: principal.tenant == "acme"
rules:
  - name: no-delete
    action: deny
    when: request.method == "DELETE"
"""

PASSING = """\
hosts:
  billing.internal: 10.20.0.5
principal: {tenant: acme, agent: a1}
tests:
  - name: github read injects the token
    request: {method: GET, url: "https://api.github.com/user"}
    addresses: ["140.82.112.6"]
    expect:
      decision: allow
      code: allowed
      rule: acme/github-read
      reason: GitHub
      secrets: ["local:github/token"]
      dial: 140.82.112.6
  - name: admin is denied
    request: {method: GET, url: "https://api.github.com/admin/x"}
    addresses: ["140.82.112.6"]
    expect: {decision: deny, code: policy_deny, rule: acme/no-admin, reason: off limits, dial: null}
  - name: other tenants get default deny
    principal: {tenant: other, agent: a1}
    request: {url: "https://api.github.com/user"}
    addresses: ["140.82.112.6"]
    expect: {decision: deny, code: default_deny, rule: null, shadow: null}
"""


def egress(*args, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "gateway.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def policy_dir(tmp_path: Path, tests: dict[str, str], policies: dict[str, str] | None = None) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    for name, text in (policies or {"10-acme.yaml": POLICY}).items():
        (d / name).write_text(textwrap.dedent(text))
    for name, text in tests.items():
        (d / name).write_text(textwrap.dedent(text))
    return d


def test_passing_suite(tmp_path):
    d = policy_dir(tmp_path, {"10-acme.test.yaml": PASSING})
    r = egress("policy", "test", d)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["PASS"] * 3
    assert f"{d / '10-acme.test.yaml'}:5" in lines[0]  # file:line of the test
    assert "github read injects the token" in lines[0]
    assert "3 tests in 1 file: 3 passed, 0 failed" in lines[-1]


def test_all_four_file_name_forms_are_found_and_policies_ignore_them(tmp_path):
    one = ("tests:\n  - name: {n}\n    principal: {{tenant: other, agent: a}}\n"
           "    request: {{url: 'https://1.1.1.1/'}}\n    expect: {{decision: deny}}\n")
    d = policy_dir(tmp_path, {f"x{suffix}": one.format(n=suffix) for suffix in
                              (".test.yaml", ".test.yml", "_test.yaml", "_test.yml")})
    r = egress("policy", "test", d)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 tests in 4 files" in r.stdout
    assert egress("policy", "check", d).returncode == 0  # the loader skips the test files


def test_failing_expectation_exits_1_with_a_diff(tmp_path):
    failing = PASSING.replace("rule: acme/no-admin", "rule: acme/github-read")
    d = policy_dir(tmp_path, {"10-acme.test.yaml": failing})
    r = egress("policy", "test", d)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "FAIL" in out and "admin is denied" in out
    fail = out[out.index("FAIL"):]
    # the differing field, expected and actual, then the actual decision and its reason
    assert "rule" in fail and "expected: acme/github-read" in fail and "actual: acme/no-admin" in fail
    assert "actual decision: deny (policy_deny) by acme/no-admin: Admin pages are off limits." in fail
    assert "decision " not in fail.split("actual decision")[0]  # fields that match are not listed
    assert "3 tests in 1 file: 2 passed, 1 failed" in out.splitlines()[-1]


def test_reason_is_a_substring_match_and_its_diff_says_so(tmp_path):
    tests = PASSING.replace("reason: off limits", "reason: Admin pages")
    d = policy_dir(tmp_path, {"a.test.yaml": tests})
    assert egress("policy", "test", d).returncode == 0
    (tmp_path / "2").mkdir()
    d2 = policy_dir(tmp_path / "2", {"a.test.yaml": PASSING.replace("reason: off limits", "reason: forbidden")})
    r = egress("policy", "test", d2)
    assert r.returncode == 1
    assert "expected to contain: forbidden" in r.stdout and "actual: Admin pages are off limits." in r.stdout


def test_malformed_test_file_exits_2_with_positions(tmp_path):
    bad = """\
    tests:
      - name: typo in a key
        principal: {tenant: acme, agent: a1}
        request: {url: "https://api.github.com/"}
        addresses: ["140.82.112.6"]
        expect: {decison: allow}
      - name: bad value
        principal: {tenant: acme, agent: a1}
        request: {url: "https://api.github.com/"}
        addresses: ["140.82.112.6"]
        expect: {decision: maybe}
    """
    d = policy_dir(tmp_path, {"10-acme.test.yaml": bad})
    r = egress("policy", "test", d)
    assert r.returncode == 2, r.stdout + r.stderr
    f = d / "10-acme.test.yaml"
    assert f"{f}:6:14: unknown key 'decison' in expect" in r.stderr
    assert f"{f}:6:13: expect is missing required key 'decision'" in r.stderr
    assert f"{f}:11:24: expect.decision must be allow or deny, got 'maybe'" in r.stderr
    assert "no test ran" in r.stderr
    assert "PASS" not in r.stdout and "FAIL" not in r.stdout


def test_invalid_yaml_and_unknown_rule_are_bad_input(tmp_path):
    d = policy_dir(tmp_path, {
        "a.test.yaml": "tests:\n  - name: x\n    expect: [\n",
        "b.test.yaml": ("tests:\n  - name: typo\n    principal: {tenant: acme, agent: a}\n"
                        "    request: {url: 'https://1.1.1.1/'}\n    expect: {decision: deny, rule: no-admin}\n"),
    })
    r = egress("policy", "test", d)
    assert r.returncode == 2
    assert f"{d / 'a.test.yaml'}:4:1: invalid YAML" in r.stderr
    assert f"{d / 'b.test.yaml'}:5:36: expect.rule: no rule 'no-admin' in this policy set " \
           f"(did you mean acme/no-admin?)" in r.stderr


def test_a_host_that_needs_dns_is_an_error_pointing_at_the_url(tmp_path):
    t = "tests:\n  - name: dns\n    principal: {tenant: acme, agent: a}\n" \
        "    request: {url: 'https://api.github.com/'}\n    expect: {decision: allow}\n"
    d = policy_dir(tmp_path, {"a.test.yaml": t})
    r = egress("policy", "test", d)
    assert r.returncode == 2
    assert f"{d / 'a.test.yaml'}:4:20: api.github.com needs addresses" in r.stderr
    assert "never use DNS" in r.stderr


def test_no_test_files_and_broken_policies_exit_2(tmp_path):
    d = policy_dir(tmp_path, {})
    r = egress("policy", "test", d)
    assert r.returncode == 2 and "no test files in" in r.stderr and "*.test.yaml" in r.stderr
    broken = POLICY.replace('request.host == "billing.internal"', 'request.host == ')
    d2 = tmp_path / "b"
    d2.mkdir()
    d2 = policy_dir(d2, {"a.test.yaml": PASSING}, {"10-acme.yaml": broken})
    r = egress("policy", "test", d2)
    assert r.returncode == 2
    assert f"{d2 / '10-acme.yaml'}:17:" in r.stderr and "do not load" in r.stderr
    r = egress("policy", "test", tmp_path / "nope")
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_junit_xml_counts_and_failures(tmp_path):
    failing = PASSING.replace("dial: 140.82.112.6", "dial: 140.82.112.7")
    other = ("tests:\n  - name: t1\n    principal: {tenant: acme, agent: a}\n"
             "    request: {url: 'https://1.1.1.1/'}\n    expect: {decision: deny}\n")
    d = policy_dir(tmp_path, {"10-acme.test.yaml": failing, "20-other_test.yaml": other})
    junit = tmp_path / "out" / "junit.xml"
    junit.parent.mkdir()
    r = egress("policy", "test", d, "--junit", junit)
    assert r.returncode == 1
    assert "FAIL" in r.stdout  # text still on stdout
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("4", "1", "0")
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [str(d / "10-acme.test.yaml"), str(d / "20-other_test.yaml")]
    assert [(s.get("tests"), s.get("failures")) for s in suites] == [("3", "1"), ("1", "0")]
    cases = suites[0].findall("testcase")
    assert [c.get("name") for c in cases] == ["github read injects the token", "admin is denied",
                                              "other tenants get default deny"]
    failure = cases[0].find("failure")
    assert failure is not None and "dial" in failure.get("message")
    assert "expected: 140.82.112.7" in failure.text and "actual: 140.82.112.6" in failure.text
    assert all(c.find("failure") is None for c in cases[1:])
    # --format junit prints the same document
    r2 = egress("policy", "test", d, "--format", "junit")
    root2 = ET.fromstring(r2.stdout)
    assert root2.get("tests") == "4" and root2.get("failures") == "1"


def test_junit_file_records_bad_input_as_an_error(tmp_path):
    d = policy_dir(tmp_path, {"a.test.yaml": "tests: []\n"})
    junit = tmp_path / "j.xml"
    r = egress("policy", "test", d, "--junit", junit)
    assert r.returncode == 2 and "tests must be a non-empty list" in r.stderr
    root = ET.parse(junit).getroot()
    assert root.get("errors") == "1"
    assert "tests must be a non-empty list" in root.find("testsuite/testcase/error").text


SECRETS = """\
principal: {tenant: acme, agent: a1}
hosts: {billing.internal: ["10.20.0.5", "10.20.0.6"]}
tests:
  - name: the header template's secret
    request: {url: "https://api.github.com/user"}
    addresses: ["140.82.112.6"]
    expect: {decision: allow, secrets: ["local:github/token"]}
  - name: a placeholder the request uses adds its secret
    request: {url: "https://api.github.com/user", headers: {x-llm-key: "egress-secret:llm"}}
    addresses: ["140.82.112.6"]
    expect: {decision: allow, secrets: ["env:LLM_KEY", "local:github/token"]}
  - name: a rule without inject injects nothing
    request: {url: "http://billing.internal/invoices"}
    expect: {decision: allow, rule: acme/billing, secrets: [], dial: 10.20.0.5}
  - name: the dial is the first checked address, compared as an address
    request: {url: "https://api.github.com/user"}
    addresses: ["2606:50c0:8000::64", "140.82.112.6"]
    expect: {decision: allow, dial: "2606:50c0:8000:0:0:0:0:64"}
  - name: a denied request injects nothing and dials nothing
    request: {url: "https://api.github.com/admin"}
    addresses: ["140.82.112.6"]
    expect: {decision: deny, secrets: [], dial: null}
"""


def test_secrets_and_dial_expectations(tmp_path):
    d = policy_dir(tmp_path, {"a.test.yaml": SECRETS})
    r = egress("policy", "test", d, "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["summary"] == {"tests": 5, "passed": 5, "failed": 0, "files": 1}
    actual = {x["name"]: x["actual"] for x in out["results"]}
    assert actual["a placeholder the request uses adds its secret"]["secrets"] == ["local:github/token",
                                                                                   "env:LLM_KEY"]
    assert actual["a rule without inject injects nothing"]["dial"] == "10.20.0.5"

    wrong = SECRETS.replace('secrets: ["local:github/token"]}', 'secrets: ["local:github/other"]}') \
        .replace("dial: 10.20.0.5", "dial: 10.20.0.6")
    d2 = tmp_path / "2"
    d2.mkdir()
    d2 = policy_dir(d2, {"a.test.yaml": wrong})
    r = egress("policy", "test", d2, "--format", "json")
    assert r.returncode == 1
    failures = {x["name"]: x["failures"] for x in json.loads(r.stdout)["results"] if x["failures"]}
    assert failures == {
        "the header template's secret": [{"field": "secrets", "expected": ["local:github/other"],
                                          "actual": ["local:github/token"]}],
        "a rule without inject injects nothing": [{"field": "dial", "expected": "10.20.0.6",
                                                   "actual": "10.20.0.5"}],
    }


def test_expectations_that_can_never_hold_are_rejected(tmp_path):
    t = """\
    principal: {tenant: acme, agent: a1}
    tests:
      - name: deny with a dial
        request: {url: "https://1.1.1.1/"}
        expect: {decision: deny, dial: 1.1.1.1, secrets: ["local:x"]}
      - name: allow without a rule
        request: {url: "https://1.1.1.1/"}
        expect: {decision: allow, rule: null, code: default_deny}
    """
    d = policy_dir(tmp_path, {"a.test.yaml": t})
    r = egress("policy", "test", d)
    assert r.returncode == 2
    for msg in ("a denied request is not dialled", "a denied request injects nothing",
                "never comes with decision allow"):
        assert msg in r.stderr


def test_shadow_expectations(tmp_path):
    t = """\
    principal: {tenant: acme, agent: a1}
    tests:
      - name: shadow deny on DELETE
        request: {method: DELETE, url: "https://api.github.com/x"}
        addresses: ["140.82.112.6"]
        expect:
          decision: deny
          code: default_deny
          shadow: {decision: deny, code: policy_deny, rule: trial/no-delete}
      - name: shadow agrees on GET
        request: {url: "https://api.github.com/x"}
        addresses: ["140.82.112.6"]
        expect: {decision: allow, shadow: {decision: allow, rule: acme/github-read}}
      - name: wrong shadow
        request: {method: DELETE, url: "https://api.github.com/x"}
        addresses: ["140.82.112.6"]
        expect: {decision: deny, shadow: null}
    """
    d = policy_dir(tmp_path, {"a.test.yaml": t}, {"10-acme.yaml": POLICY, "20-trial.yaml": SHADOW})
    r = egress("policy", "test", d)
    assert r.returncode == 1
    assert "PASS" in r.stdout.splitlines()[0] and "PASS" in r.stdout.splitlines()[1]
    tail = r.stdout[r.stdout.index("FAIL"):]
    assert "wrong shadow" in tail and "shadow  expected: null" in tail and "rule: trial/no-delete" in tail


def test_run_selects_tests_by_name(tmp_path):
    d = policy_dir(tmp_path, {"a.test.yaml": PASSING})
    r = egress("policy", "test", d, "--run", "admin|tenants")
    assert r.returncode == 0
    assert "2 tests in 1 file" in r.stdout and "github read" not in r.stdout
    r = egress("policy", "test", d, "--run", "^nothing$")
    assert r.returncode == 2 and "no test name matches --run" in r.stderr


def test_now_pins_the_clock(tmp_path):
    pol = "name: hours\nselector: 'true'\nrules:\n  - name: day\n    action: allow\n" \
          "    when: now.getHours() >= 8 && now.getHours() < 18\n"
    t = """\
    principal: {tenant: t, agent: a}
    tests:
      - name: day
        now: 2026-06-01T10:00:00Z
        request: {url: "https://1.1.1.1/"}
        expect: {decision: allow, rule: hours/day}
      - name: evening in UTC+2 is still day in UTC
        now: "2026-06-01T19:30:00+02:00"
        request: {url: "https://1.1.1.1/"}
        expect: {decision: allow}
      - name: night
        now: "2026-06-01T22:00:00Z"
        request: {url: "https://1.1.1.1/"}
        expect: {decision: deny, code: default_deny}
    """
    d = policy_dir(tmp_path, {"a.test.yaml": t}, {"p.yaml": pol})
    for engine in ("rust", "python"):
        r = egress("policy", "test", d, "--engine", engine)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "note:" not in r.stdout


def test_both_engines_agree_on_the_default_bundle_tests():
    runs = {}
    for engine in ("rust", "python"):
        r = egress("policy", "test", DEFAULT, "--engine", engine, "--format", "json")
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["engine"] == engine
        runs[engine] = [(x["file"], x["name"], x["status"], x["actual"]) for x in out["results"]]
    assert runs["rust"] == runs["python"]
    assert len(runs["rust"]) > 0


def test_build_case_is_the_shared_builder():
    p, req, dest = build_case({"tenant": "acme", "agent": "a", "labels": {"team": "red"}},
                              {"method": "get", "url": "https://API.GitHub.com./x?y=1",
                               "headers": {"X-Key": " v "}},
                              ["140.82.112.6"])
    assert (p.tenant, p.agent, dict(p.labels), p.source) == ("acme", "a", {"team": "red"}, "token")
    assert (req.host, req.port, req.method, req.path, req.query, req.sni) == \
        ("api.github.com", 443, "GET", "/x", "y=1", "api.github.com")
    assert req.headers == {"host": "API.GitHub.com.", "x-key": "v"}
    assert dest.via == "given" and [c.text for c in dest.addresses] == ["140.82.112.6"]
    _, _, dest = build_case({"tenant": "t", "agent": "a"}, {"url": "http://billing.internal/"},
                            None, {"billing.internal": "10.20.0.5"})
    assert dest.via == "override" and dest.addresses[0].text == "10.20.0.5"
    _, _, dest = build_case({"tenant": "t", "agent": "a"}, {"url": "http://demo.localhost:8000/"})
    assert [c.text for c in dest.addresses] == ["127.0.0.1", "::1"]
    with pytest.raises(CaseError) as e:
        build_case({"tenant": "t", "agent": "a"}, {"url": "https://example.com/"})
    assert e.value.field == "addresses" and "never use DNS" in e.value.message
    with pytest.raises(CaseError) as e:
        build_case({"tenant": "t t", "agent": "a"}, {"url": "https://1.1.1.1/"})
    assert e.value.field == "principal.tenant"
