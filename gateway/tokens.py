"""Compact signed identity tokens ("egt1") that a sandbox presents as proxy
credentials, e.g. ``HTTPS_PROXY=http://x:TOKEN@host:port``.

Format::

    egt1.<payload>.<signature>

    payload   = base64url(canonical JSON of the claims), no padding
    signature = base64url(Ed25519 signature over the ASCII bytes
                          "egt1.<payload>"), no padding (always 86 chars)

Every character of a token is in ``[A-Za-z0-9._-]``, so it can be put in the
userinfo part of a proxy URL without percent-encoding.

Canonical JSON is ``json.dumps(claims, sort_keys=True, separators=(",", ":"),
ensure_ascii=True)``. The claims are exactly::

    v    int 1                      format version
    kid  str                        key id: first 12 chars of
                                    base64url(sha256(raw public key))
    jti  str [A-Za-z0-9_-]{8,64}    token id (default: 16 random bytes)
    ten  str                        tenant
    agt  str                        agent
    ses  str (may be "")            session
    lbl  object str -> str          labels (at most 64)
    iat  int                        issued at (unix seconds)
    exp  int                        expires at (unix seconds), > iat

Security properties:

* Ed25519 signatures (via ``cryptography``); only holders of the gateway's
  signing key can mint tokens. Verification needs only public keys.
* One encoding per token: base64 segments must be canonical (no padding, zero
  trailing bits) and the payload must be byte-for-byte the canonical JSON of
  the claims it decodes to, so the same claims cannot be smuggled in an
  alternative encoding (duplicate keys, whitespace, escapes, key order).
* Strict claim validation: unknown, missing or mistyped claims are rejected
  (``True`` is not an int), identifiers and labels have fixed grammars, a
  token lives at most ``MAX_TTL_SECONDS`` (30 days) -- also enforced on
  verification, so revocation entries (kept for 31 days) outlive every token.
* Tokens are signed, not encrypted: claims are readable by whoever holds the
  token, so never put secrets in them.
* ``verify`` raises only ``TokenError`` for any input, and its messages never
  contain the token or anything decoded from it (tokens are credentials and
  error messages end up in logs). Exceptions are raised with no chained
  cause/context for the same reason.
* Revocation is by token id (``jti``) and is handled elsewhere
  (``gateway.identity``); this module does not know about it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

log = logging.getLogger(__name__)

PREFIX = "egt1"
VERSION = 1
MAX_TOKEN_LENGTH = 4096
MAX_TTL_SECONDS = 30 * 86400
MAX_LABELS = 64
MAX_LABEL_VALUE_LENGTH = 256
MAX_TIMESTAMP = 2**53 - 1  # stays exact in every JSON implementation
SIGNATURE_LENGTH = 64
KEY_ID_LENGTH = 12
DEFAULT_LEEWAY_SECONDS = 30

CODES = frozenset({"malformed", "bad_signature", "unknown_key", "expired", "not_yet_valid",
                   "invalid_claims"})

CLAIM_NAMES = frozenset({"v", "kid", "jti", "ten", "agt", "ses", "lbl", "iat", "exp"})

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_LABEL_KEY_RE = re.compile(r"[a-z0-9]([a-z0-9._/-]{0,62}[a-z0-9])?")
_TOKEN_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_KEY_ID_RE = re.compile(r"[A-Za-z0-9_-]{%d}" % KEY_ID_LENGTH)
_B64_SIG_LEN = (SIGNATURE_LENGTH * 4 + 2) // 3  # 86
_TOKEN_RE = re.compile(r"egt1\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{%d})" % _B64_SIG_LEN)
_PROXY_AUTH_RE = re.compile(r"[ \t]*([A-Za-z]+)[ \t]+([^ \t]+)[ \t]*")
_MAX_HEADER_LENGTH = 3 * MAX_TOKEN_LENGTH


class TokenError(Exception):
    """Verification failed. ``code`` is one of ``CODES``.

    The message is fixed text chosen by this module: it never contains the
    token, a part of it, or a value decoded from it.
    """

    _DEFAULT = {
        "malformed": "malformed identity token",
        "bad_signature": "identity token signature is not valid",
        "unknown_key": "identity token was signed by an unknown key",
        "expired": "identity token has expired",
        "not_yet_valid": "identity token is not valid yet",
        "invalid_claims": "identity token claims are not valid",
    }

    def __init__(self, code: str, message: str | None = None):
        if code not in CODES:
            raise ValueError(f"unknown token error code {code!r}")
        self.code = code
        super().__init__(message or self._DEFAULT[code])

    def __reduce__(self):
        return (type(self), (self.code, str(self)))


@dataclass(frozen=True)
class Claims:
    """The verified contents of a token. ``labels`` is a read-only mapping."""

    tenant: str
    agent: str
    session: str
    labels: Mapping[str, str]
    token_id: str
    issued_at: int
    expires_at: int
    key_id: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels or {})))

    def labels_tuple(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.labels.items()))

    def __hash__(self) -> int:
        return hash((self.tenant, self.agent, self.session, self.labels_tuple(), self.token_id,
                     self.issued_at, self.expires_at, self.key_id))


# -- encoding helpers ----------------------------------------------------------

def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes | None:
    """Strict, canonical base64url without padding; None if not canonical.
    ``text`` must already be known to hold only base64url characters."""
    if len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    if _b64e(data) != text:  # non-zero trailing bits: another spelling of the same bytes
        return None
    return data


def _canonical(claims: Mapping[str, Any]) -> bytes:
    return json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is a subclass of int: not accepted


def _check_label_value(v: Any) -> bool:
    return type(v) is str and len(v) <= MAX_LABEL_VALUE_LENGTH and (v == "" or v.isprintable())


def _claims_problem(c: Mapping[str, Any]) -> str | None:
    """The first problem with decoded claims, naming the claim but never
    quoting a value; None when they are valid."""
    names = set(c)
    if names - CLAIM_NAMES:
        return "unknown claim present"
    missing = CLAIM_NAMES - names
    if missing:
        return "missing claim: " + ", ".join(sorted(missing))
    if not _is_int(c["v"]) or c["v"] != VERSION:
        return "v: unsupported token version"
    if type(c["kid"]) is not str or not _KEY_ID_RE.fullmatch(c["kid"]):
        return "kid: must be a 12-character key id"
    if type(c["jti"]) is not str or not _TOKEN_ID_RE.fullmatch(c["jti"]):
        return "token_id (jti): must match [A-Za-z0-9_-]{8,64}"
    for claim, field in (("ten", "tenant"), ("agt", "agent")):
        if type(c[claim]) is not str or not _NAME_RE.fullmatch(c[claim]):
            return f"{field} ({claim}): must match [A-Za-z0-9][A-Za-z0-9._:-]{{0,127}}"
    ses = c["ses"]
    if type(ses) is not str or (ses != "" and not _NAME_RE.fullmatch(ses)):
        return "session (ses): must be empty or match [A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
    lbl = c["lbl"]
    if type(lbl) is not dict:
        return "labels (lbl): must be an object of strings"
    if len(lbl) > MAX_LABELS:
        return f"labels (lbl): at most {MAX_LABELS} labels"
    for k, v in lbl.items():
        if type(k) is not str or not _LABEL_KEY_RE.fullmatch(k):
            return "labels (lbl): keys must match [a-z0-9]([a-z0-9._/-]{0,62}[a-z0-9])?"
        if not _check_label_value(v):
            return (f"labels (lbl): values must be strings of at most {MAX_LABEL_VALUE_LENGTH} "
                    "printable characters")
    iat, exp = c["iat"], c["exp"]
    if not _is_int(iat) or not 0 <= iat <= MAX_TIMESTAMP:
        return "issued_at (iat): must be a non-negative integer (unix seconds)"
    if not _is_int(exp) or not 0 <= exp <= MAX_TIMESTAMP:
        return "expires_at (exp): must be a non-negative integer (unix seconds)"
    if exp <= iat:
        return "expires_at (exp): must be after issued_at (iat)"
    if exp - iat > MAX_TTL_SECONDS:
        return f"expires_at (exp): token lifetime exceeds {MAX_TTL_SECONDS} seconds"
    return None


# -- keys ----------------------------------------------------------------------

def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _public(key: Ed25519PrivateKey | Ed25519PublicKey) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key
    raise TypeError("expected an Ed25519 private or public key")


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """First 12 chars of base64url(sha256(raw public key bytes))."""
    raw = _public(key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64e(hashlib.sha256(raw).digest())[:KEY_ID_LENGTH]


def save_signing_key(key: Ed25519PrivateKey, path: str | os.PathLike) -> None:
    """Write ``key`` as unencrypted PKCS8 PEM, mode 0600.

    Raises FileExistsError if ``path`` exists (also if it is a symlink). The
    file is written under a temporary name (created O_CREAT|O_EXCL, 0600) and
    then hard-linked into place, so a concurrent reader never sees a partial
    key; on file systems without hard links it is written in place
    (O_CREAT|O_EXCL, 0600).
    """
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError("expected an Ed25519 private key")
    path = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)

    def write_new(p: Path) -> None:
        fd = os.open(p, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # independent of the umask
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            p.unlink(missing_ok=True)
            raise
        os.close(fd)

    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path}: signing key file already exists")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    write_new(tmp)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path}: signing key file already exists") from None
        except OSError:
            # no hard links here (some FUSE/network file systems): O_EXCL in place
            write_new(path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        dfd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def load_signing_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Read an unencrypted PEM Ed25519 private key.

    Raises ValueError naming ``path`` if the file does not hold one (OSError,
    e.g. FileNotFoundError, if it cannot be read). A key file readable by
    group or others is accepted but logged as a warning.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("signing key file %s is accessible by group/others (mode %04o); "
                        "it should be 0600", path, stat.S_IMODE(mode))
    except OSError:
        pass
    problem = None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except Exception:  # ValueError, TypeError (encrypted), UnsupportedAlgorithm, ...
        problem = "is not an unencrypted PEM private key"
    else:
        if not isinstance(key, Ed25519PrivateKey):
            problem = "holds a private key that is not Ed25519"
    if problem:
        raise ValueError(f"{path}: {problem} (expected an Ed25519 private key in PKCS8 PEM form)")
    return key


class VerifyKeys:
    """The public keys tokens are verified against, by key id."""

    def __init__(self, keys=()):
        self._keys: dict[str, Ed25519PublicKey] = {}
        for k in keys:
            self.add(k)

    @classmethod
    def from_private(cls, key: Ed25519PrivateKey) -> "VerifyKeys":
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError("expected an Ed25519 private key")
        return cls([key.public_key()])

    def add(self, public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
        """Add a key (a private key is reduced to its public half); returns its id."""
        pub = _public(public_key)
        kid = key_id(pub)
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        old = self._keys.get(kid)
        if old is not None and old.public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw) != raw:
            raise ValueError(f"key id {kid} collides with a different key")
        self._keys[kid] = pub
        return kid

    def remove(self, kid: str) -> bool:
        return self._keys.pop(kid, None) is not None

    def get(self, kid: str) -> Ed25519PublicKey | None:
        return self._keys.get(kid)

    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    def __contains__(self, kid: object) -> bool:
        return isinstance(kid, str) and kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"VerifyKeys({list(self.key_ids())!r})"


# -- mint / verify ---------------------------------------------------------------

def mint(key: Ed25519PrivateKey, *, tenant: str, agent: str, session: str = "",
         labels: Mapping[str, str] | None = None, ttl_seconds: int = 3600,
         now: int | float | None = None, token_id: str | None = None) -> str:
    """Sign a token. Raises ValueError (naming the field) on invalid input."""
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError("expected an Ed25519 private key")
    if not _is_int(ttl_seconds) or not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise ValueError(f"ttl_seconds: must be an integer from 1 to {MAX_TTL_SECONDS} (30 days)")
    if now is None:
        iat = int(time.time())
    elif isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValueError("now: must be a finite number of unix seconds")
    else:
        iat = math.floor(now)
    if token_id is None:
        token_id = _b64e(secrets.token_bytes(16))
    if labels is None:
        labels = {}
    if not isinstance(labels, Mapping):
        raise ValueError("labels: must be a mapping of strings to strings")
    for name, value in (("tenant", tenant), ("agent", agent), ("session", session),
                        ("token_id", token_id)):
        if not isinstance(value, str):
            raise ValueError(f"{name}: must be a string")
    lbl = {}
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError("labels: keys and values must be strings")
        lbl[str(k)] = str(v)
    claims = {"v": VERSION, "kid": key_id(key), "jti": str(token_id), "ten": str(tenant),
              "agt": str(agent), "ses": str(session), "lbl": lbl, "iat": iat, "exp": iat + ttl_seconds}
    problem = _claims_problem(claims)
    if problem:
        raise ValueError(problem)
    signing_input = f"{PREFIX}.{_b64e(_canonical(claims))}"
    token = f"{signing_input}.{_b64e(key.sign(signing_input.encode('ascii')))}"
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError(f"labels: token would exceed {MAX_TOKEN_LENGTH} characters; "
                         "use fewer or shorter labels")
    return token


def _verify(token: Any, keys: VerifyKeys, now: float, leeway: float) -> Claims | TokenError:
    # Returns the error instead of raising it, so the caller raises it outside
    # any except block: no __context__ (which could hold token bytes) is chained.
    if type(token) is not str or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        return TokenError("malformed")
    m = _TOKEN_RE.fullmatch(token)
    if m is None:
        return TokenError("malformed")
    payload_b64, sig_b64 = m.group(1), m.group(2)
    raw = _b64d(payload_b64)
    sig = _b64d(sig_b64)
    if raw is None or sig is None or len(sig) != SIGNATURE_LENGTH:
        return TokenError("malformed")
    claims = None
    try:
        text = raw.decode("ascii")
        claims = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except Exception:  # UnicodeDecodeError, ValueError, RecursionError, ...
        pass
    if type(claims) is not dict:
        return TokenError("malformed")
    try:
        canonical = _canonical(claims)
    except Exception:
        canonical = None
    if canonical != raw:
        return TokenError("malformed", "identity token payload is not canonically encoded")
    kid = claims.get("kid")
    if type(kid) is not str:
        return TokenError("malformed", "identity token has no key id")
    pub = keys.get(kid)
    if pub is None:
        return TokenError("unknown_key")
    ok = False
    try:
        pub.verify(sig, f"{PREFIX}.{payload_b64}".encode("ascii"))
        ok = True
    except InvalidSignature:
        pass
    except Exception:
        pass
    if not ok:
        return TokenError("bad_signature")
    problem = _claims_problem(claims)
    if problem:
        return TokenError("invalid_claims", "identity token claims are not valid: " + problem)
    if claims["exp"] + leeway <= now:
        return TokenError("expired")
    if claims["iat"] - leeway > now:
        return TokenError("not_yet_valid")
    return Claims(tenant=claims["ten"], agent=claims["agt"], session=claims["ses"],
                  labels=claims["lbl"], token_id=claims["jti"], issued_at=claims["iat"],
                  expires_at=claims["exp"], key_id=kid)


class _Reject(ValueError):
    pass


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _Reject("duplicate key")
    return d


def _no_constants(name):
    raise _Reject("non-finite number")


def verify(token: str, keys: VerifyKeys, *, now: int | float | None = None,
           leeway_seconds: int | float = DEFAULT_LEEWAY_SECONDS) -> Claims:
    """Check a token and return its claims; raises only TokenError for a bad token.

    Checks, in order: shape and length (malformed), decoding and canonical
    encoding (malformed), key id (unknown_key), signature (bad_signature),
    claims (invalid_claims), ``exp + leeway <= now`` (expired),
    ``iat - leeway > now`` (not_yet_valid).
    """
    if not isinstance(keys, VerifyKeys):
        raise TypeError("keys must be a VerifyKeys")
    if isinstance(leeway_seconds, bool) or not isinstance(leeway_seconds, (int, float)) \
            or not 0 <= leeway_seconds < math.inf:
        raise ValueError("leeway_seconds must be a non-negative number")
    if now is None:
        now = time.time()
    elif isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValueError("now must be a finite number of unix seconds")
    result = _verify(token, keys, now, leeway_seconds)
    if isinstance(result, TokenError):
        raise result
    return result


# -- presentation ------------------------------------------------------------------

def extract_token_from_proxy_authorization(header: str) -> str | None:
    """The token in a Proxy-Authorization header value, or None.

    Accepts ``Basic base64(user:password)`` -- the token is the password
    (``http://x:TOKEN@host:port``), or the username when it starts with
    ``egt1.`` (``curl -U TOKEN:``) -- and ``Bearer TOKEN``. The scheme is
    case-insensitive. The returned string is not verified. Never raises.
    """
    try:
        if type(header) is not str or len(header) > _MAX_HEADER_LENGTH:
            return None
        m = _PROXY_AUTH_RE.fullmatch(header)
        if m is None:
            return None
        scheme, cred = m.group(1).lower(), m.group(2)
        if scheme == "bearer":
            return cred if cred.isascii() and cred.isprintable() else None
        if scheme != "basic":
            return None
        try:
            decoded = base64.b64decode(cred.encode("ascii"), validate=True).decode("utf-8")
        except (ValueError, UnicodeError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        prefix = PREFIX + "."
        if password.startswith(prefix):
            return password
        if user.startswith(prefix):
            return user
        return password or None
    except Exception:
        return None

