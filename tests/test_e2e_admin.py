"""End to end: admin API, hot reload (file change, admin endpoint, SIGHUP),
metrics and the audit file of a real gateway process."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from tests.support.gateway import start_gateway
from tests.support.procs import start_upstreams

BASE = """\
apiVersion: egress/v1
kind: Policy
name: acme
selector: principal.tenant == "acme"
rules:
  - name: read
    action: allow
    when: request.host == "upstream.test" && request.method == "GET"
    allow_internal: ["127.0.0.0/8"]
"""

WITH_DENY = BASE + """\
  - name: no-secret-path
    action: deny
    when: request.path.startsWith("/echo/secret")
    reason: Reloaded rule.
"""

BROKEN = BASE.replace('request.method == "GET"', 'request.method == "GET" &&')


@pytest.fixture()
def env(tmp_path):
    ups = start_upstreams(tmp_path / "up", tls=False)
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "10-acme.yaml").write_text(BASE)
    gw = start_gateway(tmp_path, pol, hosts={"upstream.test": "127.0.0.1"},
                       extra_args=["--config", str(_config(tmp_path))])
    try:
        yield gw, ups, pol
    finally:
        gw.stop()
        ups.stop()


def _config(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("reload_interval: 0.3\n")
    return p


def get(gw, ups, path, tenant="acme"):
    s = requests.Session()
    s.trust_env = False
    s.proxies = gw.proxies(gw.mint(tenant, "a1"))
    return s.get(f"http://upstream.test:{ups.http_port}{path}")


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_admin_requires_token_except_health(env):
    gw, _, _ = env
    assert gw.admin("GET", "/healthz", auth=False)[0] == 200
    status, body = gw.admin("GET", "/readyz", auth=False)
    assert status == 200 and body["ready"] is True and "canary denied" in body["self_test"]
    for method, path in [("GET", "/metrics"), ("GET", "/v1/policy"), ("POST", "/v1/reload"),
                         ("GET", "/v1/bindings"), ("POST", "/v1/revocations"), ("POST", "/v1/decide")]:
        assert gw.admin(method, path, auth=False)[0] == 401, path


def test_reload_via_admin_good_then_broken(env):
    gw, ups, pol = env
    v1 = gw.admin("GET", "/v1/policy")[1]["version"]
    assert get(gw, ups, "/echo/secret/1").status_code == 200
    # a good change, through the admin endpoint
    (pol / "10-acme.yaml").write_text(WITH_DENY)
    status, out = gw.admin("POST", "/v1/reload")
    assert status == 200 and out["ok"] and out["changed"] and out["version"] != v1
    r = get(gw, ups, "/echo/secret/2")
    assert r.status_code == 403 and r.json()["rule"] == "acme/no-secret-path"
    v2 = out["version"]
    assert r.json()["policy_version"] == v2
    # a broken file is rejected with its position; the last good set stays
    (pol / "10-acme.yaml").write_text(BROKEN)
    status, out = gw.admin("POST", "/v1/reload")
    assert status == 422 and not out["ok"]
    assert out["version"] == v2
    assert any("10-acme.yaml:" in p for p in out["problems"]), out
    r = get(gw, ups, "/echo/secret/3")
    assert r.status_code == 403 and r.json()["policy_version"] == v2
    assert get(gw, ups, "/echo/fine").status_code == 200
    metrics = gw.admin("GET", "/metrics")[1]
    assert 'egress_policy_reloads_total{outcome="failure",trigger="admin"} 1.0' in metrics
    assert f'egress_policy_info{{version="{v2}"}} 1.0' in metrics


def test_reload_on_file_change(env):
    gw, ups, pol = env
    v1 = gw.admin("GET", "/v1/policy")[1]["version"]
    (pol / "10-acme.yaml").write_text(WITH_DENY)
    assert wait_until(lambda: gw.admin("GET", "/v1/policy")[1]["version"] != v1), gw.log_text()
    assert get(gw, ups, "/echo/secret/x").status_code == 403
    events = [e for e in gw.audit_events() if e.get("event") == "policy_reload"]
    assert events[-1]["trigger"] == "file-change" and events[-1]["ok"]


def test_reload_on_sighup(tmp_path):
    ups = start_upstreams(tmp_path / "up", tls=False)
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "10-acme.yaml").write_text(BASE)
    cfg = tmp_path / "no-poll.yaml"
    cfg.write_text("reload_interval: 0\n")
    gw = start_gateway(tmp_path, pol, hosts={"upstream.test": "127.0.0.1"}, extra_args=["--config", str(cfg)])
    try:
        (pol / "10-acme.yaml").write_text(WITH_DENY)
        time.sleep(0.5)
        assert get(gw, ups, "/echo/secret/before-hup").status_code == 200  # no polling: not reloaded yet
        os.kill(gw.proc.pid, signal.SIGHUP)
        assert wait_until(lambda: gw.admin("GET", "/v1/policy")[1]["rules"] == 2)
        assert get(gw, ups, "/echo/secret/after-hup").status_code == 403
        events = [e for e in gw.audit_events() if e.get("event") == "policy_reload"]
        assert events[-1]["trigger"] == "sighup"
    finally:
        gw.stop()
        ups.stop()


def test_metrics_and_audit_lines(env):
    gw, ups, _ = env
    assert get(gw, ups, "/echo/m1").status_code == 200
    assert get(gw, ups, "/echo/m2", tenant="other").status_code == 403
    m = gw.admin("GET", "/metrics")[1]
    import re
    assert re.search(r'egress_requests_total\{agent="[^"]+",code="allowed",decision="allow",rule="[^"]+",'
                     r'tenant="acme"\}', m), m
    assert re.search(r'egress_requests_total\{agent="[^"]+",code="default_deny",decision="deny",rule="_none",'
                     r'tenant="other"\}', m), m
    assert "egress_decision_duration_seconds_bucket" in m
    decisions = [e for e in gw.audit_events() if e.get("event") == "decision"]
    assert len(decisions) >= 2
    for e in decisions:
        assert {"ts", "request_id", "decision", "code", "policy_version", "principal", "request"} <= set(e)
        assert "query" not in e["request"]
    from gateway.audit import verify_chain
    from tests.support.gateway import audit_files
    n, brk = verify_chain(audit_files(gw.state_dir))  # the running gateway's spool is one intact chain
    assert brk is None and n == len(gw.audit_events())


def test_decide_endpoint_explains_without_sending(env):
    gw, ups, _ = env
    before = ups.stats()["requests"]
    status, out = gw.admin("POST", "/v1/decide", {
        "principal": {"tenant": "acme", "agent": "a1"},
        "request": {"method": "GET", "url": f"http://upstream.test:{ups.http_port}/echo/x"}})
    assert status == 200
    assert out["decision"] == "allow" and out["rule"] == "acme/read" and out["dial"] == "127.0.0.1"
    assert out["applicable_policies"] == ["acme"]
    status, out = gw.admin("POST", "/v1/decide", {
        "principal": {"tenant": "acme", "agent": "a1"},
        "request": {"method": "GET", "url": "http://upstream.test/"}, "addresses": ["169.254.169.254"]})
    assert out["decision"] == "deny" and out["code"] == "ssrf_blocked"
    assert gw.admin("POST", "/v1/decide", {"principal": {}})[0] == 400
    assert ups.stats()["requests"] == before


def test_token_minting_and_bindings_api(env):
    gw, ups, _ = env
    status, out = gw.admin("POST", "/v1/tokens", {"tenant": "acme", "agent": "a7", "ttl_seconds": 60})
    assert status == 201 and out["token"].startswith("egt1.")
    s = requests.Session()
    s.trust_env = False
    s.proxies = gw.proxies(out["token"])
    assert s.get(f"http://upstream.test:{ups.http_port}/echo/minted").status_code == 200
    assert gw.admin("POST", "/v1/tokens", {"tenant": "bad tenant!", "agent": "a"})[0] == 400
    status, out = gw.admin("POST", "/v1/bindings", {"address": "10.9.8.7", "tenant": "acme", "agent": "t1"})
    assert status == 201 and out["address"] == "10.9.8.7"
    assert "10.9.8.7" in gw.admin("GET", "/v1/bindings")[1]["bindings"]
    assert gw.admin("POST", "/v1/bindings", {"address": "nope", "tenant": "acme", "agent": "t1"})[0] == 400
    assert gw.admin("DELETE", "/v1/bindings/10.9.8.7")[0] == 200
    assert gw.admin("DELETE", "/v1/bindings/10.9.8.7")[0] == 404


def test_broken_policies_refuse_to_start(tmp_path):
    pol = tmp_path / "bad"
    pol.mkdir()
    (pol / "x.yaml").write_text(BROKEN)
    with pytest.raises(RuntimeError) as e:
        start_gateway(tmp_path, pol, timeout=20)
    assert "x.yaml:" in str(e.value) and "did not start" in str(e.value)
