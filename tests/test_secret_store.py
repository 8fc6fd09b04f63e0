"""SecretResolver: backends, cache TTL, bounded stale-on-error, all-or-nothing, no values in errors."""

from __future__ import annotations

import asyncio

import pytest

from gateway.secrets.local import LocalStore
from gateway.secrets.refs import parse_ref
from gateway.secrets.store import (
    EnvBackend, FileBackend, LocalBackend, Secret, SecretResolver, SecretUnavailable,
)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Flaky:
    """A backend whose answers the test controls; counts fetches."""

    def __init__(self, ttl=10.0):
        self.values: dict[str, str] = {}
        self.down = False
        self.calls = 0
        self.ttl = ttl

    async def fetch(self, ref, **kw):
        self.calls += 1
        await asyncio.sleep(0)
        if self.down:
            raise SecretUnavailable(ref, "vault is unreachable")
        if ref.name not in self.values:
            raise SecretUnavailable(ref, "no such secret")
        return Secret(self.values[ref.name], self.ttl)


def run(coro):
    return asyncio.run(coro)


REF = parse_ref("vault:secret/acme/github#token")


def test_cache_hit_until_ttl_then_refresh():
    clock, b = Clock(), Flaky(ttl=10)
    b.values["secret/acme/github"] = "v1"
    r = SecretResolver({"vault": b}, clock=clock)
    assert run(r.resolve(REF)) == "v1" and run(r.resolve(REF)) == "v1"
    assert b.calls == 1 and r.stats.hits == 1 and r.stats.misses == 1
    b.values["secret/acme/github"] = "v2"
    clock.t += 11
    assert run(r.resolve(REF)) == "v2" and b.calls == 2


def test_stale_on_error_is_bounded():
    clock, b = Clock(), Flaky(ttl=10)
    b.values["secret/acme/github"] = "v1"
    r = SecretResolver({"vault": b}, stale_seconds=30, clock=clock)
    run(r.resolve(REF))
    b.down = True
    clock.t += 20  # expired 10 s ago: within the stale window
    assert run(r.resolve(REF)) == "v1" and r.stats.stale == 1
    clock.t += 25  # 35 s after expiry: beyond it
    with pytest.raises(SecretUnavailable) as e:
        run(r.resolve(REF))
    assert "vault is unreachable" in str(e.value) and "v1" not in str(e.value)
    b.down = False
    assert run(r.resolve(REF)) == "v1"  # recovers when the backend returns


def test_concurrent_misses_share_one_fetch():
    b = Flaky()
    b.values["secret/acme/github"] = "v"
    r = SecretResolver({"vault": b})

    async def main():
        return await asyncio.gather(*(r.resolve(REF) for _ in range(10)))
    assert run(main()) == ["v"] * 10 and b.calls == 1


def test_resolve_all_is_all_or_nothing():
    b = Flaky()
    b.values["secret/a"] = "va"
    r = SecretResolver({"vault": b})
    a, missing = parse_ref("vault:secret/a#x"), parse_ref("vault:secret/b#x")
    assert run(r.resolve_all([a, a])) == {a: "va"}
    with pytest.raises(SecretUnavailable) as e:
        run(r.resolve_all([a, missing]))
    assert e.value.ref == missing


def test_unconfigured_scheme_and_backend_crash_fail_closed():
    class Broken:
        async def fetch(self, ref, **kw):
            raise RuntimeError("token=abc leaked?")
    r = SecretResolver({"vault": Broken()})
    with pytest.raises(SecretUnavailable) as e:
        run(r.resolve(REF))
    assert "RuntimeError" in str(e.value) and "abc" not in str(e.value)
    with pytest.raises(SecretUnavailable, match="no env secret backend"):
        run(r.resolve(parse_ref("env:X")))


def test_env_file_local_backends(tmp_path):
    store = LocalStore(tmp_path)
    store.put("github/token", "local-value")
    f = tmp_path / "key.txt"
    f.write_text("file-value\n")
    r = SecretResolver({"env": EnvBackend(environ={"LLM_KEY": "env-value"}), "file": FileBackend(),
                        "local": LocalBackend(store)})
    got = run(r.resolve_all([parse_ref("env:LLM_KEY"), parse_ref(f"file:{f}"), parse_ref("local:github/token")]))
    assert sorted(got.values()) == ["env-value", "file-value", "local-value"]
    for text, reason in [("env:NOPE", "not set"), (f"file:{tmp_path}/missing", "does not exist"),
                         ("local:nope", "no such secret")]:
        with pytest.raises(SecretUnavailable, match=reason):
            run(r.resolve(parse_ref(text)))


def test_secret_repr_hides_value():
    assert "hunter2" not in repr(Secret("hunter2", 1.0))
