"""sandboxd ``isolate`` tier: V8 isolates (mini-racer) behind the Backend interface.

Lifecycle, limits, files and sleep/resume run in-process; ``fetch`` goes
through the REAL gateway process to loopback upstreams, so policy, identity and
audit are the gateway's own."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from sandboxd.tiers.base import Egress, Limits, SandboxSpec, TierError
from sandboxd.tiers.isolate import InProcessIsolateBackend, IsolateBackend
from tests.conftest import register_secret
from tests.support.gateway import start_gateway
from tests.support.procs import start_upstreams

TENANT, AGENT = "acme-iso", "agent-iso"


@pytest.fixture(params=["worker", "inprocess"])
def kind(request):
    """Both fronts: worker processes (what the daemon uses) and in-process isolates."""
    return request.param


_OPEN: list = []


def make(kind: str, root: Path, **kw):
    b = IsolateBackend(root, **kw) if kind == "worker" else InProcessIsolateBackend(root, **kw)
    _OPEN.append(b)
    return b


async def close_all():
    while _OPEN:
        b = _OPEN.pop()
        if isinstance(b, IsolateBackend):
            await b.close()


def run(coro):
    async def wrapped():
        try:
            return await coro
        finally:
            await close_all()
    return asyncio.run(wrapped())


def spec(sid: str = "sb-1", *, memory_mb: int = 64, timeout_s: float = 5.0) -> SandboxSpec:
    return SandboxSpec(id=sid, tenant=TENANT, agent=AGENT, tier="isolate",
                       limits=Limits(memory_mb=memory_mb, exec_timeout_s=timeout_s))


NO_NET = Egress(proxy_host="127.0.0.1", proxy_port=9)  # no token: fetch fails closed


class Out:
    def __init__(self):
        self.items: list[tuple[str, bytes]] = []

    def __call__(self, stream: str, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.items.append((stream, data))

    def text(self, stream: str) -> str:
        return b"".join(d for s, d in self.items if s == stream).decode()


async def ex(b, sid, code, timeout=2.0, **kw):
    out = Out()
    res = await b.exec(sid, code, timeout_s=timeout, on_output=out, **kw)
    return res, out


# -- lifecycle and exec ---------------------------------------------------------------

def test_exec_output_errors_and_exit_codes(tmp_path, kind):
    async def main():
        b = make(kind, tmp_path / "iso")
        await b.create(spec(), NO_NET)
        r, o = await ex(b, "sb-1", "console.log('hello', 1 + 1, {a: [1]}); console.error('oops')")
        assert (r.exit_code, r.timed_out) == (0, False)
        assert o.text("stdout") == 'hello 2 {"a":[1]}\n' and o.text("stderr") == "oops\n"
        # top-level await, timers, stdin/env parameters
        r, o = await ex(b, "sb-1", "await new Promise(r => setTimeout(r, 30)); console.log(stdin, env.K)",
                        stdin=b"in-data", env={"K": "v"})
        assert r.exit_code == 0 and o.text("stdout") == "in-data v\n"
        # an un-awaited timer still runs before the exec ends (like Node)
        r, o = await ex(b, "sb-1", "setTimeout(() => console.log('later'), 20); console.log('now')")
        assert r.exit_code == 0 and o.text("stdout") == "now\nlater\n"
        r, o = await ex(b, "sb-1", "console.log('before'); throw new Error('boom')")
        assert r.exit_code == 1 and o.text("stdout") == "before\n" and "Error: boom" in o.text("stderr")
        r, o = await ex(b, "sb-1", "this is not javascript(")
        assert r.exit_code == 1 and "SyntaxError" in o.text("stderr")
        r, o = await ex(b, "sb-1", "setTimeout(() => { throw new TypeError('in timer') }, 1); await null")
        assert r.exit_code == 1 and "TypeError: in timer" in o.text("stderr")
        r, o = await ex(b, "sb-1", "await new Promise(() => {})")
        assert r.exit_code == 1 and not r.timed_out and "never settle" in o.text("stderr")
        with pytest.raises(TierError):
            await b.exec("sb-1", ["node", "-e", "1"], timeout_s=1, on_output=Out())
        with pytest.raises(TierError):
            await b.exec("nope", "1", timeout_s=1, on_output=Out())
        with pytest.raises(TierError, match="already exists"):
            await b.create(spec(), NO_NET)
        await b.destroy("sb-1")
    run(main())


def test_no_ambient_host_apis(tmp_path, kind):
    """V8 has no network/file/process API; sandboxd removes the sources of
    background JavaScript. Only the fetch bridge reaches out."""
    async def main():
        b = make(kind, tmp_path / "iso")
        await b.create(spec(), NO_NET)
        names = ["require", "process", "Deno", "Bun", "XMLHttpRequest", "WebSocket", "importScripts", "module",
                 "WebAssembly", "FinalizationRegistry", "print", "read", "load", "os", "quit"]
        r, o = await ex(b, "sb-1", "console.log(JSON.stringify({" + ",".join(f"{n}: typeof {n}" for n in names)
                        + ", wait: typeof Atomics.wait, waitAsync: typeof Atomics.waitAsync, fetch: typeof fetch}))")
        assert r.exit_code == 0, o.text("stderr")
        seen = json.loads(o.text("stdout"))
        assert {k: v for k, v in seen.items() if v != "undefined"} == {"fetch": "function"}
        r, o = await ex(b, "sb-1", "await import('http://127.0.0.1:9/x.js')")
        assert r.exit_code == 1 and "Not supported" in o.text("stderr")
        # the protocol object cannot be replaced by sandbox code
        r, o = await ex(b, "sb-1", "globalThis.__sandboxd = 1; console.log(typeof __sandboxd)")
        assert o.text("stdout") == "object\n"
        r, o = await ex(b, "sb-1", "console.log('still fine')")
        assert r.exit_code == 0 and o.text("stdout") == "still fine\n"
        await b.destroy("sb-1")
    run(main())


def test_timeout_stops_busy_loop_and_sandbox_stays_usable(tmp_path, kind):
    async def main():
        b = make(kind, tmp_path / "iso")
        await b.create(spec(timeout_s=30), NO_NET)
        t0 = time.monotonic()
        r, o = await ex(b, "sb-1", "console.log('start'); state.x = 1; while (true) {}", timeout=0.5)
        assert r.timed_out and r.exit_code == 1
        assert time.monotonic() - t0 < 3
        assert o.text("stdout") == "start\n" and "timed out after 0.5s" in o.text("stderr")
        # a timer that never stops is bounded the same way
        r, o = await ex(b, "sb-1", "setInterval(() => {}, 5)", timeout=0.3)
        assert r.timed_out
        # the spec's exec_timeout_s caps what a call asks for
        b2 = make(kind, tmp_path / "iso2")
        await b2.create(spec("sb-2", timeout_s=0.3), NO_NET)
        r, _ = await ex(b2, "sb-2", "while (true) {}", timeout=60)
        assert r.timed_out and r.duration_s < 2
        await b2.destroy("sb-2")
        r, o = await ex(b, "sb-1", "console.log('alive', state.x)")
        assert r.exit_code == 0 and o.text("stdout") == "alive 1\n"
        await b.destroy("sb-1")
    run(main())


def test_runaway_continuation_is_killed_and_reported_failed(tmp_path, kind):
    """JS that spins in a promise continuation runs outside a cancelable task:
    the isolate is killed at the deadline and the sandbox reported failed; the
    daemon's event loop keeps running meanwhile."""
    async def main():
        b = make(kind, tmp_path / "iso")
        await b.create(spec(), NO_NET)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1
        tk = asyncio.create_task(ticker())
        r, o = await ex(b, "sb-1", "await null; while (true) {}", timeout=0.5)
        tk.cancel()
        assert r.timed_out and "isolate was killed" in o.text("stderr")
        assert ticks >= 5  # the event loop was never blocked
        with pytest.raises(TierError, match="failed"):
            await ex(b, "sb-1", "1")
        await b.destroy("sb-1")
        assert not (tmp_path / "iso" / "workspaces" / "sb-1").exists()
    run(main())


