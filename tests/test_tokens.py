"""Tests for gateway.tokens: format, verification order, canonical encoding,
tamper/forgery resistance, key files and Proxy-Authorization parsing."""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import re
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway import tokens
from gateway.tokens import Claims, TokenError, VerifyKeys

NOW = 1_700_000_000
KEY = tokens.generate_signing_key()
OTHER_KEY = tokens.generate_signing_key()
KEYS = VerifyKeys.from_private(KEY)
KID = tokens.key_id(KEY)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
USERINFO_SAFE = re.compile(r"[A-Za-z0-9._-]+")

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers -------------------------------------------------------------------

def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def canonical(claims) -> bytes:
    return json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def sign_payload(key, payload: bytes) -> str:
    """A token with exactly ``payload`` as its claims bytes, signed by ``key``."""
    signing_input = "egt1." + b64e(payload)
    return signing_input + "." + b64e(key.sign(signing_input.encode("ascii")))


_DELETE = object()


def claims_dict(**over):
    c = {"v": 1, "kid": KID, "jti": "AAAAAAAAAAAAAAAAAAAAAA", "ten": "acme", "agt": "agent-1",
         "ses": "", "lbl": {"team": "red"}, "iat": NOW, "exp": NOW + 3600}
    for k, v in over.items():
        if v is _DELETE:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def signed(key=KEY, **over) -> str:
    return sign_payload(key, canonical(claims_dict(**over)))


def segments(token: str):
    parts = token.split(".")
    return [token] + [p for p in parts[1:] if p]


def error_of(token, keys=KEYS, **kw) -> TokenError:
    """The TokenError verify raises; its message is checked not to leak the token."""
    with pytest.raises(TokenError) as ei:
        tokens.verify(token, keys, **kw)
    assert_message_is_clean(ei.value, token)
    return ei.value


def assert_message_is_clean(err: TokenError, token) -> None:
    msg = str(err)
    assert err.code in tokens.CODES
    assert err.__cause__ is None and err.__context__ is None
    if isinstance(token, str):
        for seg in segments(token):
            if len(seg) >= 12:
                assert seg not in msg
                assert seg not in repr(err)
        # no run of 12 token characters either
        for i in range(0, max(0, len(token) - 11)):
            window = token[i:i + 12]
            if USERINFO_SAFE.fullmatch(window) and any(ch.isdigit() or ch in "-_" for ch in window):
                assert window not in msg


TOKEN = tokens.mint(KEY, tenant="acme", agent="agent-1", session="s-1",
                    labels={"team": "red", "env/stage": "prod"}, ttl_seconds=3600, now=NOW)


# -- round trip ------------------------------------------------------------------

def test_round_trip():
    c = tokens.verify(TOKEN, KEYS, now=NOW)
    assert isinstance(c, Claims)
    assert (c.tenant, c.agent, c.session) == ("acme", "agent-1", "s-1")
    assert dict(c.labels) == {"team": "red", "env/stage": "prod"}
    assert c.labels_tuple() == (("env/stage", "prod"), ("team", "red"))
    assert (c.issued_at, c.expires_at) == (NOW, NOW + 3600)
    assert c.key_id == KID and len(KID) == 12
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", c.token_id)
    assert hash(c) == hash(tokens.verify(TOKEN, KEYS, now=NOW))
    assert c == tokens.verify(TOKEN, KEYS, now=NOW)
    with pytest.raises(TypeError):
        c.labels["x"] = "y"  # read-only


def test_format_is_userinfo_safe_and_canonical():
    assert USERINFO_SAFE.fullmatch(TOKEN) and "=" not in TOKEN
    prefix, payload, sig = TOKEN.split(".")
    assert prefix == "egt1" and len(sig) == 86
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    claims = json.loads(raw)
    assert canonical(claims) == raw
    assert set(claims) == {"v", "kid", "jti", "ten", "agt", "ses", "lbl", "iat", "exp"}
    assert claims["v"] == 1 and claims["kid"] == KID
    KEY.public_key().verify(base64.urlsafe_b64decode(sig + "=="), f"egt1.{payload}".encode())


