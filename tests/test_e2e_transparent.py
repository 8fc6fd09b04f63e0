"""End to end, transparent mode: a sandbox network namespace whose TCP to the
upstream ports is NAT-redirected (nftables) to the gateway's transparent
listener on the host end of a veth pair. Real clients (curl, raw sockets) run
inside the namespace; the gateway identifies them by source address
(bindings), takes the host from SNI / Host, resolves it itself (static
overrides) and dials the checked address on loopback, where the real
upstreams listen.

The namespace has only the on-link /30 route (no default route), and the
nftables input/forward chains drop everything from the sandbox except the
redirected connections, so no traffic leaves the machine. Namespace, veth
pair and nft table are removed in the fixture's teardown, also on failure.
"""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.gateway import GatewayProc, start_gateway
from tests.support.netns import Sandbox, create_sandbox, missing_prerequisites
from tests.support.procs import Upstreams, free_port, start_upstreams, wait_for_port

pytestmark = pytest.mark.netns

TENANT = "sbx"

POLICY = """\
apiVersion: egress/v1
kind: Policy
name: sandbox
selector: principal.tenant == "sbx"
rules:
  - name: no-forbidden-path
    action: deny
    when: request.path.startsWith("/echo/forbidden")
    reason: Sandboxes may not use the forbidden area.
  - name: upstream-get
    action: allow
    when: request.method == "GET" && request.host in ["upstream.test", "metadata.test", "wrong-cert.test"]
    reason: Sandboxes may read from the test upstream.
    allow_internal: ["127.0.0.0/8"]
"""

HOSTS = {
    "upstream.test": "127.0.0.1",
    "other.test": "127.0.0.1",
    # allowed by the policy, but the upstream's certificate does not name it
    "wrong-cert.test": "127.0.0.1",
    # allowed by the policy by name, but resolves to cloud metadata: the SSRF guard must refuse it
    "metadata.test": "169.254.169.254",
}


class Sink:
    """A raw TCP listener on the host end of the veth at a redirected port.
    Connections from the sandbox to that port are redirected to the gateway,
    so the sink only ever sees a connection if the gateway dials the
    *original* destination, which it must never do."""

    def __init__(self, host: str):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                c, addr = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(addr)
            c.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@dataclass
class Env:
    sb: Sandbox
    gw: GatewayProc
    ups: Upstreams
    sink: Sink
    tport: int
    tmp: Path

    # -- bindings ---------------------------------------------------------------------
    def bind(self, address: str | None = None, tenant: str = TENANT, agent: str = "sandbox-1") -> None:
        status, out = self.gw.admin("POST", "/v1/bindings",
                                    {"address": address or self.sb.ns_ip, "tenant": tenant, "agent": agent})
        assert status in (200, 201), out

    def unbind(self, address: str | None = None) -> None:
        status, out = self.gw.admin("DELETE", f"/v1/bindings/{address or self.sb.ns_ip}")
        assert status in (200, 404), out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    why = missing_prerequisites()
    if why:
        pytest.skip(f"transparent-mode e2e tests: {why}")
    tmp = tmp_path_factory.mktemp("transparent")
    pol = tmp / "policies"
    pol.mkdir()
    (pol / "10-sandbox.yaml").write_text(POLICY)
    sb = create_sandbox()
    ups = gw = sink = None
    try:
        ups = start_upstreams(tmp / "up")
        sink = Sink(sb.host_ip)
        tport = free_port(sb.host_ip)
        gw = start_gateway(tmp, pol, hosts=HOSTS, upstream_ca=[ups.ca.cert], transparent=(sb.host_ip, tport))
        sb.redirect([ups.http_port, ups.https_port, sink.port], tport)
        # (after the redirect: with conntrack active, the probe's SO_ORIGINAL_DST lookup succeeds)
        wait_for_port(sb.host_ip, tport, timeout=10)
        yield Env(sb, gw, ups, sink, tport, tmp)
    finally:
        problems: list[str] = []
        for thing in (gw, ups, sink):  # each one even if another fails; the sandbox last
            if thing is not None:
                try:
                    thing.stop() if hasattr(thing, "stop") else thing.close()
                except Exception as e:  # pragma: no cover - keep tearing down
                    problems.append(f"stopping {thing!r}: {e}")
        problems += sb.close()
        left = sb.leftovers()
        assert not problems and not left, f"sandbox teardown incomplete: {problems} {left}"


