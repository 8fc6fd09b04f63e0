"""Metrics (cardinality guard, histogram) and the audit file's write behaviour."""

from __future__ import annotations

import asyncio
import json

import pytest
import os

from gateway import metrics as metrics_mod
from gateway.audit import now_iso
from gateway.metrics import Metrics


def test_requests_counter_and_tenant_cardinality_guard(monkeypatch):
    monkeypatch.setattr(metrics_mod, "MAX_TENANT_LABELS", 3)
    m = Metrics()
    for t in ["a", "b", "c", "d", "e", "a"]:
        m.count(t, "allow", "allowed", "bot", "r1")
    m.count(None, "deny", "identity_required")
    assert m.requests_count("a", "allow", "allowed") == 2
    assert m.requests_count("_other", "allow", "allowed") == 2  # d and e
    assert m.requests_count("_unknown", "deny", "identity_required") == 1
    text = m.render().decode()
    assert ('egress_requests_total{agent="bot",code="allowed",decision="allow",rule="r1",tenant="_other"} 2.0'
            in text)
    assert 'tenant="d"' not in text


def test_decision_histogram_is_cumulative_with_le_semantics():
    m = Metrics()
    for s in (5e-6, 6e-6, 1e-3, 2.0):
        m.observe_decision(s)
    text = m.render().decode()
    assert 'egress_decision_duration_seconds_bucket{le="5e-06"} 1.0' in text  # 5e-6 <= 5e-6
    assert 'egress_decision_duration_seconds_bucket{le="1e-05"} 2.0' in text
    assert 'egress_decision_duration_seconds_bucket{le="0.001"} 3.0' in text
    assert 'egress_decision_duration_seconds_bucket{le="+Inf"} 4.0' in text
    assert "egress_decision_duration_seconds_count 4.0" in text


def test_policy_info_keeps_only_the_current_version():
    m = Metrics()
    m.set_policy("sha256:aaa", 3)
    m.set_policy("sha256:bbb", 5)
    text = m.render().decode()
    assert 'egress_policy_info{version="sha256:bbb"} 1.0' in text and "sha256:aaa" not in text
    assert "egress_policy_rules 5.0" in text


def test_now_iso_format():
    t = now_iso()
    assert len(t) == 27 and t[10] == "T" and t.endswith("Z")