def test_key_id_is_prefix_of_sha256_of_raw_public_key():
    import hashlib
    raw = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert KID == b64e(hashlib.sha256(raw).digest())[:12]
    assert tokens.key_id(KEY.public_key()) == KID
    assert tokens.key_id(OTHER_KEY) != KID
    with pytest.raises(TypeError):
        tokens.key_id("not a key")


def test_default_token_ids_are_random():
    a = tokens.verify(tokens.mint(KEY, tenant="t", agent="a", now=NOW), KEYS, now=NOW).token_id
    b = tokens.verify(tokens.mint(KEY, tenant="t", agent="a", now=NOW), KEYS, now=NOW).token_id
    assert a != b and len(a) == len(b) == 22


def test_explicit_token_id_and_float_now():
    t = tokens.mint(KEY, tenant="t", agent="a", token_id="my-token_01", now=NOW + 0.9)
    c = tokens.verify(t, KEYS, now=NOW)
    assert c.token_id == "my-token_01" and c.issued_at == NOW


# -- every error code --------------------------------------------------------------

def test_code_malformed():
    for bad in ["", "egt1", "egt1..", "egt2." + TOKEN[5:], TOKEN + ".x", TOKEN + "=", " " + TOKEN,
                TOKEN + "\n", TOKEN.replace(".", "..", 1), "x" * 5000, None, b"egt1.a.b", 42]:
        assert error_of(bad).code == "malformed"


def test_code_unknown_key():
    forged = tokens.mint(OTHER_KEY, tenant="acme", agent="agent-1", now=NOW)
    assert error_of(forged, now=NOW).code == "unknown_key"
    assert error_of(TOKEN, VerifyKeys(), now=NOW).code == "unknown_key"


def test_code_bad_signature_other_key_under_right_kid():
    # A key with the same kid cannot be found; sign our kid's claims with another key.
    forged = signed(OTHER_KEY, kid=KID)
    err = error_of(forged, now=NOW)
    assert err.code == "bad_signature"
    assert_message_is_clean(err, forged)


def test_code_bad_signature_swapped_signatures():
    other = tokens.mint(KEY, tenant="acme", agent="agent-2", now=NOW)
    spliced = TOKEN.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1]
    assert error_of(spliced, now=NOW).code == "bad_signature"


def test_code_expired_and_not_yet_valid():
    assert error_of(TOKEN, now=NOW + 3600 + 30).code == "expired"
    assert error_of(TOKEN, now=NOW - 31).code == "not_yet_valid"


@pytest.mark.parametrize("over", [
    {"v": 2}, {"v": True}, {"v": "1"},
    {"iat": True}, {"exp": True}, {"iat": float(NOW)}, {"iat": str(NOW)}, {"iat": -1},
    {"exp": NOW}, {"exp": NOW - 1}, {"exp": NOW + 30 * 86400 + 1}, {"exp": 2**53},
    {"jti": "short"}, {"jti": "a" * 65}, {"jti": "has space in it"}, {"jti": 12345678},
    {"ten": ""}, {"ten": "-lead"}, {"ten": "a" * 129}, {"ten": "bad tenant"}, {"ten": None},
    {"agt": "ag\u00e9nt"}, {"agt": "x\n"}, {"ses": "-x"}, {"ses": None}, {"ses": "a/b"},
    {"lbl": []}, {"lbl": {"Team": "x"}}, {"lbl": {"team-": "x"}}, {"lbl": {"a" * 65: "x"}},
    {"lbl": {"team": 1}}, {"lbl": {"team": "x\x00"}}, {"lbl": {"team": "a\u202eb"}},
    {"lbl": {"team": "x" * 257}}, {"lbl": {f"k{i}": "v" for i in range(65)}},
    {"kid": KID, "extra": 1}, {"jti": _DELETE}, {"lbl": _DELETE}, {"ses": _DELETE},
])
def test_code_invalid_claims(over):
    t = signed(**over)
    err = error_of(t, now=NOW)
    assert err.code == "invalid_claims", (over, err.code)
    # nothing decoded from the token is echoed either
    for value in _strings(claims_dict(**over)):
        if len(value) >= 4 and value not in tokens.CLAIM_NAMES:
            assert value not in str(err) and repr(value)[1:-1] not in str(err)


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_missing_or_mistyped_kid_is_malformed():
    assert error_of(signed(kid=_DELETE), now=NOW).code == "malformed"
    assert error_of(signed(kid=123), now=NOW).code == "malformed"
    assert error_of(signed(kid="nope"), now=NOW).code == "unknown_key"


