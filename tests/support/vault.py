"""An in-repo implementation of the subset of HashiCorp Vault's HTTP API we use.

No Vault binary can be installed on the test machines, so integration tests for
the credential-injection feature talk to this server instead. It follows the
request/response shapes and status codes of Vault's documented HTTP API
(https://developer.hashicorp.com/vault/api-docs) closely enough that the real
``hvac`` client works against it unchanged; the same tests run against a real
Vault when ``VAULT_ADDR``/``VAULT_TOKEN`` are set (see ``vault_from_env``).

Run as a subprocess::

    python -m tests.support.vault --host 127.0.0.1 --port 0 \
        --ready-file PATH [--root-token TOKEN]

Once the socket is bound, ``{"port", "pid", "root_token"}`` is written atomically
(temp file + rename) to ``--ready-file``. SIGTERM/SIGINT stop it (status 0).
``start_vault(tmpdir)`` does all of that and returns a ``VaultProc``.

Conventions shared by every endpoint (https://developer.hashicorp.com/vault/api-docs#http-status-codes):

* JSON bodies; ``Content-Type: application/json`` exactly (hvac compares it).
* Token in ``X-Vault-Token`` or ``Authorization: Bearer``; missing, unknown,
  revoked or expired tokens get ``403 {"errors": ["permission denied"]}``.
* ``X-Vault-Namespace`` selects a namespace (Enterprise feature, see
  https://developer.hashicorp.com/vault/docs/enterprise/namespaces); each has
  its own mounts, auth methods and policies; tokens are valid in their own
  namespace and its children.
* 400 invalid request, 403 permission denied, 404 missing path with
  ``{"errors": []}``, 405 unsupported operation, 503 sealed.
* ``LIST`` or ``GET ...?list=true`` for list operations.
* Successful writes with nothing to return answer ``204 No Content``.

Test-control endpoints live under ``/v1/_test/`` and are NOT part of Vault
(no token needed, work while sealed):

* ``POST /v1/_test/clock {"advance": seconds}`` moves the fake clock forward
  (clock = ``time.time()`` + offset; every TTL is measured with it);
  ``GET /v1/_test/clock`` -> ``{"now", "offset"}``.
* ``POST /v1/_test/seal {"sealed": bool}`` seals/unseals.
* ``GET /v1/_test/leases`` -> ``{"live": [...], "revoked": [...], "expired": [...]}``
  lease ids (all namespaces).
* ``POST /v1/_test/database/check {"username", "password"}`` -> ``{"valid": bool}``:
  what the simulated database would say (valid only while the lease is live).
"""

from __future__ import annotations

if __name__ == "__main__":
    # aiohttp's C parser (llhttp) rejects Vault's LIST method; the pure-Python
    # parser accepts any token. Must be set before aiohttp is imported.
    import os as _os

    _os.environ.setdefault("AIOHTTP_NO_EXTENSIONS", "1")

import argparse
import asyncio
import base64
import datetime as _dt
import http.client
import json
import os
import re
import secrets
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

VERSION = "1.15.6+ent"
SYSTEM_DEFAULT_TTL = 768 * 3600  # 768h, Vault's default for default_lease_ttl
SYSTEM_MAX_TTL = 768 * 3600  # and for max_lease_ttl
JWT_LEEWAY = 150  # vault-plugin-auth-jwt default expiration_leeway / not_before_leeway

DEFAULT_POLICY = """
# Subset of Vault's built-in "default" policy
# (https://developer.hashicorp.com/vault/docs/concepts/policies#default-policy)
path "auth/token/lookup-self" { capabilities = ["read"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "auth/token/revoke-self" { capabilities = ["update"] }
path "sys/capabilities-self" { capabilities = ["update"] }
path "sys/leases/lookup" { capabilities = ["update"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "sys/renew" { capabilities = ["update"] }
"""


# --------------------------------------------------------------------------
# Errors and small helpers
# --------------------------------------------------------------------------


class VaultHTTPError(Exception):
    """Becomes ``{"errors": errors}`` (or ``body``) with ``status``."""

    def __init__(self, status: int, *errors: str, body: dict | None = None) -> None:
        super().__init__(status, errors)
        self.status = status
        self.errors = list(errors)
        self.body = body


def bad_request(msg: str) -> VaultHTTPError:
    return VaultHTTPError(400, msg)


def permission_denied() -> VaultHTTPError:
    return VaultHTTPError(403, "permission denied")


def not_found() -> VaultHTTPError:
    return VaultHTTPError(404)  # Vault answers {"errors": []}


def unsupported_operation() -> VaultHTTPError:
    return VaultHTTPError(405, "1 error occurred:\n\t* unsupported operation\n\n")


def unsupported_path() -> VaultHTTPError:
    return VaultHTTPError(404, "1 error occurred:\n\t* unsupported path\n\n")


def no_handler(path: str) -> VaultHTTPError:
    return VaultHTTPError(404, f'no handler for route "{path}". route entry not found.')


_DUR_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_DUR_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any, name: str = "ttl") -> int:
    """Vault's duration parameters: int seconds, "60", or Go-style "1h30m"."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise bad_request(f"invalid {name}")
    if isinstance(value, (int, float)):
        return int(value)
    s = str(value).strip()
    if s.isdigit():
        return int(s)
    pos, total = 0, 0.0
    for m in _DUR_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DUR_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise bad_request(f"error converting input {s} for field {name!r}: time: invalid duration {s!r}")
    return int(total)


def as_list(value: Any) -> list[str]:
    """Vault's comma-string-or-array parameters."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return [str(v) for v in value]


def rfc3339(ts: float) -> str:
    d = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond:06d}000Z"


def _rand_id(n: int = 24) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


# --------------------------------------------------------------------------
# Policies (https://developer.hashicorp.com/vault/docs/concepts/policies)
# --------------------------------------------------------------------------

CAPABILITIES = {"create", "read", "update", "patch", "delete", "list", "sudo", "deny"}
_OLD_POLICY = {
    "deny": {"deny"},
    "read": {"read", "list"},
    "write": {"create", "read", "update", "delete", "list"},
    "sudo": {"create", "read", "update", "delete", "list", "sudo"},
}
_PATH_BLOCK = re.compile(r'path\s+"([^"]*)"\s*\{([^{}]*)\}', re.S)
_CAPS = re.compile(r"capabilities\s*=\s*\[([^\]]*)\]", re.S)
_OLD = re.compile(r'policy\s*=\s*"(\w+)"')


def parse_policy(text: str) -> dict[str, set[str]]:
    """``path "..." { capabilities = [...] }`` blocks (HCL) or the JSON form."""
    rules: dict[str, set[str]] = {}
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            doc = json.loads(stripped)
            for p, body in (doc.get("path") or {}).items():
                caps = set(body.get("capabilities") or [])
                if "policy" in body:
                    caps |= _OLD_POLICY.get(body["policy"], set())
                rules.setdefault(p, set()).update(caps)
        except (ValueError, AttributeError) as e:
            raise bad_request(f"failed to parse policy: {e}") from None
    else:
        no_comments = "\n".join(
            re.sub(r"(^|\s)(#|//).*$", "", line) for line in text.splitlines()
        )
        consumed = _PATH_BLOCK.sub("", no_comments)
        if consumed.strip():
            raise bad_request(f"failed to parse policy: unexpected input {consumed.strip()[:60]!r}")
        for m in _PATH_BLOCK.finditer(no_comments):
            p, body = m.group(1), m.group(2)
            caps: set[str] = set()
            cm = _CAPS.search(body)
            if cm:
                caps |= set(re.findall(r'"([^"]*)"', cm.group(1)))
            om = _OLD.search(body)
            if om:
                caps |= _OLD_POLICY.get(om.group(1), set())
            rules.setdefault(p, set()).update(caps)
    for p, caps in rules.items():
        bad = caps - CAPABILITIES
        if bad:
            raise bad_request(f"failed to parse policy: invalid capability {sorted(bad)[0]!r}")
        if "*" in p[:-1]:
            raise bad_request(f"failed to parse policy: invalid use of wildcard in path {p!r}")
    return rules


def _pattern_matches(pattern: str, path: str) -> bool:
    glob = pattern.endswith("*")
    pat = pattern[:-1] if glob else pattern
    pseg = pat.split("/")
    seg = path.split("/")
    if glob:
        # all but the last pattern segment must match whole segments; the last
        # one is a prefix of the corresponding path segment (and beyond)
        if len(seg) < len(pseg):
            return False
        for i, ps in enumerate(pseg):
            s = seg[i]
            if i == len(pseg) - 1:
                return ps == "+" or s.startswith(ps)
            if ps != "+" and ps != s:
                return False
        return True
    if len(seg) != len(pseg):
        return False
    return all(ps == "+" or ps == s for ps, s in zip(pseg, seg))


def _priority(pattern: str) -> tuple:
    """Vault's priority rules for overlapping wildcard paths (higher wins)."""
    first = min([i for i, c in enumerate(pattern) if c in "+*"] or [len(pattern)])
    return (first, not pattern.endswith("*"), -pattern.count("+"), len(pattern), pattern)


def capabilities_for(rules: dict[str, set[str]], path: str) -> set[str]:
    if path in rules and "+" not in path and "*" not in path:
        caps = rules[path]
    else:
        matching = [p for p in rules if ("+" in p or p.endswith("*")) and _pattern_matches(p, path)]
        if not matching:
            return set()
        caps = rules[max(matching, key=_priority)]
    return {"deny"} if "deny" in caps else set(caps)


