"""Suite-wide checks.

Leak scan: tests that put secret values into the gateway register them with
``register_secret``. When the session ends, every log a gateway process wrote,
every audit file, every metrics snapshot and every captured sandbox response
(``sandbox-responses.log``) under pytest's temporary directory is scanned for
those values; any hit fails the run. The logs of the test
doubles (upstreams, Vault) are not scanned: they are meant to see the secrets.
"""

from __future__ import annotations

import pytest

_SECRETS: set[str] = set()
_TEST_DOUBLE_LOGS = ("upstreams.log", "vault.log")


def register_secret(value: str) -> str:
    _SECRETS.add(value)
    return value


def _scanned_files(base):
    for p in base.rglob("*"):
        if not p.is_file():
            continue
        if p.name.endswith(".log") and p.name not in _TEST_DOUBLE_LOGS:
            yield p
        elif p.name.endswith((".jsonl", ".jsonl.gz")) or p.name.startswith("metrics-snapshot"):
            yield p


def _leftover_shippers(base) -> list[str]:
    """Audit shipper processes started by this session's gateways that are still running
    (a shipper must exit with its gateway, also when the gateway is SIGKILLed)."""
    import os
    import time
    deadline = time.monotonic() + 15
    while True:
        found = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read()
                log = os.readlink(f"/proc/{d}/fd/2")
                state = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"gateway.audit.shipproc" in cmd and log.startswith(str(base)) and state != "Z":
                found.append(f"pid {d} (log {log})")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        try:
            leftover = _leftover_shippers(factory.getbasetemp())
        except Exception:
            leftover = []
        if leftover:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter:
                reporter.write_line("AUDIT SHIPPER PROCESSES LEFT RUNNING:\n  " + "\n  ".join(leftover), red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if not _SECRETS:
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    try:
        base = factory.getbasetemp()
    except Exception:
        return
    leaks, scanned = [], 0
    for path in _scanned_files(base):
        scanned += 1
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = _gunzip_what_is_there(data)
        for value in _SECRETS:
            if value.encode() in data:
                leaks.append(f"{path}: contains a registered secret ({value[:4]}...)")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if leaks:
        if reporter:
            reporter.write_line("LEAK SCAN FAILED:\n  " + "\n  ".join(leaks), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter:
        reporter.write_line(f"leak scan: {len(_SECRETS)} secret value(s), {scanned} log/audit/metrics file(s), "
                            f"no leak")


def _gunzip_what_is_there(data: bytes) -> bytes:
    """Decompress as much as a (possibly truncated or corrupt, on purpose in some
    tests) gzip file holds, member after member; plus the raw bytes, so nothing
    escapes the scan."""
    import zlib
    out, rest = [], data
    while rest:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        pos = 0
        try:
            while pos < len(rest) and not d.eof:
                out.append(d.decompress(rest[pos:pos + 4096]))
                pos += 4096
        except zlib.error:
            break
        if not d.eof:
            break
        rest = d.unused_data + rest[pos:]
    return b"".join(out) + data