@pytest.fixture
def bound(env):
    env.bind()
    try:
        yield env
    finally:
        env.unbind()


# -- clients inside the sandbox ----------------------------------------------------------------

@dataclass
class CurlResult:
    rc: int
    status: int
    headers: dict[str, str]
    body: bytes
    stderr: str

    def json(self):
        return json.loads(self.body)


def curl(env: Env, url: str, *args: str, timeout: float = 15) -> CurlResult:
    """curl inside the namespace; ``-i`` output split into status, headers, body."""
    r = env.sb.run(["curl", "-sS", "-i", "--noproxy", "*", "--max-time", "10", *args, url], timeout=timeout,
                   text=False)
    out = r.stdout
    status, headers, body = 0, {}, b""
    if out:
        head, _, body = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return CurlResult(r.returncode, status, headers, body, r.stderr)


def http_url(env: Env, path: str) -> str:
    # The IP is the gateway's own veth address: the original destination is
    # irrelevant, the gateway goes by the Host header.
    return f"http://{env.sb.host_ip}:{env.ups.http_port}{path}"


def curl_http(env: Env, path: str, host: str = "upstream.test", *args: str) -> CurlResult:
    return curl(env, http_url(env, path), "-H", f"Host: {host}:{env.ups.http_port}", *args)


def curl_https(env: Env, path: str, name: str = "upstream.test", *args: str) -> CurlResult:
    port = env.ups.https_port
    return curl(env, f"https://{name}:{port}{path}", "--cacert", str(env.gw.ca_cert),
                "--resolve", f"{name}:{port}:{env.sb.host_ip}", *args)


RAW_CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    host, port, payload, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
    s = socket.create_connection((host, port), timeout=5)
    if payload:
        s.sendall(payload)
    got, closed, t0 = b"", False, time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < wait:
        try:
            chunk = s.recv(4096)
        except socket.timeout:
            continue
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        got += chunk
    print(json.dumps({"received": got.decode("latin-1"), "closed": closed,
                      "seconds": round(time.monotonic() - t0, 2)}))