# --------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------


@dataclass
class Token:
    id: str
    accessor: str
    namespace: str
    policies: list[str]
    creation_time: float
    ttl: int  # 0 = never expires (root)
    renewable: bool
    num_uses: int = 0
    path: str = "auth/token/create"
    display_name: str = "token"
    meta: dict | None = None
    parent: str | None = None
    orphan: bool = False
    explicit_max_ttl: int = 0
    creation_ttl: int = 0
    expire_at: float | None = None
    last_renewal: float | None = None

    @property
    def is_root(self) -> bool:
        return "root" in self.policies


@dataclass
class Lease:
    id: str
    namespace: str
    issue_time: float
    expire_at: float
    max_expire_at: float
    renewable: bool
    default_ttl: int
    token_id: str | None
    username: str
    password: str
    last_renewal: float | None = None
    state: str = "live"  # live | revoked | expired


@dataclass
class KVVersion:
    data: dict | None
    created_time: float
    deletion_time: float | None = None
    destroyed: bool = False


@dataclass
class KVKey:
    versions: dict[int, KVVersion] = field(default_factory=dict)
    current_version: int = 0
    oldest_version: int = 0
    max_versions: int = 0
    cas_required: bool = False
    delete_version_after: str = "0s"
    custom_metadata: dict | None = None
    created_time: float = 0.0
    updated_time: float = 0.0


@dataclass
class Mount:
    path: str  # with trailing slash
    type: str
    options: dict
    description: str = ""
    accessor: str = ""
    uuid: str = ""
    # engine state
    kv1: dict[str, dict] = field(default_factory=dict)
    kv2: dict[str, KVKey] = field(default_factory=dict)
    kv_config: dict = field(default_factory=lambda: {"max_versions": 0, "cas_required": False, "delete_version_after": "0s"})
    db_roles: dict[str, dict] = field(default_factory=dict)
    db_config: dict[str, dict] = field(default_factory=dict)
    roles: dict[str, dict] = field(default_factory=dict)  # approle / jwt roles
    secret_ids: dict[str, dict] = field(default_factory=dict)
    jwt_config: dict = field(default_factory=dict)

    @property
    def kv_version(self) -> int:
        if self.type == "kv-v2":
            return 2
        return int(str((self.options or {}).get("version", "1")))


@dataclass
class Namespace:
    path: str  # "" for root, else "ns1/" (full path, trailing slash)
    id: str
    mounts: dict[str, Mount] = field(default_factory=dict)
    auth: dict[str, Mount] = field(default_factory=dict)
    policies: dict[str, str] = field(default_factory=dict)
    custom_metadata: dict = field(default_factory=dict)


def _new_mount(path: str, type_: str, options: dict | None = None, description: str = "") -> Mount:
    return Mount(
        path=path, type=type_, options=dict(options or {}), description=description,
        accessor=f"{type_.replace('-', '_')}_{secrets.token_hex(4)}", uuid=str(uuid.uuid4()),
    )


class Vault:
    """All server state; request handling lives in ``dispatch``."""

    def __init__(self, root_token: str) -> None:
        self.offset = 0.0
        self.sealed = False
        self.cluster_id = str(uuid.uuid4())
        self.cluster_name = f"vault-cluster-{secrets.token_hex(4)}"
        self.tokens: dict[str, Token] = {}
        self.leases: dict[str, Lease] = {}
        self.namespaces: dict[str, Namespace] = {}
        root_ns = self._make_namespace("")
        # like `vault server -dev`: KV v2 at secret/; plus database/ for dynamic creds
        root_ns.mounts["secret/"] = _new_mount("secret/", "kv", {"version": "2"}, "key/value secret storage")
        root_ns.mounts["database/"] = _new_mount("database/", "database", {})
        self.root_token = root_token
        self.tokens[root_token] = Token(
            id=root_token, accessor=_rand_id(), namespace="", policies=["root"],
            creation_time=self.now(), ttl=0, renewable=False, path="auth/token/root",
            display_name="root", orphan=True,
        )

    # -- clock -------------------------------------------------------------
    def now(self) -> float:
        return time.time() + self.offset

    def _make_namespace(self, path: str) -> Namespace:
        ns = Namespace(path=path, id="root" if path == "" else _rand_id(5))
        ns.mounts["cubbyhole/"] = _new_mount("cubbyhole/", "cubbyhole", {})
        ns.mounts["sys/"] = _new_mount("sys/", "system", {})
        ns.auth["token/"] = _new_mount("token/", "token", {})
        ns.policies["default"] = DEFAULT_POLICY
        self.namespaces[path] = ns
        return ns

    # -- expiry ------------------------------------------------------------
    def sweep(self) -> None:
        """Vault's expiration manager, run lazily before each request."""
        now = self.now()
        for tok in list(self.tokens.values()):
            if tok.expire_at is not None and tok.expire_at <= now:
                self.revoke_token(tok.id, lease_state="expired")
        for lease in self.leases.values():
            if lease.state == "live" and lease.expire_at <= now:
                lease.state = "expired"

    def revoke_token(self, token_id: str, lease_state: str = "revoked") -> None:
        tok = self.tokens.pop(token_id, None)
        if tok is None:
            return
        for lease in self.leases.values():
            if lease.token_id == token_id and lease.state == "live":
                lease.state = lease_state
        for child in [t.id for t in self.tokens.values() if t.parent == token_id and not t.orphan]:
            self.revoke_token(child, lease_state)

    # -- tokens ------------------------------------------------------------
    def issue_token(
        self, *, namespace: str, policies: list[str], ttl: int, renewable: bool = True,
        num_uses: int = 0, path: str, display_name: str, meta: dict | None = None,
        parent: str | None = None, orphan: bool = False, no_default_policy: bool = False,
        explicit_max_ttl: int = 0,
    ) -> Token:
        pols = sorted(set(p for p in policies if p))
        if "root" not in pols and not no_default_policy and "default" not in pols:
            pols = sorted(pols + ["default"])
        if "root" in pols:
            ttl_eff = ttl
        else:
            ttl_eff = ttl or SYSTEM_DEFAULT_TTL
            cap = min(SYSTEM_MAX_TTL, explicit_max_ttl or SYSTEM_MAX_TTL)
            ttl_eff = min(ttl_eff, cap)
        now = self.now()
        tok = Token(
            id="hvs." + _rand_id(24), accessor=_rand_id(24), namespace=namespace, policies=pols,
            creation_time=now, ttl=ttl_eff, renewable=renewable and ttl_eff > 0, num_uses=num_uses,
            path=path, display_name=display_name, meta=meta, parent=parent, orphan=orphan,
            explicit_max_ttl=explicit_max_ttl, creation_ttl=ttl_eff,
            expire_at=(now + ttl_eff) if ttl_eff else None,
        )
        self.tokens[tok.id] = tok
        return tok

    def auth_block(self, tok: Token, *, warnings_token_policies: list[str] | None = None) -> dict:
        now = self.now()
        remaining = int(round(tok.expire_at - now)) if tok.expire_at else 0
        return {
            "client_token": tok.id,
            "accessor": tok.accessor,
            "policies": tok.policies,
            "token_policies": tok.policies,
            "identity_policies": None,
            "metadata": tok.meta,
            "lease_duration": max(remaining, 0),
            "renewable": tok.renewable,
            "entity_id": "",
            "token_type": "service",
            "orphan": tok.orphan,
            "mfa_requirement": None,
            "num_uses": tok.num_uses,
        }

    def lookup_data(self, tok: Token) -> dict:
        now = self.now()
        ttl = max(int(round(tok.expire_at - now)), 0) if tok.expire_at else 0
        local = _dt.datetime.fromtimestamp(tok.creation_time).astimezone()
        return {
            "accessor": tok.accessor,
            "creation_time": int(tok.creation_time),
            "creation_ttl": tok.creation_ttl,
            "display_name": tok.display_name,
            "entity_id": "",
            "expire_time": (
                _dt.datetime.fromtimestamp(tok.expire_at).astimezone().isoformat()
                if tok.expire_at else None
            ),
            "explicit_max_ttl": tok.explicit_max_ttl,
            "id": tok.id,
            "issue_time": local.isoformat(),
            "last_renewal": (
                _dt.datetime.fromtimestamp(tok.last_renewal).astimezone().isoformat()
                if tok.last_renewal else None
            ),
            "last_renewal_time": int(tok.last_renewal) if tok.last_renewal else None,
            "meta": tok.meta,
            "num_uses": tok.num_uses,
            "orphan": tok.orphan,
            "path": tok.path,
            "policies": tok.policies,
            "renewable": tok.renewable,
            "ttl": ttl,
            "type": "service",
        }


# --------------------------------------------------------------------------
# Request context and dispatch
# --------------------------------------------------------------------------


@dataclass
class Req:
    method: str  # upper-case HTTP method
    op: str  # read | list | create | update | delete
    path: str  # relative to /v1/ and to the namespace, no leading slash
    query: dict[str, str]
    body: dict
    ns: Namespace
    token: Token | None = None


def _acl_path(vault: Vault, req: Req) -> str:
    tok = req.token
    assert tok is not None
    return req.ns.path[len(tok.namespace):] + req.path


