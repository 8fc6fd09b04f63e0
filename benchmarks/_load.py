"""Benchmark helpers: policy generation, an asyncio load client, a lean-master runner.

Used by bench_decision.py and bench_gateway.py (``import _load``), and run as a
script for the two subprocesses bench_gateway.py needs::

    python benchmarks/_load.py client --proxy 127.0.0.1:8080 --url http://upstream.test:9000/echo ...
    python benchmarks/_load.py lean --port 8080 --confdir DIR --upstream-ca CA

The load client prints one JSON object on stdout (see ``run_client``).
All traffic goes to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# ---------------------------------------------------------------------------
# Policy generation
# ---------------------------------------------------------------------------

# Rule kinds, assigned round-robin by (tenant + rule index) so every tenant
# count gets the same overall mix.
KINDS = ("exact", "suffix", "path", "header", "deny")

BASELINE_YAML = """\
# Shared guard rails (like policies/default/00-baseline.yaml), selector true.
apiVersion: egress/v1
kind: Policy
name: baseline
description: Guard rails for every tenant.
mode: enforce
selector: "true"
rules:
  - name: no-metadata-hostnames
    action: deny
    when: >
      request.host in ["metadata.google.internal", "metadata.goog",
                       "metadata.azure.com", "instance-data.ec2.internal"]
    reason: Cloud metadata endpoints are never reachable from a sandbox.
  - name: no-trace-methods
    action: deny
    when: request.method in ["TRACE", "TRACK", "DEBUG"]
    reason: Diagnostic HTTP methods are not allowed.
  - name: no-internal-names
    action: deny
    when: request.host.endsWith(".internal") || request.host.endsWith(".corp")
    reason: Internal names are off limits.