""")


def raw_tcp(env: Env, port: int, payload: str, wait: float = 3.0) -> dict:
    r = env.sb.run([sys.executable, "-c", RAW_CLIENT, env.sb.host_ip, str(port), payload, str(wait)],
                   timeout=wait + 15)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def served(env: Env) -> list[str]:
    return env.ups.stats()["paths"]


def decision_events(env: Env, path: str | None = None) -> list[dict]:
    return [e for e in env.gw.audit_events() if e.get("event") == "decision"
            and (path is None or e.get("request", {}).get("path") == path)]


def last_event(env: Env, path: str) -> dict:
    evs = decision_events(env, path)
    assert evs, f"no decision recorded for {path}"
    return evs[-1]


# -- the harness itself ------------------------------------------------------------------------

def test_sandbox_has_no_route_out(env):
    """The namespace reaches its /30 and nothing else (checked without sending anything)."""
    r = env.sb.run(["ip", "-4", "route", "get", "192.0.2.1"])
    assert r.returncode != 0 and "unreachable" in r.stderr.lower(), r.stdout + r.stderr
    routes = env.sb.run(["ip", "-4", "route", "show"]).stdout
    assert "default" not in routes
    assert env.sb.run(["ip", "-4", "route", "get", env.sb.host_ip]).returncode == 0


def test_unredirected_port_from_sandbox_is_dropped(env):
    """Only the redirected ports reach the gateway; the admin API port (on
    loopback of the root namespace) is not even reachable by address."""
    port = free_port(env.sb.host_ip)
    r = curl(env, f"http://{env.sb.host_ip}:{port}/", "--connect-timeout", "1", "--max-time", "2")
    assert r.rc != 0 and r.status == 0


def test_direct_connection_to_transparent_port_goes_nowhere(bound):
    """Connecting to the gateway's own port (no NAT) leaves the gateway with
    its own address as original destination: nothing is reached."""
    env = bound
    before = env.ups.stats()["requests"]
    r = curl(env, f"http://{env.sb.host_ip}:{env.tport}/echo/direct", "-H",
             f"Host: upstream.test:{env.ups.http_port}")
    assert r.status in (403, 502), (r.rc, r.stderr, r.body)
    assert env.ups.stats()["requests"] == before and env.sink.accepted == []


# -- 1. bound source: allowed ---------------------------------------------------------------------

def test_bound_source_http_allowed(bound):
    env = bound
    r = curl_http(env, "/echo/t1?q=1")
    assert r.rc == 0, r.stderr
    assert r.status == 200, r.body
    echo = r.json()
    assert echo["path"] == "/echo/t1" and echo["query"] == "q=1"
    assert echo["host_header"] == f"upstream.test:{env.ups.http_port}"
    assert echo["client"] == "127.0.0.1"  # dialed by the gateway on loopback, not by the sandbox
    ev = last_event(env, "/echo/t1")
    assert ev["decision"] == "allow" and ev["rule"] == "sandbox/upstream-get"
    assert ev["request"]["mode"] == "transparent"
    assert ev["request"]["host"] == "upstream.test" and ev["request"]["port"] == env.ups.http_port
    assert ev["principal"]["tenant"] == TENANT and ev["principal"]["agent"] == "sandbox-1"
    assert ev["principal"]["via"] == "binding"
    assert ev["source"] == env.sb.ns_ip
    assert ev["dial"] == "127.0.0.1"


def test_bound_source_https_allowed(bound):
    env = bound
    r = curl_https(env, "/echo/t2")
    assert r.rc == 0, r.stderr
    assert r.status == 200, r.body
    echo = r.json()
    assert echo["path"] == "/echo/t2" and echo["scheme"] == "https"
    ev = last_event(env, "/echo/t2")
    assert ev["decision"] == "allow"
    assert ev["request"]["mode"] == "transparent" and ev["request"]["scheme"] == "https"
    assert ev["request"]["sni"] == "upstream.test"
    assert ev["principal"]["tenant"] == TENANT and ev["principal"]["via"] == "binding"
    assert ev["source"] == env.sb.ns_ip and ev["dial"] == "127.0.0.1"


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_every_request_on_a_reused_connection_is_checked(bound, version):
    """Two requests on one intercepted TLS connection: the first allowed, the
    second denied by a rule; curl reports no new connect for the second."""
    env = bound
    port = env.ups.https_port
    tag = version.strip("-").replace(".", "")
    r = env.sb.run(["curl", "-sS", "--noproxy", "*", "--max-time", "10", version, "--cacert", str(env.gw.ca_cert),
                    "--resolve", f"upstream.test:{port}:{env.sb.host_ip}", "-o", "/dev/null", "-o", "/dev/null",
                    "-w", "%{http_code} %{num_connects} %{http_version}\\n",
                    f"https://upstream.test:{port}/echo/ka-{tag}",
                    f"https://upstream.test:{port}/echo/forbidden-ka-{tag}"])
    assert r.returncode == 0, r.stderr
    first, second = [line.split() for line in r.stdout.split("\n") if line.strip()]
    assert first[:2] == ["200", "1"] and second[:2] == ["403", "0"], r.stdout
    assert first[2] == second[2] == ("1.1" if tag == "http11" else "2")
    paths = served(env)
    assert f"/echo/ka-{tag}" in paths and f"/echo/forbidden-ka-{tag}" not in paths
    assert last_event(env, f"/echo/forbidden-ka-{tag}")["rule"] == "sandbox/no-forbidden-path"


def test_upstream_certificate_is_verified_by_name(bound):
    """wrong-cert.test is allowed and maps to the upstream, whose certificate
    does not name it (it does name 127.0.0.1): the gateway must refuse."""
    env = bound
    r = curl_https(env, "/echo/wrong-cert", "wrong-cert.test")
    assert r.status == 502, (r.rc, r.stderr, r.body)
    assert "/echo/wrong-cert" not in served(env)


def test_gateway_ca_is_what_the_sandbox_sees(bound):
    """Without the gateway CA, the sandbox's TLS handshake fails (interception is visible)."""
    env = bound
    port = env.ups.https_port
    r = curl(env, f"https://upstream.test:{port}/echo/no-ca", "--cacert", str(env.ups.ca.cert),
             "--resolve", f"upstream.test:{port}:{env.sb.host_ip}")
    assert r.rc != 0 and r.status == 0
    assert "/echo/no-ca" not in served(env)