def _allowed(vault: Vault, req: Req, op: str | None = None, path: str | None = None) -> bool:
    tok = req.token
    if tok is None:
        return False
    if tok.is_root:
        return True
    tok_ns = vault.namespaces.get(tok.namespace)
    if tok_ns is None:
        return False
    rules: dict[str, set[str]] = {}
    for name in tok.policies:
        text = tok_ns.policies.get(name)
        if text is None:
            continue
        for p, caps in parse_policy(text).items():
            rules.setdefault(p, set()).update(caps)
    caps = capabilities_for(rules, path if path is not None else _acl_path(vault, req))
    return "deny" not in caps and (op or req.op) in caps


def _require(vault: Vault, req: Req, op: str | None = None, *, sudo: bool = False) -> None:
    if not _allowed(vault, req, op):
        raise permission_denied()
    if sudo and not _allowed(vault, req, "sudo"):
        raise permission_denied()


Handler = Callable[["Vault", Req], Any]


def envelope(data: Any = None, *, auth: dict | None = None, lease_id: str = "", lease_duration: int = 0,
             renewable: bool = False, warnings: list[str] | None = None, mount_type: str = "") -> dict:
    """The common response shape (https://developer.hashicorp.com/vault/api-docs#http-api)."""
    out = {
        "request_id": str(uuid.uuid4()),
        "lease_id": lease_id,
        "renewable": renewable,
        "lease_duration": lease_duration,
        "data": data,
        "wrap_info": None,
        "warnings": warnings,
        "auth": auth,
    }
    if mount_type:
        out["mount_type"] = mount_type
    return out


class Response:
    def __init__(self, status: int, body: dict | None) -> None:
        self.status = status
        self.body = body


NO_CONTENT = Response(204, None)


def ok(body: dict) -> Response:
    return Response(200, body)


def dispatch(vault: Vault, method: str, raw_path: str, query: dict[str, str], body: dict,
             headers: dict[str, str]) -> Response:
    if not raw_path.startswith("/v1/"):
        raise no_handler(raw_path.lstrip("/"))
    path = raw_path[len("/v1/"):]
    while "//" in path:
        path = path.replace("//", "/")

    if path.startswith("_test/"):
        return test_control(vault, method, path[len("_test/"):], body)

    if path.rstrip("/") == "sys/health":
        return sys_health(vault, method, query)

    if vault.sealed:
        raise VaultHTTPError(503, "Vault is sealed")

    vault.sweep()

    ns_name = (headers.get("x-vault-namespace") or "").strip("/")
    ns_path = ns_name + "/" if ns_name else ""
    ns = vault.namespaces.get(ns_path)
    if ns is None:
        raise VaultHTTPError(400, f'namespace not found: "{ns_path}"')

    list_op = method == "LIST" or (method == "GET" and query.get("list", "").lower() in ("true", "1"))
    if list_op:
        op = "list"
    elif method in ("GET", "HEAD"):
        op = "read"
    elif method in ("POST", "PUT"):
        op = "update"  # handlers with an existence check turn this into "create"
    elif method == "DELETE":
        op = "delete"
    else:
        raise unsupported_operation()

    req = Req(method=method, op=op, path=path, query=query, body=body, ns=ns)

    unauthenticated = re.fullmatch(r"auth/[^/]+(/[^/]+)*/login(/.*)?", path) is not None
    tok_id = headers.get("x-vault-token") or ""
    if not tok_id:
        authz = headers.get("authorization") or ""
        if authz.lower().startswith("bearer "):
            tok_id = authz[7:].strip()
    if not unauthenticated:
        tok = vault.tokens.get(tok_id) if tok_id else None
        if tok is None or not ns.path.startswith(tok.namespace):
            raise permission_denied()
        req.token = tok

    handler = route(vault, req)
    resp = handler(vault, req)

    tok = req.token
    if tok is not None and tok.num_uses > 0 and tok.id in vault.tokens:
        tok.num_uses -= 1
        if tok.num_uses == 0:
            vault.revoke_token(tok.id)
    return resp


def route(vault: Vault, req: Req) -> Handler:
    """Find the handler; ACL checks happen inside handlers (they know create vs update)."""
    p = req.path
    ns = req.ns
    if p.startswith("sys/"):
        return sys_route(p)
    if p.startswith("auth/"):
        rest = p[len("auth/"):]
        mount = _longest_mount(ns.auth, rest)
        if mount is None:
            raise no_handler(p)
        sub = rest[len(mount.path):]
        if mount.type == "token":
            return lambda v, r: token_backend(v, r, sub)
        if mount.type == "approle":
            return lambda v, r: approle_backend(v, r, mount, sub)
        if mount.type in ("jwt", "oidc"):
            return lambda v, r: jwt_backend(v, r, mount, sub)
        if mount.type == "kubernetes":
            return lambda v, r: kubernetes_backend(v, r, mount, sub)
        raise no_handler(p)
    mount = _longest_mount(ns.mounts, p)
    if mount is None:
        raise no_handler(p)
    sub = p[len(mount.path):]
    if mount.type in ("kv", "kv-v2", "generic"):
        if mount.kv_version == 2:
            return lambda v, r: kv2_backend(v, r, mount, sub)
        return lambda v, r: kv1_backend(v, r, mount, sub)
    if mount.type == "database":
        return lambda v, r: database_backend(v, r, mount, sub)
    raise unsupported_path()


def _longest_mount(mounts: dict[str, Mount], path: str) -> Mount | None:
    best = None
    for mp, m in mounts.items():
        if (path + "/").startswith(mp) and (best is None or len(mp) > len(best.path)):
            best = m
    return best


# --------------------------------------------------------------------------
# Test control (NOT part of Vault)
# --------------------------------------------------------------------------


def test_control(vault: Vault, method: str, path: str, body: dict) -> Response:
    """Test-only endpoints under /v1/_test/; see the module docstring."""
    path = path.rstrip("/")
    if path == "clock":
        if method == "POST":
            vault.offset += float(body.get("advance", 0))
        return ok({"now": vault.now(), "offset": vault.offset})
    if path == "seal" and method in ("POST", "PUT"):
        vault.sealed = bool(body.get("sealed", True))
        return ok({"sealed": vault.sealed})
    if path == "leases" and method == "GET":
        vault.sweep()
        out: dict[str, list[str]] = {"live": [], "revoked": [], "expired": []}
        for lease in vault.leases.values():
            out[lease.state].append(lease.id)
        return ok(out)
    if path == "database/check" and method in ("POST", "PUT"):
        vault.sweep()
        valid = any(
            lease.state == "live" and lease.username == body.get("username")
            and lease.password == body.get("password")
            for lease in vault.leases.values()
        )
        return ok({"valid": valid})
    raise no_handler("_test/" + path)


# --------------------------------------------------------------------------
# sys/*
# --------------------------------------------------------------------------


def sys_health(vault: Vault, method: str, query: dict[str, str]) -> Response:
    """GET /v1/sys/health — https://developer.hashicorp.com/vault/api-docs/system/health"""
    if method not in ("GET", "HEAD"):
        raise unsupported_operation()
    body = {
        "initialized": True,
        "sealed": vault.sealed,
        "standby": False,
        "performance_standby": False,
        "replication_performance_mode": "disabled",
        "replication_dr_mode": "disabled",
        "server_time_utc": int(vault.now()),
        "version": VERSION,
        "enterprise": True,
        "cluster_name": vault.cluster_name,
        "cluster_id": vault.cluster_id,
        "echo_duration_ms": 0,
        "clock_skew_ms": 0,
    }
    if vault.sealed:
        status = int(query.get("sealedcode", 503))
    else:
        status = int(query.get("activecode", 200))
    return Response(status, body)


def sys_route(path: str) -> Handler:
    p = path[len("sys/"):].rstrip("/")
    if p.startswith("mounts"):
        return lambda v, r: sys_mounts(v, r, p[len("mounts"):].strip("/"))
    if p == "auth" or p.startswith("auth/"):
        return lambda v, r: sys_auth(v, r, p[len("auth"):].strip("/"))
    if p == "policies/acl" or p.startswith("policies/acl/"):
        return lambda v, r: sys_policies(v, r, p[len("policies/acl"):].strip("/"))
    if p == "policy" or p.startswith("policy/"):
        return lambda v, r: sys_policies(v, r, p[len("policy"):].strip("/"))
    if p.startswith("leases/") or p in ("renew", "revoke") or p.startswith(("renew/", "revoke/")):
        return lambda v, r: sys_leases(v, r, p)
    if p == "namespaces" or p.startswith("namespaces/"):
        return lambda v, r: sys_namespaces(v, r, p[len("namespaces"):].strip("/"))
    if p == "seal":
        return sys_seal
    raise no_handler(path)


def sys_seal(vault: Vault, req: Req) -> Response:
    """PUT /v1/sys/seal (root/sudo) — https://developer.hashicorp.com/vault/api-docs/system/seal"""
    if req.method not in ("POST", "PUT"):
        raise unsupported_operation()
    _require(vault, req, sudo=True)
    vault.sealed = True
    return NO_CONTENT


def _mount_info(m: Mount) -> dict:
    return {
        "type": m.type,
        "description": m.description,
        "accessor": m.accessor,
        "uuid": m.uuid,
        "config": {"default_lease_ttl": 0, "max_lease_ttl": 0, "force_no_cache": False},
        "options": m.options or None,
        "local": False,
        "seal_wrap": False,
        "external_entropy_access": False,
        "plugin_version": "",
    }


