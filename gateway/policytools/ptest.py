"""``egress policy test DIR``: table-driven tests that live next to the policies.

Test files sit in the policy directory, named ``*.test.yaml``, ``*.test.yml``,
``*_test.yaml`` or ``*_test.yml`` (the policy loader skips those names)::

    hosts:                               # optional: static host -> address(es), for every test here
      billing.internal: 10.20.0.5
    principal: {tenant: demo, agent: a1} # optional: the default principal of the tests below
    tests:
      - name: demo agent reads the demo server
        principal: {tenant: demo, agent: a1, labels: {registries: read}}
        request: {method: GET, url: "http://demo.localhost:8000/", headers: {accept: "*/*"}}
        addresses: ["127.0.0.1"]          # optional (see below)
        now: "2026-06-01T10:00:00Z"       # optional: the time CEL sees as ``now``
        expect:
          decision: allow                 # required: allow | deny
          code: allowed                   # optional; every other key too
          rule: demo/demo-read            # "policy/rule", ssrf, dns, or null (default deny)
          reason: may read                # a substring of the decision's reason
          secrets: ["local:demo-token"]   # reference names the winning rule would inject (a set)
          dial: 127.0.0.1                 # the checked address the gateway would connect to (null: none)
          shadow: {decision: deny, rule: demo/x}   # the shadow outcome; null: no shadow policy applies

Every decision comes from ``PolicySet.decide`` - the code the gateway runs -
on a Principal, Request and Destination built by ``build_case`` (also used by
``egress policy decide`` and ``egress policy explain``). Tests never touch DNS
or the network: a host resolves to the test's ``addresses``, else statically
(an IP literal, a ``hosts`` entry, ``localhost`` / ``*.localhost``), else the
test file is invalid.

Exit status: 0 every test passed, 1 some test failed, 2 bad input (the
policies do not load, a test file is invalid, no test files or no test
selected).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from gateway.addresses import classify
from gateway.policy.loader import TEST_SUFFIXES, Problem, _mapping, _pos, _scalar_value
from gateway.policy.model import (
    ALLOW, CODE_ALLOWED, CODE_DEFAULT_DENY, CODE_DNS, CODE_POLICY_DENY, CODE_SSRF, DENY,
    Decision, Destination, Principal, Request,
)

SCHEMES = ("http", "https", "ws", "wss")
MODES = ("explicit", "transparent")
SOURCES = ("token", "binding")
DECISIONS = (ALLOW, DENY)
# The codes PolicySet.decide can give (the gateway adds others around it).
CODES = (CODE_ALLOWED, CODE_POLICY_DENY, CODE_DEFAULT_DENY, CODE_SSRF, CODE_DNS)
PSEUDO_RULES = ("ssrf", "dns")  # the ``rule`` of ssrf_blocked and dns_failure

FILE_KEYS = {"tests", "principal", "hosts"}
TEST_KEYS = {"name", "principal", "request", "addresses", "now", "expect"}
PRINCIPAL_KEYS = {"tenant", "agent", "session", "labels", "token_id", "source"}
REQUEST_KEYS = {"method", "url", "headers", "mode"}
EXPECT_KEYS = {"decision", "code", "rule", "reason", "secrets", "dial", "shadow"}
SHADOW_KEYS = {"decision", "code", "rule", "reason"}

_METHOD_RE = re.compile(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*")
_HEADER_RE = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")


# ---------------------------------------------------------------------------
# Building a case: (principal, request, addresses) -> the engine's inputs.
# Shared with ``egress policy decide`` and ``egress policy explain``.


class CaseError(ValueError):
    """A case that cannot be built. ``field`` names the input at fault, as a
    dotted path into the case (``principal.tenant``, ``request.url``,
    ``request.headers.accept``, ``addresses``, ``hosts``, ``now``)."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.message = message
        self.field = field


