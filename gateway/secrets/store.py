"""The secret store port: resolve references to values, with a cache.

``SecretResolver`` maps each reference scheme to a backend (``local``, ``env``,
``file``; ``vault`` and ``vault-dynamic`` come from gateway.secrets.vault) and
caches values:

* a fresh value is served from the cache until its TTL ends;
* when a refresh fails, a value is served stale for at most ``stale_seconds``
  after its TTL (bounded stale-on-error), then the reference is unavailable;
* ``resolve_all`` is all-or-nothing: a request is never sent with a partial
  set of credentials.

Errors (``SecretUnavailable``) name the reference, never a value. Counters
(hits, misses, stale, errors, fetch seconds) are kept for the metrics.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

from gateway.secrets.refs import SecretRef


class SecretUnavailable(Exception):
    """A reference could not be resolved. ``reason`` is safe to show (no value)."""

    def __init__(self, ref: SecretRef, reason: str):
        super().__init__(f"{ref}: {reason}")
        self.ref = ref
        self.reason = reason


@dataclass(frozen=True)
class Secret:
    value: str
    ttl: float  # seconds the value may be cached
    lease_id: str = ""  # leased (dynamic) secrets
    renewable: bool = False

    def __repr__(self) -> str:  # never show the value
        return f"Secret(ttl={self.ttl}, lease_id={self.lease_id!r})"


class Backend(Protocol):
    async def fetch(self, ref: SecretRef, owner: str = "", owner_expires: float = 0.0) -> Secret: ...


class EnvBackend:
    """``env:NAME``: the gateway process's environment (read at each refresh)."""

    def __init__(self, ttl: float = 60.0, environ=os.environ):
        self.ttl = ttl
        self.environ = environ

    async def fetch(self, ref: SecretRef, owner: str = "", owner_expires: float = 0.0) -> Secret:
        value = self.environ.get(ref.name)
        if not value:
            raise SecretUnavailable(ref, "environment variable is not set")
        return Secret(value, self.ttl)


class FileBackend:
    """``file:/path``: a file's contents, one trailing newline stripped."""

    def __init__(self, ttl: float = 30.0, max_bytes: int = 64 * 1024):
        self.ttl = ttl
        self.max_bytes = max_bytes

    async def fetch(self, ref: SecretRef, owner: str = "", owner_expires: float = 0.0) -> Secret:
        def read() -> str:
            p = Path(ref.name)
            with p.open("rb") as f:
                data = f.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                raise SecretUnavailable(ref, f"file is larger than {self.max_bytes} bytes")
            text = data.decode("utf-8")
            return text[:-1] if text.endswith("\n") else text
        try:
            value = await asyncio.to_thread(read)
        except SecretUnavailable:
            raise
        except FileNotFoundError:
            raise SecretUnavailable(ref, "file does not exist") from None
        except PermissionError:
            raise SecretUnavailable(ref, "file is not readable by the gateway") from None
        except (OSError, UnicodeDecodeError):
            raise SecretUnavailable(ref, "file cannot be read as UTF-8 text") from None
        if not value:
            raise SecretUnavailable(ref, "file is empty")
        return Secret(value, self.ttl)


class LocalBackend:
    """``local:NAME``: the gateway's local encrypted store."""

    def __init__(self, store, ttl: float = 30.0):
        self.store = store
        self.ttl = ttl

    async def fetch(self, ref: SecretRef, owner: str = "", owner_expires: float = 0.0) -> Secret:
        from gateway.secrets.local import StoreError
        try:
            value = await asyncio.to_thread(self.store.get, ref.name)
        except StoreError as e:
            raise SecretUnavailable(ref, str(e)) from None
        if value is None:
            raise SecretUnavailable(ref, "no such secret in the local store")
        return Secret(value, self.ttl)


@dataclass
class _Entry:
    secret: Secret
    fetched: float
    expires: float


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    stale: int = 0
    errors: int = 0
    fetch_seconds: list[float] = field(default_factory=list)  # recent fetch latencies (bounded)