def test_payload_must_be_an_object():
    for payload in [b"[]", b"1", b'"x"', b"null", b"", b"{", b"\xff\xfe"]:
        assert error_of(sign_payload(KEY, payload), now=NOW).code == "malformed"


def test_check_order_unknown_key_before_signature_and_claims():
    # wrong key AND invalid claims AND expired -> unknown_key comes first
    assert error_of(signed(OTHER_KEY, kid=tokens.key_id(OTHER_KEY), v=9), now=NOW + 10**6).code == "unknown_key"
    # bad signature AND invalid claims -> bad_signature
    assert error_of(signed(OTHER_KEY, v=9), now=NOW).code == "bad_signature"
    # invalid claims AND expired -> invalid_claims
    assert error_of(signed(v=9), now=NOW + 10**6).code == "invalid_claims"


def test_valid_boundary_values_accepted():
    signed_ok = [
        signed(lbl={f"k{i}": "v" * 20 for i in range(64)}),
        signed(lbl={"a": "", "b" * 64: "x" * 256, "a.b/c_d-e": "\u00e9 \U0001F600"}),
        signed(ten="a" * 128, agt="A:b.c_d-e", ses="S" * 128),
        signed(jti="a" * 8), signed(jti="_" * 64),
        signed(exp=NOW + 30 * 86400),
    ]
    for t in signed_ok:
        assert tokens.verify(t, KEYS, now=NOW)


# -- tampering and forgery ------------------------------------------------------------

@FAST
@given(st.data())
def test_any_single_character_change_fails(data):
    pos = data.draw(st.integers(0, len(TOKEN) - 1), label="pos")
    ch = data.draw(st.sampled_from(B64URL + ".=+/ %\x00\u00e9"), label="ch")
    assume(ch != TOKEN[pos])
    tampered = TOKEN[:pos] + ch + TOKEN[pos + 1:]
    err = error_of(tampered, now=NOW)
    sig_start = TOKEN.rindex(".") + 1
    if pos >= sig_start and ch in B64URL:
        assert err.code in ("malformed", "bad_signature")
    assert_message_is_clean(err, tampered)


@FAST
@given(st.integers(0, len(TOKEN) - 1))
def test_deleting_or_inserting_a_character_fails(pos):
    for t in (TOKEN[:pos] + TOKEN[pos + 1:], TOKEN[:pos] + "A" + TOKEN[pos:]):
        assert_message_is_clean(error_of(t, now=NOW), t)


def test_last_character_of_each_segment_has_no_slack():
    # base64 trailing bits must be zero: no alternative spelling of the same bytes
    _, payload, sig = TOKEN.split(".")
    for seg_end in (5 + len(payload), len(TOKEN)):
        i = seg_end - 1
        for ch in B64URL:
            if ch == TOKEN[i]:
                continue
            t = TOKEN[:i] + ch + TOKEN[i + 1:]
            with pytest.raises(TokenError):
                tokens.verify(t, KEYS, now=NOW)