def build_principal(principal: Mapping[str, Any], *, strict: bool = True) -> Principal:
    """A Principal from ``{tenant, agent, session?, labels?, token_id?, source?}``.

    ``strict`` also checks what a real identity token could carry (name and
    label key syntax, ``source`` token|binding)."""
    from gateway import tokens

    if not isinstance(principal, Mapping):
        raise CaseError("principal must be a mapping", "principal")
    for key in ("tenant", "agent"):
        if key not in principal:
            raise CaseError(f"principal needs {key!r}", "principal")
    values = {}
    for key in ("tenant", "agent", "session", "token_id", "source"):
        v = principal.get(key, "")
        if key == "source" and not v:
            v = "token"
        if not isinstance(v, str):
            raise CaseError(f"principal.{key} must be a string", f"principal.{key}")
        values[key] = v
    labels = principal.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise CaseError("principal.labels must be a mapping of strings to strings", "principal.labels")
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise CaseError(f"label {k!r}: keys and values must be strings (quote values such as "
                            f"'true' or '1')", f"principal.labels.{k}")
    if strict:
        name_re = tokens._NAME_RE
        for key in ("tenant", "agent"):
            if not name_re.fullmatch(values[key]):
                raise CaseError(f"principal.{key} {values[key]!r} is not a name a token can carry "
                                f"(letters, digits, '.', '_', ':', '-'; starting with a letter or digit)",
                                f"principal.{key}")
        if values["session"] and not name_re.fullmatch(values["session"]):
            raise CaseError(f"principal.session {values['session']!r} is not a session a token can carry",
                            "principal.session")
        for k in labels:
            if not tokens._LABEL_KEY_RE.fullmatch(k):
                raise CaseError(f"label key {k!r} is not one a token can carry "
                                "(lowercase letters, digits, '.', '_', '/', '-')", f"principal.labels.{k}")
        if values["source"] not in SOURCES:
            raise CaseError(f"principal.source must be token or binding, got {values['source']!r}",
                            "principal.source")
    return Principal.make(values["tenant"], values["agent"], values["session"], dict(labels),
                          token_id=values["token_id"], source=values["source"])


def build_request(request: Mapping[str, Any], *, now: _dt.datetime | None = None,
                  strict: bool = True) -> Request:
    """A Request from ``{url, method?, headers?, mode?}`` the way the gateway
    normalises one: host lowercased (IDNA, no brackets or trailing dot), port
    from the URL or the scheme, path without the query, header names
    lowercased, ``host`` header from the URL unless given, SNI = host for
    https/wss. ``method`` defaults to GET and is upper-cased."""
    from urllib.parse import urlsplit

    from gateway.resolver import HostError, normalise_host

    if not isinstance(request, Mapping):
        raise CaseError("request must be a mapping", "request")
    url = request.get("url")
    if not isinstance(url, str):
        raise CaseError("request needs a url (scheme://host/...)", "request.url")
    u = urlsplit(url)
    if not u.scheme or not u.hostname:
        raise CaseError(f"URL must be absolute (scheme://host/...), got {url!r}", "request.url")
    scheme = u.scheme.lower()
    if strict and scheme not in SCHEMES:
        raise CaseError(f"URL scheme must be one of {', '.join(SCHEMES)}, got {u.scheme!r}", "request.url")
    try:
        host = normalise_host(u.hostname)
        port = u.port or (443 if scheme in ("https", "wss") else 80)
    except (HostError, ValueError) as e:
        raise CaseError(f"bad URL host: {e}", "request.url") from None
    method = request.get("method", "GET")
    if not isinstance(method, str) or (strict and not _METHOD_RE.fullmatch(method)):
        raise CaseError(f"request.method must be an HTTP method such as GET, got {method!r}", "request.method")
    mode = request.get("mode", "explicit")
    if mode not in MODES:
        raise CaseError(f"request.mode must be explicit or transparent, got {mode!r}", "request.mode")
    headers = {"host": u.netloc.rpartition("@")[2]}
    given = request.get("headers") or {}
    if not isinstance(given, Mapping):
        raise CaseError("request.headers must be a mapping of header names to values", "request.headers")
    for k, v in given.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise CaseError(f"header {k!r}: names and values must be strings", f"request.headers.{k}")
        name = k.strip().lower()
        if strict and not _HEADER_RE.fullmatch(name):
            raise CaseError(f"{k!r} is not a valid header name", f"request.headers.{k}")
        headers[name] = v.strip()
    return Request(host=host, port=port, scheme=scheme, method=method.upper(), path=u.path or "/",
                   query=u.query, headers=headers, sni=host if scheme in ("https", "wss") else "",
                   mode=mode, at=now)


def build_destination(host: str, port: int, addresses: Sequence[str] | None = None,
                      hosts: Mapping[str, str | Sequence[str]] | None = None, *,
                      resolve_dns: bool = False) -> Destination:
    """Where ``host`` goes: the given ``addresses`` (``via="given"``; an empty
    list is a host that resolved to nothing), else a static resolution (IP
    literal, a ``hosts`` override, ``localhost`` / ``*.localhost``), else DNS
    when ``resolve_dns`` - otherwise CaseError: tests never use the network."""
    from gateway.resolver import Resolver

    if addresses is not None:
        if isinstance(addresses, str) or not isinstance(addresses, Sequence):
            raise CaseError("addresses must be a list of IP addresses", "addresses")
        out = []
        for a in addresses:
            try:
                if not isinstance(a, str):
                    raise ValueError(f"{a!r} is not a string")
                out.append(classify(a))
            except ValueError as e:
                raise CaseError(f"addresses: {e}", "addresses") from None
        return Destination(tuple(out), via="given")
    try:
        resolver = Resolver(hosts or None)
    except (ValueError, TypeError) as e:
        raise CaseError(f"hosts: {e}", "hosts") from None
    dest = resolver.resolve_static(host)
    if dest is not None:
        return dest
    if resolve_dns:
        import asyncio
        return asyncio.run(resolver.resolve(host, port))
    raise CaseError(f"{host} needs addresses: it is not an IP literal, a hosts entry or *.localhost, and tests "
                    f"never use DNS - give `addresses: [...]` (what {host} resolves to) or a `hosts:` entry",
                    "addresses")


