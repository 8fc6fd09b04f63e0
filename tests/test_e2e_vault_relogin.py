"""End to end: the gateway authenticates to Vault with AppRole; when its Vault
token expires, it logs in again and keeps injecting current values."""

from __future__ import annotations

import uuid

import hvac
import pytest
import requests

from tests.support.gateway import start_gateway
from tests.support.procs import start_upstreams
from tests.conftest import register_secret
from tests.support.vault import start_vault, vault_from_env

PATH = f"egress-relogin/{uuid.uuid4().hex[:8]}"
V1 = register_secret("relogin-1-" + uuid.uuid4().hex)
V2 = register_secret("relogin-2-" + uuid.uuid4().hex)

POLICY = f"""\
apiVersion: egress/v1
kind: Policy
name: acme
selector: principal.tenant == "acme"
rules:
  - name: api
    action: allow
    when: request.host == "api.upstream.test"
    allow_internal: ["127.0.0.0/8"]
    inject:
      headers:
        x-api-key: "${{vault:secret/{PATH}#key}}"
"""


def test_token_expiry_and_relogin(tmp_path):
    if vault_from_env() is not None:
        pytest.skip("expiring the gateway's Vault token needs the in-repo Vault's fake clock")
    ups = start_upstreams(tmp_path / "up")
    vp = start_vault(tmp_path / "vault")
    gw = None
    try:
        root = hvac.Client(url=vp.addr, token=vp.root_token, timeout=10)
        root.secrets.kv.v2.create_or_update_secret(path=PATH, secret={"key": V1}, mount_point="secret")
        root.sys.enable_auth_method(method_type="approle", path="approle")
        root.sys.create_or_update_acl_policy(name="gw", policy=f'path "secret/data/{PATH}" {{ capabilities = ["read"] }}')
        root.auth.approle.create_or_update_approle(role_name="gw", token_policies=["gw"], token_ttl="10m",
                                                   token_max_ttl="10m")
        role_id = root.auth.approle.read_role_id(role_name="gw")["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id(role_name="gw")["data"]["secret_id"]
        pol = tmp_path / "pol"
        pol.mkdir()
        (pol / "p.yaml").write_text(POLICY)
        gw = start_gateway(tmp_path, pol, hosts={"api.upstream.test": "127.0.0.1"}, upstream_ca=[ups.ca.cert],
                           config={"vault": {"addr": vp.addr, "auth": "approle", "role_id": role_id,
                                             "secret_id": secret_id, "kv_ttl": 0, "timeout": 2.0}})
        s = requests.Session()
        s.trust_env = False
        s.proxies = gw.proxies(gw.mint("acme", "a1"))
        s.verify = str(gw.ca_cert)

        def key_seen(path):
            assert s.get(f"https://api.upstream.test:{ups.https_port}{path}").status_code == 200
            headers = next(e for e in reversed(ups.seen()) if e["path"] == path)["headers"]
            return {k.lower(): v for k, v in headers}["x-api-key"]

        assert key_seen("/echo/1") == V1
        vp.advance_clock(3600)  # the gateway's Vault token (10 min) has expired
        root = hvac.Client(url=vp.addr, token=vp.root_token, timeout=10)
        root.secrets.kv.v2.create_or_update_secret(path=PATH, secret={"key": V2}, mount_point="secret")
        # Fetched again with a new login. Without it the 403 would leave only the
        # stale value-1 (served for up to 60 s after a failed refresh).
        assert key_seen("/echo/2") == V2
        assert V1 not in gw.audit_text()
    finally:
        if gw is not None:
            gw.stop()
        vp.stop()
        ups.stop()
