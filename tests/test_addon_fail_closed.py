"""The addon fails closed when its own machinery breaks: an exception anywhere
on the decision path, even while recording the deny, ends in a refusal, and a
request that was never decided is refused before it is forwarded."""

from __future__ import annotations

import base64
import json

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from gateway.addon import EgressGateway
from gateway.config import load_config
from gateway.runtime import Gateway

POLICY = """\
apiVersion: egress/v1
kind: Policy
name: p
selector: "true"
rules:
  - name: up
    action: allow
    when: request.host == "upstream.test"
    allow_internal: ["127.0.0.0/8"]
"""


@pytest.fixture()
def addon(tmp_path):
    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "p.yaml").write_text(POLICY)
    cfg = load_config(None, policies=str(pol), state_dir=str(tmp_path / "state"), admin="",
                      extra_hosts={"upstream.test": ("127.0.0.1",)})
    gw = Gateway(cfg)
    gw.load_policies()
    return EgressGateway(gw)


def flow_for(addon, url="http://upstream.test/x"):
    tok = addon.gw.identity.mint(tenant="acme", agent="a")
    f = tflow.tflow()
    f.request = http.Request.make("GET", url, headers={
        "Host": url.split("/")[2], "Proxy-Authorization": "Basic " + base64.b64encode(f"x:{tok}".encode()).decode()})
    return f


def test_allowed_request_is_pinned(addon):
    f = flow_for(addon)
    assert addon.requestheaders(f) is None
    assert f.response is None and f.request.host == "127.0.0.1" and f.metadata["egress_host"] == "upstream.test"
    addon.request(f)
    assert f.response is None  # decided and allowed: the backstop lets it through


def test_error_in_decision_denies_with_an_audit_event(addon, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("engine bug")
    monkeypatch.setattr(addon.gw, "decide", boom)
    f = flow_for(addon)
    addon.requestheaders(f)
    assert f.response.status_code == 500 and json.loads(f.response.content)["code"] == "internal_error"
    from tests.support.gateway import audit_text
    events = [json.loads(x) for x in audit_text(addon.gw.config.state_dir).splitlines()]
    assert events[-1]["code"] == "internal_error" and events[-1]["decision"] == "deny"


def test_error_while_recording_the_deny_still_denies(addon, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("audit and decision both broken")
    monkeypatch.setattr(addon.gw, "decide", boom)
    monkeypatch.setattr(addon.gw, "record", boom)
    f = flow_for(addon)
    addon.requestheaders(f)
    assert f.response is not None and f.response.status_code == 500
    assert f.response.headers["X-Egress-Decision"] == "deny"


def test_undecided_request_is_refused_at_the_backstop(addon):
    f = flow_for(addon)  # requestheaders never ran (or failed without leaving a response)
    addon.request(f)
    assert f.response is not None and json.loads(f.response.content)["code"] == "internal_error"


def test_allowed_request_is_refused_when_its_decision_cannot_be_written(addon):
    import os
    sp = addon.gw.audit
    real = sp._fd
    sp._fd = os.open("/dev/full", os.O_WRONLY)  # the disk is full: the decision event cannot be written
    try:
        f = flow_for(addon)
        addon.requestheaders(f)
        assert f.response is not None and f.response.status_code == 503
        body = json.loads(f.response.content)
        assert body["code"] == "audit_unavailable" and "cannot be written" in body["reason"]
        assert "egress_host" not in f.metadata  # not pinned, never forwarded
        f2 = flow_for(addon)  # and the next one is refused before it is even decided
        addon.requestheaders(f2)
        assert json.loads(f2.response.content)["code"] == "audit_unavailable"
    finally:
        os.close(sp._fd)
        sp._fd = real
    sp.maintain()  # the keeper (twice a second) retries: the kept events are written
    assert sp.accepting
    f3 = flow_for(addon)  # traffic flows again
    addon.requestheaders(f3)
    assert f3.response is None and f3.metadata["egress_host"] == "upstream.test"


def test_denied_request_keeps_its_deny(addon):
    f = flow_for(addon, "http://127.0.0.9/x")  # a literal: decided without DNS
    addon.requestheaders(f)
    assert f.response.status_code == 403
    status = f.response.status_code
    addon.request(f)
    assert f.response.status_code == status
