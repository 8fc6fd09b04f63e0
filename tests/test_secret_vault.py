"""The Vault backend (hvac) against the in-repo Vault (tests/support/vault.py), or
a real Vault when VAULT_ADDR and VAULT_TOKEN are set (tests needing the test-only
control endpoints are skipped there, with the reason)."""

from __future__ import annotations

import asyncio
import uuid

import hvac
import pytest

from gateway.secrets.refs import parse_ref
from gateway.secrets.store import SecretResolver, SecretUnavailable
from gateway.secrets.vault import VaultBackend, VaultConfig
from tests.support.vault import start_vault, vault_from_env


@pytest.fixture(scope="module")
def vault(tmp_path_factory):
    real = vault_from_env()
    if real is not None:
        yield real, None
        return
    vp = start_vault(tmp_path_factory.mktemp("vault"))
    try:
        yield vp.target, vp
    finally:
        vp.stop()


def fake_only(vp):
    if vp is None:
        pytest.skip("needs the in-repo Vault's test-control endpoints (fake clock, pause, lease inspection)")


@pytest.fixture()
def root(vault):
    target, _ = vault
    return hvac.Client(url=target.addr, token=target.token, timeout=10)


def put(root, path, data):
    root.secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point="secret")


def run(coro):
    return asyncio.run(coro)


def approle_backend(root, target, readable: str, token_ttl: str = "20m", token_max_ttl: str = "") -> VaultBackend:
    """A VaultBackend logging in with a fresh AppRole whose policy can read secret/data/<readable>."""
    try:
        root.sys.enable_auth_method(method_type="approle", path="approle")
    except hvac.exceptions.InvalidRequest:
        pass  # already enabled
    pol = f"egress-{uuid.uuid4().hex[:8]}"
    root.sys.create_or_update_acl_policy(name=pol, policy=f'path "secret/data/{readable}" {{ capabilities = ["read"] }}')
    role = f"gw-{uuid.uuid4().hex[:8]}"
    root.auth.approle.create_or_update_approle(role_name=role, token_policies=[pol], token_ttl=token_ttl,
                                               token_max_ttl=token_max_ttl or token_ttl)
    role_id = root.auth.approle.read_role_id(role_name=role)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(role_name=role)["data"]["secret_id"]
    return VaultBackend(VaultConfig(addr=target.addr, auth="approle", role_id=role_id, secret_id=secret_id))


def test_kv_v2_latest_and_versions(vault, root):
    target, _ = vault
    path = f"egress-test/{uuid.uuid4().hex[:8]}/github"
    put(root, path, {"token": "ghp_v1"})
    put(root, path, {"token": "ghp_v2"})
    b = VaultBackend(VaultConfig(addr=target.addr, token=target.token))
    assert run(b.fetch(parse_ref(f"vault:secret/{path}#token"))).value == "ghp_v2"
    assert run(b.fetch(parse_ref(f"vault:secret/{path}?version=1#token"))).value == "ghp_v1"
    for text, reason in [(f"vault:secret/{path}#nope", "no field 'nope'"),
                         (f"vault:secret/{path}-missing#token", "not found in Vault")]:
        with pytest.raises(SecretUnavailable) as e:
            run(b.fetch(parse_ref(text)))
        assert reason in e.value.reason and "ghp_" not in str(e.value)


def test_policy_denial_and_approle_login(vault, root):
    target, _ = vault
    path = f"egress-test/{uuid.uuid4().hex[:8]}"
    put(root, f"{path}/allowed", {"k": "allowed-value"})
    put(root, f"{path}/other", {"k": "other-value"})
    b = approle_backend(root, target, f"{path}/allowed")
    assert run(b.fetch(parse_ref(f"vault:secret/{path}/allowed#k"))).value == "allowed-value"
    with pytest.raises(SecretUnavailable, match="permission denied"):
        run(b.fetch(parse_ref(f"vault:secret/{path}/other#k")))
    assert b.logins == 2  # the 403 caused one re-login before giving up


def test_expired_token_logs_in_again(vault, root):
    target, vp = vault
    fake_only(vp)
    path = f"egress-test/{uuid.uuid4().hex[:8]}"
    put(root, path, {"k": "v"})
    b = approle_backend(root, target, path, token_ttl="2m")
    ref = parse_ref(f"vault:secret/{path}#k")
    assert run(b.fetch(ref)).value == "v" and b.logins == 1
    vp.advance_clock(3600)  # the gateway's token has expired in Vault
    assert run(b.fetch(ref)).value == "v"
    assert b.logins == 2


