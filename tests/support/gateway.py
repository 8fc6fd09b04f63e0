"""Start a real gateway process (``egress gateway run``) for end-to-end tests,
plus small raw clients for the cases high-level libraries cannot express
(mismatched CONNECT target / SNI / Host)."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gateway import tokens

from .procs import REPO_ROOT, ManagedProcess, free_port, wait_for_port

ADMIN_TOKEN = "test-admin-token-0123456789"


@dataclass
class GatewayProc:
    proc: ManagedProcess
    state_dir: Path
    policies: Path
    proxy_port: int
    admin_port: int
    transparent: tuple[str, int] | None = None
    _key: object = field(default=None, repr=False)

    # -- identity ------------------------------------------------------------
    @property
    def key(self):
        if self._key is None:
            self._key = tokens.load_signing_key(self.state_dir / "identity" / "signing-key.pem")
        return self._key

    def mint(self, tenant: str = "acme", agent: str = "agent-1", **kw) -> str:
        return tokens.mint(self.key, tenant=tenant, agent=agent, **kw)

    def proxy_url(self, token: str | None) -> str:
        return f"http://x:{token}@127.0.0.1:{self.proxy_port}" if token else f"http://127.0.0.1:{self.proxy_port}"

    def proxies(self, token: str | None) -> dict:
        u = self.proxy_url(token)
        return {"http": u, "https": u}

    @property
    def ca_cert(self) -> Path:
        return self.state_dir / "ca" / "mitmproxy-ca-cert.pem"

    # -- admin -----------------------------------------------------------------
    def admin(self, method: str, path: str, body=None, *, auth: bool = True) -> tuple[int, dict | str]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", data=data, method=method,
                                     headers=headers)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=10) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def audit_text(self) -> str:
        """The audit spool's segments, in order, as one text (written synchronously by the gateway)."""
        return audit_text(self.state_dir)

    def audit_events(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_text().splitlines() if line.strip()]

    def decision_for(self, request_id: str) -> dict:
        for ev in self.audit_events():
            if ev.get("request_id") == request_id:
                return ev
        raise AssertionError(f"no audit event for request {request_id}")

    def stop(self) -> int:
        return self.proc.stop()

    def log_text(self) -> str:
        return self.proc.log_text()


def audit_files(state_dir: Path) -> list[Path]:
    from gateway.audit.spool import segment_files
    return segment_files(Path(state_dir) / "audit")


def audit_text(state_dir: Path) -> str:
    return "".join(p.read_text() for p in audit_files(state_dir))


def start_gateway(tmp: Path, policies: Path, *, hosts: dict[str, str] | None = None,
                  upstream_ca: Sequence[Path] = (), extra_args: Sequence[str] = (),
                  transparent: tuple[str, int] | None = None, name: str = "gateway",
                  config: dict | None = None, timeout: float = 30, listen_host: str = "127.0.0.1",
                  proxy_port: int | None = None) -> GatewayProc:
    """The real gateway, explicit mode on ``listen_host:proxy_port`` (default: loopback, a
    free port), optionally also transparent; the admin API always on loopback."""
    tmp = Path(tmp)
    state = tmp / f"{name}-state"
    proxy_port, admin_port = proxy_port or free_port(), free_port()
    args = [sys.executable, "-m", "gateway.cli", "gateway", "run",
            "--listen", f"{listen_host}:{proxy_port}", "--admin", f"127.0.0.1:{admin_port}",
            "--policies", str(policies), "--state-dir", str(state), "--mode", "explicit"]
    if transparent:
        args += ["--mode", f"transparent@{transparent[0]}:{transparent[1]}"]
    for n, a in (hosts or {}).items():
        args += ["--host", f"{n}={a}"]
    for ca in upstream_ca:
        args += ["--upstream-ca", str(ca)]
    if config is not None:
        import yaml
        cfg_path = tmp / f"{name}-config.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        args += ["--config", str(cfg_path)]
    args += list(extra_args)
    env = dict(os.environ, EGRESS_ADMIN_TOKEN=ADMIN_TOKEN)
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(k, None)
    proc = ManagedProcess(args, tmp, name=name, cwd=REPO_ROOT, env=env)
    gw = GatewayProc(proc, state, Path(policies), proxy_port, admin_port, transparent)
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{proc.log_text()}")
        try:
            status, _ = gw.admin("GET", "/readyz", auth=False)
            if status == 200:
                wait_for_port(listen_host, proxy_port, timeout=5)
                return gw
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"gateway not ready after {timeout}s:\n{proc.log_text()}")
        time.sleep(0.1)


# -- raw clients ---------------------------------------------------------------------

def basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"x:{token}".encode()).decode()


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def read_response(sock, *, head_only: bool = False) -> RawResponse:
    f = sock.makefile("rb")
    status_line = f.readline()
    if not status_line:
        raise ConnectionError("connection closed without a response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    body = b""
    if not head_only:
        n = int(headers.get("content-length", "0") or 0)
        if n:
            body = f.read(n)
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(f.readline().strip(), 16)
                if size == 0:
                    f.readline()
                    break
                body += f.read(size)
                f.readline()
    return RawResponse(status, headers, body)


def raw_connect(proxy_port: int, target: str, token: str | None, timeout: float = 10):
    """Open a CONNECT tunnel; returns (socket, RawResponse of the CONNECT)."""
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    auth = f"Proxy-Authorization: {basic(token)}\r\n" if token else ""
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
    return s, read_response(s)


def tls_wrap(sock, ca: Path, sni: str | None):
    ctx = ssl.create_default_context(cafile=str(ca))
    if sni is None or _is_ip(sni):
        ctx.check_hostname = False
    return ctx.wrap_socket(sock, server_hostname=sni)


def _is_ip(s: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def send_request(sock, method: str, path: str, host_header: str, extra: str = "") -> RawResponse:
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host_header}\r\n{extra}Connection: close\r\n\r\n".encode())
    return read_response(sock)
