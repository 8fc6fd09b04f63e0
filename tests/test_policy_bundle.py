"""The default bundle ships with its tests (policies/default/*.test.yaml), and they pass.

Runs ``egress policy test policies/default`` as CI and a policy author would,
and checks that the tests cover every rule of the bundle and every way the
policy decision can go."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from gateway.policy.loader import TEST_SUFFIXES, load_directory

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "policies" / "default"


def egress(*args, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "gateway.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def bundle_tests() -> list[dict]:
    """Every test in the bundle's test files, read as plain YAML (independently of the command)."""
    out = []
    files = sorted(p for p in DEFAULT.iterdir() if p.name.endswith(TEST_SUFFIXES))
    assert files, "policies/default ships no *.test.yaml files"
    for f in files:
        out.extend(yaml.safe_load(f.read_text())["tests"])
    return out


def test_default_bundle_tests_pass():
    tests = bundle_tests()
    rules = load_directory(DEFAULT).rule_count
    # at least an allow/deny pair per rule, plus the default deny and the destination checks
    assert len(tests) >= 2 * rules + 3
    r = egress("policy", "test", "policies/default")
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"^(\d+) tests? in (\d+) files?: (\d+) passed, (\d+) failed", r.stdout, re.M)
    assert m, r.stdout
    assert int(m.group(1)) == len(tests) == int(m.group(3))
    assert int(m.group(4)) == 0
    assert r.stdout.count("\nPASS ") + r.stdout.startswith("PASS ") == len(tests)
    assert "FAIL" not in r.stdout


def test_default_bundle_tests_cover_every_rule_and_outcome():
    """Each allow rule wins some test and each deny rule denies in some test (by
    what the engine actually decided, not by what the files say), and the
    default deny, SSRF and DNS outcomes are exercised."""
    ps = load_directory(DEFAULT)
    r = egress("policy", "test", "policies/default", "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["summary"]["failed"] == 0
    decided = {(x["actual"]["decision"], x["actual"]["rule"]) for x in out["results"]}
    codes = {x["actual"]["code"] for x in out["results"]}
    for pol in ps.policies:
        for rule in pol.rules:
            assert (rule.action, f"{pol.name}/{rule.name}") in decided, f"no test exercises {pol.name}/{rule.name}"
    assert {"allowed", "policy_deny", "default_deny", "ssrf_blocked", "dns_failure"} <= codes
    # an allow test names the rule it expects, so it cannot pass through the wrong rule
    for t in bundle_tests():
        if t["expect"]["decision"] == "allow":
            assert "rule" in t["expect"], t["name"]
        else:
            assert "rule" in t["expect"] or "code" in t["expect"], t["name"]
    # the package-registries rule opens only for the label
    by_name = {x["name"]: x for x in out["results"]}
    assert by_name["without the registries label PyPI is denied"]["actual"]["code"] == "default_deny"
    # the metadata service is denied whatever the spelling
    metadata = [x for x in out["results"] if "metadata" in x["name"] and x["actual"]["decision"] == "deny"]
    assert len(metadata) >= 5