def test_memory_limit_stops_allocation_bombs(tmp_path, kind):
    async def main():
        b = make(kind, tmp_path / "iso")
        await b.create(spec(memory_mb=32), NO_NET)
        bomb = "const a = []; while (true) a.push(new Array(100000).fill(1.5));"
        for _ in range(2):  # the limit holds again after the first stop
            r, o = await ex(b, "sb-1", bomb, timeout=10)
            assert r.exit_code == 1 and not r.timed_out
            assert "memory limit exceeded (32 MiB)" in o.text("stderr")
            r, o = await ex(b, "sb-1", "console.log('usable')")
            assert r.exit_code == 0 and o.text("stdout") == "usable\n"
        # array buffers live outside the V8 heap: the harness budget stops them
        r, o = await ex(b, "sb-1", "const x = new Uint8Array(4e6); console.log(x.toReversed().length)")
        assert r.exit_code == 0 and o.text("stdout") == "4000000\n"
        rss0 = _rss_mb(b)
        r, o = await ex(b, "sb-1", "const k = []; for (let i = 0; i < 100; i++) k.push(new Uint8Array(8e6).fill(1));",
                        timeout=10)
        assert r.exit_code == 1 and "memory limit: array buffers would exceed 32 MiB" in o.text("stderr")
        assert _rss_mb(b) - rss0 < 200
        r, o = await ex(b, "sb-1", "new Uint8Array(1).toReversed(); const y = new Uint8Array(64e6)", timeout=10)
        assert r.exit_code == 1 and "array buffers would exceed" in o.text("stderr")
        await b.destroy("sb-1")
    run(main())


