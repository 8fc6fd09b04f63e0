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
        self.fingerprint = ""  # gateway.policy.canonical: set by the loader
        self.policy_fingerprints: dict[str, str] = {}
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

    # -- explain (offline tooling; never on the request path) ------------------

    def explain(self, principal: Principal, request: Request, destination: Destination) -> "Trace":
        """Every policy and rule considered for one request, each expression's
        value (or error), the destination checks and why the winner won.

        Uses the same plan, route, activation and precedence (``_outcome``) as
        ``decide``, and evaluates every candidate rule (even those ``decide``
        skips once the outcome is known). ``Trace.decision`` is
        ``decide(...)``'s own Decision; the trace's independently derived
        outcome is checked against it and any difference is listed in
        ``Trace.mismatches`` (and logged as an error). See ``explain_request``."""
        return explain_request(self, principal, request, destination)

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


# ---------------------------------------------------------------------------
# explain: what decide does, shown step by step (offline tooling only)

EXPLAIN_DOC = "docs/policy-language.md 'How a request is decided'"


@dataclass
class TermTrace:
    """One top-level ``&&``/``||`` term of a ``when``, evaluated on its own
    with the same engine and input (CEL is pure, so the value is the one the
    term has inside the whole expression)."""

    text: str
    value: Any = None
    error: str | None = None


@dataclass
class RuleTrace:
    id: str  # policy/rule
    policy: str
    name: str
    action: str
    when: str
    line: int
    shadow: bool
    # evaluated | not_candidate | selector_failed | policy_not_applicable
    status: str
    note: str = ""
    value: Any = None  # the when's value (evaluated rules)
    error: str | None = None  # the evaluation error (fails closed for deny rules)
    matched: bool | None = None  # after the fail-closed rule; None: not evaluated
    op: str = ""  # "&&" or "||" when ``terms`` is filled
    terms: list[TermTrace] = field(default_factory=list)
    gateway_evaluates: bool = False  # whether PolicySet.decide runs this expression
    role: str = ""  # what this rule did to the outcome (winner, overridden...)

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "policy": self.policy, "rule": self.name, "action": self.action,
             "mode": "shadow" if self.shadow else "enforce", "when": self.when, "line": self.line,
             "status": self.status}
        if self.note:
            d["note"] = self.note
        if self.status == "evaluated":
            d["value"] = _plain(self.value)
            d["error"] = self.error
            d["matched"] = self.matched
            d["gateway_evaluates"] = self.gateway_evaluates
            if self.terms:
                d["op"] = self.op
                d["terms"] = [{"text": t.text, "value": _plain(t.value), "error": t.error} for t in self.terms]
        if self.role:
            d["role"] = self.role
        return d


@dataclass
class PolicyTrace:
    name: str
    file: str
    line: int
    mode: str  # enforce | shadow
    selector: str
    selector_value: Any
    selector_error: str | None
    applicable: bool
    why: str
    rules: list[RuleTrace] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "line": self.line, "mode": self.mode,
                "selector": self.selector, "selector_value": _plain(self.selector_value),
                "selector_error": self.selector_error, "applicable": self.applicable, "why": self.why,
                "rules": [r.to_dict() for r in self.rules]}


@dataclass
class AddressTrace:
    address: str
    klass: str
    internal: bool
    embedded: str = ""  # the embedded IPv4 address that decided the class, if any
    covered: bool | None = None  # by the winning allow rule's allow_internal (None: not checked)
    covered_by: list[str] = field(default_factory=list)  # the ranges that cover it

    def to_dict(self) -> dict[str, Any]:
        d = {"address": self.address, "class": self.klass, "internal": self.internal}
        if self.embedded:
            d["embedded"] = self.embedded
        if self.covered is not None:
            d["covered"] = self.covered
            d["covered_by"] = list(self.covered_by)
        return d


