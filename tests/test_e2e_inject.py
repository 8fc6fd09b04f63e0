"""End to end: credentials injected by the real gateway from its local store and
from Vault (the in-repo Vault, or a real one via VAULT_ADDR/VAULT_TOKEN), never
to a destination the rule does not name, never over plaintext, never partially."""

from __future__ import annotations

import json
import uuid

import hvac
import pytest
import requests

from gateway.secrets.local import LocalStore
from tests.support.gateway import basic, send_request, start_gateway
from tests.support.procs import start_upstreams
from tests.conftest import register_secret
from tests.support.vault import start_vault, vault_from_env

GITHUB = register_secret("ghp_e2e_" + uuid.uuid4().hex)
LLM = register_secret("sk-e2e-" + uuid.uuid4().hex)
VAULT_KEY = register_secret("vk-e2e-" + uuid.uuid4().hex)
VAULT_PATH = f"egress-e2e/{uuid.uuid4().hex[:8]}"
DB_ROLE = f"ro-{uuid.uuid4().hex[:8]}"

POLICY = f"""\
apiVersion: egress/v1
kind: Policy
name: acme
selector: principal.tenant == "acme"
rules:
  - name: github
    action: allow
    when: request.host == "api.upstream.test"
    allow_internal: ["127.0.0.0/8"]
    inject:
      headers:
        authorization: "Bearer ${{local:github/token}}"
      placeholders:
        llm: local:llm/key
  - name: vault-api
    action: allow
    when: request.host == "vault.upstream.test"
    allow_internal: ["127.0.0.0/8"]
    inject:
      headers:
        x-api-key: "${{vault:secret/{VAULT_PATH}#key}}"
  - name: vault-missing
    action: allow
    when: request.host == "missing.upstream.test"
    allow_internal: ["127.0.0.0/8"]
    inject:
      headers:
        x-api-key: "${{vault:secret/{VAULT_PATH}-not-there#key}}"
  - name: local-missing
    action: allow
    when: request.host == "nolocal.upstream.test"
    allow_internal: ["127.0.0.0/8"]
    inject:
      headers:
        x-api-key: "${{local:does/not/exist}}"
  - name: plain
    action: allow
    when: request.host == "plain.upstream.test"
    allow_internal: ["127.0.0.0/8"]
    inject:
      headers:
        x-api-key: "${{local:llm/key}}"
  - name: dynamic
    action: allow
    when: request.host == "dyn.upstream.test"
    allow_internal: ["127.0.0.0/8"]
    inject:
      headers:
        x-db-user: "${{vault-dynamic:database/creds/{DB_ROLE}#username}}"
  - name: badcert
    action: allow
    when: request.host == "badcert.test"
    allow_internal: ["127.0.0.0/8"]
    inject:
      headers:
        authorization: "Bearer ${{local:github/token}}"
  - name: no-secrets
    action: allow
    when: request.host == "upstream.test"
    allow_internal: ["127.0.0.0/8"]
"""