def _rss_mb(b) -> float:
    pid = b.worker_pids()[0] if isinstance(b, IsolateBackend) else "self"
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_fatal_v8_error_kills_only_its_worker(tmp_path):
    """Some V8 out-of-memory paths abort the whole process whatever the isolate's
    limit. The daemon-facing backend hosts isolates in worker processes: the
    worker dies, its sandboxes are reported failed, the daemon carries on and the
    next create gets a fresh worker."""
    async def main():
        b = make("worker", tmp_path / "iso")
        await b.create(spec("victim"), NO_NET)
        await b.create(spec("neighbour"), NO_NET)
        await b.put_file("neighbour", "keep.txt", b"k")
        [pid] = b.worker_pids()
        r, o = await ex(b, "victim", "const a = new Array(3e8).fill(1.5); console.log(a.length)", timeout=60)
        assert r.exit_code == 1 and "isolate worker exited" in o.text("stderr")
        assert "this sandbox failed" in o.text("stderr")
        for sid in ("victim", "neighbour"):
            with pytest.raises(TierError, match="failed"):
                await ex(b, sid, "1")
        assert pid not in b.worker_pids()
        await b.create(spec("fresh"), NO_NET)
        r, o = await ex(b, "fresh", "console.log('new worker')")
        assert r.exit_code == 0 and o.text("stdout") == "new worker\n"
        assert b.worker_pids() and b.worker_pids()[0] != pid
        for sid in ("victim", "neighbour", "fresh"):
            await b.destroy(sid)
        assert not any((tmp_path / "iso" / "workspaces").iterdir())
    run(main())


# -- files ------------------------------------------------------------------------------

