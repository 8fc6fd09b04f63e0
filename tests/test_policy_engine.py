"""PolicySet.decide / could_allow: precedence, fail-closed errors, shadow mode,
SSRF, versions, the tenant/host indexes (checked against a brute-force
reference with Hypothesis) and the default bundle."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import celexpr
from gateway.addresses import classify, is_internal
from gateway.policy import (
    Destination, PolicySet, Principal, Request, compile_sources, empty_policy_set, load_directory,
)
from gateway.policy.engine import DEFAULT_DENY_REASON
from gateway.policy.loader import version_of
from gateway.resolver import Resolver

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO / "policies" / "default"

# ---------------------------------------------------------------------------
# helpers


def policy_doc(name: str, rules: list[dict], selector: str = "true", mode: str = "enforce") -> str:
    return yaml.safe_dump({"apiVersion": "egress/v1", "kind": "Policy", "name": name, "mode": mode,
                           "selector": selector, "rules": rules}, sort_keys=False)


def rule(name: str, action: str, when: str, reason: str | None = None,
         allow_internal: list[str] | None = None) -> dict:
    r = {"name": name, "action": action, "when": when}
    if reason is not None:
        r["reason"] = reason
    if allow_internal is not None:
        r["allow_internal"] = allow_internal
    return r


def build(*docs: str, engine=None) -> PolicySet:
    """One file per document, named so that name order is argument order."""
    return compile_sources([(f"{i:02d}-policy.yaml", text) for i, text in enumerate(docs)], engine=engine)


def dest(*ips: str, via: str = "dns") -> Destination:
    return Destination(tuple(classify(ip) for ip in ips), via=via)


PUBLIC = dest("93.184.216.34")
PUBLIC2 = dest("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946")
PRIVATE = dest("10.0.0.5")
LOOPBACK = dest("127.0.0.1", "::1", via="localhost")
METADATA = dest("169.254.169.254", via="literal")
DNS_FAIL = Destination(error="cannot resolve nowhere.invalid: Name or service not known")

ALICE = Principal.make("acme", "agent-1", session="s1", labels={"team": "red"}, token_id="tok-1")
BOB = Principal.make("beta", "agent-2")


def req(host: str = "api.example.com", method: str = "GET", **kw) -> Request:
    kw.setdefault("port", 443)
    return Request(host=host, method=method, **kw)


ALLOW_ALL = policy_doc("open", [rule("all", "allow", "true")])


# ---------------------------------------------------------------------------
# default deny, allow, precedence


def test_empty_policy_set_denies_everything():
    ps = empty_policy_set()
    d = ps.decide(ALICE, req(), PUBLIC)
    assert (d.action, d.code, d.rule, d.reason) == ("deny", "default_deny", None, DEFAULT_DENY_REASON)
    assert d.policy_version == "none"
    assert not d.allowed and d.dial is None


def test_default_deny_when_nothing_matches():
    ps = build(policy_doc("p", [rule("gh", "allow", 'request.host == "github.com"')]))
    d = ps.decide(ALICE, req("gitlab.com"), PUBLIC)
    assert (d.action, d.code, d.rule) == ("deny", "default_deny", None)
    assert d.policy_version == ps.version


def test_allow_records_rule_reason_and_dial():
    ps = build(policy_doc("p", [
        rule("gh", "allow", 'request.host == "github.com"', reason="code hosting"),
        rule("other", "allow", 'request.host == "gitlab.com"'),
    ]))
    d = ps.decide(ALICE, req("github.com"), PUBLIC2)
    assert (d.action, d.code, d.rule, d.reason) == ("allow", "allowed", "p/gh", "code hosting")
    assert d.allowed and d.dial == "93.184.216.34"
    d = ps.decide(ALICE, req("gitlab.com"), PUBLIC)
    assert (d.rule, d.reason) == ("p/other", "allowed by rule p/other")
    assert d.to_dict() == {"decision": "allow", "code": "allowed", "rule": "p/other",
                           "reason": "allowed by rule p/other", "policy_version": ps.version}


def test_enforcing_deny_beats_any_allow_whatever_the_order():
    allow = policy_doc("a-allow", [rule("all", "allow", "true")])
    deny = policy_doc("z-deny", [rule("no-post", "deny", 'request.method == "POST"', reason="read only")])
    for ps in (build(allow, deny), build(deny, allow)):
        d = ps.decide(ALICE, req(method="POST"), PUBLIC)
        assert (d.action, d.code, d.rule, d.reason) == ("deny", "policy_deny", "z-deny/no-post", "read only")
        assert ps.decide(ALICE, req(method="GET"), PUBLIC).rule == "a-allow/all"
    # and inside one policy, a deny after the allow still wins
    ps = build(policy_doc("p", [rule("all", "allow", "true"), rule("no-post", "deny", 'request.method == "POST"')]))
    d = ps.decide(ALICE, req(method="POST"), PUBLIC)
    assert (d.code, d.rule, d.reason) == ("policy_deny", "p/no-post", "denied by rule p/no-post")


def test_first_matching_allow_is_recorded_files_then_rules_in_order():
    first = policy_doc("first", [rule("narrow", "allow", 'request.method == "PUT"'),
                                 rule("gh", "allow", 'request.host.endsWith("github.com")')])
    second = policy_doc("second", [rule("everything", "allow", "true")])
    ps = build(first, second)
    assert ps.decide(ALICE, req("api.github.com"), PUBLIC).rule == "first/gh"
    assert ps.decide(ALICE, req("api.github.com", "PUT"), PUBLIC).rule == "first/narrow"
    assert ps.decide(ALICE, req("example.org"), PUBLIC).rule == "second/everything"
    # the first of two denies is the one recorded
    ps = build(policy_doc("d", [rule("d1", "deny", 'request.method == "DELETE"'), rule("d2", "deny", "true")]))
    assert ps.decide(ALICE, req(method="DELETE"), PUBLIC).rule == "d/d1"
    assert ps.decide(ALICE, req(method="GET"), PUBLIC).rule == "d/d2"


def test_files_in_name_order_decide_which_allow_wins(tmp_path):
    (tmp_path / "20-b.yaml").write_text(policy_doc("b", [rule("all", "allow", "true")]))
    (tmp_path / "10-a.yaml").write_text(policy_doc("a", [rule("all", "allow", "true")]))
    ps = load_directory(tmp_path)
    assert ps.decide(ALICE, req(), PUBLIC).rule == "a/all"


def test_selector_restricts_policies_to_principals():
    ps = build(policy_doc("acme", [rule("all", "allow", "true")], selector='principal.tenant == "acme"'),
               policy_doc("red", [rule("all", "allow", "true")],
                          selector='"team" in principal.labels && principal.labels.team == "red"'))
    assert ps.applicable(ALICE) == ["acme", "red"]
    assert ps.applicable(BOB) == []
    assert ps.decide(ALICE, req(), PUBLIC).rule == "acme/all"
    assert ps.decide(BOB, req(), PUBLIC).code == "default_deny"
    carol = Principal.make("other", "a", labels={"team": "red"})
    assert ps.decide(carol, req(), PUBLIC).rule == "red/all"


def test_every_principal_field_is_visible_to_selectors_and_rules():
    p = Principal.make("acme", "agent-9", session="sess-1", labels={"env": "prod"}, token_id="tid-7",
                       source="binding")
    cond = ('principal.tenant == "acme" && principal.agent == "agent-9" && principal.session == "sess-1"'
            ' && principal.labels.env == "prod" && principal.token_id == "tid-7"'
            ' && principal.source == "binding"')
    ps = build(policy_doc("p", [rule("r", "allow", cond)], selector=cond))
    assert ps.decide(p, req(), PUBLIC).rule == "p/r"
    assert ps.decide(Principal.make("acme", "agent-9"), req(), PUBLIC).code == "default_deny"


def test_every_request_field_is_visible_to_rules():
    r = Request(host="api.example.com", port=8443, scheme="http", method="PATCH", path="/v1/items",
                query="a=1", headers={"x-team": "red", "content-type": "text/plain"},
                sni="api.example.com", mode="transparent",
                at=dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.timezone.utc))
    cond = ('request.host == "api.example.com" && request.port == 8443 && request.scheme == "http"'
            ' && request.method == "PATCH" && request.path.startsWith("/v1/") && request.query == "a=1"'
            ' && request.headers["x-team"] == "red" && request.sni == request.host'
            ' && request.mode == "transparent" && now > timestamp("2030-01-01T00:00:00Z")')
    ps = build(policy_doc("p", [rule("r", "allow", cond)]))
    assert ps.decide(ALICE, r, PUBLIC).rule == "p/r"


def test_destination_fields_are_visible_to_rules():
    ps = build(policy_doc("p", [
        rule("pub", "allow", 'destination.ip_class == "public" && !destination.internal'
                             ' && destination.via == "dns" && destination.ip == destination.ips[0]'
                             ' && size(destination.ips) == 2'),
        rule("no-literal", "deny", 'destination.via == "literal"'),
    ]))
    assert ps.decide(ALICE, req(), PUBLIC2).rule == "p/pub"
    assert ps.decide(ALICE, req(), PUBLIC).code == "default_deny"
    assert ps.decide(ALICE, req("1.2.3.4"), dest("1.2.3.4", via="literal")).rule == "p/no-literal"


def test_now_is_the_request_time():
    ps = build(policy_doc("p", [rule("until-2030", "allow", 'now < timestamp("2030-01-01T00:00:00Z")'),
                                rule("office-hours", "deny", "now.getHours() < 8")]))
    at = lambda *a: req(at=dt.datetime(*a, tzinfo=dt.timezone.utc))  # noqa: E731
    assert ps.decide(ALICE, at(2029, 12, 31, 12), PUBLIC).rule == "p/until-2030"
    assert ps.decide(ALICE, at(2030, 1, 1, 12), PUBLIC).code == "default_deny"
    assert ps.decide(ALICE, at(2029, 12, 31, 7), PUBLIC).rule == "p/office-hours"
    # without ``at``, now is the current time
    ps = build(policy_doc("p", [rule("since-2020", "allow", 'now > timestamp("2020-01-01T00:00:00Z")')]))
    assert ps.decide(ALICE, req(), PUBLIC).rule == "p/since-2020"


def test_header_names_are_lowercase_and_missing_headers_are_absent():
    ps = build(policy_doc("p", [
        rule("key", "allow", '"x-api-key" in request.headers && request.headers["x-api-key"] == "k1"'),
        rule("cookie", "deny", "has(request.headers.cookie)"),
    ]))
    assert ps.decide(ALICE, req(headers={"x-api-key": "k1", "accept": "*/*"}), PUBLIC).rule == "p/key"
    assert ps.decide(ALICE, req(headers={"x-api-key": "k2"}), PUBLIC).code == "default_deny"
    assert ps.decide(ALICE, req(headers={"x-api-key": "k1", "cookie": "a=b"}), PUBLIC).rule == "p/cookie"
    assert ps.decide(ALICE, req(headers={}), PUBLIC).code == "default_deny"


def test_rules_reading_all_headers_see_all_headers():
    # one rule names a header, another iterates over all of them: pruning the
    # headers to the named one must not hide the others from the second rule
    ps = build(policy_doc("p", [
        rule("named", "allow", 'request.headers["x-a"] == "1"'),
        rule("any-debug", "deny", 'request.headers.exists(h, h.startsWith("x-debug"))'),
    ]))
    assert ps.decide(ALICE, req(headers={"x-a": "1"}), PUBLIC).rule == "p/named"
    assert ps.decide(ALICE, req(headers={"x-a": "1", "x-debug-me": "y"}), PUBLIC).rule == "p/any-debug"


# ---------------------------------------------------------------------------
# errors fail closed


def test_evaluation_error_is_no_match_for_allow():
    ps = build(policy_doc("p", [rule("needs-header", "allow", 'request.headers["x-team"] == "red"')]))
    d = ps.decide(ALICE, req(headers={}), PUBLIC)
    assert (d.action, d.code) == ("deny", "default_deny")
    assert len(d.errors) == 1 and d.errors[0].startswith("p/needs-header: ")
    assert ps.decide(ALICE, req(headers={"x-team": "red"}), PUBLIC).allowed


def test_evaluation_error_is_a_match_for_deny():
    ps = build(policy_doc("p", [rule("all", "allow", "true"),
                                rule("odd", "deny", 'request.headers["x-team"] != "red"'),
                                rule("div", "deny", "request.port / (request.port - 443) > 1")]))
    d = ps.decide(ALICE, req(headers={}), PUBLIC)
    assert (d.action, d.code, d.rule) == ("deny", "policy_deny", "p/odd")
    assert any(e.startswith("p/odd: ") for e in d.errors)
    d = ps.decide(ALICE, req(headers={"x-team": "red"}), PUBLIC)  # 443 / 0
    assert (d.code, d.rule) == ("policy_deny", "p/div")
    assert ps.decide(ALICE, req(headers={"x-team": "red"}, port=8443), PUBLIC).allowed


def test_non_boolean_when_is_an_error():
    ps = build(policy_doc("p", [rule("a", "allow", "request.port")]))
    d = ps.decide(ALICE, req(), PUBLIC)
    assert d.code == "default_deny" and "bool" in d.errors[0]
    ps = build(policy_doc("p", [rule("a", "allow", "true"), rule("d", "deny", "request.host")]))
    assert ps.decide(ALICE, req(), PUBLIC).rule == "p/d"


def test_selector_error_applies_only_the_deny_rules():
    sel = 'principal.labels["team"] == "red"'  # an error for a principal without the label
    ps = build(policy_doc("p", [rule("all", "allow", "true"),
                                rule("no-post", "deny", 'request.method == "POST"')], selector=sel),
               policy_doc("fallback", [rule("get", "allow", 'request.method == "GET"')]))
    nolabel = Principal.make("acme", "a")
    assert ps.applicable(nolabel) == ["p", "fallback"]
    d = ps.decide(nolabel, req(method="PUT"), PUBLIC)
    assert d.code == "default_deny"  # p/all is skipped
    assert any(e.startswith("p/selector: ") for e in d.errors)
    assert ps.decide(nolabel, req(method="POST"), PUBLIC).rule == "p/no-post"
    assert ps.decide(nolabel, req(method="GET"), PUBLIC).rule == "fallback/get"
    # with the label the selector is true and the allow applies
    assert ps.decide(ALICE, req(method="PUT"), PUBLIC).rule == "p/all"
    # a false selector applies nothing at all
    other = Principal.make("acme", "a", labels={"team": "blue"})
    assert ps.decide(other, req(method="POST"), PUBLIC).code == "default_deny"


def test_non_boolean_selector_is_an_error():
    ps = build(policy_doc("p", [rule("all", "allow", "true"), rule("d", "deny", 'request.method == "POST"')],
                          selector="principal.tenant"))
    d = ps.decide(ALICE, req(), PUBLIC)
    assert d.code == "default_deny" and "selector must be a bool" in d.errors[0]
    assert ps.decide(ALICE, req(method="POST"), PUBLIC).rule == "p/d"


def test_selectors_see_only_the_principal():
    ps = build(policy_doc("p", [rule("all", "allow", "true"), rule("d", "deny", "true")],
                          selector='request.host == "x"'))
    d = ps.decide(ALICE, req("x"), PUBLIC)
    assert (d.code, d.rule) == ("policy_deny", "p/d")  # selector error: deny rules only


# ---------------------------------------------------------------------------
# shadow mode


def test_shadow_policies_never_decide_but_are_reported():
    shadow_deny = policy_doc("try-deny", [rule("no-get", "deny", 'request.method == "GET"', reason="trial")],
                             mode="shadow")
    ps = build(ALLOW_ALL, shadow_deny)
    d = ps.decide(ALICE, req(), PUBLIC)
    assert (d.action, d.rule) == ("allow", "open/all")
    assert (d.shadow.action, d.shadow.code, d.shadow.rule, d.shadow.reason) == \
        ("deny", "policy_deny", "try-deny/no-get", "trial")
    assert d.to_dict()["shadow"] == {"decision": "deny", "code": "policy_deny", "rule": "try-deny/no-get",
                                     "reason": "trial"}
    d = ps.decide(ALICE, req(method="HEAD"), PUBLIC)
    assert d.allowed and (d.shadow.action, d.shadow.rule) == ("allow", "open/all")

    shadow_allow = policy_doc("try-allow", [rule("gh", "allow", 'request.host == "github.com"')], mode="shadow")
    ps = build(shadow_allow)
    d = ps.decide(ALICE, req("github.com"), PUBLIC)
    assert (d.action, d.code) == ("deny", "default_deny")
    assert (d.shadow.action, d.shadow.rule) == ("allow", "try-allow/gh")
    # a shadow allow that would be stopped by SSRF is reported that way
    assert ps.decide(ALICE, req("github.com"), PRIVATE).shadow.code == "ssrf_blocked"


def test_no_shadow_outcome_without_an_applicable_shadow_policy():
    ps = build(ALLOW_ALL, policy_doc("s", [rule("d", "deny", "true")], mode="shadow",
                                     selector='principal.tenant == "beta"'))
    assert ps.decide(ALICE, req(), PUBLIC).shadow is None
    assert "shadow" not in ps.decide(ALICE, req(), PUBLIC).to_dict()
    assert ps.decide(BOB, req(), PUBLIC).shadow.rule == "s/d"


def test_shadow_outcome_is_the_set_as_if_every_policy_enforced():
    ps = build(policy_doc("s-allow", [rule("gh", "allow", 'request.host == "github.com"')], mode="shadow"),
               policy_doc("e", [rule("all", "allow", "true"), rule("no-put", "deny", 'request.method == "PUT"')]),
               policy_doc("s-deny", [rule("no-head", "deny", 'request.method == "HEAD"')], mode="shadow"))
    d = ps.decide(ALICE, req("github.com"), PUBLIC)
    assert (d.rule, d.shadow.rule) == ("e/all", "s-allow/gh")  # the first allow in order
    d = ps.decide(ALICE, req("github.com", "PUT"), PUBLIC)
    assert (d.rule, d.shadow.rule) == ("e/no-put", "e/no-put")
    d = ps.decide(ALICE, req("github.com", "HEAD"), PUBLIC)
    assert (d.action, d.rule, d.shadow.action, d.shadow.rule) == ("allow", "e/all", "deny", "s-deny/no-head")


# ---------------------------------------------------------------------------
# SSRF and DNS


@pytest.mark.parametrize("destination,klass", [
    (PRIVATE, "private"), (LOOPBACK, "loopback"), (METADATA, "metadata"),
    (dest("169.254.1.1"), "link local"), (dest("100.64.0.1"), "cgnat"), (dest("::ffff:127.0.0.1"), "loopback"),
    (dest("93.184.216.34", "10.1.2.3"), "private"),  # one internal address among public ones is enough
])
def test_allowed_request_to_internal_address_is_ssrf_blocked(destination, klass):
    ps = build(ALLOW_ALL)
    d = ps.decide(ALICE, req(), destination)
    assert (d.action, d.code, d.rule) == ("deny", "ssrf_blocked", "ssrf")
    assert klass in d.reason and d.dial is None


def test_allow_internal_covers_internal_ranges():
    ps = build(policy_doc("p", [rule("lan", "allow", 'request.host.endsWith(".corp")',
                                     allow_internal=["10.0.0.0/8", "::1/128", "127.0.0.0/8"])]))
    d = ps.decide(ALICE, req("git.corp"), PRIVATE)
    assert (d.code, d.rule, d.dial) == ("allowed", "p/lan", "10.0.0.5")
    assert ps.decide(ALICE, req("git.corp"), LOOPBACK).allowed
    assert ps.decide(ALICE, req("git.corp"), dest("192.168.1.1")).code == "ssrf_blocked"
    assert ps.decide(ALICE, req("git.corp"), METADATA).code == "ssrf_blocked"
    # every internal address must be covered
    assert ps.decide(ALICE, req("git.corp"), dest("10.0.0.1", "192.168.0.1")).code == "ssrf_blocked"
    # public addresses need no cover
    assert ps.decide(ALICE, req("git.corp"), dest("10.0.0.1", "93.184.216.34")).dial == "10.0.0.1"


def test_ipv4_ranges_do_not_cover_ipv6_addresses():
    ps = build(policy_doc("p", [rule("lo", "allow", "true", allow_internal=["127.0.0.0/8"])]))
    assert ps.decide(ALICE, req(), dest("127.0.0.1")).allowed
    assert ps.decide(ALICE, req(), dest("::1")).code == "ssrf_blocked"
    assert ps.decide(ALICE, req(), LOOPBACK).code == "ssrf_blocked"


@pytest.mark.parametrize("address", ["::ffff:169.254.169.254", "2002:a9fe:a9fe::", "64:ff9b::a9fe:a9fe",
                                     "::ffff:10.0.0.1"])
def test_allowing_an_ipv6_embedding_prefix_does_not_open_the_embedded_ipv4(address):
    ps = build(policy_doc("p", [rule("v6", "allow", "true",
                                     allow_internal=["::ffff:0:0/96", "2002::/16", "64:ff9b::/96"])]))
    assert ps.decide(ALICE, req(), dest(address)).code == "ssrf_blocked"
    assert ps.could_allow(ALICE, "x", dest(address)).code == "ssrf_blocked"
    # naming the embedded IPv4 range as well opens it
    ps = build(policy_doc("p", [rule("v6", "allow", "true", allow_internal=[
        "::ffff:0:0/96", "2002::/16", "64:ff9b::/96", "169.254.169.254/32", "10.0.0.0/8"])]))
    assert ps.decide(ALICE, req(), dest(address)).allowed


def test_only_the_winning_rules_allow_internal_counts():
    ps = build(policy_doc("p", [rule("web", "allow", "true"),
                                rule("lan", "allow", "true", allow_internal=["10.0.0.0/8"])]))
    d = ps.decide(ALICE, req(), PRIVATE)
    assert (d.code, d.rule) == ("ssrf_blocked", "ssrf")
    ps = build(policy_doc("p", [rule("lan", "allow", "true", allow_internal=["10.0.0.0/8"]),
                                rule("web", "allow", "true")]))
    assert ps.decide(ALICE, req(), PRIVATE).rule == "p/lan"


def test_dns_failure():
    ps = build(ALLOW_ALL)
    d = ps.decide(ALICE, req("nowhere.invalid"), DNS_FAIL)
    assert (d.action, d.code, d.rule, d.reason) == ("deny", "dns_failure", "dns", DNS_FAIL.error)
    d = ps.decide(ALICE, req(), Destination())
    assert (d.code, d.rule) == ("dns_failure", "dns")


def test_policy_deny_comes_before_dns_and_ssrf():
    ps = build(ALLOW_ALL, policy_doc("d", [rule("no-post", "deny", 'request.method == "POST"')]))
    assert ps.decide(ALICE, req(method="POST"), DNS_FAIL).code == "policy_deny"
    assert ps.decide(ALICE, req(method="POST"), METADATA).code == "policy_deny"
    # and with nothing allowed, the answer is default deny whatever the destination
    assert build(policy_doc("x", [rule("n", "allow", "false")])).decide(ALICE, req(), DNS_FAIL).code \
        == "default_deny"


# ---------------------------------------------------------------------------
# could_allow (the CONNECT pre-check)


def test_could_allow():
    ps = build(policy_doc("p", [
        rule("gh", "allow", 'request.host == "github.com" && request.method == "GET"'),
        rule("corp", "allow", 'request.host.endsWith(".corp")', allow_internal=["10.0.0.0/8"]),
        rule("deny-all", "deny", "true"),
    ]), policy_doc("s", [rule("any", "allow", "true")], mode="shadow"))
    assert ps.could_allow(ALICE, "github.com", PUBLIC) is None  # method unknown before TLS
    o = ps.could_allow(ALICE, "gitlab.com", PUBLIC)  # shadow allows do not count
    assert (o.action, o.code, o.rule) == ("deny", "default_deny", None)
    assert "gitlab.com" in o.reason
    assert ps.could_allow(ALICE, "git.corp", PRIVATE) is None
    o = ps.could_allow(ALICE, "github.com", PRIVATE)
    assert (o.code, o.rule) == ("ssrf_blocked", "ssrf")
    assert ps.could_allow(ALICE, "git.corp", dest("192.168.0.1")).code == "ssrf_blocked"
    o = ps.could_allow(ALICE, "github.com", DNS_FAIL)
    assert (o.code, o.rule, o.reason) == ("dns_failure", "dns", DNS_FAIL.error)
    # a principal no policy applies to
    other = build(policy_doc("p", [rule("all", "allow", "true")], selector='principal.tenant == "beta"'))
    assert other.could_allow(ALICE, "github.com", PUBLIC).code == "default_deny"
    assert other.could_allow(BOB, "github.com", PUBLIC) is None


def test_could_allow_ignores_allow_rules_of_a_policy_whose_selector_errors():
    ps = build(policy_doc("p", [rule("all", "allow", "true")], selector='principal.labels["x"] == "y"'))
    assert ps.could_allow(ALICE, "github.com", PUBLIC).code == "default_deny"


# ---------------------------------------------------------------------------
# versions


def test_every_decision_carries_the_policy_set_version():
    sources = [("00-open.yaml", ALLOW_ALL)]
    ps = compile_sources(sources)
    assert ps.version == version_of(sources) and ps.version.startswith("sha256:")
    for destination in (PUBLIC, PRIVATE, DNS_FAIL):
        assert ps.decide(ALICE, req(), destination).policy_version == ps.version
    assert compile_sources([("00-open.yaml", ALLOW_ALL + "\n# changed\n")]).version != ps.version


# ---------------------------------------------------------------------------
# The tenant and host indexes, the field pruning and the early exits must never
# change a decision: compare with a brute-force reference that evaluates every
# applicable rule in order against the full input.

TENANTS = ["acme", "beta", "demo", "zeta"]
HOSTS = ["api.github.com", "github.com", "pypi.org", "files.pythonhosted.org", "example.com",
         "x.example.com", "a.b.example.com", "evil.test", "demo.localhost"]
SUFFIXES = [".example.com", "github.com", ".org", "com", "", "test"]
METHODS = ["GET", "HEAD", "POST", "DELETE"]


def q(s: str) -> str:
    return '"' + s + '"'


def _host_atom():
    return st.one_of(
        st.sampled_from(HOSTS).map(lambda h: f"request.host == {q(h)}"),
        st.sampled_from(HOSTS).map(lambda h: f"{q(h)} == request.host"),
        st.lists(st.sampled_from(HOSTS), max_size=3).map(
            lambda hs: "request.host in [" + ", ".join(map(q, hs)) + "]"),
        st.sampled_from(SUFFIXES).map(lambda s: f"request.host.endsWith({q(s)})"),
        st.sampled_from(["api.", "x", "e"]).map(lambda s: f"request.host.startsWith({q(s)})"),
        st.sampled_from(METHODS).map(lambda m: f"request.method == {q(m)}"),
        st.lists(st.sampled_from(METHODS), min_size=1, max_size=2).map(
            lambda ms: "request.method in [" + ", ".join(map(q, ms)) + "]"),
        st.sampled_from(TENANTS).map(lambda t: f"principal.tenant == {q(t)}"),
        st.just('request.headers["x-flag"] == "on"'),  # an error when the header is missing
        st.just('"x-flag" in request.headers'),
        st.just("request.port / (request.port - 443) == 0"),  # an error on port 443
        st.just("destination.internal"),
        st.sampled_from(["true", "false"]),
    )


def _combine(inner):
    return st.one_of(
        st.tuples(inner, inner).map(lambda ab: f"{ab[0]} && {ab[1]}"),
        st.tuples(inner, inner).map(lambda ab: f"{ab[0]} || {ab[1]}"),
        inner.map(lambda a: f"({a})"),
        inner.map(lambda a: f"!({a})"),
    )


WHEN = st.recursive(_host_atom(), _combine, max_leaves=4)

SELECTOR = st.recursive(st.one_of(
    st.just("true"),
    st.sampled_from(TENANTS).map(lambda t: f"principal.tenant == {q(t)}"),
    st.lists(st.sampled_from(TENANTS), max_size=3).map(
        lambda ts: "principal.tenant in [" + ", ".join(map(q, ts)) + "]"),
    st.sampled_from(["a", "o"]).map(lambda s: f"principal.tenant.endsWith({q(s)})"),
    st.just('principal.labels["team"] == "red"'),  # an error without the label
    st.just('"team" in principal.labels'),
), _combine, max_leaves=3)


@st.composite
def policy_sets(draw):
    docs = []
    for pi in range(draw(st.integers(1, 4))):
        rules = []
        for ri in range(draw(st.integers(1, 4))):
            action = draw(st.sampled_from(["allow", "allow", "deny"]))
            internal = draw(st.sampled_from([None, ["10.0.0.0/8"], ["127.0.0.0/8", "::1/128"]])) \
                if action == "allow" else None
            rules.append(rule(f"r{ri}", action, draw(WHEN), allow_internal=internal))
        docs.append(policy_doc(f"p{pi}", rules, selector=draw(SELECTOR),
                               mode=draw(st.sampled_from(["enforce", "enforce", "shadow"]))))
    return docs


@st.composite
def inputs(draw):
    labels = draw(st.sampled_from([{}, {"team": "red"}, {"team": "blue"}]))
    principal = Principal.make(draw(st.sampled_from(TENANTS + ["other"])), "agent", labels=labels)
    host = draw(st.one_of(st.sampled_from(HOSTS),
                          st.sampled_from(HOSTS).map(lambda h: "sub." + h),
                          st.sampled_from(["org", "com", "xgithub.com", "github.co", ""])))
    headers = draw(st.sampled_from([{}, {"x-flag": "on"}, {"x-flag": "off", "accept": "*/*"}]))
    request = Request(host=host, port=draw(st.sampled_from([443, 80])), method=draw(st.sampled_from(METHODS)),
                      headers=headers)
    destination = draw(st.sampled_from([PUBLIC, PUBLIC2, PRIVATE, LOOPBACK, METADATA, DNS_FAIL, Destination()]))
    return principal, request, destination


def _truth(expr, act):
    """True / False, or None for an error (a non-bool value is an error)."""
    try:
        v = expr.evaluate(act)
    except celexpr.CelEvalError:
        return None
    return v if isinstance(v, bool) else None


def _covered(r, c) -> bool:
    def cov(a):
        return any(a in net for net in r.allow_internal if net.version == a.version)
    return cov(c.address) and (c.effective == c.address or not is_internal(c.effective) or cov(c.effective))


def _reference_outcome(deny, allow, destination):
    if deny is not None:
        return ("deny", "policy_deny", deny[0], deny[1].reason or f"denied by rule {deny[0]}")
    if allow is None:
        return ("deny", "default_deny", None, DEFAULT_DENY_REASON)
    r = allow[1]
    if destination.error:
        return ("deny", "dns_failure", "dns", destination.error)
    if not destination.addresses:
        return ("deny", "dns_failure", "dns", None)
    for c in destination.addresses:
        if c.internal and not _covered(r, c):
            return ("deny", "ssrf_blocked", "ssrf", None)
    return ("allow", "allowed", allow[0], r.reason or f"allowed by rule {allow[0]}")


def reference_decide(ps: PolicySet, principal: Principal, request: Request, destination: Destination):
    """No index, no pruning, no early exit: every rule of every policy, in order."""
    engine = ps.engine
    sel_act = engine.activation({"principal": principal.to_cel()})
    act = engine.activation({"principal": principal.to_cel(), "request": request.to_cel(),
                             "destination": destination.to_cel(),
                             "now": request.at or dt.datetime.now(dt.timezone.utc)})
    enf_deny = enf_allow = any_deny = any_allow = None
    has_shadow = False
    for pol in ps.policies:
        sel = _truth(pol.selector, sel_act)
        if sel is False:
            continue
        has_shadow = has_shadow or pol.mode == "shadow"
        for r in pol.rules:
            if r.action == "allow" and sel is None:
                continue
            m = _truth(r.when, act)
            # fail closed: an error is a match for a deny, no match for an allow
            matched = (m is None or m) if r.action == "deny" else (m is True)
            if not matched:
                continue
            entry = (f"{pol.name}/{r.name}", r)
            if r.action == "deny":
                any_deny = any_deny or entry
                if pol.mode == "enforce":
                    enf_deny = enf_deny or entry
            else:
                any_allow = any_allow or entry
                if pol.mode == "enforce":
                    enf_allow = enf_allow or entry
    enforced = _reference_outcome(enf_deny, enf_allow, destination)
    shadow = _reference_outcome(any_deny, any_allow, destination) if has_shadow else None
    dial = str(destination.addresses[0].address) if enforced[0] == "allow" else None
    return enforced, shadow, dial


def _view(outcome):
    """(action, code, rule, reason) with the reasons whose wording is not part of the contract blanked."""
    action, code, rule_id, reason = outcome
    if code in ("ssrf_blocked", "dns_failure"):
        reason = None
    return (action, code, rule_id, reason)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_sets(), st.lists(inputs(), min_size=1, max_size=12))
def test_index_never_changes_a_decision(docs, cases):
    ps = build(*docs)
    for principal, request, destination in cases:
        d = ps.decide(principal, request, destination)
        enforced, shadow, dial = reference_decide(ps, principal, request, destination)
        got = _view((d.action, d.code, d.rule, d.reason))
        assert got == _view(enforced), (docs, principal, request, destination)
        assert d.policy_version == ps.version
        assert d.dial == dial
        if shadow is None:
            assert d.shadow is None
        else:
            assert d.shadow is not None
            assert _view((d.shadow.action, d.shadow.code, d.shadow.rule, d.shadow.reason)) == _view(shadow)
        # the principal plan is cached: asking again gives the same answer
        assert ps.decide(principal, request, destination) == d
        # the CONNECT pre-check never refuses what decide() allows
        if d.allowed:
            assert ps.could_allow(principal, request.host, destination) is None


def test_index_regressions():
    """Hand-written cases for the index: negations, disjunctions, errors."""
    ps = build(
        policy_doc("not-acme", [rule("all", "allow", "true")], selector='!(principal.tenant in ["acme"])'),
        policy_doc("hosts", [
            rule("not-gh", "deny", '!(request.host == "github.com") && request.method == "DELETE"'),
            rule("either", "allow", 'request.host == "a.test" || request.host.endsWith(".b.test")'),
            rule("err", "deny", 'request.host == "c.test" && request.headers["x"] == "1"'),
            rule("err-or", "deny", 'request.host == "d.test" || request.headers["x"] == "1"'),
        ]))
    x0 = {"x": "0"}
    assert ps.decide(BOB, req("example.com", headers=x0), PUBLIC).rule == "not-acme/all"
    assert ps.decide(ALICE, req("example.com", headers=x0), PUBLIC).code == "default_deny"
    assert ps.decide(ALICE, req("example.com", "DELETE", headers=x0), PUBLIC).rule == "hosts/not-gh"
    assert ps.decide(ALICE, req("github.com", "DELETE", headers=x0), PUBLIC).code == "default_deny"
    assert ps.decide(ALICE, req("x.b.test", headers=x0), PUBLIC).rule == "hosts/either"
    assert ps.decide(ALICE, req("a.test", headers=x0), PUBLIC).rule == "hosts/either"
    assert ps.decide(ALICE, req("b.test", headers=x0), PUBLIC).code == "default_deny"
    # false && error is false: a host test that fails keeps an erroring deny from matching
    assert ps.decide(ALICE, req("a.test"), PUBLIC).code == "policy_deny"  # but false || error is an error
    assert ps.decide(ALICE, req("a.test"), PUBLIC).rule == "hosts/err-or"
    assert ps.decide(ALICE, req("c.test"), PUBLIC).rule == "hosts/err"
    assert ps.decide(ALICE, req("d.test"), PUBLIC).rule == "hosts/err-or"
    assert ps.decide(BOB, req("x.b.test", headers=x0), PUBLIC).rule == "not-acme/all"


# ---------------------------------------------------------------------------
# The default bundle


@pytest.fixture(scope="module")
def bundle() -> PolicySet:
    return load_directory(DEFAULT_BUNDLE)


@pytest.fixture(scope="module")
def resolver() -> Resolver:
    return Resolver(overrides={"intranet.example": "10.0.0.5"})


def _resolve(resolver, host):
    return resolver.resolve_static(host) or PUBLIC


METADATA_HOSTS = ["metadata.google.internal", "metadata.goog", "metadata.azure.com", "instance-data.ec2.internal"]
PRINCIPALS = [Principal.make("demo", "agent"), Principal.make("acme", "a", labels={"registries": "read"}),
              Principal.make("other", "b"), Principal.make("demo", "c", labels={"registries": "read"})]


@pytest.mark.parametrize("host", METADATA_HOSTS)
@pytest.mark.parametrize("principal", PRINCIPALS, ids=lambda p: f"{p.tenant}-{dict(p.labels)}")
def test_bundle_metadata_hosts_denied_for_every_tenant(bundle, principal, host):
    for method in ("GET", "HEAD"):
        d = bundle.decide(principal, req(host, method, scheme="http", port=80), PUBLIC)
        assert (d.action, d.code, d.rule) == ("deny", "policy_deny", "baseline/no-metadata-hostnames")
        assert d.reason == "Cloud metadata endpoints are never reachable from a sandbox."


def test_bundle_metadata_address_blocked_by_ssrf_guard(bundle, resolver):
    demo = Principal.make("demo", "agent")
    d = bundle.decide(demo, req("169.254.169.254", scheme="http", port=80), _resolve(resolver, "169.254.169.254"))
    assert (d.code, d.rule) == ("ssrf_blocked", "ssrf") and "metadata" in d.reason
    assert bundle.could_allow(demo, "169.254.169.254", _resolve(resolver, "169.254.169.254")).code \
        == "ssrf_blocked"


def test_bundle_demo_reads_the_local_demo_server(bundle, resolver):
    demo = Principal.make("demo", "agent")
    destination = _resolve(resolver, "demo.localhost")
    assert destination.to_cel()["internal"] is True
    d = bundle.decide(demo, req("demo.localhost", "GET", scheme="http", port=80, path="/"), destination)
    assert (d.action, d.code, d.rule, d.dial) == ("allow", "allowed", "demo/demo-read", "127.0.0.1")
    assert d.reason == "The demo agent may read the local demo server."
    assert bundle.could_allow(demo, "demo.localhost", destination) is None
    d = bundle.decide(demo, req("demo.localhost", "GET", scheme="http", port=80, path="/admin/users"), destination)
    assert (d.code, d.rule) == ("policy_deny", "demo/demo-no-admin")
    d = bundle.decide(demo, req("demo.localhost", "POST", scheme="http", port=80), destination)
    assert d.code == "default_deny"
    # other tenants cannot reach it
    assert bundle.decide(Principal.make("acme", "a"), req("demo.localhost"), destination).code == "default_deny"


def test_bundle_demo_browses_the_public_web_read_only(bundle, resolver):
    demo = Principal.make("demo", "agent")
    assert bundle.decide(demo, req("example.com", "GET"), PUBLIC).rule == "demo/web-read"
    assert bundle.decide(demo, req("example.com", "POST"), PUBLIC).code == "default_deny"
    # web-read has no allow_internal: names and literals that reach internal addresses are blocked
    for host in ("intranet.example", "127.0.0.1", "0x7f000001", "::1", "localhost"):
        d = bundle.decide(demo, req(host, "GET", scheme="http", port=80), _resolve(resolver, host))
        assert d.code == "ssrf_blocked", host


@pytest.mark.parametrize("method", ["TRACE", "TRACK", "DEBUG"])
@pytest.mark.parametrize("principal", PRINCIPALS, ids=lambda p: f"{p.tenant}-{dict(p.labels)}")
def test_bundle_trace_methods_denied(bundle, resolver, principal, method):
    for host in ("pypi.org", "demo.localhost", "example.com"):
        d = bundle.decide(principal, req(host, method), _resolve(resolver, host))
        assert (d.code, d.rule) == ("policy_deny", "baseline/no-trace-methods")


@pytest.mark.parametrize("labels,allowed", [
    ({"registries": "read"}, True), ({"registries": "write"}, False), ({}, False), ({"other": "read"}, False),
])
def test_bundle_pypi_needs_registries_read(bundle, labels, allowed):
    p = Principal.make("acme", "agent", labels=labels)
    for host, rule_id in (("pypi.org", "package-registries/pypi-read"),
                          ("files.pythonhosted.org", "package-registries/pypi-read"),
                          ("registry.npmjs.org", "package-registries/npm-read")):
        d = bundle.decide(p, req(host, "GET"), PUBLIC)
        assert d.allowed is allowed
        assert d.rule == (rule_id if allowed else None)
        assert (bundle.could_allow(p, host, PUBLIC) is None) is allowed
    # read only
    assert bundle.decide(p, req("pypi.org", "POST"), PUBLIC).code == "default_deny"
    assert bundle.decide(p, req("upload.pypi.org", "GET"), PUBLIC).code == "default_deny"


def test_bundle_loads_identically_with_both_engines(bundle):
    ps = load_directory(DEFAULT_BUNDLE, engine=celexpr.PyEngine())
    assert ps.version == bundle.version
    assert [p.name for p in ps.policies] == ["baseline", "package-registries", "demo"]
    demo = Principal.make("demo", "agent")
    d = ps.decide(demo, req("demo.localhost", scheme="http", port=80), LOOPBACK)
    assert (d.rule, d.dial) == ("demo/demo-read", "127.0.0.1")


def test_internal_ranges_in_the_bundle_are_valid_networks(bundle):
    nets = {str(n) for p in bundle.policies for r in p.rules for n in r.allow_internal}
    assert nets == {"127.0.0.0/8", "::1/128"}
    assert all(isinstance(ipaddress.ip_network(n), (ipaddress.IPv4Network, ipaddress.IPv6Network)) for n in nets)


# ---------------------------------------------------------------------------
# The examples in docs/policy-language.md decide as documented


def _doc_policies() -> dict[str, PolicySet]:
    """Each YAML block of the reference, compiled on its own, by the name of its first policy."""
    import re
    text = (REPO / "docs" / "policy-language.md").read_text(encoding="utf-8")
    out = {}
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        if block.startswith("# invalid"):
            continue
        name = next(yaml.safe_load_all(block))["name"]
        out[name] = compile_sources([(f"{name}.yaml", block)])
    return out


def test_documented_examples():
    docs = _doc_policies()
    acme, beta = Principal.make("acme", "a"), Principal.make("beta", "b")

    ps = docs["acme-github"]
    assert ps.decide(acme, req("api.github.com", path="/repos"), PUBLIC).rule == "acme-github/github-read"
    d = ps.decide(acme, req("api.github.com", "POST", path="/repos"), PUBLIC)
    assert (d.code, d.rule, d.reason) == ("policy_deny", "acme-github/no-writes",
                                          "Agents of acme have read-only GitHub access.")
    assert ps.decide(acme, req("gitlab.com"), PUBLIC).code == "default_deny"
    assert ps.decide(beta, req("api.github.com", path="/repos"), PUBLIC).code == "default_deny"

    ps = docs["build-cache"]
    builder = Principal.make("acme", "a", labels={"team": "build"})
    d = ps.decide(builder, req("cache.corp", "PUT", scheme="http", port=80), dest("10.20.1.5"))
    assert (d.code, d.rule, d.dial) == ("allowed", "build-cache/cache", "10.20.1.5")
    assert ps.decide(builder, req("cache.corp", scheme="http", port=80), dest("10.30.0.1")).code == "ssrf_blocked"
    d = ps.decide(acme, req("cache.corp", scheme="http", port=80), dest("10.20.1.5"))
    assert d.code == "default_deny" and d.errors == ()  # the selector guards the label lookup

    ps = docs["trial-no-uploads"]
    d = ps.decide(acme, req("example.com", "POST"), PUBLIC)
    assert (d.action, d.rule) == ("allow", "open-web/everything")
    assert (d.shadow.action, d.shadow.code, d.shadow.rule) == ("deny", "policy_deny", "trial-no-uploads/no-uploads")

    ps = docs["api-keys"]
    assert ps.decide(acme, req(headers={"x-api-key": "k1"}), PUBLIC).rule == "api-keys/key"
    assert ps.decide(acme, req(headers={"x-api-key": "k1", "cookie": "c"}), PUBLIC).rule == "api-keys/cookie"

    ps = docs["red-team"]
    red = Principal.make("x", "a", labels={"team": "red"})
    assert ps.decide(red, req(method="HEAD"), PUBLIC).allowed
    assert not ps.decide(red, req(method="POST"), PUBLIC).allowed
    assert ps.decide(Principal.make("x", "a", labels={"team": "red"}, source="binding"), req(), PUBLIC).code \
        == "default_deny"

    ps = docs["no-literals"]
    assert ps.decide(acme, req("10.0.0.1"), dest("10.0.0.1", via="literal")).rule == "no-literals/no-ip-literals"

    ps = docs["office-hours"]
    at = lambda *a: req(at=dt.datetime(*a, tzinfo=dt.timezone.utc))  # noqa: E731
    assert ps.decide(acme, at(2029, 6, 1, 12), PUBLIC).rule == "office-hours/until-2030"
    assert ps.decide(acme, at(2029, 6, 1, 7), PUBLIC).rule == "office-hours/not-at-night"

    ps = docs["api-paths"]
    assert ps.decide(acme, req("api.example.com", path="/v2/users/7"), PUBLIC).allowed
    assert ps.decide(acme, req("api.example.com", path="/v2/usersx"), PUBLIC).code == "default_deny"
    assert ps.decide(acme, req("api.example.com", path="/admin/v2/users"), PUBLIC).code == "default_deny"

    ps = docs["guarded"]
    red_ok = ps.decide(red, req(headers={}), PUBLIC)
    assert red_ok.code == "default_deny" and red_ok.errors == ()
    assert ps.decide(red, req(headers={"x-debug": "on"}), PUBLIC).rule == "guarded/debug-header"
    assert ps.decide(red, req(headers={"x-debug": "off"}), PUBLIC).code == "default_deny"
