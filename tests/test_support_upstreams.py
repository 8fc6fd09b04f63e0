"""Tests for the end-to-end test support: test PKI and the upstream servers."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
import requests
from websockets.sync.client import connect as ws_connect

from tests.support.certs import issue_server_cert, make_test_ca
from tests.support.procs import (
    REPO_ROOT,
    ManagedProcess,
    free_port,
    start_upstreams,
    wait_for_port,
)


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    ups = start_upstreams(tmp_path_factory.mktemp("upstreams"))
    try:
        yield ups
    finally:
        rc = ups.stop()
        assert rc == 0, ups.proc.log_text()


@pytest.fixture
def session():
    s = requests.Session()
    s.trust_env = False  # never pick up proxy settings from the environment
    with s:
        yield s


def _strict_client_context(cafile) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def test_echo_http(upstreams, session):
    r = session.post(
        f"{upstreams.http_url}/echo/some/path?a=1&b=x%20y",
        data="héllo".encode(),
        headers={"X-Custom-Header": "v1", "x-lower": "v2"},
        timeout=10,
    )
    assert r.status_code == 200
    j = r.json()
    assert j["method"] == "POST"
    assert j["path"] == "/echo/some/path"
    assert j["query"] == "a=1&b=x%20y"
    assert j["body"] == "héllo"
    assert j["scheme"] == "http"
    assert j["client"] == "127.0.0.1"
    assert j["server_port"] == upstreams.http_port
    assert j["host_header"] == f"127.0.0.1:{upstreams.http_port}"
    names = [name for name, _ in j["headers"]]
    assert ["X-Custom-Header", "v1"] in j["headers"]
    assert ["x-lower", "v2"] in j["headers"]
    assert names.index("X-Custom-Header") < names.index("x-lower")


def test_echo_any_method_and_prefix(upstreams, session):
    r = session.request("PATCH", f"{upstreams.http_url}/echoes", timeout=10)
    assert r.status_code == 200
    assert r.json()["method"] == "PATCH"
    assert r.json()["path"] == "/echoes"
    assert r.json()["query"] == ""
    assert session.get(f"{upstreams.http_url}/nope", timeout=10).status_code == 404


def test_https_with_test_ca(upstreams, session):
    r = session.get(f"{upstreams.https_url}/echo?q=1", verify=str(upstreams.ca.cert), timeout=10)
    assert r.status_code == 200
    j = r.json()
    assert j["scheme"] == "https"
    assert j["query"] == "q=1"
    assert j["server_port"] == upstreams.https_port


def test_https_hostname_localhost(upstreams, session):
    r = session.get(
        f"https://localhost:{upstreams.https_port}/echo",
        verify=str(upstreams.ca.cert),
        timeout=10,
    )
    assert r.status_code == 200


def test_https_without_test_ca_fails(upstreams, session):
    with pytest.raises(requests.exceptions.SSLError):
        session.get(f"{upstreams.https_url}/echo", timeout=10)


def test_https_strict_verification(upstreams):
    """Python's VERIFY_X509_STRICT (default from 3.13) accepts the chain."""
    ctx = _strict_client_context(upstreams.ca.cert)
    for server_hostname in ("upstream.test", "api.upstream.test", "localhost", "127.0.0.1"):
        with socket.create_connection(("127.0.0.1", upstreams.https_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection(("127.0.0.1", upstreams.https_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="other.test")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_strict_verify(tmp_path):
    ca = make_test_ca(tmp_path)
    leaf = issue_server_cert(ca, tmp_path, ["upstream.test"], ["127.0.0.1", "::1"])
    for args in (
        ["-x509_strict", "-CAfile", str(ca.cert), str(ca.cert)],
        ["-x509_strict", "-purpose", "sslserver", "-CAfile", str(ca.cert), str(leaf.cert)],
    ):
        out = subprocess.run(["openssl", "verify", *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    assert leaf.chain.read_text().count("BEGIN CERTIFICATE") == 2
    assert ca.chain is None
    assert (leaf.key.stat().st_mode & 0o077) == 0


def test_status(upstreams, session):
    r = session.get(f"{upstreams.http_url}/status/418", timeout=10)
    assert r.status_code == 418
    assert r.json() == {"status": 418}
    assert session.delete(f"{upstreams.http_url}/status/204", timeout=10).status_code == 204


def test_bytes(upstreams, session):
    r = session.get(f"{upstreams.http_url}/bytes/1000", timeout=10)
    assert r.status_code == 200
    assert r.content == b"x" * 1000


def test_slow(upstreams, session):
    r = session.get(f"{upstreams.http_url}/slow/50", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"slept_ms": 50}


def test_websocket_ws(upstreams):
    with ws_connect(upstreams.ws_url, proxy=None, open_timeout=5) as ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "echo:hi"
        ws.send(b"\x00\x01\xff")
        assert ws.recv(timeout=5) == b"\x00\x01\xff"


def test_websocket_wss(upstreams):
    ctx = _strict_client_context(upstreams.ca.cert)
    with ws_connect(upstreams.wss_url, ssl=ctx, proxy=None, open_timeout=5) as ws:
        ws.send("secure")
        assert ws.recv(timeout=5) == "echo:secure"


def test_stats_counts(upstreams, session):
    before = upstreams.stats()
    session.get(f"{upstreams.http_url}/echo/counted-1", timeout=10)
    session.get(f"{upstreams.https_url}/echo/counted-2", verify=str(upstreams.ca.cert), timeout=10)
    after = upstreams.stats()
    assert after["requests"] == before["requests"] + 2
    assert after["paths"][-2:] == ["/echo/counted-1", "/echo/counted-2"]
    assert "/__stats" not in after["paths"]
    assert "/echo/never-sent" not in after["paths"]


def test_stats_keeps_last_200(upstreams, session):
    for i in range(205):
        session.get(f"{upstreams.http_url}/bytes/{i}", timeout=10)
    stats = upstreams.stats()
    assert len(stats["paths"]) == 200
    assert stats["paths"][-1] == "/bytes/204"


def test_plain_only_and_sigterm(tmp_path):
    ups = start_upstreams(tmp_path, tls=False)
    with ups:
        assert ups.https_port is None
        wait_for_port("127.0.0.1", ups.http_port, timeout=5)
        # an open WebSocket must not hold up shutdown
        with ws_connect(ups.ws_url, proxy=None, open_timeout=5) as ws:
            ws.send("x")
            assert ws.recv(timeout=5) == "echo:x"
            assert ups.stats()["requests"] == 1
            t0 = time.monotonic()
            assert ups.stop(timeout=10) == 0
            assert time.monotonic() - t0 < 5
    assert "upstreams ready" in ups.proc.log_text()


def test_port_in_use_fails_loudly(tmp_path):
    port = free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen(1)
        args = [
            sys.executable, "-m", "tests.support.upstreams",
            "--http-port", str(port), "--ready-file", str(tmp_path / "ready.json"),
        ]
        with ManagedProcess(args, tmp_path, name="clash", cwd=REPO_ROOT) as proc:
            assert proc.popen.wait(timeout=15) != 0
    assert "Address already in use" in proc.log_text()
    assert not (tmp_path / "ready.json").exists()


def test_managed_process_sigkill_fallback(tmp_path):
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " print('up', flush=True); time.sleep(60)"
    )
    with ManagedProcess([sys.executable, "-c", script], tmp_path, name="stubborn") as p:
        deadline = time.monotonic() + 10
        while "up" not in p.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.alive()
        rc = p.stop(timeout=0.5)
    assert rc == -signal.SIGKILL
    assert "up" in p.log_text()