# -- 2. unbound source: identity required (403, not 407) -------------------------------------------

def test_unbound_source_gets_identity_required(env):
    env.unbind()
    before = env.ups.stats()["requests"]
    r = curl_http(env, "/echo/unbound-http")
    assert r.status == 403, r.body
    assert "proxy-authenticate" not in r.headers
    body = r.json()
    assert body["decision"] == "deny" and body["code"] == "identity_required"
    assert body["request_id"] == r.headers["x-egress-request-id"]
    rs = curl_https(env, "/echo/unbound-https")
    assert rs.status == 403 and rs.json()["code"] == "identity_required"
    assert "proxy-authenticate" not in rs.headers
    after = served(env)
    assert "/echo/unbound-http" not in after and "/echo/unbound-https" not in after
    assert env.ups.stats()["requests"] == before
    ev = env.gw.decision_for(body["request_id"])
    assert ev["decision"] == "deny" and ev["identity_error"] == "unbound"
    assert ev["source"] == env.sb.ns_ip and "principal" not in ev


def test_removing_binding_takes_effect_immediately(env):
    env.bind(agent="short-lived")
    try:
        ok = curl_http(env, "/echo/while-bound")
        assert ok.status == 200
        assert last_event(env, "/echo/while-bound")["principal"]["agent"] == "short-lived"
    finally:
        env.unbind()
    no = curl_http(env, "/echo/after-unbind")
    assert no.status == 403 and no.json()["code"] == "identity_required"
    assert "/echo/after-unbind" not in served(env)


def test_binding_for_another_address_does_not_apply(env):
    env.unbind()
    env.bind(address=env.sb.host_ip, agent="wrong-address")  # the gateway's own side, not the sandbox
    try:
        r = curl_http(env, "/echo/other-binding")
        assert r.status == 403 and r.json()["code"] == "identity_required"
    finally:
        env.unbind(env.sb.host_ip)


# -- 3. policy deny ---------------------------------------------------------------------------------

def test_policy_deny_rule(bound):
    env = bound
    r = curl_http(env, "/echo/forbidden-thing")
    assert r.status == 403, r.body
    body = r.json()
    assert body["code"] == "policy_deny" and body["rule"] == "sandbox/no-forbidden-path"
    assert body["reason"] == "Sandboxes may not use the forbidden area."
    assert r.headers["x-egress-decision"] == "deny"
    rs = curl_https(env, "/echo/forbidden-tls")
    assert rs.status == 403 and rs.json()["rule"] == "sandbox/no-forbidden-path"
    paths = served(env)
    assert "/echo/forbidden-thing" not in paths and "/echo/forbidden-tls" not in paths
    ev = env.gw.decision_for(body["request_id"])
    assert ev["request"]["mode"] == "transparent" and ev["principal"]["via"] == "binding"


def test_method_not_allowed_is_default_deny(bound):
    env = bound
    r = curl_http(env, "/echo/post-me", "upstream.test", "-X", "POST", "--data", "x=1")
    assert r.status == 403
    assert r.json()["code"] == "default_deny" and r.json()["rule"] is None
    assert "/echo/post-me" not in served(env)


