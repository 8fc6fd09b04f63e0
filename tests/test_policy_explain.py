"""PolicySet.explain and ``egress policy explain``: every policy and rule
considered, each expression's value, the destination checks and why the winner
won; the trace's final decision is always PolicySet.decide's (checked over
Hypothesis-generated requests with both engines) and explain's own derivation
agrees with it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import celexpr
from gateway.addresses import classify
from gateway.policy import Destination, Principal, Request, load_directory

REPO = Path(__file__).resolve().parent.parent

BASE = """\
apiVersion: egress/v1
kind: Policy
name: base
selector: principal.tenant == "acme"
rules:
  - name: read-all
    action: allow
    when: request.method in ["GET", "HEAD"]
  - name: no-delete
    action: deny
    when: request.method == "DELETE"
  - name: gh
    action: allow
    when: request.host == "api.github.com" && request.path.startsWith("/repos/")
    inject:
      headers:
        authorization: "Bearer ${env:EXPLAIN_TEST_TOKEN}"
      placeholders:
        llm: vault:secret/acme/llm#key
  - name: internal
    action: allow
    when: request.host == "billing.internal"
    allow_internal: ["10.0.0.0/8"]
  - name: debug-off
    action: deny
    when: '"x-debug" in request.headers && request.headers["x-debug"] == "on"'
  - name: header-allow
    action: allow
    when: request.headers["x-team"] == "red"
"""

TEAMS = """\
name: teams
selector: principal.labels.team == "red"
rules:
  - name: red-posts
    action: allow
    when: request.method == "POST"
  - name: no-secret-path
    action: deny
    when: request.path == "/secret"
"""

SHADOW = """\
name: trial
mode: shadow
selector: principal.tenant == "acme"
rules:
  - name: no-posts
    action: deny
    when: request.method == "POST" && request.host != "api.github.com"
"""

OTHER = """\
name: beta
selector: principal.tenant == "beta"
rules:
  - name: all
    action: allow
    when: "true"
