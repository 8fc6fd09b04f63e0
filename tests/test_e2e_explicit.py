"""End to end, explicit proxy mode: a real gateway process, real clients
(requests, websockets, raw sockets) and real upstreams (HTTP, HTTPS with a
test CA, WebSocket), all on loopback."""

from __future__ import annotations

import json
import socket
import ssl
import textwrap
import time

import pytest
import requests
import websockets.sync.client as wsclient

from gateway import tokens
from tests.support.gateway import (
    basic, raw_connect, read_response, send_request, start_gateway, tls_wrap,
)
from tests.support.procs import start_upstreams

POLICY = """\
apiVersion: egress/v1
kind: Policy
name: acme
selector: principal.tenant == "acme"
rules:
  - name: no-delete
    action: deny
    when: request.method == "DELETE"
    reason: Agents of acme may not delete anything.
  - name: upstream
    action: allow
    when: request.host in ["upstream.test", "api.upstream.test", "wrong-cert.test", "gateway-self.test"]
    reason: acme may use the test upstream.
    allow_internal: ["127.0.0.0/8", "::1/128"]
---
apiVersion: egress/v1
kind: Policy
name: acme-shadow
selector: principal.tenant == "acme"
mode: shadow
rules:
  - name: would-deny-shadowed-path
    action: deny
    when: request.path.startsWith("/echo/shadow")
    reason: Candidate rule, not enforced yet.
---
apiVersion: egress/v1
kind: Policy
name: ssrf-lab
selector: principal.tenant == "ssrf"
rules:
  - name: anything-get
    action: allow
    when: request.method == "GET"
    reason: Open GET policy without internal ranges (the SSRF guard must still refuse).
"""