def test_host_not_in_policy_is_default_deny(bound):
    """The original destination IP is the gateway itself; only the Host
    header counts, and other.test is not allowed (although it resolves to
    the same upstream)."""
    env = bound
    r = curl_http(env, "/echo/other-host", "other.test")
    assert r.status == 403 and r.json()["code"] == "default_deny"
    assert "/echo/other-host" not in served(env)


# -- 4. SNI and Host must agree -------------------------------------------------------------------

def test_sni_and_host_disagree(bound):
    env = bound
    port = env.ups.https_port
    r = curl_https(env, "/echo/sni-mismatch", "upstream.test", "--http1.1", "-H", f"Host: other.test:{port}")
    assert r.status == 403, (r.rc, r.stderr, r.body)
    body = r.json()
    assert body["code"] == "destination_mismatch"
    assert "upstream.test" in body["reason"] and "other.test" in body["reason"]
    assert "/echo/sni-mismatch" not in served(env)
    ev = env.gw.decision_for(body["request_id"])
    assert ev["principal"]["tenant"] == TENANT and "dial" not in ev


def test_sni_and_host_disagree_http2(bound):
    """Over HTTP/2 the Host header becomes :authority; still checked against SNI."""
    env = bound
    port = env.ups.https_port
    r = curl_https(env, "/echo/sni-mismatch-h2", "upstream.test", "--http2", "-H", f"Host: other.test:{port}")
    assert r.status == 403, (r.rc, r.stderr, r.body)
    assert r.json()["code"] == "destination_mismatch"
    assert "/echo/sni-mismatch-h2" not in served(env)


def test_sni_case_and_port_in_host_agree(bound):
    env = bound
    port = env.ups.https_port
    r = curl_https(env, "/echo/case", "upstream.test", "--http1.1", "-H", f"Host: UPSTREAM.test:{port}")
    assert r.status == 200, r.body


def test_absolute_form_target_must_match_host(bound):
    """``GET http://other/ HTTP/1.1`` with ``Host: upstream.test``: an upstream
    routes by the absolute-form authority (RFC 9112 3.2.2), so it must agree
    with the Host that policy checked."""
    env = bound
    p = env.ups.http_port
    for target in (f"http://other.test:{p}/echo/abs-other", "http://169.254.169.254/echo/abs-meta"):
        out = raw_tcp(env, p, f"GET {target} HTTP/1.1\r\nHost: upstream.test:{p}\r\nConnection: close\r\n\r\n")
        assert out["received"].startswith("HTTP/1.1 403"), out
        assert '"destination_mismatch"' in out["received"]
    assert not any("abs-" in path for path in served(env))


def test_absolute_form_target_that_agrees_is_sent_in_origin_form(bound):
    env = bound
    p = env.ups.http_port
    out = raw_tcp(env, p, f"GET http://upstream.test:{p}/echo/abs-ok HTTP/1.1\r\nHost: upstream.test:{p}\r\n"
                          f"Connection: close\r\n\r\n")
    assert out["received"].startswith("HTTP/1.1 200"), out
    assert "/echo/abs-ok" in served(env)  # origin-form, not http://...


# -- 5. SSRF ----------------------------------------------------------------------------------------

def test_ssrf_blocked_in_transparent_mode(bound):
    env = bound
    r = curl_http(env, "/echo/ssrf", "metadata.test")
    assert r.status == 403, r.body
    body = r.json()
    assert body["code"] == "ssrf_blocked", body
    ev = env.gw.decision_for(body["request_id"])
    assert "metadata" in ev["destination"]["classes"]
    assert ev["destination"]["ips"] == ["169.254.169.254"]
    assert "dial" not in ev
    assert ev["request"]["mode"] == "transparent"