def sys_mounts(vault: Vault, req: Req, name: str) -> Response:
    """/v1/sys/mounts[/:path] — https://developer.hashicorp.com/vault/api-docs/system/mounts"""
    ns = req.ns
    if not name:
        if req.op != "read":
            raise unsupported_operation()
        _require(vault, req)
        data = {mp: _mount_info(m) for mp, m in ns.mounts.items()}
        return ok(envelope(data) | data)
    mp = name.strip("/") + "/"
    if req.op == "update":
        _require(vault, req)
        type_ = req.body.get("type")
        if not type_:
            raise bad_request("backend type must be specified as a string")
        if type_ not in ("kv", "kv-v2", "generic", "database"):
            raise bad_request(f'plugin not found in the catalog: {type_}')
        for existing in ns.mounts:
            if existing.startswith(mp) or mp.startswith(existing):
                raise bad_request(f"path is already in use at {existing}")
        options = dict(req.body.get("options") or {})
        if type_ == "kv-v2":
            type_, options["version"] = "kv", "2"
        if type_ in ("kv", "generic"):
            options.setdefault("version", "1")
            if str(options["version"]) not in ("1", "2"):
                raise bad_request("invalid version")
            options["version"] = str(options["version"])
        ns.mounts[mp] = _new_mount(mp, type_, options, req.body.get("description", ""))
        return NO_CONTENT
    if req.op == "read":
        _require(vault, req)
        m = ns.mounts.get(mp)
        if m is None:
            raise bad_request(f"No secret engine mount at {mp}")
        info = _mount_info(m)
        return ok(envelope(info) | info)
    if req.op == "delete":
        _require(vault, req)
        if mp in ("sys/", "cubbyhole/"):
            raise bad_request(f"cannot unmount {mp!r}")
        m = ns.mounts.pop(mp, None)
        if m is not None:
            for lease in vault.leases.values():
                if lease.namespace == ns.path and lease.id.startswith(mp) and lease.state == "live":
                    lease.state = "revoked"
        return NO_CONTENT
    raise unsupported_operation()


def sys_auth(vault: Vault, req: Req, name: str) -> Response:
    """/v1/sys/auth[/:path] — https://developer.hashicorp.com/vault/api-docs/system/auth"""
    ns = req.ns
    if not name:
        if req.op != "read":
            raise unsupported_operation()
        _require(vault, req)
        data = {mp: _mount_info(m) for mp, m in ns.auth.items()}
        return ok(envelope(data) | data)
    mp = name.strip("/") + "/"
    if req.op == "update":
        _require(vault, req, sudo=True)
        type_ = req.body.get("type")
        if not type_:
            raise bad_request("backend type must be specified as a string")
        if type_ not in ("approle", "jwt", "oidc", "kubernetes"):
            raise bad_request(f"plugin not found in the catalog: {type_}")
        for existing in ns.auth:
            if existing.startswith(mp) or mp.startswith(existing):
                raise bad_request(f"path is already in use at {existing}")
        ns.auth[mp] = _new_mount(mp, type_, req.body.get("options"), req.body.get("description", ""))
        return NO_CONTENT
    if req.op == "delete":
        _require(vault, req, sudo=True)
        if mp == "token/":
            raise bad_request("token credential backend cannot be disabled")
        ns.auth.pop(mp, None)
        return NO_CONTENT
    raise unsupported_operation()


def sys_policies(vault: Vault, req: Req, name: str) -> Response:
    """/v1/sys/policies/acl/:name (and legacy /v1/sys/policy/:name) —
    https://developer.hashicorp.com/vault/api-docs/system/policies"""
    ns = req.ns
    if not name:
        if req.op not in ("list", "read"):
            raise unsupported_operation()
        _require(vault, req, "list" if req.op == "list" else "read")
        keys = sorted(ns.policies) + ["root"] if req.ns.path == "" else sorted(ns.policies)
        return ok(envelope({"keys": keys, "policies": keys}))
    name = name.lower()
    if req.op == "update":
        _require(vault, req)
        if name == "root":
            raise bad_request('cannot update "root" policy')
        text = req.body.get("policy", req.body.get("rules"))
        if not isinstance(text, str) or not text.strip():
            raise bad_request("'policy' parameter not supplied or empty")
        parse_policy(text)
        ns.policies[name] = text
        return NO_CONTENT
    if req.op == "read":
        _require(vault, req)
        if name not in ns.policies:
            raise not_found()
        data = {"name": name, "policy": ns.policies[name], "rules": ns.policies[name]}
        return ok(envelope(data) | data)
    if req.op == "delete":
        _require(vault, req)
        if name in ("root", "default"):
            raise bad_request(f'cannot delete "{name}" policy')
        ns.policies.pop(name, None)
        return NO_CONTENT
    raise unsupported_operation()


def sys_namespaces(vault: Vault, req: Req, name: str) -> Response:
    """/v1/sys/namespaces/:path (Enterprise) — https://developer.hashicorp.com/vault/api-docs/system/namespaces"""
    ns = req.ns
    if not name:
        if req.op != "list":
            raise unsupported_operation()
        _require(vault, req)
        kids = sorted(
            p[len(ns.path):] for p in vault.namespaces
            if p.startswith(ns.path) and p != ns.path and p[len(ns.path):].count("/") == 1
        )
        if not kids:
            raise not_found()
        return ok(envelope({"keys": kids}))
    full = ns.path + name.strip("/") + "/"

    def info(n: Namespace) -> dict:
        return {"id": n.id, "path": n.path[len(ns.path):], "custom_metadata": n.custom_metadata}

    if req.op == "update":
        _require(vault, req)
        if full in vault.namespaces:
            return ok(envelope(info(vault.namespaces[full])))
        if "/" in name.strip("/"):
            raise bad_request("child namespace must be created from its parent")
        child = vault._make_namespace(full)
        child.custom_metadata = dict(req.body.get("custom_metadata") or {})
        return ok(envelope(info(child)))
    if req.op == "read":
        _require(vault, req)
        if full not in vault.namespaces:
            raise not_found()
        return ok(envelope(info(vault.namespaces[full])))
    if req.op == "delete":
        _require(vault, req)
        for p in [p for p in vault.namespaces if p.startswith(full)]:
            del vault.namespaces[p]
        for t in [t.id for t in vault.tokens.values() if t.namespace.startswith(full)]:
            vault.revoke_token(t)
        return NO_CONTENT
    raise unsupported_operation()


def sys_leases(vault: Vault, req: Req, p: str) -> Response:
    """PUT /v1/sys/leases/{lookup,renew,revoke} —
    https://developer.hashicorp.com/vault/api-docs/system/leases"""
    if req.method not in ("POST", "PUT"):
        raise unsupported_operation()
    parts = p.split("/")
    if parts[0] == "leases":
        parts = parts[1:]
    action = parts[0] if parts else ""
    url_id = "/".join(parts[1:])
    if action not in ("lookup", "renew", "revoke"):
        raise no_handler("sys/" + p)
    acl = f"sys/leases/{action}" + (f"/{url_id}" if url_id else "")
    if not _allowed(vault, req, "update", req.ns.path[len(req.token.namespace):] + acl):
        raise permission_denied()
    lease_id = url_id or req.body.get("lease_id") or req.body.get("lease") or ""
    if not lease_id:
        raise bad_request("lease_id must be specified" if action != "lookup" else "missing lease id")
    lease = vault.leases.get(lease_id)
    if lease is not None and lease.namespace != req.ns.path:
        lease = None
    live = lease if lease is not None and lease.state == "live" else None
    if action == "lookup":
        if live is None:
            raise bad_request("invalid lease")
        now = vault.now()
        data = {
            "id": live.id,
            "issue_time": _dt.datetime.fromtimestamp(live.issue_time).astimezone().isoformat(),
            "expire_time": _dt.datetime.fromtimestamp(live.expire_at).astimezone().isoformat(),
            "last_renewal": (
                _dt.datetime.fromtimestamp(live.last_renewal).astimezone().isoformat()
                if live.last_renewal else None
            ),
            "renewable": live.renewable,
            "ttl": max(int(round(live.expire_at - now)), 0),
        }
        return ok(envelope(data))
    if action == "revoke":
        if live is not None:
            live.state = "revoked"
        return NO_CONTENT
    # renew
    if live is None:
        raise bad_request("lease not found")
    if not live.renewable:
        raise bad_request("lease is not renewable")
    now = vault.now()
    increment = parse_duration(req.body.get("increment"), "increment") or live.default_ttl
    warnings = None
    new_expire = now + increment
    if new_expire > live.max_expire_at:
        new_expire = live.max_expire_at
        warnings = [
            f"TTL of \"{increment}s\" exceeded the effective max_ttl of "
            f"\"{int(round(live.max_expire_at - now))}s\"; TTL value is capped accordingly"
        ]
    live.expire_at = new_expire
    live.last_renewal = now
    return ok(envelope(None, lease_id=live.id, renewable=True,
                       lease_duration=int(round(new_expire - now)), warnings=warnings))


# --------------------------------------------------------------------------
# auth/token — https://developer.hashicorp.com/vault/api-docs/auth/token
# --------------------------------------------------------------------------


