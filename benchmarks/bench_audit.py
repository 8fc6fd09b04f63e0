"""Gateway throughput with audit export on, next to audit off, in one run.

Gateway processes (``egress gateway run``), all on loopback, same policies
(1,000 generated rules over 100 tenants, as bench_gateway.py), each with its
own state dir:

* ``off``        ``audit.enabled: false`` (the baseline: nothing recorded)
* ``spool``      the durable spool only (fsync interval), no sinks
* ``file+relp``  spool + a rotating file sink + RELP to a real rsyslog
                 (imrelp, writing to a file): every batch acknowledged by rsyslog
* ``file+syslog`` spool + file sink + RFC 5424 over TCP (octet-counted) to the same rsyslog

Load: benchmarks/_load.py, N keep-alive connections over plain HTTP (or
``--proto https``), GET /echo on the aiohttp upstream; rounds rotate the order
of the gateways; medians shown. After the runs the script waits for every sink
to drain and checks that rsyslog received every decision event the gateway
spooled (after de-duplication by event id). Target: throughput loss with file +
one network sink under 5% of audit off.

    python benchmarks/bench_audit.py [--duration 5] [--warmup 1] [--connections 8] [--rounds 5]
                                     [--proto http|https] [--keep-temp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _load  # noqa: E402  (also puts the repo root on sys.path)
import bench_gateway as bg  # noqa: E402

import yaml  # noqa: E402

from gateway.audit.spool import segment_files  # noqa: E402
from tests.support.procs import ManagedProcess, free_port, start_upstreams  # noqa: E402
from tests.support.rsyslog import Rsyslog, missing_reason  # noqa: E402

BIN = Path(sys.executable).parent
NAMES = ("off", "spool", "file+relp", "file+syslog")
TARGET_LOSS = 0.05


def audit_config(name: str, tmp: Path, rs: Rsyslog) -> dict:
    fast: dict = {}  # default delivery settings (batch_wait 0.2 s, ack_interval 1 s)
    archive = {"name": "archive", "type": "file", "path": str(tmp / f"archive-{name.replace('+', '-')}" /
                                                            "audit.jsonl"), **fast}
    if name == "off":
        return {"enabled": False}
    if name == "spool":
        return {}
    if name == "file+relp":
        return {"sinks": [archive, {"name": "rsyslog", "type": "relp", "address": f"127.0.0.1:{rs.relp_port}",
                                    **fast}]}
    return {"sinks": [archive, {"name": "rsyslog", "type": "syslog", "protocol": "tcp",
                                "address": f"127.0.0.1:{rs.tcp_port}", **fast}]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Throughput: audit off vs spool vs file + network sink.")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="runs per gateway; medians shown (default 5)")
    ap.add_argument("--proto", choices=("http", "https"), default="http")
    ap.add_argument("--max-background", type=float, default=0.25)
    ap.add_argument("--keep-temp", action="store_true")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not give the gateways' event-loop threads a CPU of their own (see below)")
    args = ap.parse_args(argv)
    # Pinning: the question is what the audit trail costs the proxy, so each gateway's
    # event-loop thread gets the first CPU to itself and everything else (load client,
    # upstream, rsyslog, the shipper process, the gateways' helper threads) shares the
    # others. Without it, on 2 cores, the scheduler's placement of rsyslog and the
    # shipper next to the proxy thread swings the results by +-10%.
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    if pin:
        os.sched_setaffinity(0, set(cpus[1:]))  # inherited by every process started from here
    why = missing_reason()
    if why:
        print(f"bench_audit: cannot run: {why}", file=sys.stderr)
        return 1

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    t_all = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="egress-bench-audit-"))
    procs: list[ManagedProcess] = []
    upstreams = rs = None
    try:
        upstreams = start_upstreams(tmp / "upstreams")
        rs = Rsyslog(tmp / "rsyslog", relp=True).start()
        policy_dir = tmp / "policies"
        _load.write_policy_dir(policy_dir, _load.generate_sources(
            bg.TENANTS, bg.TOTAL_RULES, extra_rules={bg.BENCH_TENANT: bg.UPSTREAM_RULE}))
        gws = {}
        for name in NAMES:
            state = tmp / f"state-{name.replace('+', '-')}"
            mint = subprocess.run([str(BIN / "egress"), "token", "mint", "--tenant", f"t{bg.BENCH_TENANT}",
                                   "--agent", "bench", "--ttl", "1h", "--state-dir", str(state)],
                                  capture_output=True, text=True, timeout=60)
            if mint.returncode != 0:
                raise bg.BenchError(f"egress token mint failed: {mint.stderr.strip()}")
            cfg = tmp / f"config-{name.replace('+', '-')}.yaml"
            cfg.write_text(yaml.safe_dump({"audit": audit_config(name, tmp, rs)}))
            port = free_port()
            urls = {"http": f"http://{bg.UPSTREAM_NAME}:{upstreams.http_port}/echo",
                    "https": f"https://{bg.UPSTREAM_NAME}:{upstreams.https_port}/echo"}
            proc = ManagedProcess([BIN / "egress", "gateway", "run", "--config", cfg,
                                   "--listen", f"127.0.0.1:{port}", "--policies", policy_dir,
                                   "--state-dir", state, "--no-admin", "--host", f"{bg.UPSTREAM_NAME}=127.0.0.1",
                                   "--upstream-ca", upstreams.ca.cert], tmp / "logs", name=name.replace("+", "-"),
                                  cwd=_load.REPO_ROOT)
            procs.append(proc)
            gws[name] = {"proc": proc, "port": port, "state": state, "urls": urls, "token": mint.stdout.strip(),
                         "ca": state / "ca" / "mitmproxy-ca-cert.pem"}
        for name in NAMES:
            bg.wait_ready(gws[name]["proc"], gws[name]["port"], gws[name]["ca"])
            if pin:  # the event-loop thread only (affinity is per thread): helper threads stay on the others
                os.sched_setaffinity(gws[name]["proc"].pid, {cpus[0]})

        print(f"bench_audit: {args.proto}; {args.connections} keep-alive connections, {args.warmup:g}s warm-up + "
              f"{args.duration:g}s measured per run, {args.rounds} round(s), median shown")
        print("gateways: off (audit.enabled: false) | spool (durable spool only) | file+relp (spool + rotating "
              "file + RELP to a real rsyslog) | file+syslog (spool + file + RFC 5424/TCP to the same rsyslog)")
        if pin:
            print(f"pinned: each gateway's event-loop thread on CPU {cpus[0]}; the load client, upstream, rsyslog, "
                  f"the shipper process and the gateways' helper threads on CPU(s) "
                  f"{','.join(map(str, cpus[1:]))} (--no-pin: unpinned)\n", flush=True)
        else:
            print("unpinned: everything shares this machine's cores\n", flush=True)
        runs: dict[str, list[dict]] = {n: [] for n in NAMES}
        for r in range(args.rounds):
            order = NAMES[r % len(NAMES):] + NAMES[:r % len(NAMES)]
            for name in order:
                g = gws[name]
                if not g["proc"].alive():
                    raise bg.BenchError(f"{name} died:\n{bg._tail(g['proc'])}")
                res = bg.run_client(name, g, args.proto, args, {"proxy": g["proc"].pid,
                                                                 "upstream": upstreams.proc.pid})
                runs[name].append(res)
                print(f"  round {r + 1} {name:<12} {res['rps']:>7.1f} req/s  p50 {bg.fmt(res['p50_ms'], '6.2f')} ms  "
                      f"p99 {bg.fmt(res['p99_ms'], '6.2f')} ms  err {res['errors']}  CPU proxy "
                      f"{bg.fmt(res['cpu'].get('proxy'), '.2f')} background {bg.fmt(bg.background(res), '.2f')}",
                      flush=True)

        def med(vals):
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else None

        agg = {}
        for name, rs_ in runs.items():
            quiet = [x for x in rs_ if (bg.background(x) or 0.0) <= args.max_background] or rs_
            agg[name] = {"rps": med([x["rps"] for x in quiet]), "p50": med([x["p50_ms"] for x in quiet]),
                         "p99": med([x["p99_ms"] for x in quiet]),
                         "us": med([x["cpu"]["proxy"] * x["duration"] / x["ok"] * 1e6 for x in quiet
                                    if x["ok"] and x["cpu"].get("proxy") is not None]),
                         "errors": sum(x["errors"] for x in quiet), "used": f"{len(quiet)}/{len(rs_)}"}

        # delivery check: every spooled event reaches rsyslog (de-duplicated by id)
        print("\nwaiting for the sinks to drain ...", flush=True)
        delivery = {}
        for name in ("file+relp", "file+syslog"):
            state = gws[name]["state"]
            spooled = {json.loads(line)["id"] for f in segment_files(state / "audit")
                       for line in f.read_text().splitlines() if line}
            deadline = time.monotonic() + 60
            while True:
                got = set(rs.event_ids()) & spooled
                if len(got) >= len(spooled) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            delivery[name] = (len(spooled), len(got))

        print()
        hdr = f"{'audit':<13} {'req/s':>8} {'vs off':>7} {'p50 ms':>7} {'p99 ms':>7} {'proxy CPU us/req':>16} " \
              f"{'errors':>6} {'runs':>5}"
        print(hdr)
        print("-" * len(hdr))
        base = agg["off"]["rps"] or 0
        for name in NAMES:
            a = agg[name]
            ratio = (a["rps"] / base) if base and a["rps"] else None
            print(f"{name:<13} {bg.fmt(a['rps'], '.1f'):>8} {bg.fmt(ratio, '.3f'):>7} {bg.fmt(a['p50'], '.2f'):>7} "
                  f"{bg.fmt(a['p99'], '.2f'):>7} {bg.fmt(a['us'], '.0f'):>16} {a['errors']:>6} {a['used']:>5}")
        print()
        for name in ("file+relp", "file+syslog"):
            a = agg[name]
            loss = 1 - a["rps"] / base if base and a["rps"] else None
            cpu_loss = (a["us"] / agg["off"]["us"] - 1) if a["us"] and agg["off"]["us"] else None
            spooled, got = delivery[name]
            print(f"  {name:<12} throughput loss vs audit off = {bg.fmt(loss * 100 if loss is not None else None, '.1f')}%"
                  f" (target < {TARGET_LOSS * 100:.0f}%)  {'PASS' if loss is not None and loss < TARGET_LOSS else 'MISS'}"
                  f"   [proxy CPU per request +{bg.fmt(cpu_loss * 100 if cpu_loss is not None else None, '.1f')}%]"
                  f"   delivered to rsyslog: {got}/{spooled} spooled events"
                  f"{'' if got == spooled else '  INCOMPLETE'}")
        print(f"\ntotal time {time.monotonic() - t_all:.0f}s")
        return 0
    except bg.BenchError as e:
        print(f"bench_audit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_audit: interrupted", file=sys.stderr)
        return 130
    finally:
        for proc in reversed(procs):
            try:
                proc.stop(timeout=5)
            except Exception as e:
                print(f"bench_audit: could not stop {proc.name}: {e}", file=sys.stderr)
        for thing in (rs, upstreams):
            if thing is not None:
                try:
                    thing.stop()
                except Exception as e:
                    print(f"bench_audit: could not stop {thing}: {e}", file=sys.stderr)
        if args.keep_temp:
            print(f"bench_audit: temp dir kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