def test_ssrf_blocked_over_tls(bound):
    env = bound
    r = curl_https(env, "/echo/ssrf-tls", "metadata.test")
    assert r.status == 403, (r.rc, r.stderr, r.body)
    assert r.json()["code"] == "ssrf_blocked"
    assert "dial" not in env.gw.decision_for(r.json()["request_id"])


def test_literal_address_in_host_header(bound):
    """A Host header naming an address directly is not an allowed host; with
    the metadata address it must be denied whatever the reason."""
    env = bound
    for host in ("169.254.169.254", "127.0.0.1"):
        r = curl_http(env, f"/echo/literal-{host}", host)
        assert r.status == 403, r.body
        assert r.json()["code"] in ("default_deny", "ssrf_blocked")
    assert not any(p.startswith("/echo/literal-") for p in served(env))


# -- 6. non-HTTP TCP ---------------------------------------------------------------------------------

def test_non_http_tcp_is_closed_without_dialing(bound):
    env = bound
    before = env.ups.stats()["requests"]
    n_events = len(decision_events(env))
    for port in (env.sink.port, env.ups.http_port):
        out = raw_tcp(env, port, "SSH-2.0-x\r\n")
        assert out["closed"], out
        assert out["received"] == "", out
    assert env.sink.accepted == [], "the gateway dialed the original destination"
    assert env.ups.stats()["requests"] == before
    new = decision_events(env)[n_events:]
    assert len(new) >= 2
    assert all(e["decision"] == "deny" and e["source"] == env.sb.ns_ip for e in new)
    assert any("non-HTTP" in e["reason"] for e in new)


def test_silent_client_is_not_connected_upstream(bound):
    """A server-speaks-first client (sends nothing): no upstream connection."""
    env = bound
    out = raw_tcp(env, env.sink.port, "", wait=2.0)
    assert out["received"] == ""
    assert env.sink.accepted == []


def test_garbage_http_like_bytes_rejected(bound):
    env = bound
    before = env.ups.stats()["requests"]
    out = raw_tcp(env, env.sink.port, "HELLO THERE\r\n\r\n")
    assert out["closed"], out
    assert not out["received"] or out["received"].startswith("HTTP/1.1 4"), out
    assert env.sink.accepted == []
    assert env.ups.stats()["requests"] == before


# -- explicit mode alongside -------------------------------------------------------------------------

def test_explicit_mode_still_works_alongside(env):
    s = requests.Session()
    s.trust_env = False
    s.proxies = env.gw.proxies(env.gw.mint(TENANT, "explicit-agent"))
    s.verify = str(env.gw.ca_cert)
    r = s.get(f"http://upstream.test:{env.ups.http_port}/echo/explicit")
    assert r.status_code == 200, r.text
    r2 = s.get(f"https://upstream.test:{env.ups.https_port}/echo/explicit-tls")
    assert r2.status_code == 200, r2.text
    ev = last_event(env, "/echo/explicit")
    assert ev["request"]["mode"] == "explicit" and ev["principal"]["via"] == "token"
    # and without a token, explicit mode still answers 407
    s.proxies = env.gw.proxies(None)
    assert s.get(f"http://upstream.test:{env.ups.http_port}/echo/explicit-anon").status_code == 407


def test_explicit_tunnel_absolute_form_target_must_match_host(env):
    """The same absolute-form check inside an explicit-mode CONNECT tunnel."""
    from tests.support.gateway import raw_connect, read_response
    p = env.ups.http_port
    sock, resp = raw_connect(env.gw.proxy_port, f"upstream.test:{p}", env.gw.mint(TENANT, "explicit-agent"))
    with sock:
        assert resp.status == 200
        sock.sendall(f"GET http://other.test:{p}/echo/abs-tunnel HTTP/1.1\r\nHost: upstream.test:{p}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        r = read_response(sock)
    assert r.status == 403 and r.json()["code"] == "destination_mismatch"
    assert "http://other.test:{p}/echo/abs-tunnel".format(p=p) not in served(env)
    assert "/echo/abs-tunnel" not in served(env)
