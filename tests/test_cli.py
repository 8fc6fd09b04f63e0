"""The ``egress`` command line: help that teaches, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "policies" / "default"


def egress(*args, stdin: str | None = None, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "gateway.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=timeout, cwd=REPO)


def test_help_lists_subcommands_and_examples():
    r = egress("--help")
    assert r.returncode == 0
    for word in ("gateway", "token", "policy", "binding", "examples:"):
        assert word in r.stdout
    r = egress("token", "mint", "--help")
    assert r.returncode == 0 and "HTTPS_PROXY=http://x:$TOKEN@" in r.stdout


def test_policy_check_default_bundle_ok():
    r = egress("policy", "check", DEFAULT, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["version"].startswith("sha256:") and out["rules"] >= 5


def test_policy_check_reports_position(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "apiVersion: egress/v1\nkind: Policy\nname: p\nselector: 'true'\nrules:\n"
        "  - action: allow\n    when: request.host == \n")
    r = egress("policy", "check", tmp_path)
    assert r.returncode == 1
    assert f"{tmp_path / 'p.yaml'}:7:" in r.stderr or "p.yaml:7:" in r.stderr
    assert "egress: error:" in r.stderr


def test_policy_check_missing_dir_is_usage_error(tmp_path):
    r = egress("policy", "check", tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "is not a directory" in r.stderr


@pytest.mark.parametrize("method,url,extra,code,expect", [
    ("GET", "http://demo.localhost:8000/", [], 0, "allowed"),
    ("GET", "http://demo.localhost:8000/admin/x", [], 1, "policy_deny"),
    ("GET", "http://169.254.169.254/latest/meta-data/", [], 1, "ssrf_blocked"),
    ("GET", "http://0x7f000001:8000/", [], 1, "ssrf_blocked"),
    ("TRACE", "http://demo.localhost:8000/", [], 1, "policy_deny"),
    ("GET", "https://example.com/", ["--address", "10.0.0.5"], 1, "ssrf_blocked"),
    ("GET", "https://example.com/", ["--address", "93.184.216.34"], 0, "allowed"),
])
def test_policy_decide_default_bundle(method, url, extra, code, expect):
    r = egress("policy", "decide", "--tenant", "demo", "--agent", "a1", method, url, *extra)
    assert r.returncode == code, r.stdout + r.stderr
    assert json.loads(r.stdout)["code"] == expect


def test_policy_decide_bad_address():
    r = egress("policy", "decide", "--tenant", "demo", "--agent", "a1", "--address", "nope", "GET", "http://x/")
    assert r.returncode == 2 and "--address" in r.stderr


def test_token_mint_and_inspect(tmp_path):
    r = egress("token", "mint", "--tenant", "demo", "--agent", "a1", "--label", "team=red", "--ttl", "2h",
               "--state-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    tok = r.stdout.strip()
    assert tok.startswith("egt1.")
    key = tmp_path / "identity" / "signing-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    r = egress("token", "inspect", "--state-dir", tmp_path, stdin=tok + "\n")
    assert r.returncode == 0, r.stderr
    claims = json.loads(r.stdout)
    assert claims["tenant"] == "demo" and claims["labels"] == {"team": "red"}
    assert 7100 < claims["expires_at"] - claims["issued_at"] <= 7200
    other = tmp_path / "other"
    r = egress("token", "inspect", "--state-dir", other, stdin=tok)
    assert r.returncode == 1 and "unknown_key" in r.stderr and tok not in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--tenant", "bad tenant", "--agent", "a"], "tenant"),
    (["--tenant", "t", "--agent", "a", "--ttl", "40d"], "ttl"),
    (["--tenant", "t", "--agent", "a", "--ttl", "soon"], "invalid duration"),
])
def test_token_mint_errors(tmp_path, args, msg):
    r = egress("token", "mint", *args, "--state-dir", tmp_path)
    assert r.returncode == 2
    assert msg in r.stderr.lower()


def test_gateway_run_config_errors(tmp_path):
    r = egress("gateway", "run", "--listen", "nope", "--state-dir", tmp_path)
    assert r.returncode == 2 and "listen" in r.stderr and "HOST:PORT" in r.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listn: 1.2.3.4:5\n")
    r = egress("gateway", "run", "--config", cfg, "--state-dir", tmp_path)
    assert r.returncode == 2 and "unknown setting(s) listn" in r.stderr
    # audit sinks are checked before anything listens: a clear error, no traceback
    cfg.write_text('audit:\n  sinks:\n    - {name: s, type: relp, addres: "127.0.0.1:1"}\n')
    r = egress("gateway", "run", "--config", cfg, "--state-dir", tmp_path, "--no-admin")
    assert r.returncode == 2 and "audit.sinks.s: unknown option(s) addres" in r.stderr
    assert "Traceback" not in r.stderr
    cfg.write_text('audit:\n  sinks:\n    - {name: s, type: webhook, url: "http://127.0.0.1:1/x", '
                   'token: "env:EGRESS_TEST_UNSET_TOKEN"}\n')
    r = egress("gateway", "run", "--config", cfg, "--state-dir", tmp_path, "--no-admin")
    assert r.returncode == 2 and "cannot resolve env:EGRESS_TEST_UNSET_TOKEN" in r.stderr
    cfg.write_text('audit:\n  on_full: panic\n')
    r = egress("gateway", "run", "--config", cfg, "--state-dir", tmp_path, "--no-admin")
    assert r.returncode == 2 and "audit.on_full" in r.stderr


def test_admin_commands_without_gateway(tmp_path):
    r = egress("token", "revoke", "abcdefgh12345678", "--admin-url", "http://127.0.0.1:9", "--state-dir", tmp_path)
    assert r.returncode == 3 and "cannot reach the admin API" in r.stderr


@pytest.mark.parametrize("which", ["proxy", "admin"])
def test_gateway_run_port_in_use_exits_with_clear_error(tmp_path, which):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    other = free.getsockname()[1]
    free.close()
    try:
        listen, admin = (port, other) if which == "proxy" else (other, port)
        r = egress("gateway", "run", "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
                   "--state-dir", tmp_path, timeout=60)
    finally:
        busy.close()
    assert r.returncode == 1
    assert "address already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_secret_store_commands(tmp_path):
    r = egress("secret", "put", "github/token", "--state-dir", tmp_path, stdin="ghp_cli_value\n")
    assert r.returncode == 0, r.stderr
    assert "ghp_cli_value" not in r.stderr + r.stdout
    r = egress("secret", "ls", "--state-dir", tmp_path)
    assert r.returncode == 0 and r.stdout.split() == ["github/token"]
    r = egress("secret", "get", "github/token", "--state-dir", tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ghp_cli_value"
    r = egress("secret", "put", "Bad Name", "--state-dir", tmp_path, stdin="x\n")
    assert r.returncode == 2 and "secret names" in r.stderr
    assert egress("secret", "rm", "github/token", "--state-dir", tmp_path).returncode == 0
    r = egress("secret", "get", "github/token", "--state-dir", tmp_path)
    assert r.returncode == 1 and "no secret named github/token" in r.stderr


def test_secret_check_reports_missing_references_without_values(tmp_path):
    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "p.yaml").write_text(
        "apiVersion: egress/v1\nkind: Policy\nname: p\nselector: 'true'\nrules:\n"
        "  - name: gh\n    action: allow\n    when: request.host == 'api.github.com'\n"
        "    inject:\n      headers:\n        authorization: 'Bearer ${local:github/token}'\n"
        "      placeholders:\n        llm: local:llm/key\n")
    state = tmp_path / "state"
    assert egress("secret", "put", "github/token", "--state-dir", state, stdin="ghp_check_value\n").returncode == 0
    r = egress("secret", "check", pol, "--state-dir", state)
    assert r.returncode == 1
    assert "ok       local:github/token  (used by p/gh)" in r.stdout
    assert "MISSING  local:llm/key" in r.stdout and "no such secret" in r.stdout
    assert "ghp_check_value" not in r.stdout + r.stderr
    assert egress("secret", "put", "llm/key", "--state-dir", state, stdin="sk\n").returncode == 0
    assert egress("secret", "check", pol, "--state-dir", state).returncode == 0


def test_audit_export_formats(tmp_path):
    from tests.test_audit_formats import EVENT
    f = tmp_path / "audit.jsonl"
    f.write_text(json.dumps(EVENT) + "\n" + json.dumps({"event": "policy_reload", "ts": EVENT["ts"]}) + "\n")
    r = egress("audit", "export", "--format", "ocsf", f)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert lines[0]["class_uid"] == 4002 and lines[1]["event"] == "policy_reload"
    _spool(tmp_path, [dict(EVENT)])
    r = egress("audit", "export", "--format", "ecs", "--state-dir", tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[0])["ecs"]["version"]
    f.write_text("not json\n")
    r = egress("audit", "export", f)
    assert r.returncode == 1 and "not a JSON event" in r.stderr


def _spool(state, evs):
    from gateway.audit.spool import Spool
    sp = Spool(state / "audit", keeper=False)
    for e in evs:
        sp.write(e)
    sp.close()
    from gateway.audit.spool import segment_files
    return segment_files(state / "audit")


def test_audit_verify_command(tmp_path):
    files = _spool(tmp_path, [{"event": "decision", "i": i} for i in range(3)])
    r = egress("audit", "verify", "--state-dir", tmp_path)
    assert r.returncode == 0 and "3 event(s) in 1 file(s), hash chain intact" in r.stdout
    p = files[0]
    p.write_text(p.read_text().replace('"i":0', '"i":9'))
    r = egress("audit", "verify", p)
    assert r.returncode == 1 and "BROKEN after 1 good event(s)" in r.stdout and ":2:" in r.stdout
    r = egress("audit", "verify", "--state-dir", tmp_path / "nowhere")
    assert r.returncode == 1 and "no audit spool segments" in r.stderr


def _decision(tenant, agent, decision, ts):
    return {"event": "decision", "decision": decision, "ts": ts, "request_id": f"{tenant}-{agent}-{ts}",
            "principal": {"tenant": tenant, "agent": agent}, "request": {"host": "h.test"}}


def test_audit_query_tail_and_status(tmp_path):
    _spool(tmp_path, [_decision("acme", "a1", "allow", "2026-12-01T10:00:00.000000Z"),
                      _decision("acme", "a2", "deny", "2026-12-01T11:00:00.000000Z"),
                      _decision("beta", "a1", "deny", "2026-12-01T12:00:00.000000Z"),
                      {"event": "policy_reload", "ts": "2026-12-01T12:30:00.000000Z"}])
    r = egress("audit", "query", "--state-dir", tmp_path, "--tenant", "acme", "--decision", "deny")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["principal"]["agent"] for x in r.stdout.splitlines()] == ["a2"]
    r = egress("audit", "query", "--state-dir", tmp_path, "--since", "2026-12-01T10:30:00Z",
               "--until", "2026-12-01T12:10:00Z")
    assert [json.loads(x)["principal"]["tenant"] for x in r.stdout.splitlines()] == ["acme", "beta"]
    r = egress("audit", "query", "--state-dir", tmp_path, "--agent", "a1", "--format", "ocsf")
    assert [json.loads(x)["class_uid"] for x in r.stdout.splitlines()] == [4002, 4002]
    r = egress("audit", "query", "--state-dir", tmp_path, "--count")
    assert r.returncode == 0 and "1 matching" not in r.stderr and "4 matching event(s)" in r.stderr
    assert "deny" in r.stdout and "beta" in r.stdout
    r = egress("audit", "query", "--state-dir", tmp_path, "--since", "yesterday-ish")
    assert r.returncode != 0 and "not a time" in r.stderr
    r = egress("audit", "tail", "-n", "2", "--state-dir", tmp_path)
    assert [json.loads(x)["event"] for x in r.stdout.splitlines()] == ["decision", "policy_reload"]
    assert [json.loads(x)["seq"] for x in r.stdout.splitlines()] == [3, 4]
    # completion events carry no principal: they match through their decision's request_id
    _spool(tmp_path / "j", [_decision("acme", "a1", "allow", "2026-12-01T10:00:00.000000Z"),
                            _decision("beta", "a1", "allow", "2026-12-01T10:00:00.100000Z"),
                            {"event": "request_completed", "request_id": "acme-a1-2026-12-01T10:00:00.000000Z",
                             "status": 200, "ts": "2026-12-01T10:00:01.000000Z"},
                            {"event": "request_completed", "request_id": "beta-a1-2026-12-01T10:00:00.100000Z",
                             "status": 500, "ts": "2026-12-01T10:00:01.000000Z"}])
    r = egress("audit", "query", "--state-dir", tmp_path / "j", "--tenant", "acme")
    assert [(json.loads(x)["event"], json.loads(x).get("status")) for x in r.stdout.splitlines()] == [
        ("decision", None), ("request_completed", 200)]
    r = egress("audit", "query", "--state-dir", tmp_path / "j", "--tenant", "beta", "--event", "request_completed")
    assert [json.loads(x)["status"] for x in r.stdout.splitlines()] == [500]
    r = egress("audit", "status", "--state-dir", tmp_path)
    assert r.returncode == 0 and "1 segment(s)" in r.stdout and "no sinks" in r.stdout
