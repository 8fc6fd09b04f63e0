"""``egress policy replay``: the rollout gate. Re-decide recorded requests under
a candidate policy set and report which decisions would change, per tenant and
rule, with examples; fail when a change is not acknowledged in a file of
expected changes.

How it works
------------

Each ``decision`` event of the audit files is rebuilt into policy inputs
(gateway.policytools.records.case_from_event) and decided again by the
candidate set with ``PolicySet.decide``, the code the gateway runs (a refused
CONNECT, recorded with method ``CONNECT``, is re-checked with
``PolicySet.could_allow``, as the gateway did). The new outcome is compared
with the old one on decision, rule and code.

* Without ``--baseline`` the old outcome is the recorded one. Only events the
  policy decided are compared (codes ``allowed``, ``policy_deny``,
  ``default_deny``, ``ssrf_blocked``, ``dns_failure``; and
  ``secret_unavailable``, ``secret_not_granted``, ``plaintext_injection``,
  where the policy allowed by the recorded rule and the gateway refused after).
  The others (identity errors, ``destination_mismatch``, ``audit_unavailable``,
  ``policy_unavailable``, ``internal_error``) are counted, not compared. When
  the candidate allows by the same rule as a recorded ``secret_*`` /
  ``plaintext_injection`` refusal, or allows a request the gateway refused
  because its address is the gateway's own, the same refusal would happen
  again: that is no change.
* With ``--baseline DIR`` both sides are re-decided from the same records: the
  baseline set (e.g. what is deployed now) and the candidate. Use it when the
  records were decided by older policy versions (otherwise their changes
  between versions show up too), or to isolate the effect of one edit. Every
  event with a principal and a request is compared, whatever was recorded.

What the record cannot give back (records.py: header values, redacted query
values, the exact time) makes some replays inexact. For every request the
rules that could decide it (the applicable policies' rules that can match the
host) are checked for reading ``request.headers``, ``request.query`` (when its
values were redacted), ``now`` or (when the recorded address classes do not
match) ``destination``; a change with such rules is flagged ``inexact``, and
unchanged requests with such rules are counted separately (their outcome
might have changed too). A CONNECT that the candidate would let through is
always inexact: the requests the tunnel would have carried were never made.

Changes are grouped by (tenant, old outcome, new outcome) with counts, hosts
and up to ``--examples`` example requests (identical requests are shown once,
with how many times they were seen; all are counted).

Expected changes (``--expect FILE``)::

    changes:
      - tenant: acme            # optional filters; omitted = any
        from: {decision: allow, rule: acme/github-read}
        to:   {decision: deny,  rule: acme/no-github}
        host: api.github.com    # optional (exact, or *.suffix for sub-domains)
        reason: "ticket SEC-123: GitHub writes go through the review bot"

``from``/``to`` take ``decision`` (allow|deny), ``rule`` (a rule id, a glob
like ``acme/*``, or ``null`` for "no rule": default deny) and ``code``; a key
left out matches anything; an entry needs at least one of ``from``/``to`` and a
``reason``. Every changed request must match an entry, else the exit status is
1; entries that match nothing are reported as "expected but not seen"
(``--strict``: exit 1 too).

Exit status: 0 no unacknowledged change, 1 unacknowledged changes (or, with
``--strict``, an expected change not seen), 2 bad input (unreadable audit path,
candidate/baseline that does not compile, invalid expect file, no decision
event to replay).
"""

from __future__ import annotations

import fnmatch
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from gateway.policy.model import ALLOW, DENY
from gateway.policytools.records import (
    UNKNOWN_DESTINATION, UNKNOWN_HEADERS, UNKNOWN_NOW, UNKNOWN_QUERY, AuditPathError, Case, NotReplayable,
    Reader, case_from_event,
)

EXIT_OK, EXIT_CHANGES, EXIT_BAD_INPUT = 0, 1, 2
PROGRESS_EVERY = 10_000

# Codes that are the policy's decision.
POLICY_CODES = frozenset({"allowed", "policy_deny", "default_deny", "ssrf_blocked", "dns_failure"})
# The policy allowed (by the recorded rule); the gateway refused afterwards.
AFTER_ALLOW_CODES = frozenset({"secret_unavailable", "secret_not_granted", "plaintext_injection"})
# A CONNECT the candidate would not refuse: the tunnel opens.
CONNECT_ALLOWED = "connect_allowed"
TUNNEL = "tunnel"
GATEWAY_SELF_MARK = " is the gateway itself"


