"""egress policy replay: audit records rebuilt into policy inputs (records.py),
re-decided under a candidate set and compared (replay.py), the expected-changes
file, the command line, and end to end on the audit trail of a real gateway."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.policy.loader import compile_sources
from gateway.policy.model import Destination, Principal, Request
from gateway.policytools.records import (
    AuditPathError, NotReplayable, ReadStats, Reader, case_from_event, iter_events,
)
from gateway.policytools.replay import (
    Replay, ReplayInputError, Verdict, load_expectations, replay_events,
)
from gateway.runtime import Gateway, deny_decision

REPO_ROOT = Path(__file__).resolve().parent.parent

ACME = """\
apiVersion: egress/v1
kind: Policy
name: acme
selector: principal.tenant == "acme"
rules:
  - name: no-admin
    action: deny
    when: request.host == "one.test" && request.path.startsWith("/echo/admin")
  - name: one
    action: allow
    when: request.host == "one.test"
    allow_internal: ["127.0.0.0/8"]
  - name: two-read
    action: allow
    when: request.host == "two.test" && request.method == "GET"
    allow_internal: ["127.0.0.0/8"]
"""

BETA = """\
apiVersion: egress/v1
kind: Policy
name: beta
selector: principal.tenant == "beta"
rules:
  - name: two
    action: allow
    when: request.host == "two.test"
    allow_internal: ["127.0.0.0/8"]
"""

# The deliberate edit of the end-to-end test: acme may no longer reach
# /echo/private on one.test, and may now reach three.test.
ACME_PRIVATE_DENY = """\
  - name: private
    action: deny
    when: request.host == "one.test" && request.path.startsWith("/echo/private")
"""
ACME_THREE_ALLOW = """\
  - name: three
    action: allow
    when: request.host == "three.test"
    allow_internal: ["127.0.0.0/8"]
