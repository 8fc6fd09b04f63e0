"""Cost of sandboxd's ``isolate`` tier (V8 isolates via mini-racer).

Two fronts are measured: ``worker`` (``IsolateBackend``: isolates in a worker
process, what the daemon uses; create/exec include the pipe round trip; memory
is the worker's RSS) and ``inprocess`` (``InProcessIsolateBackend``).

* create: ``IsolateBackend.create`` (new V8 isolate + its thread, memory limit,
  sandboxd's JavaScript harness, workspace directory), timed one by one over
  ``--creates`` sandboxes (after 5 warm-up creates, which pay V8's one-time
  initialisation); p50/p99.
* memory: RSS of the process before and after ``--idle`` idle isolates exist
  (created, one trivial exec each so they are fully set up), divided by N;
  measured first, before the latency runs, so freed memory is not reused.
* exec: round trip of a trivial exec (``console.log(1)``) on a warm sandbox.
* destroy: ``IsolateBackend.destroy`` p50.

Anchors: create p50 <= 10 ms, <= 2 MB per idle isolate. Always exits 0: it
reports PASS/MISS, it does not assert. No network at all.

    python benchmarks/bench_sandbox_isolate.py [--creates 200] [--idle 200] [--front worker|inprocess|both]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandboxd.tiers.base import Egress, Limits, SandboxSpec  # noqa: E402
from sandboxd.tiers.isolate import InProcessIsolateBackend, IsolateBackend  # noqa: E402

EGRESS = Egress(proxy_host="127.0.0.1", proxy_port=9)  # no token: no network


def rss_mb(b) -> float:
    pids = b.worker_pids() if isinstance(b, IsolateBackend) else ["self"]
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return total


def nthreads(b) -> int:
    pids = b.worker_pids() if isinstance(b, IsolateBackend) else ["self"]
    return sum(len(os.listdir(f"/proc/{pid}/task")) for pid in pids)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def spec(i: int) -> SandboxSpec:
    return SandboxSpec(id=f"bench-{i}", tenant="bench", agent="bench", tier="isolate",
                       limits=Limits(memory_mb=64, exec_timeout_s=10))


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def main(args) -> None:
    fronts = ["worker", "inprocess"] if args.front == "both" else [args.front]
    print(f"isolate tier benchmark  ({platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, mini-racer V8)")
    for front in fronts:
        await bench(front, args)


async def bench(front: str, args) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-isolate-"))
    b = IsolateBackend(root) if front == "worker" else InProcessIsolateBackend(root)
    sink = lambda s, d: None  # noqa: E731

    for i in range(5):  # warm-up: V8 initialisation happens once per process
        await b.create(spec(10_000 + i), EGRESS)
        await b.destroy(f"bench-{10_000 + i}")

    # -- memory per idle isolate ---------------------------------------------------------
    gc.collect()
    await asyncio.sleep(0.2)
    before = rss_mb(b)
    for i in range(args.idle):
        await b.create(spec(20_000 + i), EGRESS)
        await b.exec(f"bench-{20_000 + i}", "state.ready = true", timeout_s=5, on_output=sink)
    gc.collect()
    await asyncio.sleep(0.5)
    after = rss_mb(b)
    per = (after - before) / args.idle
    threads = nthreads(b)
    for i in range(args.idle):
        await b.destroy(f"bench-{20_000 + i}")

    # -- create / destroy latency ----------------------------------------------------
    creates, destroys = [], []
    for i in range(args.creates):
        t = time.perf_counter()
        await b.create(spec(i), EGRESS)
        creates.append((time.perf_counter() - t) * 1000)
    execs = []
    for _ in range(200):
        t = time.perf_counter()
        r = await b.exec("bench-0", "console.log(1)", timeout_s=5, on_output=sink)
        execs.append((time.perf_counter() - t) * 1000)
        assert r.exit_code == 0
    for i in range(args.creates):
        t = time.perf_counter()
        await b.destroy(f"bench-{i}")
        destroys.append((time.perf_counter() - t) * 1000)

    p50, p99 = statistics.median(creates), pct(creates, 99)
    if isinstance(b, IsolateBackend):
        await b.close()
    print(f" front: {front}")
    print(f"  create   n={args.creates:<5} p50 {p50:7.2f} ms   p99 {pct(creates, 99):7.2f} ms   "
          f"(anchor p50 <= 10 ms)  {mark(p50 <= 10)}")
    print(f"  memory   n={args.idle:<5} {per:7.2f} MB per idle isolate (RSS {before:.0f} -> {after:.0f} MB, "
          f"{threads} threads)   (anchor <= 2 MB)  {mark(per <= 2)}")
    print(f"  exec     n=200   p50 {statistics.median(execs):7.2f} ms   p99 {pct(execs, 99):7.2f} ms   "
          "(console.log(1), round trip)")
    print(f"  destroy  n={args.creates:<5} p50 {statistics.median(destroys):7.2f} ms   "
          f"p99 {pct(destroys, 99):7.2f} ms")
    del p99


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--creates", type=int, default=200)
    ap.add_argument("--idle", type=int, default=200)
    ap.add_argument("--front", choices=["worker", "inprocess", "both"], default="both")
    asyncio.run(main(ap.parse_args()))