"""


@pytest.fixture()
def pol(tmp_path) -> Path:
    d = tmp_path / "pol"
    d.mkdir()
    (d / "00-base.yaml").write_text(BASE)
    (d / "10-teams.yaml").write_text(TEAMS)
    (d / "20-trial.yaml").write_text(SHADOW)
    (d / "30-beta.yaml").write_text(OTHER)
    return d


ACME = Principal.make("acme", "a1")
RED = Principal.make("acme", "a1", labels={"team": "red"})
PUBLIC = Destination((classify("140.82.112.6"),))


def req(method="GET", host="api.github.com", path="/", headers=None, scheme="https") -> Request:
    return Request(host=host, port=443 if scheme == "https" else 80, scheme=scheme, method=method, path=path,
                   headers=headers or {})


def rule_of(trace, rid):
    return next(r for r in trace.rules() if r.id == rid)


def policy_of(trace, name):
    return next(p for p in trace.policies if p.name == name)


def same_decision(a, b) -> bool:
    return (a.to_dict(), a.dial, a.evaluated, a.inject) == (b.to_dict(), b.dial, b.evaluated, b.inject)


# ---------------------------------------------------------------------------
# the engine side


def test_deny_beats_earlier_allow(pol):
    ps = load_directory(pol)
    t = ps.explain(ACME, req("DELETE", headers={"x-team": "red"}), PUBLIC)
    assert t.consistent, t.mismatches
    d = t.decision
    assert (d.action, d.code, d.rule) == ("deny", "policy_deny", "base/no-delete")
    assert t.winner == "base/no-delete"
    assert any("enforcing deny rules win over allows" in w and "How a request is decided" in w
               and "first matching deny in file order is base/no-delete" in w for w in t.why)
    # the earlier matching allow is shown, evaluated, and overridden
    ha = rule_of(t, "base/header-allow")
    assert ha.matched is True and "overridden by the enforcing deny base/no-delete" in ha.role
    assert any("beats the matching allow rule(s) base/header-allow" in w for w in t.why)
    # every rule is shown with its value
    assert rule_of(t, "base/read-all").value is False
    assert rule_of(t, "base/no-delete").value is True
    assert t.checks == ["not applied: no allow rule won (a deny beats DNS failures and the SSRF guard)"]


def test_first_matching_allow_wins(pol):
    ps = load_directory(pol)
    t = ps.explain(ACME, req("GET", path="/repos/acme/x"), PUBLIC)
    assert t.consistent, t.mismatches
    assert (t.decision.action, t.decision.rule) == ("allow", "base/read-all")
    assert t.why[0] == "no enforcing deny rule matched; first matching allow in order is base/read-all"
    gh = rule_of(t, "base/gh")
    assert gh.matched is True and "earlier allow base/read-all won" in gh.role
    # decide itself stops early: explain evaluates it anyway and says so
    assert gh.gateway_evaluates is False and "decide does not run it" in gh.note
    assert any("later matching allow rule(s) base/gh" in w for w in t.why)
    # top-level && terms, each with its own value
    assert gh.op == "&&"
    assert [(x.text, x.value) for x in gh.terms] == [('request.host == "api.github.com"', True),
                                                     ('request.path.startsWith("/repos/")', True)]
    assert t.decision.dial == "140.82.112.6"


def test_default_deny(pol):
    ps = load_directory(pol)
    t = ps.explain(ACME, req("PUT", host="example.com"), PUBLIC)
    assert t.consistent, t.mismatches
    assert (t.decision.code, t.decision.rule, t.winner) == ("default_deny", None, None)
    assert t.why[0] == "no rule matched: default deny"
    # the header rules failed to evaluate: allow -> no match
    assert any("allow rule(s) whose when failed count as no match: base/header-allow" in w for w in t.why)
    # host index: rules pinned to other hosts are not candidates, and it says so
    gh = rule_of(t, "base/gh")
    assert gh.status == "not_candidate"
    assert gh.note.startswith("not a candidate for host example.com")
    assert "api.github.com" in gh.note
    # a policy of another tenant: excluded by the tenant index, shown with its selector value
    beta = policy_of(t, "beta")
    assert beta.applicable is False and beta.selector_value is False
    assert "not a candidate for tenant 'acme'" in beta.why
    assert all(r.status == "policy_not_applicable" for r in beta.rules)


def test_selector_error_applies_only_deny_rules(pol):
    ps = load_directory(pol)
    # ACME has no "team" label: the teams selector fails
    t = ps.explain(ACME, req("POST", path="/x", host="example.com"), PUBLIC)
    assert t.consistent, t.mismatches
    teams = policy_of(t, "teams")
    assert teams.applicable is True
    assert teams.selector_error and "team" in teams.selector_error
    assert "only its deny rules apply" in teams.why
    posts = rule_of(t, "teams/red-posts")
    assert posts.status == "selector_failed" and posts.matched is None
    assert rule_of(t, "teams/no-secret-path").status == "evaluated"
    assert t.decision.code == "default_deny"
    assert any("teams/selector" in e for e in t.decision.errors)
    assert any("policy teams: the selector failed" in w for w in t.why)
    # the same request with the label: the allow rule applies
    t2 = ps.explain(RED, req("POST", path="/x", host="example.com"), PUBLIC)
    assert t2.consistent and t2.decision.rule == "teams/red-posts"
    # and the deny rule of a failed selector still denies
    t3 = ps.explain(ACME, req("GET", path="/secret"), PUBLIC)
    assert t3.consistent and (t3.decision.code, t3.decision.rule) == ("policy_deny", "teams/no-secret-path")


def test_rule_evaluation_error_fails_closed_and_is_shown(pol):
    ps = load_directory(pol)
    (pol / "05-strict.yaml").write_text("""\
name: strict
selector: principal.tenant == "acme"
rules:
  - name: needs-ua
    action: deny
    when: request.headers["user-agent"] == "bad"