"""
BASELINE_RULES = 3


def kind_of(tenant: int, k: int) -> str:
    return KINDS[(tenant + k) % len(KINDS)]


def exact_host(tenant: int, k: int) -> str:
    return f"api-{tenant}-{k}.example.com"


def _rule(tenant: int, k: int) -> str:
    kind = kind_of(tenant, k)
    if kind == "exact":
        return (f"  - name: r{k}-api\n"
                f"    action: allow\n"
                f"    when: request.host == \"{exact_host(tenant, k)}\" && request.method in [\"GET\", \"HEAD\"]\n"
                f"    reason: read access to api {k}\n")
    if kind == "suffix":
        return (f"  - name: r{k}-svc\n"
                f"    action: allow\n"
                f"    when: request.host.endsWith(\".svc-{tenant}-{k}.example.net\") && request.scheme == \"https\"\n")
    if kind == "path":
        return (f"  - name: r{k}-data\n"
                f"    action: allow\n"
                f"    when: >\n"
                f"      request.host == \"data-{tenant}-{k}.example.org\" && request.method == \"GET\"\n"
                f"      && request.path.startsWith(\"/v{k % 3 + 1}/\")\n")
    if kind == "header":
        return (f"  - name: r{k}-hdr\n"
                f"    action: allow\n"
                f"    when: >\n"
                f"      request.host in [\"hdr-{tenant}-{k}.example.com\", \"hdr2-{tenant}-{k}.example.com\"]\n"
                f"      && \"x-api-version\" in request.headers && request.headers[\"x-api-version\"] == \"2\"\n")
    return (f"  - name: r{k}-no-writes\n"
            f"    action: deny\n"
            f"    when: request.host == \"files-{tenant}-{k}.example.com\" && request.method in [\"POST\", \"PUT\", \"DELETE\"]\n"
            f"    reason: files {k} is read-only\n")


def tenant_rule_counts(tenants: int, total_rules: int) -> list[int]:
    base, extra = divmod(total_rules, tenants)
    return [base + (1 if n < extra else 0) for n in range(tenants)]


def generate_sources(tenants: int, total_rules: int = 1000, *,
                     extra_rules: dict[int, str] | None = None) -> list[tuple[str, str]]:
    """(file name, YAML text) pairs: ``00-baseline.yaml`` plus one file per tenant
    ``tN`` with ``total_rules`` tenant rules in all (spread evenly).

    ``extra_rules`` maps a tenant number to YAML rule items that replace that
    many of its generated rules (used for the upstream rule in bench_gateway),
    so the total stays ``total_rules``.
    """
    extra_rules = extra_rules or {}
    sources = [("00-baseline.yaml", BASELINE_YAML)]
    width = len(str(tenants - 1))
    for n, count in enumerate(tenant_rule_counts(tenants, total_rules)):
        extra = extra_rules.get(n, "")
        n_extra = extra.count("  - name:")
        rules = extra + "".join(_rule(n, k) for k in range(n_extra, count))
        text = (f"apiVersion: egress/v1\nkind: Policy\nname: tenant-{n}\n"
                f"selector: principal.tenant == \"t{n}\"\nrules:\n{rules}")
        sources.append((f"10-tenant-{n:0{width}d}.yaml", text))
    return sources


def write_policy_dir(directory: Path, sources: list[tuple[str, str]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in sources:
        (directory / name).write_text(text)


# ---------------------------------------------------------------------------
# Load client
# ---------------------------------------------------------------------------

def system_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (from /proc/stat); None if unavailable."""
    try:
        with open("/proc/stat", "rb") as f:
            first = f.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...
    v = [int(x) for x in first[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all threads), from /proc; None if unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass


async def _read_response(reader: asyncio.StreamReader,
                         connect: bool = False) -> tuple[int, bool, bytes, bytes]:
    """Read one HTTP/1.1 response; returns (status, keep_alive, head, body).
    ``connect``: the answer to a CONNECT (a 2xx has no body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    status = int(status_line[1])
    length = None
    chunked = False
    close = status_line[0] == b"HTTP/1.0"
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"connection":
            v = value.strip().lower()
            if v == b"close":
                close = True
            elif v == b"keep-alive":
                close = False
    body = b""
    if (connect and 200 <= status < 300) or status in (204, 304) or 100 <= status < 200:
        return status, not close, head, body
    if chunked:
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            parts.append((await reader.readexactly(size + 2))[:-2])
        body = b"".join(parts)
    elif length is not None:
        if length:
            body = await reader.readexactly(length)
    else:
        body = await reader.read()  # until EOF
        close = True
    return status, not close, head, body


async def run_client(args) -> dict:
    """Drive ``connections`` keep-alive connections for warm-up + duration seconds.

    Counts only responses completed inside the measuring window; a response
    other than 200 is an error (counted by status), as is any exception
    (counted by type; the connection is then re-opened).
    """
    from urllib.parse import urlsplit

    u = urlsplit(args.url)
    target_host = u.hostname
    target_port = u.port or (443 if u.scheme == "https" else 80)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    proxy_host, _, proxy_port = args.proxy.rpartition(":")
    proxy_port = int(proxy_port)
    authority = f"{target_host}:{target_port}"
    auth = b""
    if args.token:
        cred = base64.b64encode(f"x:{args.token}".encode()).decode()
        auth = f"Proxy-Authorization: Basic {cred}\r\n".encode()
    https = u.scheme == "https"
    if https:
        ctx = ssl.create_default_context(cafile=args.proxy_ca)
        ctx.set_alpn_protocols(["http/1.1"])
        request = (f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n"
                   f"User-Agent: egress-bench\r\nAccept: */*\r\n\r\n").encode()
        connect = (f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n").encode() + auth + b"\r\n"
    else:
        ctx = None
        request = (f"GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n"
                   f"User-Agent: egress-bench\r\nAccept: */*\r\n").encode() + auth + b"\r\n"
        connect = b""

    loop = asyncio.get_running_loop()
    t_start = time.perf_counter()
    t_measure = t_start + args.warmup
    t_end = t_measure + args.duration
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    exceptions: dict[str, int] = {}
    warmup_ok = 0
    connects = 0
    setup_times: list[float] = []
    watch = dict(w.split("=", 1) for w in args.watch)
    cpu_before: dict[str, float | None] = {}
    first_error: list[str] = []

    def note_error(head: bytes, body: bytes) -> None:
        if not first_error:
            first_error.append((head.split(b"\r\n", 1)[0] + b" " + body[:300]).decode("latin-1"))

    async def open_conn() -> _Conn:
        nonlocal connects
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(proxy_host, proxy_port)
        if https:
            writer.write(connect)
            status, _, head, _ = await _read_response(reader, connect=True)
            if status != 200:
                writer.close()
                note_error(head, b"")
                raise ConnectionError(f"CONNECT answered {status}")
            await writer.start_tls(ctx, server_hostname=target_host)
        connects += 1
        setup_times.append(time.perf_counter() - t0)
        return _Conn(reader, writer)

    async def worker() -> None:
        nonlocal warmup_ok
        conn: _Conn | None = None
        perf = time.perf_counter
        while True:
            now = perf()
            if now >= t_end:
                break
            try:
                if conn is None:
                    conn = await asyncio.wait_for(open_conn(), args.timeout)
                t0 = perf()
                conn.writer.write(request)
                status, keep, head, body = await asyncio.wait_for(_read_response(conn.reader), args.timeout)
                t1 = perf()
                if not keep:
                    conn.close()
                    conn = None
            except (Exception, asyncio.TimeoutError) as e:
                t1 = perf()
                if conn is not None:
                    conn.close()
                    conn = None
                if t_measure <= t1 < t_end:
                    name = type(e).__name__
                    exceptions[name] = exceptions.get(name, 0) + 1
                    if not first_error:
                        first_error.append(f"{name}: {e}"[:300])
                await asyncio.sleep(0.05)  # do not spin on a refusing proxy
                continue
            if t_measure <= t1 < t_end:
                if status == 200:
                    latencies.append(t1 - t0)
                else:
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                    note_error(head, body)
            elif t1 < t_measure and status == 200:
                warmup_ok += 1
        if conn is not None:
            conn.close()

    async def sampler() -> dict:
        await asyncio.sleep(max(0.0, t_measure - perf_now()))
        for name, pid in watch.items():
            cpu_before[name] = proc_cpu_seconds(int(pid))
        cpu_before["client"] = time.process_time()
        cpu_before["busy"] = system_busy_seconds()
        real0 = time.perf_counter()
        await asyncio.sleep(max(0.0, t_end - perf_now()))
        real = time.perf_counter() - real0
        out = {}
        for name, pid in watch.items():
            after = proc_cpu_seconds(int(pid))
            b = cpu_before.get(name)
            out[name] = None if after is None or b is None else round((after - b) / real, 3)
        out["client"] = round((time.process_time() - cpu_before["client"]) / real, 3)
        busy = system_busy_seconds()
        if busy is not None and cpu_before["busy"] is not None:
            out["all"] = round((busy - cpu_before["busy"]) / real, 3)  # busy cores, every process
        return out

    perf_now = time.perf_counter
    tasks = [loop.create_task(worker()) for _ in range(args.connections)]
    cpu = await sampler()
    await asyncio.gather(*tasks)
    latencies.sort()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        i = min(len(latencies) - 1, max(0, int(round(p / 100 * len(latencies))) - 1))
        return round(latencies[i] * 1000, 3)

    errors = sum(statuses.values()) + sum(exceptions.values())
    return {
        "ok": len(latencies),
        "rps": round(len(latencies) / args.duration, 1),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "mean_ms": round(sum(latencies) / len(latencies) * 1000, 3) if latencies else None,
        "errors": errors,
        "error_statuses": statuses,
        "error_exceptions": exceptions,
        "warmup_ok": warmup_ok,
        "connects": connects,
        "setup_ms_mean": round(sum(setup_times) / len(setup_times) * 1000, 2) if setup_times else None,
        "cpu": cpu,
        "first_error": first_error[0] if first_error else "",
        "duration": args.duration,
        "connections": args.connections,
    }


def client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="_load.py client")
    p.add_argument("--proxy", required=True, help="proxy HOST:PORT (loopback)")
    p.add_argument("--url", required=True, help="http://host:port/path or https://... (through the proxy)")
    p.add_argument("--token", default="", help="identity token sent as proxy credentials")
    p.add_argument("--proxy-ca", help="CA file the client trusts for intercepted HTTPS")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--watch", action="append", default=[], metavar="NAME=PID",
                   help="report the CPU use of this process during the window")
    args = p.parse_args(argv)
    host = args.proxy.rpartition(":")[0]
    if host not in ("127.0.0.1", "::1", "[::1]", "localhost"):
        p.error("the load client only talks to loopback proxies")
    result = asyncio.run(run_client(args))
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------
# Lean master with no policy and no gateway addon
# ---------------------------------------------------------------------------

def lean_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="_load.py lean")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--confdir", required=True)
    p.add_argument("--upstream-ca", required=True)
    args = p.parse_args(argv)

    from gateway.master import build_master, setup_logging

    async def main() -> None:
        setup_logging(False)
        m = build_master(None, with_gateway_addon=False, modes=[f"regular@{args.host}:{args.port}"],
                         extra_options={"confdir": args.confdir,
                                        "ssl_verify_upstream_trusted_ca": args.upstream_ca})
        setup_logging(False)  # mitmproxy's Master resets the root level (as in run_gateway)
        await m.run()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("client", "lean"):
        print("usage: _load.py {client|lean} ...", file=sys.stderr)
        sys.exit(2)
    cmd, rest = sys.argv[1], sys.argv[2:]
    sys.exit(client_main(rest) if cmd == "client" else lean_main(rest))
