"""Process helpers for end-to-end tests: ports, managed subprocesses, upstreams."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .certs import CertPaths, issue_server_cert, make_test_ca

REPO_ROOT = Path(__file__).resolve().parents[2]

UPSTREAM_NAMES = ["localhost", "upstream.test", "*.upstream.test"]
UPSTREAM_IPS = ["127.0.0.1", "::1"]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (racy by nature)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10) -> None:
    """Block until a TCP connect to ``host:port`` succeeds; TimeoutError if not."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} not accepting connections after {timeout}s: {last}")
        time.sleep(0.05)


class ManagedProcess:
    """A subprocess whose stdout+stderr go to ``<log_dir>/<name>.log``.

    Started in its own session so terminal signals don't reach it. ``stop()``
    sends SIGTERM, then SIGKILL after ``timeout``; usable as a context manager.
    """

    def __init__(
        self,
        args: Sequence[str | os.PathLike[str]],
        log_dir: str | os.PathLike[str],
        *,
        name: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.args = [os.fspath(a) for a in args]
        self.name = name or Path(self.args[0]).name
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        full_env = dict(os.environ if env is None else env)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=os.fspath(cwd) if cwd is not None else None,
                env=full_env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 5) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        return self.popen.returncode

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} rc={self.popen.returncode}>"


@dataclass
class Upstreams:
    """Running upstream servers (see ``tests.support.upstreams``)."""

    host: str
    http_port: int
    https_port: int | None
    ca: CertPaths
    proc: ManagedProcess
    leaf: CertPaths | None = None

    @property
    def _url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def http_url(self) -> str:
        return f"http://{self._url_host}:{self.http_port}"

    @property
    def https_url(self) -> str:
        if self.https_port is None:
            raise RuntimeError("upstreams started without TLS")
        return f"https://{self._url_host}:{self.https_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self._url_host}:{self.http_port}/ws"

    @property
    def wss_url(self) -> str:
        if self.https_port is None:
            raise RuntimeError("upstreams started without TLS")
        return f"wss://{self._url_host}:{self.https_port}/ws"

    def seen(self) -> list[dict]:
        """Path and headers of the last requests the upstream received (direct)."""
        return self._get("/__seen")["seen"]

    def stats(self) -> dict:
        """GET /__stats over plain HTTP (direct, never via a proxy)."""
        return self._get("/__stats")

    def _get(self, path: str) -> dict:
        conn = http.client.HTTPConnection(self.host, self.http_port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{path} returned {resp.status}: {body[:200]!r}")
            return json.loads(body)
        finally:
            conn.close()

    def stop(self, timeout: float = 5) -> int:
        return self.proc.stop(timeout)

    def __enter__(self) -> "Upstreams":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_upstreams(
    tmpdir: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    tls: bool = True,
    timeout: float = 15,
) -> Upstreams:
    """Create a test CA + leaf in ``tmpdir`` and start the upstream servers.

    Waits for the ready file; on failure the process is stopped and the error
    carries its log.
    """
    d = Path(tmpdir)
    d.mkdir(parents=True, exist_ok=True)
    ca = make_test_ca(d / "pki")
    leaf = issue_server_cert(ca, d / "pki", UPSTREAM_NAMES, UPSTREAM_IPS, stem="upstream")
    ready = d / "upstreams.ready.json"
    ready.unlink(missing_ok=True)
    args: list[str | os.PathLike[str]] = [
        sys.executable, "-m", "tests.support.upstreams",
        "--host", host, "--http-port", "0", "--ready-file", ready,
    ]
    if tls:
        args += ["--https-port", "0", "--cert", leaf.chain, "--key", leaf.key]
    proc = ManagedProcess(args, d, name="upstreams", cwd=REPO_ROOT)
    deadline = time.monotonic() + timeout
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"upstreams exited with status {proc.returncode} before becoming ready;"
                    f" log:\n{proc.log_text()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"upstreams not ready after {timeout}s; log:\n{proc.log_text()}"
                )
            time.sleep(0.05)
        info = json.loads(ready.read_text())
    except BaseException:
        proc.stop()
        raise
    return Upstreams(
        host=host,
        http_port=info["http"],
        https_port=info["https"],
        ca=ca,
        proc=proc,
        leaf=leaf if tls else None,
    )