"""

HOSTS = ("one.test", "two.test", "three.test", "nope.test")


def write_policies(d: Path, acme: str = ACME, beta: str = BETA) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "10-acme.yaml").write_text(acme)
    (d / "20-beta.yaml").write_text(beta)
    return d


def candidate_text() -> str:
    return ACME.replace("  - name: one\n", ACME_PRIVATE_DENY + "  - name: one\n") + ACME_THREE_ALLOW


def policy_set(acme: str = ACME, beta: str = BETA):
    return compile_sources([("10-acme.yaml", acme), ("20-beta.yaml", beta)])


# -- building real decision events with Gateway.record ---------------------------------------------

def make_gateway(tmp_path: Path, policies: Path) -> Gateway:
    cfg = load_config(None, policies=str(policies), state_dir=str(tmp_path / "state"), admin="",
                      extra_hosts={h: ("127.0.0.1",) for h in HOSTS})
    gw = Gateway(cfg)
    gw.load_policies()
    return gw


def send(gw: Gateway, principal: Principal | None, method: str, url: str, *, rid: str,
         headers: dict | None = None, destination: Destination | None = None):
    """Decide and record one request the way the addon does; returns the Decision."""
    from urllib.parse import urlsplit
    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    req = Request(host=u.hostname, port=port, scheme=u.scheme, method=method, path=u.path or "/",
                  query=u.query, headers=headers or {"host": u.netloc},
                  sni=u.hostname if u.scheme == "https" else "")
    dest = destination if destination is not None else gw.resolver.resolve_static(u.hostname)
    if principal is None:
        d = deny_decision("identity_required", "no identity", gw.policies.version)
        gw.record(request_id=rid, principal=None, request=None, decision=d, source="127.0.0.1",
                  identity_code="missing")
        return d
    d, secs = gw.decide(principal, req, dest)
    assert gw.record(request_id=rid, principal=principal, request=req, decision=d, source="127.0.0.1",
                     destination=dest, decision_seconds=secs)
    return d


ALICE = Principal.make("acme", "build-bot", "s-42", {"team": "infra", "sandbox": "sbx-1"}, "tok-a")
BOB = Principal.make("beta", "crawler", "", {}, "tok-b")


@pytest.fixture()
def recorded(tmp_path):
    """A spool with a known mix of decisions, written by a real Gateway."""
    pol = write_policies(tmp_path / "pol")
    gw = make_gateway(tmp_path, pol)
    try:
        for i in range(3):
            send(gw, ALICE, "GET", f"http://one.test:9000/echo/a?token=sekrit&page={i}", rid=f"a{i}")
        send(gw, ALICE, "GET", "http://one.test:9000/echo/private/x", rid="p1")
        send(gw, ALICE, "GET", "http://one.test:9000/echo/private/x", rid="p2")
        send(gw, ALICE, "GET", "http://one.test:9000/echo/admin", rid="adm")
        send(gw, ALICE, "POST", "http://two.test:9000/echo/w", rid="w")
        send(gw, ALICE, "GET", "http://three.test:9000/echo/z", rid="z1")
        send(gw, ALICE, "GET", "http://three.test:9000/echo/z", rid="z2")
        send(gw, BOB, "GET", "http://two.test:9000/echo/b", rid="b")
        send(gw, BOB, "GET", "http://three.test:9000/echo/z", rid="bz")
        send(gw, None, "GET", "http://one.test:9000/", rid="anon")
    finally:
        gw.close()
    return tmp_path / "state" / "audit"


# -- records ---------------------------------------------------------------------------------------

def test_decision_events_round_trip_into_the_inputs_the_gateway_decided_on(tmp_path):
    pol = write_policies(tmp_path / "pol")
    gw = make_gateway(tmp_path, pol)
    v6 = Destination(tuple(__import__("gateway.addresses", fromlist=["classify"]).classify(a)
                           for a in ("127.0.0.1", "::1")), via="override")
    unresolved = Destination((), error="no such host", via="dns")
    inputs = [
        (ALICE, "POST", "http://one.test:9000/echo/a?token=sekrit&flag", None, "r1"),
        (BOB, "GET", "https://two.test/echo/b", v6, "r2"),
        (ALICE, "GET", "http://one.test:9000/x", unresolved, "r3"),
        (ALICE, "GET", "http://one.test:8080/self", None, "r4"),  # 127.0.0.1:8080: the gateway's own port
    ]
    decisions = {}
    try:
        for p, m, url, dest, rid in inputs:
            decisions[rid] = send(gw, p, m, url, rid=rid, destination=dest, headers={"x-secret": "hdr-value"})
        send(gw, None, "GET", "http://one.test/", rid="anon")
    finally:
        gw.close()
    reader = Reader([tmp_path / "state" / "audit"])
    events = list(reader)
    assert reader.stats.skipped == 0 and reader.stats.files == 1
    assert "hdr-value" not in json.dumps(events) and "sekrit" not in json.dumps(events)
    cases = {}
    kinds = []
    for ev in events:
        try:
            c = case_from_event(ev)
        except NotReplayable as e:
            kinds.append(e.kind)
            continue
        cases[c.request_id] = c
    assert sorted(kinds) == ["no_principal", "not_decision"]  # the policy_loaded event, the identity error

    c = cases["r1"]
    assert c.principal == ALICE  # tenant, agent, session, labels, token id, via
    r = c.request
    assert (r.method, r.scheme, r.host, r.port, r.path, r.sni, r.mode) == \
        ("POST", "http", "one.test", 9000, "/echo/a", "", "explicit")
    assert r.query == "token=REDACTED&flag" and r.headers == {}
    assert r.at is not None and r.at.isoformat().startswith(c.recorded.ts[:19])
    assert c.unknowns == ("request.headers", "request.query", "now")
    assert c.url == "http://one.test:9000/echo/a?token=REDACTED&flag"
    d = decisions["r1"]
    assert (c.recorded.decision, c.recorded.code, c.recorded.rule, c.recorded.policy_version) == \
        (d.action, d.code, d.rule, d.policy_version) == ("allow", "allowed", "acme/one", d.policy_version)

    c2 = cases["r2"]
    assert c2.principal == BOB and c2.request.sni == "two.test" and c2.request.port == 443
    assert c2.destination == v6 and c2.unknowns == ("request.headers", "now")
    assert c2.url == "https://two.test/echo/b"

    c3 = cases["r3"]  # no addresses: the gateway records no destination
    assert c3.destination.addresses == () and c3.destination.error
    assert (c3.recorded.decision, c3.recorded.code) == ("deny", "dns_failure")

    c4 = cases["r4"]  # the gateway refused its own address after the policy allowed
    assert (c4.recorded.code, c4.recorded.rule) == ("ssrf_blocked", "ssrf")

    # re-decided with the same policy set, every recorded decision comes out the same
    ps = policy_set()
    r = replay_events(events, ps)
    assert r.stats.replayed == 4 and r.stats.changed == 0 and not r.groups
    assert r.stats.not_replayable == {"no_principal": 1}


def test_events_without_a_request_or_of_another_type_are_not_replayable():
    with pytest.raises(NotReplayable) as e:
        case_from_event({"event": "decision", "principal": {"tenant": "a", "agent": "b"}, "decision": "deny"})
    assert e.value.kind == "no_request"
    with pytest.raises(NotReplayable) as e:
        case_from_event({"event": "request_completed", "request_id": "x"})
    assert e.value.kind == "not_decision"
    with pytest.raises(NotReplayable) as e:
        case_from_event({"event": "decision", "principal": {"tenant": "a"},
                         "request": {"host": "h", "port": 80}, "destination": {"ips": ["not-an-ip"]}})
    assert e.value.kind == "malformed"


def test_gzip_files_directories_and_a_torn_last_line(recorded, tmp_path):
    lines = b"".join(open(p, "rb").read() for p in sorted(recorded.glob("seg-*.jsonl")))
    n = lines.count(b"\n")
    # a spool whose last write was torn by a crash
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "seg-00000000000000000001.jsonl").write_bytes(lines + b'{"id":"x-99","seq":99,"ev')
    (torn / "notes.txt").write_text("not an audit file")
    st = ReadStats()
    evs = list(iter_events([torn], st))
    assert len(evs) == n and st.events == n
    assert st.skipped == 1 and st.torn == 1 and st.problems[0].endswith("torn or corrupt line), skipped")
    assert f"seg-00000000000000000001.jsonl:{n + 1}:" in st.problems[0]
    # an export, gzipped, with a blank line; and a directory of exports
    exp = tmp_path / "exports"
    exp.mkdir()
    with gzip.open(exp / "audit-1.jsonl.gz", "wb") as f:
        f.write(lines + b"\n")
    r = Reader([exp / "audit-1.jsonl.gz"])
    assert len(list(r)) == n and r.stats.skipped == 1 and r.stats.torn == 0
    (exp / "audit-2.jsonl").write_bytes(lines)
    r = Reader([exp])
    assert [p.name for p in r.files] == ["audit-1.jsonl.gz", "audit-2.jsonl"]
    assert len(list(r)) == 2 * n
    # a truncated .gz: what could be read is, the rest is counted as skipped
    data = (exp / "audit-1.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    r = Reader([tmp_path / "cut.jsonl.gz"])
    got = list(r)
    assert len(got) < n and r.stats.torn >= 1
    # a gateway state directory reads its spool
    assert len(list(Reader([recorded.parent]))) == n
    with pytest.raises(AuditPathError):
        Reader([tmp_path / "missing"])


# -- replay ----------------------------------------------------------------------------------------

def changes_of(r: Replay) -> dict:
    return {(g.tenant, str(g.old), str(g.new)): g.count for g in r.groups.values()}


def test_replay_reports_exactly_the_changed_decisions(recorded):
    r = replay_events(Reader([recorded]), policy_set(candidate_text()), examples=1)
    assert changes_of(r) == {
        ("acme", "allow acme/one [allowed]", "deny acme/private [policy_deny]"): 2,
        ("acme", "deny (no rule) [default_deny]", "allow acme/three [allowed]"): 2,
    }
    assert r.stats.replayed == 11 and r.stats.unchanged == 7 and r.stats.changed == 4
    g = r.groups[("acme", Verdict("allow", "allowed", "acme/one"), Verdict("deny", "policy_deny", "acme/private"))]
    # identical requests: one example, seen twice; all counted
    assert [(e.url, e.count) for e in g.examples.items.values()] == [("http://one.test:9000/echo/private/x", 2)]
    assert g.hosts == {"one.test": 2} and g.inexact == 0
    assert r.unacknowledged == 4 and r.exit_status() == 1


def test_baseline_compares_two_sets_on_the_same_records(recorded):
    # records decided by the original set; baseline = candidate: nothing changes,
    # whatever was recorded
    cand = policy_set(candidate_text())
    r = replay_events(Reader([recorded]), cand, baseline=policy_set(candidate_text()))
    assert r.stats.changed == 0 and r.stats.replayed == 11
    # baseline = original set: the same changes as against the records
    r = replay_events(Reader([recorded]), cand, baseline=policy_set())
    assert sum(changes_of(r).values()) == 4


def test_changes_whose_rules_read_what_the_record_lacks_are_marked_inexact(recorded):
    hdr = ACME.replace("  - name: one\n", """\
  - name: need-ua
    action: deny
    when: request.host == "one.test" && !("user-agent" in request.headers)
  - name: one
