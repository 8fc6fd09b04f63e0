"""Who is calling: signed tokens (explicit mode) and source-address bindings
(transparent mode), plus revocation. State is kept in the gateway's state dir
so it survives restarts; writes go to a temp file then rename (atomic)."""

from __future__ import annotations

import ipaddress
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gateway import tokens
from gateway.policy.model import Principal

KEY_FILE = "signing-key.pem"


def _atomic_write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_or_create_signing_key(identity_dir: Path):
    """The gateway's Ed25519 signing key, created (mode 0600) on first use."""
    identity_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = identity_dir / KEY_FILE
    if not path.exists():
        try:
            tokens.save_signing_key(tokens.generate_signing_key(), path)
        except FileExistsError:
            pass  # created concurrently by another process
    return tokens.load_signing_key(path)


@dataclass(frozen=True)
class IdentityResult:
    principal: Principal | None
    code: str = ""  # "" when ok; else missing | malformed | bad_signature | expired | revoked | ...
    message: str = ""
    expires_at: int = 0  # token expiry (unix seconds); 0 for bindings


class IdentityService:
    def __init__(self, state_dir: Path, *, leeway_seconds: int = 30):
        self.dir = Path(state_dir) / "identity"
        self.key = load_or_create_signing_key(self.dir)
        self.keys = tokens.VerifyKeys.from_private(self.key)
        self.leeway = leeway_seconds
        self._lock = threading.Lock()
        self._revoked_path = self.dir / "revoked.json"
        self._bindings_path = self.dir / "bindings.json"
        self.revoked: dict[str, int] = {}  # token id -> keep-until (unix seconds)
        self.bindings: dict[str, Principal] = {}
        # verified tokens (signature checks cost ~50 us): token -> (principal, exp)
        self._verified: dict[str, tuple[Principal, int]] = {}
        self._by_header: dict[str, tuple[Principal, int]] = {}  # Proxy-Authorization value -> same
        self._load()

    # -- persistence -------------------------------------------------------
    def _load(self) -> None:
        if self._revoked_path.exists():
            self.revoked = {str(k): int(v) for k, v in json.loads(self._revoked_path.read_text()).items()}
        if self._bindings_path.exists():
            raw = json.loads(self._bindings_path.read_text())
            self.bindings = {a: Principal.make(p["tenant"], p["agent"], p.get("session", ""),
                                               p.get("labels") or {}, p.get("token_id", ""), "binding")
                             for a, p in raw.items()}

    def _save_revoked(self) -> None:
        _atomic_write_json(self._revoked_path, self.revoked)

    def _save_bindings(self) -> None:
        _atomic_write_json(self._bindings_path, {a: {**p.to_cel(), "labels": dict(p.labels)}
                                                 for a, p in self.bindings.items()})

    # -- tokens --------------------------------------------------------------
    def mint(self, **kw) -> str:
        return tokens.mint(self.key, **kw)

    def _cached(self, cache: dict, key: str) -> IdentityResult | None:
        """A verified principal from ``cache`` if it is still unexpired and not revoked."""
        hit = cache.get(key)
        if hit is None:
            return None
        principal, exp = hit
        if exp + self.leeway > time.time() and principal.token_id not in self.revoked:
            return IdentityResult(principal, expires_at=exp)
        cache.pop(key, None)
        return None

    @staticmethod
    def _remember(cache: dict, key: str, result: IdentityResult) -> None:
        if len(cache) >= 10_000:
            cache.clear()
        cache[key] = (result.principal, result.expires_at)

    def verify_token(self, token: str | None) -> IdentityResult:
        if not token:
            return IdentityResult(None, "missing", "no identity token presented")
        hit = self._cached(self._verified, token)
        if hit is not None:
            return hit
        try:
            claims = tokens.verify(token, self.keys, leeway_seconds=self.leeway)
        except tokens.TokenError as e:
            return IdentityResult(None, e.code, str(e))
        if claims.token_id in self.revoked:
            return IdentityResult(None, "revoked", "identity token has been revoked")
        result = IdentityResult(Principal.make(claims.tenant, claims.agent, claims.session,
                                               dict(claims.labels), claims.token_id, "token"),
                                expires_at=claims.expires_at)
        self._remember(self._verified, token, result)
        return result

    def from_proxy_authorization(self, header: str | None) -> IdentityResult:
        if header:
            hit = self._cached(self._by_header, header)
            if hit is not None:
                return hit
        token = tokens.extract_token_from_proxy_authorization(header) if header else None
        if header and token is None:
            return IdentityResult(None, "malformed", "proxy credentials do not hold an identity token")
        result = self.verify_token(token)
        if result.principal is not None:
            self._remember(self._by_header, header, result)
        return result

    def still_valid(self, principal: Principal, expires_at: int = 0) -> IdentityResult:
        """Re-check a token principal established earlier on a connection
        (revocation and expiry can happen while a tunnel is open)."""
        if principal.token_id in self.revoked:
            return IdentityResult(None, "revoked", "identity token has been revoked")
        if expires_at and expires_at + self.leeway <= time.time():
            return IdentityResult(None, "expired", "identity token has expired")
        return IdentityResult(principal, expires_at=expires_at)

    def revoke(self, token_id: str, keep_until: int | None = None) -> None:
        with self._lock:
            now = int(time.time())
            self.revoked[token_id] = keep_until or now + 31 * 86400
            # forget revocations of tokens that have expired anyway
            self.revoked = {k: v for k, v in self.revoked.items() if v > now}
            self._save_revoked()

    # -- bindings ------------------------------------------------------------
    def bind(self, address: str, principal: Principal) -> str:
        addr = str(ipaddress.ip_address(address))
        with self._lock:
            self.bindings[addr] = Principal(principal.tenant, principal.agent, principal.session,
                                            principal.labels, principal.token_id, "binding")
            self._save_bindings()
        return addr

    def unbind(self, address: str) -> bool:
        addr = str(ipaddress.ip_address(address))
        with self._lock:
            found = self.bindings.pop(addr, None) is not None
            if found:
                self._save_bindings()
        return found

    def for_source(self, address: str) -> IdentityResult:
        try:
            addr = str(ipaddress.ip_address(address.split("%", 1)[0]))
        except ValueError:
            return IdentityResult(None, "unbound", "unknown source address")
        p = self.bindings.get(addr)
        if p is None:
            ip = ipaddress.ip_address(addr)
            if ip.version == 6 and ip.ipv4_mapped is not None:
                p = self.bindings.get(str(ip.ipv4_mapped))
        if p is None:
            return IdentityResult(None, "unbound", "no identity is bound to this source address")
        return IdentityResult(p)
