"""The gateway's state and the per-request steps that do not depend on mitmproxy.

``Gateway`` ties together the policy store, identity service, resolver, audit
log and metrics. The mitmproxy addon (gateway.addon) and the admin API
(gateway.admin) are thin shells over it. Every step fails closed: any error
ends in a deny with a structured reason and an audit event.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import celexpr
from gateway.audit.shipper import Shipper
from gateway.audit.shipproc import ShipperProcess
from gateway.audit.spool import NullSpool, Spool, now_iso
from gateway.config import GatewayConfig
from gateway.identity import IdentityResult, IdentityService
from gateway.metrics import Metrics
from gateway.policy.model import (
    ALLOW, CODE_IDENTITY, CODE_INTERNAL_ERROR, CODE_NO_POLICY, DENY, Decision, Destination,
    Principal, Request,
)
from gateway.policy.store import PolicyStore, ReloadResult
from gateway.resolver import Resolver

log = logging.getLogger("egress.gateway")

DECISION_HEADER = "X-Egress-Decision"
REQUEST_ID_HEADER = "X-Egress-Request-Id"
PROXY_REALM = 'Basic realm="egress-gateway", charset="UTF-8"'

# The enforcement self-test run by /readyz: a request that every policy set
# must deny (cloud metadata over a literal address).
CANARY_PRINCIPAL = Principal.make("_canary", "_canary", "", {}, "", "token")
CANARY_REQUEST = Request(host="169.254.169.254", port=80, scheme="http", method="GET",
                         path="/latest/meta-data/", headers={"host": "169.254.169.254"})

# HTTP status for each deny code.
STATUS = {
    "identity_required": 403,
    "policy_deny": 403,
    "default_deny": 403,
    "ssrf_blocked": 403,
    "destination_mismatch": 403,
    "dns_failure": 502,
    "policy_unavailable": 503,
    "internal_error": 500,
    "secret_unavailable": 503,
    "secret_not_granted": 403,
    "plaintext_injection": 403,
    "audit_unavailable": 503,
}
CODE_AUDIT = "audit_unavailable"
_PLAIN_ID = re.compile(r"[0-9a-fA-F-]{1,64}")


_esc = json.encoder.encode_basestring_ascii  # a JSON string literal, quotes included (C implementation)


def deny_decision(code: str, reason: str, version: str, rule: str | None = None) -> Decision:
    return Decision(DENY, code, rule, reason, version)


@dataclass(frozen=True)
class DenyResponse:
    status: int
    headers: dict[str, str]
    body: bytes


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.metrics = Metrics()
        acfg = config.audit
        if acfg.enabled:
            self.audit = Spool(config.audit_dir, segment_bytes=acfg.segment_bytes, max_bytes=acfg.max_bytes,
                               on_full=acfg.on_full, fsync=acfg.fsync, fsync_interval=acfg.fsync_interval,
                               retain_bytes=acfg.retain_bytes, retain_age=acfg.retain_age)
        else:
            log.warning("AUDIT IS OFF (audit.enabled: false): decisions are not recorded")
            self.audit = NullSpool()
        self.audit.on_failure = self.metrics.audit_failures.inc
        self._query_mode = acfg.query_string
        self.engine = celexpr.make_engine(config.engine)
        self.identity = IdentityService(self.state_dir)
        self.resolver = Resolver(config.hosts, self_addresses=config.self_addresses)
        self.secrets = build_secret_resolver(config)
        self.metrics.secret_stats = self.secrets.stats
        self.secrets.on_fetch = self._secret_fetched
        try:
            if acfg.enabled and acfg.sinks:  # sinks run in their own process (gateway.audit.shipproc)
                self.shipper = ShipperProcess(self.audit, acfg.sinks, self._resolve_now).start()
            else:
                self.shipper = Shipper(self.audit, [])
        except Exception:
            self.audit.close()
            raise
        self.metrics.audit = (self.audit, self.shipper)
        self.metrics.identity = self.identity
        vault = self.secrets.backends.get("vault")
        if vault is not None:
            self.metrics.lease_count = lambda: len(vault.leases)
        self.store = PolicyStore(config.policies, engine=self.engine, on_reload=self._on_reload)
        self.started = time.time()
        self._own = self._own_endpoints(config)
        self._own_cache: dict[tuple[str, int], bool] = {}
        self._principal_frags: dict[Principal, str] = {}
        self._dest_frags: dict[int, tuple[Destination, str]] = {}
        self._decision_frags: dict[int, tuple[Decision, str]] = {}
        self._fingerprints: dict[str, str] = {}  # policy_version -> policy fingerprint
        self._request_frags: dict[tuple, tuple[str, str]] = {}
        self._secret_frags: dict[tuple, str] = {}

    def _secret_fetched(self, ref, owner: str, ok: bool, seconds: float, lease_id: str, reason: str) -> None:
        """Audit every fetch from a secret backend (cache hits are not fetches): the
        reference by name, for whom, the outcome; never the value."""
        ev = {"event": "secret_fetched", "ref": str(ref), "ok": ok, "ms": round(seconds * 1e3, 3)}
        if owner:
            ev["token_id"] = owner
        if lease_id:
            ev["lease"] = lease_id.rsplit("/", 1)[0]  # the path, not the lease's own id
        if reason:
            ev["reason"] = reason[:300]
        self.audit.write(ev)

    def _resolve_now(self, ref: str) -> str:
        """Resolve a secret reference at start-up (sink credentials), off any running loop."""
        import asyncio
        import concurrent.futures

        from gateway.secrets.refs import parse_ref
        r = parse_ref(ref)
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, self.secrets.resolve(r, owner="_audit")).result(timeout=30)

    @staticmethod
    def _own_endpoints(config: GatewayConfig) -> tuple[frozenset[int], frozenset]:
        """The gateway's own listening ports and addresses: never a destination,
        whatever a policy allows (a sandbox must not reach the admin API)."""
        import ipaddress

        from gateway.config import parse_hostport
        ports, addrs = set(), set()
        for spec in config.mode_specs():
            ports.add(spec.port)
            addrs.add(spec.host)
        if config.admin:
            h, p = parse_hostport(config.admin, "admin")
            ports.add(p)
            addrs.add(h)
        addrs.update(config.self_addresses)
        ips = set()
        for a in addrs:
            try:
                ips.add(ipaddress.ip_address(a))
            except ValueError:
                pass
        return frozenset(ports), frozenset(ips)

    def is_own_endpoint(self, address: str, port: int) -> bool:
        import ipaddress
        ports, ips = self._own
        if port not in ports:
            return False
        hit = self._own_cache.get((address, port))
        if hit is None:
            ip = ipaddress.ip_address(address)
            ip = getattr(ip, "ipv4_mapped", None) or ip
            hit = ip.is_loopback or ip.is_unspecified or ip in ips
            self._own_cache[(address, port)] = hit
        return hit

    # -- policies -------------------------------------------------------------

    def load_policies(self) -> None:
        """Initial load; raises PolicyLoadError (the gateway must not start)."""
        ps = self.store.load_initial()
        self._remember_fingerprint(ps)
        self.metrics.set_policy(ps.version, ps.rule_count)
        self.metrics.reloads.labels("success", "startup").inc()
        self.audit.write({"event": "policy_loaded", "policy_version": ps.version,
                          "policy_fingerprint": ps.fingerprint, "rules": ps.rule_count, "trigger": "startup"})

    def _remember_fingerprint(self, ps) -> None:
        """policy_version -> fingerprint, for the decision events of that set (and of
        the previous ones still finishing requests)."""
        if len(self._fingerprints) >= 64:
            self._fingerprints.clear()
        self._fingerprints[ps.version] = ps.fingerprint

    def _on_reload(self, r: ReloadResult) -> None:
        self.metrics.reloads.labels("success" if r.ok else "failure", r.trigger).inc()
        fp = ""
        if r.ok:
            cur = self.store.current
            self.metrics.set_policy(r.version, cur.rule_count)
            self._remember_fingerprint(cur)
            fp = cur.fingerprint
        self.audit.write({"event": "policy_reload", "ok": r.ok, "changed": r.changed,
                          "policy_version": r.version, "policy_fingerprint": fp, "trigger": r.trigger,
                          "problems": list(r.problems)[:20]})

    def reload(self, trigger: str = "manual") -> ReloadResult:
        return self.store.reload(trigger)

    @property
    def policies(self):
        return self.store.current

    # -- identity ---------------------------------------------------------------

    async def revoke_identity(self, token_id: str) -> list[str]:
        """Revoke a token: no request with it is allowed from now on, and the
        leased secrets it used are dropped and revoked in Vault. Returns the
        lease ids that could not be revoked yet."""
        self.identity.revoke(token_id)
        self.secrets.forget_owner(token_id)
        vault = self.secrets.backends.get("vault-dynamic")
        failed = await vault.revoke_owner(token_id) if vault is not None else []
        self.audit.write({"event": "identity_revoked", "token_id": token_id, "leases_not_revoked": len(failed)})
        return failed

    def identity_failure(self, result: IdentityResult) -> None:
        self.metrics.identity_failures.labels(result.code or "unknown").inc()

    # -- decisions --------------------------------------------------------------

    def decide(self, principal: Principal, request: Request, destination: Destination) -> tuple[Decision, float]:
        """Run the policy decision; never raises. Returns (decision, seconds)."""
        t0 = time.perf_counter()
        ps = self.store.current
        try:
            if not self.store.loaded:
                d = deny_decision(CODE_NO_POLICY, "no policy set is loaded", ps.version)
            else:
                d = ps.decide(principal, request, destination)
                if d.allowed and d.dial and self.is_own_endpoint(d.dial, request.port):
                    d = Decision(DENY, "ssrf_blocked", "ssrf", f"{d.dial}:{request.port} is the gateway itself; "
                                 "its own services are never reachable through it", d.policy_version,
                                 shadow=d.shadow, errors=d.errors, evaluated=d.evaluated)
        except Exception:  # pragma: no cover - the engine is not supposed to raise
            log.exception("policy decision failed")
            d = deny_decision(CODE_INTERNAL_ERROR, "the gateway could not evaluate its policies", ps.version)
        if d.action == ALLOW and not self.audit.accepting:
            # fail closed: nothing goes out that cannot be audited
            d = deny_decision(CODE_AUDIT, self.audit.refusal_reason(), d.policy_version)
        dt = time.perf_counter() - t0
        self.metrics.observe_decision(dt)
        return d, dt

    def _principal_json(self, principal: Principal) -> str:
        frag = self._principal_frags.get(principal)
        if frag is None:
            frag = json.dumps({"tenant": principal.tenant, "agent": principal.agent, "session": principal.session,
                               "labels": dict(principal.labels), "token_id": principal.token_id,
                               "via": principal.source, **_sandbox(principal)}, separators=(",", ":"))
            if len(self._principal_frags) >= 10_000:
                self._principal_frags.clear()
            self._principal_frags[principal] = frag
        return frag

    def _destination_json(self, destination: Destination) -> str:
        hit = self._dest_frags.get(id(destination))
        if hit is not None and hit[0] is destination:
            return hit[1]
        frag = json.dumps({"ips": [c.text for c in destination.addresses],
                           "classes": sorted({c.klass.value for c in destination.addresses}),
                           "via": destination.via}, separators=(",", ":"))
        if len(self._dest_frags) >= 4096:
            self._dest_frags.clear()
        self._dest_frags[id(destination)] = (destination, frag)
        return frag

    def _decision_json(self, d: Decision) -> str:
        """The decision's fields as a JSON fragment (with a trailing comma),
        serialised once per Decision object (decisions are memoised)."""
        hit = self._decision_frags.get(id(d))
        if hit is not None and hit[0] is d:
            return hit[1]
        parts = ['"decision":', _esc(d.action), ',"code":', _esc(d.code), ',"rule":',
                 "null" if d.rule is None else _esc(d.rule), ',"reason":', _esc(d.reason),
                 ',"policy_version":', _esc(d.policy_version), ","]
        fp = self._fingerprints.get(d.policy_version)
        if fp:
            parts += ['"policy_fingerprint":', _esc(fp), ","]
        if d.dial:
            parts += ['"dial":', _esc(d.dial), ","]
        if d.shadow is not None:
            sh = d.shadow
            parts += ['"shadow":', json.dumps({"decision": sh.action, "code": sh.code, "rule": sh.rule},
                                              separators=(",", ":")), ","]
        if d.errors:
            parts += ['"errors":', json.dumps(list(d.errors)[:10]), ","]
        frag = "".join(parts)
        if len(self._decision_frags) >= 4096:
            self._decision_frags.clear()
        self._decision_frags[id(d)] = (d, frag)
        return frag

    def _request_json(self, r: Request) -> tuple[str, str]:
        """The request object as JSON, split around the path (the part that
        varies most): (prefix up to ``"path":``, suffix after it)."""
        key = (r.method, r.scheme, r.host, r.port, r.sni, r.mode)
        hit = self._request_frags.get(key)
        if hit is None:
            hit = ('"request":{"method":' + _esc(r.method) + ',"scheme":' + _esc(r.scheme) + ',"host":'
                   + _esc(r.host) + ',"port":' + str(int(r.port)) + ',"path":',
                   ',"sni":' + _esc(r.sni) + ',"mode":' + _esc(r.mode) + "}")
            if len(self._request_frags) >= 4096:
                self._request_frags.clear()
            self._request_frags[key] = hit
        return hit

    def record(self, *, request_id: str, principal: Principal | None, request: Request | None,
               decision: Decision, source: str = "", destination: Destination | None = None,
               decision_seconds: float = 0.0, identity_code: str = "", secrets: tuple[str, ...] = (),
               status: int = 0) -> bool:
        """Count and audit one decision (allow or deny): one JSON line, composed
        from fragments serialised once per principal, destination, decision and
        request shape (this is on the per-request path). No header values, query
        values redacted by default: they often carry secrets. Returns False when
        the event could not be written (the caller must not forward the request)."""
        if principal is not None:
            self.metrics.count(principal.tenant, decision.action, decision.code, principal.agent, decision.rule)
        else:
            self.metrics.count(None, decision.action, decision.code, None, decision.rule)
        if not self.audit.enabled:  # audit off: nothing to compose (and benchmarks measure it so)
            return True
        parts = ['{"ts":"', now_iso(), '","event":"decision","request_id":', _esc(request_id), ",",
                 self._decision_json(decision), '"source":', _esc(source)]
        if identity_code:
            parts += [',"identity_error":', _esc(identity_code)]
        if status:
            parts += [',"status":', str(status)]
        if request is not None:
            pre, post = self._request_json(request)
            if request.query and self._query_mode != "drop":
                post = ',"query":' + _esc(request.query if self._query_mode == "keep"
                                          else redact_query(request.query)) + post
            parts += [",", pre, _esc(request.path), post]
        if destination is not None and destination.addresses:
            parts += [',"destination":', self._destination_json(destination)]
        if decision_seconds:
            parts += [',"decision_us":', str(round(decision_seconds * 1e6, 1))]
        if secrets:  # references (names), never values
            frag = self._secret_frags.get(secrets)
            if frag is None:
                frag = self._secret_frags[secrets] = json.dumps(list(secrets))
                if len(self._secret_frags) > 4096:
                    self._secret_frags.clear()
            parts += [',"secrets":', frag]
        if principal is not None:
            parts += [',"principal":', self._principal_json(principal)]
        parts.append("}")
        # Written to the kernel now: before the client can read a deny, and before
        # an allowed request's first byte goes upstream (mitmproxy may send on a
        # reused connection within this same loop iteration). Failures are counted
        # by the spool.
        return self.audit.write_line("".join(parts), flush=True)

    def record_completion(self, request_id: str, tenant: str | None, status: int, bytes_sent: int,
                          bytes_received: int, upstream_seconds: float, total_seconds: float,
                          error: str = "") -> None:
        """The end of an allowed request (its decision event, with who and what, was
        written before it went upstream; join on request_id): status, body bytes each
        way and timings (negative: unknown, left out)."""
        self.metrics.observe_completion(tenant, status, bytes_sent, bytes_received, upstream_seconds,
                                        total_seconds)
        if not self.audit.enabled:
            return
        rid = request_id if _PLAIN_ID.fullmatch(request_id) else _esc(request_id)[1:-1]
        line = (f'{{"ts":"{now_iso()}","event":"request_completed","request_id":"{rid}","status":{status:d},'
                f'"bytes_sent":{bytes_sent:d},"bytes_received":{bytes_received:d}')
        if upstream_seconds >= 0:
            line += f',"upstream_ms":{upstream_seconds * 1e3:.3f}'
        if total_seconds >= 0:
            line += f',"total_ms":{total_seconds * 1e3:.3f}'
        if error:
            line += ',"error":' + _esc(error[:300])
        self.audit.write_line(line + "}")

    def deny_response(self, decision: Decision, request_id: str, *, status: int | None = None,
                      proxy_auth: bool = False) -> DenyResponse:
        body = {
            "decision": decision.action,
            "code": decision.code,
            "rule": decision.rule,
            "reason": decision.reason,
            "request_id": request_id,
            "policy_version": decision.policy_version,
        }
        headers = {"Content-Type": "application/json", DECISION_HEADER: "deny",
                   REQUEST_ID_HEADER: request_id, "Cache-Control": "no-store"}
        if proxy_auth:
            headers["Proxy-Authenticate"] = PROXY_REALM
        return DenyResponse(status or (407 if proxy_auth else STATUS.get(decision.code, 403)), headers,
                            (json.dumps(body, indent=1) + "\n").encode())

    # -- readiness --------------------------------------------------------------

    def self_test(self) -> tuple[bool, str]:
        """The canary metadata request must be denied by the active set."""
        if not self.store.loaded:
            return False, "no policy set loaded"
        dest = self.resolver.resolve_static(CANARY_REQUEST.host)
        d, _ = self.decide(CANARY_PRINCIPAL, CANARY_REQUEST, dest)
        if d.action == ALLOW:
            return False, f"enforcement self-test failed: canary request to cloud metadata was allowed by {d.rule}"
        return True, f"canary denied ({d.code})"

    def close(self) -> None:
        self.audit.flush()
        self.shipper.stop(drain=2.0)
        self.audit.close()


def build_secret_resolver(config: GatewayConfig):
    """local:, env: and file: always; vault: and vault-dynamic: when Vault is
    configured (``vault`` settings, or VAULT_ADDR in the environment)."""
    import os

    from gateway.secrets.local import LocalStore
    from gateway.secrets.store import EnvBackend, FileBackend, LocalBackend, SecretResolver
    backends = {"env": EnvBackend(), "file": FileBackend(),
                "local": LocalBackend(LocalStore(config.state_dir))}
    if config.vault or os.environ.get("VAULT_ADDR"):
        from gateway.secrets.vault import VaultBackend, VaultConfig
        vb = VaultBackend(VaultConfig.from_env(**dict(config.vault)))
        backends["vault"] = backends["vault-dynamic"] = vb
    return SecretResolver(backends)


def _sandbox(principal: Principal) -> dict:
    """The sandbox id, when the identity carries one (label ``sandbox``, set by sandboxd)."""
    for k, v in principal.labels:
        if k == "sandbox":
            return {"sandbox_id": v}
    return {}


def redact_query(query: str) -> str:
    """``a=1&token=xyz&flag`` -> ``a=REDACTED&token=REDACTED&flag``: names stay, values go."""
    out = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        out.append(name[:128] + ("=REDACTED" if eq else ""))
    return "&".join(out)[:2048]


def new_request_id() -> str:
    return uuid.uuid4().hex


__all__ = ["Gateway", "DenyResponse", "deny_decision", "new_request_id", "CODE_IDENTITY", "DECISION_HEADER",
           "REQUEST_ID_HEADER"]