def token_backend(vault: Vault, req: Req, sub: str) -> Response:
    sub = sub.rstrip("/")
    tok = req.token
    assert tok is not None
    if sub == "lookup-self":
        if req.op != "read":
            raise unsupported_operation()
        _require(vault, req)
        return ok(envelope(vault.lookup_data(tok)))
    if sub == "renew-self":
        if req.op != "update":
            raise unsupported_operation()
        _require(vault, req)
        if not tok.renewable:
            raise bad_request("lease is not renewable")
        now = vault.now()
        increment = parse_duration(req.body.get("increment"), "increment") or tok.creation_ttl
        max_at = tok.creation_time + min(SYSTEM_MAX_TTL, tok.explicit_max_ttl or SYSTEM_MAX_TTL)
        warnings = None
        new_exp = now + increment
        if new_exp > max_at:
            new_exp = max_at
            warnings = [
                f"TTL of \"{increment}s\" exceeded the effective max_ttl of "
                f"\"{int(round(max_at - now))}s\"; TTL value is capped accordingly"
            ]
        tok.expire_at = new_exp
        tok.last_renewal = now
        return ok(envelope(None, auth=vault.auth_block(tok), warnings=warnings))
    if sub == "revoke-self":
        if req.op != "update":
            raise unsupported_operation()
        _require(vault, req)
        vault.revoke_token(tok.id)
        req.token = None
        return NO_CONTENT
    if sub in ("create", "create-orphan"):
        if req.op != "update":
            raise unsupported_operation()
        _require(vault, req)
        b = req.body
        policies = as_list(b.get("policies"))
        if not tok.is_root:
            if not set(p for p in policies if p != "default") <= set(tok.policies):
                raise bad_request("child policies must be subset of parent")
            if not policies:
                policies = [p for p in tok.policies]
        elif not policies:
            policies = ["root"]
        if "root" in policies and not tok.is_root:
            raise bad_request("root tokens may not be created by a non-root token")
        ttl = parse_duration(b.get("ttl") or b.get("lease"), "ttl")
        num_uses = int(b.get("num_uses") or 0)
        if num_uses < 0:
            raise bad_request("number of uses cannot be negative")
        orphan = sub == "create-orphan" or bool(b.get("no_parent"))
        if "root" in policies:
            policies = ["root"]
        new = vault.issue_token(
            namespace=req.ns.path, policies=policies, ttl=ttl,
            renewable=b.get("renewable", True) not in (False, "false"), num_uses=num_uses,
            path=f"auth/token/{sub}", display_name="token" + (f"-{b['display_name']}" if b.get("display_name") else ""),
            meta=b.get("meta") or None, parent=tok.id, orphan=orphan,
            no_default_policy=bool(b.get("no_default_policy")),
            explicit_max_ttl=parse_duration(b.get("explicit_max_ttl"), "explicit_max_ttl"),
        )
        return ok(envelope(None, auth=vault.auth_block(new)))
    if sub in ("lookup", "revoke"):
        if req.op != "update" and not (sub == "lookup" and req.op == "read"):
            raise unsupported_operation()
        _require(vault, req)
        target = vault.tokens.get(req.body.get("token") or req.query.get("token") or "")
        if sub == "revoke":
            if target is not None:
                vault.revoke_token(target.id)
            return NO_CONTENT
        if target is None:
            raise bad_request("bad token")
        return ok(envelope(vault.lookup_data(target)))
    raise unsupported_path()


# --------------------------------------------------------------------------
# auth/approle — https://developer.hashicorp.com/vault/api-docs/auth/approle
# --------------------------------------------------------------------------


def _token_params(b: dict, old: dict | None = None) -> dict:
    old = old or {}
    return {
        "token_policies": as_list(b["token_policies"]) if "token_policies" in b
        else as_list(b["policies"]) if "policies" in b else old.get("token_policies", []),
        "token_ttl": parse_duration(b["token_ttl"], "token_ttl") if "token_ttl" in b else old.get("token_ttl", 0),
        "token_max_ttl": parse_duration(b["token_max_ttl"], "token_max_ttl") if "token_max_ttl" in b
        else old.get("token_max_ttl", 0),
        "token_num_uses": int(b.get("token_num_uses", old.get("token_num_uses", 0)) or 0),
        "token_no_default_policy": bool(b.get("token_no_default_policy", old.get("token_no_default_policy", False))),
    }


def _login(vault: Vault, req: Req, mount: Mount, role: dict, display: str, meta: dict) -> Response:
    tok = vault.issue_token(
        namespace=req.ns.path, policies=role["token_policies"], ttl=role["token_ttl"],
        num_uses=role["token_num_uses"], path=f"auth/{mount.path}login", display_name=display,
        meta=meta, orphan=True, no_default_policy=role["token_no_default_policy"],
        explicit_max_ttl=role["token_max_ttl"],
    )
    auth = vault.auth_block(tok)
    auth["token_policies"] = tok.policies
    return ok(envelope(None, auth=auth))


def approle_backend(vault: Vault, req: Req, mount: Mount, sub: str) -> Response:
    sub = sub.rstrip("/")
    b = req.body
    if sub == "login":
        if req.op != "update":
            raise unsupported_operation()
        role_id = b.get("role_id")
        if not role_id:
            raise bad_request("missing role_id")
        name, role = next(((n, r) for n, r in mount.roles.items() if r["role_id"] == role_id), (None, None))
        if role is None:
            raise bad_request("invalid role or secret ID")
        if role["bind_secret_id"]:
            sid = mount.secret_ids.get(b.get("secret_id") or "")
            now = vault.now()
            if sid is None or sid["role"] != name or (sid["expire_at"] and sid["expire_at"] <= now):
                raise bad_request("invalid role or secret ID")
            if sid["num_uses"]:
                sid["num_uses"] -= 1
                if sid["num_uses"] == 0:
                    del mount.secret_ids[b["secret_id"]]
        return _login(vault, req, mount, role, f"{mount.path.rstrip('/')}", {"role_name": name})
    m = re.fullmatch(r"role/([^/]+)(?:/(role-id|secret-id))?", sub)
    if sub == "role" and req.op == "list":
        _require(vault, req)
        if not mount.roles:
            raise not_found()
        return ok(envelope({"keys": sorted(mount.roles)}))
    if not m:
        raise unsupported_path()
    name, what = m.group(1).lower(), m.group(2)
    role = mount.roles.get(name)
    if what is None:
        if req.op == "update":
            req.op = "update" if role else "create"
            _require(vault, req)
            params = _token_params(b, role)
            new = dict(role or {})
            new.update(params)
            new["role_id"] = b.get("role_id") or (role or {}).get("role_id") or str(uuid.uuid4())
            new["bind_secret_id"] = b.get("bind_secret_id", (role or {}).get("bind_secret_id", True)) not in (False, "false")
            new["secret_id_ttl"] = parse_duration(b["secret_id_ttl"], "secret_id_ttl") if "secret_id_ttl" in b \
                else (role or {}).get("secret_id_ttl", 0)
            new["secret_id_num_uses"] = int(b.get("secret_id_num_uses", (role or {}).get("secret_id_num_uses", 0)) or 0)
            mount.roles[name] = new
            return NO_CONTENT
        if req.op == "read":
            _require(vault, req)
            if role is None:
                raise not_found()
            data = {k: v for k, v in role.items() if k != "role_id"}
            data["policies"] = role["token_policies"]
            return ok(envelope(data))
        if req.op == "delete":
            _require(vault, req)
            mount.roles.pop(name, None)
            return NO_CONTENT
        raise unsupported_operation()
    if what == "role-id":
        if req.op == "read":
            _require(vault, req)
            if role is None:
                raise not_found()
            return ok(envelope({"role_id": role["role_id"]}))
        if req.op == "update":
            _require(vault, req)
            if role is None:
                raise bad_request(f'role "{name}" does not exist')
            role["role_id"] = b.get("role_id") or role["role_id"]
            return NO_CONTENT
        raise unsupported_operation()
    # secret-id
    if req.op != "update":
        raise unsupported_operation()
    _require(vault, req)
    if role is None:
        raise bad_request(f'role "{name}" does not exist')
    sid = str(uuid.uuid4())
    ttl = role["secret_id_ttl"]
    mount.secret_ids[sid] = {
        "role": name, "accessor": str(uuid.uuid4()), "num_uses": role["secret_id_num_uses"],
        "expire_at": vault.now() + ttl if ttl else None,
    }
    return ok(envelope({
        "secret_id": sid,
        "secret_id_accessor": mount.secret_ids[sid]["accessor"],
        "secret_id_ttl": ttl,
        "secret_id_num_uses": role["secret_id_num_uses"],
    }))


# --------------------------------------------------------------------------
# auth/jwt — https://developer.hashicorp.com/vault/api-docs/auth/jwt
# --------------------------------------------------------------------------


