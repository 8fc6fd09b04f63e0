"""The policy decision: a pure function of (principal, request, destination).

Semantics (docs/policy-language.md has the full reference):

* Default deny: nothing is allowed unless an allow rule matches.
* A policy applies to a principal when its ``selector`` is true.
* An enforcing deny that matches beats any allow; the first matching allow
  (files in name order, policies in file order, rules in order) is recorded.
* A CEL error counts as "no match" for an allow rule and as "match" for a deny
  rule (fail closed). A selector that errors applies the policy's deny rules
  but not its allow rules.
* ``shadow`` policies are evaluated and reported (``Decision.shadow``: the
  outcome had they been enforcing) but never decide.
* SSRF: an allowed request whose destination has an internal address (see
  gateway.addresses) is denied unless the winning rule's ``allow_internal``
  lists a range containing every such address (and the internal IPv4
  address embedded in it, if that is what makes it internal).

Speed: the policies that apply to a principal are computed once per principal
and cached; within a policy, rules are indexed by the literal host constraints
in their ``when`` (``request.host == "x"``, ``in [...]``, ``endsWith(...)``) so
only rules that can match the host run; and the CEL input holds only the
request fields some rule reads.
"""

from __future__ import annotations

import datetime as _dt
import operator
from typing import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import celexpr
from gateway.addresses import is_internal
from gateway.policy.model import (
    ALLOW, CODE_ALLOWED, CODE_DEFAULT_DENY, CODE_DNS, CODE_POLICY_DENY, CODE_SSRF, DENY,
    Decision, Destination, Outcome, Principal, Request,
)

VARIABLES = ("principal", "request", "destination", "now")
HOST_PATH = ("request", "host")
TENANT_PATH = ("principal", "tenant")
DEFAULT_DENY_REASON = "no policy allows this request (default deny)"
PRINCIPAL_CACHE_SIZE = 10_000


@dataclass
class CompiledRule:
    name: str
    action: str
    when: Any  # engine expression
    tree: Any  # lark tree (for analysis)
    reason: str
    allow_internal: tuple = ()
    line: int = 0
    # filled in by PolicySet
    id: str = ""
    order: int = 0
    host: celexpr.Constraint | None = None
    use: celexpr.FieldUse | None = None
    inject: Any = None  # gateway.secrets.inject.Injection (allow rules)
    outcome: Outcome | None = None  # what matching this rule decides (built once)
    _covered: dict = field(default_factory=dict, repr=False)  # id(Classification) -> (it, covered)

    def get_outcome(self) -> Outcome:
        o = self.outcome
        if o is None:
            if self.action == DENY:
                o = Outcome(DENY, CODE_POLICY_DENY, self.id, self.reason or f"denied by rule {self.id}")
            else:
                o = Outcome(ALLOW, CODE_ALLOWED, self.id, self.reason or f"allowed by rule {self.id}")
            self.outcome = o
        return o

    def covers(self, address) -> bool:
        return any(address in net for net in self.allow_internal if net.version == address.version)

    def covers_destination(self, c) -> bool:
        """Whether ``allow_internal`` covers one classified address: a listed
        range must contain the address and, when it embeds an internal IPv4
        address (IPv4-mapped, 6to4, NAT64, Teredo...), that IPv4 address too.
        Otherwise ``::ffff:0:0/96`` or ``2002::/16`` would open every internal
        IPv4 address, the metadata service included. Memoised per address."""
        if not self.allow_internal:
            return False
        hit = self._covered.get(id(c))
        if hit is not None and hit[0] is c:
            return hit[1]
        covered = self._covers_destination(c)
        if len(self._covered) >= 4096:
            self._covered.clear()
        self._covered[id(c)] = (c, covered)
        return covered

    def _covers_destination(self, c) -> bool:
        if not self.covers(c.address):
            return False
        effective = getattr(c, "effective", c.address)
        if effective == c.address or not is_internal(effective):
            return True
        return self.covers(effective)