def test_files_put_get_list_and_no_escape(tmp_path, kind):
    async def main():
        b = make(kind, tmp_path / "iso")
        await b.create(spec(), NO_NET)
        await b.put_file("sb-1", "a.txt", b"A")
        await b.put_file("sb-1", "dir/sub/b.bin", b"\x00\x01\x02")
        await b.put_file("sb-1", "./dir/c.txt", b"CC")
        assert await b.get_file("sb-1", "dir/sub/b.bin") == b"\x00\x01\x02"
        assert await b.list_files("sb-1") == [
            {"path": "a.txt", "size": 1, "type": "file"},
            {"path": "dir", "size": 0, "type": "dir"},
            {"path": "dir/c.txt", "size": 2, "type": "file"},
            {"path": "dir/sub", "size": 0, "type": "dir"},
            {"path": "dir/sub/b.bin", "size": 3, "type": "file"},
        ]
        assert [e["path"] for e in await b.list_files("sb-1", "dir/sub")] == ["dir/sub/b.bin"]
        outside = tmp_path / "outside.txt"
        outside.write_text("secret")
        for bad in ["/etc/passwd", "../outside.txt", "dir/../../outside.txt", "..", "a\x00b"]:
            with pytest.raises(TierError):
                await b.get_file("sb-1", bad)
            with pytest.raises(TierError):
                await b.put_file("sb-1", bad, b"x")
        ws = tmp_path / "iso" / "workspaces" / "sb-1"
        os.symlink(outside, ws / "link.txt")
        os.symlink(tmp_path, ws / "linkdir")
        with pytest.raises(TierError, match="symbolic link"):
            await b.get_file("sb-1", "link.txt")
        with pytest.raises(TierError, match="symbolic link"):
            await b.put_file("sb-1", "link.txt", b"overwrite")
        with pytest.raises(TierError, match="symbolic link"):
            await b.get_file("sb-1", "linkdir/outside.txt")
        with pytest.raises(TierError, match="symbolic link"):
            await b.put_file("sb-1", "linkdir/new.txt", b"x")
        with pytest.raises(TierError):
            await b.list_files("sb-1", "linkdir")
        assert outside.read_text() == "secret" and not (tmp_path / "new.txt").exists()
        assert "link.txt" not in [e["path"] for e in await b.list_files("sb-1")]
        with pytest.raises(TierError, match="(?i)no such file"):
            await b.get_file("sb-1", "missing.txt")
        await b.destroy("sb-1")
    run(main())


# -- sleep / resume / destroy / adopt ------------------------------------------------------------

def test_sleep_resume_three_times_keeps_state_and_files(tmp_path, kind):
    async def main():
        b = make(kind, tmp_path / "iso")
        s = spec()
        await b.create(s, NO_NET)
        r, _ = await ex(b, "sb-1", "state.count = 0; state.log = []; globalThis.scratch = 'gone after sleep'")
        assert r.exit_code == 0
        await b.put_file("sb-1", "notes/n.txt", b"round 0")
        for i in range(1, 4):
            snap = tmp_path / f"snap-{i}"
            await b.sleep("sb-1", snap)
            assert (snap / "isolate-state.json").is_file()
            with pytest.raises(TierError):
                await ex(b, "sb-1", "1")  # slept: nothing runs
            assert not (tmp_path / "iso" / "workspaces" / "sb-1").exists()
            await b.resume(s, NO_NET, snap)
            r, o = await ex(b, "sb-1", "state.count += 1; state.log.push('r' + state.count); "
                                       "console.log(JSON.stringify(state), typeof scratch)")
            assert r.exit_code == 0, o.text("stderr")
            assert json.loads(o.text("stdout").split(" ")[0]) == {
                "count": i, "log": [f"r{k}" for k in range(1, i + 1)]}
            assert o.text("stdout").rstrip().endswith("undefined")
            assert await b.get_file("sb-1", "notes/n.txt") == f"round {i - 1}".encode()
            await b.put_file("sb-1", "notes/n.txt", f"round {i}".encode())
        # state that cannot be serialised: sleep refuses and the sandbox keeps running
        await ex(b, "sb-1", "state.self = state")
        with pytest.raises(TierError, match="not JSON-serialisable"):
            await b.sleep("sb-1", tmp_path / "snap-bad")
        r, o = await ex(b, "sb-1", "delete state.self; console.log(state.count)")
        assert o.text("stdout") == "3\n"
        await ex(b, "sb-1", "state.slow = {toJSON() { while (true) {} }}")
        with pytest.raises(TierError, match="could not be serialised in 5s; the sandbox keeps running"):
            await b.sleep("sb-1", tmp_path / "snap-slow")
        r, o = await ex(b, "sb-1", "delete state.slow; console.log(state.count)")
        assert o.text("stdout") == "3\n"
        # a broken snapshot fails resume cleanly (nothing left behind)
        bad = tmp_path / "snap-broken"
        bad.mkdir()
        (bad / "isolate-state.json").write_text("{not json")
        with pytest.raises(TierError):
            await b.resume(spec("sb-2"), NO_NET, bad)
        assert not (tmp_path / "iso" / "workspaces" / "sb-2").exists()
        await b.destroy("sb-1")
    run(main())


