"""End to end: the audit trail of a real gateway process: decision and completion
events (status, bytes, timings, redacted query), a file sink receiving the same
chained events, fail-closed when the spool backlog is over its bound."""

from __future__ import annotations

import json
import time

import pytest
import requests

from gateway.audit import verify_chain
from gateway.audit.sinks.file import audit_files as sink_files
from tests.support.gateway import audit_files, start_gateway
from tests.support.procs import start_upstreams

POLICY = """\
apiVersion: egress/v1
kind: Policy
name: acme
selector: principal.tenant == "acme"
rules:
  - name: read
    action: allow
    when: request.host == "upstream.test"
    allow_internal: ["127.0.0.0/8"]
"""


def wait_until(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture()
def policies(tmp_path):
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "10-acme.yaml").write_text(POLICY)
    return pol


def session(gw, tenant="acme", agent="a1", **labels):
    s = requests.Session()
    s.trust_env = False
    s.proxies = gw.proxies(gw.mint(tenant, agent, **labels))
    return s


def test_decision_and_completion_events_reach_the_file_sink(tmp_path, policies):
    ups = start_upstreams(tmp_path / "up", tls=False)
    out = tmp_path / "siem" / "audit.jsonl"
    gw = start_gateway(tmp_path, policies, hosts={"upstream.test": "127.0.0.1"}, config={
        "audit": {"sinks": [{"name": "archive", "type": "file", "path": str(out), "batch_wait": 0.05}]}})
    try:
        s = session(gw)
        r = s.post(f"http://upstream.test:{ups.http_port}/echo/a?token=sekrit-value&page=2", data=b"x" * 1000)
        assert r.status_code == 200
        r2 = session(gw, tenant="other").get(f"http://upstream.test:{ups.http_port}/echo/b")
        assert r2.status_code == 403
        evs = gw.audit_events()
        dec = [e for e in evs if e.get("event") == "decision" and e["request"]["path"] == "/echo/a"]
        assert len(dec) == 1
        d = dec[0]
        assert d["decision"] == "allow" and d["rule"] == "acme/read"
        assert d["request"]["query"] == "token=REDACTED&page=REDACTED"  # names stay, values go
        assert d["id"].endswith(f"-{d['seq']}") and d["principal"]["tenant"] == "acme"
        assert wait_until(lambda: any(e.get("event") == "request_completed" and e["request_id"] == d["request_id"]
                                      for e in gw.audit_events()))
        comp = next(e for e in gw.audit_events() if e.get("event") == "request_completed"
                    and e["request_id"] == d["request_id"])
        assert comp["seq"] > d["seq"]  # the decision is written before the request goes upstream
        assert comp["status"] == 200 and comp["bytes_sent"] == 1000
        assert comp["bytes_received"] == len(r.content)
        assert comp["total_ms"] >= comp["upstream_ms"] >= 0
        assert "principal" not in comp  # joined to its decision by request_id (egress audit query does)
        deny = next(e for e in gw.audit_events() if e.get("event") == "decision" and e["decision"] == "deny")
        assert deny["status"] == 403 and deny["principal"]["tenant"] == "other"
        assert deny["request_id"] == r2.headers["X-Egress-Request-Id"]  # what the agent saw, on record
        assert "sekrit-value" not in gw.audit_text()
        # the file sink receives the same lines, in order, and they verify as one chain
        n_spool = len(gw.audit_events())
        assert wait_until(lambda: out.exists() and out.read_text().count("\n") >= n_spool)
        spooled = gw.audit_text().splitlines()
        assert out.read_text().splitlines()[:n_spool] == spooled[:n_spool]
        n, brk = verify_chain(sink_files(out))
        assert brk is None and n >= n_spool
        m = gw.admin("GET", "/metrics")[1]
        assert 'egress_audit_sink_delivered_events_total{sink="archive",type="file"}' in m
        assert 'egress_upstream_responses_total{class="2xx"} 1.0' in m
        assert "egress_request_duration_seconds_count 1.0" in m
        assert 'egress_request_body_bytes_total{direction="sent",tenant="acme"} 1000.0' in m
    finally:
        gw.stop()
        ups.stop()
    n, brk = verify_chain(audit_files(gw.state_dir))
    assert brk is None and n > 0


def test_query_strings_can_be_dropped_or_kept(tmp_path, policies):
    ups = start_upstreams(tmp_path / "up", tls=False)
    gw = start_gateway(tmp_path, policies, hosts={"upstream.test": "127.0.0.1"},
                       config={"audit": {"query_string": "drop"}})
    try:
        assert session(gw).get(f"http://upstream.test:{ups.http_port}/echo/q?k=v").status_code == 200
        d = next(e for e in gw.audit_events() if e.get("event") == "decision")
        assert "query" not in d["request"] and "k=v" not in gw.audit_text()
    finally:
        gw.stop()
        ups.stop()


def test_a_full_spool_refuses_traffic_until_the_sink_catches_up(tmp_path, policies):
    """on_full: deny (the default): with the only sink unreachable and the backlog
    over max_bytes, requests are refused with audit_unavailable; once the sink's
    receiver comes up, the backlog drains and traffic flows again."""
    from tests.support.siem import WebhookReceiver
    ups = start_upstreams(tmp_path / "up", tls=False)
    recv = WebhookReceiver(path="/ingest")
    recv.down()  # the receiver is down: connections to its port are refused
    port = recv.port
    gw = start_gateway(tmp_path, policies, hosts={"upstream.test": "127.0.0.1"}, config={
        "audit": {"segment_bytes": "4KiB", "max_bytes": "8KiB", "sinks": [
            {"name": "hook", "type": "webhook", "url": f"http://127.0.0.1:{port}/ingest",
             "batch_wait": 0.05, "backoff_initial": 0.05, "backoff_max": 0.2}]}})
    try:
        s = session(gw)
        url = f"http://upstream.test:{ups.http_port}/echo/fill"
        refused = None
        for _ in range(400):
            r = s.get(url)
            if r.status_code != 200:
                refused = r
                break
            time.sleep(0.005)  # the keeper checks the bound twice a second
        assert refused is not None, "the spool never filled"
        assert refused.status_code == 503
        body = refused.json()
        assert body["code"] == "audit_unavailable" and "audit spool is full" in body["reason"]
        assert "egress_audit_spool_full 1.0" in gw.admin("GET", "/metrics")[1]
        # the shipper process reports its sinks' state once a second
        assert wait_until(lambda: 'egress_audit_sink_up{sink="hook",type="webhook"} 0.0'
                          in gw.admin("GET", "/metrics")[1], timeout=10)
        recv.up()
        assert wait_until(lambda: s.get(url).status_code == 200, timeout=30)
        ids = [e["id"] for e in recv.events]
        spooled = [e["id"] for e in gw.audit_events()]
        # everything written before the receiver came back was delivered, in spool order
        assert ids and ids == spooled[spooled.index(ids[0]):][:len(ids)]
        assert body["request_id"] in {e.get("request_id") for e in recv.events}
    finally:
        gw.stop()
        ups.stop()
        recv.close()