@dataclass
class CompiledPolicy:
    name: str
    file: str
    line: int
    mode: str
    description: str
    selector: Any
    selector_tree: Any
    rules: list[CompiledRule]
    # host index, built by PolicySet
    _exact: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _suffix: tuple[tuple[str, int], ...] = ()
    _unindexed: tuple[int, ...] = ()

    @property
    def shadow(self) -> bool:
        return self.mode == "shadow"

    def build_index(self) -> None:
        exact: dict[str, list[int]] = {}
        suffix: list[tuple[str, int]] = []
        unindexed: list[int] = []
        for i, rule in enumerate(self.rules):
            c = rule.host
            if c is None:
                unindexed.append(i)
                continue
            for h in c.exact:
                exact.setdefault(h, []).append(i)
            for s in c.suffixes:
                suffix.append((s, i))
        self._unindexed = tuple(unindexed)
        # Each exact entry already includes the unindexed rules, in order.
        self._exact = {h: tuple(sorted(set(ix) | set(unindexed))) for h, ix in exact.items()}
        self._suffix = tuple(suffix)

    def candidates(self, host: str) -> tuple[int, ...]:
        """Indices of the rules that can match a request for ``host``, in order."""
        base = self._exact.get(host, self._unindexed)
        if not self._suffix:
            return base
        extra = [i for s, i in self._suffix if host.endswith(s)]
        if not extra:
            return base
        return tuple(sorted(set(base).union(extra)))


@dataclass
class _PrincipalPlan:
    """What is known about a principal once per policy set."""

    policies: tuple[tuple[CompiledPolicy, bool], ...]  # (policy, selector_ok)
    cel: dict[str, Any]
    has_shadow: bool
    errors: tuple[str, ...]
    routes: dict[str, "_Route"] = field(default_factory=dict)  # host -> rules that can match it


@dataclass(eq=False)
class _Route:
    """For one (principal, host): the rules that can match, in order, and only
    the inputs those rules read (converting values for CEL is the main cost)."""

    rules: tuple[tuple[CompiledRule, bool], ...]  # (rule, in a shadow policy)
    request_fields: frozenset[str] | None
    request_headers: frozenset[str] | None
    uses: frozenset[str]
    # The CEL input is a pure function of the values these rules read, so the
    # converted input can be memoised on exactly those values (None: not memoisable).
    key_of: Callable[[Request], tuple] | None = None


def _key_function(fields: frozenset[str] | None, headers: frozenset[str] | None, uses: frozenset[str]):
    if fields is None or headers is None or "now" in uses:
        return None
    names = tuple(sorted(f for f in fields if f != "headers"))
    getter = operator.attrgetter(*names) if names else None
    hnames = tuple(sorted(headers)) if "headers" in fields else ()
    if len(names) == 1:
        if hnames:
            return lambda r: (getter(r), tuple(map(r.headers.get, hnames)))
        return lambda r: (getter(r),)
    if getter is None:
        return lambda r: tuple(map(r.headers.get, hnames))
    if hnames:
        return lambda r: (getter(r), tuple(map(r.headers.get, hnames)))
    return getter


_DEFAULT_DENY = Outcome(DENY, CODE_DEFAULT_DENY, None, DEFAULT_DENY_REASON)
ROUTE_CACHE_SIZE = 1_000  # per principal
ACTIVATION_CACHE_SIZE = 4_096