# Every SSRF class, reached through a name (static override) so that the
# gateway resolves it; none of these is ever dialed.
SSRF_HOSTS = {
    "loopback.test": ("127.0.0.1", "loopback"),
    "loopback6.test": ("::1", "loopback"),
    "private.test": ("10.1.2.3", "private"),
    "private172.test": ("172.16.5.4", "private"),
    "private192.test": ("192.168.1.1", "private"),
    "ula.test": ("fd12:3456::1", "private"),
    "linklocal.test": ("169.254.10.1", "link_local"),
    "linklocal6.test": ("fe80::1", "link_local"),
    "metadata.test": ("169.254.169.254", "metadata"),
    "metadata6.test": ("fd00:ec2::254", "metadata"),
    "cgnat.test": ("100.64.1.1", "cgnat"),
    "multicast.test": ("224.0.0.1", "multicast"),
    "unspecified.test": ("0.0.0.0", "unspecified"),
    "reserved.test": ("240.0.0.1", "reserved"),
    "mapped.test": ("::ffff:169.254.169.254", "metadata"),
    "sixtofour.test": ("2002:7f00:1::1", "loopback"),
    "nat64.test": ("64:ff9b::a9fe:a9fe", "metadata"),
    "teredo.test": ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # client 127.0.0.1 obfuscated
    "self.test": ("127.0.0.2", "gateway_self"),
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    ups = start_upstreams(tmp / "up")
    pol = tmp / "policies"
    pol.mkdir()
    (pol / "10-test.yaml").write_text(POLICY)
    hosts = {"upstream.test": "127.0.0.1", "api.upstream.test": "127.0.0.1", "wrong-cert.test": "127.0.0.1",
             "gateway-self.test": "127.0.0.1"}
    hosts.update({n: a for n, (a, _) in SSRF_HOSTS.items()})
    gw = start_gateway(tmp, pol, hosts=hosts, upstream_ca=[ups.ca.cert],
                       config={"self_addresses": ["127.0.0.2"]})
    try:
        yield gw, ups
    finally:
        gw.stop()
        ups.stop()


def session(gw, token) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.proxies = gw.proxies(token)
    s.verify = str(gw.ca_cert)
    return s


def served_paths(ups) -> list[str]:
    return ups.stats()["paths"]


# -- allow -------------------------------------------------------------------------

def test_plain_http_allowed_and_credentials_stripped(env):
    gw, ups = env
    tok = gw.mint("acme", "agent-1")
    r = session(gw, tok).get(f"http://upstream.test:{ups.http_port}/echo/plain?x=1")
    assert r.status_code == 200, r.text
    echo = r.json()
    names = [k.lower() for k, _ in echo["headers"]]
    assert "proxy-authorization" not in names
    assert tok not in json.dumps(echo)
    assert echo["host_header"] == f"upstream.test:{ups.http_port}"
    assert echo["query"] == "x=1"
    ev = gw.decision_for(_last_request_id(gw, "/echo/plain"))
    assert ev["decision"] == "allow" and ev["rule"] == "acme/upstream"
    assert ev["principal"]["tenant"] == "acme" and ev["dial"] == "127.0.0.1"


def test_https_intercepted_with_verified_upstream(env):
    gw, ups = env
    s = session(gw, gw.mint("acme", "agent-1"))
    r = s.get(f"https://upstream.test:{ups.https_port}/echo/tls")
    assert r.status_code == 200, r.text
    assert r.json()["scheme"] == "https"
    assert "proxy-authorization" not in [k.lower() for k, _ in r.json()["headers"]]


def test_https_upstream_certificate_is_verified(env):
    """wrong-cert.test is allowed by policy and maps to the upstream, whose
    certificate does not name it: the gateway must refuse to talk to it."""
    gw, ups = env
    before = len(served_paths(ups))
    r = session(gw, gw.mint("acme", "agent-1")).get(f"https://wrong-cert.test:{ups.https_port}/echo/unverified")
    assert r.status_code == 502
    assert "/echo/unverified" not in served_paths(ups)[before - 1:]


def test_websocket_plain_and_tls(env):
    gw, ups = env
    tok = gw.mint("acme", "agent-ws")
    with wsclient.connect(f"ws://upstream.test:{ups.http_port}/ws", proxy=gw.proxy_url(tok)) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "echo:hello"
    ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
    with wsclient.connect(f"wss://upstream.test:{ups.https_port}/ws", proxy=gw.proxy_url(tok), ssl=ctx) as ws:
        ws.send("secure")
        assert ws.recv(timeout=10) == "echo:secure"
    schemes = {e["request"]["scheme"] for e in gw.audit_events()
               if e.get("event") == "decision" and e.get("request", {}).get("path") == "/ws"}
    assert {"ws", "wss"} <= schemes


# -- deny ----------------------------------------------------------------------------------

def test_deny_has_structured_body_and_never_reaches_upstream(env):
    gw, ups = env
    s = session(gw, gw.mint("acme", "agent-1"))
    r = s.delete(f"http://upstream.test:{ups.http_port}/echo/delete-me")
    assert r.status_code == 403
    assert r.headers["X-Egress-Decision"] == "deny"
    body = r.json()
    assert body["decision"] == "deny" and body["code"] == "policy_deny"
    assert body["rule"] == "acme/no-delete"  # deny beats the matching allow
    assert body["reason"] == "Agents of acme may not delete anything."
    assert body["request_id"] == r.headers["X-Egress-Request-Id"]
    assert body["policy_version"].startswith("sha256:")
    assert "/echo/delete-me" not in served_paths(ups)
    ev = gw.decision_for(body["request_id"])
    assert ev["decision"] == "deny" and ev["rule"] == "acme/no-delete"


def test_deny_inside_tls_tunnel(env):
    gw, ups = env
    r = session(gw, gw.mint("acme", "agent-1")).delete(f"https://upstream.test:{ups.https_port}/echo/tls-delete")
    assert r.status_code == 403 and r.json()["rule"] == "acme/no-delete"
    assert "/echo/tls-delete" not in served_paths(ups)


def test_default_deny_for_other_tenant(env):
    gw, ups = env
    r = session(gw, gw.mint("globex", "agent-9")).get(f"http://upstream.test:{ups.http_port}/echo/globex")
    assert r.status_code == 403
    assert r.json()["code"] == "default_deny" and r.json()["rule"] is None


def test_connect_refused_before_tls_when_no_rule_could_allow(env):
    gw, ups = env
    s, resp = raw_connect(gw.proxy_port, f"not-allowed.test:{ups.https_port}", gw.mint("acme", "agent-1"))
    with s:
        assert resp.status == 403
        assert resp.json()["code"] == "default_deny"
    ev = gw.decision_for(resp.json()["request_id"])
    assert ev["request"]["method"] == "CONNECT" and ev["status"] == 403 and ev["decision"] == "deny"


def test_shadow_policy_reports_but_does_not_decide(env):
    gw, ups = env
    r = session(gw, gw.mint("acme", "agent-1")).get(f"http://upstream.test:{ups.http_port}/echo/shadow-x")
    assert r.status_code == 200
    ev = gw.decision_for(_last_request_id(gw, "/echo/shadow-x"))
    assert ev["decision"] == "allow"
    assert ev["shadow"] == {"decision": "deny", "code": "policy_deny", "rule": "acme-shadow/would-deny-shadowed-path"}


# -- identity ------------------------------------------------------------------------------------

def _status_and_body(gw, ups, token_or_header, *, raw_header: bool = False):
    s = socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=10)
    with s:
        auth = token_or_header if raw_header else (basic(token_or_header) if token_or_header else None)
        extra = f"Proxy-Authorization: {auth}\r\n" if auth else ""
        resp = send_request(s, "GET", f"http://upstream.test:{ups.http_port}/echo/ident",
                            f"upstream.test:{ups.http_port}", extra)
    return resp