@pytest.mark.parametrize("encode", [
    lambda c: json.dumps(c, sort_keys=True).encode(),                                  # spaces
    lambda c: json.dumps(c, separators=(",", ":")).encode(),                           # key order
    lambda c: json.dumps(dict(reversed(list(c.items()))), separators=(",", ":")).encode(),
    lambda c: canonical(c) + b"\n",                                                    # trailing ws
    lambda c: b" " + canonical(c),
    lambda c: canonical(c).replace(b'"acme"', b'"\\u0061cme"'),                        # escapes
    lambda c: canonical(c).replace(b'"ten":"acme"', b'"ten":"evil","ten":"acme"'),     # dup keys
    lambda c: canonical(c).replace(b'"v":1', b'"v":1.0'),
    lambda c: canonical(c).replace(b'"v":1', b'"v":1e0'),
    lambda c: canonical(c).replace(b'"iat":%d' % NOW, b'"iat":0%d' % NOW),
    lambda c: json.dumps(c, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8"),
    lambda c: canonical(c).decode().encode("utf-16"),
])
def test_non_canonical_payload_rejected_even_when_signed(encode):
    c = claims_dict(ten="acme", lbl={"team": "r\u00e9d"})
    payload = encode(c)
    assert payload != canonical(c)
    t = sign_payload(KEY, payload)
    err = error_of(t, now=NOW)
    assert err.code in ("malformed", "invalid_claims")
    assert_message_is_clean(err, t)


def test_nan_and_infinity_rejected():
    for lit in (b"NaN", b"Infinity", b"-Infinity"):
        t = sign_payload(KEY, canonical(claims_dict()).replace(b'"v":1', b'"v":' + lit))
        assert error_of(t, now=NOW).code == "malformed"


# -- hypothesis: valid claims round-trip --------------------------------------------

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", fullmatch=True)
label_keys = st.from_regex(r"[a-z0-9]([a-z0-9._/-]{0,62}[a-z0-9])?", fullmatch=True)
label_values = st.text(st.characters(codec="utf-8"), max_size=256).filter(str.isprintable)
token_ids = st.from_regex(r"[A-Za-z0-9_-]{8,64}", fullmatch=True)


@FAST
@given(tenant=names, agent=names, session=st.one_of(st.just(""), names),
       labels=st.dictionaries(label_keys, label_values, max_size=6), token_id=token_ids,
       ttl=st.integers(1, tokens.MAX_TTL_SECONDS), now=st.integers(0, 2**40))
def test_valid_claims_round_trip_exactly(tenant, agent, session, labels, token_id, ttl, now):
    try:
        t = tokens.mint(KEY, tenant=tenant, agent=agent, session=session, labels=labels,
                        ttl_seconds=ttl, now=now, token_id=token_id)
    except ValueError as e:
        assert "exceed" in str(e)  # only possible failure: too long for 4096 chars
        return
    assert len(t) <= 4096 and USERINFO_SAFE.fullmatch(t)
    c = tokens.verify(t, KEYS, now=now)
    assert c == Claims(tenant, agent, session, labels, token_id, now, now + ttl, KID)
    assert dict(c.labels) == labels and c.labels_tuple() == tuple(sorted(labels.items()))
    assert tokens.verify(t, KEYS, now=now + ttl - 1) == c


# -- hypothesis: nothing but TokenError, messages clean ------------------------------

def _check_only_token_error(text):
    try:
        tokens.verify(text, KEYS, now=NOW)
    except TokenError as e:
        assert_message_is_clean(e, text)
        if isinstance(text, str) and len(text) >= 12:
            assert text not in str(e)
    # any other exception fails the test


@FAST
@given(st.text(max_size=300))
def test_arbitrary_text_only_token_error(text):
    _check_only_token_error(text)


@FAST
@given(st.from_regex(r"egt1\.[A-Za-z0-9_-]{0,200}\.[A-Za-z0-9_-]{0,100}", fullmatch=True))
def test_token_shaped_text_only_token_error(text):
    _check_only_token_error(text)


@FAST
@given(st.binary(max_size=600), st.binary(min_size=64, max_size=64))
def test_arbitrary_payload_bytes_only_token_error(payload, sig):
    _check_only_token_error(f"egt1.{b64e(payload)}.{b64e(sig)}")
    _check_only_token_error(sign_payload(KEY, payload))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FAST
@given(st.sampled_from(sorted(tokens.CLAIM_NAMES | {"x"})), json_values)
def test_signed_claims_with_arbitrary_values_only_token_error(claim, value):
    t = signed(**{claim: value})
    try:
        tokens.verify(t, KEYS, now=NOW)
    except TokenError as e:
        assert_message_is_clean(e, t)
        if isinstance(value, str) and len(value) >= 4:
            assert value not in str(e)  # never echoes decoded values


@FAST
@given(json_values)
def test_signed_arbitrary_json_only_token_error(value):
    t = sign_payload(KEY, canonical(value))
    with pytest.raises(TokenError) as ei:
        tokens.verify(t, KEYS, now=NOW)
    assert_message_is_clean(ei.value, t)


def test_deeply_nested_payload():
    for payload in (b"[" * 3000, b'{"a":' * 1000 + b"1" + b"}" * 1000):
        assert error_of(sign_payload(KEY, payload[:3000]), now=NOW).code == "malformed"


def test_error_is_picklable_and_keeps_code():
    e = error_of(TOKEN, now=NOW + 10**6)
    e2 = pickle.loads(pickle.dumps(e))
    assert e2.code == "expired" and str(e2) == str(e)
    with pytest.raises(ValueError):
        TokenError("no_such_code")


# -- expiry boundaries --------------------------------------------------------------

@pytest.mark.parametrize("leeway", [0, 1, 30, 300])
def test_expiry_boundaries(leeway):
    iat, exp = NOW, NOW + 3600
    ok = lambda now: tokens.verify(TOKEN, KEYS, now=now, leeway_seconds=leeway)  # noqa: E731
    assert ok(exp + leeway - 1).expires_at == exp
    assert ok(exp + leeway - 0.001)
    assert error_of(TOKEN, now=exp + leeway, leeway_seconds=leeway).code == "expired"
    assert error_of(TOKEN, now=exp + leeway + 10**6, leeway_seconds=leeway).code == "expired"
    assert ok(iat - leeway).issued_at == iat
    assert error_of(TOKEN, now=iat - leeway - 0.001, leeway_seconds=leeway).code == "not_yet_valid"
    assert error_of(TOKEN, now=iat - leeway - 1, leeway_seconds=leeway).code == "not_yet_valid"


def test_default_leeway_is_30_seconds_and_now_defaults_to_clock():
    assert tokens.verify(TOKEN, KEYS, now=NOW + 3600 + 29)
    assert error_of(TOKEN, now=NOW + 3600 + 30).code == "expired"
    fresh = tokens.mint(KEY, tenant="t", agent="a")
    assert tokens.verify(fresh, KEYS).tenant == "t"
    assert error_of(TOKEN).code == "expired"  # NOW is in the past


def test_verify_rejects_bad_arguments():
    with pytest.raises(ValueError):
        tokens.verify(TOKEN, KEYS, now=NOW, leeway_seconds=-1)
    with pytest.raises(ValueError):
        tokens.verify(TOKEN, KEYS, now=float("nan"))
    with pytest.raises(TypeError):
        tokens.verify(TOKEN, {KID: KEY.public_key()}, now=NOW)


# -- mint input validation ------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    ({"ttl_seconds": 0}, "ttl"), ({"ttl_seconds": 30 * 86400 + 1}, "ttl"),
    ({"ttl_seconds": True}, "ttl"), ({"ttl_seconds": 1.5}, "ttl"),
    ({"tenant": ""}, "tenant"), ({"tenant": "a b"}, "tenant"), ({"tenant": None}, "tenant"),
    ({"agent": "-a"}, "agent"), ({"agent": "a" * 129}, "agent"),
    ({"session": " "}, "session"), ({"session": None}, "session"),
    ({"labels": {"Bad": "x"}}, "labels"), ({"labels": {"ok": "\x07"}}, "labels"),
    ({"labels": {"ok": 1}}, "labels"), ({"labels": [("a", "b")]}, "labels"),
    ({"labels": {f"k{i}": "v" for i in range(65)}}, "labels"),
    ({"labels": {f"k{i}": "v" * 256 for i in range(20)}}, "labels"),  # > 4096 chars
    ({"token_id": "short"}, "token_id"), ({"token_id": "x" * 65}, "token_id"),
    ({"now": -5}, "issued_at"), ({"now": float("inf")}, "now"), ({"now": True}, "now"),
])
def test_mint_rejects_invalid_input_naming_the_field(kw, field):
    args = {"tenant": "acme", "agent": "agent-1", "now": NOW, **kw}
    with pytest.raises(ValueError) as ei:
        tokens.mint(KEY, **args)
    assert field in str(ei.value)


