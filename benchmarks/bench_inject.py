"""Cost of credential injection, side by side in one run.

Two gateway processes (``egress gateway run``) with the same 1,000-rule policy
set over 100 tenants, differing in one rule: the benchmark tenant's rule for
the upstream either injects an ``Authorization`` header from the local store
(``inject``) or not (``plain``). Intercepted HTTPS (injection needs TLS),
keep-alive connections on a loopback upstream. The secret is fetched once and
then served from the cache (the case the target is about); every response
passes through the reflection scrubber, which is part of the cost.

Two request kinds: ``GET /bytes/512`` (a response that does not echo the
credential: the normal case, and the one the target is about) and ``GET
/echo`` (the upstream echoes every request header back, so every response
carries the credential and is scrubbed and audited: the worst case, shown for
information). Target: injection costs under 5% of throughput.

    python benchmarks/bench_inject.py [--duration 5] [--rounds 3] [--connections 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _load  # noqa: E402  (also puts the repo root on sys.path)
import bench_gateway as bg  # noqa: E402

from gateway.secrets.local import LocalStore  # noqa: E402
from tests.support.procs import ManagedProcess, free_port, start_upstreams  # noqa: E402

TARGET_LOSS = 0.05
RULE = """\
  - name: bench-upstream
    action: allow
    when: request.host == "upstream.test" && request.method in ["GET", "HEAD"]
    allow_internal: ["127.0.0.0/8"]
"""
INJECT = """\
    inject:
      headers:
        authorization: "Bearer ${local:bench/token}"
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    procs = []
    with tempfile.TemporaryDirectory(prefix="egress-bench-inject-") as td:
        tmp = Path(td)
        try:
            ups = start_upstreams(tmp / "up")
            procs.append(ups.proc)
            proxies = {}
            for name, rule in (("plain", RULE), ("inject", RULE + INJECT)):
                pol = tmp / f"pol-{name}"
                _load.write_policy_dir(pol, _load.generate_sources(bg.TENANTS, bg.TOTAL_RULES,
                                                                   extra_rules={bg.BENCH_TENANT: rule}))
                state = tmp / f"state-{name}"
                LocalStore(state).put("bench/token", "bench-secret-" + os.urandom(8).hex())
                port = free_port()
                proc = ManagedProcess([bg.BIN / "egress", "gateway", "run", "--listen", f"127.0.0.1:{port}",
                                       "--policies", pol, "--state-dir", state, "--no-admin",
                                       "--host", "upstream.test=127.0.0.1", "--upstream-ca", ups.ca.cert],
                                      tmp, name=name, cwd=_load.REPO_ROOT)
                procs.append(proc)
                mint = __import__("subprocess").run(
                    [str(bg.BIN / "egress"), "token", "mint", "--tenant", f"t{bg.BENCH_TENANT}", "--agent",
                     "bench", "--state-dir", str(state)], capture_output=True, text=True, timeout=60)
                proxies[name] = {"port": port, "proc": proc, "ca": state / "ca" / "mitmproxy-ca-cert.pem",
                                 "urls": {"https": f"https://upstream.test:{ups.https_port}/bytes/512",
                                          "echo": f"https://upstream.test:{ups.https_port}/echo"},
                                 "token": mint.stdout.strip()}
            for name, px in proxies.items():
                bg.wait_ready(px["proc"], px["port"], px["ca"])
            print(f"bench_inject: intercepted HTTPS, {args.connections} keep-alive connections, "
                  f"{args.warmup:g}s warm-up + {args.duration:g}s measured, {args.rounds} round(s); "
                  f"{bg.TOTAL_RULES} rules over {bg.TENANTS} tenants; 2 CPUs shared with client and upstream\n")
            results = {}
            for kind, label in (("https", "GET /bytes/512 (no reflection)"),
                                ("echo", "GET /echo (every response reflects the credential)")):
                runs = {"plain": [], "inject": []}
                for r in range(args.rounds):
                    order = ("plain", "inject") if r % 2 == 0 else ("inject", "plain")
                    for name in order:
                        px = dict(proxies[name])
                        px["urls"] = {"https": px["urls"][kind]}
                        res = bg.run_client(name, px, "https", args,
                                            {"proxy": px["proc"].pid, "upstream": ups.proc.pid})
                        if res["errors"] or not res["ok"]:
                            raise bg.BenchError(f"{name}: {res['errors']} errors, first: "
                                                f"{res['first_error'][:300]}")
                        runs[name].append(res)
                        print(f"  {kind:<5} round {r + 1} {name:<7} {res['rps']:8.1f} req/s  "
                              f"p50 {res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:6.2f} ms", flush=True)
                results[label] = runs
            print(f"\n{'request':<52} {'plain req/s':>11} {'inject req/s':>12} {'loss':>7}")
            loss_main = None
            for label, runs in results.items():
                med = {n: statistics.median(x["rps"] for x in v) for n, v in runs.items()}
                loss = 1 - med["inject"] / med["plain"]
                loss_main = loss if loss_main is None else loss_main
                print(f"{label:<52} {med['plain']:11.1f} {med['inject']:12.1f} {loss:+7.1%}")
            print(f"\nthroughput loss from injection (cache hit + scrubbing, no reflection): {loss_main:+.1%} "
                  f"(target < {TARGET_LOSS:.0%})  {'PASS' if loss_main < TARGET_LOSS else 'MISS'}")
            return 0
        except bg.BenchError as e:
            print(f"bench_inject: {e}", file=sys.stderr)
            return 1
        finally:
            for p in procs:
                p.stop()


if __name__ == "__main__":
    sys.exit(main())