def test_destroy_idempotent_and_adopt_or_clean(tmp_path, kind):
    async def main():
        b = make(kind, tmp_path / "iso")
        await b.create(spec("keep-1"), NO_NET)
        await b.create(spec("gone-1"), NO_NET)
        await b.destroy("gone-1")
        await b.destroy("gone-1")
        await b.destroy("never-existed")
        assert not (tmp_path / "iso" / "workspaces" / "gone-1").exists()
        # a crashed predecessor's leftovers
        wsr = tmp_path / "iso" / "workspaces"
        (wsr / "stale-1").mkdir()
        (wsr / "stale-1" / "f").write_text("x")
        (wsr / "known-1").mkdir()
        b2 = make(kind, tmp_path / "iso")
        assert await b2.adopt_or_clean({"known-1", "keep-1"}) == set()
        assert sorted(p.name for p in wsr.iterdir()) == ["keep-1", "known-1"]
        await b2.destroy("known-1")  # a known id without a live isolate: its workspace goes
        assert not (wsr / "known-1").exists()
        await b.destroy("keep-1")
    run(main())


# -- fetch through the real gateway ----------------------------------------------------------------

POLICY = f"""\
apiVersion: egress/v1
kind: Policy
name: iso
selector: principal.tenant == "{TENANT}"
rules:
  - name: no-denied-host
    action: deny
    when: request.host == "no.upstream.test"
    reason: The isolate may not call no.upstream.test.
  - name: ok-get
    action: allow
    when: request.host == "ok.upstream.test" && request.method == "GET"
    reason: The isolate may read ok.upstream.test.
    allow_internal: ["127.0.0.0/8"]
"""


@pytest.fixture(scope="module")
def gw_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iso-gw")
    ups = start_upstreams(tmp / "up")
    pol = tmp / "policies"
    pol.mkdir()
    (pol / "10-iso.yaml").write_text(POLICY)
    gw = start_gateway(tmp, pol, hosts={"ok.upstream.test": "127.0.0.1", "no.upstream.test": "127.0.0.1"},
                       upstream_ca=[ups.ca.cert])
    try:
        yield gw, ups
    finally:
        gw.stop()
        ups.stop()


def _decisions(gw, path: str) -> list[dict]:
    return [e for e in gw.audit_events() if e.get("event") == "decision" and e.get("request", {}).get("path") == path]


