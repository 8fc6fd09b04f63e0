"""OCSF and ECS renderings of decision events."""

from __future__ import annotations

import pytest

from gateway.audit.formats import convert, to_ecs, to_ocsf

EVENT = {
    "ts": "2026-11-24T01:02:03.456789Z", "event": "decision", "request_id": "req-1", "decision": "deny",
    "code": "policy_deny", "rule": "acme/no-delete", "reason": "No deletes.", "policy_version": "sha256:abc",
    "source": "10.0.0.2",
    "request": {"method": "DELETE", "scheme": "https", "host": "api.example.com", "port": 443, "path": "/x",
                "sni": "api.example.com", "mode": "explicit"},
    "destination": {"ips": ["93.184.216.34"], "classes": ["public"], "via": "dns"},
    "principal": {"tenant": "acme", "agent": "a1", "session": "s1", "labels": {"team": "red"},
                  "token_id": "tok1", "via": "token"},
    "secrets": ["vault:secret/acme/github#token"],
}


def test_ocsf_http_activity():
    o = to_ocsf(EVENT)
    assert (o["class_uid"], o["category_uid"], o["activity_id"], o["type_uid"]) == (4002, 4, 2, 400202)
    assert o["time"] == 1795482123456
    assert o["action_id"] == 2 and o["disposition_id"] == 2 and o["status_id"] == 2
    assert o["http_request"]["url"] == {"hostname": "api.example.com", "path": "/x", "port": 443, "scheme": "https"}
    assert o["dst_endpoint"]["ip"] == "93.184.216.34" and o["src_endpoint"]["ip"] == "10.0.0.2"
    assert o["actor"]["user"] == {"name": "a1", "uid": "tok1", "org": {"name": "acme"}}
    assert o["firewall_rule"]["name"] == "acme/no-delete" and o["metadata"]["uid"] == "req-1"
    assert o["unmapped"]["secrets"] == ["vault:secret/acme/github#token"]


@pytest.mark.parametrize("method,activity", [("GET", 3), ("PATCH", 99), ("CONNECT", 1), ("", 0)])
def test_ocsf_activity_by_method(method, activity):
    ev = dict(EVENT, request=dict(EVENT["request"], method=method))
    assert to_ocsf(ev)["activity_id"] == activity


def test_ecs():
    e = to_ecs(dict(EVENT, decision="allow", code="allowed", dial="93.184.216.34"))
    assert e["@timestamp"] == EVENT["ts"] and e["event"]["outcome"] == "success"
    assert "allowed" in e["event"]["type"] and e["http"]["request"]["method"] == "DELETE"
    assert e["user"] == {"name": "a1", "id": "tok1"} and e["organization"]["name"] == "acme"
    assert e["labels"] == {"team": "red", "session": "s1"}
    assert e["destination"]["ip"] == "93.184.216.34"


def test_convert_passes_other_events_and_rejects_unknown_formats():
    other = {"event": "policy_reload", "ts": EVENT["ts"]}
    assert convert(other, "ocsf") is other
    assert convert(EVENT, "json") is EVENT
    with pytest.raises(ValueError):
        convert(EVENT, "cef")