def build_case(principal: Mapping[str, Any], request: Mapping[str, Any],
               addresses: Sequence[str] | None = None,
               hosts: Mapping[str, str | Sequence[str]] | None = None, *,
               now: _dt.datetime | None = None, resolve_dns: bool = False,
               strict: bool = True) -> tuple[Principal, Request, Destination]:
    """The inputs of ``PolicySet.decide`` for one hypothetical request.

    ``principal``: ``{tenant, agent, session?, labels?, token_id?, source?}``;
    ``request``: ``{url, method? (GET), headers? {name: value}, mode?}``;
    ``addresses``: what the host resolves to (None: resolve statically, see
    ``build_destination``); ``hosts``: static overrides ``{name: address or
    [addresses]}``; ``now``: the request time CEL sees (None: the clock).
    Raises CaseError (with ``.field``) on bad input; never touches the network
    unless ``resolve_dns``."""
    p = build_principal(principal, strict=strict)
    r = build_request(request, now=now, strict=strict)
    d = build_destination(r.host, r.port, addresses, hosts, resolve_dns=resolve_dns)
    return p, r, d


def secret_names(decision: Decision, request: Request) -> list[str]:
    """Names of the secret references the gateway would resolve and inject for
    this allowed request: the winning rule's header templates, plus the
    placeholders the request's headers use (``egress-secret:ALIAS``)."""
    if decision.inject is None or not decision.allowed:
        return []
    from gateway.secrets.inject import placeholders_in
    return [str(r) for r in decision.inject.refs(placeholders_in(request.headers.items()))]


def decision_fields(decision: Decision, request: Request) -> dict[str, Any]:
    """What a test can expect of a decision."""
    sh = decision.shadow
    return {
        "decision": decision.action,
        "code": decision.code,
        "rule": decision.rule,
        "reason": decision.reason,
        "secrets": secret_names(decision, request),
        "dial": decision.dial,
        "shadow": None if sh is None else {"decision": sh.action, "code": sh.code, "rule": sh.rule,
                                           "reason": sh.reason},
        "errors": list(decision.errors),
    }


# ---------------------------------------------------------------------------
# Test files


@dataclass
class Case:
    file: str
    line: int
    name: str
    principal: Principal
    request: Request
    destination: Destination
    expect: dict[str, Any]  # only the keys given; "shadow" -> None or a dict of the keys given


@dataclass
class Result:
    case: Case
    actual: dict[str, Any]
    failures: list[tuple[str, Any, Any]]  # (field, expected, actual)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures


def test_files(directory: Path) -> list[Path]:
    """The test files of a policy directory, in name order (not recursive, like the policies)."""
    return [p for p in sorted(directory.iterdir(), key=lambda p: p.name)
            if p.is_file() and p.name.endswith(TEST_SUFFIXES) and not p.name.startswith(".")]


test_files.__test__ = False  # not a pytest test


