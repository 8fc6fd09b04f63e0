"""HashiCorp Vault backend (``vault:`` and ``vault-dynamic:`` references), via hvac.

Configuration (``VaultConfig``) follows Vault's own environment variables when
a setting is not given: ``VAULT_ADDR``, ``VAULT_TOKEN``, ``VAULT_NAMESPACE``,
``VAULT_CACERT``. Authentication methods: ``token``, ``approle`` (role_id and
a secret_id reference), ``jwt`` (role and a JWT file, e.g. an OIDC token) and
``kubernetes`` (role and the service-account token file).

* The client token is renewed before it expires and, when renewal fails or
  Vault answers 403, the backend logs in again once and retries.
* KV v2 is the default; a mount listed in ``kv_v1_mounts`` is read as KV v1.
* ``vault-dynamic:`` reads return a lease. The lease is renewed while used
  (``renew_leases``) and revoked through ``revoke_lease`` (the identity that
  used it was revoked or expired).

hvac is synchronous: calls run in a worker thread (``asyncio.to_thread``) so
the proxy never waits on Vault; one lock serialises them (the resolver already
fetches each reference once at a time). Errors become SecretUnavailable with a reason
that never contains a token or a value.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.secrets.refs import SecretRef
from gateway.secrets.store import Secret, SecretUnavailable

DEFAULT_KV_TTL = 300.0  # KV values have no lease: cache them this long


@dataclass(frozen=True)
class VaultConfig:
    addr: str = ""
    namespace: str = ""
    ca_cert: str = ""  # CA bundle for Vault's TLS; "" = system trust
    auth: str = "token"  # token | approle | jwt | kubernetes
    token: str = ""  # auth=token (or VAULT_TOKEN)
    role: str = ""  # approle: role name (informational); jwt/kubernetes: role
    role_id: str = ""  # approle
    secret_id: str = ""  # approle: the secret id itself (prefer secret_id_file)
    secret_id_file: str = ""
    jwt_file: str = ""  # jwt / kubernetes: file holding the JWT
    auth_mount: str = ""  # default: the method name (approle, jwt, kubernetes)
    kv_v1_mounts: tuple[str, ...] = ()
    kv_ttl: float = DEFAULT_KV_TTL
    timeout: float = 5.0

    @staticmethod
    def from_env(**overrides) -> "VaultConfig":
        env = os.environ
        base = dict(addr=env.get("VAULT_ADDR", ""), namespace=env.get("VAULT_NAMESPACE", ""),
                    ca_cert=env.get("VAULT_CACERT", ""), token=env.get("VAULT_TOKEN", ""))
        base.update({k: v for k, v in overrides.items() if v not in (None, "")})
        return VaultConfig(**base)


@dataclass
class _Lease:
    lease_id: str
    expires: float
    renewable: bool
    owner: str = ""  # the identity that used it (token id): revoked with it
    owner_expires: float = 0.0  # unix time the owner's token expires (0: unknown)


class VaultBackend:
    def __init__(self, config: VaultConfig):
        if not config.addr:
            raise ValueError("vault: no address (set addr or VAULT_ADDR)")
        self.config = config
        self._lock = threading.Lock()
        self._client = None
        self._token_expires = 0.0
        self._token_ttl = 0.0
        self.leases: dict[str, _Lease] = {}
        self.logins = 0

    # -- client and authentication ------------------------------------------------

    def _new_client(self):
        import hvac
        c = self.config
        return hvac.Client(url=c.addr, namespace=c.namespace or None,
                           verify=c.ca_cert or True, timeout=c.timeout)

    def _login(self) -> None:
        c = self.config
        client = self._new_client()
        method = c.auth
        mount = c.auth_mount or method
        if method == "token":
            if not c.token:
                raise PermissionError("no Vault token (set token or VAULT_TOKEN)")
            client.token = c.token
            info = client.auth.token.lookup_self()["data"]
            ttl = float(info.get("ttl") or 0)
        elif method == "approle":
            secret_id = c.secret_id or (Path(c.secret_id_file).read_text().strip() if c.secret_id_file else "")
            resp = client.auth.approle.login(role_id=c.role_id, secret_id=secret_id, mount_point=mount)
            ttl = float(resp["auth"]["lease_duration"])
        elif method in ("jwt", "kubernetes"):
            jwt = Path(c.jwt_file).read_text().strip()
            if method == "jwt":
                resp = client.auth.jwt.jwt_login(role=c.role, jwt=jwt, path=mount)
            else:
                resp = client.auth.kubernetes.login(role=c.role, jwt=jwt, mount_point=mount)
            ttl = float(resp["auth"]["lease_duration"])
        else:
            raise ValueError(f"vault: unknown auth method {method!r}")
        self._client = client
        self._token_ttl = ttl if ttl > 0 else float("inf")
        self._token_expires = time.monotonic() + ttl if ttl > 0 else float("inf")
        self.logins += 1

    def _ensure_client(self):
        """A logged-in client whose token is not about to expire (renew at 2/3 of its life)."""
        if self._client is None:
            self._login()
            return self._client
        remaining = self._token_expires - time.monotonic()
        if remaining < max(30.0, self._token_ttl / 3):
            try:
                resp = self._client.auth.token.renew_self()
                self._token_ttl = float(resp["auth"]["lease_duration"])
                self._token_expires = time.monotonic() + self._token_ttl
            except Exception:
                self._login()
        return self._client

    def _call(self, ref: SecretRef, fn):
        """Run ``fn(client)`` with one re-login on permission errors; map errors."""
        import hvac.exceptions as hx
        import requests
        with self._lock:
            for attempt in (1, 2):
                try:
                    client = self._ensure_client()
                    return fn(client)
                except hx.Forbidden:
                    if attempt == 1:
                        self._client = None  # token revoked or expired: log in again
                        continue
                    raise SecretUnavailable(ref, "permission denied by Vault") from None
                except hx.InvalidPath:
                    raise SecretUnavailable(ref, "not found in Vault") from None
                except (hx.VaultDown, hx.InternalServerError, hx.BadGateway):
                    raise SecretUnavailable(ref, "Vault is unavailable (sealed or failing)") from None
                except (requests.ConnectionError, requests.Timeout):
                    raise SecretUnavailable(ref, "Vault is unreachable") from None
                except PermissionError as e:
                    raise SecretUnavailable(ref, str(e)) from None
                except hx.VaultError as e:
                    raise SecretUnavailable(ref, f"Vault error ({type(e).__name__})") from None
                except (OSError, KeyError, TypeError, ValueError) as e:
                    raise SecretUnavailable(ref, f"Vault client error ({type(e).__name__})") from None
        raise SecretUnavailable(ref, "permission denied by Vault")  # pragma: no cover

    # -- reads ------------------------------------------------------------------------------

    def _read_kv(self, ref: SecretRef) -> Secret:
        def fn(client):
            if ref.mount in self.config.kv_v1_mounts:
                data = client.secrets.kv.v1.read_secret(path=ref.path, mount_point=ref.mount)["data"]
            else:
                resp = client.secrets.kv.v2.read_secret_version(
                    path=ref.path, mount_point=ref.mount, version=ref.version or None,
                    raise_on_deleted_version=True)
                data = resp["data"]["data"]
            return data
        data = self._call(ref, fn)
        if ref.field not in data:
            raise SecretUnavailable(ref, f"the secret has no field {ref.field!r}")
        value = data[ref.field]
        if not isinstance(value, str) or not value:
            raise SecretUnavailable(ref, f"field {ref.field!r} is not a non-empty string")
        return Secret(value, self.config.kv_ttl)

    def _read_dynamic(self, ref: SecretRef, owner: str = "", owner_expires: float = 0.0) -> Secret:
        resp = self._call(ref, lambda client: client.read(ref.name))
        if not resp or "data" not in resp:
            raise SecretUnavailable(ref, "not found in Vault")
        value = (resp.get("data") or {}).get(ref.field)
        if not isinstance(value, str) or not value:
            raise SecretUnavailable(ref, f"the leased secret has no field {ref.field!r}")
        lease_id = resp.get("lease_id", "")
        ttl = float(resp.get("lease_duration") or 0)
        if lease_id:
            self.leases[lease_id] = _Lease(lease_id, time.monotonic() + ttl, bool(resp.get("renewable")),
                                           owner, owner_expires)
        # Cache for at most 2/3 of the lease so a value is never used after its lease ends.
        return Secret(value, ttl * 2 / 3, lease_id=lease_id, renewable=bool(resp.get("renewable")))

    async def fetch(self, ref: SecretRef, owner: str = "", owner_expires: float = 0.0) -> Secret:
        if ref.scheme == "vault":
            return await asyncio.to_thread(self._read_kv, ref)
        if ref.scheme == "vault-dynamic":
            return await asyncio.to_thread(self._read_dynamic, ref, owner, owner_expires)
        raise SecretUnavailable(ref, "not a Vault reference")

    # -- leases -------------------------------------------------------------------------------

    def _revoke(self, lease_id: str) -> None:
        ref = SecretRef("vault-dynamic", "sys/leases", "revoke")
        self._call(ref, lambda client: client.sys.revoke_lease(lease_id=lease_id))
        self.leases.pop(lease_id, None)

    async def revoke_lease(self, lease_id: str) -> None:
        await asyncio.to_thread(self._revoke, lease_id)

    async def revoke_owner(self, owner: str) -> list[str]:
        """Revoke every lease the identity ``owner`` used; returns the ids that
        could not be revoked (they stay listed and are retried)."""
        failed = []
        for lease in [x for x in self.leases.values() if owner and x.owner == owner]:
            try:
                await self.revoke_lease(lease.lease_id)
            except SecretUnavailable:
                failed.append(lease.lease_id)
        return failed

    async def revoke_expired_owners(self, now: float | None = None) -> list[str]:
        """Revoke leases whose owner's token has expired; returns the revoked ids."""
        now = time.time() if now is None else now
        done = []
        for lease in [x for x in self.leases.values() if x.owner_expires and x.owner_expires <= now]:
            try:
                await self.revoke_lease(lease.lease_id)
                done.append(lease.lease_id)
            except SecretUnavailable:
                pass
        return done

    def _renew_due(self, margin: float) -> list[str]:
        failed = []
        now = time.monotonic()
        for lease in list(self.leases.values()):
            if not lease.renewable or lease.expires - now > margin:
                continue
            ref = SecretRef("vault-dynamic", "sys/leases", "renew")
            try:
                resp = self._call(ref, lambda client: client.sys.renew_lease(lease_id=lease.lease_id))
                lease.expires = time.monotonic() + float(resp.get("lease_duration") or 0)
            except SecretUnavailable:
                failed.append(lease.lease_id)
        return failed

    async def renew_leases(self, margin: float = 60.0) -> list[str]:
        """Renew leases ending within ``margin`` seconds; returns the ids that failed."""
        return await asyncio.to_thread(self._renew_due, margin)