class SecretResolver:
    def __init__(self, backends: dict[str, Backend], *, stale_seconds: float = 60.0, clock=time.monotonic):
        self.backends = backends
        self.stale_seconds = stale_seconds
        self.clock = clock
        # Leased (vault-dynamic) secrets are per identity: keyed by (ref, owner), so
        # revoking an identity can revoke exactly the leases it used.
        self._cache: dict[tuple[SecretRef, str], _Entry] = {}
        self._inflight: dict[tuple[SecretRef, str], asyncio.Future] = {}
        # called after every fetch from a backend (not cache hits): (ref, owner, ok, seconds, lease, reason)
        self.on_fetch = None
        self.stats = StoreStats()

    @staticmethod
    def _key(ref: SecretRef, owner: str) -> tuple[SecretRef, str]:
        return (ref, owner if ref.dynamic else "")

    def cached(self, ref: SecretRef, owner: str = "") -> str | None:
        """A fresh cached value without I/O, or None."""
        e = self._cache.get(self._key(ref, owner))
        if e is not None and e.expires > self.clock():
            self.stats.hits += 1
            return e.secret.value
        return None

    def cached_all(self, refs, owner: str = "") -> dict[SecretRef, str] | None:
        """Every value fresh in the cache (no I/O), or None if any needs a fetch."""
        out = {}
        for r in refs:
            v = self.cached(r, owner)
            if v is None:
                return None
            out[r] = v
        return out

    async def resolve(self, ref: SecretRef, owner: str = "", owner_expires: float = 0.0) -> str:
        hit = self.cached(ref, owner)
        if hit is not None:
            return hit
        self.stats.misses += 1
        key = self._key(ref, owner)
        fut = self._inflight.get(key)
        if fut is None:  # one fetch per reference (and owner, for leases) at a time
            fut = asyncio.get_running_loop().create_future()
            self._inflight[key] = fut
            try:
                fut.set_result(await self._refresh(ref, key, owner_expires))
            except SecretUnavailable as e:
                fut.set_exception(e)
                fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            finally:
                self._inflight.pop(key, None)
        return (await asyncio.shield(fut)).value

    async def _refresh(self, ref: SecretRef, key: tuple[SecretRef, str], owner_expires: float) -> Secret:
        backend = self.backends.get(ref.scheme)
        if backend is None:
            raise SecretUnavailable(ref, f"no {ref.scheme} secret backend is configured")
        t0 = time.perf_counter()
        try:
            secret = await backend.fetch(ref, owner=key[1], owner_expires=owner_expires)
        except SecretUnavailable as e:
            self.stats.errors += 1
            self._notify(ref, key[1], False, t0, "", e.reason)
            stale = self._stale(key)
            if stale is not None:
                return stale
            raise e
        except Exception as e:  # a backend bug or an unexpected client error: fail closed
            self.stats.errors += 1
            self._notify(ref, key[1], False, t0, "", f"secret backend error ({type(e).__name__})")
            stale = self._stale(key)
            if stale is not None:
                return stale
            raise SecretUnavailable(ref, f"secret backend error ({type(e).__name__})") from None
        finally:
            fs = self.stats.fetch_seconds
            fs.append(time.perf_counter() - t0)
            if len(fs) > 1000:
                del fs[:500]
        now = self.clock()
        self._cache[key] = _Entry(secret, now, now + max(0.0, secret.ttl))
        self._notify(ref, key[1], True, t0, secret.lease_id, "")
        return secret

    def _notify(self, ref, owner: str, ok: bool, t0: float, lease_id: str, reason: str) -> None:
        if self.on_fetch is not None:
            try:
                self.on_fetch(ref, owner, ok, time.perf_counter() - t0, lease_id, reason)
            except Exception:  # pragma: no cover - auditing must not break a fetch
                pass

    def _stale(self, key: tuple[SecretRef, str]) -> Secret | None:
        if key[0].dynamic:
            return None  # a lease that could not be renewed or re-read is not used stale
        e = self._cache.get(key)
        if e is not None and self.clock() < e.expires + self.stale_seconds:
            self.stats.stale += 1
            return e.secret
        return None

    async def resolve_all(self, refs: Iterable[SecretRef], owner: str = "",
                          owner_expires: float = 0.0) -> dict[SecretRef, str]:
        """Every reference or SecretUnavailable for the first that failed (all-or-nothing)."""
        refs = list(dict.fromkeys(refs))
        values = await asyncio.gather(*(self.resolve(r, owner, owner_expires) for r in refs),
                                      return_exceptions=True)
        for r, v in zip(refs, values):
            if isinstance(v, BaseException):
                if isinstance(v, SecretUnavailable):
                    raise v
                raise SecretUnavailable(r, f"secret backend error ({type(v).__name__})")
        return dict(zip(refs, values))  # type: ignore[arg-type]

    def forget(self, ref: SecretRef | None = None) -> None:
        if ref is None:
            self._cache.clear()
        else:
            for key in [k for k in self._cache if k[0] == ref]:
                del self._cache[key]

    def forget_owner(self, owner: str) -> int:
        """Drop the leased values an identity used (its token was revoked)."""
        keys = [k for k in self._cache if k[1] == owner and owner]
        for k in keys:
            del self._cache[k]
        return len(keys)
