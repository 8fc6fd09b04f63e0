"""The inject block of allow rules: loading, positions of errors, and what decisions carry."""

from __future__ import annotations

import pytest

from gateway.policy.loader import PolicyLoadError, compile_sources
from gateway.policy.model import Principal, Request
from gateway.resolver import Resolver
from gateway.secrets.inject import apply, placeholders_in
from gateway.secrets.refs import SecretRef

HEAD = "apiVersion: egress/v1\nkind: Policy\nname: p\nselector: 'true'\nrules:\n"


def load(rules: str):
    return compile_sources([("p.yaml", HEAD + rules)])


def problems(rules: str) -> list[str]:
    with pytest.raises(PolicyLoadError) as e:
        load(rules)
    return [str(p) for p in e.value.problems]


GOOD = """\
  - name: gh
    action: allow
    when: request.host == "api.github.com"
    inject:
      headers:
        Authorization: "Bearer ${vault:secret/acme/github#token}"
      placeholders:
        llm: env:LLM_KEY
"""


def test_decision_carries_the_injection():
    ps = load(GOOD)
    dest = Resolver({"api.github.com": ["93.184.216.34"]}).resolve_static("api.github.com")
    d = ps.decide(Principal.make("acme", "a"), Request(host="api.github.com", port=443), dest)
    assert d.allowed and d.inject is not None
    assert [n for n, _ in d.inject.headers] == ["authorization"]
    refs = d.inject.refs(frozenset({"llm"}))
    assert refs == (SecretRef("vault", "secret/acme/github", "token"), SecretRef("env", "LLM_KEY"))
    assert d.inject.refs() == refs[:1]  # placeholders only when used


@pytest.mark.parametrize("block,needle,line", [
    ("    inject:\n      headers:\n        host: x\n", "cannot inject header 'host'", 11),
    ("    inject:\n      headers:\n        x-key: \"${vault:secret#k}\"\n", "MOUNT/PATH", 11),
    ("    inject:\n      placeholders:\n        Bad: env:X\n", "placeholder alias 'Bad'", 11),
    ("    inject:\n      placeholders:\n        ok: nope:x\n", "unknown secret scheme", 11),
    ("    inject:\n      allow_plaintext: maybe\n      headers: {x-k: v}\n", "true or false", 10),
    ("    inject: {}\n", "needs headers or placeholders", 9),
    ("    inject:\n      header: {}\n", "unknown key 'header'", 10),
])
def test_errors_with_positions(block, needle, line):
    rules = "  - name: r\n    action: allow\n    when: 'true'\n" + block
    found = problems(rules)
    assert any(needle in p and p.startswith(f"p.yaml:{line}:") for p in found), found


def test_inject_on_deny_rule_is_rejected():
    found = problems("  - name: r\n    action: deny\n    when: 'true'\n    inject:\n      headers: {x-k: v}\n")
    assert any("inject only makes sense on an allow rule" in p for p in found)


def test_apply_replaces_and_swaps():
    inj = load(GOOD).policies[0].rules[0].inject
    fields = [("Authorization", "Bearer sandbox"), ("X-Key", "egress-secret:llm"), ("Accept", "*/*")]
    assert placeholders_in(fields) == frozenset({"llm"})
    values = {SecretRef("vault", "secret/acme/github", "token"): "T", SecretRef("env", "LLM_KEY"): "L"}
    out = apply(inj, fields, values)
    assert out == [("X-Key", "L"), ("Accept", "*/*"), ("authorization", "Bearer T")]
    assert placeholders_in([("x", "egress-secret:")]) == frozenset({""})  # malformed: never forwarded
