"""Prometheus metrics for the gateway (own registry, served by the admin API).

The two per-request series (decisions by tenant/decision/code, decision
latency) are plain Python counters read by a collector at scrape time: the
proxy's event loop is the only writer, and prometheus-client's locked
Counter/Histogram cost several microseconds per request.
"""

from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

MAX_TENANT_LABELS = 1000  # cardinality guard: further tenants are counted as "_other"

# Decisions take microseconds; keep resolution there.
SECRET_BUCKETS = (1e-4, 1e-3, 5e-3, 0.025, 0.1, 0.5, 1.0, 5.0)
DECISION_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests: dict[tuple[str, str, str], int] = {}  # (tenant label, decision, code) -> count
        self._buckets = [0] * (len(DECISION_BUCKETS) + 1)  # last: +Inf
        self.secret_stats = None  # gateway.secrets.store.StoreStats, set by the runtime
        self.lease_count = None  # callable -> number of Vault leases held
        self._decision_sum = 0.0
        r.register(_HotCollector(self))
        self.identity_failures = Counter("egress_identity_failures", "Requests refused for identity, by reason",
                                         ["reason"], registry=r)
        self.policy_info = Gauge("egress_policy_info", "The active policy set (value 1), by version",
                                 ["version"], registry=r)
        self.policy_rules = Gauge("egress_policy_rules", "Rules in the active policy set", registry=r)
        self.reloads = Counter("egress_policy_reloads", "Policy reloads, by outcome and trigger",
                               ["outcome", "trigger"], registry=r)
        self.reflections = Counter("egress_reflections_scrubbed", "Injected credentials an upstream echoed back, "
                                   "scrubbed before the sandbox could read them, by where", ["where"], registry=r)
        self.audit_failures = Counter("egress_audit_write_failures", "Audit events that could not be written",
                                      registry=r)
        self._tenants: set[str] = set()
        self._keys: dict[tuple, tuple[str, str, str]] = {}  # (tenant, decision, code) -> label values
        self._version: str | None = None

    def tenant_label(self, tenant: str | None) -> str:
        if not tenant:
            return "_unknown"
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) < MAX_TENANT_LABELS:
            self._tenants.add(tenant)
            return tenant
        return "_other"

    def count(self, tenant: str | None, decision: str, code: str) -> None:
        key = self._keys.get((tenant, decision, code))
        if key is None:
            key = (self.tenant_label(tenant), decision, code)
            if len(self._keys) < 100_000:
                self._keys[(tenant, decision, code)] = key
        self._requests[key] = self._requests.get(key, 0) + 1

    def observe_decision(self, seconds: float) -> None:
        self._buckets[bisect.bisect_left(DECISION_BUCKETS, seconds)] += 1
        self._decision_sum += seconds

    def requests_count(self, tenant: str, decision: str, code: str) -> int:
        return self._requests.get((tenant, decision, code), 0)

    def set_policy(self, version: str, rules: int) -> None:
        if self._version is not None and self._version != version:
            self.policy_info.remove(self._version)
        self._version = version
        self.policy_info.labels(version).set(1)
        self.policy_rules.set(rules)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _HotCollector:
    """Exposes the per-request series kept in plain Python counters."""

    def __init__(self, m: Metrics):
        self.m = m

    def describe(self):
        return []

    def collect(self):
        m = self.m
        c = CounterMetricFamily("egress_requests", "Requests decided, by tenant, decision and code",
                                labels=["tenant", "decision", "code"])
        for labels, n in list(m._requests.items()):
            c.add_metric(list(labels), n)
        yield c
        h = HistogramMetricFamily("egress_decision_duration_seconds",
                                  "Time spent deciding one request (policy evaluation only)")
        acc, buckets = 0, []
        for bound, n in zip([*map(str, DECISION_BUCKETS), "+Inf"], list(m._buckets)):
            acc += n
            buckets.append((bound, acc))
        h.add_metric([], buckets, m._decision_sum)
        yield h
        st = getattr(m, "secret_stats", None)
        if st is not None:
            for name, doc, value in (("egress_secret_cache_hits", "Secret lookups served from the cache", st.hits),
                                     ("egress_secret_cache_misses", "Secret lookups that needed a fetch", st.misses),
                                     ("egress_secret_stale_served", "Secret values served stale after a failed "
                                                                    "refresh (bounded)", st.stale),
                                     ("egress_secret_fetch_errors", "Secret fetches that failed", st.errors)):
                c = CounterMetricFamily(name, doc)
                c.add_metric([], value)
                yield c
            fs = list(st.fetch_seconds)
            h = HistogramMetricFamily("egress_secret_fetch_duration_seconds",
                                      "Secret fetch latency (recent fetches)")
            acc, buckets = 0, []
            for bound in SECRET_BUCKETS:
                acc = sum(1 for x in fs if x <= bound)
                buckets.append((str(bound), acc))
            buckets.append(("+Inf", len(fs)))
            h.add_metric([], buckets, sum(fs))
            yield h
        leases = getattr(m, "lease_count", None)
        if leases is not None:
            g = GaugeMetricFamily("egress_secret_leases", "Vault leases held for dynamic secrets")
            g.add_metric([], leases())
            yield g
