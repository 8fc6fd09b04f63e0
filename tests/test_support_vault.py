"""Tests for the in-repo Vault (tests/support/vault.py), driven with the real hvac client.

By default they run against ``python -m tests.support.vault``. With ``VAULT_ADDR``
and ``VAULT_TOKEN`` set (a root-capable token, e.g. ``vault server -dev``) the
hvac-level tests run unchanged against that real Vault instead; tests that need
the in-repo Vault's test-control endpoints (fake clock, seal switch, lease
inspection, SIGSTOP) are skipped there. See docs/vault-testing.md.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid

import hvac
import hvac.exceptions as hx
import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from tests.support.vault import (
    VaultTarget,
    capabilities_for,
    parse_duration,
    parse_policy,
    start_vault,
    vault_from_env,
)

CONTROL_ONLY = "needs the in-repo Vault's test-control endpoints (/v1/_test/*); not available against a real Vault"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    real = vault_from_env()
    if real is not None:
        yield real
        return
    vp = start_vault(tmp_path_factory.mktemp("vault"))
    try:
        yield vp.target
    finally:
        rc = vp.stop()
        assert rc == 0, vp.proc.log_text()


@pytest.fixture
def fake(target: VaultTarget):
    """The VaultProc of the in-repo Vault; skips against a real Vault."""
    if target.real:
        pytest.skip(CONTROL_ONLY)
    return target.proc


@pytest.fixture
def client(target: VaultTarget) -> hvac.Client:
    return hvac.Client(url=target.addr, token=target.token, timeout=10)


def uid() -> str:
    return uuid.uuid4().hex[:10]


def as_client(target: VaultTarget, token: str, **kw) -> hvac.Client:
    return hvac.Client(url=target.addr, token=token, timeout=10, **kw)


def ensure_auth(client: hvac.Client, method_type: str, path: str) -> None:
    try:
        client.sys.enable_auth_method(method_type=method_type, path=path)
    except hx.InvalidRequest as e:
        if "path is already in use" not in str(e):
            raise


# --------------------------------------------------------------------------- health / basics


def test_health(client):
    h = client.sys.read_health_status(method="GET")
    assert h["initialized"] is True
    assert h["sealed"] is False
    assert h["standby"] is False
    assert isinstance(h["version"], str) and h["version"]
    assert "cluster_name" in h and "server_time_utc" in h
    assert client.is_authenticated()


def test_sealed_vault_answers_503(fake, client):
    fake.seal()
    try:
        resp = client.sys.read_health_status(method="GET")
        assert resp.status_code == 503
        assert resp.json()["sealed"] is True
        with pytest.raises(hx.VaultDown) as ei:
            client.secrets.kv.v2.read_secret_version(path="x", raise_on_deleted_version=True)
        assert ei.value.errors == ["Vault is sealed"]
    finally:
        fake.unseal()
    assert client.sys.read_health_status(method="GET")["sealed"] is False


def test_error_shapes(target, client):
    s = requests.Session()
    s.trust_env = False
    h = {"X-Vault-Token": target.token}
    r = s.get(f"{target.addr}/v1/secret/data/does-not-exist-{uid()}", headers=h, timeout=10)
    assert r.status_code == 404
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"errors": []}
    r = s.get(f"{target.addr}/v1/nonexistent-mount-{uid()}/foo", headers=h, timeout=10)
    assert r.status_code == 404 and r.json()["errors"]
    r = s.get(f"{target.addr}/v1/secret/data/x", timeout=10)  # no token
    assert r.status_code == 403 and r.json() == {"errors": ["permission denied"]}
    r = s.get(f"{target.addr}/v1/auth/token/lookup-self",
              headers={"Authorization": f"Bearer {target.token}"}, timeout=10)
    assert r.status_code == 200 and r.json()["data"]["id"] == target.token
    r = s.post(f"{target.addr}/v1/secret/data/x", data="{not json", headers=h, timeout=10)
    assert r.status_code == 400 and r.json()["errors"]
    r = s.request("LIST", f"{target.addr}/v1/secret/data/x", headers=h, timeout=10)
    assert r.status_code == 405 and r.json()["errors"]


# --------------------------------------------------------------------------- tokens


def test_token_create_lookup_renew_revoke(target, client):
    created = client.auth.token.create(policies=["reader"], ttl="1h", renewable=True)
    auth = created["auth"]
    for k in ("client_token", "accessor", "policies", "token_policies", "lease_duration", "renewable",
              "metadata", "entity_id", "token_type", "orphan"):
        assert k in auth, k
    assert auth["policies"] == ["default", "reader"]
    assert 3590 <= auth["lease_duration"] <= 3600
    assert auth["renewable"] is True

    c = as_client(target, auth["client_token"])
    data = c.auth.token.lookup_self()["data"]
    assert data["id"] == auth["client_token"]
    assert data["accessor"] == auth["accessor"]
    assert data["policies"] == ["default", "reader"]
    assert 3590 <= data["ttl"] <= 3600
    assert data["creation_ttl"] == 3600
    assert data["renewable"] is True

    renewed = c.auth.token.renew_self(increment="2h")
    assert 7190 <= renewed["auth"]["lease_duration"] <= 7200
    assert renewed["auth"]["client_token"] == auth["client_token"]

    c.auth.token.revoke_self()
    with pytest.raises(hx.Forbidden):
        c.auth.token.lookup_self()


def test_root_token_lookup(target, client):
    data = client.auth.token.lookup_self()["data"]
    assert "root" in data["policies"]
    assert data["ttl"] == 0 and data["expire_time"] is None


def test_token_num_uses(target, client):
    tok = client.auth.token.create(policies=["default"], num_uses=2)["auth"]["client_token"]
    c = as_client(target, tok)
    c.auth.token.lookup_self()
    c.auth.token.lookup_self()
    with pytest.raises(hx.Forbidden):
        c.auth.token.lookup_self()


def test_non_renewable_token(target, client):
    tok = client.auth.token.create(policies=["default"], ttl="10m", renewable=False)["auth"]["client_token"]
    with pytest.raises(hx.InvalidRequest):
        as_client(target, tok).auth.token.renew_self()


def test_invalid_token_is_forbidden(target):
    with pytest.raises(hx.Forbidden) as ei:
        as_client(target, "hvs.not-a-real-token").auth.token.lookup_self()
    assert any("permission denied" in e or "invalid token" in e for e in ei.value.errors)


def test_token_expires_with_fake_clock(fake, target, client):
    tok = client.auth.token.create(policies=["default"], ttl="60s")["auth"]["client_token"]
    c = as_client(target, tok)
    assert c.auth.token.lookup_self()["data"]["ttl"] <= 60
    fake.advance_clock(30)
    assert c.auth.token.lookup_self()["data"]["ttl"] <= 30
    fake.advance_clock(31)
    with pytest.raises(hx.Forbidden):
        c.auth.token.lookup_self()


# --------------------------------------------------------------------------- policies


def test_policy_grants_and_denies(target, client):
    base = f"acme-{uid()}"
    client.secrets.kv.v2.create_or_update_secret(path=f"{base}/db", secret={"pw": "s3cret"})
    client.secrets.kv.v2.create_or_update_secret(path=f"other-{uid()}/db", secret={"pw": "x"})
    policy = f"""
    # read-only on one subtree
    path "secret/data/{base}/*" {{
      capabilities = ["read"]
    }}
    path "secret/metadata/+/{base}-team/*" {{ capabilities = ["list"] }}
    """
    name = f"reader-{uid()}"
    client.sys.create_or_update_acl_policy(name=name, policy=policy)
    assert client.sys.read_acl_policy(name)["data"]["policy"] == policy

    tok = client.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"]
    c = as_client(target, tok)
    got = c.secrets.kv.v2.read_secret_version(path=f"{base}/db", raise_on_deleted_version=True)
    assert got["data"]["data"] == {"pw": "s3cret"}
    with pytest.raises(hx.Forbidden) as ei:
        c.secrets.kv.v2.create_or_update_secret(path=f"{base}/db", secret={"pw": "nope"})
    assert ei.value.errors == ["permission denied"]
    with pytest.raises(hx.Forbidden):
        c.secrets.kv.v2.read_secret_version(path=f"not-{base}/db", raise_on_deleted_version=True)
    with pytest.raises(hx.Forbidden):
        c.secrets.kv.v2.list_secrets(path=base)
    with pytest.raises(hx.Forbidden):
        c.auth.token.create(policies=["default"])


def test_policy_parser_and_priority():
    rules = parse_policy(
        'path "secret/data/*" { capabilities = ["read"] }\n'
        'path "secret/data/acme/*" { capabilities = ["read", "update"] }\n'
        'path "secret/data/+/private" { capabilities = ["deny"] }\n'
        'path "secret/data/exact" { policy = "write" }\n'
    )
    assert capabilities_for(rules, "secret/data/acme/x") == {"read", "update"}
    assert capabilities_for(rules, "secret/data/zzz") == {"read"}
    # Vault's priority rules: the later first wildcard wins, then "no trailing *" wins
    assert capabilities_for(rules, "secret/data/zzz/private") == {"deny"}
    assert capabilities_for(rules, "secret/data/acme/private") == {"read", "update"}
    assert "create" in capabilities_for(rules, "secret/data/exact")
    assert capabilities_for(rules, "secret/metadata/x") == set()
    assert parse_duration("1h30m") == 5400 and parse_duration(90) == 90 and parse_duration("45") == 45


# --------------------------------------------------------------------------- approle


def test_approle_login(target, client):
    ensure_auth(client, "approle", "approle")
    pol = f"approle-{uid()}"
    client.sys.create_or_update_acl_policy(name=pol, policy='path "secret/data/x" { capabilities = ["read"] }')
    role = f"agent-{uid()}"
    client.auth.approle.create_or_update_approle(role_name=role, token_policies=[pol], token_ttl="20m")
    role_id = client.auth.approle.read_role_id(role_name=role)["data"]["role_id"]
    sec = client.auth.approle.generate_secret_id(role_name=role)["data"]
    assert {"secret_id", "secret_id_accessor", "secret_id_ttl", "secret_id_num_uses"} <= set(sec)

    c = hvac.Client(url=target.addr, timeout=10)
    login = c.auth.approle.login(role_id=role_id, secret_id=sec["secret_id"])
    auth = login["auth"]
    assert auth["policies"] == sorted(["default", pol])
    assert auth["metadata"] == {"role_name": role}
    assert 1190 <= auth["lease_duration"] <= 1200
    assert c.token == auth["client_token"]
    assert c.auth.token.lookup_self()["data"]["policies"] == sorted(["default", pol])

    with pytest.raises(hx.InvalidRequest):
        hvac.Client(url=target.addr, timeout=10).auth.approle.login(role_id=role_id, secret_id=str(uuid.uuid4()))


# --------------------------------------------------------------------------- jwt


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def make_jwt(key, alg: str, claims: dict) -> str:
    head = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signed = f"{head}.{body}".encode()
    if alg == "RS256":
        sig = key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
    else:
        sig = key.sign(signed)
    return f"{head}.{body}.{_b64(sig)}"


@pytest.mark.parametrize("alg", ["RS256", "EdDSA"])
def test_jwt_login(target, client, alg):
    if alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    other = ed25519.Ed25519PrivateKey.generate() if alg == "EdDSA" else rsa.generate_private_key(65537, 2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    path = f"jwt-{uid()}"
    ensure_auth(client, "jwt", path)
    client.auth.jwt.configure(jwt_validation_pubkeys=[pem], path=path)
    client.auth.jwt.create_role(
        name="agent", role_type="jwt", user_claim="sub", bound_audiences=["egress-gateway"],
        allowed_redirect_uris=None, token_ttl="15m", token_policies=["jwt-reader"], path=path,
    )
    now = int(time.time())
    good = {"sub": "sandbox-42", "aud": "egress-gateway", "iat": now, "exp": now + 300}

    c = hvac.Client(url=target.addr, timeout=10)
    auth = c.auth.jwt.jwt_login(role="agent", jwt=make_jwt(key, alg, good), path=path)["auth"]
    assert auth["policies"] == ["default", "jwt-reader"]
    assert 890 <= auth["lease_duration"] <= 900
    assert c.auth.token.lookup_self()["data"]["id"] == auth["client_token"]

    bad_cases = [
        make_jwt(key, alg, good | {"aud": "someone-else"}),
        make_jwt(key, alg, good | {"exp": now - 3600}),
        make_jwt(other, alg, good),
        make_jwt(key, alg, good)[:-4] + "AAAA",
    ]
    for jwt in bad_cases:
        with pytest.raises(hx.InvalidRequest):
            hvac.Client(url=target.addr, timeout=10).auth.jwt.jwt_login(role="agent", jwt=jwt, path=path)


# --------------------------------------------------------------------------- kv v2


def test_kv2_versions_metadata_delete_undelete_destroy(client):
    kv = client.secrets.kv.v2
    base = f"kvt-{uid()}"
    path = f"{base}/api"
    w1 = kv.create_or_update_secret(path=path, secret={"token": "one"})["data"]
    assert w1["version"] == 1 and w1["destroyed"] is False and w1["deletion_time"] == ""
    assert w1["created_time"].endswith("Z")
    w2 = kv.create_or_update_secret(path=path, secret={"token": "two"}, cas=1)["data"]
    assert w2["version"] == 2

    latest = kv.read_secret_version(path=path, raise_on_deleted_version=True)
    assert latest["data"]["data"] == {"token": "two"}
    assert latest["data"]["metadata"]["version"] == 2
    assert latest["lease_id"] == "" and latest["lease_duration"] == 0 and latest["renewable"] is False
    assert kv.read_secret_version(path=path, version=1, raise_on_deleted_version=True)["data"]["data"] == {"token": "one"}

    meta = kv.read_secret_metadata(path=path)["data"]
    assert meta["current_version"] == 2
    assert set(meta["versions"]) == {"1", "2"}
    assert meta["versions"]["1"]["destroyed"] is False

    kv.create_or_update_secret(path=f"{base}/nested/deeper", secret={"a": "b"})
    assert kv.list_secrets(path=base)["data"]["keys"] == ["api", "nested/"]

    # soft-delete latest -> 404 with metadata, as Vault does
    kv.delete_latest_version_of_secret(path=path)
    with pytest.raises(hx.InvalidPath):
        kv.read_secret_version(path=path, raise_on_deleted_version=True)
    deleted = kv.read_secret_version(path=path, raise_on_deleted_version=False)
    assert deleted["data"]["data"] is None
    assert deleted["data"]["metadata"]["deletion_time"] != ""

    kv.undelete_secret_versions(path=path, versions=[2])
    assert kv.read_secret_version(path=path, raise_on_deleted_version=True)["data"]["data"] == {"token": "two"}

    kv.delete_secret_versions(path=path, versions=[1])
    assert kv.read_secret_metadata(path=path)["data"]["versions"]["1"]["deletion_time"] != ""

    kv.destroy_secret_versions(path=path, versions=[2])
    assert kv.read_secret_metadata(path=path)["data"]["versions"]["2"]["destroyed"] is True
    with pytest.raises(hx.InvalidPath):
        kv.read_secret_version(path=path, raise_on_deleted_version=True)

    kv.delete_metadata_and_all_versions(path=path)
    with pytest.raises(hx.InvalidPath):
        kv.read_secret_metadata(path=path)
    assert kv.list_secrets(path=base)["data"]["keys"] == ["nested/"]


def test_kv2_cas_conflict(client):
    kv = client.secrets.kv.v2
    path = f"cas-{uid()}"
    kv.create_or_update_secret(path=path, secret={"v": 1}, cas=0)
    with pytest.raises(hx.InvalidRequest) as ei:
        kv.create_or_update_secret(path=path, secret={"v": 2}, cas=0)
    assert "check-and-set parameter did not match the current version" in ei.value.errors[0]
    with pytest.raises(hx.InvalidRequest):
        kv.create_or_update_secret(path=path, secret={"v": 2}, cas=5)
    assert kv.create_or_update_secret(path=path, secret={"v": 2}, cas=1)["data"]["version"] == 2


def test_kv2_missing_paths(client):
    with pytest.raises(hx.InvalidPath):
        client.secrets.kv.v2.read_secret_version(path=f"nope-{uid()}", raise_on_deleted_version=True)
    with pytest.raises(hx.InvalidPath):
        client.secrets.kv.v2.list_secrets(path=f"nope-{uid()}")


def test_kv2_custom_mount(client):
    mount = f"kv2-{uid()}"
    client.sys.enable_secrets_engine(backend_type="kv", path=mount, options={"version": "2"})
    try:
        assert f"{mount}/" in client.sys.list_mounted_secrets_engines()["data"]
        client.secrets.kv.v2.create_or_update_secret(path="a", secret={"k": "v"}, mount_point=mount)
        got = client.secrets.kv.v2.read_secret_version(path="a", mount_point=mount, raise_on_deleted_version=True)
        assert got["data"]["data"] == {"k": "v"}
        with pytest.raises(hx.InvalidRequest):
            client.sys.enable_secrets_engine(backend_type="kv", path=mount, options={"version": "2"})
    finally:
        client.sys.disable_secrets_engine(path=mount)


# --------------------------------------------------------------------------- kv v1


def test_kv1(client):
    mount = f"kv1-{uid()}"
    client.sys.enable_secrets_engine(backend_type="kv", path=mount, options={"version": "1"})
    try:
        kv = client.secrets.kv.v1
        resp = kv.create_or_update_secret(path="team/app", secret={"user": "u", "pass": "p"}, mount_point=mount)
        assert resp.status_code == 204
        got = kv.read_secret(path="team/app", mount_point=mount)
        assert got["data"] == {"user": "u", "pass": "p"}
        assert got["lease_id"] == "" and got["lease_duration"] > 0
        assert kv.list_secrets(path="team", mount_point=mount)["data"]["keys"] == ["app"]
        kv.delete_secret(path="team/app", mount_point=mount)
        with pytest.raises(hx.InvalidPath):
            kv.read_secret(path="team/app", mount_point=mount)
    finally:
        client.sys.disable_secrets_engine(path=mount)


# --------------------------------------------------------------------------- database / leases


@pytest.fixture
def db_role(target, client):
    """A database role to draw credentials from: (mount, role)."""
    if target.real:
        role = os.environ.get("VAULT_TEST_DATABASE_ROLE")
        if not role:
            pytest.skip("against a real Vault, set VAULT_TEST_DATABASE_ROLE (and optionally "
                        "VAULT_TEST_DATABASE_MOUNT) to a configured database role with default_ttl=60s, max_ttl=120s")
        return os.environ.get("VAULT_TEST_DATABASE_MOUNT", "database"), role
    role = f"ro-{uid()}"
    client.secrets.database.create_role(
        name=role, db_name="appdb", creation_statements=["CREATE ROLE \"{{name}}\""],
        default_ttl=60, max_ttl=120,
    )
    return "database", role


def test_database_creds_and_leases(target, client, db_role):
    mount, role = db_role
    creds = client.secrets.database.generate_credentials(name=role, mount_point=mount)
    lease_id = creds["lease_id"]
    assert lease_id.startswith(f"{mount}/creds/{role}/")
    assert creds["renewable"] is True and creds["lease_duration"] == 60
    assert set(creds["data"]) == {"username", "password"}

    info = client.sys.read_lease(lease_id=lease_id)["data"]
    assert info["id"] == lease_id and info["renewable"] is True and 0 < info["ttl"] <= 60
    assert {"issue_time", "expire_time", "last_renewal"} <= set(info)

    renewed = client.sys.renew_lease(lease_id=lease_id, increment=30)
    assert renewed["lease_id"] == lease_id and 25 <= renewed["lease_duration"] <= 30
    capped = client.sys.renew_lease(lease_id=lease_id, increment=3600)
    assert capped["lease_duration"] <= 120 and capped["warnings"]

    client.sys.revoke_lease(lease_id=lease_id)
    with pytest.raises(hx.InvalidRequest):
        client.sys.read_lease(lease_id=lease_id)
    with pytest.raises(hx.InvalidRequest):
        client.sys.renew_lease(lease_id=lease_id)


def test_database_unknown_role(target, client, db_role):
    if target.real:
        pytest.skip("only checked against the in-repo Vault")
    with pytest.raises(hx.InvalidRequest):
        client.secrets.database.generate_credentials(name=f"nope-{uid()}")


def test_lease_revocation_visible_to_tests(fake, target, client, db_role):
    mount, role = db_role
    creds = client.secrets.database.generate_credentials(name=role, mount_point=mount)
    user, pw = creds["data"]["username"], creds["data"]["password"]
    assert creds["lease_id"] in fake.leases()["live"]
    assert fake.db_creds_valid(user, pw)
    client.sys.revoke_lease(lease_id=creds["lease_id"])
    assert creds["lease_id"] in fake.leases()["revoked"]
    assert not fake.db_creds_valid(user, pw)


def test_lease_expires_with_fake_clock(fake, client, db_role):
    mount, role = db_role
    creds = client.secrets.database.generate_credentials(name=role, mount_point=mount)
    fake.advance_clock(61)
    assert creds["lease_id"] in fake.leases()["expired"]
    assert not fake.db_creds_valid(creds["data"]["username"], creds["data"]["password"])
    with pytest.raises(hx.InvalidRequest):
        client.sys.renew_lease(lease_id=creds["lease_id"])


def test_revoking_token_revokes_its_leases(fake, target, client, db_role):
    mount, role = db_role
    pol = f"db-{uid()}"
    client.sys.create_or_update_acl_policy(
        name=pol, policy=f'path "{mount}/creds/{role}" {{ capabilities = ["read"] }}')
    tok = client.auth.token.create(policies=[pol], ttl="10m")["auth"]["client_token"]
    c = as_client(target, tok)
    creds = c.secrets.database.generate_credentials(name=role, mount_point=mount)
    assert c.sys.renew_lease(lease_id=creds["lease_id"], increment=10)["lease_duration"] <= 10  # default policy
    with pytest.raises(hx.Forbidden):
        c.sys.revoke_lease(lease_id=creds["lease_id"])  # not in the default policy
    c.auth.token.revoke_self()
    assert creds["lease_id"] in fake.leases()["revoked"]


# --------------------------------------------------------------------------- namespaces


def test_namespace_isolation(target, client):
    if target.real and not client.sys.read_health_status(method="GET").get("enterprise"):
        pytest.skip("namespaces need Vault Enterprise")
    ns = f"team-{uid()}"
    client.sys.create_namespace(path=ns)
    nsc = as_client(target, target.token, namespace=ns)
    nsc.sys.enable_secrets_engine(backend_type="kv", path="secret", options={"version": "2"})
    path = f"shared-{uid()}"
    nsc.secrets.kv.v2.create_or_update_secret(path=path, secret={"who": "namespace"})
    with pytest.raises(hx.InvalidPath):
        client.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True)
    client.secrets.kv.v2.create_or_update_secret(path=path, secret={"who": "root"})
    assert nsc.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True)["data"]["data"] == {"who": "namespace"}
    assert client.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True)["data"]["data"] == {"who": "root"}
    # a token minted inside the namespace is not valid in the root namespace
    child = nsc.auth.token.create(policies=["default"], ttl="5m")["auth"]["client_token"]
    as_client(target, child, namespace=ns).auth.token.lookup_self()
    with pytest.raises(hx.Forbidden):
        as_client(target, child).auth.token.lookup_self()


# --------------------------------------------------------------------------- process control


def test_pause_resume(fake, target):
    c = hvac.Client(url=target.addr, token=target.token, timeout=0.5)
    fake.pause()
    try:
        with pytest.raises(requests.exceptions.RequestException):
            c.auth.token.lookup_self()
    finally:
        fake.resume()
    assert hvac.Client(url=target.addr, token=target.token, timeout=10).auth.token.lookup_self()


def test_cli_ready_file_and_root_token(tmp_path):
    vp = start_vault(tmp_path, root_token="my-root")
    try:
        ready = json.loads((tmp_path / "vault.ready.json").read_text())
        assert ready == {"port": vp.port, "pid": vp.proc.pid, "root_token": "my-root"}
        assert hvac.Client(url=vp.addr, token="my-root", timeout=10).is_authenticated()
    finally:
        assert vp.stop() == 0


def test_vault_from_env():
    assert vault_from_env({}) is None
    assert vault_from_env({"VAULT_ADDR": "http://127.0.0.1:8200"}) is None
    t = vault_from_env({"VAULT_ADDR": "http://127.0.0.1:8200/", "VAULT_TOKEN": "root"})
    assert t == VaultTarget(addr="http://127.0.0.1:8200", token="root", real=True)
    with pytest.raises(ValueError):
        vault_from_env({"VAULT_ADDR": "127.0.0.1:8200", "VAULT_TOKEN": "root"})