@pytest.mark.parametrize("case", ["missing", "expired", "forged", "garbage", "tampered"])
def test_bad_identity_gets_407(env, case):
    gw, ups = env
    if case == "missing":
        tok = None
    elif case == "expired":
        tok = tokens.mint(gw.key, tenant="acme", agent="a", ttl_seconds=60, now=int(time.time()) - 3600)
    elif case == "forged":
        tok = tokens.mint(tokens.generate_signing_key(), tenant="acme", agent="a")
    elif case == "garbage":
        tok = "not-a-token"
    else:
        good = gw.mint("acme", "a")
        head, payload, sig = good.split(".")
        tok = f"{head}.{payload}.{sig[:-2]}{'A' if sig[-2] != 'A' else 'B'}{sig[-1]}"
    resp = _status_and_body(gw, ups, tok)
    assert resp.status == 407
    assert "proxy-authenticate" in resp.headers
    body = resp.json()
    assert body["code"] == "identity_required" and body["decision"] == "deny"
    if tok:
        assert tok not in resp.body.decode()
        assert tok not in gw.audit_text()


def test_revocation_applies_to_new_requests_and_open_tunnels(env):
    gw, ups = env
    tok = gw.mint("acme", "agent-rev")
    tid = tokens.verify(tok, tokens.VerifyKeys.from_private(gw.key)).token_id
    # open a tunnel first and use it
    sock, resp = raw_connect(gw.proxy_port, f"upstream.test:{ups.https_port}", tok)
    assert resp.status == 200
    tls = tls_wrap(sock, gw.ca_cert, "upstream.test")
    tls.sendall(f"GET /echo/before-revoke HTTP/1.1\r\nHost: upstream.test:{ups.https_port}\r\n\r\n".encode())
    assert read_response(tls).status == 200
    status, out = gw.admin("POST", "/v1/revocations", {"token_id": tid})
    assert status == 200 and out["revoked"] == tid
    # same tunnel, after revocation
    tls.sendall(f"GET /echo/after-revoke HTTP/1.1\r\nHost: upstream.test:{ups.https_port}\r\n\r\n".encode())
    r2 = read_response(tls)
    tls.close()
    assert r2.status == 403 and r2.json()["code"] == "identity_required"
    # a new request with the revoked token
    assert _status_and_body(gw, ups, tok).status == 407
    assert "/echo/after-revoke" not in served_paths(ups)


# -- CONNECT / SNI / Host agreement -------------------------------------------------------------

def test_host_header_must_match_connect_target(env):
    gw, ups = env
    tok = gw.mint("acme", "agent-1")
    sock, resp = raw_connect(gw.proxy_port, f"upstream.test:{ups.https_port}", tok)
    assert resp.status == 200
    tls = tls_wrap(sock, gw.ca_cert, "upstream.test")
    r = send_request(tls, "GET", "/echo/mismatch-host", f"api.upstream.test:{ups.https_port}")
    assert r.status == 403 and r.json()["code"] == "destination_mismatch"
    assert "/echo/mismatch-host" not in served_paths(ups)


def test_sni_must_match_connect_target(env):
    gw, ups = env
    tok = gw.mint("acme", "agent-1")
    sock, resp = raw_connect(gw.proxy_port, f"upstream.test:{ups.https_port}", tok)
    assert resp.status == 200
    tls = tls_wrap(sock, gw.ca_cert, "api.upstream.test")
    r = send_request(tls, "GET", "/echo/mismatch-sni", f"upstream.test:{ups.https_port}")
    assert r.status == 403 and r.json()["code"] == "destination_mismatch"
    assert "/echo/mismatch-sni" not in served_paths(ups)


def test_absolute_form_host_must_match_host_header(env):
    gw, ups = env
    s = socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=10)
    with s:
        r = send_request(s, "GET", f"http://upstream.test:{ups.http_port}/echo/abs-mismatch",
                         f"metadata.test:{ups.http_port}",
                         f"Proxy-Authorization: {basic(gw.mint('acme', 'a'))}\r\n")
    assert r.status == 403 and r.json()["code"] == "destination_mismatch"


# -- SSRF ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SSRF_HOSTS))
def test_ssrf_every_class_refused(env, name):
    gw, ups = env
    addr, klass = SSRF_HOSTS[name]
    r = session(gw, gw.mint("ssrf", "prober")).get(f"http://{name}:{ups.http_port}/echo/ssrf")
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["code"] == "ssrf_blocked", body
    assert klass.replace("_", " ") in body["reason"]
    ev = gw.decision_for(body["request_id"])
    assert klass in ev["destination"]["classes"]


