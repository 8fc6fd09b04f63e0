"""Prometheus metrics for the gateway (own registry, served by the admin API)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MAX_TENANT_LABELS = 1000  # cardinality guard: further tenants are counted as "_other"

# Decisions take microseconds; keep resolution there.
DECISION_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("egress_requests", "Requests decided, by tenant, decision and code",
                                ["tenant", "decision", "code"], registry=r)
        self.decision_seconds = Histogram("egress_decision_duration_seconds",
                                          "Time spent deciding one request (policy evaluation only)",
                                          buckets=DECISION_BUCKETS, registry=r)
        self.identity_failures = Counter("egress_identity_failures", "Requests refused for identity, by reason",
                                         ["reason"], registry=r)
        self.policy_info = Gauge("egress_policy_info", "The active policy set (value 1), by version",
                                 ["version"], registry=r)
        self.policy_rules = Gauge("egress_policy_rules", "Rules in the active policy set", registry=r)
        self.reloads = Counter("egress_policy_reloads", "Policy reloads, by outcome and trigger",
                               ["outcome", "trigger"], registry=r)
        self.audit_failures = Counter("egress_audit_write_failures", "Audit events that could not be written",
                                      registry=r)
        self._tenants: set[str] = set()
        self._children: dict[tuple, object] = {}  # (tenant, decision, code) -> counter child
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
        key = (tenant, decision, code)
        child = self._children.get(key)
        if child is None:
            child = self.requests.labels(self.tenant_label(tenant), decision, code)
            if len(self._children) < 100_000:
                self._children[key] = child
        child.inc()

    def set_policy(self, version: str, rules: int) -> None:
        if self._version is not None and self._version != version:
            self.policy_info.remove(self._version)
        self._version = version
        self.policy_info.labels(version).set(1)
        self.policy_rules.set(rules)

    def render(self) -> bytes:
        return generate_latest(self.registry)