class ReplayInputError(ValueError):
    """Bad input (exit 2): ``problems`` are ``file:line: message`` strings."""

    def __init__(self, message: str, problems: Iterable[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


# -- outcomes -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """The comparable part of a decision."""

    decision: str
    code: str
    rule: str | None

    def __str__(self) -> str:
        return f"{self.decision} {self.rule or '(no rule)'} [{self.code}]"

    def to_dict(self) -> dict:
        return {"decision": self.decision, "code": self.code, "rule": self.rule}


def recorded_verdict(case: Case) -> Verdict:
    r = case.recorded
    return Verdict(r.decision, r.code, r.rule)


def decide(ps, case: Case) -> tuple[Verdict, str | None]:
    """(the verdict of policy set ``ps`` on ``case``, the address it would dial)."""
    if case.is_connect:
        o = ps.could_allow(case.principal, case.request.host, case.destination)
        if o is None:
            return Verdict(ALLOW, CONNECT_ALLOWED, None), None
        return Verdict(o.action, o.code, o.rule), None
    d = ps.decide(case.principal, case.request, case.destination)
    return Verdict(d.action, d.code, d.rule), d.dial


def not_policy_decided(case: Case) -> str | None:
    """Why the recorded outcome cannot be compared with a policy decision (its
    code), or None when it can."""
    r = case.recorded
    if r.code in POLICY_CODES or (r.code in AFTER_ALLOW_CODES and r.rule):
        return None
    return r.code or "(no code)"


def effective(case: Case, new: Verdict, dial: str | None) -> Verdict:
    """What the gateway would do given the candidate's verdict, for refusals that
    happen after the policy allowed and would happen again."""
    if new.decision != ALLOW:
        return new
    r = case.recorded
    if r.code in AFTER_ALLOW_CODES and r.rule == new.rule:
        return recorded_verdict(case)
    if (r.code == "ssrf_blocked" and r.rule == "ssrf" and dial
            and r.reason.startswith(f"{dial}:{case.request.port}{GATEWAY_SELF_MARK}")):
        return recorded_verdict(case)
    return new


# -- what the rules read that the record lacks ---------------------------------------------------

def _reads(use) -> frozenset[str]:
    if use is None:
        return frozenset()
    f = use.fields
    out = set()
    if "request" in f:
        req = f["request"]
        if req is None or "headers" in req:
            out.add(UNKNOWN_HEADERS)
        if req is None or "query" in req:
            out.add(UNKNOWN_QUERY)
    if "now" in f:
        out.add(UNKNOWN_NOW)
    if "destination" in f:
        out.add(UNKNOWN_DESTINATION)
    return frozenset(out)


class RouteReads:
    """For one policy set: which of the rules that can decide a (principal, host)
    read which inputs the record may lack (memoised)."""

    def __init__(self, ps):
        from gateway import celexpr
        from gateway.policy.engine import VARIABLES
        self.ps = ps
        self._cache: dict[tuple, dict[str, frozenset[str]]] = {}
        self._rule: dict[int, frozenset[str]] = {}
        self._selector: dict[str, frozenset[str]] = {}
        for pol in ps.policies:
            try:
                self._selector[pol.name] = _reads(celexpr.field_use(pol.selector_tree, VARIABLES))
            except Exception:  # pragma: no cover - analysis only
                self._selector[pol.name] = frozenset()
        self._by_name = {pol.name: pol for pol in ps.policies}

    def __call__(self, case: Case) -> dict[str, frozenset[str]]:
        if case.is_connect:
            return {}  # could_allow reads the host and the destination only
        key = (case.principal, case.request.host)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        out: dict[str, frozenset[str]] = {}
        for name in self.ps.applicable(case.principal):
            pol = self._by_name[name]
            if self._selector.get(name):
                out[f"{name}/(selector)"] = self._selector[name]
            for i in pol.candidates(case.request.host):
                rule = pol.rules[i]
                reads = self._rule.get(id(rule))
                if reads is None:
                    reads = self._rule[id(rule)] = _reads(rule.use)
                if reads:
                    out[rule.id] = reads
        if len(self._cache) >= 10_000:
            self._cache.clear()
        self._cache[key] = out
        return out


def inexact_reasons(case: Case, new: Verdict, route_reads: Iterable[RouteReads]) -> dict[str, list[str]]:
    """{rule id (or a pseudo name): [what it needs that the record lacks]}; empty: exact."""
    unknowns = set(case.unknowns)
    out: dict[str, list[str]] = {}
    for rr in route_reads:
        for rule, reads in rr(case).items():
            missing = reads & unknowns
            if missing:
                out.setdefault(rule, [])
                out[rule] = sorted(set(out[rule]) | missing)
    if UNKNOWN_DESTINATION in unknowns:
        out["(ssrf check)"] = [UNKNOWN_DESTINATION]
    if case.is_connect and new.code == CONNECT_ALLOWED:
        out["(connect)"] = [TUNNEL]
    return out


# -- expected changes ------------------------------------------------------------------------------

_ANY = object()
ENTRY_KEYS = {"tenant", "host", "from", "to", "reason"}
VERDICT_KEYS = {"decision", "rule", "code"}


@dataclass(frozen=True)
class VerdictPattern:
    decision: Any = _ANY
    rule: Any = _ANY  # str (glob) | None (no rule) | _ANY
    code: Any = _ANY

    def matches(self, v: Verdict) -> bool:
        if self.decision is not _ANY and v.decision != self.decision:
            return False
        if self.code is not _ANY and v.code != self.code:
            return False
        if self.rule is _ANY:
            return True
        if self.rule is None:
            return v.rule is None
        return v.rule is not None and fnmatch.fnmatchcase(v.rule, self.rule)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("decision", "rule", "code") if getattr(self, k) is not _ANY}


@dataclass(frozen=True)
class Expectation:
    index: int
    file: str
    line: int
    reason: str
    tenant: str | None = None
    host: str | None = None
    old: VerdictPattern = VerdictPattern()
    new: VerdictPattern = VerdictPattern()

    def matches(self, tenant: str, host: str, old: Verdict, new: Verdict) -> bool:
        if self.tenant is not None and tenant != self.tenant:
            return False
        if self.host is not None:
            if self.host.startswith("*."):
                if not host.endswith(self.host[1:]):
                    return False
            elif host != self.host:
                return False
        return self.old.matches(old) and self.new.matches(new)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def describe(self) -> str:
        parts = []
        if self.tenant is not None:
            parts.append(f"tenant {self.tenant}")
        if self.host is not None:
            parts.append(f"host {self.host}")
        parts.append(f"from {_pattern_text(self.old)} to {_pattern_text(self.new)}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        d = {"at": self.where, "from": self.old.to_dict(), "to": self.new.to_dict(), "reason": self.reason}
        if self.tenant is not None:
            d["tenant"] = self.tenant
        if self.host is not None:
            d["host"] = self.host
        return d


def _pattern_text(p: VerdictPattern) -> str:
    d = p.to_dict()
    if not d:
        return "anything"
    return "{" + ", ".join(f"{k}: {'null' if v is None else v}" for k, v in d.items()) + "}"


def load_expectations(path: str | Path) -> list[Expectation]:
    """Parse and validate an expected-changes file. Raises ReplayInputError
    listing every problem as ``file:line: message``."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReplayInputError(f"{name}: cannot read: {e}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        raise ReplayInputError(f"{name}:{line}: not valid YAML: {getattr(e, 'problem', None) or e}",
                               [f"{name}:{line}: not valid YAML: {getattr(e, 'problem', None) or e}"]) from None
    problems: list[str] = []

    def at(node) -> str:
        return f"{name}:{node.start_mark.line + 1}"

    def scalar(node, what: str, *, nullable: bool = False):
        if not isinstance(node, yaml.ScalarNode):
            problems.append(f"{at(node)}: {what} must be a string")
            return _ANY
        if node.tag == "tag:yaml.org,2002:null":
            if nullable:
                return None
            problems.append(f"{at(node)}: {what} must not be empty")
            return _ANY
        if node.tag not in ("tag:yaml.org,2002:str",):
            problems.append(f"{at(node)}: {what} must be a string, got {node.value!r}")
            return _ANY
        if not node.value.strip():
            problems.append(f"{at(node)}: {what} must not be empty")
            return _ANY
        return node.value

    def pattern(node, what: str) -> VerdictPattern:
        if not isinstance(node, yaml.MappingNode):
            problems.append(f"{at(node)}: {what} must be a mapping with decision, rule and/or code")
            return VerdictPattern()
        vals: dict[str, Any] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if key not in VERDICT_KEYS:
                problems.append(f"{at(k)}: {what}: unknown key {key!r} (use {', '.join(sorted(VERDICT_KEYS))})")
                continue
            if key in vals:
                problems.append(f"{at(k)}: {what}: {key} given twice")
                continue
            val = scalar(v, f"{what}.{key}", nullable=(key == "rule"))
            if key == "decision" and val is not _ANY and val not in (ALLOW, DENY):
                problems.append(f"{at(v)}: {what}.decision must be allow or deny, got {val!r}")
                val = _ANY
            vals[key] = val
        return VerdictPattern(**vals)

    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == "tag:yaml.org,2002:null"):
        return []
    if not isinstance(root, yaml.MappingNode):
        raise ReplayInputError(f"{at(root)}: the file must be a mapping with a 'changes' list",
                               [f"{at(root)}: the file must be a mapping with a 'changes' list"])
    changes = None
    for k, v in root.value:
        key = k.value if isinstance(k, yaml.ScalarNode) else None
        if key != "changes":
            problems.append(f"{at(k)}: unknown key {key!r} (the file holds 'changes: [...]')")
        else:
            changes = v
    out: list[Expectation] = []
    if changes is None:
        if not problems:
            problems.append(f"{name}:1: no 'changes' list")
    elif isinstance(changes, yaml.ScalarNode) and changes.tag == "tag:yaml.org,2002:null":
        pass
    elif not isinstance(changes, yaml.SequenceNode):
        problems.append(f"{at(changes)}: 'changes' must be a list of entries")
    else:
        for i, entry in enumerate(changes.value):
            if not isinstance(entry, yaml.MappingNode):
                problems.append(f"{at(entry)}: change #{i + 1} must be a mapping (tenant, host, from, to, reason)")
                continue
            vals: dict[str, Any] = {}
            for k, v in entry.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else None
                if key not in ENTRY_KEYS:
                    problems.append(f"{at(k)}: change #{i + 1}: unknown key {key!r} "
                                    f"(use {', '.join(sorted(ENTRY_KEYS))})")
                    continue
                if key in vals:
                    problems.append(f"{at(k)}: change #{i + 1}: {key} given twice")
                    continue
                if key in ("from", "to"):
                    vals[key] = pattern(v, key)
                else:
                    vals[key] = scalar(v, key)
            n0 = len(problems)
            if "from" not in vals and "to" not in vals:
                problems.append(f"{at(entry)}: change #{i + 1}: give 'from' and/or 'to'")
            if vals.get("reason", _ANY) is _ANY and "reason" not in vals:
                problems.append(f"{at(entry)}: change #{i + 1}: 'reason' is required (why this change is expected)")
            host = vals.get("host", _ANY)
            if isinstance(host, str):
                h = host.lower()
                if "*" in h and not (h.startswith("*.") and "*" not in h[2:] and len(h) > 2):
                    problems.append(f"{at(entry)}: change #{i + 1}: host must be a host name or *.suffix, "
                                    f"got {host!r}")
                host = h
            if len(problems) > n0:
                continue

            def opt(v):
                return None if v is _ANY else v
            out.append(Expectation(index=len(out), file=name, line=entry.start_mark.line + 1,
                                   reason=opt(vals.get("reason", _ANY)) or "",
                                   tenant=opt(vals.get("tenant", _ANY)), host=opt(host),
                                   old=vals.get("from", VerdictPattern()), new=vals.get("to", VerdictPattern())))
    if problems:
        raise ReplayInputError(f"{len(problems)} problem(s) in {name}", problems)
    return out


# -- aggregation --------------------------------------------------------------------------------------

@dataclass
class Example:
    request_id: str
    method: str
    url: str
    agent: str
    ts: str
    count: int = 1

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "method": self.method, "url": self.url, "agent": self.agent,
                "ts": self.ts, "count": self.count}


class _Examples:
    """Up to ``limit`` distinct requests (same method and URL = identical), each
    with how many times it was seen."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: dict[tuple, Example] = {}
        self.more = 0  # requests not among the kept examples

    def add(self, case: Case) -> None:
        key = (case.request.method, case.url)
        ex = self.items.get(key)
        if ex is not None:
            ex.count += 1
        elif len(self.items) < self.limit:
            self.items[key] = Example(case.request_id, case.request.method, case.url, case.principal.agent,
                                      case.recorded.ts)
        else:
            self.more += 1

    def to_list(self) -> list[dict]:
        return [e.to_dict() for e in self.items.values()]


@dataclass
class ChangeGroup:
    tenant: str
    old: Verdict
    new: Verdict
    limit: int
    count: int = 0
    acknowledged: int = 0
    inexact: int = 0
    hosts: Counter = field(default_factory=Counter)
    unacked_hosts: Counter = field(default_factory=Counter)
    inexact_reads: dict = field(default_factory=dict)  # rule -> set of inputs
    expectations: set = field(default_factory=set)  # indices of the entries that matched
    examples: _Examples = None  # type: ignore[assignment]
    unacked_examples: _Examples = None  # type: ignore[assignment]

    def __post_init__(self):
        self.examples = _Examples(self.limit)
        self.unacked_examples = _Examples(self.limit)

    @property
    def unacknowledged(self) -> int:
        return self.count - self.acknowledged

    def to_dict(self, expectations: list[Expectation]) -> dict:
        return {
            "tenant": self.tenant, "from": self.old.to_dict(), "to": self.new.to_dict(),
            "count": self.count, "acknowledged": self.acknowledged, "unacknowledged": self.unacknowledged,
            "inexact": self.inexact,
            "inexact_reads": {k: sorted(v) for k, v in sorted(self.inexact_reads.items())},
            "hosts": dict(self.hosts.most_common()),
            "examples": self.examples.to_list(),
            "unacknowledged_examples": self.unacked_examples.to_list() if self.unacknowledged else [],
            "expected_by": [expectations[i].where for i in sorted(self.expectations)],
        }


@dataclass
class Stats:
    events: int = 0  # audit events read
    decisions: int = 0  # decision events (after --tenant/--since/--until)
    filtered: int = 0  # decision events left out by the filters
    replayed: int = 0  # compared
    unchanged: int = 0
    changed: int = 0
    not_replayable: Counter = field(default_factory=Counter)  # kind -> n (records.NotReplayable)
    not_policy: Counter = field(default_factory=Counter)  # recorded code -> n (not a policy decision)
    versions: Counter = field(default_factory=Counter)  # recorded policy_version -> n
    fingerprints: Counter = field(default_factory=Counter)  # recorded policy_fingerprint -> n ("" = not recorded)
    inexact_unchanged: int = 0


class Replay:
    """The replay of a stream of audit events against a candidate set (and
    optionally a baseline set); pure, no output. Feed ``add_event`` (or
    ``add_case``), then read ``groups``, ``stats``, ``exit_status()``."""

    def __init__(self, candidate, *, baseline=None, expectations: list[Expectation] | None = None,
                 examples: int = 5, tenants: Iterable[str] | None = None, since: float | None = None,
                 until: float | None = None):
        self.candidate = candidate
        self.baseline = baseline
        self.expectations = list(expectations or [])
        self.limit = max(0, examples)
        self.tenants = set(tenants) if tenants else None
        self.since, self.until = since, until
        self.stats = Stats()
        self.groups: dict[tuple, ChangeGroup] = {}
        self.seen_expectations: Counter = Counter()  # index -> requests acknowledged
        self.inexact_unchanged: dict[tuple, list] = {}  # (tenant, rule, inputs) -> [count, example]
        self._reads = [RouteReads(candidate)] + ([RouteReads(baseline)] if baseline is not None else [])

    # -- input ------------------------------------------------------------------------------

    def add_event(self, ev: dict) -> None:
        self.stats.events += 1
        if ev.get("event") != "decision":
            return
        if not self._wanted(ev):
            self.stats.filtered += 1
            return
        self.stats.decisions += 1
        try:
            case = case_from_event(ev)
        except NotReplayable as e:
            self.stats.not_replayable[e.kind] += 1
            return
        self.add_case(case)

    def _wanted(self, ev: dict) -> bool:
        if self.tenants is not None:
            p = ev.get("principal")
            if not isinstance(p, dict) or p.get("tenant") not in self.tenants:
                return False
        if self.since is not None or self.until is not None:
            from gateway.audit.query import event_time
            t = event_time(ev)
            if t is None or (self.since is not None and t < self.since) or (self.until is not None and t > self.until):
                return False
        return True

    def add_case(self, case: Case) -> Verdict | None:
        """Compare one case; returns the new verdict when it changed, else None."""
        st = self.stats
        if self.baseline is None:
            why = not_policy_decided(case)
            if why is not None:
                st.not_policy[why] += 1
                return None
            old = recorded_verdict(case)
            new, dial = decide(self.candidate, case)
            new = effective(case, new, dial)
        else:
            old, _ = decide(self.baseline, case)
            new, _ = decide(self.candidate, case)
        st.replayed += 1
        st.versions[case.recorded.policy_version] += 1
        st.fingerprints[case.recorded.policy_fingerprint] += 1
        inexact = inexact_reasons(case, new, self._reads)
        if old == new:
            st.unchanged += 1
            if inexact:
                st.inexact_unchanged += 1
                for rule, reads in inexact.items():
                    key = (case.tenant, rule, tuple(reads))
                    slot = self.inexact_unchanged.get(key)
                    if slot is None:
                        self.inexact_unchanged[key] = [1, case.url]
                    else:
                        slot[0] += 1
            return None
        st.changed += 1
        key = (case.tenant, old, new)
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = ChangeGroup(case.tenant, old, new, self.limit)
        g.count += 1
        g.hosts[case.request.host] += 1
        g.examples.add(case)
        if inexact:
            g.inexact += 1
            for rule, reads in inexact.items():
                g.inexact_reads.setdefault(rule, set()).update(reads)
        matched = [x.index for x in self.expectations if x.matches(case.tenant, case.request.host, old, new)]
        if matched:
            g.acknowledged += 1
            g.expectations.update(matched)
            for i in matched:
                self.seen_expectations[i] += 1
        else:
            g.unacked_hosts[case.request.host] += 1
            g.unacked_examples.add(case)
        return new

    # -- results ------------------------------------------------------------------------------

    def sorted_groups(self) -> list[ChangeGroup]:
        return sorted(self.groups.values(), key=lambda g: (g.acknowledged == g.count, g.tenant, -g.count,
                                                           str(g.old), str(g.new)))

    @property
    def unacknowledged(self) -> int:
        return sum(g.unacknowledged for g in self.groups.values())

    def not_seen(self) -> list[Expectation]:
        return [x for x in self.expectations if not self.seen_expectations.get(x.index)]

    def exit_status(self, strict: bool = False) -> int:
        if self.unacknowledged:
            return EXIT_CHANGES
        if strict and self.not_seen():
            return EXIT_CHANGES
        return EXIT_OK

    def to_dict(self, strict: bool = False) -> dict:
        st = self.stats
        return {
            "candidate": self.candidate.version,
            "candidate_fingerprint": getattr(self.candidate, "fingerprint", "") or None,
            "baseline": self.baseline.version if self.baseline is not None else None,
            "compared_with": "baseline" if self.baseline is not None else "recorded",
            "stats": {
                "events": st.events, "decisions": st.decisions, "filtered_out": st.filtered,
                "replayed": st.replayed, "unchanged": st.unchanged, "changed": st.changed,
                "not_replayable": dict(st.not_replayable), "not_policy_decisions": dict(st.not_policy),
                "recorded_policy_versions": dict(st.versions.most_common()),
                "recorded_policy_fingerprints": {k: n for k, n in st.fingerprints.most_common() if k},
                "inexact_unchanged": st.inexact_unchanged,
            },
            "changes": [g.to_dict(self.expectations) for g in self.sorted_groups()],
            "unacknowledged": self.unacknowledged,
            "expected_not_seen": [x.to_dict() for x in self.not_seen()],
            "inexact_unchanged": [
                {"tenant": t, "rule": rule, "reads": list(reads), "count": n, "example": url}
                for (t, rule, reads), (n, url) in sorted(self.inexact_unchanged.items(), key=lambda kv: -kv[1][0])
            ],
            "exit": self.exit_status(strict),
        }


def replay_events(events: Iterable[dict], candidate, **kw) -> Replay:
    """Replay ``events`` (dicts, e.g. records.iter_events(paths)) against ``candidate``."""
    r = Replay(candidate, **kw)
    for ev in events:
        r.add_event(ev)
    return r


# -- text output ----------------------------------------------------------------------------------

def render_text(r: Replay, read_stats, *, strict: bool = False, out=None) -> None:
    out = out or sys.stdout
    w = out.write
    st = r.stats
    against = (f"baseline {r.baseline.version}" if r.baseline is not None else "the recorded decisions")
    w(f"replay: candidate {r.candidate.version} against {against}\n")
    w(f"  {st.events} event(s) read, {st.decisions} decision(s)")
    if st.filtered:
        w(f" ({st.filtered} more left out by --tenant/--since/--until)")
    w(f"; {st.replayed} replayed: {st.unchanged} unchanged, {st.changed} changed\n")
    if st.not_replayable:
        w("  not replayable: " + ", ".join(f"{k} {n}" for k, n in st.not_replayable.most_common()) + "\n")
    if st.not_policy:
        w("  not decided by policy (not compared): "
          + ", ".join(f"{k} {n}" for k, n in st.not_policy.most_common()) + "\n")
    if read_stats is not None and read_stats.skipped:
        w(f"  skipped lines: {read_stats.skipped} ({read_stats.torn} torn or corrupt)\n")
    if r.baseline is None:
        # versions that differ only in comments or layout have the same fingerprint
        kinds = st.fingerprints if "" not in st.fingerprints else st.versions
        if len(kinds) > 1:
            w(f"  note: the records were decided by {len(kinds)} different policy sets; changes between them "
              f"show up too (--baseline DIR compares two sets on the same records)\n")
        fp = getattr(r.candidate, "fingerprint", "")
        if fp and set(st.fingerprints) == {fp}:
            w(f"  note: the candidate means the same as the set that decided every record ({fp}); a change "
              f"below comes from what the record lacks, not from the policy\n")
    groups = r.sorted_groups()
    w("\n")
    if not groups:
        w("no decision would change\n")
    for g in groups:
        if g.acknowledged == g.count:
            status = "expected"
        elif g.acknowledged:
            status = f"NOT EXPECTED: {g.unacknowledged} of them"
        else:
            status = "NOT EXPECTED"
        w(f"tenant {g.tenant}: {g.count} request(s)  {g.old}  ->  {g.new}  [{status}]\n")
        w("  hosts: " + ", ".join(f"{h} ({n})" for h, n in g.hosts.most_common(10))
          + (f", ... {len(g.hosts) - 10} more" if len(g.hosts) > 10 else "") + "\n")
        if g.inexact:
            w(f"  INEXACT: {g.inexact} of these: "
              + "; ".join(f"{rule} reads {', '.join(sorted(v))}" for rule, v in sorted(g.inexact_reads.items()))
              + " (not in the record)\n")
        ex = g.unacked_examples if g.unacknowledged else g.examples
        for e in ex.items.values():
            times = f" ({e.count}x)" if e.count > 1 else ""
            w(f"  e.g. {e.url if e.method == 'CONNECT' else e.method + ' ' + e.url}{times}  "
              f"request {e.request_id}, agent {e.agent}\n")
        if ex.more:
            w(f"  ... and {ex.more} other request(s)\n")
        for i in sorted(g.expectations):
            x = r.expectations[i]
            w(f"  expected: {x.where}: {x.reason}\n")
    if r.inexact_unchanged:
        w(f"\n{st.inexact_unchanged} unchanged request(s) were replayed inexactly (rules read what the "
          f"record lacks; their outcome could differ):\n")
        for (t, rule, reads), (n, url) in sorted(r.inexact_unchanged.items(), key=lambda kv: -kv[1][0])[:20]:
            w(f"  tenant {t}: {n} request(s), {rule} reads {', '.join(reads)}, e.g. {url}\n")
    not_seen = r.not_seen()
    if not_seen:
        w(f"\n{'ERROR' if strict else 'warning'}: {len(not_seen)} expected change(s) not seen:\n")
        for x in not_seen:
            w(f"  {x.where}: {x.describe()} ({x.reason})\n")
    n = r.unacknowledged
    w("\n")
    if n:
        w(f"FAIL: {n} changed decision(s) not acknowledged in an expect file"
          f" ({sum(1 for g in groups if g.unacknowledged)} group(s))\n")
    elif strict and not_seen:
        w("FAIL: expected changes not seen (--strict)\n")
    else:
        w(f"ok: {st.changed} changed decision(s), all expected\n" if st.changed else "ok: no changes\n")


# -- command line -------------------------------------------------------------------------------------

EPILOG = """\
examples:
  egress policy replay --audit .state/audit --candidate policies/next
  egress policy replay --audit exports/ --audit old.jsonl.gz --candidate policies/next \\
      --expect policies/next/expected-changes.yaml --since 7d
  egress policy replay --audit .state/audit --baseline policies/default --candidate policies/next --format json

expected changes file (--expect):
  changes:
    - tenant: acme                                  # optional; omitted = any
      host: api.github.com                          # optional: exact, or *.suffix
      from: {decision: allow, rule: acme/github-read}
      to:   {decision: deny,  rule: acme/no-github} # rule: null = default deny; globs: acme/*
      reason: "SEC-123: GitHub writes go through the review bot"

exit status: 0 no unacknowledged change, 1 unacknowledged changes (--strict: or an
expected change not seen), 2 bad input"""


def _load_set(directory: str, engine: str, what: str):
    from gateway import celexpr
    from gateway.policy.loader import PolicyLoadError, load_directory
    if not Path(directory).is_dir():
        raise ReplayInputError(f"--{what}: {directory} is not a directory")
    try:
        return load_directory(directory, engine=celexpr.make_engine(engine))
    except PolicyLoadError as e:
        raise ReplayInputError(f"--{what}: {len(e.problems)} problem(s) in {directory}",
                               [str(p) for p in e.problems]) from None


def run(args, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    from gateway.audit.query import parse_time
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as e:
        raise ReplayInputError(str(e)) from None
    if args.examples < 0:
        raise ReplayInputError("--examples must be 0 or more")
    expectations = load_expectations(args.expect) if args.expect else []
    candidate = _load_set(args.candidate, args.engine, "candidate")
    baseline = _load_set(args.baseline, args.engine, "baseline") if args.baseline else None
    try:
        reader = Reader(args.audit)
    except AuditPathError as e:
        raise ReplayInputError(f"--audit: {e}") from None
    if not reader.files:
        raise ReplayInputError("--audit: no audit files in " + ", ".join(args.audit))
    r = Replay(candidate, baseline=baseline, expectations=expectations, examples=args.examples,
               tenants=args.tenant, since=since, until=until)
    progress = args.progress or (hasattr(err, "isatty") and err.isatty())
    t0 = time.monotonic()
    try:
        for ev in reader:
            r.add_event(ev)
            if progress and r.stats.events % PROGRESS_EVERY == 0:
                err.write(f"replay: {r.stats.events} events, {r.stats.replayed} replayed, "
                          f"{r.stats.changed} changed ({time.monotonic() - t0:.1f}s)\n")
                err.flush()
    except AuditPathError as e:
        raise ReplayInputError(f"--audit: {e}") from None
    except OSError as e:
        raise ReplayInputError(f"--audit: cannot read {e.filename}: {e.strerror}") from None
    for p in reader.stats.problems:
        err.write(f"warning: {p}\n")
    if reader.stats.torn > len(reader.stats.problems):
        err.write(f"warning: {reader.stats.torn - len(reader.stats.problems)} more torn line(s) skipped\n")
    if r.stats.replayed == 0 and r.stats.decisions == 0:
        raise ReplayInputError(f"nothing to replay: no decision event in {len(reader.files)} file(s)"
                               + (" matching --tenant/--since/--until" if r.stats.filtered else ""))
    strict = args.strict
    if args.format == "json":
        d = r.to_dict(strict)
        d["read"] = {"files": reader.stats.files, "lines": reader.stats.lines, "skipped": reader.stats.skipped,
                     "torn": reader.stats.torn, "problems": reader.stats.problems}
        out.write(json.dumps(d, indent=1) + "\n")
    else:
        render_text(r, reader.stats, strict=strict, out=out)
    return r.exit_status(strict)


def cmd_policy_replay(args) -> int:
    try:
        return run(args)
    except ReplayInputError as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        print(f"egress: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        return EXIT_OK


def register(policy_subparsers, fmt) -> None:
    p = policy_subparsers.add_parser(
        "replay", formatter_class=fmt, epilog=EPILOG,
        help="re-decide recorded requests under a candidate policy set; report what would change",
        description="The rollout gate: re-decide the decisions recorded in audit files with a candidate "
                    "policy set (the gateway's own engine) and report, per tenant and rule, which would "
                    "change, with examples. Fails when a change is not acknowledged in --expect.")
    p.add_argument("--audit", action="append", required=True, metavar="PATH",
                   help="audit file (.jsonl, .jsonl.gz), spool directory, gateway state dir or directory of "
                        "exported files; repeatable")
    p.add_argument("--candidate", required=True, metavar="DIR", help="the policy directory to roll out")
    p.add_argument("--baseline", metavar="DIR",
                   help="compare with this policy directory re-decided on the same records, instead of with "
                        "what was recorded (records from older policy versions, or to isolate one edit)")
    p.add_argument("--expect", metavar="FILE", help="YAML file of acknowledged changes (see below)")
    p.add_argument("--strict", action="store_true", help="an expected change that is not seen fails too")
    p.add_argument("--tenant", action="append", help="only this tenant (repeatable)")
    p.add_argument("--since", help="only decisions at or after: 2026-12-01T10:00:00Z, 2026-12-01, or 15m, 2h, 7d (ago)")
    p.add_argument("--until", help="only decisions at or before (same forms as --since)")
    p.add_argument("--examples", type=int, default=5, metavar="N",
                   help="example requests per change group (default 5; identical requests shown once)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--engine", choices=("rust", "python"), default="rust")
    p.add_argument("--progress", action="store_true",
                   help=f"report progress on stderr every {PROGRESS_EVERY} events (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_policy_replay)


__all__ = ["Replay", "Verdict", "Expectation", "VerdictPattern", "ReplayInputError", "load_expectations",
           "decide", "replay_events", "register", "render_text", "run", "effective", "not_policy_decided"]