def test_vault_down_fails_closed_and_recovers(vault, root):
    target, vp = vault
    fake_only(vp)
    path = f"egress-test/{uuid.uuid4().hex[:8]}"
    put(root, path, {"k": "v"})
    b = VaultBackend(VaultConfig(addr=target.addr, token=target.token, timeout=1, kv_ttl=0))
    r = SecretResolver({"vault": b}, stale_seconds=0)
    ref = parse_ref(f"vault:secret/{path}#k")
    assert run(r.resolve(ref)) == "v"
    vp.pause()
    try:
        with pytest.raises(SecretUnavailable) as e:
            run(r.resolve(ref))
        assert "unreachable" in e.value.reason or "unavailable" in e.value.reason
    finally:
        vp.resume()
    assert run(r.resolve(ref)) == "v"
    vp.seal()
    try:
        with pytest.raises(SecretUnavailable, match="unavailable"):
            run(r.resolve(ref))
    finally:
        vp.unseal()


def test_dynamic_credentials_lease_and_revoke(vault, root):
    target, vp = vault
    fake_only(vp)
    role = f"ro-{uuid.uuid4().hex[:8]}"
    root.secrets.database.create_role(name=role, db_name="appdb", creation_statements=['CREATE ROLE "{{name}}"'],
                                      default_ttl=60, max_ttl=120)
    b = VaultBackend(VaultConfig(addr=target.addr, token=target.token))
    user = run(b.fetch(parse_ref(f"vault-dynamic:database/creds/{role}#username")))
    assert user.lease_id.startswith(f"database/creds/{role}/") and user.ttl == pytest.approx(40)
    assert user.lease_id in b.leases
    assert user.lease_id in vp.leases()["live"]
    vp.advance_clock(30)
    assert run(b.renew_leases(margin=60)) == []
    run(b.revoke_lease(user.lease_id))
    assert user.lease_id not in b.leases
    assert user.lease_id not in vp.leases()["live"]


def test_leases_are_per_identity_and_revoked_with_it(vault, root):
    target, vp = vault
    fake_only(vp)
    role = f"ro-{uuid.uuid4().hex[:8]}"
    root.secrets.database.create_role(name=role, db_name="appdb", creation_statements=['CREATE ROLE "{{name}}"'],
                                      default_ttl=60, max_ttl=120)
    b = VaultBackend(VaultConfig(addr=target.addr, token=target.token))
    r = SecretResolver({"vault-dynamic": b})
    ref = parse_ref(f"vault-dynamic:database/creds/{role}#username")
    a1 = run(r.resolve(ref, owner="tok-a"))
    assert run(r.resolve(ref, owner="tok-a")) == a1  # cached for the same identity
    b1 = run(r.resolve(ref, owner="tok-b", owner_expires=1.0))  # another identity: its own lease
    assert a1 != b1 and len(b.leases) == 2
    by_owner = {lease.owner: lid for lid, lease in b.leases.items()}
    assert run(b.revoke_owner("tok-a")) == [] and r.forget_owner("tok-a") == 1
    live = vp.leases()["live"]
    assert by_owner["tok-a"] not in live and by_owner["tok-b"] in live
    assert run(b.revoke_expired_owners()) == [by_owner["tok-b"]]  # tok-b's token expired (unix time 1)
    assert by_owner["tok-b"] not in vp.leases()["live"] and not b.leases


def test_jwt_auth(vault, root, tmp_path):
    import time

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tests.test_support_vault import make_jwt
    target, _ = vault
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    mount = f"jwt-{uuid.uuid4().hex[:8]}"
    root.sys.enable_auth_method(method_type="jwt", path=mount)
    root.auth.jwt.configure(jwt_validation_pubkeys=[pem], path=mount)
    path = f"egress-test/{uuid.uuid4().hex[:8]}"
    put(root, path, {"k": "jwt-value"})
    pol = f"egress-{uuid.uuid4().hex[:8]}"
    root.sys.create_or_update_acl_policy(name=pol, policy=f'path "secret/data/{path}" {{ capabilities = ["read"] }}')
    root.auth.jwt.create_role(name="gateway", role_type="jwt", user_claim="sub", bound_audiences=["egress"],
                              allowed_redirect_uris=None, token_ttl="15m", token_policies=[pol], path=mount)
    now = int(time.time())  # other tests move the in-repo Vault's clock forward: a long expiry
    jwt_file = tmp_path / "jwt"
    jwt_file.write_text(make_jwt(key, "EdDSA", {"sub": "gw", "aud": "egress", "iat": now, "exp": now + 30 * 86400}))
    b = VaultBackend(VaultConfig(addr=target.addr, auth="jwt", role="gateway", jwt_file=str(jwt_file),
                                 auth_mount=mount))
    assert run(b.fetch(parse_ref(f"vault:secret/{path}#k"))).value == "jwt-value"