HOSTS = ["api", "vault", "missing", "nolocal", "plain", "dyn"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inject")
    ups = start_upstreams(tmp / "up")
    real = vault_from_env()
    vp = None if real is not None else start_vault(tmp / "vault")
    target = real or vp.target
    root = hvac.Client(url=target.addr, token=target.token, timeout=10)
    root.secrets.kv.v2.create_or_update_secret(path=VAULT_PATH, secret={"key": VAULT_KEY}, mount_point="secret")
    if vp is not None:  # a real Vault needs a configured database plugin for this
        root.secrets.database.create_role(name=DB_ROLE, db_name="appdb",
                                          creation_statements=['CREATE ROLE "{{name}}"'], default_ttl=300,
                                          max_ttl=600)
    pol = tmp / "pol"
    pol.mkdir()
    (pol / "p.yaml").write_text(POLICY)
    store = LocalStore(tmp / "gateway-state")
    store.put("github/token", GITHUB)
    store.put("llm/key", LLM)
    hosts = {f"{h}.upstream.test": "127.0.0.1" for h in HOSTS} | {"upstream.test": "127.0.0.1",
                                                                  "badcert.test": "127.0.0.1"}
    gw = start_gateway(tmp, pol, hosts=hosts, upstream_ca=[ups.ca.cert], config={
        "vault": {"addr": target.addr, "token": target.token, "timeout": 1.0}})
    try:
        yield gw, ups, vp
    finally:
        gw.stop()
        ups.stop()
        if vp is not None:
            vp.stop()


def session(gw, tenant="acme"):
    """A client whose every response (status, headers, body) is also appended to
    sandbox-responses.log, which the suite's leak scan reads at the end."""
    s = requests.Session()
    s.trust_env = False
    s.proxies = gw.proxies(gw.mint(tenant, "agent-1"))
    s.verify = str(gw.ca_cert)

    def capture(r, *args, **kwargs):
        body = b"" if r.raw is None or kwargs.get("stream") else r.content
        with open(gw.state_dir / "sandbox-responses.log", "ab") as f:
            f.write(f"{r.status_code} {r.url}\n{dict(r.headers)}\n".encode() + body + b"\n")
    s.hooks["response"].append(capture)
    return s


def received(ups, path: str) -> dict[str, str]:
    """The headers the upstream received for ``path`` (read from it directly,
    not through the gateway, which scrubs reflections)."""
    for entry in reversed(ups.seen()):
        if entry["path"] == path:
            return {k.lower(): v for k, v in entry["headers"]}
    raise AssertionError(f"upstream never received {path}")


def test_header_injected_replacing_what_the_sandbox_sent(env):
    gw, ups, _ = env
    r = session(gw).get(f"https://api.upstream.test:{ups.https_port}/echo/gh",
                        headers={"Authorization": "Bearer sandbox-guess"})
    assert r.status_code == 200, r.text
    h = received(ups, "/echo/gh")
    assert h["authorization"] == f"Bearer {GITHUB}"
    assert [k.lower() for k, _ in r.json()["headers"]].count("authorization") == 1
    assert GITHUB not in r.text  # the echo was scrubbed on the way back
    ev = [e for e in gw.audit_events() if e.get("request", {}).get("path") == "/echo/gh"][-1]
    assert ev["secrets"] == ["local:github/token"]


def test_placeholder_swapped(env):
    gw, ups, _ = env
    r = session(gw).get(f"https://api.upstream.test:{ups.https_port}/echo/ph",
                        headers={"X-LLM-Key": "egress-secret:llm"})
    assert r.status_code == 200, r.text
    assert received(ups, "/echo/ph")["x-llm-key"] == LLM
    assert LLM not in r.text


@pytest.mark.parametrize("host,alias", [("api", "other"), ("upstream", "llm")])
def test_placeholder_not_granted_is_refused(env, host, alias):
    gw, ups, _ = env
    before = len(ups.stats()["paths"])
    r = session(gw).get(f"https://{host}.upstream.test:{ups.https_port}/echo/ng".replace("upstream.upstream", "upstream"),
                        headers={"X-Key": f"egress-secret:{alias}"})
    assert r.status_code == 403 and r.json()["code"] == "secret_not_granted", r.text
    assert len(ups.stats()["paths"]) == before


def test_no_injection_over_plaintext(env):
    gw, ups, _ = env
    r = session(gw).get(f"http://plain.upstream.test:{ups.http_port}/echo/plain")
    assert r.status_code == 403 and r.json()["code"] == "plaintext_injection"
    assert "/echo/plain" not in ups.stats()["paths"]


def test_secret_not_injected_into_other_hosts(env):
    gw, ups, _ = env
    r = session(gw).get(f"https://upstream.test:{ups.https_port}/echo/other")
    assert r.status_code == 200
    assert GITHUB not in r.text and LLM not in r.text


def test_host_header_cannot_carry_the_secret_elsewhere(env):
    """CONNECT to the injecting host with another Host is refused before anything is injected."""
    gw, ups, _ = env
    from tests.support.gateway import raw_connect, tls_wrap
    sock, resp = raw_connect(gw.proxy_port, f"api.upstream.test:{ups.https_port}", gw.mint("acme", "a"))
    assert resp.status == 200
    tls = tls_wrap(sock, gw.ca_cert, "api.upstream.test")
    r = send_request(tls, "GET", "/echo/smuggle", f"upstream.test:{ups.https_port}")
    assert r.status == 403 and r.json()["code"] == "destination_mismatch"
    assert "/echo/smuggle" not in ups.stats()["paths"]


def test_missing_secrets_fail_closed_with_503(env):
    gw, ups, _ = env
    for host, ref in [("missing", f"vault:secret/{VAULT_PATH}-not-there#key"), ("nolocal", "local:does/not/exist")]:
        r = session(gw).get(f"https://{host}.upstream.test:{ups.https_port}/echo/{host}")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["code"] == "secret_unavailable" and ref in body["reason"]
        assert f"/echo/{host}" not in ups.stats()["paths"]


def test_vault_injection_and_vault_down(env):
    gw, ups, vp = env
    r = session(gw).get(f"https://vault.upstream.test:{ups.https_port}/echo/vault")
    assert r.status_code == 200, r.text
    assert received(ups, "/echo/vault")["x-api-key"] == VAULT_KEY
    assert VAULT_KEY not in r.text
    if vp is None:
        pytest.skip("pausing Vault needs the in-repo Vault")
    vp.pause()
    try:  # a reference not in the cache cannot be fetched: 503, nothing sent
        r = session(gw).get(f"https://missing.upstream.test:{ups.https_port}/echo/down")
        assert r.status_code == 503 and "unreachable" in r.json()["reason"]
        # the cached one is still served (within its TTL)
        assert session(gw).get(f"https://vault.upstream.test:{ups.https_port}/echo/cached").status_code == 200
    finally:
        vp.resume()


def test_no_secret_value_in_audit_log_metrics_or_admin(env):
    gw, ups, _ = env
    session(gw).get(f"https://api.upstream.test:{ups.https_port}/echo/leak",
                    headers={"X-LLM-Key": "egress-secret:llm"})
    metrics = gw.admin("GET", "/metrics")[1]
    (gw.state_dir / "metrics-snapshot.txt").write_text(metrics)  # scanned again at the end of the session
    assert "egress_secret_cache_hits_total" in metrics and "egress_secret_fetch_duration_seconds_bucket" in metrics
    assert "egress_secret_leases 0.0" in metrics
    produced = [gw.audit_text(), gw.log_text(),
                metrics, json.dumps(gw.admin("GET", "/v1/policy")[1])]
    for text in produced:
        for value in (GITHUB, LLM, VAULT_KEY):
            assert value not in text


def test_reflection_in_header_and_streamed_body_is_scrubbed(env):
    gw, ups, _ = env
    with session(gw).get(f"https://api.upstream.test:{ups.https_port}/reflect-stream",
                         headers={"X-LLM-Key": "egress-secret:llm"}, stream=True) as r:
        assert r.status_code == 200
        body = b"".join(r.iter_content(chunk_size=5))
        headers = dict(r.headers)
    with open(gw.state_dir / "sandbox-responses.log", "ab") as f:  # the streamed body, for the leak scan
        f.write(repr(headers).encode() + body + b"\n")
    assert received(ups, "/reflect-stream")["authorization"] == f"Bearer {GITHUB}"
    assert GITHUB not in headers["X-Reflected"] and "[egress:redacted]"[:5] in headers["X-Reflected"]
    assert GITHUB.encode() not in body and LLM.encode() not in body
    assert b"egress:redacted" in body
    events = [e for e in gw.audit_events() if e.get("event") == "reflection_scrubbed"]
    assert {"header", "body"} <= {e["where"] for e in events}
    assert 'egress_reflections_scrubbed_total{where="body"}' in gw.admin("GET", "/metrics")[1]


def test_injected_request_asks_for_identity_encoding(env):
    gw, ups, _ = env
    session(gw).get(f"https://api.upstream.test:{ups.https_port}/echo/enc", headers={"Accept-Encoding": "gzip"})
    assert received(ups, "/echo/enc")["accept-encoding"] == "identity"


def test_credentials_do_not_follow_a_redirect_to_another_host(env):
    gw, ups, _ = env
    target = f"https://upstream.test:{ups.https_port}/echo/after-redirect"
    r = session(gw).get(f"https://api.upstream.test:{ups.https_port}/redirect", params={"to": target})
    assert r.status_code == 200 and r.history and r.history[0].status_code == 302
    assert received(ups, "/redirect")["authorization"] == f"Bearer {GITHUB}"
    after = received(ups, "/echo/after-redirect")
    assert "authorization" not in after and GITHUB not in json.dumps(after)


def test_leased_credentials_are_per_identity_and_revoked_with_it(env):
    gw, ups, vp = env
    if vp is None:
        pytest.skip("needs the in-repo Vault's database engine and lease inspection")
    from gateway import tokens
    tok_a, tok_b = gw.mint("acme", "agent-a"), gw.mint("acme", "agent-b")
    users = {}
    for name, tok in (("a", tok_a), ("b", tok_b)):
        s = requests.Session()
        s.trust_env = False
        s.proxies = gw.proxies(tok)
        s.verify = str(gw.ca_cert)
        for i in range(2):
            r = s.get(f"https://dyn.upstream.test:{ups.https_port}/echo/dyn-{name}-{i}")
            assert r.status_code == 200, r.text
        users[name] = {received(ups, f"/echo/dyn-{name}-{i}")["x-db-user"] for i in range(2)}
    assert len(users["a"]) == 1 and len(users["b"]) == 1 and users["a"] != users["b"]  # one lease each
    live_before = set(vp.leases()["live"])
    tid_a = tokens.verify(tok_a, tokens.VerifyKeys.from_private(gw.key)).token_id
    status, out = gw.admin("POST", "/v1/revocations", {"token_id": tid_a})
    assert status == 200 and out["leases_not_revoked"] == 0
    live_after = set(vp.leases()["live"])
    assert len(live_before - live_after) == 1  # exactly agent-a's lease
    s = requests.Session()
    s.trust_env = False
    s.proxies = gw.proxies(tok_b)
    s.verify = str(gw.ca_cert)
    r = s.get(f"https://dyn.upstream.test:{ups.https_port}/echo/dyn-b-after")
    assert r.status_code == 200 and received(ups, "/echo/dyn-b-after")["x-db-user"] in users["b"]


@pytest.mark.parametrize("connect,sni,host", [
    ("api", "upstream.test", "api"),  # SNI names another host
    ("upstream", "upstream.test", "api"),  # Host names the injecting host inside another tunnel
])
def test_no_injection_when_connect_sni_and_host_disagree(env, connect, sni, host):
    gw, ups, _ = env
    from tests.support.gateway import raw_connect, tls_wrap
    name = {"api": "api.upstream.test", "upstream": "upstream.test"}
    sock, resp = raw_connect(gw.proxy_port, f"{name[connect]}:{ups.https_port}", gw.mint("acme", "a"))
    assert resp.status == 200
    tls = tls_wrap(sock, gw.ca_cert, sni)
    path = f"/echo/mismatch-{connect}-{host}"
    r = send_request(tls, "GET", path, f"{name[host]}:{ups.https_port}")
    assert r.status == 403 and r.json()["code"] == "destination_mismatch"
    assert path not in ups.stats()["paths"]


def test_no_credentials_to_an_upstream_whose_certificate_does_not_verify(env):
    """badcert.test reaches the upstream, whose certificate does not name it: the
    TLS handshake fails, so the request with the credential is never sent."""
    gw, ups, _ = env
    before = ups.stats()["requests"]
    r = session(gw).get(f"https://badcert.test:{ups.https_port}/echo/badcert")
    assert r.status_code == 502
    assert GITHUB not in r.text
    assert ups.stats()["requests"] == before
