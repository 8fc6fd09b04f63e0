"""Prometheus metrics for the gateway (own registry, served by the admin API).

The per-request series (decisions by tenant/agent/rule/decision/code, latency
histograms, bytes) are plain Python counters read by a collector at scrape
time: the proxy's event loop is the only writer, and prometheus-client's locked
Counter/Histogram cost several microseconds per request. Audit spool and sink
series are read from the spool and shipper at scrape time.

Cardinality guard: the first MAX_TENANT_LABELS tenants keep their name (then
``_other``); agents and rules keep theirs while the requests series has fewer
than MAX_REQUEST_SERIES label sets, after which new agents and rules are
counted as ``_other`` (tenant, decision and code stay exact).
"""

from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

MAX_TENANT_LABELS = 1000  # cardinality guard: further tenants are counted as "_other"
MAX_REQUEST_SERIES = 5000  # ... and beyond this many series, new agents and rules too

# Decisions take microseconds; keep resolution there.
SECRET_BUCKETS = (1e-4, 1e-3, 5e-3, 0.025, 0.1, 0.5, 1.0, 5.0)
DECISION_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1)
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Hist:
    """A histogram kept as plain counts (single writer: the event loop)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        h = HistogramMetricFamily(name, doc)
        acc, buckets = 0, []
        for bound, n in zip([*map(str, self.bounds), "+Inf"], list(self.counts)):
            acc += n
            buckets.append((bound, acc))
        h.add_metric([], buckets, self.sum)
        return h


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests: dict[tuple[str, ...], int] = {}  # (tenant, agent, rule, decision, code) labels -> count
        self._decision = _Hist(DECISION_BUCKETS)
        self._upstream = _Hist(LATENCY_BUCKETS)
        self._total = _Hist(LATENCY_BUCKETS)
        self._bytes: dict[tuple[str, str], int] = {}  # (tenant label, direction) -> bytes
        self._statuses: dict[str, int] = {}  # status class -> responses
        self.audit = None  # (spool, shipper), set by the runtime
        self.identity = None  # gateway.identity.IdentityService, set by the runtime
        self.secret_stats = None  # gateway.secrets.store.StoreStats, set by the runtime
        self.lease_count = None  # callable -> number of Vault leases held
        r.register(_HotCollector(self))
        self.identity_failures = Counter("egress_identity_failures", "Requests refused for identity, by reason",
                                         ["reason"], registry=r)
        self.policy_info = Gauge("egress_policy_info", "The active policy set (value 1), by version",
                                 ["version"], registry=r)
        self.policy_rules = Gauge("egress_policy_rules", "Rules in the active policy set", registry=r)
        self.reloads = Counter("egress_policy_reloads", "Policy reloads, by outcome and trigger",
                               ["outcome", "trigger"], registry=r)
        for outcome in ("success", "failure"):  # present at 0, so increase() sees the first failure
            for trigger in ("file-change", "sighup", "admin"):
                self.reloads.labels(outcome, trigger)
        self.reflections = Counter("egress_reflections_scrubbed", "Injected credentials an upstream echoed back, "
                                   "scrubbed before the sandbox could read them, by where", ["where"], registry=r)
        self.audit_failures = Counter("egress_audit_write_failures", "Audit events that could not be written",
                                      registry=r)
        self._tenants: set[str] = set()
        self._keys: dict[tuple, tuple[str, ...]] = {}  # (tenant, agent, rule, decision, code) -> label values
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

    def count(self, tenant: str | None, decision: str, code: str, agent: str | None = None,
              rule: str | None = None) -> None:
        raw = (tenant, agent, rule, decision, code)
        key = self._keys.get(raw)
        if key is None:
            t = self.tenant_label(tenant)
            a, r = agent or "_unknown", rule or "_none"
            if len(self._requests) >= MAX_REQUEST_SERIES and (t, a, r, decision, code) not in self._requests:
                a = r = "_other"
            key = (t, a, r, decision, code)
            if len(self._keys) < 100_000:
                self._keys[raw] = key
        self._requests[key] = self._requests.get(key, 0) + 1

    def observe_decision(self, seconds: float) -> None:
        self._decision.observe(seconds)

    def observe_completion(self, tenant: str | None, status: int, sent: int, received: int,
                           upstream: float, total: float) -> None:
        """Negative timings are unknown (not observed)."""
        t = tenant if tenant in self._tenants else self.tenant_label(tenant)
        b = self._bytes
        k = (t, "sent")
        b[k] = b.get(k, 0) + sent
        k = (t, "received")
        b[k] = b.get(k, 0) + received
        cls = _STATUS_CLASS.get(status // 100, "error")
        self._statuses[cls] = self._statuses.get(cls, 0) + 1
        if upstream >= 0:
            self._upstream.observe(upstream)
        if total >= 0:
            self._total.observe(total)

    def requests_count(self, tenant: str, decision: str, code: str, agent: str | None = None,
                       rule: str | None = None) -> int:
        return sum(n for (t, a, r, d, c), n in self._requests.items() if (t, d, c) == (tenant, decision, code)
                   and (agent is None or a == agent) and (rule is None or r == rule))

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
        c = CounterMetricFamily("egress_requests", "Requests decided, by tenant, agent, rule, decision and code",
                                labels=["tenant", "agent", "rule", "decision", "code"])
        for labels, n in list(m._requests.items()):
            c.add_metric(list(labels), n)
        yield c
        yield m._decision.family("egress_decision_duration_seconds",
                                 "Time spent deciding one request (policy evaluation only)")
        yield m._upstream.family("egress_upstream_duration_seconds",
                                 "Allowed requests: from the request sent upstream to the first response byte")
        yield m._total.family("egress_request_duration_seconds",
                              "Allowed requests: from the first request byte to the last response byte")
        c = CounterMetricFamily("egress_request_body_bytes", "Body bytes of allowed requests, by tenant and "
                                "direction (sent upstream, received from upstream)", labels=["tenant", "direction"])
        for labels, n in list(m._bytes.items()):
            c.add_metric(list(labels), n)
        yield c
        c = CounterMetricFamily("egress_upstream_responses", "Allowed requests by upstream status class",
                                labels=["class"])
        for cls, n in list(m._statuses.items()):
            c.add_metric([cls], n)
        yield c
        if m.audit is not None:
            yield from _audit_families(*m.audit)
        ident = m.identity
        if ident is not None:
            g = GaugeMetricFamily("egress_identity_bindings", "Source-address identity bindings")
            g.add_metric([], len(ident.bindings))
            yield g
            g = GaugeMetricFamily("egress_identity_revoked_tokens", "Revoked tokens not yet expired")
            g.add_metric([], len(ident.revoked))
            yield g
            g = GaugeMetricFamily("egress_identity_principals", "Distinct tenant/agent pairs that made requests "
                                  "since start (capped at 100,000)")
            g.add_metric([], len({(k[0], k[1]) for k in list(m._keys) if k[0] is not None}))
            yield g
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


def _audit_families(spool, shipper):
    segs = spool.segments()
    yield _gauge("egress_audit_spool_bytes", "Bytes in the audit spool's segments", sum(s.size for s in segs))
    yield _gauge("egress_audit_spool_segments", "Segments in the audit spool", len(segs))
    yield _gauge("egress_audit_spool_backlog_bytes", "Spooled bytes the slowest sink has not delivered",
                 spool.pending_bytes())
    yield _gauge("egress_audit_spool_limit_bytes", "audit.max_bytes: the backlog bound",
                 getattr(spool, "max_bytes", 0))
    yield _gauge("egress_audit_spool_full", "1 while the backlog is over its bound (traffic refused "
                 "with on_full=deny)", int(bool(spool.full)))
    yield _gauge("egress_audit_spool_writable", "0 while the spool cannot be written (traffic refused)",
                 int(spool.write_error is None))
    c = CounterMetricFamily("egress_audit_events", "Audit events written to the spool by this process")
    c.add_metric([], spool.written)
    yield c
    c = CounterMetricFamily("egress_audit_spool_dropped_bytes", "Undelivered bytes deleted (on_full=drop_oldest)")
    c.add_metric([], spool.dropped_bytes)
    yield c
    fams = {
        "delivered": CounterMetricFamily("egress_audit_sink_delivered_events", "Events delivered, by sink",
                                         labels=["sink", "type"]),
        "retries": CounterMetricFamily("egress_audit_sink_retries", "Failed delivery attempts retried, by sink",
                                       labels=["sink", "type"]),
        "failed": CounterMetricFamily("egress_audit_sink_failed_events", "Events refused by the receiver and "
                                      "dead-lettered, by sink", labels=["sink", "type"]),
        "up": GaugeMetricFamily("egress_audit_sink_up", "1 if the sink's last delivery succeeded",
                                labels=["sink", "type"]),
        "backlog": GaugeMetricFamily("egress_audit_sink_backlog_bytes", "Spooled bytes not yet delivered, by sink",
                                     labels=["sink", "type"]),
        "backlog_events": GaugeMetricFamily("egress_audit_sink_backlog_events", "Events not yet delivered, by sink",
                                            labels=["sink", "type"]),
        "last": GaugeMetricFamily("egress_audit_sink_last_delivery_timestamp_seconds",
                                  "Unix time of the last successful delivery, by sink", labels=["sink", "type"]),
    }
    for w in shipper.workers:
        lab = [w.sink.name, w.sink.kind]
        st = w.stats
        fams["delivered"].add_metric(lab, st.delivered)
        fams["retries"].add_metric(lab, st.retries)
        fams["failed"].add_metric(lab, st.failed)
        fams["up"].add_metric(lab, int(st.up))
        fams["backlog"].add_metric(lab, w.backlog_bytes())
        fams["backlog_events"].add_metric(lab, w.backlog_events())
        fams["last"].add_metric(lab, st.last_delivery)
    yield from fams.values()


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g