class _File:
    """Validation of one test file: every problem is collected with its position."""

    def __init__(self, name: str, rule_ids: set[str] | None):
        self.name = name
        self.rule_ids = rule_ids
        self.problems: list[Problem] = []

    def problem(self, node, message: str) -> None:
        line, col = _pos(node) if node is not None else (1, 1)
        self.problems.append(Problem(self.name, line, col, message))

    def mapping(self, node, what, keys):
        return _mapping(self.name, node, what, keys, self.problems)

    def scalar(self, node, what, types=(str,), null_ok=False):
        """A scalar's value if it is of ``types`` (a problem otherwise; returns ``...``)."""
        if isinstance(node, yaml.ScalarNode):
            try:
                value = _scalar_value(node)
            except (yaml.YAMLError, ValueError, TypeError) as e:
                self.problem(node, f"{what}: invalid value: {getattr(e, 'problem', None) or e}")
                return ...
            if value is None and null_ok:
                return None
            if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
                return value
            got = "null" if value is None else type(value).__name__
        else:
            got = "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
        names = {str: "a string", bool: "true or false", _dt.datetime: "a timestamp"}
        want = " or ".join(names.get(t, t.__name__) for t in types) + (" or null" if null_ok else "")
        self.problem(node, f"{what} must be {want}, got {got}")
        return ...

    def string_map(self, node, what) -> tuple[dict[str, str], dict[str, Any]] | None:
        """A mapping of strings to strings, and the value node of each key."""
        m = self.mapping(node, what, None)
        if m is None:
            return None
        out, nodes = {}, {}
        ok = True
        for k, (_, vnode) in m.items():
            v = self.scalar(vnode, f"{what}.{k}")
            if v is ...:
                ok = False
                continue
            out[k] = v
            nodes[k] = vnode
        return (out, nodes) if ok else None

    # -- the file -------------------------------------------------------------

    def load(self, text: str) -> list[Case]:
        try:
            docs = [d for d in yaml.compose_all(text, Loader=yaml.SafeLoader) if d is not None]
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            self.problems.append(Problem(self.name, mark.line + 1 if mark else 1, mark.column + 1 if mark else 1,
                                         f"invalid YAML: {getattr(e, 'problem', None) or e}"))
            return []
        if not docs:
            self.problems.append(Problem(self.name, 1, 1, "empty test file (expected a mapping with 'tests')"))
            return []
        if len(docs) > 1:
            self.problem(docs[1], "a test file holds one YAML document (put every test under one 'tests' list)")
            return []
        doc = docs[0]
        m = self.mapping(doc, "test file", FILE_KEYS)
        if m is None:
            return []
        hosts = None
        if "hosts" in m:
            hosts = self.hosts(m["hosts"][1])
        default_principal = None
        if "principal" in m:
            default_principal = self.principal(m["principal"][1])
        if "tests" not in m:
            self.problem(doc, "test file is missing required key 'tests' (a list of tests)")
            return []
        tnode = m["tests"][1]
        if not isinstance(tnode, yaml.SequenceNode) or not tnode.value:
            self.problem(tnode, "tests must be a non-empty list")
            return []
        cases = []
        names: dict[str, int] = {}
        for item in tnode.value:
            nnode = _name_node(item)
            if nnode is not item and isinstance(nnode, yaml.ScalarNode) and nnode.tag.endswith(":str"):
                name = nnode.value
                if isinstance(name, str) and name in names:
                    self.problem(nnode, f"test name {name!r} is already used on line {names[name]}")
                elif isinstance(name, str):
                    names[name] = _pos(item)[0]
            case = self.test(item, hosts, default_principal, m.get("principal", (None, None))[1])
            if case is not None:
                cases.append(case)
        self.problems.sort(key=lambda p: (p.line, p.column))
        return cases

    def hosts(self, node) -> dict[str, tuple[str, ...]] | None:
        m = self.mapping(node, "hosts", None)
        if m is None:
            return None
        out: dict[str, tuple[str, ...]] = {}
        for name, (_, vnode) in m.items():
            if isinstance(vnode, yaml.SequenceNode):
                items = [self.scalar(v, f"hosts.{name} entry") for v in vnode.value]
            else:
                items = [self.scalar(vnode, f"hosts.{name}")]
            if ... in items:
                continue
            if not items:
                self.problem(vnode, f"hosts.{name} needs at least one address")
                continue
            try:
                for a in items:
                    ipaddress.ip_address(a)
            except ValueError as e:
                self.problem(vnode, f"hosts.{name}: {e}")
                continue
            out[name.lower()] = tuple(items)
        return out

    def principal(self, node) -> tuple[dict, dict] | None:
        """(the principal as a dict, the node of each field) or None."""
        n = len(self.problems)
        m = self.mapping(node, "principal", PRINCIPAL_KEYS)
        if m is None:
            return None
        out, nodes = {}, {"principal": node}
        for key, (_, vnode) in m.items():
            nodes[f"principal.{key}"] = vnode
            if key == "labels":
                sm = self.string_map(vnode, "principal.labels")
                if sm is not None:
                    out["labels"] = sm[0]
                    nodes.update({f"principal.labels.{k}": v for k, v in sm[1].items()})
            else:
                v = self.scalar(vnode, f"principal.{key}")
                if v is not ...:
                    out[key] = v
        for key in ("tenant", "agent"):
            if key not in m:
                self.problem(node, f"principal is missing required key {key!r}")
        if len(self.problems) > n:
            return None
        try:
            build_principal(out)
        except CaseError as e:
            self.problem(nodes.get(e.field, node), e.message)
            return None
        return out, nodes

    def test(self, node, hosts, default_principal, default_principal_node) -> Case | None:
        n = len(self.problems)
        m = self.mapping(node, "test", TEST_KEYS)
        if m is None:
            return None
        line = _pos(node)[0]
        name = None
        if "name" not in m:
            self.problem(node, "test is missing required key 'name'")
        else:
            name = self.scalar(m["name"][1], "test name")
            if isinstance(name, str) and not name.strip():
                self.problem(m["name"][1], "test name is empty")
        principal = None
        if "principal" in m:
            principal = self.principal(m["principal"][1])
        elif default_principal is not None:
            principal = default_principal
        elif default_principal_node is None:
            self.problem(node, "test is missing required key 'principal' (or give a file-level 'principal')")
        request = rnodes = None
        if "request" not in m:
            self.problem(node, "test is missing required key 'request'")
        else:
            rq = self.request(m["request"][1])
            if rq is not None:
                request, rnodes = rq
        addresses = None
        if "addresses" in m:
            anode = m["addresses"][1]
            if not isinstance(anode, yaml.SequenceNode):
                self.problem(anode, "addresses must be a list of IP addresses (what the host resolves to)")
            else:
                addresses = []
                for a in anode.value:
                    v = self.scalar(a, "address")
                    if v is ...:
                        continue
                    try:
                        classify(v)
                    except ValueError as e:
                        self.problem(a, f"address {v!r}: {e}")
                        continue
                    addresses.append(v)
        now = None
        if "now" in m:
            now = self.timestamp(m["now"][1])
        expect = None
        if "expect" not in m:
            self.problem(node, "test is missing required key 'expect'")
        else:
            expect = self.expect(m["expect"][1])
        if len(self.problems) > n or principal is None or request is None or expect is None or name is None:
            return None
        try:
            p, r, d = build_case(principal[0], request, addresses, hosts, now=now)
        except CaseError as e:
            where = rnodes.get(e.field) or principal[1].get(e.field)
            if where is None and e.field == "addresses":
                where = m["addresses"][1] if "addresses" in m else rnodes.get("request.url")
            self.problem(where if where is not None else node, e.message)
            return None
        return Case(self.name, line, name, p, r, d, expect)

    def request(self, node) -> tuple[dict, dict] | None:
        n = len(self.problems)
        m = self.mapping(node, "request", REQUEST_KEYS)
        if m is None:
            return None
        out, nodes = {}, {"request": node}
        for key, (_, vnode) in m.items():
            nodes[f"request.{key}"] = vnode
            if key == "headers":
                sm = self.string_map(vnode, "request.headers")
                if sm is not None:
                    out["headers"] = sm[0]
                    nodes.update({f"request.headers.{k}": v for k, v in sm[1].items()})
            else:
                v = self.scalar(vnode, f"request.{key}")
                if v is not ...:
                    out[key] = v
        if "url" not in m:
            self.problem(node, "request is missing required key 'url'")
        if len(self.problems) > n:
            return None
        try:
            build_request(out)
        except CaseError as e:
            self.problem(nodes.get(e.field, node), e.message)
            return None
        return out, nodes

    def timestamp(self, node) -> _dt.datetime | None:
        v = self.scalar(node, "now", types=(str, _dt.datetime))
        if v is ...:
            return None
        if isinstance(v, str):
            try:
                v = _dt.datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                self.problem(node, f"now must be a timestamp such as 2026-06-01T10:00:00Z, got {v!r}")
                return None
        if v.tzinfo is None:
            v = v.replace(tzinfo=_dt.timezone.utc)  # no offset: UTC
        return v.astimezone(_dt.timezone.utc)

    def rule_ref(self, node, what):
        v = self.scalar(node, what, null_ok=True)
        if v is ... or v is None:
            return v
        if v not in PSEUDO_RULES and self.rule_ids is not None and v not in self.rule_ids:
            near = sorted(r for r in self.rule_ids if r.split("/")[-1] == v.split("/")[-1])
            hint = f" (did you mean {', '.join(near)}?)" if near else \
                " (expected policy/rule, 'ssrf', 'dns' or null for default deny)"
            self.problem(node, f"{what}: no rule {v!r} in this policy set{hint}")
            return ...
        return v

    def outcome(self, m, what) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "decision" in m:
            v = self.scalar(m["decision"][1], f"{what}.decision")
            if v is not ... and v not in DECISIONS:
                self.problem(m["decision"][1], f"{what}.decision must be allow or deny, got {v!r}")
            elif v is not ...:
                out["decision"] = v
        if "code" in m:
            v = self.scalar(m["code"][1], f"{what}.code")
            if v is not ... and v not in CODES:
                self.problem(m["code"][1], f"{what}.code must be one of {', '.join(CODES)}, got {v!r}")
            elif v is not ...:
                out["code"] = v
        if "rule" in m:
            v = self.rule_ref(m["rule"][1], f"{what}.rule")
            if v is not ...:
                out["rule"] = v
        if "reason" in m:
            v = self.scalar(m["reason"][1], f"{what}.reason")
            if v is not ...:
                out["reason"] = v
        # expectations that can never hold
        dec, code, rule = out.get("decision"), out.get("code"), out.get("rule", ...)
        if dec == ALLOW and code not in (None, CODE_ALLOWED):
            self.problem(m["code"][1], f"{what}.code {code} never comes with decision allow")
        if dec == DENY and code == CODE_ALLOWED:
            self.problem(m["code"][1], f"{what}.code allowed never comes with decision deny")
        if dec == ALLOW and (rule is None or rule in PSEUDO_RULES):
            self.problem(m["rule"][1], f"{what}.rule {_show(rule)} never comes with decision allow "
                                       "(an allow always names its rule)")
        return out

    def expect(self, node) -> dict[str, Any] | None:
        n = len(self.problems)
        m = self.mapping(node, "expect", EXPECT_KEYS)
        if m is None:
            return None
        if "decision" not in m:
            self.problem(node, "expect is missing required key 'decision' (allow or deny)")
        out = self.outcome(m, "expect")
        if "secrets" in m:
            snode = m["secrets"][1]
            if not isinstance(snode, yaml.SequenceNode):
                self.problem(snode, "expect.secrets must be a list of secret reference names "
                                    "(e.g. [\"local:github/token\"]; [] for none)")
            else:
                from gateway.secrets.refs import RefError, parse_ref
                names = []
                for s in snode.value:
                    v = self.scalar(s, "expect.secrets entry")
                    if v is ...:
                        continue
                    try:
                        names.append(str(parse_ref(v)))
                    except RefError as e:
                        self.problem(s, f"expect.secrets: {v!r}: {e.message}")
                out["secrets"] = names
                if names and out.get("decision") == DENY:
                    self.problem(snode, "expect.secrets: a denied request injects nothing (use [] or leave it out)")
        if "dial" in m:
            dnode = m["dial"][1]
            v = self.scalar(dnode, "expect.dial", null_ok=True)
            if isinstance(v, str):
                try:
                    ipaddress.ip_address(v)
                except ValueError:
                    self.problem(dnode, f"expect.dial must be an IP address (or null), got {v!r}")
                if out.get("decision") == DENY:
                    self.problem(dnode, "expect.dial: a denied request is not dialled (use null or leave it out)")
            if v is not ...:
                out["dial"] = v
        if "shadow" in m:
            snode = m["shadow"][1]
            if isinstance(snode, yaml.ScalarNode) and snode.tag.endswith(":null"):
                out["shadow"] = None
            else:
                sm = self.mapping(snode, "expect.shadow", SHADOW_KEYS)
                if sm is not None:
                    if not sm:
                        self.problem(snode, "expect.shadow needs decision, code, rule or reason (or null: "
                                            "no shadow policy applies)")
                    out["shadow"] = self.outcome(sm, "expect.shadow")
        return out if len(self.problems) == n else None