def test_mint_limits_are_inclusive():
    assert tokens.verify(tokens.mint(KEY, tenant="t", agent="a", ttl_seconds=1, now=NOW), KEYS, now=NOW)
    t = tokens.mint(KEY, tenant="t", agent="a", ttl_seconds=30 * 86400, now=NOW)
    assert tokens.verify(t, KEYS, now=NOW).expires_at == NOW + 30 * 86400
    t = tokens.mint(KEY, tenant="t", agent="a", labels={f"k{i}": "v" for i in range(64)}, now=NOW)
    assert len(tokens.verify(t, KEYS, now=NOW).labels) == 64


def test_mint_requires_an_ed25519_private_key():
    with pytest.raises(TypeError):
        tokens.mint(KEY.public_key(), tenant="t", agent="a")


# -- VerifyKeys ------------------------------------------------------------------------

def test_verify_keys():
    keys = VerifyKeys.from_private(KEY)
    assert KID in keys and tokens.key_id(OTHER_KEY) not in keys and 123 not in keys
    assert keys.add(OTHER_KEY.public_key()) == tokens.key_id(OTHER_KEY)
    assert tokens.key_id(OTHER_KEY) in keys and len(keys) == 2
    keys.add(KEY.public_key())  # idempotent
    assert len(keys) == 2
    t = tokens.mint(OTHER_KEY, tenant="t", agent="a", now=NOW)
    assert tokens.verify(t, keys, now=NOW).key_id == tokens.key_id(OTHER_KEY)
    assert keys.remove(tokens.key_id(OTHER_KEY))
    assert error_of(t, keys, now=NOW).code == "unknown_key"