""")
    r = replay_events(Reader([recorded]), policy_set(hdr))
    # the record has no headers, so the replay sees every one.test request without a user agent
    (g,) = r.groups.values()
    assert (g.tenant, str(g.old), str(g.new)) == ("acme", "allow acme/one [allowed]",
                                                  "deny acme/need-ua [policy_deny]")
    assert g.count == g.inexact == 5
    assert g.inexact_reads == {"acme/need-ua": {"request.headers"}}
    d = r.to_dict()
    assert d["changes"][0]["inexact"] == 5
    # a rule that reads the (redacted) query: unchanged requests are counted as inexact too
    q = ACME.replace('when: request.host == "one.test"\n',
                     'when: request.host == "one.test" && !request.query.contains("token=x")\n')
    r = replay_events(Reader([recorded]), policy_set(q))
    assert r.stats.changed == 0 and r.stats.inexact_unchanged == 3  # the three requests with a query


def test_the_expect_file_acknowledges_changes(recorded, tmp_path):
    f = tmp_path / "expect.yaml"
    f.write_text("""\
changes:
  - tenant: acme
    from: {decision: allow, rule: acme/one}
    to: {decision: deny, rule: acme/private}
    host: one.test
    reason: "SEC-1: private is private"
  - to: {decision: allow, rule: "acme/th*"}
    from: {rule: null}
    host: "*.test"
    reason: "SEC-2: three.test is a partner"
  - tenant: beta
    to: {decision: deny}
    reason: never happens
