"""Host normalisation and the resolver: literals, overrides, localhost, DNS
(getaddrinfo replaced by a fake: tests never send DNS queries), caching."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given, strategies as st

from gateway.resolver import HostError, Resolver, normalise_host


@pytest.mark.parametrize("raw,want", [
    ("Example.COM", "example.com"), ("example.com.", "example.com"), ("[::1]", "::1"),
    ("bücher.example", "xn--bcher-kva.example"), ("  a.test ", "a.test"),
])
def test_normalise_host(raw, want):
    assert normalise_host(raw) == want


@pytest.mark.parametrize("bad", ["", "a b", "a/b", "a@b", "x\x00y", "a?b", "a#b"])
def test_normalise_rejects(bad):
    with pytest.raises(HostError):
        normalise_host(bad)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=40))
def test_normalise_is_idempotent(h):
    try:
        once = normalise_host(h)
    except HostError:
        return
    assert normalise_host(once) == once


def test_static_resolution():
    r = Resolver({"svc.internal": ["10.0.0.5"], "dual.test": ["127.0.0.1", "::1"]}, self_addresses=["10.9.9.9"])
    d = r.resolve_static("svc.internal")
    assert d.via == "override" and [c.text for c in d.addresses] == ["10.0.0.5"]
    assert d.addresses[0].klass.value == "private"
    assert r.resolve_static("0x7f000001").addresses[0].klass.value == "loopback"
    assert r.resolve_static("10.9.9.9").addresses[0].klass.value == "gateway_self"
    assert {c.text for c in r.resolve_static("a.localhost").addresses} == {"127.0.0.1", "::1"}
    bad = r.resolve_static("4294967296")
    assert bad.error and not bad.addresses
    assert r.resolve_static("example.com") is None
    assert r.lookup_cached("svc.internal") is r.lookup_cached("svc.internal")  # cached object


def _fake_getaddrinfo(answers: dict, calls: list):
    async def getaddrinfo(host, port, **kw):
        calls.append(host)
        a = answers[host]
        if isinstance(a, Exception):
            raise a
        if a == "hang":
            await asyncio.sleep(10)
        return [(socket.AF_INET6 if ":" in x else socket.AF_INET, socket.SOCK_STREAM, 6, "", (x, port))
                for x in a]
    return getaddrinfo


def run_resolve(r: Resolver, host: str, answers: dict, calls: list):
    async def main():
        loop = asyncio.get_running_loop()
        loop.getaddrinfo = _fake_getaddrinfo(answers, calls)
        return await r.resolve(host, 443)
    return asyncio.run(main())


def test_dns_answers_are_classified_and_cached():
    r = Resolver(timeout=1)
    calls: list = []
    answers = {"mixed.test": ["93.184.216.34", "169.254.169.254", "93.184.216.34"]}
    d = run_resolve(r, "mixed.test", answers, calls)
    assert d.via == "dns" and [c.text for c in d.addresses] == ["93.184.216.34", "169.254.169.254"]
    assert [c.klass.value for c in d.addresses] == ["public", "metadata"]
    assert run_resolve(r, "mixed.test", answers, calls) is d and calls == ["mixed.test"]  # resolved once
    assert r.lookup_cached("mixed.test") is d


def test_dns_failures_become_destination_errors():
    r = Resolver(timeout=0.2)
    calls: list = []
    answers = {"nx.test": socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "slow.test": "hang",
               "empty.test": []}
    assert "cannot resolve nx.test" in run_resolve(r, "nx.test", answers, calls).error
    assert "timed out" in run_resolve(r, "slow.test", answers, calls).error
    assert "no address" in run_resolve(r, "empty.test", answers, calls).error
    assert r.lookup_cached("nx.test") is None  # failures are not cached