def _verify_jwt(vault: Vault, token: str, keys: list[str]) -> dict:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    try:
        h_b64, p_b64, s_b64 = token.split(".")
        header = json.loads(_b64url_decode(h_b64))
        claims = json.loads(_b64url_decode(p_b64))
        sig = _b64url_decode(s_b64)
    except (ValueError, TypeError):
        raise bad_request("error validating token: malformed token") from None
    alg = header.get("alg")
    signed = f"{h_b64}.{p_b64}".encode()
    if alg not in ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "EdDSA", "PS256"):
        raise bad_request(f"error validating token: unsupported signing algorithm {alg!r}")
    verified = False
    for pem in keys:
        if "BEGIN CERTIFICATE" in pem:  # pem_keys may hold certificates: their public key is used
            from cryptography import x509
            key = x509.load_pem_x509_certificate(pem.encode()).public_key()
        else:
            key = serialization.load_pem_public_key(pem.encode())
        try:
            if alg.startswith("RS") and isinstance(key, rsa.RSAPublicKey):
                hsh = {"RS256": hashes.SHA256(), "RS384": hashes.SHA384(), "RS512": hashes.SHA512()}[alg]
                key.verify(sig, signed, padding.PKCS1v15(), hsh)
            elif alg == "PS256" and isinstance(key, rsa.RSAPublicKey):
                key.verify(sig, signed, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
            elif alg.startswith("ES") and isinstance(key, ec.EllipticCurvePublicKey):
                n = len(sig) // 2
                der = encode_dss_signature(int.from_bytes(sig[:n], "big"), int.from_bytes(sig[n:], "big"))
                hsh = {"ES256": hashes.SHA256(), "ES384": hashes.SHA384(), "ES512": hashes.SHA512()}[alg]
                key.verify(der, signed, ec.ECDSA(hsh))
            elif alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(sig, signed)
            else:
                continue
            verified = True
            break
        except InvalidSignature:
            continue
    if not verified:
        raise bad_request("error validating token: failed to verify id token signature")
    now = vault.now()
    if "exp" in claims and now > float(claims["exp"]) + JWT_LEEWAY:
        raise bad_request("error validating claims: token is expired (exp)")
    if "nbf" in claims and now < float(claims["nbf"]) - JWT_LEEWAY:
        raise bad_request("error validating claims: token not yet valid (nbf)")
    return claims


def jwt_backend(vault: Vault, req: Req, mount: Mount, sub: str) -> Response:
    sub = sub.rstrip("/")
    b = req.body
    if sub == "config":
        if req.op == "read":
            _require(vault, req)
            return ok(envelope(dict(mount.jwt_config)))
        if req.op != "update":
            raise unsupported_operation()
        _require(vault, req)
        keys = as_list(b.get("jwt_validation_pubkeys")) if not isinstance(b.get("jwt_validation_pubkeys"), list) \
            else list(b["jwt_validation_pubkeys"])
        if b.get("oidc_discovery_url") or b.get("jwks_url"):
            raise bad_request("this in-repo Vault only supports jwt_validation_pubkeys")
        if not keys:
            raise bad_request("exactly one of 'jwt_validation_pubkeys', 'jwks_url' or 'oidc_discovery_url' must be set")
        from cryptography.hazmat.primitives import serialization

        for k in keys:
            try:
                serialization.load_pem_public_key(k.encode())
            except ValueError as e:
                raise bad_request(f"error parsing public key: {e}") from None
        mount.jwt_config = {
            "jwt_validation_pubkeys": keys,
            "bound_issuer": b.get("bound_issuer", ""),
            "default_role": b.get("default_role", ""),
            "jwt_supported_algs": as_list(b.get("jwt_supported_algs")),
        }
        return NO_CONTENT
    if sub == "login":
        if req.op != "update":
            raise unsupported_operation()
        role_name = b.get("role") or mount.jwt_config.get("default_role")
        if not role_name:
            raise bad_request("missing role")
        role = mount.roles.get(role_name)
        if role is None:
            raise bad_request(f'role "{role_name}" could not be found')
        jwt = b.get("jwt")
        if not jwt:
            raise bad_request("missing token")
        if not mount.jwt_config:
            raise bad_request("could not load configuration")
        claims = _verify_jwt(vault, jwt, mount.jwt_config["jwt_validation_pubkeys"])
        algs = mount.jwt_config.get("jwt_supported_algs")
        hdr = json.loads(_b64url_decode(jwt.split(".")[0]))
        if algs and hdr.get("alg") not in algs:
            raise bad_request("error validating token: unsupported signing algorithm")
        iss = mount.jwt_config.get("bound_issuer")
        if iss and claims.get("iss") != iss:
            raise bad_request("error validating claims: invalid issuer (iss) claim")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else list(aud or [])
        if role["bound_audiences"]:
            if not set(auds) & set(role["bound_audiences"]):
                raise bad_request("error validating claims: invalid audience (aud) claim: "
                                  "audience claim does not match any expected audience")
        elif auds:
            raise bad_request("audience claim found in JWT but no audiences bound to the role")
        if role.get("bound_subject") and claims.get("sub") != role["bound_subject"]:
            raise bad_request("sub claim does not match bound subject")
        for k, v in (role.get("bound_claims") or {}).items():
            allowed = v if isinstance(v, list) else [v]
            if claims.get(k) not in allowed:
                raise bad_request(f"error validating claims: claim {k!r} does not match any associated bound claim values")
        user = claims.get(role["user_claim"])
        if user is None:
            raise bad_request(f"claim {role['user_claim']!r} not found in token")
        return _login(vault, req, mount, role, f"{mount.path.rstrip('/')}-{user}", {"role": role_name})
    m = re.fullmatch(r"role/([^/]+)", sub)
    if sub == "role" and req.op == "list":
        _require(vault, req)
        if not mount.roles:
            raise not_found()
        return ok(envelope({"keys": sorted(mount.roles)}))
    if not m:
        raise unsupported_path()
    name = m.group(1).lower()
    if req.op == "update":
        req.op = "update" if name in mount.roles else "create"
        _require(vault, req)
        old = mount.roles.get(name, {})
        role = dict(old)
        role.update(_token_params(b, old))
        role["role_type"] = b.get("role_type", old.get("role_type", "oidc"))
        if role["role_type"] != "jwt":
            raise bad_request("this in-repo Vault only supports role_type \"jwt\"")
        role["user_claim"] = b.get("user_claim", old.get("user_claim"))
        if not role["user_claim"]:
            raise bad_request("a user claim must be defined on the role")
        role["bound_audiences"] = as_list(b["bound_audiences"]) if "bound_audiences" in b else old.get("bound_audiences", [])
        role["bound_subject"] = b.get("bound_subject", old.get("bound_subject", ""))
        role["bound_claims"] = b.get("bound_claims", old.get("bound_claims")) or None
        mount.roles[name] = role
        return NO_CONTENT
    if req.op == "read":
        _require(vault, req)
        if name not in mount.roles:
            raise not_found()
        return ok(envelope(dict(mount.roles[name])))
    if req.op == "delete":
        _require(vault, req)
        mount.roles.pop(name, None)
        return NO_CONTENT
    raise unsupported_operation()


# --------------------------------------------------------------------------
# auth/kubernetes — https://developer.hashicorp.com/vault/api-docs/auth/kubernetes
# Real Vault asks the Kubernetes TokenReview API about the service-account JWT,
# or verifies it with the configured ``pem_keys``. With no cluster here, this
# implementation supports ``pem_keys`` only.
# --------------------------------------------------------------------------

SA_NAME = "kubernetes.io/serviceaccount/service-account.name"
SA_NAMESPACE = "kubernetes.io/serviceaccount/namespace"


def kubernetes_backend(vault: Vault, req: Req, mount: Mount, sub: str) -> Response:
    b = req.body or {}
    if sub == "config":
        if req.op == "read":
            _require(vault, req)
            return ok(envelope(dict(mount.jwt_config)))
        if req.op != "update":
            raise unsupported_operation()
        _require(vault, req)
        if not b.get("kubernetes_host"):
            raise bad_request("no host provided")
        keys = as_list(b.get("pem_keys"))
        if not keys:
            raise bad_request("this in-repo Vault only supports pem_keys (no TokenReview API here)")
        mount.jwt_config = {"kubernetes_host": b["kubernetes_host"], "pem_keys": keys}
        return NO_CONTENT
    if sub == "login":
        if req.op != "update":
            raise unsupported_operation()
        role = mount.roles.get((b.get("role") or "").lower())
        if role is None:
            raise bad_request(f'invalid role name "{b.get("role", "")}"')
        if not b.get("jwt"):
            raise bad_request("missing jwt")
        if not mount.jwt_config:
            raise bad_request("could not load backend configuration")
        claims = _verify_jwt(vault, b["jwt"], mount.jwt_config["pem_keys"])
        name, namespace = claims.get(SA_NAME), claims.get(SA_NAMESPACE)
        names, namespaces = role["bound_service_account_names"], role["bound_service_account_namespaces"]
        if "*" not in names and name not in names:
            raise permission_denied()  # Vault: "service account name not authorized" (403)
        if "*" not in namespaces and namespace not in namespaces:
            raise permission_denied()  # Vault: "namespace not authorized" (403)
        return _login(vault, req, mount, role, f"{mount.path.rstrip('/')}-{namespace}-{name}",
                      {"role": b["role"], "service_account_name": name, "service_account_namespace": namespace})
    m = re.fullmatch(r"role/([^/]+)", sub)
    if not m:
        raise unsupported_path()
    name = m.group(1).lower()
    if req.op == "update":
        req.op = "update" if name in mount.roles else "create"
        _require(vault, req)
        old = mount.roles.get(name, {})
        role = dict(old)
        role.update(_token_params(b, old))
        role["bound_service_account_names"] = as_list(b.get("bound_service_account_names",
                                                             old.get("bound_service_account_names")))
        role["bound_service_account_namespaces"] = as_list(b.get("bound_service_account_namespaces",
                                                                  old.get("bound_service_account_namespaces")))
        if not role["bound_service_account_names"] or not role["bound_service_account_namespaces"]:
            raise bad_request('"bound_service_account_names" and "bound_service_account_namespaces" can not be empty')
        mount.roles[name] = role
        return NO_CONTENT
    if req.op == "read":
        _require(vault, req)
        if name not in mount.roles:
            raise not_found()
        return ok(envelope(dict(mount.roles[name])))
    raise unsupported_operation()


# --------------------------------------------------------------------------
# KV v1 — https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v1
# --------------------------------------------------------------------------


def _list_keys(paths: list[str], prefix: str) -> list[str]:
    prefix = prefix.strip("/")
    prefix = prefix + "/" if prefix else ""
    keys = set()
    for p in paths:
        if p.startswith(prefix):
            rest = p[len(prefix):]
            if rest:
                keys.add(rest.split("/", 1)[0] + "/" if "/" in rest else rest)
    return sorted(keys)


def kv1_backend(vault: Vault, req: Req, mount: Mount, sub: str) -> Response:
    if req.op == "list":
        _require(vault, req)
        keys = _list_keys(list(mount.kv1), sub)
        if not keys:
            raise not_found()
        return ok(envelope({"keys": keys}, mount_type="kv"))
    key = sub.strip("/")
    if not key:
        raise unsupported_path()
    if req.op == "read":
        _require(vault, req)
        if key not in mount.kv1:
            raise not_found()
        return ok(envelope(dict(mount.kv1[key]), lease_duration=SYSTEM_DEFAULT_TTL, mount_type="kv"))
    if req.op == "update":
        req.op = "update" if key in mount.kv1 else "create"
        _require(vault, req)
        if not req.body:
            raise bad_request("missing data fields")
        mount.kv1[key] = dict(req.body)
        return NO_CONTENT
    if req.op == "delete":
        _require(vault, req)
        mount.kv1.pop(key, None)
        return NO_CONTENT
    raise unsupported_operation()


# --------------------------------------------------------------------------
# KV v2 — https://developer.hashicorp.com/vault/api-docs/secret/kv/kv-v2
# --------------------------------------------------------------------------


def _version_meta(key: KVKey, n: int, *, with_custom: bool = True) -> dict:
    v = key.versions[n]
    meta = {
        "created_time": rfc3339(v.created_time),
        "deletion_time": rfc3339(v.deletion_time) if v.deletion_time else "",
        "destroyed": v.destroyed,
        "version": n,
    }
    if with_custom:
        meta["custom_metadata"] = key.custom_metadata
    return dict(sorted(meta.items()))


def _versions_arg(b: dict) -> list[int]:
    vs = b.get("versions")
    if vs is None or vs == [] or vs == "":
        raise bad_request("no version number provided")
    try:
        return [int(v) for v in as_list(vs)] if isinstance(vs, str) else [int(v) for v in vs]
    except (TypeError, ValueError):
        raise bad_request("invalid version number") from None


def kv2_backend(vault: Vault, req: Req, mount: Mount, sub: str) -> Response:
    kind, _, key_path = sub.partition("/")
    key_path = key_path.strip("/")
    b = req.body
    now = vault.now()

    if kind == "config":
        if req.op == "read":
            _require(vault, req)
            return ok(envelope(dict(mount.kv_config)))
        if req.op == "update":
            _require(vault, req)
            for k in ("max_versions", "cas_required", "delete_version_after"):
                if k in b:
                    mount.kv_config[k] = b[k]
            return NO_CONTENT
        raise unsupported_operation()

    if kind == "metadata" and req.op == "list":
        _require(vault, req)
        keys = _list_keys(list(mount.kv2), key_path)
        if not keys:
            raise not_found()
        return ok(envelope({"keys": keys}, mount_type="kv"))

    if kind not in ("data", "metadata", "delete", "undelete", "destroy") or not key_path:
        raise unsupported_path()
    key = mount.kv2.get(key_path)

    if kind == "data":
        if req.op == "read":
            _require(vault, req)
            if key is None:
                raise not_found()
            n = int(req.query.get("version") or 0) or key.current_version
            if n not in key.versions:
                raise not_found()
            v = key.versions[n]
            meta = _version_meta(key, n)
            if v.destroyed or (v.deletion_time and v.deletion_time <= now):
                raise VaultHTTPError(404, body=envelope({"data": None, "metadata": meta}, mount_type="kv"))
            return ok(envelope({"data": v.data, "metadata": meta}, mount_type="kv"))
        if req.op == "update":
            req.op = "update" if key is not None else "create"
            _require(vault, req)
            data = b.get("data")
            if not isinstance(data, dict):
                raise bad_request("no data provided")
            options = b.get("options") or {}
            cas = options.get("cas")
            cas_required = (key.cas_required if key else False) or bool(mount.kv_config.get("cas_required"))
            if cas is None and cas_required:
                raise bad_request("check-and-set parameter required for this call")
            if cas is not None:
                current = key.current_version if key else 0
                if int(cas) != current:
                    raise bad_request("check-and-set parameter did not match the current version")
            if key is None:
                key = mount.kv2[key_path] = KVKey(created_time=now)
            n = key.current_version + 1
            key.versions[n] = KVVersion(data=dict(data), created_time=now)
            key.current_version = n
            key.updated_time = now
            limit = key.max_versions or int(mount.kv_config.get("max_versions") or 0) or 10
            while len(key.versions) > limit:
                del key.versions[min(key.versions)]
            key.oldest_version = min(key.versions)
            return ok(envelope(_version_meta(key, n), mount_type="kv"))
        if req.op == "delete":
            _require(vault, req)
            if key is not None and key.current_version in key.versions:
                v = key.versions[key.current_version]
                if not v.deletion_time and not v.destroyed:
                    v.deletion_time = now
                    key.updated_time = now
            return NO_CONTENT
        raise unsupported_operation()

    if kind in ("delete", "undelete", "destroy"):
        if req.op != "update":
            raise unsupported_operation()
        _require(vault, req)
        versions = _versions_arg(b)
        if key is None:
            return NO_CONTENT
        for n in versions:
            v = key.versions.get(n)
            if v is None:
                continue
            if kind == "delete" and not v.deletion_time and not v.destroyed:
                v.deletion_time = now
            elif kind == "undelete" and not v.destroyed:
                v.deletion_time = None
            elif kind == "destroy":
                v.destroyed = True
                v.data = None
        key.updated_time = now
        return NO_CONTENT

    # metadata
    if req.op == "read":
        _require(vault, req)
        if key is None:
            raise not_found()
        data = {
            "cas_required": key.cas_required,
            "created_time": rfc3339(key.created_time),
            "current_version": key.current_version,
            "custom_metadata": key.custom_metadata,
            "delete_version_after": key.delete_version_after,
            "max_versions": key.max_versions,
            "oldest_version": key.oldest_version,
            "updated_time": rfc3339(key.updated_time),
            "versions": {str(n): _version_meta(key, n, with_custom=False) for n in sorted(key.versions)},
        }
        for vm in data["versions"].values():
            vm.pop("version")
        return ok(envelope(data, mount_type="kv"))
    if req.op == "update":
        req.op = "update" if key is not None else "create"
        _require(vault, req)
        if key is None:
            key = mount.kv2[key_path] = KVKey(created_time=now, updated_time=now)
        if "max_versions" in b:
            key.max_versions = int(b["max_versions"])
        if "cas_required" in b:
            key.cas_required = bool(b["cas_required"])
        if "delete_version_after" in b:
            key.delete_version_after = str(b["delete_version_after"])
        if "custom_metadata" in b:
            cm = b["custom_metadata"] or {}
            if not all(isinstance(v, str) for v in cm.values()):
                raise bad_request("custom_metadata values must be strings")
            key.custom_metadata = dict(cm) or None
        key.updated_time = now
        return NO_CONTENT
    if req.op == "delete":
        _require(vault, req)
        mount.kv2.pop(key_path, None)
        return NO_CONTENT
    raise unsupported_operation()


# --------------------------------------------------------------------------
# database — https://developer.hashicorp.com/vault/api-docs/secret/databases
# --------------------------------------------------------------------------


def database_backend(vault: Vault, req: Req, mount: Mount, sub: str) -> Response:
    sub = sub.rstrip("/")
    b = req.body
    kind, _, name = sub.partition("/")
    if kind in ("roles", "config") and not name and req.op == "list":
        _require(vault, req)
        store = mount.db_roles if kind == "roles" else mount.db_config
        if not store:
            raise not_found()
        return ok(envelope({"keys": sorted(store)}))
    if kind == "config" and name:
        # Connection config is accepted and stored; there is no real database.
        if req.op == "update":
            _require(vault, req)
            mount.db_config[name] = {
                "plugin_name": b.get("plugin_name", ""),
                "allowed_roles": as_list(b.get("allowed_roles")),
                "connection_details": {k: v for k, v in b.items() if k in ("connection_url", "username")},
            }
            return NO_CONTENT
        if req.op == "read":
            _require(vault, req)
            if name not in mount.db_config:
                raise not_found()
            return ok(envelope(mount.db_config[name]))
        if req.op == "delete":
            _require(vault, req)
            mount.db_config.pop(name, None)
            return NO_CONTENT
        raise unsupported_operation()
    if kind == "roles" and name:
        if req.op == "update":
            req.op = "update" if name in mount.db_roles else "create"
            _require(vault, req)
            old = mount.db_roles.get(name, {})
            db_name = b.get("db_name", old.get("db_name"))
            if not db_name:
                raise bad_request("empty database name attribute")
            stmts = b.get("creation_statements", old.get("creation_statements"))
            mount.db_roles[name] = {
                "db_name": db_name,
                "creation_statements": as_list(stmts) if isinstance(stmts, str) else list(stmts or []),
                "revocation_statements": list(b.get("revocation_statements") or old.get("revocation_statements") or []),
                "default_ttl": parse_duration(b["default_ttl"], "default_ttl") if "default_ttl" in b else old.get("default_ttl", 0),
                "max_ttl": parse_duration(b["max_ttl"], "max_ttl") if "max_ttl" in b else old.get("max_ttl", 0),
                "credential_type": "password",
            }
            return NO_CONTENT
        if req.op == "read":
            _require(vault, req)
            if name not in mount.db_roles:
                raise not_found()
            return ok(envelope(dict(mount.db_roles[name])))
        if req.op == "delete":
            _require(vault, req)
            mount.db_roles.pop(name, None)
            return NO_CONTENT
        raise unsupported_operation()
    if kind == "creds" and name:
        if req.op != "read":
            raise unsupported_operation()
        _require(vault, req)
        role = mount.db_roles.get(name)
        if role is None:
            raise bad_request(f"unknown role: {name}")
        now = vault.now()
        max_ttl = min(role["max_ttl"] or SYSTEM_MAX_TTL, SYSTEM_MAX_TTL)
        ttl = min(role["default_ttl"] or SYSTEM_DEFAULT_TTL, max_ttl)
        tok = req.token
        display = (tok.display_name if tok else "token")[:8]
        username = f"v-{display}-{name[:8]}-{_rand_id(20)}-{int(now)}"
        password = _rand_id(16) + "-" + _rand_id(4)
        lease_id = f"{mount.path}creds/{name}/{_rand_id(24)}"
        vault.leases[lease_id] = Lease(
            id=lease_id, namespace=req.ns.path, issue_time=now, expire_at=now + ttl,
            max_expire_at=now + max_ttl, renewable=True, default_ttl=ttl,
            token_id=tok.id if tok and not tok.is_root else None, username=username, password=password,
        )
        return ok(envelope({"username": username, "password": password}, lease_id=lease_id,
                           lease_duration=ttl, renewable=True, mount_type="database"))
    raise unsupported_path()


# --------------------------------------------------------------------------
# HTTP server (aiohttp)
# --------------------------------------------------------------------------


def _json_response(status: int, body: dict | None):
    from aiohttp import web

    if body is None or status == 204:
        return web.Response(status=204)
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
    )