@dataclass
class Trace:
    """The result of ``PolicySet.explain``: see ``Trace.to_dict`` for the JSON form."""

    policy_version: str
    engine: str
    principal: dict[str, Any]
    request: dict[str, Any]
    now: str
    destination: dict[str, Any]
    addresses: list[AddressTrace]
    policies: list[PolicyTrace]
    decision: Decision  # PolicySet.decide's own result
    winner: str | None  # the rule that decided (enforcing deny, or the first allow), None: default deny
    why: list[str]
    checks: list[str]  # the destination checks, in words
    shadow_why: list[str]
    inject: dict[str, Any] | None  # the winning allow rule's secret references (names only)
    mismatches: list[str]  # explain's own derivation vs decide: must stay empty

    @property
    def consistent(self) -> bool:
        return not self.mismatches

    def rules(self) -> list[RuleTrace]:
        return [r for p in self.policies for r in p.rules]

    def to_dict(self) -> dict[str, Any]:
        d = self.decision
        decision = d.to_dict()
        decision["dial"] = d.dial
        decision["evaluated"] = d.evaluated
        return {
            "policy_version": self.policy_version,
            "engine": self.engine,
            "principal": self.principal,
            "request": self.request,
            "now": self.now,
            "destination": {**self.destination, "addresses": [a.to_dict() for a in self.addresses]},
            "policies": [p.to_dict() for p in self.policies],
            "decision": decision,
            "winner": self.winner,
            "why": list(self.why),
            "destination_checks": list(self.checks),
            "shadow_why": list(self.shadow_why),
            "inject": self.inject,
            "consistent": self.consistent,
            "mismatches": list(self.mismatches),
        }


