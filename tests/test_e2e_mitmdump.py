"""The same addon inside stock mitmdump (``mitmdump -s gateway/mitmdump_entry.py``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import requests

from gateway import tokens
from tests.support.gateway import ADMIN_TOKEN
from tests.support.procs import REPO_ROOT, ManagedProcess, free_port, start_upstreams, wait_for_port

POLICY = """\
apiVersion: egress/v1
kind: Policy
name: acme
selector: principal.tenant == "acme"
rules:
  - name: no-post
    action: deny
    when: request.method == "POST"
  - name: read
    action: allow
    when: request.host == "upstream.test"
    allow_internal: ["127.0.0.0/8"]
"""


def mitmdump() -> str:
    p = Path(sys.executable).parent / "mitmdump"
    if not p.exists():
        pytest.skip(f"mitmdump is not installed next to {sys.executable}")
    return str(p)


def test_addon_under_stock_mitmdump(tmp_path):
    ups = start_upstreams(tmp_path / "up")
    pol = tmp_path / "pol"
    pol.mkdir()
    (pol / "p.yaml").write_text(POLICY)
    state = tmp_path / "state"
    port, admin = free_port(), free_port()
    env = dict(os.environ, EGRESS_ADMIN_TOKEN=ADMIN_TOKEN)
    proc = ManagedProcess([mitmdump(), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port),
                           "-s", str(REPO_ROOT / "gateway" / "mitmdump_entry.py"),
                           "--set", f"egress_policies={pol}", "--set", f"egress_state_dir={state}",
                           "--set", f"egress_admin=127.0.0.1:{admin}",
                           "--set", "egress_hosts=upstream.test=127.0.0.1",
                           "--set", f"egress_upstream_ca={ups.ca.cert}"],
                          tmp_path, name="mitmdump", cwd=REPO_ROOT, env=env)
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        wait_for_port("127.0.0.1", admin, timeout=30)
        key = tokens.load_signing_key(state / "identity" / "signing-key.pem")
        tok = tokens.mint(key, tenant="acme", agent="a1")
        s = requests.Session()
        s.trust_env = False
        s.proxies = {"http": f"http://x:{tok}@127.0.0.1:{port}", "https": f"http://x:{tok}@127.0.0.1:{port}"}
        deadline = time.monotonic() + 10
        while not (state / "ca" / "mitmproxy-ca-cert.pem").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        s.verify = str(state / "ca" / "mitmproxy-ca-cert.pem")
        r = s.get(f"http://upstream.test:{ups.http_port}/echo/md")
        assert r.status_code == 200, r.text
        assert "proxy-authorization" not in [k.lower() for k, _ in r.json()["headers"]]
        r = s.get(f"https://upstream.test:{ups.https_port}/echo/md-tls")
        assert r.status_code == 200, r.text
        r = s.post(f"http://upstream.test:{ups.http_port}/echo/md-post")
        assert r.status_code == 403 and r.json()["rule"] == "acme/no-post"
        s.proxies = {"http": f"http://127.0.0.1:{port}"}
        assert s.get(f"http://upstream.test:{ups.http_port}/echo/md-anon").status_code == 407
        assert "/echo/md-post" not in ups.stats()["paths"]
        from tests.support.gateway import audit_text
        assert audit_text(state).count('"event":"decision"') >= 4
    finally:
        proc.stop()
        ups.stop()


def test_mitmdump_refuses_to_save_flows_with_the_addon(tmp_path):
    port = free_port()
    proc = ManagedProcess([mitmdump(), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port),
                           "-s", str(REPO_ROOT / "gateway" / "mitmdump_entry.py"),
                           "--set", f"egress_state_dir={tmp_path / 'state'}", "--set", "egress_admin=off",
                           "-w", str(tmp_path / "flows")], tmp_path, name="mitmdump-w", cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is not None, "mitmdump kept running with flow saving and the egress addon"
        assert "saving flows" in proc.log_text()
    finally:
        proc.stop()