""")
    ps = load_directory(pol)
    t = ps.explain(ACME, req("GET"), PUBLIC)
    assert t.consistent, t.mismatches
    r = rule_of(t, "strict/needs-ua")
    assert r.error is not None and "user-agent" in r.error
    assert r.matched is True and "fail closed" in r.note
    assert (t.decision.code, t.decision.rule) == ("policy_deny", "strict/needs-ua")
    assert any("its when failed" in w and "deny rules fail closed" in w for w in t.why)
    assert any(e.startswith("strict/needs-ua:") for e in t.decision.errors)
    # an allow rule's error is no match
    ha = rule_of(t, "base/header-allow")
    assert ha.error is not None and ha.matched is False


def test_shadow_policy(pol):
    ps = load_directory(pol)
    t = ps.explain(RED, req("POST", host="example.com"), PUBLIC)
    assert t.consistent, t.mismatches
    d = t.decision
    assert (d.action, d.rule) == ("allow", "teams/red-posts")
    assert d.shadow is not None and (d.shadow.action, d.shadow.rule) == ("deny", "trial/no-posts")
    trial = policy_of(t, "trial")
    assert trial.mode == "shadow"
    r = rule_of(t, "trial/no-posts")
    assert r.shadow and r.matched and "shadow" in r.role and "decides the shadow outcome" in r.role
    assert t.shadow_why[0] == "had every applicable policy been enforcing: first matching deny is trial/no-posts"
    assert "differs from the enforced one" in t.shadow_why[1]


def test_ssrf_denial_shows_the_address_and_allow_internal(pol):
    ps = load_directory(pol)
    dest = Destination((classify("10.1.2.3"), classify("192.168.7.7")))
    t = ps.explain(ACME, req("POST", host="billing.internal"), dest)
    assert t.consistent, t.mismatches
    d = t.decision
    assert (d.action, d.code, d.rule) == ("deny", "ssrf_blocked", "ssrf")
    assert t.winner == "base/internal"
    assert "192.168.7.7" in d.reason
    ok, bad = t.addresses
    assert (ok.address, ok.covered, ok.covered_by) == ("10.1.2.3", True, ["10.0.0.0/8"])
    assert (bad.address, bad.covered, bad.covered_by) == ("192.168.7.7", False, [])
    assert any("10.1.2.3" in c and "covered by base/internal allow_internal 10.0.0.0/8" in c for c in t.checks)
    assert any("192.168.7.7" in c and "NOT covered" in c and "10.0.0.0/8" in c and "ssrf_blocked" in c
               for c in t.checks)
    assert any("destination check failed" in w and "ssrf_blocked" in w for w in t.why)
    # covered: allowed, with the dial address
    t2 = ps.explain(ACME, req("POST", host="billing.internal"), Destination((classify("10.1.2.3"),)))
    assert t2.consistent and t2.decision.allowed and t2.decision.dial == "10.1.2.3"
    assert any(c.startswith("dial: 10.1.2.3") for c in t2.checks)
    # an embedded internal address is named
    t3 = ps.explain(ACME, req("POST", host="billing.internal"), Destination((classify("::ffff:169.254.169.254"),)))
    assert t3.consistent and t3.decision.code == "ssrf_blocked"
    assert t3.addresses[0].embedded == "169.254.169.254"
    # DNS failure
    t4 = ps.explain(ACME, req("GET"), Destination(error="cannot resolve x: nope"))
    assert t4.consistent and t4.decision.code == "dns_failure"
    assert any(c.startswith("dns: the host did not resolve: cannot resolve x: nope") for c in t4.checks)


def test_injection_names_only(pol, monkeypatch):
    monkeypatch.setenv("EXPLAIN_TEST_TOKEN", "sup3r-s3cret-value")
    ps = load_directory(pol)
    t = ps.explain(ACME, req("POST", path="/repos/acme/x"), PUBLIC)
    assert t.consistent, t.mismatches
    assert t.decision.rule == "base/gh" and t.decision.allowed
    assert t.inject == {"rule": "base/gh", "applied": True,
                        "headers": {"authorization": ["env:EXPLAIN_TEST_TOKEN"]},
                        "placeholders": {"llm": "vault:secret/acme/llm#key"}, "allow_plaintext": False}
    text = json.dumps(t.to_dict())
    assert "sup3r-s3cret-value" not in text and "Bearer" not in text


def test_explain_reports_a_disagreement_loudly(pol, monkeypatch, caplog):
    """If decide and explain ever differ, the trace says so and an error is logged."""
    from gateway.policy import engine
    ps = load_directory(pol)
    real = engine.PolicySet.decide

    def wrong(self, principal, request, destination):
        d = real(self, principal, request, destination)
        return engine.Decision("allow", "allowed", "base/nope", "made up", d.policy_version)

    monkeypatch.setattr(engine.PolicySet, "decide", wrong)
    with caplog.at_level(logging.ERROR, logger="egress.policy"):
        t = ps.explain(ACME, req("PUT", host="example.com"), PUBLIC)
    assert not t.consistent
    assert any(m.startswith("decision:") for m in t.mismatches)
    assert t.decision.rule == "base/nope"  # the decision shown is always decide's
    assert "EXPLAIN DISAGREES WITH DECIDE" in caplog.text


# ---------------------------------------------------------------------------
# explain == decide over many requests (both engines)

SET = {
    "00-a.yaml": """\