""")
    exp = load_expectations(f)
    assert [x.line for x in exp] == [2, 7, 11]
    r = replay_events(Reader([recorded]), policy_set(candidate_text()), expectations=exp)
    assert r.unacknowledged == 0 and r.exit_status() == 0
    assert [x.line for x in r.not_seen()] == [11]
    assert r.exit_status(strict=True) == 1
    # only the first acknowledged: the other group is reported
    r = replay_events(Reader([recorded]), policy_set(candidate_text()), expectations=exp[:1])
    assert r.unacknowledged == 2 and r.exit_status() == 1
    (g,) = [g for g in r.groups.values() if g.unacknowledged]
    assert str(g.new) == "allow acme/three [allowed]"
    # a host filter that does not match leaves the change unacknowledged
    f.write_text("changes:\n  - to: {rule: acme/private}\n    host: two.test\n    reason: x\n")
    r = replay_events(Reader([recorded]), policy_set(candidate_text()), expectations=load_expectations(f))
    assert r.unacknowledged == 4


def test_an_invalid_expect_file_is_reported_with_file_and_line(tmp_path):
    f = tmp_path / "expect.yaml"
    f.write_text("""\
changes:
  - tenant: acme
    from: {decision: maybe}
    reason: x
  - tenant: acme
    to: {decision: deny, rul: x}
  - host: "a*b.com"
    to: {decision: deny}
    reason: y
    extra: 1
  - reason: z