class PolicySet:
    """An immutable, compiled set of policies with its version (content hash)."""

    def __init__(self, policies: list[CompiledPolicy], version: str, engine, files=()):
        self.policies = policies
        self.version = version
        self.engine = engine
        self.files = list(files)
        self._principal_cache: dict[Principal, _PrincipalPlan] = {}
        self._acts: dict[tuple, tuple] = {}  # memoised CEL inputs (see _Route.key_of)
        self._decisions: dict[tuple, tuple] = {}  # memoised decisions (see decide)
        self._by_tenant: dict[str, list[int]] = {}
        self._any_tenant: list[int] = []
        use = celexpr.FieldUse()
        order = 0
        for pi, pol in enumerate(self.policies):
            c = celexpr.constraint_on(pol.selector_tree, TENANT_PATH)
            if c is not None and c.exact and not c.suffixes:
                for t in c.exact:
                    self._by_tenant.setdefault(t, []).append(pi)
            else:
                self._any_tenant.append(pi)
            for rule in pol.rules:
                rule.id = f"{pol.name}/{rule.name}"
                rule.order = order
                order += 1
                rule.host = celexpr.constraint_on(rule.tree, HOST_PATH)
                rule.use = celexpr.field_use(rule.tree, VARIABLES)
                use.merge(rule.use)
            pol.build_index()
        self.rule_count = order
        # Only these parts of the inputs are converted for CEL.
        self._request_fields = use.fields.get("request", set()) if "request" in use.fields else set()
        self._request_headers = use.headers
        self._uses = use.variables()
        self._principal_fields_rules = use.fields.get("principal", set())

    # -- per principal ------------------------------------------------------

    def _plan(self, principal: Principal) -> _PrincipalPlan:
        plan = self._principal_cache.get(principal)
        if plan is not None:
            return plan
        pcel = principal.to_cel()
        idx = sorted(set(self._by_tenant.get(principal.tenant, ())) | set(self._any_tenant))
        act = self.engine.activation({"principal": pcel})
        chosen = []
        errors = []
        for pi in idx:
            pol = self.policies[pi]
            try:
                value = pol.selector.evaluate(act)
                if value is True:
                    chosen.append((pol, True))
                elif value is not False:
                    errors.append(f"{pol.name}/selector: selector must be a bool, got {type(value).__name__}")
                    chosen.append((pol, False))
            except celexpr.CelEvalError as e:
                errors.append(f"{pol.name}/selector: {e}")
                chosen.append((pol, False))
        fields = self._principal_fields_rules
        pcel_rules = pcel if fields is None else {k: v for k, v in pcel.items() if k in fields}
        plan = _PrincipalPlan(tuple(chosen), pcel_rules, any(p.shadow for p, _ in chosen), tuple(errors))
        if len(self._principal_cache) >= PRINCIPAL_CACHE_SIZE:
            self._principal_cache.clear()
        self._principal_cache[principal] = plan
        return plan

    def applicable(self, principal: Principal) -> list[str]:
        """Names of the policies that apply to ``principal``."""
        return [p.name for p, _ in self._plan(principal).policies]

    # -- decisions ----------------------------------------------------------

    def _route(self, plan: _PrincipalPlan, host: str) -> _Route:
        route = plan.routes.get(host)
        if route is not None:
            return route
        rules = []
        use = celexpr.FieldUse()
        for pol, selector_ok in plan.policies:
            for i in pol.candidates(host):
                rule = pol.rules[i]
                if rule.action != DENY and not selector_ok:
                    continue  # a policy whose selector failed only denies
                rules.append((rule, pol.shadow))
                use.merge(rule.use)
        req = use.fields.get("request", set())
        fields = None if req is None else frozenset(req)
        headers = None if use.headers is None else frozenset(use.headers)
        uses = frozenset(use.fields)
        route = _Route(tuple(rules), fields, headers, uses, _key_function(fields, headers, uses))
        if len(plan.routes) >= ROUTE_CACHE_SIZE:
            plan.routes.clear()
        plan.routes[host] = route
        return route

    def _activation(self, plan: _PrincipalPlan, route: _Route, request: Request, destination: Destination):
        key_of = route.key_of
        if key_of is None:
            return self._build_activation(plan, route, request, destination)
        uses = route.uses
        key = (id(route), key_of(request), id(plan) if "principal" in uses else 0,
               destination if "destination" in uses else None)
        hit = self._acts.get(key)
        if hit is not None and hit[0] is route and hit[1] is plan:
            return hit[2]
        act = self._build_activation(plan, route, request, destination)
        if len(self._acts) >= ACTIVATION_CACHE_SIZE:
            self._acts.clear()
        self._acts[key] = (route, plan, act)
        return act

    def _build_activation(self, plan: _PrincipalPlan, route: _Route, request: Request, destination: Destination):
        variables: dict[str, Any] = {}
        uses = route.uses
        if "request" in uses:
            variables["request"] = request.to_cel(route.request_fields, route.request_headers)
        if "principal" in uses:
            variables["principal"] = plan.cel
        if "destination" in uses:
            variables["destination"] = destination.to_cel()
        if "now" in uses:
            variables["now"] = request.at or _dt.datetime.now(_dt.timezone.utc)
        return self.engine.activation(variables)

    def decide(self, principal: Principal, request: Request, destination: Destination) -> Decision:
        """The decision for one request. Memoised like the CEL input: for a
        (principal, host) route the decision is a pure function of the request
        values its candidate rules read and of the destination, so a request
        that repeats those values gets the same Decision object (treat it as
        immutable). Routes whose rules read ``now`` are never memoised."""
        plan = self._plan(principal)
        route = self._route(plan, request.host)
        key_of = route.key_of
        if key_of is None:
            return self._decide(plan, route, request, destination)
        key = (id(route), key_of(request), id(destination))
        hit = self._decisions.get(key)
        # the entry keeps route and destination alive, so their ids cannot be reused
        if hit is not None and hit[0] is route and hit[1] is destination:
            return hit[2]
        decision = self._decide(plan, route, request, destination)
        if len(self._decisions) >= ACTIVATION_CACHE_SIZE:
            self._decisions.clear()
        self._decisions[key] = (route, destination, decision)
        return decision

    def _decide(self, plan: _PrincipalPlan, route: _Route, request: Request, destination: Destination) -> Decision:
        errors: list[str] = list(plan.errors)
        has_shadow = plan.has_shadow
        act = None
        evaluated = 0
        enf_deny = enf_allow = any_deny = any_allow = None
        for rule, shadow in route.rules:
            is_deny = rule.action == DENY
            if is_deny:
                # a deny matters until the first one of its kind is found
                if (any_deny if shadow else enf_deny) is not None:
                    continue
            else:
                shadow_open = has_shadow and any_deny is None and any_allow is None
                if shadow:
                    if not shadow_open:
                        continue
                elif (enf_deny is not None or enf_allow is not None) and not shadow_open:
                    continue
            if act is None:
                act = self._activation(plan, route, request, destination)
            evaluated += 1
            try:
                value = rule.when.evaluate(act)
                if value is True:
                    matched = True
                elif value is False:
                    matched = False
                else:
                    raise celexpr.CelEvalError(f"when must be a bool, got {type(value).__name__}")
            except celexpr.CelEvalError as e:
                errors.append(f"{rule.id}: {e}")
                matched = is_deny  # fail closed
            if not matched:
                continue
            if is_deny:
                if any_deny is None:
                    any_deny = rule
                if not shadow:
                    enf_deny = rule
                    if not has_shadow:
                        break
            else:
                if any_allow is None:
                    any_allow = rule
                if not shadow and enf_allow is None:
                    enf_allow = rule
        enforced = self._outcome(enf_deny, enf_allow, destination)
        shadow_outcome = None
        if plan.has_shadow:
            shadow_outcome = self._outcome(any_deny, any_allow, destination)
        dial = None
        if enforced.action == ALLOW:
            dial = _dial_address(enf_allow, destination)
        return Decision(enforced.action, enforced.code, enforced.rule, enforced.reason,
                        self.version, dial=dial, shadow=shadow_outcome, errors=tuple(errors),
                        evaluated=evaluated, inject=enf_allow.inject if dial is not None else None)

    @staticmethod
    def _outcome(deny: CompiledRule | None, allow: CompiledRule | None,
                 destination: Destination) -> Outcome:
        if deny is not None:
            return deny.get_outcome()
        if allow is None:
            return _DEFAULT_DENY
        ssrf = ssrf_violation(allow, destination)
        if ssrf is not None:
            return ssrf
        return allow.get_outcome()

    # -- CONNECT pre-check ----------------------------------------------------

    def could_allow(self, principal: Principal, host: str, destination: Destination) -> Outcome | None:
        """Before a TLS handshake: refuse when no enforcing allow rule could
        match this host, or when an internal address is not covered by any
        candidate rule. Returns a deny Outcome, or None (go on)."""
        plan = self._plan(principal)
        candidates = [pol.rules[i] for pol, ok in plan.policies if ok and not pol.shadow
                      for i in pol.candidates(host) if pol.rules[i].action == ALLOW]
        if not candidates:
            return Outcome(DENY, CODE_DEFAULT_DENY, None,
                           f"no policy allows any request to {host} (default deny)")
        if destination.error:
            return Outcome(DENY, CODE_DNS, "dns", destination.error)
        for c in destination.addresses:
            if c.internal and not any(r.covers_destination(c) for r in candidates):
                return _ssrf_outcome(c)
        return None


def _ssrf_outcome(c) -> Outcome:
    return Outcome(DENY, CODE_SSRF, "ssrf",
                   f"destination address {c.address} is {c.klass.value.replace('_', ' ')} "
                   f"and no rule allows that range")


def ssrf_violation(rule: CompiledRule, destination: Destination) -> Outcome | None:
    if destination.error:
        return Outcome(DENY, CODE_DNS, "dns", destination.error)
    if not destination.addresses:
        return Outcome(DENY, CODE_DNS, "dns", "destination did not resolve to any address")
    for c in destination.addresses:
        if c.internal and not rule.covers_destination(c):
            return _ssrf_outcome(c)
    return None


def _dial_address(rule: CompiledRule, destination: Destination) -> str | None:
    for c in destination.addresses:
        if not c.internal or rule.covers_destination(c):
            return c.text
    return None


def empty_policy_set(engine=None, reason: str = "no policies loaded") -> PolicySet:
    """A set that denies everything (used before the first successful load)."""
    return PolicySet([], version="none", engine=engine or celexpr.RustEngine())
