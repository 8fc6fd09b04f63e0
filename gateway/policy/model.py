"""The inputs and outputs of a policy decision: plain values, no I/O.

Treat them as immutable. Principal, Destination and Classification are frozen
(they are hashed and cached); Request, Outcome and Decision are plain slotted
dataclasses because they are built on every request and frozen dataclasses
cost ~0.25 us per field to construct."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Mapping

from gateway.addresses import Classification


@dataclass(frozen=True)
class Principal:
    """Who is asking: from a verified token or a source-address binding."""

    tenant: str
    agent: str
    session: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    token_id: str = ""
    source: str = "token"  # "token" | "binding"

    @staticmethod
    def make(tenant: str, agent: str, session: str = "", labels: Mapping[str, str] | None = None,
             token_id: str = "", source: str = "token") -> "Principal":
        return Principal(tenant, agent, session, tuple(sorted((labels or {}).items())), token_id, source)

    def to_cel(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "agent": self.agent,
            "session": self.session,
            "labels": dict(self.labels),
            "token_id": self.token_id,
            "source": self.source,
        }


@dataclass(slots=True)
class Request:
    """What is being asked for, normalised by the adapter.

    ``host`` is lowercase, without a trailing dot and without brackets; header
    names are lowercase and repeated headers are joined with ", ".
    """

    host: str
    port: int
    scheme: str = "https"  # http | https | ws | wss
    method: str = "GET"
    path: str = "/"
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    sni: str = ""
    mode: str = "explicit"  # explicit | transparent
    at: _dt.datetime | None = None  # request time (UTC); exposed to CEL as ``now``

    def to_cel(self, fields=None, headers=None) -> dict[str, Any]:
        """The CEL value of ``request``, with only ``fields`` (None = all) and
        only the header names in ``headers`` (None = all)."""
        full = {
            "host": self.host, "port": self.port, "scheme": self.scheme,
            "method": self.method, "path": self.path, "query": self.query,
            "sni": self.sni, "mode": self.mode,
        }
        if fields is not None:
            full = {k: v for k, v in full.items() if k in fields}
        if fields is None or "headers" in fields:
            if headers is None:
                full["headers"] = dict(self.headers)
            else:
                h = self.headers
                full["headers"] = {k: h[k] for k in headers if k in h}
        return full


@dataclass(frozen=True)
class Destination:
    """Where the request would go: every address the host resolved to, each
    classified. ``error`` is set when resolution failed (then no addresses)."""

    addresses: tuple[Classification, ...] = ()
    error: str = ""
    via: str = "dns"  # dns | override | literal

    def to_cel(self) -> dict[str, Any]:
        first = self.addresses[0] if self.addresses else None
        return {
            "ip": str(first.address) if first else "",
            "ips": [str(c.address) for c in self.addresses],
            "ip_class": first.klass.value if first else "",
            "internal": any(c.internal for c in self.addresses),
            "via": self.via,
        }


ALLOW = "allow"
DENY = "deny"

# Machine-readable decision codes (the ``code`` of a Decision).
CODE_ALLOWED = "allowed"
CODE_POLICY_DENY = "policy_deny"
CODE_DEFAULT_DENY = "default_deny"
CODE_SSRF = "ssrf_blocked"
CODE_DNS = "dns_failure"
CODE_IDENTITY = "identity_required"
CODE_MISMATCH = "destination_mismatch"
CODE_NO_POLICY = "policy_unavailable"
CODE_INTERNAL_ERROR = "internal_error"
CODE_SECRET_UNAVAILABLE = "secret_unavailable"
CODE_SECRET_NOT_GRANTED = "secret_not_granted"
CODE_PLAINTEXT_INJECTION = "plaintext_injection"


@dataclass(slots=True)
class Outcome:
    action: str  # allow | deny
    code: str
    rule: str | None  # "policy/rule", or None for default deny
    reason: str


@dataclass(slots=True)
class Decision:
    action: str
    code: str
    rule: str | None
    reason: str
    policy_version: str
    dial: str | None = None  # the checked address to connect to (allow only)
    shadow: Outcome | None = None
    errors: tuple[str, ...] = ()  # CEL evaluation errors met on the way (rule: message)
    evaluated: int = 0  # how many expressions ran
    inject: Any = None  # the winning allow rule's Injection (gateway.secrets.inject), if any

    @property
    def allowed(self) -> bool:
        return self.action == ALLOW

    def to_dict(self) -> dict[str, Any]:
        d = {
            "decision": self.action,
            "code": self.code,
            "rule": self.rule,
            "reason": self.reason,
            "policy_version": self.policy_version,
        }
        if self.shadow is not None:
            d["shadow"] = {"decision": self.shadow.action, "code": self.shadow.code,
                           "rule": self.shadow.rule, "reason": self.shadow.reason}
        if self.errors:
            d["errors"] = list(self.errors)
        return d