""")
    with pytest.raises(ReplayInputError) as e:
        load_expectations(f)
    probs = e.value.problems
    assert any(p.startswith(f"{f}:3: from.decision must be allow or deny") for p in probs), probs
    assert any(p.startswith(f"{f}:6: to: unknown key 'rul'") for p in probs), probs
    assert any(p.startswith(f"{f}:5: change #2: 'reason' is required") for p in probs), probs
    assert any(p.startswith(f"{f}:7: change #3: host must be") for p in probs), probs
    assert any(p.startswith(f"{f}:10: change #3: unknown key 'extra'") for p in probs), probs
    assert any(p.startswith(f"{f}:11: change #4: give 'from' and/or 'to'") for p in probs), probs
    f.write_text("changes: [\n")
    with pytest.raises(ReplayInputError) as e:
        load_expectations(f)
    assert str(e.value).startswith(f"{f}:") and "not valid YAML" in str(e.value)


def test_command_line_exit_status_and_formats(recorded, tmp_path, capsys):
    from gateway.cli import main
    cand = write_policies(tmp_path / "cand", acme=candidate_text())
    orig = write_policies(tmp_path / "orig")
    assert main(["policy", "replay", "--audit", str(recorded), "--candidate", str(orig)]) == 0
    assert "ok: no changes" in capsys.readouterr().out
    assert main(["policy", "replay", "--audit", str(recorded), "--candidate", str(cand)]) == 1
    out = capsys.readouterr().out
    assert "tenant acme: 2 request(s)  allow acme/one [allowed]  ->  deny acme/private [policy_deny]" in out
    assert "FAIL: 4 changed decision(s) not acknowledged" in out
    assert main(["policy", "replay", "--audit", str(recorded), "--candidate", str(cand), "--format", "json",
                 "--tenant", "beta"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["stats"]["replayed"] == 2 and d["changes"] == [] and d["exit"] == 0
    # bad input: exit 2
    assert main(["policy", "replay", "--audit", str(tmp_path / "nope"), "--candidate", str(cand)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "p.yaml").write_text("name: x\nrules: [{name: r, action: allow, when: 'request.host =='}]\n")
    assert main(["policy", "replay", "--audit", str(recorded), "--candidate", str(bad)]) == 2
    assert f"{bad / 'p.yaml'}:" in capsys.readouterr().err
    (tmp_path / "e.yaml").write_text("changes:\n  - to: {decision: nope}\n    reason: x\n")
    assert main(["policy", "replay", "--audit", str(recorded), "--candidate", str(cand),
                 "--expect", str(tmp_path / "e.yaml")]) == 2
    assert f"{tmp_path / 'e.yaml'}:2: to.decision must be allow or deny" in capsys.readouterr().err
    assert main(["policy", "replay", "--audit", str(recorded), "--candidate", str(cand),
                 "--since", "2000-01-01", "--until", "2000-01-02"]) == 2
    assert "nothing to replay" in capsys.readouterr().err


# -- end to end: the acceptance test -----------------------------------------------------------

def run_replay(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "replay", *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_replay_of_a_real_gateway_audit_reports_exactly_the_changes_made_to_the_candidate(tmp_path):
    """Replay, run on an audit file produced by an end-to-end test, reports
    exactly the changes a test makes to the candidate policy, and nothing else."""
    import requests

    from tests.support.gateway import raw_connect, start_gateway
    from tests.support.procs import start_upstreams

    pol = write_policies(tmp_path / "policies")
    ups = start_upstreams(tmp_path / "up", tls=False)
    gw = start_gateway(tmp_path, pol, hosts={h: "127.0.0.1" for h in HOSTS})
    sent: dict[tuple, int] = {}

    def get(tenant, method, host, path, want):
        s = requests.Session()
        s.trust_env = False
        s.proxies = gw.proxies(gw.mint(tenant, f"{tenant}-agent") if tenant else None)
        r = s.request(method, f"http://{host}:{ups.http_port}{path}", timeout=10)
        assert r.status_code == want, (tenant, method, host, path, r.status_code, r.text)
        sent[(tenant, method, host, path)] = sent.get((tenant, method, host, path), 0) + 1

    try:
        for i in range(3):
            get("acme", "GET", "one.test", f"/echo/a?token=sekrit{i}", 200)
        for _ in range(2):
            get("acme", "GET", "one.test", "/echo/private/x", 200)   # -> denied by the candidate
        get("acme", "GET", "one.test", "/echo/private/y", 200)       # -> denied by the candidate
        get("acme", "GET", "one.test", "/echo/admin", 403)
        get("acme", "GET", "two.test", "/echo/r", 200)
        get("acme", "POST", "two.test", "/echo/w", 403)
        for _ in range(2):
            get("acme", "GET", "three.test", "/echo/z", 403)         # -> allowed by the candidate
        get("beta", "GET", "two.test", "/echo/b", 200)
        get("beta", "GET", "one.test", "/echo/private/x", 403)      # another tenant: unaffected
        get("beta", "GET", "three.test", "/echo/z", 403)            # another tenant: unaffected
        get(None, "GET", "one.test", "/echo/a", 407)                # identity error: not replayable
        sock, resp = raw_connect(gw.proxy_port, "nope.test:443", gw.mint("acme", "acme-agent"))
        sock.close()
        assert resp.status == 403
    finally:
        gw.stop()
        ups.stop()
    audit = gw.state_dir / "audit"
    decisions = [json.loads(line) for p in sorted(audit.glob("seg-*.jsonl")) for line in p.read_text().splitlines()
                 if '"event":"decision"' in line]
    assert len(decisions) == sum(sent.values()) + 1  # + the CONNECT

    # the candidate: a copy of the policy directory with one deliberate change
    cand = tmp_path / "candidate"
    shutil.copytree(pol, cand)
    (cand / "10-acme.yaml").write_text(candidate_text())

    res = run_replay("--audit", audit, "--candidate", cand, "--format", "json", "--examples", "10")
    assert res.returncode == 1, res.stderr + res.stdout
    report = json.loads(res.stdout)
    got = {(c["tenant"], json.dumps(c["from"], sort_keys=True), json.dumps(c["to"], sort_keys=True)): c["count"]
           for c in report["changes"]}

    def v(decision, code, rule):
        return json.dumps({"decision": decision, "code": code, "rule": rule}, sort_keys=True)
    private = sum(n for (t, m, h, p), n in sent.items() if t == "acme" and h == "one.test"
                  and p.startswith("/echo/private"))
    three = sum(n for (t, m, h, p), n in sent.items() if t == "acme" and h == "three.test")
    assert (private, three) == (3, 2)
    assert got == {
        ("acme", v("allow", "allowed", "acme/one"), v("deny", "policy_deny", "acme/private")): private,
        ("acme", v("deny", "default_deny", None), v("allow", "allowed", "acme/three")): three,
    }
    st = report["stats"]
    assert st["changed"] == private + three
    assert st["replayed"] == sum(n for (t, *_), n in sent.items() if t) + 1  # every decision with an identity
    assert st["unchanged"] == st["replayed"] - st["changed"]
    assert st["not_replayable"] == {"no_principal": 1}
    assert report["unacknowledged"] == private + three
    for c in report["changes"]:
        assert c["inexact"] == 0
        urls = {e["url"] for e in c["examples"]}
        if c["to"]["rule"] == "acme/private":
            assert urls == {f"http://one.test:{ups.http_port}/echo/private/x",
                            f"http://one.test:{ups.http_port}/echo/private/y"}
            assert sorted(e["count"] for e in c["examples"]) == [1, 2]
            assert c["hosts"] == {"one.test": private}
        else:
            assert urls == {f"http://three.test:{ups.http_port}/echo/z"}
    ids = {e["request_id"] for c in report["changes"] for e in c["examples"]}
    assert ids <= {d["request_id"] for d in decisions}

    # text output names them, and fails
    res = run_replay("--audit", audit, "--candidate", cand)
    assert res.returncode == 1
    assert "tenant acme: 3 request(s)  allow acme/one [allowed]  ->  deny acme/private [policy_deny]" in res.stdout
    assert "NOT EXPECTED" in res.stdout and "FAIL: 5 changed decision(s)" in res.stdout

    # acknowledged in an expect file: exit 0
    expect = tmp_path / "expected-changes.yaml"
    expect.write_text("""\
