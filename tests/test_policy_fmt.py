"""``egress policy fmt`` and the policy fingerprint (gateway.policy.canonical)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.canonical import canonical_policy, normalize_expr
from gateway.policy.loader import compile_sources, load_directory
from gateway.policytools.fmt import format_text

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "policies" / "default"
EGRESS = Path(sys.executable).parent / "egress"

MESSY = """\
# header comment
name: acme-github   # trailing comment
selector: principal.tenant == "acme"
kind: Policy
rules:
- when: request.host == "api.github.com" &&
        request.method in ["GET", "HEAD"]
  action: allow      # allow it
  name: github-read
  inject:
      placeholders: {llm: "local:llm/key"}
      headers:
        authorization: "Bearer ${vault:secret/acme/github#token}"
-   name: no-writes
    # why: read only
    action: deny
    when: 'request.host == "api.github.com" && !(request.method in ["GET", "HEAD"])'
apiVersion: egress/v1
---
apiVersion: egress/v1
name: second
selector: "true"
rules:
  - {name: r, action: deny, when: "false"}
"""


def egress(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(EGRESS), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_format_orders_keys_keeps_comments_and_meaning():
    out = format_text(MESSY)
    lines = out.splitlines()
    assert lines[0] == "# header comment"
    assert lines[1:5] == ["apiVersion: egress/v1", "kind: Policy", "name: acme-github   # trailing comment",
                          'selector: principal.tenant == "acme"']
    assert lines[5] == "rules:"
    assert lines[6] == "  - name: github-read"
    assert lines[7].startswith("    action: allow") and lines[7].endswith("# allow it")
    assert "    # why: read only" in lines
    # rule keys: name, action, when, inject; inject keys: headers before placeholders
    i = lines.index("    inject:")
    assert lines[i + 1] == "      headers:" and lines[i + 3].startswith("      placeholders:")
    assert format_text(out) == out  # idempotent
    before, after = compile_sources([("m", MESSY)]), compile_sources([("m", out)])
    assert before.fingerprint == after.fingerprint
    assert before.version != after.version  # the bytes changed, the meaning did not


def test_default_bundle_is_canonical_and_has_a_fingerprint():
    r = egress("policy", "fmt", "--check", DEFAULT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 of" in r.stderr
    ps = load_directory(DEFAULT)
    assert ps.fingerprint.startswith("fp:") and len(ps.fingerprint) == 19
    assert set(ps.policy_fingerprints) == {p.name for p in ps.policies}


def test_cli_check_diff_then_rewrite(tmp_path):
    f = tmp_path / "acme.yaml"
    f.write_text(MESSY)
    r = egress("policy", "fmt", "--check", tmp_path)
    assert r.returncode == 1
    assert "+  - name: github-read" in r.stdout and "1 of 1 file(s) would change" in r.stderr
    assert f.read_text() == MESSY  # --check changes nothing
    r = egress("policy", "fmt", "--diff", f)
    assert r.returncode == 0 and r.stdout.startswith("---") and f.read_text() == MESSY
    r = egress("policy", "fmt", tmp_path)
    assert r.returncode == 0, r.stderr
    assert f.read_text() == format_text(MESSY)
    assert not list(tmp_path.glob(".*fmt-tmp"))
    assert egress("policy", "fmt", "--check", tmp_path).returncode == 0


def test_cli_refuses_files_that_do_not_load(tmp_path):
    bad_yaml = tmp_path / "a.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    r = egress("policy", "fmt", bad_yaml)
    assert r.returncode == 2 and "a.yaml" in r.stderr and "Traceback" not in r.stderr
    assert bad_yaml.read_text() == "name: [unclosed\n"
    bad_cel = tmp_path / "b.yaml"
    text = "selector: 'true'\nname: b\nrules:\n  - action: allow\n    when: request.host ==\n"
    bad_cel.write_text(text)
    r = egress("policy", "fmt", bad_cel)
    assert r.returncode == 2 and "does not load" in r.stderr
    assert bad_cel.read_text() == text
    r = egress("policy", "fmt", tmp_path / "missing")
    assert r.returncode == 2 and "no such file" in r.stderr


# -- the fingerprint -----------------------------------------------------------------------

BASE = {"name": "p", "selector": 'principal.tenant == "acme"',
        "rules": [{"name": "a", "action": "allow", "when": 'request.host == "x.example" && request.port == 443',
                   "inject": {"headers": {"Authorization": "Bearer ${vault:kv/acme#token}"}}},
                  {"name": "d", "action": "deny", "when": "request.method == 'DELETE'"}]}


def fp(doc) -> str:
    from gateway.policy.canonical import fingerprint_of
    return fingerprint_of([canonical_policy(doc)])


def test_fingerprint_changes_with_meaning_only():
    import copy
    same = copy.deepcopy(BASE)
    same["rules"][0]["when"] = 'request.host   ==\n "x.example"&&request.port == 443'.replace("&&", " && ")
    assert fp(same) == fp(BASE)
    explicit_defaults = copy.deepcopy(BASE)
    explicit_defaults.update(apiVersion="egress/v1", kind="Policy", mode="enforce")
    assert fp(explicit_defaults) == fp(BASE)
    variants = []
    for change in ("order", "literal", "ref", "mode", "reason", "internal", "header-case"):
        v = copy.deepcopy(BASE)
        if change == "order":
            v["rules"].reverse()
        elif change == "literal":
            v["rules"][1]["when"] = "request.method == 'DELETE '"  # whitespace inside a string literal
        elif change == "ref":
            v["rules"][0]["inject"]["headers"]["Authorization"] = "Bearer ${vault:kv/acme#token2}"
        elif change == "mode":
            v["mode"] = "shadow"
        elif change == "reason":
            v["rules"][1]["reason"] = "no deletes"
        elif change == "internal":
            v["rules"][0]["allow_internal"] = ["10.0.0.0/8"]
        elif change == "header-case":
            v["rules"][0]["inject"]["headers"] = {"authorization": "Bearer ${vault:kv/acme#token}"}
        variants.append((change, fp(v)))
    for change, f in variants:
        if change == "header-case":  # header names are case-insensitive: same meaning
            assert f == fp(BASE)
        else:
            assert f != fp(BASE), change


def test_canonical_form_hashes_secret_references():
    text = json.dumps(canonical_policy({**BASE, "rules": [
        {"name": "a", "action": "allow", "when": "true",
         "inject": {"headers": {"x-key": "k ${local:llm/key} $${literal}"}, "placeholders": {"gh": "vault:kv/gh#t"}}}]}))
    assert "llm/key" not in text and "kv/gh" not in text
    assert "${sha256:" in text and "$${literal}" in text


_ws = st.text(alphabet=" \t\n", min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(st.lists(_ws, min_size=6, max_size=6), st.text(alphabet="ab \t'\\\"", max_size=8))
def test_normalize_expr_ignores_whitespace_outside_literals_only(spaces, inner):
    lit = json.dumps(inner)  # a valid double-quoted literal, with escapes
    tokens = ["request.host", "==", lit, "&&", "request.port", ">", "1"]
    spaced = tokens[0] + "".join(s + t for s, t in zip(spaces, tokens[1:]))
    plain = " ".join(tokens)
    assert normalize_expr(spaced) == normalize_expr(plain) == plain
    assert lit in normalize_expr("  " + spaced + "\n")  # the literal is kept byte for byte


def test_decision_events_carry_the_fingerprint(tmp_path):
    from gateway.config import load_config
    from gateway.policy.model import Request
    from gateway.runtime import Gateway

    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "p.yaml").write_text("name: p\nselector: 'true'\nrules:\n  - name: up\n    action: allow\n"
                                "    when: request.host == 'upstream.test'\n")
    cfg = load_config(None, policies=str(pol), state_dir=str(tmp_path / "state"), admin="",
                      extra_hosts={"upstream.test": ("127.0.0.1",)})
    gw = Gateway(cfg)
    try:
        gw.load_policies()
        pr = gw.identity.verify_token(gw.identity.mint(tenant="acme", agent="a")).principal
        req = Request(host="upstream.test", port=80, scheme="http")
        dest = gw.resolver.resolve_static("upstream.test")
        d, secs = gw.decide(pr, req, dest)
        assert gw.record(request_id="r1", principal=pr, request=req, decision=d, destination=dest)
        gw.audit.flush()
        want = load_directory(pol).fingerprint
        events = [json.loads(line) for f in sorted((tmp_path / "state" / "audit").glob("seg-*.jsonl"))
                  for line in f.read_text().splitlines()]
        loaded = [e for e in events if e["event"] == "policy_loaded"]
        decided = [e for e in events if e["event"] == "decision"]
        assert loaded[0]["policy_fingerprint"] == want
        assert decided[0]["policy_fingerprint"] == want and decided[0]["policy_version"] == d.policy_version
    finally:
        gw.close()
