"""Secret reference and header-template syntax (parsers: Hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from gateway.secrets.refs import RefError, SecretRef, Template, parse_ref, parse_template


@pytest.mark.parametrize("text,want", [
    ("vault:secret/acme/github#token", SecretRef("vault", "secret/acme/github", "token")),
    ("vault:kv/acme/github?version=3#token", SecretRef("vault", "kv/acme/github", "token", 3)),
    ("vault-dynamic:database/creds/readonly#password", SecretRef("vault-dynamic", "database/creds/readonly", "password")),
    ("env:GITHUB_TOKEN", SecretRef("env", "GITHUB_TOKEN")),
    ("file:/run/secrets/llm-key", SecretRef("file", "/run/secrets/llm-key")),
    ("local:github/token", SecretRef("local", "github/token")),
])
def test_parse_valid(text, want):
    ref = parse_ref(text)
    assert ref == want and str(ref) == text
    if ref.scheme.startswith("vault"):
        assert f"{ref.mount}/{ref.path}" == ref.name


@pytest.mark.parametrize("text,needle", [
    ("github-token", "not a secret reference"),
    ("aws:foo", "unknown secret scheme"),
    ("vault:secret#token", "MOUNT/PATH"),
    ("vault:secret/acme/github", "#FIELD"),
    ("vault:secret/acme/github?version=0#t", "MOUNT/PATH"),
    ("vault:secret/../x#t", "cannot be . or .."),
    ("vault-dynamic:database/creds/ro?version=2#password", "no versions"),
    ("env:1ABC", "variable name"),
    ("file:relative/path", "absolute path"),
    ("file:/etc/../shadow", "absolute path"),
    ("local:UPPER", "local:"),
])
def test_parse_invalid(text, needle):
    with pytest.raises(RefError) as e:
        parse_ref(text)
    if needle:
        assert needle in str(e.value)


def test_template_parse_render_and_escape():
    t = parse_template("Bearer ${vault:secret/acme/github#token} and $${literal}")
    assert t.refs == (SecretRef("vault", "secret/acme/github", "token"),)
    assert t.render({t.refs[0]: "s3cr3t"}) == "Bearer s3cr3t and ${literal}"
    assert str(t) == "Bearer ${vault:secret/acme/github#token} and $${literal}"
    with pytest.raises(KeyError) as e:
        t.render({})
    assert "vault:secret/acme/github#token" in str(e.value)


@pytest.mark.parametrize("text,col", [("x ${env:A", 3), ("${nope:x}", 3), ("a ${env:1}", 9)])
def test_template_errors_have_columns(text, col):
    with pytest.raises(RefError) as e:
        parse_template(text)
    assert e.value.column == col


def test_template_rejects_header_injection():
    with pytest.raises(RefError):
        parse_template("x\r\nInjected: 1")


segment = st.from_regex(r"[A-Za-z0-9_.@-]{1,12}", fullmatch=True).filter(lambda s: s not in (".", ".."))
refs = st.one_of(
    st.builds(lambda m, p, f, v: SecretRef("vault", f"{m}/{'/'.join(p)}", f, v),
              segment, st.lists(segment, min_size=1, max_size=4), segment, st.integers(0, 10**6)),
    st.builds(lambda m, p, f: SecretRef("vault-dynamic", f"{m}/{'/'.join(p)}", f),
              segment, st.lists(segment, min_size=1, max_size=3), segment),
    st.builds(lambda n: SecretRef("env", n), st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)),
    st.builds(lambda n: SecretRef("local", n), st.from_regex(r"[a-z0-9]([a-z0-9._/-]{0,20}[a-z0-9])?", fullmatch=True)),
)


@given(refs)
def test_canonical_text_round_trips(ref):
    assert parse_ref(str(ref)) == ref


@given(st.lists(st.one_of(refs, st.text(alphabet=st.characters(blacklist_characters="\r\n\x00"), max_size=10)),
                max_size=5))
def test_template_round_trips(parts):
    text = "".join(f"${{{p}}}" if isinstance(p, SecretRef) else p for p in parts)
    try:
        t = parse_template(text)
    except RefError:
        return  # a literal part happened to contain "${" that is not a valid reference
    assert parse_template(str(t)) == t
    values = {r: f"<{r.scheme}>" for r in t.refs}
    rendered = t.render(values)
    assert all(v in rendered for v in values.values())


@given(st.text(max_size=60))
def test_parsers_raise_only_referror(text):
    for parse in (parse_ref, parse_template):
        try:
            parse(text)
        except RefError:
            pass