def _name_node(node):
    for k, v in getattr(node, "value", ()):
        if isinstance(k, yaml.ScalarNode) and k.value == "name":
            return v
    return node


def load_tests(paths: Sequence[Path], rule_ids: set[str] | None = None) -> tuple[list[Case], list[Problem]]:
    """Every test of the given files, and every problem found (all files are checked)."""
    cases: list[Case] = []
    problems: list[Problem] = []
    for path in paths:
        f = _File(str(path), rule_ids)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(Problem(str(path), 0, 0, f"cannot read: {e}"))
            continue
        cases.extend(f.load(text))
        problems.extend(f.problems)
    return cases, problems


def rule_ids_of(ps) -> set[str]:
    return {f"{pol.name}/{rule.name}" for pol in ps.policies for rule in pol.rules}


# ---------------------------------------------------------------------------
# Running


def _same_address(a, b) -> bool:
    if a is None or b is None:
        return a is b
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _compare_outcome(prefix: str, expect: dict, actual: dict, failures: list) -> None:
    for key in ("decision", "code", "rule"):
        if key in expect and expect[key] != actual[key]:
            failures.append((prefix + key, expect[key], actual[key]))
    if "reason" in expect and expect["reason"] not in (actual["reason"] or ""):
        failures.append((prefix + "reason", expect["reason"], actual["reason"]))