def _plain(value: Any) -> Any:
    """A CEL result as a JSON-able value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return repr(value)
    return str(value)


def _constraint_text(path: str, c: celexpr.Constraint | None) -> str:
    if c is None:
        return ""
    parts = []
    if c.exact:
        vals = sorted(c.exact)
        parts.append(f"{path} == {vals[0]!r}" if len(vals) == 1 else f"{path} in {vals}")
    for s in sorted(c.suffixes):
        parts.append(f"{path}.endsWith({s!r})")
    return " or ".join(parts)


def _evaluate(expr, act) -> tuple[Any, str | None]:
    try:
        return expr.evaluate(act), None
    except celexpr.CelEvalError as e:
        return None, str(e)


def _term_programs(ps: PolicySet, rule: CompiledRule) -> tuple[str, list]:
    """The top-level ``&&`` (else ``||``) terms of a rule's ``when``, each
    compiled on its own with the set's engine: (op, [(text, expr)]). Cached on
    the set; empty when the expression has a single term."""
    cache = ps.__dict__.setdefault("_explain_terms", {})
    hit = cache.get(id(rule))
    if hit is not None and hit[0] is rule:
        return hit[1], hit[2]
    op, out = "", []
    source = getattr(rule.when, "source", None)
    if isinstance(source, str) and rule.tree is not None:
        for op_name, split in (("&&", celexpr._conjuncts), ("||", celexpr._disjuncts)):
            nodes = split(rule.tree)
            if len(nodes) < 2:
                continue
            terms = []
            for node in nodes:
                meta = getattr(node, "meta", None)
                if meta is None or getattr(meta, "empty", True):
                    terms = []
                    break
                text = source[meta.start_pos:meta.end_pos]
                try:
                    terms.append((text, ps.engine.compile(text)))
                except celexpr.CelCompileError:
                    terms = []
                    break
            if terms:
                op, out = op_name, terms
            break
    cache[id(rule)] = (rule, op, out)
    return op, out


def _address_trace(c, rule: CompiledRule | None) -> AddressTrace:
    effective = getattr(c, "effective", c.address)
    a = AddressTrace(c.text, c.klass.value, c.internal,
                     embedded=str(effective) if effective != c.address else "")
    if rule is not None:
        nets = [n for n in rule.allow_internal
                if (n.version == c.address.version and c.address in n)
                or (effective != c.address and n.version == effective.version and effective in n)]
        a.covered_by = [str(n) for n in nets]
        a.covered = rule.covers_destination(c) if c.internal else None
    return a


def _ids(rules) -> str:
    return ", ".join(r.id for r in rules)


def explain_request(ps: PolicySet, principal: Principal, request: Request, destination: Destination) -> Trace:
    """PolicySet.explain (see there)."""
    import dataclasses
    import logging

    if request.at is None:  # fix `now` so that decide and the trace see the same instant
        request = dataclasses.replace(request, at=_dt.datetime.now(_dt.timezone.utc))
    decision = ps.decide(principal, request, destination)
    plan = ps._plan(principal)
    host = request.host
    route = ps._route(plan, host)
    mismatches: list[str] = []
    in_plan = {id(p): ok for p, ok in plan.policies}
    tenant_candidates = set(ps._by_tenant.get(principal.tenant, ())) | set(ps._any_tenant)
    selector_act = ps.engine.activation({"principal": principal.to_cel()})
    act = None
    policies: list[PolicyTrace] = []
    evaluated: list[tuple[RuleTrace, CompiledRule, bool]] = []
    selector_notes: list[str] = []

    for pi, pol in enumerate(ps.policies):
        value, error = _evaluate(pol.selector, selector_act)
        if error is None and not isinstance(value, bool):
            error = f"selector must be a bool, got {type(value).__name__}"
        selector_ok = None
        if pi not in tenant_candidates:
            applicable = False
            pinned = _constraint_text("principal.tenant", celexpr.constraint_on(pol.selector_tree, TENANT_PATH))
            why = f"not a candidate for tenant {principal.tenant!r} (its selector requires {pinned})"
            if value is True:
                mismatches.append(f"policy {pol.name}: the tenant index excluded it but its selector is true")
        elif id(pol) in in_plan:
            applicable = True
            selector_ok = in_plan[id(pol)]
            if selector_ok:
                why = "selector is true"
            else:
                why = f"selector failed ({error}): only its deny rules apply (fail closed)"
                if any(r.action != DENY for r in pol.rules):
                    selector_notes.append(f"policy {pol.name}: the selector failed, so its allow rules were "
                                          "not applied")
            if selector_ok != (error is None and value is True):
                mismatches.append(f"policy {pol.name}: selector value {value!r}/{error} but decide's plan "
                                  f"has selector_ok={selector_ok}")
        else:
            applicable = False
            why = "selector is false"
            if value is not False:
                mismatches.append(f"policy {pol.name}: selector value {value!r}/{error} but decide's plan "
                                  "left the policy out")
        pt = PolicyTrace(pol.name, pol.file, pol.line, pol.mode, getattr(pol.selector, "source", ""),
                         value, error, applicable, why)
        candidates = set(pol.candidates(host)) if applicable else set()
        for i, rule in enumerate(pol.rules):
            rt = RuleTrace(rule.id, pol.name, rule.name, rule.action, getattr(rule.when, "source", ""),
                           rule.line, pol.shadow, "evaluated")
            pt.rules.append(rt)
            if not applicable:
                rt.status = "policy_not_applicable"
                rt.note = "the policy does not apply to this principal"
                continue
            if not selector_ok and rule.action != DENY:
                rt.status = "selector_failed"
                rt.note = "not applied: the policy's selector failed, so only its deny rules apply"
                continue
            if i not in candidates:
                rt.status = "not_candidate"
                pinned = _constraint_text("request.host", rule.host)
                rt.note = f"not a candidate for host {host}" + (f" (its when requires {pinned})" if pinned else "")
                continue
            if act is None:
                act = ps._activation(plan, route, request, destination)
            value, error = _evaluate(rule.when, act)
            if error is None and not isinstance(value, bool):
                error = f"when must be a bool, got {type(value).__name__}"
            rt.value, rt.error = value, error
            rt.matched = value if error is None else rule.action == DENY  # fail closed
            if error is not None:
                rt.note = ("the error counts as a match (deny rules fail closed)" if rule.action == DENY
                           else "the error counts as no match")
            op, terms = _term_programs(ps, rule)
            if terms:
                rt.op = op
                for text, expr in terms:
                    tv, te = _evaluate(expr, act)
                    rt.terms.append(TermTrace(text, tv, te))
            evaluated.append((rt, rule, pol.shadow))
        policies.append(pt)

    if [(id(r), s) for _, r, s in evaluated] != [(id(r), s) for r, s in route.rules]:
        mismatches.append("the rules explain evaluated differ from decide's route for this host: "
                          f"[{_ids(r for _, r, _ in evaluated)}] vs [{_ids(r for r, _ in route.rules)}]")

    # The documented precedence, from every value.
    def first(action: str, shadow_too: bool):
        for rt, rule, shadow in evaluated:
            if rt.matched and rule.action == action and (shadow_too or not shadow):
                return rule
        return None

    enf_deny, enf_allow = first(DENY, False), first(ALLOW, False)
    any_deny, any_allow = first(DENY, True), first(ALLOW, True)

    # Which expressions decide itself runs (it stops once the outcome is known).
    errors = list(plan.errors)
    count = 0
    e_deny = e_allow = a_deny = a_allow = None
    has_shadow = plan.has_shadow
    for rt, rule, shadow in evaluated:
        is_deny = rule.action == DENY
        if is_deny:
            if (a_deny if shadow else e_deny) is not None:
                continue
        else:
            shadow_open = has_shadow and a_deny is None and a_allow is None
            if shadow:
                if not shadow_open:
                    continue
            elif (e_deny is not None or e_allow is not None) and not shadow_open:
                continue
        count += 1
        rt.gateway_evaluates = True
        if rt.error is not None:
            errors.append(f"{rule.id}: {rt.error}")
        if not rt.matched:
            continue
        if is_deny:
            if a_deny is None:
                a_deny = rule
            if not shadow:
                e_deny = rule
                if not has_shadow:
                    break
        else:
            if a_allow is None:
                a_allow = rule
            if not shadow and e_allow is None:
                e_allow = rule
    for rt, _, _ in evaluated:
        if not rt.gateway_evaluates:
            rt.note = (rt.note + "; " if rt.note else "") + \
                "decide does not run it: an earlier rule already fixed the outcome"
    if e_deny is not enf_deny or (enf_deny is None and e_allow is not enf_allow):
        mismatches.append("decide's evaluation order picks a different enforcing winner than the documented "
                          "precedence")
    if has_shadow and (a_deny is not any_deny or (any_deny is None and a_allow is not any_allow)):
        mismatches.append("decide's evaluation order picks a different shadow winner than the documented "
                          "precedence")

    enforced = ps._outcome(enf_deny, enf_allow, destination)
    shadow_outcome = ps._outcome(any_deny, any_allow, destination) if has_shadow else None
    dial = _dial_address(enf_allow, destination) if enforced.action == ALLOW else None
    inject_obj = enf_allow.inject if dial is not None else None

    def cmp(what: str, mine, theirs) -> None:
        if mine != theirs:
            mismatches.append(f"{what}: explain {mine!r} != decide {theirs!r}")

    d = decision
    cmp("decision", (enforced.action, enforced.code, enforced.rule, enforced.reason),
        (d.action, d.code, d.rule, d.reason))
    cmp("policy version", ps.version, d.policy_version)
    cmp("dial", dial, d.dial)
    sh = None if shadow_outcome is None else (shadow_outcome.action, shadow_outcome.code, shadow_outcome.rule,
                                              shadow_outcome.reason)
    dsh = None if d.shadow is None else (d.shadow.action, d.shadow.code, d.shadow.rule, d.shadow.reason)
    cmp("shadow outcome", sh, dsh)
    cmp("errors", tuple(errors), tuple(d.errors))
    cmp("expressions evaluated", count, d.evaluated)
    if inject_obj is not d.inject:
        mismatches.append("injection: explain and decide name different rules' injections")

    # Roles.
    by_rule = {id(rule): rt for rt, rule, _ in evaluated}
    for rt, rule, shadow in evaluated:
        if not rt.matched:
            continue
        if shadow:
            rt.role = "matched (shadow policy: does not decide)"
        elif rule is enf_deny:
            rt.role = "WINNER: first matching enforcing deny"
        elif rule.action == DENY:
            rt.role = f"matched; the first deny {enf_deny.id} is the recorded one"
        elif enf_deny is not None:
            rt.role = f"matched, overridden by the enforcing deny {enf_deny.id}"
        elif rule is enf_allow:
            rt.role = "WINNER: first matching allow" if enforced.action == ALLOW else \
                f"won the rules, but the destination check denied ({enforced.code})"
        else:
            rt.role = f"matched; the earlier allow {enf_allow.id} won (first match wins)"
    if has_shadow:
        for rule in (any_deny, any_allow if any_deny is None else None):
            if rule is not None:
                rt = by_rule[id(rule)]
                rt.role = (rt.role + "; " if rt.role else "") + "decides the shadow outcome"

    # Why, in words.
    why: list[str] = []
    winner = None
    if enf_deny is not None:
        winner = enf_deny.id
        rt = by_rule[id(enf_deny)]
        why.append(f"enforcing deny rules win over allows ({EXPLAIN_DOC}); first matching deny in file order "
                   f"is {enf_deny.id}")
        if rt.error is not None:
            why.append(f"{enf_deny.id} matched because its when failed ({rt.error}): deny rules fail closed")
        beaten = [r for rt2, r, s in evaluated if rt2.matched and not s and r.action == ALLOW]
        if beaten:
            why.append(f"it beats the matching allow rule(s) {_ids(beaten)}")
        why.append("a deny is decided before the destination checks (DNS, SSRF), which are not applied")
    elif enf_allow is not None:
        winner = enf_allow.id
        why.append(f"no enforcing deny rule matched; first matching allow in order is {enf_allow.id}")
        later = [r for rt2, r, s in evaluated if rt2.matched and not s and r.action == ALLOW and r is not enf_allow]
        if later:
            why.append(f"later matching allow rule(s) {_ids(later)} do not count (first match wins)")
        if enforced.action == ALLOW:
            why.append(f"the destination checks passed: allowed, dial {dial}")
        else:
            why.append(f"but the destination check failed: {enforced.reason} ({enforced.code})")
    else:
        why.append("no rule matched: default deny")
        failed = [r for rt2, r, s in evaluated if rt2.error is not None and r.action == ALLOW and not s]
        if failed:
            why.append(f"allow rule(s) whose when failed count as no match: {_ids(failed)}")
        shadow_only = [r for rt2, r, s in evaluated if rt2.matched and s]
        if shadow_only:
            why.append(f"matching rules of shadow policies do not decide: {_ids(shadow_only)}")
        if not plan.policies:
            why.append("no policy applies to this principal")
    why.extend(selector_notes)

    # Destination checks.
    checks: list[str] = []
    allow_for_checks = enf_allow if enf_deny is None else None
    addresses = [_address_trace(c, allow_for_checks) for c in destination.addresses]
    if allow_for_checks is None:
        checks.append("not applied: no allow rule won (a deny beats DNS failures and the SSRF guard)")
    else:
        r = allow_for_checks
        if destination.error:
            checks.append(f"dns: the host did not resolve: {destination.error} -> dns_failure")
        elif not destination.addresses:
            checks.append("dns: the host resolved to no address -> dns_failure")
        else:
            checks.append(f"dns: resolved to {', '.join(a.address for a in addresses)} (via {destination.via})")
            ai = [str(n) for n in r.allow_internal]
            for a in addresses:
                if not a.internal:
                    checks.append(f"ssrf: {a.address} is {a.klass}: no cover needed")
                elif a.covered:
                    checks.append(f"ssrf: {a.address} is {a.klass.replace('_', ' ')}"
                                  + (f" (embeds {a.embedded})" if a.embedded else "")
                                  + f": covered by {r.id} allow_internal {', '.join(a.covered_by)}")
                else:
                    checks.append(f"ssrf: {a.address} is {a.klass.replace('_', ' ')}"
                                  + (f" (embeds {a.embedded})" if a.embedded else "")
                                  + f": NOT covered by {r.id} allow_internal {ai or '(none)'} -> ssrf_blocked")
            if dial is not None:
                checks.append(f"dial: {dial} (the first checked address; the name is not resolved again)")

    shadow_why: list[str] = []
    if shadow_outcome is not None:
        if any_deny is not None:
            shadow_why.append(f"had every applicable policy been enforcing: first matching deny is {any_deny.id}")
        elif any_allow is not None:
            shadow_why.append(f"had every applicable policy been enforcing: first matching allow is {any_allow.id}"
                              + ("" if shadow_outcome.action == ALLOW
                                 else f", but the destination check denied ({shadow_outcome.code})"))
        else:
            shadow_why.append("had every applicable policy been enforcing: no rule matched (default deny)")
        if shadow_outcome.action != enforced.action or shadow_outcome.rule != enforced.rule:
            shadow_why.append(f"the shadow outcome differs from the enforced one ({enforced.action} by "
                              f"{enforced.rule or 'default deny'})")

    inject = None
    if enf_deny is None and enf_allow is not None and enf_allow.inject is not None:
        inj = enf_allow.inject
        inject = {"rule": enf_allow.id, "applied": dial is not None,
                  "headers": {name: [str(ref) for ref in t.refs] for name, t in inj.headers},
                  "placeholders": {alias: str(ref) for alias, ref in inj.placeholders},
                  "allow_plaintext": inj.allow_plaintext}

    dest = {"ips": [c.text for c in destination.addresses],
            "classes": [c.klass.value for c in destination.addresses],
            "error": destination.error, "via": destination.via}
    req = request.to_cel()
    trace = Trace(ps.version, getattr(ps.engine, "name", type(ps.engine).__name__), principal.to_cel(), req,
                  request.at.isoformat(), dest, addresses, policies, decision, winner, why, checks, shadow_why,
                  inject, mismatches)
    if mismatches:
        logging.getLogger("egress.policy").error(
            "EXPLAIN DISAGREES WITH DECIDE (an engine bug; the decision shown is decide's): %s",
            "; ".join(mismatches))
    return trace