def test_namespace(vault, root):
    target, _ = vault
    if not root.sys.read_health_status(method="GET").get("enterprise"):
        pytest.skip("namespaces need Vault Enterprise")
    ns = f"team-{uuid.uuid4().hex[:8]}"
    root.sys.create_namespace(path=ns)
    nsc = hvac.Client(url=target.addr, token=target.token, namespace=ns, timeout=10)
    nsc.sys.enable_secrets_engine(backend_type="kv", path="secret", options={"version": "2"})
    path = f"shared-{uuid.uuid4().hex[:8]}"
    nsc.secrets.kv.v2.create_or_update_secret(path=path, secret={"who": "namespace"}, mount_point="secret")
    put(root, path, {"who": "root"})
    ref = parse_ref(f"vault:secret/{path}#who")
    assert run(VaultBackend(VaultConfig(addr=target.addr, token=target.token, namespace=ns)).fetch(ref)).value \
        == "namespace"
    assert run(VaultBackend(VaultConfig(addr=target.addr, token=target.token)).fetch(ref)).value == "root"


def test_vault_over_tls_needs_its_ca(tmp_path):
    vp = start_vault(tmp_path / "tls-vault", tls=True)
    try:
        assert vp.addr.startswith("https://")
        root = hvac.Client(url=vp.addr, token=vp.root_token, verify=str(vp.tls_ca), timeout=10)
        root.secrets.kv.v2.create_or_update_secret(path="tls/x", secret={"k": "over-tls"}, mount_point="secret")
        ref = parse_ref("vault:secret/tls/x#k")
        ok = VaultBackend(VaultConfig(addr=vp.addr, token=vp.root_token, ca_cert=str(vp.tls_ca)))
        assert run(ok.fetch(ref)).value == "over-tls"
        untrusted = VaultBackend(VaultConfig(addr=vp.addr, token=vp.root_token))  # system trust only
        with pytest.raises(SecretUnavailable) as e:
            run(untrusted.fetch(ref))
        assert "over-tls" not in str(e.value)
    finally:
        vp.stop()


def test_token_is_renewed_before_it_expires(vault, root):
    target, vp = vault
    fake_only(vp)
    path = f"egress-test/{uuid.uuid4().hex[:8]}"
    put(root, path, {"k": "v"})
    b = approle_backend(root, target, path, token_ttl="20m", token_max_ttl="2h")
    ref = parse_ref(f"vault:secret/{path}#k")
    run(b.fetch(ref))
    import time as _time
    b._token_expires = _time.monotonic() + 10  # as if most of its 20 minutes had passed
    run(b.fetch(ref))
    assert b.logins == 1  # renewed, not a new login
    assert b._token_expires - _time.monotonic() > 600


def test_kubernetes_auth(vault, root, tmp_path):
    import time

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests.test_support_vault import make_jwt
    target, vp = vault
    fake_only(vp)  # a real Vault needs a cluster (TokenReview) for this
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "service-account-signer")])
    t = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(t - datetime.timedelta(days=1))
            .not_valid_after(t + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()  # hvac wants certificates in pem_keys
    mount = f"k8s-{uuid.uuid4().hex[:8]}"
    root.sys.enable_auth_method(method_type="kubernetes", path=mount)
    root.auth.kubernetes.configure(kubernetes_host="https://kubernetes.default.svc", pem_keys=[pem],
                                   mount_point=mount)
    path = f"egress-test/{uuid.uuid4().hex[:8]}"
    put(root, path, {"k": "k8s-value"})
    pol = f"egress-{uuid.uuid4().hex[:8]}"
    root.sys.create_or_update_acl_policy(name=pol, policy=f'path "secret/data/{path}" {{ capabilities = ["read"] }}')
    root.auth.kubernetes.create_role(name="gateway", bound_service_account_names=["egress-gateway"],
                                     bound_service_account_namespaces=["egress"], policies=[pol], ttl="15m",
                                     mount_point=mount)
    now = int(time.time())

    def sa_jwt(name, namespace):
        f = tmp_path / f"sa-{name}-{namespace}"
        f.write_text(make_jwt(key, "RS256", {"iss": "kubernetes/serviceaccount", "sub": f"system:serviceaccount:{namespace}:{name}",
                                             "kubernetes.io/serviceaccount/service-account.name": name,
                                             "kubernetes.io/serviceaccount/namespace": namespace,
                                             "iat": now, "exp": now + 30 * 86400}))
        return str(f)

    ref = parse_ref(f"vault:secret/{path}#k")
    good = VaultBackend(VaultConfig(addr=target.addr, auth="kubernetes", role="gateway",
                                    jwt_file=sa_jwt("egress-gateway", "egress"), auth_mount=mount))
    assert run(good.fetch(ref)).value == "k8s-value"
    wrong = VaultBackend(VaultConfig(addr=target.addr, auth="kubernetes", role="gateway",
                                     jwt_file=sa_jwt("intruder", "egress"), auth_mount=mount))
    with pytest.raises(SecretUnavailable, match="permission denied"):
        run(wrong.fetch(ref))