def compare(expect: dict[str, Any], actual: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The fields where ``actual`` does not meet ``expect``: (field, expected, actual)."""
    failures: list[tuple[str, Any, Any]] = []
    _compare_outcome("", expect, actual, failures)
    if "secrets" in expect and sorted(set(expect["secrets"])) != sorted(set(actual["secrets"])):
        failures.append(("secrets", expect["secrets"], actual["secrets"]))
    if "dial" in expect and not _same_address(expect["dial"], actual["dial"]):
        failures.append(("dial", expect["dial"], actual["dial"]))
    if "shadow" in expect:
        es, acs = expect["shadow"], actual["shadow"]
        if es is None or acs is None:
            if es is not acs:
                failures.append(("shadow", es, acs))
        else:
            _compare_outcome("shadow.", es, acs, failures)
    return failures


def run_case(ps, case: Case) -> Result:
    t0 = time.perf_counter()
    d = ps.decide(case.principal, case.request, case.destination)
    seconds = time.perf_counter() - t0
    actual = decision_fields(d, case.request)
    return Result(case, actual, compare(case.expect, actual), seconds)


# ---------------------------------------------------------------------------
# Output


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return json.dumps(v) if (v == "" or v != v.strip() or v in ("null", "true", "false")) else v
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items() if x is not None) + "}"
    return str(v)


def failure_text(result: Result) -> str:
    """The diff of a failed test: expected vs actual per field, and the actual decision."""
    lines = []
    width = max(len(f) for f, _, _ in result.failures)
    for f, exp, act in result.failures:
        how = "expected to contain" if f.endswith("reason") else "expected"
        lines.append(f"{f:<{width}}  {how}: {_show(exp)}")
        lines.append(f"{'':<{width}}  {'actual':>{len(how)}}: {_show(act)}")
    lines.append("actual decision: " + outcome_text(result.actual))
    if result.actual["errors"]:
        lines.append("CEL errors on the way: " + "; ".join(result.actual["errors"]))
    return "\n".join(lines)


def outcome_text(a: Mapping[str, Any]) -> str:
    """``allow (allowed) by demo/demo-read: reason`` - one line for a decision."""
    by = f"by {a['rule']}" if a["rule"] else "no rule"
    return f"{a['decision']} ({a['code']}) {by}: {a['reason']}"


def result_dict(r: Result) -> dict[str, Any]:
    return {"file": r.case.file, "line": r.case.line, "name": r.case.name,
            "status": "pass" if r.passed else "fail",
            "failures": [{"field": f, "expected": e, "actual": a} for f, e, a in r.failures],
            "actual": r.actual}


def junit_xml(results: Sequence[Result], files: Sequence[str], problems: Sequence[str] = ()) -> str:
    """JUnit XML: one testsuite per test file, one testcase per test, a
    failure (with the diff) per failed test. ``problems`` (bad input) become
    one errored testcase so CI shows why nothing ran."""
    root = ET.Element("testsuites", name="egress policy test")
    total = failed = errors = 0
    total_time = 0.0
    for fname in files:
        rs = [r for r in results if r.case.file == fname]
        nfail = sum(not r.passed for r in rs)
        t = sum(r.seconds for r in rs)
        suite = ET.SubElement(root, "testsuite", name=fname, tests=str(len(rs)), failures=str(nfail),
                              errors="0", skipped="0", time=f"{t:.6f}", file=fname)
        for r in rs:
            tc = ET.SubElement(suite, "testcase", name=r.case.name, classname=_classname(fname),
                               file=fname, line=str(r.case.line), time=f"{r.seconds:.6f}")
            if not r.passed:
                first = r.failures[0]
                msg = f"{first[0]}: expected {_show(first[1])}, got {_show(first[2])}"
                if len(r.failures) > 1:
                    msg += f" (and {len(r.failures) - 1} more)"
                fe = ET.SubElement(tc, "failure", message=msg, type="PolicyTestFailure")
                fe.text = failure_text(r)
        total += len(rs)
        failed += nfail
        total_time += t
    if problems:
        suite = ET.SubElement(root, "testsuite", name="egress policy test", tests="1", failures="0",
                              errors="1", skipped="0", time="0")
        tc = ET.SubElement(suite, "testcase", name="load policies and tests", classname="egress.policy.test")
        err = ET.SubElement(tc, "error", message=problems[0], type="BadInput")
        err.text = "\n".join(problems)
        total += 1
        errors += 1
    root.set("tests", str(total))
    root.set("failures", str(failed))
    root.set("errors", str(errors))
    root.set("time", f"{total_time:.6f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _classname(fname: str) -> str:
    name = Path(fname).name
    for s in TEST_SUFFIXES:
        if name.endswith(s):
            name = name[: -len(s)]
            break
    return "policy." + name.replace(".", "_")


# ---------------------------------------------------------------------------
# The command


class BadInput(Exception):
    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.message = message
        self.problems = list(problems)


def prepare(directory: str | Path, engine: str = "rust", run: str | None = None):
    """Load the policies and their tests: (policy set, test files, selected
    cases). Raises BadInput (exit 2) with every problem found."""
    from gateway import celexpr
    from gateway.policy.loader import PolicyLoadError, load_directory

    d = Path(directory)
    if not d.is_dir():
        raise BadInput(f"{d} is not a directory")
    try:
        ps = load_directory(d, engine=celexpr.make_engine(engine))
    except PolicyLoadError as e:
        raise BadInput(f"the policies in {d} do not load ({len(e.problems)} problem(s)); no test ran",
                       [str(p) for p in e.problems]) from None
    files = test_files(d)
    if not files:
        raise BadInput(f"no test files in {d} (expected files named *.test.yaml, *.test.yml, *_test.yaml "
                       f"or *_test.yml next to the policies)")
    cases, problems = load_tests(files, rule_ids_of(ps))
    if problems:
        raise BadInput(f"{len(problems)} problem(s) in the test files; no test ran", [str(p) for p in problems])
    if run is not None:
        try:
            rx = re.compile(run)
        except re.error as e:
            raise BadInput(f"--run: invalid regular expression {run!r}: {e}") from None
        cases = [c for c in cases if rx.search(c.name)]
        if not cases:
            raise BadInput(f"no test name matches --run {run!r}")
    return ps, [str(f) for f in files], cases


def cmd_policy_test(args) -> int:
    fmt = args.format
    try:
        ps, files, cases = prepare(args.directory, args.engine, args.run)
    except BadInput as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        print(f"egress: error: {e.message}", file=sys.stderr)
        if fmt == "json":
            print(json.dumps({"ok": False, "error": e.message, "problems": e.problems}, indent=1))
        xml = junit_xml([], [], e.problems or [e.message])
        if fmt == "junit":
            sys.stdout.write(xml)
        if args.junit:
            _write(args.junit, xml)
        return 2
    results = [run_case(ps, c) for c in cases]
    failed = [r for r in results if not r.passed]
    used_files = [f for f in files if any(c.file == f for c in cases)]
    summary = {"tests": len(results), "passed": len(results) - len(failed), "failed": len(failed),
               "files": len(used_files)}
    notes = clock_notes(ps, cases)
    if fmt == "json":
        print(json.dumps({"ok": not failed, "policy_version": ps.version, "engine": args.engine,
                          "summary": summary, "notes": notes, "results": [result_dict(r) for r in results]},
                         indent=1))
    elif fmt == "junit":
        sys.stdout.write(junit_xml(results, used_files))
    else:
        for r in results:
            if r.passed and args.quiet:
                continue
            print(f"{'PASS' if r.passed else 'FAIL'}  {r.case.file}:{r.case.line}  {r.case.name}")
            if not r.passed:
                print("      " + failure_text(r).replace("\n", "\n      "))
        for n in notes:
            print(f"note: {n}")
        print(f"{_n(summary['tests'], 'test')} in {_n(summary['files'], 'file')}: {summary['passed']} passed, "
              f"{summary['failed']} failed (policies {ps.version}, engine {args.engine})")
    if args.junit:
        _write(args.junit, junit_xml(results, used_files))
    return 1 if failed else 0


def clock_notes(ps, cases: Sequence[Case]) -> list[str]:
    """A warning when rules read ``now`` and some tests give no ``now:`` (they
    are decided at the current time, so they may pass today and fail later)."""
    rules = [r.id for pol in ps.policies for r in pol.rules if r.use is not None and "now" in r.use.variables()]
    unpinned = sum(1 for c in cases if c.request.at is None)
    if not rules or not unpinned:
        return []
    return [f"rule(s) {', '.join(rules)} read `now`; {_n(unpinned, 'test')} without `now:` "
            f"{'was' if unpinned == 1 else 'were'} decided at the current time"]


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        print(f"egress: error: cannot write {path}: {e.strerror}", file=sys.stderr)


def register(policy_subparsers, fmt) -> None:
    t = policy_subparsers.add_parser(
        "test", formatter_class=fmt, help="run the table-driven tests next to the policies (*.test.yaml)",
        description="Run the policy tests in DIR (files named *.test.yaml, *.test.yml, *_test.yaml, *_test.yml) "
                    "against the policies in DIR, with the gateway's decision code. Tests never use DNS or the "
                    "network.",
        epilog="""examples:
  egress policy test policies/default
  egress policy test policies/default --run 'metadata|ssrf'
  egress policy test policies/default --junit policy-tests.xml     # text on stdout, JUnit XML for CI
  egress policy test policies/default --format json --engine python

a test file:
  tests:
    - name: demo agent reads the demo server
      principal: {tenant: demo, agent: a1}
      request: {method: GET, url: "http://demo.localhost:8000/"}
      expect: {decision: allow, rule: demo/demo-read, dial: 127.0.0.1}

exit status: 0 all passed, 1 some test failed, 2 bad input (policies do not load,
invalid test file, no test files, --run selects nothing)""")
    t.add_argument("directory", help="policy directory holding the policies and their *.test.yaml files")
    t.add_argument("--format", choices=("text", "json", "junit"), default="text",
                   help="text (default): a line per test and a diff per failure; json; junit (XML)")
    t.add_argument("--junit", metavar="FILE", help="also write JUnit XML to FILE (one testsuite per test file)")
    t.add_argument("--engine", choices=("rust", "python"), default="rust", help="CEL engine (default rust)")
    t.add_argument("--run", metavar="REGEX", help="run only the tests whose name matches REGEX (re.search)")
    t.add_argument("-q", "--quiet", action="store_true", help="text: print only failures and the summary")
    t.set_defaults(func=cmd_policy_test)


__all__ = ["CaseError", "build_case", "build_principal", "build_request", "build_destination",
           "decision_fields", "secret_names", "load_tests", "run_case", "register"]