changes:
  - tenant: acme
    host: one.test
    from: {decision: allow, rule: acme/one}
    to:   {decision: deny,  rule: acme/private}
    reason: "SEC-7: private endpoints are off limits"
  - tenant: acme
    from: {decision: deny, rule: null}
    to:   {decision: allow, rule: acme/three}
    reason: "SEC-8: three.test is a partner"
""")
    res = run_replay("--audit", audit, "--candidate", cand, "--expect", expect)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok: 5 changed decision(s), all expected" in res.stdout
    res = run_replay("--audit", audit, "--candidate", cand, "--expect", expect, "--strict")
    assert res.returncode == 0

    # only one of them acknowledged: exit 1, the other listed
    expect.write_text(expect.read_text().split("  - tenant: acme\n    from: {decision: deny")[0])
    res = run_replay("--audit", audit, "--candidate", cand, "--expect", expect, "--format", "json")
    assert res.returncode == 1
    rep = json.loads(res.stdout)
    assert rep["unacknowledged"] == three
    assert [c["to"]["rule"] for c in rep["changes"] if c["unacknowledged"]] == ["acme/three"]

    # an unchanged copy of the policy directory: zero changes
    same = tmp_path / "same"
    shutil.copytree(pol, same)
    res = run_replay("--audit", audit, "--candidate", same, "--format", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads(res.stdout)
    assert rep["changes"] == [] and rep["stats"]["changed"] == 0
    assert rep["stats"]["recorded_policy_versions"] == {rep["candidate"]: st["replayed"]}
    # ... and an expected change that is not seen: a warning, an error with --strict
    res = run_replay("--audit", audit, "--candidate", same, "--expect", expect)
    assert res.returncode == 0 and "warning: 1 expected change(s) not seen" in res.stdout
    res = run_replay("--audit", audit, "--candidate", same, "--expect", expect, "--strict")
    assert res.returncode == 1


def test_refused_connects_secret_refusals_and_other_codes(tmp_path):
    """A refused CONNECT is re-checked as the gateway did (could_allow); a
    refusal after the policy allowed (secrets) is compared on its rule; codes
    the policy did not decide are counted, not compared."""
    from gateway.policy.model import Decision
    pol = write_policies(tmp_path / "pol")
    gw = make_gateway(tmp_path, pol)
    try:
        dest = gw.resolver.resolve_static("three.test")
        o = gw.policies.could_allow(ALICE, "three.test", dest)
        assert o is not None and o.code == "default_deny"
        probe = Request(host="three.test", port=443, scheme="https", method="CONNECT", path="", sni="")
        gw.record(request_id="c1", principal=ALICE, request=probe, source="127.0.0.1", destination=dest,
                  decision=Decision("deny", o.code, o.rule, o.reason, gw.policies.version), status=403)
        req = Request(host="one.test", port=9000, scheme="http", method="GET", path="/s")
        one = gw.resolver.resolve_static("one.test")
        for rid, code in (("s1", "secret_not_granted"), ("s2", "plaintext_injection")):
            gw.record(request_id=rid, principal=ALICE, request=req, destination=one, source="127.0.0.1",
                      decision=Decision("deny", code, "acme/one", "refused", gw.policies.version), status=403)
        gw.record(request_id="au", principal=ALICE, request=req, destination=one, source="127.0.0.1",
                  decision=deny_decision("audit_unavailable", "spool full", gw.policies.version), status=503)
        # an address the gateway knows as its own (configuration, not in the record)
        gw.audit.write_line(json.dumps({
            "ts": "2026-12-03T14:23:21.364776Z", "event": "decision", "request_id": "self", "decision": "deny",
            "code": "ssrf_blocked", "rule": "ssrf", "reason": "no rule allows that range",
            "policy_version": gw.policies.version, "source": "127.0.0.1",
            "request": {"method": "GET", "scheme": "http", "host": "one.test", "port": 9000, "path": "/",
                        "sni": "", "mode": "explicit"},
            "destination": {"ips": ["10.1.2.3"], "classes": ["gateway_self"], "via": "override"},
            "principal": {"tenant": "acme", "agent": "a", "session": "", "labels": {}, "token_id": "",
                          "via": "token"}}), flush=True)
    finally:
        gw.close()
    audit = tmp_path / "state" / "audit"
    cases = {}
    for ev in Reader([audit]):
        try:
            c = case_from_event(ev)
        except NotReplayable:
            continue
        cases[c.request_id] = c
    assert cases["c1"].is_connect and cases["c1"].url == "CONNECT three.test"
    selfc = cases["self"]
    assert [c.klass.value for c in selfc.destination.addresses] == ["gateway_self"]
    assert "destination" not in selfc.unknowns

    r = replay_events(Reader([audit]), policy_set())
    assert r.stats.changed == 0 and r.stats.replayed == 4  # c1, s1, s2, self
    assert r.stats.not_policy == {"audit_unavailable": 1}

    # the candidate lets three.test through: the CONNECT would open (inexact: the
    # requests in the tunnel were never made); the rule that allowed the refused
    # requests now denies them
    cand = candidate_text().replace('when: request.host == "one.test"\n',
                                    'when: request.host == "one.test" && request.path != "/s"\n')
    r = replay_events(Reader([audit]), policy_set(cand))
    got = {(str(g.old), str(g.new)): (g.count, g.inexact) for g in r.groups.values()}
    assert got == {
        ("deny (no rule) [default_deny]", "allow (no rule) [connect_allowed]"): (1, 1),
        ("deny acme/one [secret_not_granted]", "deny (no rule) [default_deny]"): (1, 0),
        ("deny acme/one [plaintext_injection]", "deny (no rule) [default_deny]"): (1, 0),
    }
    g = next(g for g in r.groups.values() if g.new.code == "connect_allowed")
    assert g.inexact_reads == {"(connect)": {"tunnel"}}
    # against a baseline, every record with a principal and a request is compared
    r = replay_events(Reader([audit]), policy_set(), baseline=policy_set())
    assert r.stats.replayed == 5 and r.stats.changed == 0


def test_python_engine_and_progress(recorded, tmp_path, capsys):
    from gateway.cli import main
    cand = write_policies(tmp_path / "cand", acme=candidate_text())
    assert main(["policy", "replay", "--audit", str(recorded), "--candidate", str(cand), "--engine", "python",
                 "--format", "json", "--progress"]) == 1
    out = capsys.readouterr()
    assert json.loads(out.out)["stats"]["changed"] == 4