# -- key files ------------------------------------------------------------------------------

def test_save_and_load_signing_key(tmp_path):
    path = tmp_path / "signing-key.pem"
    old = os.umask(0)
    try:
        tokens.save_signing_key(KEY, path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing-key.pem"]  # no temp files left
    loaded = tokens.load_signing_key(path)
    assert tokens.key_id(loaded) == KID
    assert tokens.verify(tokens.mint(loaded, tenant="t", agent="a", now=NOW), KEYS, now=NOW)


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "k.pem"
    tokens.save_signing_key(KEY, path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        tokens.save_signing_key(OTHER_KEY, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]


def test_save_refuses_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    link = tmp_path / "k.pem"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        tokens.save_signing_key(KEY, link)
    assert not target.exists()


def test_concurrent_create_never_exposes_a_partial_key(tmp_path):
    import threading
    path = tmp_path / "k.pem"
    kids, errors = [], []
    barrier = threading.Barrier(8)

    def worker():
        key = tokens.generate_signing_key()
        barrier.wait()
        try:
            tokens.save_signing_key(key, path)
        except FileExistsError:
            pass
        try:
            kids.append(tokens.key_id(tokens.load_signing_key(path)))
        except Exception as e:  # a partially written file would fail to load
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(kids) == 8 and len(set(kids)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pem"]


def _write(path, data: bytes):
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("content", [
    b"", b"garbage",
    ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                      serialization.BestAvailableEncryption(b"secret")),
    KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                  serialization.PublicFormat.SubjectPublicKeyInfo),
])
def test_load_error_names_the_path(tmp_path, content):
    path = _write(tmp_path / "bad-key.pem", content)
    with pytest.raises(ValueError) as ei:
        tokens.load_signing_key(path)
    assert str(path) in str(ei.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        tokens.load_signing_key(tmp_path / "nope.pem")


def test_load_warns_but_accepts_readable_key(tmp_path, caplog):
    path = tmp_path / "k.pem"
    tokens.save_signing_key(KEY, path)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="gateway.tokens"):
        assert tokens.key_id(tokens.load_signing_key(path)) == KID
    assert any(str(path) in r.getMessage() for r in caplog.records)


# -- Proxy-Authorization ------------------------------------------------------------------------

def basic(userpass: str) -> str:
    return "Basic " + base64.b64encode(userpass.encode()).decode()


def test_extract_basic_password():
    assert tokens.extract_token_from_proxy_authorization(basic(f"x:{TOKEN}")) == TOKEN
    assert tokens.extract_token_from_proxy_authorization(basic(f":{TOKEN}")) == TOKEN
    h = basic(f"x:{TOKEN}")
    for variant in (h.replace("Basic", "basic"), h.replace("Basic", "BASIC"), "  " + h + " \t"):
        assert tokens.extract_token_from_proxy_authorization(variant) == TOKEN


def test_extract_basic_username_token():
    assert tokens.extract_token_from_proxy_authorization(basic(f"{TOKEN}:")) == TOKEN
    # password wins when both look like tokens; a non-token password loses to a token username
    assert tokens.extract_token_from_proxy_authorization(basic(f"{TOKEN}:egt1.other")) == "egt1.other"
    assert tokens.extract_token_from_proxy_authorization(basic(f"{TOKEN}:x")) == TOKEN


def test_extract_bearer():
    assert tokens.extract_token_from_proxy_authorization(f"Bearer {TOKEN}") == TOKEN
    assert tokens.extract_token_from_proxy_authorization(f"bearer  {TOKEN} ") == TOKEN


@pytest.mark.parametrize("header", [
    None, "", "   ", "Basic", "Bearer", "Basic !!!!", "Basic " + "QQ", "Digest username=x",
    "Negotiate abc", basic("no-colon-here"), basic("x:"), basic(":"), f"Bearer {TOKEN} extra",
    f"Basic {TOKEN}", "Basic " + base64.b64encode(b"x:\xff\xfe").decode(), 12, b"Basic eDp5",
    "Bearer " + "\u00e9" * 10, "Basic\u00a0" + base64.b64encode(f"x:{TOKEN}".encode()).decode(),
    "Bearer " + "A" * 20000,
])
def test_extract_garbage_returns_none(header):
    assert tokens.extract_token_from_proxy_authorization(header) is None


def test_extract_plain_password_is_returned_for_verify_to_reject():
    got = tokens.extract_token_from_proxy_authorization(basic("user:hunter2"))
    assert got == "hunter2"
    err = error_of(got)
    assert err.code == "malformed" and "hunter2" not in str(err)


@FAST
@given(st.text(max_size=200))
def test_extract_never_raises(text):
    for h in (text, "Basic " + text, "Bearer " + text,
              basic(text) if text.isascii() else text):
        r = tokens.extract_token_from_proxy_authorization(h)
        assert r is None or isinstance(r, str)

