"""Decision cost of the pure policy engine (no I/O), at 10, 100 and 1,000 tenants.

For each tenant count a policy set of 1,000 tenant rules (spread evenly over
the tenants: one policy per tenant with selector ``principal.tenant == "tN"``,
rules mixing exact hosts, ``endsWith`` suffixes, path and header conditions
and a few denies) plus a shared baseline deny policy (selector ``true``) is
compiled with ``gateway.policy.loader.compile_sources``. Then
``PolicySet.decide()`` is timed call by call (``time.perf_counter_ns``, warm
principal cache) for

* an allowed request (GET to an exact-host allow rule of the tenant), and
* a default-denied request (GET to a host no rule names),

cycling over 8 tenants spread over the range. Each case is timed twice:
"warm", where the decision and the converted CEL input for the values the
candidate rules read are memoised (the engine's normal state under steady
traffic), and "cold", where both memos are emptied before every call so each
decision converts its input and evaluates its rules again (a request whose read
fields were never seen before). Destinations come from
``Resolver(overrides).resolve_static`` with a public documentation-free
address (93.184.216.34); nothing is ever contacted.

The same is timed with the Python reference engine (cel-python) with fewer
iterations, side by side. Targets: p50 <= 20 us per decision, and the 1,000
tenant p50 within 1.2x of the 10 tenant p50. Always exits 0: it reports
PASS/MISS, it does not assert.

    python benchmarks/bench_decision.py [--iterations 20000] [--py-iterations 400] [--no-python]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _load  # noqa: E402  (also puts the repo root on sys.path)

from gateway import celexpr  # noqa: E402
from gateway.policy.loader import compile_sources  # noqa: E402
from gateway.policy.model import Principal, Request  # noqa: E402
from gateway.resolver import Resolver  # noqa: E402

TENANT_COUNTS = (10, 100, 1000)
TOTAL_RULES = 1000
PUBLIC_ADDRESS = "93.184.216.34"  # only classified, never contacted
P50_TARGET_US = 20.0
SCALING_TARGET = 1.2
SAMPLE_TENANTS = 8


def pick_tenants(tenants: int) -> list[tuple[int, int]]:
    """(tenant, rule index of an exact-host allow rule) for up to 8 tenants spread over the range."""
    counts = _load.tenant_rule_counts(tenants, TOTAL_RULES)
    out: list[tuple[int, int]] = []
    step = max(1, tenants // SAMPLE_TENANTS)
    n = 0
    while len(out) < SAMPLE_TENANTS and n < tenants:
        for cand in range(n, min(tenants, n + step)):
            k = next((k for k in range(counts[cand]) if _load.kind_of(cand, k) == "exact"), None)
            if k is not None:
                out.append((cand, k))
                break
        n += step
    return out


def build_cases(tenants: int):
    """{'allow': [(principal, request, destination)], 'deny': [...]} and the expected rule ids."""
    picks = pick_tenants(tenants)
    hosts = []
    for n, k in picks:
        hosts += [_load.exact_host(n, k), f"unknown-{n}.example.com"]
    resolver = Resolver({h: [PUBLIC_ADDRESS] for h in hosts})
    cases: dict[str, list] = {"allow": [], "deny": []}
    expect: dict[str, list] = {"allow": [], "deny": []}
    for n, k in picks:
        principal = Principal.make(f"t{n}", "agent-1", "s1", {"team": "bench"}, token_id=f"tok{n}")
        for case, host in (("allow", _load.exact_host(n, k)), ("deny", f"unknown-{n}.example.com")):
            req = Request(host=host, port=443, scheme="https", method="GET", path="/v1/items",
                          query="page=2", headers={"host": host, "user-agent": "bench/1.0", "accept": "*/*",
                                                   "x-api-version": "2"}, sni=host)
            cases[case].append((principal, req, resolver.resolve_static(host)))
            expect[case].append(f"tenant-{n}/r{k}-api" if case == "allow" else None)
    return cases, expect


def time_decide(ps, triples, iterations: int, cold: bool = False) -> list[int]:
    """Nanoseconds per decide() call, cycling over ``triples``; with ``cold``
    the memoised CEL inputs are dropped before each call (not timed)."""
    decide = ps.decide
    memos = [getattr(ps, "_acts", {}), getattr(ps, "_decisions", {})] if cold else None
    clock = time.perf_counter_ns
    m = len(triples)
    for i in range(max(200, iterations // 10)):  # warm-up: principal plans, caches, branch predictors
        p, r, d = triples[i % m]
        decide(p, r, d)
    out = [0] * iterations
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in range(iterations):
            p, r, d = triples[i % m]
            if memos is not None:
                for memo in memos:
                    memo.clear()
            t0 = clock()
            decide(p, r, d)
            out[i] = clock() - t0
    finally:
        if gc_was:
            gc.enable()
    return out


def summary(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)
    n = len(s)

    def q(p: float) -> float:
        return s[min(n - 1, max(0, int(round(p * n)) - 1))] / 1000

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "mean": statistics.fmean(s) / 1000, "n": n}


def time_activation(ps, triples, iterations: int) -> list[int] | None:
    """Nanoseconds to build the CEL input alone (request dict -> engine activation),
    the part of decide() that does not depend on the rules. Uses PolicySet
    internals; None if they changed."""
    try:
        plans = []
        for p, r, d in triples:
            plan = ps._plan(p)
            plans.append((plan, ps._route(plan, r.host), r, d))
        build = ps._build_activation
        build(*plans[0])
    except Exception:
        return None
    clock = time.perf_counter_ns
    m = len(plans)
    out = [0] * iterations
    for i in range(iterations):
        plan, route, r, d = plans[i % m]
        t0 = clock()
        build(plan, route, r, d)
        out[i] = clock() - t0
    return out


def check(ps, triples, expected) -> tuple[bool, int]:
    ok = True
    evaluated = 0
    for (p, r, d), rule in zip(triples, expected):
        dec = ps.decide(p, r, d)
        evaluated = max(evaluated, dec.evaluated)
        if rule is None:
            ok &= (not dec.allowed) and dec.code == "default_deny"
        else:
            ok &= dec.allowed and dec.rule == rule and dec.dial == PUBLIC_ADDRESS
        ok &= not dec.errors
    return ok, evaluated


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=20000, help="timed calls per case, Rust engine")
    ap.add_argument("--py-iterations", type=int, default=400, help="timed calls per case, Python engine")
    ap.add_argument("--no-python", action="store_true", help="skip the cel-python reference engine")
    args = ap.parse_args(argv)

    engines = [("rust", celexpr.RustEngine, args.iterations)]
    if not args.no_python:
        engines.append(("python", celexpr.PyEngine, args.py_iterations))

    print(f"bench_decision: PolicySet.decide(), {TOTAL_RULES} tenant rules + {_load.BASELINE_RULES} baseline "
          f"rules, warm cache, {SAMPLE_TENANTS} tenants cycled")
    print(f"python {platform.python_version()} on {platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} CPUs available; times in microseconds per decision\n")
    results: dict[tuple[str, int, str], dict] = {}
    activation: dict[str, dict] = {}
    rows = []
    t_all = time.perf_counter()
    for tenants in TENANT_COUNTS:
        sources = _load.generate_sources(tenants, TOTAL_RULES)
        cases, expect = build_cases(tenants)
        for ename, factory, iters in engines:
            t0 = time.perf_counter()
            ps = compile_sources(sources, engine=factory())
            compile_s = time.perf_counter() - t0
            for case in ("allow", "deny"):
                ok, evaluated = check(ps, cases[case], expect[case])
                for temp in ("warm", "cold"):
                    s = summary(time_decide(ps, cases[case], iters, cold=temp == "cold"))
                    results[(ename, tenants, f"{case}-{temp}")] = s
                    rows.append((ename, tenants, len(ps.policies), ps.rule_count, f"{case}-{temp}", s, evaluated,
                                 "ok" if ok else "WRONG", compile_s))
            if tenants == 100:
                act = time_activation(ps, cases["allow"], min(iters, 5000))
                if act is not None:
                    activation[ename] = summary(act)
            del ps

    hdr = (f"{'engine':<7} {'tenants':>7} {'policies':>8} {'rules':>6} {'request':<10} "
           f"{'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8} {'calls':>6} {'exprs':>5} {'result':<6} {'compile':>8}")
    print(hdr)
    print("-" * len(hdr))
    for ename, tenants, npol, nrules, case, s, evaluated, verdict, compile_s in rows:
        print(f"{ename:<7} {tenants:>7} {npol:>8} {nrules:>6} {case:<10} {s['p50']:>8.2f} {s['p90']:>8.2f} "
              f"{s['p99']:>8.2f} {s['mean']:>8.2f} {s['n']:>6} {evaluated:>5} {verdict:<6} {compile_s:>7.2f}s")
    print("(exprs: CEL expressions evaluated per decision; result: decision matched the expected rule/code)\n")

    print("targets (Rust engine, the one the gateway uses):")
    cases_all = ("allow-warm", "allow-cold", "deny-warm", "deny-cold")
    for case in cases_all:
        small, big = results[("rust", 10, case)], results[("rust", 1000, case)]
        ratio = big["p50"] / small["p50"]
        print(f"  {case:<10}  p50 1000 vs 10 tenants: {big['p50']:.2f} / {small['p50']:.2f} us = {ratio:.2f}x "
              f"(target <= {SCALING_TARGET}x)  {'PASS' if ratio <= SCALING_TARGET else 'MISS'}")
    worst = max(results[("rust", t, c)]["p50"] for t in TENANT_COUNTS for c in cases_all)
    print(f"  p50 per decision, worst case (cold included): {worst:.2f} us (target <= {P50_TARGET_US:.0f} us)  "
          f"{'PASS' if worst <= P50_TARGET_US else 'MISS'}")
    if "rust" in activation:
        a = activation["rust"]
        share = a["p50"] / results[("rust", 100, "allow-cold")]["p50"]
        print(f"  of which building the CEL input (request dict -> engine activation, no rule evaluated): "
              f"p50 {a['p50']:.2f} us = {share:.0%} of a cold allowed decision at 100 tenants")
    if not args.no_python:
        print("\nrust vs python engine (p50 speed-up):")
        for tenants in TENANT_COUNTS:
            parts = []
            for case in ("allow-cold", "deny-cold"):
                r, p = results[("rust", tenants, case)], results[("python", tenants, case)]
                parts.append(f"{case} {p['p50'] / r['p50']:.0f}x")
            print(f"  {tenants:>5} tenants: " + ", ".join(parts))
    if any(r[7] != "ok" for r in rows):
        print("\nWARNING: some decisions did not match the expected outcome (see 'result')")
    print(f"\ntotal time {time.perf_counter() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