FETCH_JS = """
const r = await fetch(URL_, {method: 'GET', headers: {'X-Probe': 'p1', 'Proxy-Authorization': 'Basic Zm9vOmJhcg=='}});
const body = await r.text();
console.log(JSON.stringify({status: r.status, ok: r.ok, ctype: r.headers.get('content-type'),
                            decision: r.headers.get('x-egress-decision'), body}));
"""


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_fetch_is_governed_by_the_gateway(gw_env, tmp_path, scheme, kind):
    gw, ups = gw_env
    token = register_secret(gw.mint(TENANT, AGENT))  # the suite's leak scan checks every log for it
    port = ups.http_port if scheme == "http" else ups.https_port
    ok_url = f"{scheme}://ok.upstream.test:{port}/echo/iso-{kind}-{scheme}-ok"
    no_url = f"{scheme}://no.upstream.test:{port}/echo/iso-{kind}-{scheme}-no"
    egress = Egress(proxy_host="127.0.0.1", proxy_port=gw.proxy_port, token=token, ca_cert=gw.ca_cert)

    deny_id = None

    async def main():
        nonlocal deny_id
        b = make(kind, tmp_path / "iso")
        await b.create(spec(), egress)
        r, o = await ex(b, "sb-1", FETCH_JS.replace("URL_", json.dumps(ok_url)), timeout=15)
        assert r.exit_code == 0, o.text("stderr")
        got = json.loads(o.text("stdout"))
        assert got["status"] == 200 and got["ok"] is True
        echo = json.loads(got["body"])
        assert echo["path"] == f"/echo/iso-{kind}-{scheme}-ok" and echo["scheme"] == scheme
        sent = {k.lower(): v for k, v in echo["headers"]}
        assert sent.get("x-probe") == "p1"
        assert "proxy-authorization" not in sent  # neither the token nor the JS's forged header reached upstream
        assert token not in got["body"]

        r, o = await ex(b, "sb-1", FETCH_JS.replace("URL_", json.dumps(no_url)), timeout=15)
        assert r.exit_code == 0, o.text("stderr")
        got = json.loads(o.text("stdout"))
        assert got["status"] == 403 and got["ok"] is False and got["decision"] == "deny"
        reason = json.loads(got["body"])
        assert reason["decision"] == "deny" and reason["request_id"]
        if scheme == "http":
            assert reason["rule"] == "iso/no-denied-host"
            assert reason["reason"] == "The isolate may not call no.upstream.test."
        else:  # refused at CONNECT already: no rule can allow that host
            assert reason["code"] == "default_deny" and "no.upstream.test" in reason["reason"]
        deny_id = reason["request_id"]

        # a method the policy does not allow: default deny, no upstream contact
        r, o = await ex(b, "sb-1", f"const r = await fetch({json.dumps(ok_url + '-post')}, "
                                   "{method: 'POST', body: 'x'}); console.log(r.status)", timeout=15)
        assert o.text("stdout") == "403\n"
        # the token is never visible to the JavaScript
        r, o = await ex(b, "sb-1", "console.log(JSON.stringify(Object.getOwnPropertyNames(globalThis)))")
        assert token not in o.text("stdout") and token[-16:] not in o.text("stdout")
        await b.destroy("sb-1")
    run(main())

    assert f"/echo/iso-{kind}-{scheme}-no" not in ups.stats()["paths"]
    assert f"/echo/iso-{kind}-{scheme}-ok-post" not in ups.stats()["paths"]
    [allow] = _decisions(gw, f"/echo/iso-{kind}-{scheme}-ok")
    assert allow["decision"] == "allow" and allow["rule"] == "iso/ok-get"
    deny = gw.decision_for(deny_id)
    assert deny["decision"] == "deny"
    assert deny["rule"] == ("iso/no-denied-host" if scheme == "http" else None)
    for ev in (allow, deny):
        assert ev["principal"]["tenant"] == TENANT and ev["principal"]["agent"] == AGENT
    assert token not in gw.audit_text()
    for log in (tmp_path / "iso").glob("*.log"):  # the worker's log
        assert token not in log.read_text(errors="replace")


def test_fetch_fails_closed_without_identity_or_with_bad_input(gw_env, tmp_path, kind):
    gw, ups = gw_env
    url = f"http://ok.upstream.test:{ups.http_port}/echo/iso-noid-{kind}"

    async def main():
        b = make(kind, tmp_path / "iso")
        # no token: nothing leaves
        await b.create(spec("no-id"), Egress(proxy_host="127.0.0.1", proxy_port=gw.proxy_port))
        r, o = await ex(b, "no-id", f"await fetch({json.dumps(url)})", timeout=10)
        assert r.exit_code == 1 and "fetch failed: network disabled" in o.text("stderr")
        # a forged token is refused by the gateway (407), not sent upstream as the sandbox
        await b.create(spec("bad-id"), Egress(proxy_host="127.0.0.1", proxy_port=gw.proxy_port, token="egt1.forged"))
        r, o = await ex(b, "bad-id", f"const r = await fetch({json.dumps(url)}); console.log(r.status)", timeout=10)
        assert o.text("stdout").strip() in ("407", "403"), o.text("stderr")
        # only http(s), no credentials in URLs
        tok = gw.mint(TENANT, AGENT)
        await b.create(spec("ok-id"), Egress(proxy_host="127.0.0.1", proxy_port=gw.proxy_port, token=tok))
        for bad, msg in [("file:///etc/passwd", "only absolute http"), ("ftp://x/", "only absolute http"),
                         ("/relative", "only absolute http"), ("http://u:p@ok.upstream.test/", "credentials")]:
            r, o = await ex(b, "ok-id", f"await fetch({json.dumps(bad)})", timeout=10)
            assert r.exit_code == 1 and msg in o.text("stderr"), (bad, o.text("stderr"))
            assert tok not in o.text("stderr")
        for sid in ("no-id", "bad-id", "ok-id"):
            await b.destroy(sid)
    run(main())
    assert f"/echo/iso-noid-{kind}" not in ups.stats()["paths"]
