"""Metrics (cardinality guard, histogram) and the audit file's write behaviour."""

from __future__ import annotations

import asyncio
import json

import pytest
import os

from gateway import metrics as metrics_mod
from gateway.audit import AuditLog, now_iso
from gateway.metrics import Metrics


def test_requests_counter_and_tenant_cardinality_guard(monkeypatch):
    monkeypatch.setattr(metrics_mod, "MAX_TENANT_LABELS", 3)
    m = Metrics()
    for t in ["a", "b", "c", "d", "e", "a"]:
        m.count(t, "allow", "allowed")
    m.count(None, "deny", "identity_required")
    assert m.requests_count("a", "allow", "allowed") == 2
    assert m.requests_count("_other", "allow", "allowed") == 2  # d and e
    assert m.requests_count("_unknown", "deny", "identity_required") == 1
    text = m.render().decode()
    assert 'egress_requests_total{code="allowed",decision="allow",tenant="_other"} 2.0' in text
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


def test_audit_lines_reach_the_file_by_the_end_of_the_loop_iteration(tmp_path):
    path = tmp_path / "a.jsonl"
    log = AuditLog(path)

    async def main():
        log.write_line('{"n":1}')
        log.write_line('{"n":2}')
        buffered = path.read_text()
        await asyncio.sleep(0)  # one loop iteration
        return buffered, path.read_text()

    buffered, flushed = asyncio.run(main())
    assert buffered == ""  # batched, not one write(2) per line
    assert [json.loads(x)["n"] for x in flushed.splitlines()] == [1, 2]
    log.write_line('{"n":3}', flush=True)
    assert path.read_text().count("\n") == 3
    assert os.stat(path).st_mode & 0o777 == 0o640
    log.close()


def test_audit_without_loop_flushes_at_once(tmp_path):
    path = tmp_path / "b.jsonl"
    log = AuditLog(path)
    assert log.write({"event": "x"})
    ev = json.loads(path.read_text())
    assert ev["event"] == "x" and ev["ts"].endswith("Z")
    log.close()


def test_audit_write_failure_is_counted(tmp_path):
    m = Metrics()
    log = AuditLog(tmp_path / "c.jsonl")
    log.on_failure = m.audit_failures.inc
    os.close(log._file.fileno())  # the disk goes away
    assert log.write({"event": "x"}) is False
    assert log.failures == 1
    assert "egress_audit_write_failures_total 1.0" in m.render().decode()


def test_now_iso_format():
    t = now_iso()
    assert len(t) == 27 and t[10] == "T" and t.endswith("Z")


def _chained(tmp_path, n=5):
    from gateway.audit import AuditLog
    path = tmp_path / "chain.jsonl"
    log = AuditLog(path)
    for i in range(n):
        log.write({"event": "decision", "i": i})
    log.close()
    return path


def test_hash_chain_verifies_and_continues_after_restart(tmp_path):
    from gateway.audit import AuditLog, verify_chain
    path = _chained(tmp_path, 3)
    log = AuditLog(path)  # a restarted gateway continues the chain
    log.write({"event": "decision", "i": 3})
    log.close()
    n, brk = verify_chain([path])
    assert brk is None and n == 4
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.parametrize("tamper,needle", [
    ("edit", "changed, removed or moved"),
    ("delete", "changed, removed or moved"),
    ("reorder", "changed, removed or moved"),
])
def test_hash_chain_detects_tampering(tmp_path, tamper, needle):
    from gateway.audit import verify_chain
    path = _chained(tmp_path, 5)
    lines = path.read_text().splitlines()
    if tamper == "edit":
        lines[1] = lines[1].replace('"i":1', '"i":7')
    elif tamper == "delete":
        del lines[2]
    else:
        lines[1], lines[2] = lines[2], lines[1]
    path.write_text("\n".join(lines) + "\n")
    n, brk = verify_chain([path])
    assert brk is not None and needle in brk.reason and brk.line in (2, 3)