name: a
selector: principal.tenant in ["t1", "t2"]
rules:
  - {name: gh, action: allow, when: 'request.host == "h1.test" && request.method == "GET"'}
  - {name: deny-x, action: deny, when: 'request.method == "DELETE" && request.headers["x"] == "1"'}
  - {name: suffix, action: allow, when: 'request.host.endsWith(".svc.test")', allow_internal: ["10.0.0.0/8"]}
  - {name: path, action: allow, when: 'request.path.startsWith("/p") || request.query.contains("q=1")'}
  - {name: late, action: deny, when: 'now < timestamp("2000-01-01T00:00:00Z") || request.method == "PATCH"'}
---
name: b
selector: principal.labels.role == "admin"
rules:
  - {name: all, action: allow, when: 'request.port != 25'}
  - {name: no-h2, action: deny, when: 'request.host == "h2.test" && principal.agent == "bad"'}
""",
    "10-shadow.yaml": """\
name: s
mode: shadow
selector: "true"
rules:
  - {name: d, action: deny, when: 'request.method in ["POST", "PUT"]'}
  - {name: a, action: allow, when: 'destination.internal || request.headers["y"] == "2"'}
""",
    "20-c.yaml": """\
name: c
selector: 'principal.tenant == "t3" || principal.session.size() > 3'
rules:
  - name: int
    action: allow
    when: 'request.host in ["h1.test", "h2.test"]'
    allow_internal: ["127.0.0.0/8", "::1/128"]
  - {name: bad-type, action: allow, when: 'request.port'}
  - {name: sz, action: deny, when: 'size(request.path) > 6 && request.port == 25'}