def make_app(root_token: str):
    from aiohttp import web

    vault = Vault(root_token)

    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body: dict = {}
        if raw.strip():
            try:
                parsed = json.loads(raw)
            except ValueError as e:
                return _json_response(400, {"errors": [f"failed to parse JSON input: {e}"]})
            if not isinstance(parsed, dict):
                return _json_response(400, {"errors": ["failed to parse JSON input: not an object"]})
            body = parsed
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            resp = dispatch(vault, request.method.upper(), request.path, dict(request.query), body, headers)
        except VaultHTTPError as e:
            return _json_response(e.status, e.body if e.body is not None else {"errors": e.errors})
        except Exception as e:  # surface bugs as Vault would: 500 with errors
            import traceback

            traceback.print_exc()
            return _json_response(500, {"errors": [f"internal error: {e!r}"]})
        if request.method == "HEAD":
            return web.Response(status=resp.status)
        return _json_response(resp.status, resp.body)

    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _write_ready(path: str, data: dict) -> None:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, target)


async def serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    root_token = args.root_token or ("hvs." + _rand_id(24))
    runner = web.AppRunner(make_app(root_token), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        fam = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(128)
        sock.setblocking(False)
        ssl_ctx = None
        if args.cert:
            import ssl
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(args.cert, args.key)
        await web.SockSite(runner, sock, ssl_context=ssl_ctx).start()
        info = {"port": sock.getsockname()[1], "pid": os.getpid(), "root_token": root_token}
        if args.ready_file:
            _write_ready(args.ready_file, info)
        print(f"vault ready: port={info['port']} pid={info['pid']}", flush=True)
        await stop.wait()
        print("vault: shutting down", flush=True)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.vault")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ready-file", help="where to write {port, pid, root_token} as JSON")
    p.add_argument("--root-token", help="root token id (default: random hvs.*)")
    p.add_argument("--cert", help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--key", help="private key for --cert")
    args = p.parse_args(argv)
    asyncio.run(serve(args))
    return 0


# --------------------------------------------------------------------------
# Test-side helpers
# --------------------------------------------------------------------------


@dataclass
class VaultTarget:
    """Where tests point hvac: the in-repo Vault (``real=False``) or a real one."""

    addr: str
    token: str
    real: bool
    proc: "VaultProc | None" = None

    def control(self, method: str, path: str, body: dict | None = None) -> dict:
        if self.proc is None:
            raise RuntimeError("test-control endpoints exist only on the in-repo Vault")
        return self.proc.control(method, path, body)


@dataclass
class VaultProc:
    """A running ``python -m tests.support.vault`` (see ``start_vault``)."""

    host: str
    port: int
    root_token: str
    proc: Any  # tests.support.procs.ManagedProcess
    tls_ca: Path | None = None  # the CA that signed its certificate when it serves HTTPS

    @property
    def addr(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls_ca else 'http'}://{host}:{self.port}"

    @property
    def target(self) -> VaultTarget:
        return VaultTarget(addr=self.addr, token=self.root_token, real=False, proc=self)

    def control(self, method: str, path: str, body: dict | None = None, timeout: float = 10) -> dict:
        """Call a /v1/_test/ endpoint (NOT part of Vault)."""
        if self.tls_ca:
            import ssl
            ctx = ssl.create_default_context(cafile=str(self.tls_ca))
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, f"/v1/_test/{path.lstrip('/')}", body=data,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"/v1/_test/{path} returned {resp.status}: {raw[:200]!r}")
            return json.loads(raw)
        finally:
            conn.close()

    def advance_clock(self, seconds: float) -> dict:
        return self.control("POST", "clock", {"advance": seconds})

    def seal(self) -> None:
        self.control("POST", "seal", {"sealed": True})

    def unseal(self) -> None:
        self.control("POST", "seal", {"sealed": False})

    def leases(self) -> dict:
        return self.control("GET", "leases")

    def db_creds_valid(self, username: str, password: str) -> bool:
        return self.control("POST", "database/check", {"username": username, "password": password})["valid"]

    def pause(self) -> None:
        """SIGSTOP: connections hang, as with an unreachable Vault."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 5) -> int:
        if self.proc.alive():
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process can't handle SIGTERM
            except ProcessLookupError:
                pass
        return self.proc.stop(timeout)

    def __enter__(self) -> "VaultProc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_vault(tmpdir: str | os.PathLike[str], *, host: str = "127.0.0.1",
                root_token: str | None = None, timeout: float = 15, tls: bool = False) -> VaultProc:
    """Start the in-repo Vault in a subprocess and wait for its ready file.
    With ``tls``, it serves HTTPS with a certificate from a fresh test CA
    (``VaultProc.tls_ca``)."""
    from .certs import issue_server_cert, make_test_ca
    from .procs import REPO_ROOT, ManagedProcess

    d = Path(tmpdir)
    d.mkdir(parents=True, exist_ok=True)
    ready = d / "vault.ready.json"
    ready.unlink(missing_ok=True)
    args: list[str | os.PathLike[str]] = [
        sys.executable, "-m", "tests.support.vault", "--host", host, "--port", "0",
        "--ready-file", ready,
    ]
    if root_token:
        args += ["--root-token", root_token]
    tls_ca = None
    if tls:
        ca = make_test_ca(d / "pki")
        leaf = issue_server_cert(ca, d / "pki", ["localhost"], [host], stem="vault")
        args += ["--cert", leaf.chain, "--key", leaf.key]
        tls_ca = ca.cert
    env = dict(os.environ)
    env["AIOHTTP_NO_EXTENSIONS"] = "1"
    proc = ManagedProcess(args, d, name="vault", cwd=REPO_ROOT, env=env)
    deadline = time.monotonic() + timeout
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"vault exited with status {proc.returncode} before becoming ready;"
                    f" log:\n{proc.log_text()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(f"vault not ready after {timeout}s; log:\n{proc.log_text()}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
    except BaseException:
        proc.stop()
        raise
    return VaultProc(host=host, port=info["port"], root_token=info["root_token"], proc=proc, tls_ca=tls_ca)


def vault_from_env(environ: dict[str, str] | None = None) -> VaultTarget | None:
    """A real Vault described by ``VAULT_ADDR``/``VAULT_TOKEN``, or None if unset."""
    env = os.environ if environ is None else environ
    addr, token = env.get("VAULT_ADDR", ""), env.get("VAULT_TOKEN", "")
    if not addr or not token:
        return None
    parts = urlsplit(addr)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"VAULT_ADDR must be an http(s) URL, got {addr!r}")
    return VaultTarget(addr=addr.rstrip("/"), token=token, real=True)


if __name__ == "__main__":
    sys.exit(main())