@pytest.mark.parametrize("spelling", [
    "2130706433", "0x7f000001", "017700000001", "127.1", "127.0.1", "0x7f.0.0.1", "0177.0.0.01",
    "127.0.0.1.", "[::ffff:127.0.0.1]", "[::1]", "localhost", "LOCALHOST.", "0", "[::]",
])
def test_ssrf_alternative_spellings_refused(env, spelling):
    gw, ups = env
    s = socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=10)
    tok = gw.mint("ssrf", "prober")
    with s:
        r = send_request(s, "GET", f"http://{spelling}:{ups.http_port}/echo/spelling",
                         f"{spelling}:{ups.http_port}", f"Proxy-Authorization: {basic(tok)}\r\n")
    assert r.status == 403, r.body
    assert r.json()["code"] == "ssrf_blocked"
    assert "/echo/spelling" not in served_paths(ups)


def test_out_of_range_numeric_host_is_refused(env):
    gw, ups = env
    s = socket.create_connection(("127.0.0.1", gw.proxy_port), timeout=10)
    with s:
        r = send_request(s, "GET", f"http://4294967296:{ups.http_port}/echo/x", f"4294967296:{ups.http_port}",
                         f"Proxy-Authorization: {basic(gw.mint('ssrf', 'prober'))}\r\n")
    assert r.status in (403, 502)
    assert r.json()["decision"] == "deny"


def test_ssrf_guard_does_not_block_explicitly_allowed_range(env):
    gw, ups = env
    # acme's rule allows 127.0.0.0/8; the same name is refused for tenant ssrf
    ok = session(gw, gw.mint("acme", "a")).get(f"http://upstream.test:{ups.http_port}/echo/allowed-internal")
    assert ok.status_code == 200
    no = session(gw, gw.mint("ssrf", "a")).get(f"http://upstream.test:{ups.http_port}/echo/refused-internal")
    assert no.status_code == 403 and no.json()["code"] == "ssrf_blocked"


def test_gateway_own_ports_never_reachable(env):
    """Even a rule that allows loopback cannot reach the gateway's admin API or proxy port."""
    gw, ups = env
    s = session(gw, gw.mint("acme", "a"))
    for port in (gw.admin_port, gw.proxy_port):
        r = s.get(f"http://gateway-self.test:{port}/healthz")
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "ssrf_blocked" and "the gateway itself" in r.json()["reason"]
    assert s.get(f"http://gateway-self.test:{ups.http_port}/echo/self-ok").status_code == 200


def test_identity_denials_are_audited_with_the_request(env):
    gw, ups = env
    resp = _status_and_body(gw, ups, None)
    ev = gw.decision_for(resp.json()["request_id"])
    assert ev["identity_error"] == "missing"
    assert ev["request"]["host"] == "upstream.test" and ev["request"]["path"] == "/echo/ident"


def _hosts_file_loopback_name() -> str | None:
    """A name /etc/hosts maps to a loopback address (not localhost, which the
    gateway answers itself): resolving it exercises the system resolver path
    without any DNS query leaving the machine."""
    try:
        lines = open("/etc/hosts").read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and (parts[0].startswith("127.") or parts[0] == "::1"):
            for name in parts[1:]:
                if name != "localhost" and not name.endswith(".localhost") and "." not in name.strip("."):
                    return name
    return None


def test_system_resolver_path_is_checked(env):
    """A name the gateway has no override for goes through getaddrinfo (the
    asynchronous path); the loopback answer is still refused."""
    name = _hosts_file_loopback_name()
    if name is None:
        pytest.skip("no /etc/hosts name maps to a loopback address here (needed to use the system resolver "
                    "without sending DNS queries)")
    gw, ups = env
    for _ in range(2):  # resolved, then from the resolver cache
        r = session(gw, gw.mint("ssrf", "prober")).get(f"http://{name}:{ups.http_port}/echo/dns-path")
        assert r.status_code == 403 and r.json()["code"] == "ssrf_blocked", r.text
        ev = gw.decision_for(r.json()["request_id"])
        assert ev["destination"]["via"] == "dns" and "loopback" in ev["destination"]["classes"]
    assert "/echo/dns-path" not in served_paths(ups)


# -- helpers --------------------------------------------------------------------------------------

def _last_request_id(gw, path: str) -> str:
    for ev in reversed(gw.audit_events()):
        if ev.get("event") == "decision" and ev.get("request", {}).get("path") == path:
            return ev["request_id"]
    raise AssertionError(f"no decision recorded for {path}")
