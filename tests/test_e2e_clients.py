"""Real clients configured only through the standard proxy environment
(``HTTPS_PROXY=http://x:TOKEN@host:port``) and the gateway CA: curl, pip, git,
requests, aiohttp and Node. Each must reach the upstream through the gateway
with its identity, and the token must never arrive upstream."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support.gateway import start_gateway
from tests.support.procs import start_upstreams

POLICY = """\
apiVersion: egress/v1
kind: Policy
name: clients
selector: principal.tenant == "clients"
rules:
  - name: upstream
    action: allow
    when: request.host == "upstream.test"
    allow_internal: ["127.0.0.0/8"]
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    ups = start_upstreams(tmp / "up")
    pol = tmp / "pol"
    pol.mkdir()
    (pol / "p.yaml").write_text(POLICY)
    gw = start_gateway(tmp, pol, hosts={"upstream.test": "127.0.0.1"}, upstream_ca=[ups.ca.cert])
    try:
        yield gw, ups, tmp
    finally:
        gw.stop()
        ups.stop()


def proxy_env(gw, tmp, agent: str) -> tuple[dict, str]:
    tok = gw.mint("clients", agent)
    url = gw.proxy_url(tok)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({"HTTPS_PROXY": url, "https_proxy": url, "HTTP_PROXY": url, "http_proxy": url,
                "NO_PROXY": "", "no_proxy": "", "HOME": str(tmp),
                "SSL_CERT_FILE": str(gw.ca_cert), "REQUESTS_CA_BUNDLE": str(gw.ca_cert),
                "PIP_CERT": str(gw.ca_cert), "GIT_SSL_CAINFO": str(gw.ca_cert),
                "NODE_EXTRA_CA_CERTS": str(gw.ca_cert), "CURL_CA_BUNDLE": str(gw.ca_cert)})
    return env, tok


def allowed_for(gw, agent: str, path_prefix: str) -> list[dict]:
    return [e for e in gw.audit_events() if e.get("event") == "decision" and e["decision"] == "allow"
            and e["principal"]["agent"] == agent and e["request"]["path"].startswith(path_prefix)]


def assert_reached(gw, ups, agent, prefix, tok):
    assert any(p.startswith(prefix) for p in ups.stats()["paths"]), ups.stats()["paths"][-5:]
    assert allowed_for(gw, agent, prefix)
    assert tok not in gw.audit_text()


def test_curl(env):
    gw, ups, tmp = env
    e, tok = proxy_env(gw, tmp, "curl")
    r = subprocess.run(["curl", "-sS", "--fail", f"https://upstream.test:{ups.https_port}/echo/curl"],
                       env=e, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    echo = json.loads(r.stdout)
    assert all(k.lower() != "proxy-authorization" for k, _ in echo["headers"])
    assert_reached(gw, ups, "curl", "/echo/curl", tok)


def test_requests_from_environment(env):
    gw, ups, tmp = env
    e, tok = proxy_env(gw, tmp, "requests")
    code = f"import requests; r = requests.get('https://upstream.test:{ups.https_port}/echo/requests'); " \
           "print(r.status_code)"
    r = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "200", r.stderr
    assert_reached(gw, ups, "requests", "/echo/requests", tok)


def test_aiohttp_trust_env(env):
    gw, ups, tmp = env
    e, tok = proxy_env(gw, tmp, "aiohttp")
    code = f"""
import asyncio, ssl, aiohttp
async def main():
    ctx = ssl.create_default_context(cafile={str(gw.ca_cert)!r})
    async with aiohttp.ClientSession(trust_env=True) as s:
        async with s.get('https://upstream.test:{ups.https_port}/echo/aiohttp', ssl=ctx) as r:
            print(r.status)
asyncio.run(main())
"""
    r = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "200", r.stderr
    assert_reached(gw, ups, "aiohttp", "/echo/aiohttp", tok)


def test_pip(env):
    gw, ups, tmp = env
    e, tok = proxy_env(gw, tmp, "pip")
    # The upstream is not a package index; what matters is that pip's request went
    # through the gateway with the token and reached it.
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-d", str(tmp / "dl"),
                    "--index-url", f"https://upstream.test:{ups.https_port}/echo/simple/", "egress-probe-pkg"],
                   env=e, capture_output=True, text=True, timeout=60)
    assert_reached(gw, ups, "pip", "/echo/simple/", tok)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed (apt-get install git)")
def test_git(env):
    gw, ups, tmp = env
    e, tok = proxy_env(gw, tmp, "git")
    e["GIT_TERMINAL_PROMPT"] = "0"
    subprocess.run(["git", "ls-remote", f"https://upstream.test:{ups.https_port}/echo/repo.git"],
                   env=e, capture_output=True, text=True, timeout=30)
    assert_reached(gw, ups, "git", "/echo/repo.git/info/refs", tok)


NODE_CLIENT = r"""
// Node has no built-in support for proxy environment variables before v24
// (NODE_USE_ENV_PROXY); this is what proxy agents do: CONNECT with the
// credentials from HTTPS_PROXY, then TLS to the target through the tunnel.
const http = require('http'), tls = require('tls'), fs = require('fs');
const proxy = new URL(process.env.HTTPS_PROXY);
const [host, port, path] = process.argv.slice(2);
const auth = 'Basic ' + Buffer.from(decodeURIComponent(proxy.username) + ':' +
                                    decodeURIComponent(proxy.password)).toString('base64');
const req = http.request({host: proxy.hostname, port: proxy.port, method: 'CONNECT',
                          path: `${host}:${port}`, headers: {'Proxy-Authorization': auth}});
req.on('connect', (res, socket) => {
  if (res.statusCode !== 200) { console.log('CONNECT ' + res.statusCode); process.exit(1); }
  const s = tls.connect({socket, servername: host, ca: fs.readFileSync(process.env.NODE_EXTRA_CA_CERTS)}, () => {
    s.write(`GET ${path} HTTP/1.1\r\nHost: ${host}:${port}\r\nConnection: close\r\n\r\n`);
  });
  let data = '';
  s.on('data', d => data += d);
  s.on('end', () => { console.log(data.split('\r\n')[0]); });
});
req.end();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed (apt-get install nodejs)")
def test_node(env):
    gw, ups, tmp = env
    e, tok = proxy_env(gw, tmp, "node")
    script = tmp / "client.js"
    script.write_text(NODE_CLIENT)
    r = subprocess.run(["node", str(script), "upstream.test", str(ups.https_port), "/echo/node"], env=e,
                       capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "HTTP/1.1 200 OK", r.stdout + r.stderr
    assert_reached(gw, ups, "node", "/echo/node", tok)