""",
}

principals = st.builds(
    lambda t, a, s, role: Principal.make(t, a, s, {"role": role} if role else {}),
    st.sampled_from(["t1", "t2", "t3", "t4"]), st.sampled_from(["good", "bad"]),
    st.sampled_from(["", "sess-1"]), st.sampled_from([None, "admin", "user"]))
requests = st.builds(
    lambda host, method, path, port, query, headers: Request(
        host=host, port=port, method=method, path=path, query=query, headers=headers),
    st.sampled_from(["h1.test", "h2.test", "a.svc.test", "other.test"]),
    st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
    st.sampled_from(["/", "/p", "/pp/long/path", "/x"]), st.sampled_from([443, 25, 80]),
    st.sampled_from(["", "q=1", "a=2"]),
    st.dictionaries(st.sampled_from(["x", "y"]), st.sampled_from(["1", "2"]), max_size=2))
destinations = st.one_of(
    st.lists(st.sampled_from(["93.184.216.34", "10.0.0.5", "127.0.0.1", "::1", "192.168.1.1",
                              "169.254.169.254"]), min_size=1, max_size=3, unique=True).map(
        lambda ips: Destination(tuple(classify(i) for i in ips))),
    st.just(Destination(error="cannot resolve: nope")),
    st.just(Destination(())))


@pytest.fixture(scope="module")
def hypo_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hypo")
    for name, text in SET.items():
        (d / name).write_text(text)
    return d


@pytest.mark.parametrize("engine,examples", [("rust", 300), ("python", 60)])
def test_explain_decision_equals_decide(hypo_dir, engine, examples):
    ps = load_directory(hypo_dir, engine=celexpr.make_engine(engine))
    fresh = load_directory(hypo_dir, engine=celexpr.make_engine(engine))  # no shared caches

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(principals, requests, destinations)
    def check(principal, request, destination):
        t = ps.explain(principal, request, destination)
        assert t.consistent, t.mismatches
        # the same request (explain fixes `now`) decided by a set that shares no cache
        expected = fresh.decide(principal, _with_at(request, t), destination)
        assert same_decision(t.decision, expected)
        assert same_decision(t.decision, ps.decide(principal, _with_at(request, t), destination))
        # every candidate rule of the route was evaluated, and the winner is among them
        evaluated = {r.id for r in t.rules() if r.status == "evaluated"}
        if t.winner is not None:
            assert t.winner in evaluated
        assert {e.split(":", 1)[0] for e in t.decision.errors} <= evaluated | {
            f"{p.name}/selector" for p in t.policies}
        json.dumps(t.to_dict())  # always serialisable

    check()


def _at(trace):
    import datetime as dt
    return dt.datetime.fromisoformat(trace.now)


def _with_at(request, trace):
    import dataclasses
    return dataclasses.replace(request, at=_at(trace))


# ---------------------------------------------------------------------------
# the CLI


def run(*args, env=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "explain", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=e, timeout=60)


def test_cli_allowed_text(pol):
    r = run("--policies", pol, "--tenant", "acme", "--agent", "a1", "--address", "140.82.112.6",
            "GET", "https://api.github.com/repos/acme/x")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Decision: ALLOW" in out and "rule=base/read-all" in out
    assert "<== WINNER: first matching allow" in out
    assert "first matching allow in order is base/read-all" in out
    assert "not a candidate for host api.github.com" in out  # base/internal
    assert "not a candidate for tenant 'acme'" in out  # beta
    assert "dial: 140.82.112.6" in out
    assert "\x1b[" not in out  # no colour when not a terminal


def test_cli_denied_json(pol):
    r = run("--policies", pol, "--tenant", "acme", "--agent", "a1", "--address", "140.82.112.6",
            "--header", "X-Debug: on", "--format", "json", "GET", "https://example.com/")
    assert r.returncode == 1, r.stderr
    t = json.loads(r.stdout)
    assert t["decision"]["decision"] == "deny" and t["decision"]["rule"] == "base/debug-off"
    assert t["winner"] == "base/debug-off" and t["consistent"] is True
    rules = {x["id"]: x for p in t["policies"] for x in p["rules"]}
    assert rules["base/debug-off"]["value"] is True and rules["base/debug-off"]["role"].startswith("WINNER")
    assert rules["base/read-all"]["matched"] is True
    assert rules["base/gh"]["status"] == "not_candidate"
    assert rules["teams/red-posts"]["status"] == "selector_failed"
    assert t["request"]["headers"]["x-debug"] == "on"


def test_cli_ssrf_and_injection(pol):
    r = run("--policies", pol, "--tenant", "acme", "--agent", "a1", "--address", "10.9.9.9",
            "--address", "172.16.0.1", "POST", "https://billing.internal/pay")
    assert r.returncode == 1, r.stderr
    assert "code=ssrf_blocked" in r.stdout
    assert "172.16.0.1 is private: NOT covered by base/internal allow_internal ['10.0.0.0/8']" in r.stdout
    r = run("--policies", pol, "--tenant", "acme", "--agent", "a1", "--address", "140.82.112.6",
            "POST", "https://api.github.com/repos/acme/x", env={"EXPLAIN_TEST_TOKEN": "sup3r-s3cret-value"})
    assert r.returncode == 0, r.stderr
    assert "header authorization: env:EXPLAIN_TEST_TOKEN" in r.stdout
    assert "placeholder egress-secret:llm -> vault:secret/acme/llm#key" in r.stdout
    assert "sup3r-s3cret-value" not in r.stdout + r.stderr


@pytest.mark.parametrize("args", [
    ("GET", "https://example.com/"),  # no principal
    ("--tenant", "acme", "--agent", "a1", "GET", "/relative"),
    ("--tenant", "acme", "--agent", "a1", "--address", "nonsense", "GET", "https://example.com/"),
    ("--tenant", "acme", "--agent", "a1", "--header", "no-colon", "GET", "https://example.com/"),
    ("--request-id", "r1"),  # the default audit dir does not exist
    ("--tenant", "acme", "--agent", "a1", "--audit", "x.jsonl", "GET", "https://example.com/"),
])
def test_cli_bad_input_exits_2(pol, tmp_path, args):
    r = run("--policies", pol, *args, env={"EGRESS_STATE_DIR": str(tmp_path / "nostate")})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "egress: error:" in r.stderr


def test_cli_broken_policies_exit_2(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "p.yaml").write_text("name: p\nselector: 'true'\nrules:\n  - {action: allow, when: 'request.('}\n")
    r = run("--policies", d, "--tenant", "a", "--agent", "b", "GET", "https://example.com/")
    assert r.returncode == 2 and "p.yaml:4" in r.stderr


def decision_line(version: str, request_id: str = "3f2a9c", **over) -> str:
    """A decision event as gateway.runtime.Gateway.record writes it."""
    ev = {"ts": "2026-12-03T10:00:01.123456Z", "event": "decision", "request_id": request_id,
          "decision": "deny", "code": "policy_deny", "rule": "base/debug-off",
          "reason": "denied by rule base/debug-off", "policy_version": version, "source": "token",
          "status": 403,
          "request": {"method": "GET", "scheme": "https", "host": "example.com", "port": 443,
                      "path": "/data", "query": "token=REDACTED&page=REDACTED", "sni": "example.com",
                      "mode": "explicit"},
          "destination": {"ips": ["93.184.216.34"], "classes": ["public"], "via": "dns"},
          "decision_us": 14.2,
          "principal": {"tenant": "acme", "agent": "a1", "session": "", "labels": {}, "token_id": "tok-1",
                        "via": "token"}}
    ev.update(over)
    return json.dumps(ev, separators=(",", ":"))


def test_cli_request_id_from_audit_file(pol, tmp_path):
    version = load_directory(pol).version
    audit = tmp_path / "audit.jsonl"
    audit.write_text("\n".join([
        json.dumps({"ts": "2026-12-03T10:00:00Z", "event": "policy_loaded", "policy_version": version}),
        decision_line(version),
        json.dumps({"ts": "2026-12-03T10:00:01.2Z", "event": "request_completed", "request_id": "3f2a9c",
                    "status": 403, "bytes_sent": 0, "bytes_received": 0}),
        decision_line(version, "other", decision="allow", code="allowed", rule="base/read-all"),
    ]) + "\n")
    # without the header the record lacks, the re-decided outcome differs: said so
    r = run("--policies", pol, "--request-id", "3f2a9c", "--audit", audit)
    assert r.returncode == 0, r.stderr  # re-decided: allowed by base/read-all
    out = r.stdout
    assert "Recorded request 3f2a9c" in out and f"{audit}:2" in out
    assert "recorded     deny policy_deny base/debug-off" in out
    assert "re-decided   allow allowed base/read-all  -> DIFFERENT" in out
    assert "request.headers: header values are never recorded" in out
    assert "read by the rules considered: base/debug-off, base/header-allow" in out
    assert "request.query: query values were redacted" in out
    assert "the outcome may differ because of what the record lacks" in out
    # supplying the header: the same outcome as recorded
    r = run("--policies", pol, "--request-id", "3f2a9c", "--audit", audit, "--header", "x-debug: on",
            "--format", "json")
    assert r.returncode == 1, r.stderr
    t = json.loads(r.stdout)
    rec = t["record"]
    assert rec["same"] is True and rec["recorded"]["rule"] == "base/debug-off"
    assert rec["redecided"]["rule"] == "base/debug-off"
    assert [x["input"] for x in rec["lacks"]] == ["request.query", "now"]  # headers supplied
    assert rec["supplied"] == ["request.headers (from --header)"]
    assert t["now"].startswith("2026-12-03T10:00:01.123456")  # the event's time
    assert t["request"]["query"] == "token=REDACTED&page=REDACTED"
    # mixing a recorded request with a command-line one is bad input
    r = run("--policies", pol, "--request-id", "3f2a9c", "--audit", audit, "--tenant", "x")
    assert r.returncode == 2 and "--tenant cannot be used with --request-id" in r.stderr
    r = run("--policies", pol, "--request-id", "missing", "--audit", audit)
    assert r.returncode == 2 and "no decision event with request id 'missing'" in r.stderr


def test_cli_request_id_from_spool_directory(pol, tmp_path):
    version = load_directory(pol).version
    spool = tmp_path / "audit"
    spool.mkdir()
    (spool / "seg-00000000000000000001.jsonl").write_text(decision_line(version, "r1") + "\n")
    (spool / "seg-00000000000000000002.jsonl").write_text(
        decision_line("sha256:0000000000000000", "r2", decision="allow", code="allowed", rule="base/internal",
                      request={"method": "POST", "scheme": "https", "host": "billing.internal", "port": 443,
                               "path": "/", "sni": "billing.internal", "mode": "explicit"},
                      destination={"ips": ["10.1.1.1"], "classes": ["private"], "via": "override"}) + "\n")
    r = run("--policies", pol, "--request-id", "r2", "--audit", spool, "--format", "json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)
    assert t["record"]["same"] is True
    assert any("the policy set changed since" in n for n in t["record"]["notes"])
    assert t["decision"]["dial"] == "10.1.1.1"
    assert "request.query" not in [x["input"] for x in t["record"]["lacks"]]
    # a state directory works too (its audit/ spool)
    r = run("--policies", pol, "--request-id", "r1", "--audit", tmp_path)
    assert r.returncode == 0, r.stderr


def test_cli_request_id_from_a_real_gateway_record(pol, tmp_path):
    """The line Gateway.record writes (not a hand-made copy) is explained."""
    from gateway.config import load_config
    from gateway.runtime import Gateway

    cfg = load_config(None, policies=str(pol), state_dir=str(tmp_path / "state"), admin="")
    gw = Gateway(cfg)
    try:
        gw.load_policies()
        principal = Principal.make("acme", "a1", labels={"team": "red"}, token_id="tok-9")
        request = Request(host="example.com", port=443, scheme="https", method="POST", path="/x",
                          query="k=v", headers={"host": "example.com"}, sni="example.com")
        d, dt = gw.decide(principal, request, PUBLIC)
        assert gw.record(request_id="real-1", principal=principal, request=request, decision=d,
                         source="token", destination=PUBLIC, decision_seconds=dt)
    finally:
        gw.close()
    r = run("--policies", pol, "--request-id", "real-1", "--audit", tmp_path / "state", "--format", "json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)
    assert t["record"]["same"] is True and t["decision"]["rule"] == "teams/red-posts"
    assert t["principal"]["labels"] == {"team": "red"}
    assert t["decision"]["shadow"]["rule"] == "trial/no-posts"


def test_cli_loud_error_when_explain_and_decide_differ(pol, monkeypatch, capsys):
    from gateway import cli
    from gateway.policy import engine
    real = engine.PolicySet.decide

    def wrong(self, principal, request, destination):
        d = real(self, principal, request, destination)
        return engine.Decision("deny", "policy_deny", "base/nope", "made up", d.policy_version)

    monkeypatch.setattr(engine.PolicySet, "decide", wrong)
    code = cli.main(["policy", "explain", "--policies", str(pol), "--tenant", "acme", "--agent", "a1",
                     "--address", "140.82.112.6", "GET", "https://example.com/"])
    out = capsys.readouterr()
    assert code == 1  # decide's decision (deny) decides the exit status
    assert "EXPLAIN DISAGREES WITH DECIDE" in out.err and "decision: explain" in out.err
