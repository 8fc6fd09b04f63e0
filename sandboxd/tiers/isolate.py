"""The ``isolate`` tier: one V8 isolate (mini-racer 0.14) per sandbox.

JavaScript only. The isolate has no network, file or process API of its own;
sandboxd gives it ``console``, timers and a ``fetch()`` that sandboxd performs
itself, through the gateway, as the sandbox (explicit proxy, the sandbox's token
as proxy credentials; HTTPS through a CONNECT tunnel, trusting the gateway CA),
so the gateway's policies, injection and audit apply. The token stays in Python.

Two classes:

* ``IsolateBackend`` (what the daemon uses): the isolates run in worker
  processes, because some V8 failures abort the whole process (see the notes at
  the worker front below); a dead worker fails only its own sandboxes.
* ``InProcessIsolateBackend``: the isolates in this process (the worker runs
  one of these; tests and benchmarks exercise both).

Why a two-phase protocol instead of mini-racer's host callbacks
----------------------------------------------------------------
mini-racer 0.14 has ``wrap_py_function`` (JS -> async Python), but it reads the
call's arguments and resolves the JS promise with *blocking*, uncancelable calls
into the isolate from the caller's event loop: sandbox code that keeps the
isolate busy (``await fetch(u); while (true) {}``) would freeze the daemon's
event loop. And mini-racer runs promise continuations (microtasks) after each
task, outside any cancelable task, so a continuation can outlive a timeout.

So sandboxd only ever talks to the isolate with ``eval_cancelable`` under a
deadline, and exchanges JSON strings (no object handles, no blocking calls):

1. ``start`` runs the script (an async function body, so top-level ``await``
   works; parameters ``stdin`` and ``env``) until its first ``await``.
2. ``collect`` (run after the previous step's microtasks) returns the console
   output, the queued fetch requests, pending timers and whether the script's
   promise settled. It doubles as a liveness probe: if it cannot run before the
   deadline, a continuation is spinning.
3. sandboxd streams the output, performs the fetches (concurrently) and waits
   for the first fetch result or timer due, then ``deliver``s the results /
   ``tick``s the timers, and collects again.

The exec ends when the script's promise has settled and no timer or fetch is
pending (like Node), on an uncaught error in a timer, or at the timeout. A
timeout terminates the running JS (V8 TerminateExecution); if the isolate is
still busy after that (a runaway continuation), the isolate is killed and the
sandbox is marked failed (every later call raises TierError).

Sources of background JavaScript are removed at creation (``Atomics.wait``,
``Atomics.waitAsync``, ``FinalizationRegistry``, ``WebAssembly``) and
``setTimeout``/``setInterval`` are sandboxd's own, fired only inside ``tick``:
JavaScript runs only while an exec (or sleep's state serialisation) runs.

Memory: mini-racer's hard limit (V8 heap) is set to the spec's memory_mb.
ArrayBuffer backing stores live outside the V8 heap and are NOT counted by it;
the harness wraps the buffer and typed array constructors (and the prototype
methods that allocate) to charge a separate budget of the same size, released
by garbage collection. It is a best-effort guard (see the docs notes).

Persisted state: ``globalThis.state`` (JSON-serialisable) is what survives
sleep/resume, with the workspace files; other globals do not.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import re
import shutil
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .base import Backend, Egress, ExecResult, OutputCallback, SandboxSpec, TierError
from .paths import get_file as _get_file
from .paths import list_files as _list_files
from .paths import put_file as _put_file
from .paths import rmtree as _rmtree

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_METHOD_RE = re.compile(r"^[A-Za-z]{1,16}$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}$")
# Headers the sandbox may not set: identity and framing belong to sandboxd/aiohttp.
_FORBIDDEN_HEADERS = frozenset({
    "proxy-authorization", "proxy-authenticate", "proxy-connection", "connection", "keep-alive",
    "transfer-encoding", "te", "trailer", "upgrade", "content-length", "host", "expect", "accept-encoding",
})
_STATE_FILE = "isolate-state.json"
_META_FILE = "isolate-meta.json"
_WS_DIR = "workspace"

# JavaScript harness, installed once per isolate before any sandbox code runs.
# Everything it needs is captured in closures; the only global it adds that
# sandbox code cannot replace is the frozen, non-configurable __sandboxd.
_HARNESS = r"""
(() => {
  'use strict';
  const G = globalThis;
  const JSONs = JSON.stringify, JSONp = JSON.parse, StringC = String, ObjectC = Object;
  const ReflectApply = Reflect.apply, ReflectConstruct = Reflect.construct;
  const PromiseC = Promise, PromiseThen = Promise.prototype.then;
  const MapC = Map, DateNow = Date.now, MathMin = Math.min, MathMax = Math.max;
  const ErrorC = Error, TypeErrorC = TypeError, RangeErrorC = RangeError;
  const AsyncFunction = (async function () {}).constructor;
  const ArrayIsArray = Array.isArray;
  const OUT_CAP = %(out_cap)d, MAX_TIMERS = %(max_timers)d, MAX_INFLIGHT = %(max_inflight)d;
  const BUF_CAP = %(buf_cap)d;

  // -- background JavaScript sources: removed -----------------------------------
  const FR = G.FinalizationRegistry;
  delete G.FinalizationRegistry;
  delete G.WebAssembly;
  if (G.Atomics) { delete G.Atomics.wait; delete G.Atomics.waitAsync; }

  // -- buffer budget (ArrayBuffer memory is outside the V8 heap limit) ------------
  let bufLive = 0;
  const bufReg = new FR((n) => { bufLive -= n; });
  function charge(n) {
    n = +n;
    if (!(n >= 0)) return;
    if (bufLive + n > BUF_CAP) {
      throw new RangeErrorC('memory limit: array buffers would exceed ' + (BUF_CAP / 1048576) + ' MiB');
    }
  }
  function track(obj, n) { if (n > 0) { bufLive += n; bufReg.register(obj, n); } return obj; }
  function wrapCtor(name, preSize, postSize) {
    const I = G[name];
    if (typeof I !== 'function') return;
    const W = function (...args) {
      if (new.target === undefined) throw new TypeErrorC("Constructor " + name + " requires 'new'");
      charge(preSize(args));
      const r = ReflectConstruct(I, args, new.target === W ? I : new.target);
      const n = postSize(r, args);
      charge(n);
      return track(r, n);
    };
    for (const k of Reflect.ownKeys(I)) {
      if (k === 'prototype' || k === 'length' || k === 'name') continue;
      ObjectC.defineProperty(W, k, ObjectC.getOwnPropertyDescriptor(I, k));
    }
    ObjectC.setPrototypeOf(W, ObjectC.getPrototypeOf(I));
    ObjectC.defineProperty(W, 'prototype', {value: I.prototype, writable: false});
    ObjectC.defineProperty(W, 'name', {value: name});
    ObjectC.defineProperty(I.prototype, 'constructor', {value: W, writable: false, configurable: false});
    G[name] = W;
  }
  const AB = G.ArrayBuffer, SAB = G.SharedArrayBuffer;
  const isBuf = (x) => x !== null && typeof x === 'object' && (x instanceof AB || x instanceof SAB);
  const abSize = (a) => MathMax(+a[0] || 0, (a[1] && +a[1].maxByteLength) || 0);
  wrapCtor('ArrayBuffer', abSize, (r, a) => abSize(a));
  wrapCtor('SharedArrayBuffer', abSize, (r, a) => abSize(a));
  const TA = ['Int8Array', 'Uint8Array', 'Uint8ClampedArray', 'Int16Array', 'Uint16Array', 'Int32Array',
              'Uint32Array', 'Float16Array', 'Float32Array', 'Float64Array', 'BigInt64Array', 'BigUint64Array'];
  for (const name of TA) {
    const I = G[name];
    if (typeof I !== 'function') continue;
    const bpe = I.BYTES_PER_ELEMENT;
    wrapCtor(name, (a) => {
      const x = a[0];
      if (typeof x === 'number') return x * bpe;
      if (x !== null && typeof x === 'object' && !isBuf(x) && typeof x.length === 'number') return x.length * bpe;
      return 0;
    }, (r, a) => (isBuf(a[0]) ? 0 : r.byteLength));
  }
  // Methods that allocate a new buffer. Those that go through the species
  // constructor (slice, map, filter) are tracked by the wrapped constructor; the
  // others allocate intrinsically and are tracked here.
  function wrapMethod(proto, name, sizeOf, trackResult) {
    const f = proto && proto[name];
    if (typeof f !== 'function') return;
    ObjectC.defineProperty(proto, name, {value: function (...args) {
      charge(sizeOf(this, args));
      const r = ReflectApply(f, this, args);
      if (trackResult && r !== null && typeof r === 'object' && r !== this) track(r, +r.byteLength || 0);
      return r;
    }, writable: false, configurable: false});
  }
  const TAproto = ObjectC.getPrototypeOf(G.Uint8Array.prototype);
  for (const m of ['slice', 'map', 'filter']) wrapMethod(TAproto, m, (t) => t.byteLength, false);
  for (const m of ['toReversed', 'toSorted', 'with']) wrapMethod(TAproto, m, (t) => t.byteLength, true);
  wrapMethod(AB.prototype, 'slice', (t) => t.byteLength, false);
  wrapMethod(SAB.prototype, 'slice', (t) => t.byteLength, false);
  for (const m of ['transfer', 'transferToFixedLength']) wrapMethod(AB.prototype, m, (t, a) => (a[0] === undefined ? t.byteLength : +a[0]), true);
  wrapMethod(AB.prototype, 'resize', (t, a) => (+a[0] || 0) - t.byteLength, false);
  wrapMethod(SAB.prototype, 'grow', (t, a) => (+a[0] || 0) - t.byteLength, false);

  // -- console --------------------------------------------------------------------
  let out = [], outLen = 0, truncated = false;
  function fmt(v) {
    try {
      if (typeof v === 'string') return v;
      if (v instanceof ErrorC) return StringC(v.stack || v);
      if (v === undefined) return 'undefined';
      if (typeof v === 'function' || typeof v === 'symbol' || typeof v === 'bigint') return StringC(v);
      if (v !== null && typeof v === 'object') { const s = JSONs(v); return s === undefined ? StringC(v) : s; }
      return StringC(v);
    } catch (e) { try { return StringC(v); } catch (e2) { return '[unprintable]'; } }
  }
  function emit(stream, args) {
    if (truncated) return;
    let s = '';
    for (let i = 0; i < args.length; i++) s += (i ? ' ' : '') + fmt(args[i]);
    s += '\n';
    if (outLen + s.length > OUT_CAP) { truncated = true; s = s.slice(0, MathMax(0, OUT_CAP - outLen)); }
    outLen += s.length;
    if (s) out.push([stream, s]);
  }
  const con = {};
  for (const k of ['log', 'info', 'debug', 'trace']) con[k] = (...a) => emit('stdout', a);
  for (const k of ['error', 'warn']) con[k] = (...a) => emit('stderr', a);
  G.console = con;

  // -- timers (fired only by tick) -------------------------------------------------
  let timers = new MapC(), nextTimer = 1, uncaught = null;
  function errText(e) {
    try { if (e instanceof ErrorC) return StringC(e.stack || e); return 'Uncaught ' + fmt(e); }
    catch (x) { return 'Uncaught exception'; }
  }
  function addTimer(fn, ms, args, every) {
    if (typeof fn !== 'function') throw new TypeErrorC('timer callback must be a function');
    if (timers.size >= MAX_TIMERS) throw new RangeErrorC('too many timers (' + MAX_TIMERS + ')');
    ms = MathMax(0, +ms || 0);
    const id = nextTimer++;
    timers.set(id, {due: DateNow() + ms, fn, args, every: every ? MathMax(1, ms) : 0});
    return id;
  }
  G.setTimeout = (fn, ms, ...args) => addTimer(fn, ms, args, false);
  G.setInterval = (fn, ms, ...args) => addTimer(fn, ms, args, true);
  G.clearTimeout = G.clearInterval = (id) => { timers.delete(id); };

  // -- fetch (performed by sandboxd through the gateway) ----------------------------
  let pending = new MapC(), reqs = [], nextReq = 1;
  function headersObj(h) {
    const o = {};
    if (h === undefined || h === null) return o;
    if (typeof h !== 'object') throw new TypeErrorC('fetch: headers must be an object');
    const entries = ArrayIsArray(h) ? h : (typeof h.entries === 'function' && !(h.constructor === ObjectC) ? [...h.entries()] : ObjectC.entries(h));
    for (const [k, v] of entries) o[StringC(k)] = StringC(v);
    return o;
  }
  function makeResponse(r) {
    const hdrs = r.headers || {};
    const headers = {};
    for (const k of ObjectC.keys(hdrs)) headers[k] = hdrs[k];
    ObjectC.defineProperty(headers, 'get', {value: (n) => { const v = hdrs[StringC(n).toLowerCase()]; return v === undefined ? null : v; }, enumerable: false});
    ObjectC.defineProperty(headers, 'has', {value: (n) => StringC(n).toLowerCase() in hdrs, enumerable: false});
    const body = r.body;
    return {status: r.status, statusText: r.statusText, ok: r.status >= 200 && r.status < 300, url: r.url,
            redirected: false, headers, body, text: async () => body, json: async () => JSONp(body)};
  }
  G.fetch = function fetch(input, init) {
    return new PromiseC((resolve, reject) => {
      if (pending.size >= MAX_INFLIGHT) throw new RangeErrorC('fetch: too many requests in flight (' + MAX_INFLIGHT + ')');
      init = init || {};
      const url = typeof input === 'string' ? input : StringC((input && input.url) || input);
      const method = StringC(init.method || 'GET').toUpperCase();
      let body = init.body;
      if (body !== undefined && body !== null && typeof body !== 'string') {
        if (typeof body === 'object' && !(body instanceof AB)) body = JSONs(body);
        else throw new TypeErrorC('fetch: body must be a string');
      }
      const id = nextReq++;
      pending.set(id, {resolve, reject});
      reqs.push([id, {url, method, headers: headersObj(init.headers), body: body === undefined ? null : body}]);
    });
  };

  function reset() {
    out = []; outLen = 0; truncated = false;
    timers = new MapC(); uncaught = null;
    pending = new MapC(); reqs = [];
  }
  let run = null;
  const api = {
    start(src, stdin, envJson) {
      reset();
      const me = run = {settled: false, ok: false, error: null};
      let p;
      try {
        p = new AsyncFunction('stdin', 'env', src)(stdin, JSONp(envJson));
      } catch (e) { me.settled = true; me.error = errText(e); return 'started'; }
      ReflectApply(PromiseThen, p, [() => { me.settled = true; me.ok = true; },
                                    (e) => { me.settled = true; me.error = errText(e); }]);
      return 'started';
    },
    collect() {
      let next = -1;
      for (const t of timers.values()) { const d = MathMax(0, t.due - DateNow()); next = next < 0 ? d : MathMin(next, d); }
      const r = {out, reqs, settled: !!(run && run.settled), ok: !!(run && run.ok), error: run ? run.error : null,
                 uncaught, timers: timers.size, next, inflight: pending.size, truncated};
      out = []; reqs = [];
      return JSONs(r);
    },
    tick() {
      const now = DateNow();
      for (const [id, t] of [...timers]) {
        if (uncaught) break;
        if (t.due > now || !timers.has(id)) continue;
        if (t.every) t.due = now + t.every; else timers.delete(id);
        try { ReflectApply(t.fn, undefined, t.args); } catch (e) { uncaught = errText(e); }
      }
      return 'ticked';
    },
    deliver(resultsJson) {
      for (const [id, r] of JSONp(resultsJson)) {
        const p = pending.get(id);
        if (!p) continue;
        pending.delete(id);
        if (r.error !== undefined) p.reject(new TypeErrorC('fetch failed: ' + r.error));
        else p.resolve(makeResponse(r));
      }
      return 'delivered';
    },
    abort() { reset(); run = null; return 'aborted'; },
    saveState() { const s = JSONs(G.state === undefined ? null : G.state); return s === undefined ? 'null' : s; },
    restoreState(text) { G.state = JSONp(text); return 'restored'; },
  };
  ObjectC.defineProperty(G, '__sandboxd', {value: ObjectC.freeze(api), writable: false, configurable: false, enumerable: false});
  G.state = {};
  return 'installed';
})()
"""


class _Timeout(Exception):
    pass


@dataclass
class _Sandbox:
    spec: SandboxSpec
    egress: Egress
    workspace: Path
    mr: object  # py_mini_racer.MiniRacer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    failed: str | None = None
    exec_task: asyncio.Task | None = None


class InProcessIsolateBackend(Backend):
    """The isolates live in this process (see IsolateBackend for the worker-process front)."""
    name = "isolate"

    def __init__(self, root: Path, *, max_output_bytes: int = 1 << 20, max_fetch_body: int = 8 << 20,
                 max_inflight_fetches: int = 16, max_timers: int = 1000, max_file_bytes: int = 64 << 20,
                 max_state_bytes: int = 16 << 20, grace_s: float = 1.0) -> None:
        self.root = Path(root)
        self.ws_root = self.root / "workspaces"
        self.max_output_bytes = max_output_bytes
        self.max_fetch_body = max_fetch_body
        self.max_inflight_fetches = max_inflight_fetches
        self.max_timers = max_timers
        self.max_file_bytes = max_file_bytes
        self.max_state_bytes = max_state_bytes
        self.grace_s = grace_s
        self._boxes: dict[str, _Sandbox] = {}
        self._starting: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------
    async def create(self, spec: SandboxSpec, egress: Egress) -> None:
        self._check_new(spec)
        ws = self.ws_root / spec.id
        if ws.exists() or ws.is_symlink():
            raise TierError(f"sandbox {spec.id}: a workspace for this id already exists")
        self._starting.add(spec.id)
        try:
            ws.mkdir(parents=True, mode=0o700)
            try:
                self._boxes[spec.id] = await self._new_isolate(spec, egress, ws, state_json=None)
            except BaseException:
                _rmtree(ws)
                raise
        finally:
            self._starting.discard(spec.id)

    async def resume(self, spec: SandboxSpec, egress: Egress, snapshot_dir: Path) -> None:
        self._check_new(spec)
        snapshot_dir = Path(snapshot_dir)
        state_path = snapshot_dir / _STATE_FILE
        try:
            state_json = state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TierError(f"sandbox {spec.id}: snapshot has no isolate state ({_STATE_FILE})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise TierError(f"sandbox {spec.id}: cannot read the isolate state: {e.__class__.__name__}") from None
        if len(state_json) > self.max_state_bytes:
            raise TierError(f"sandbox {spec.id}: persisted state exceeds {self.max_state_bytes} bytes")
        try:
            json.loads(state_json)
        except ValueError:
            raise TierError(f"sandbox {spec.id}: persisted state is not valid JSON") from None
        ws = self.ws_root / spec.id
        if ws.exists() or ws.is_symlink():
            raise TierError(f"sandbox {spec.id}: a workspace for this id already exists")
        self._starting.add(spec.id)
        try:
            snap_ws = snapshot_dir / _WS_DIR
            try:
                self.ws_root.mkdir(parents=True, exist_ok=True)
                if snap_ws.is_dir() and not snap_ws.is_symlink():
                    shutil.copytree(snap_ws, ws, symlinks=True)
                    os.chmod(ws, 0o700)
                else:
                    ws.mkdir(mode=0o700)
            except OSError as e:
                _rmtree(ws)
                raise TierError(f"sandbox {spec.id}: cannot restore the workspace: {e.strerror or e}") from None
            try:
                self._boxes[spec.id] = await self._new_isolate(spec, egress, ws, state_json=state_json)
            except BaseException:
                _rmtree(ws)
                raise
        finally:
            self._starting.discard(spec.id)

    async def sleep(self, sandbox_id: str, snapshot_dir: Path) -> None:
        sb = self._get(sandbox_id)
        snapshot_dir = Path(snapshot_dir)
        async with sb.lock:
            self._check_usable(sb)
            try:
                text = await self._eval(sb, "__sandboxd.saveState()", 5.0)
            except (_Timeout, _OOM) as e:
                await self._drain_after_stop(sb, _Output(lambda s, d: None, 0), "state serialisation")
                how = "in 5s" if isinstance(e, _Timeout) else "within the memory limit"
                state = "the sandbox is now failed" if sb.failed else "the sandbox keeps running"
                raise TierError(f"sandbox {sandbox_id}: globalThis.state could not be serialised {how}; "
                                f"{state}") from None
            except _JSError as e:
                raise TierError(f"sandbox {sandbox_id}: globalThis.state is not JSON-serialisable: {e}") from None
            if not isinstance(text, str):
                raise TierError(f"sandbox {sandbox_id}: globalThis.state serialisation returned no text")
            if len(text.encode()) > self.max_state_bytes:
                raise TierError(f"sandbox {sandbox_id}: globalThis.state exceeds {self.max_state_bytes} bytes")
            try:
                snapshot_dir.mkdir(parents=True, exist_ok=True)
                _atomic_write(snapshot_dir / _META_FILE, json.dumps(
                    {"tier": "isolate", "format": 1, "id": sandbox_id, "saved_at": time.time()}).encode())
                dest = snapshot_dir / _WS_DIR
                _rmtree(dest)
                tmp = snapshot_dir / (_WS_DIR + ".tmp")
                _rmtree(tmp)
                shutil.copytree(sb.workspace, tmp, symlinks=True)
                os.replace(tmp, dest)
                _atomic_write(snapshot_dir / _STATE_FILE, text.encode())
            except OSError as e:
                raise TierError(f"sandbox {sandbox_id}: cannot write the snapshot: {e.strerror or e}") from None
            await self._release(sb)
            _rmtree(sb.workspace)
            self._boxes.pop(sandbox_id, None)

    async def destroy(self, sandbox_id: str) -> None:
        sb = self._boxes.get(sandbox_id)
        if sb is not None:
            t = sb.exec_task
            if t is not None and not t.done() and t is not asyncio.current_task():
                t.cancel()
            async with sb.lock:
                await self._release(sb)
                self._boxes.pop(sandbox_id, None)
        if _ID_RE.match(sandbox_id or ""):
            _rmtree(self.ws_root / sandbox_id)

    async def adopt_or_clean(self, known_ids: set[str]) -> set[str]:
        """Isolates live only in this process: nothing survives a crash, so nothing
        is adopted. Workspaces of ids the daemon does not know are removed (those of
        known ids are kept: the daemon decides their fate, e.g. destroy)."""
        _clean_workspaces(self.ws_root, set(known_ids) | set(self._boxes) | self._starting)
        return set()

    # -- exec -------------------------------------------------------------------------------
    async def exec(self, sandbox_id: str, command: list[str] | str, *, timeout_s: float,
                   on_output: OutputCallback, stdin: bytes | None = None,
                   env: Mapping[str, str] | None = None) -> ExecResult:
        sb = self._get(sandbox_id)
        if isinstance(command, (list, tuple)):
            if len(command) != 1 or not isinstance(command[0], str):
                raise TierError("isolate tier: the command is JavaScript source (one string)")
            command = command[0]
        if not isinstance(command, str):
            raise TierError("isolate tier: the command is JavaScript source (one string)")
        limit = sb.spec.limits.exec_timeout_s
        timeout = min(timeout_s, limit) if timeout_s and timeout_s > 0 else limit
        stdin_text = stdin.decode("utf-8", errors="replace") if stdin is not None else None
        env_json = json.dumps(dict(env or {}))
        async with sb.lock:
            self._check_usable(sb)
            sb.exec_task = asyncio.current_task()
            try:
                return await self._run(sb, command, stdin_text, env_json, timeout, on_output)
            finally:
                sb.exec_task = None

    async def _run(self, sb: _Sandbox, src: str, stdin: str | None, env_json: str, timeout: float,
                   on_output: OutputCallback) -> ExecResult:
        t0 = time.monotonic()
        deadline = t0 + timeout
        out = _Output(on_output, self.max_output_bytes)
        fetches: dict[int, asyncio.Task] = {}
        exit_code, timed_out = 1, False
        mem_limit_mb = sb.spec.limits.memory_mb

        def left() -> float:
            return deadline - time.monotonic()

        try:
            try:
                await self._eval(sb, f"__sandboxd.start({json.dumps(src)}, {json.dumps(stdin)}, "
                                     f"{json.dumps(env_json)})", left())
                while True:
                    st = _parse_state(await self._eval(sb, "__sandboxd.collect()", left()))
                    out.emit_all(st["out"])
                    for rid, req in st["reqs"]:
                        fetches[rid] = asyncio.create_task(self._fetch(sb, req, deadline))
                    if st["uncaught"]:
                        out.emit("stderr", _line(st["uncaught"]))
                        break
                    if st["settled"] and not st["timers"] and not st["inflight"]:
                        if st["ok"]:
                            exit_code = 0
                        else:
                            out.emit("stderr", _line(st["error"] or "Uncaught error"))
                        break
                    if not st["timers"] and not fetches:
                        if not st["settled"]:
                            out.emit("stderr", "error: the script's promise can never settle "
                                               "(nothing left to wait for)\n")
                        break
                    waits = list(fetches.values())
                    wait_s = left()
                    if st["timers"]:
                        wait_s = min(wait_s, st["next"] / 1000.0)
                    if wait_s <= 0 and left() <= 0:
                        raise _Timeout
                    if waits:
                        done, _ = await asyncio.wait(waits, timeout=max(wait_s, 0),
                                                     return_when=asyncio.FIRST_COMPLETED)
                    else:
                        done = set()
                        await asyncio.sleep(max(wait_s, 0))
                    if left() <= 0:
                        raise _Timeout
                    results = []
                    for rid, task in list(fetches.items()):
                        if task in done:
                            results.append([rid, task.result()])
                            del fetches[rid]
                    if results:
                        await self._eval(sb, f"__sandboxd.deliver({json.dumps(json.dumps(results))})", left())
                    if st["timers"]:
                        await self._eval(sb, "__sandboxd.tick()", left())
                if out.truncated_in_js(st):
                    out.note_truncated()
            except _Timeout:
                timed_out = True
                await self._drain_after_stop(sb, out, "timeout")
                out.emit("stderr", f"error: timed out after {timeout:g}s\n")
            except _OOM:
                await self._drain_after_stop(sb, out, "memory")
                out.emit("stderr", f"error: memory limit exceeded ({mem_limit_mb} MiB); the script was stopped\n")
            except _JSError as e:
                out.emit("stderr", f"error: {e}\n")
        finally:
            for task in fetches.values():
                task.cancel()
            if fetches:
                await asyncio.gather(*fetches.values(), return_exceptions=True)
        return ExecResult(exit_code=exit_code, timed_out=timed_out, duration_s=time.monotonic() - t0)

    async def _drain_after_stop(self, sb: _Sandbox, out: "_Output", why: str) -> None:
        """After a terminated step: collect the output left in the isolate and reset
        the run. If the isolate does not answer within the grace period, a runaway
        continuation is spinning: kill the isolate and mark the sandbox failed."""
        # A memory-limit stop may leave a pending termination (and garbage over the
        # limit until the next GC) that hits the next script: retry a few times.
        for attempt in range(4):
            try:
                st = _parse_state(await self._eval(sb, "__sandboxd.collect()", self.grace_s))
                out.emit_all(st["out"])
                await self._eval(sb, "__sandboxd.abort()", self.grace_s)
                return
            except (_OOM, _JSError):
                if attempt < 3:
                    continue
            except _Timeout:
                pass
            break
        if sb.mr is not None:
            await self._kill(sb, f"the isolate kept running after the {why} stop")
            out.emit("stderr", "error: JavaScript kept running after being stopped; the isolate was killed "
                               "and the sandbox is now failed\n")

    # -- files --------------------------------------------------------------------------------
    async def put_file(self, sandbox_id: str, path: str, data: bytes) -> None:
        _put_file(self._get(sandbox_id).workspace, path, data, self.max_file_bytes)

    async def get_file(self, sandbox_id: str, path: str) -> bytes:
        return _get_file(self._get(sandbox_id).workspace, path, self.max_file_bytes)

    async def list_files(self, sandbox_id: str, path: str = ".") -> list[dict]:
        return _list_files(self._get(sandbox_id).workspace, path)

    # -- internals ----------------------------------------------------------------------------
    def _check_new(self, spec: SandboxSpec) -> None:
        if not isinstance(spec.id, str) or not _ID_RE.match(spec.id):
            raise TierError(f"invalid sandbox id {spec.id!r}")
        if spec.id in self._boxes or spec.id in self._starting:
            raise TierError(f"sandbox {spec.id} already exists")
        if spec.limits.memory_mb < 8:
            raise TierError("isolate tier: memory limit must be at least 8 MiB")

    def _get(self, sandbox_id: str) -> _Sandbox:
        sb = self._boxes.get(sandbox_id)
        if sb is None:
            raise TierError(f"no running isolate sandbox {sandbox_id!r}")
        return sb

    @staticmethod
    def _check_usable(sb: _Sandbox) -> None:
        if sb.failed:
            raise TierError(f"sandbox {sb.spec.id} failed: {sb.failed}; destroy it")

    async def _new_isolate(self, spec: SandboxSpec, egress: Egress, ws: Path, *, state_json: str | None) -> _Sandbox:
        from py_mini_racer import MiniRacer
        limit = spec.limits.memory_mb * 1024 * 1024
        try:
            mr = MiniRacer()  # on the running loop; installs mini-racer's setTimeout (replaced below)
        except Exception as e:  # noqa: BLE001
            raise TierError(f"cannot create a V8 isolate: {e.__class__.__name__}") from None
        sb = _Sandbox(spec, egress, ws, mr)
        try:
            mr.set_hard_memory_limit(limit)
            harness = _HARNESS % {"out_cap": self.max_output_bytes, "max_timers": self.max_timers,
                                  "max_inflight": self.max_inflight_fetches, "buf_cap": limit}
            if await self._eval(sb, harness, 10.0) != "installed":
                raise TierError("isolate harness did not install")
            if state_json is not None:
                await self._eval(sb, f"__sandboxd.restoreState({json.dumps(state_json)})", 10.0)
        except TierError:
            await self._release(sb)
            raise
        except (_Timeout, _OOM, _JSError) as e:
            await self._release(sb)
            what = "restore the persisted state" if state_json is not None else "set up the isolate"
            raise TierError(f"sandbox {spec.id}: cannot {what}: {e.__class__.__name__.strip('_')} {e}") from None
        except BaseException:
            await self._release(sb)
            raise
        return sb

    async def _eval(self, sb: _Sandbox, code: str, timeout: float):
        from py_mini_racer import JSEvalException, JSOOMException
        if sb.failed or sb.mr is None:
            raise _JSError(sb.failed or "isolate released")
        if timeout <= 0:
            raise _Timeout
        try:
            return await asyncio.wait_for(sb.mr.eval_cancelable(code), timeout=timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise _Timeout from None
        except JSOOMException:
            raise _OOM from None
        except JSEvalException as e:
            raise _JSError(str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__) from None

    async def _kill(self, sb: _Sandbox, reason: str) -> None:
        sb.failed = reason
        await self._release(sb)

    async def _release(self, sb: _Sandbox) -> None:
        mr, sb.mr = sb.mr, None
        if mr is not None:
            try:
                mr.close()  # mr_free_context: terminates any running JS, joins the isolate thread
            except Exception:  # noqa: BLE001
                pass
        if sb.failed is None:
            sb.failed = "released"

    # -- fetch ----------------------------------------------------------------------------------
    async def _fetch(self, sb: _Sandbox, req: object, deadline: float) -> dict:
        """Perform one fetch for the sandbox through the gateway. Never raises; errors are
        returned as {"error": msg} and never contain the token."""
        token = sb.egress.token
        try:
            return await self._fetch_inner(sb, req, deadline)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            msg = f"{e.__class__.__name__}: {e}" if str(e) else e.__class__.__name__
            return {"error": _scrub(msg, token)}

    async def _fetch_inner(self, sb: _Sandbox, req: object, deadline: float) -> dict:
        from urllib.parse import urlsplit, urlunsplit

        eg = sb.egress
        if not eg.token or not eg.proxy_host or not eg.proxy_port:
            return {"error": "network disabled: this sandbox has no gateway identity"}
        if not isinstance(req, dict):
            return {"error": "malformed request"}
        url_s, method, headers, body = req.get("url"), req.get("method", "GET"), req.get("headers") or {}, req.get("body")
        if not isinstance(url_s, str) or len(url_s) > 8192 or any(c in url_s for c in "\r\n\x00 "):
            return {"error": "invalid URL"}
        try:
            u = urlsplit(url_s)
            port = u.port
        except ValueError:
            return {"error": "invalid URL"}
        if u.scheme not in ("http", "https") or not u.hostname:
            return {"error": "only absolute http:// and https:// URLs are allowed"}
        if u.username is not None or u.password is not None:
            return {"error": "credentials in the URL are not allowed"}
        if not isinstance(method, str) or not _METHOD_RE.match(method):
            return {"error": "invalid method"}
        method = method.upper()
        if method == "CONNECT":
            return {"error": "method not allowed"}
        if not isinstance(headers, dict):
            return {"error": "invalid headers"}
        clean: list[tuple[str, str]] = []
        for k, v in headers.items():
            if not isinstance(k, str) or not isinstance(v, str) or not _HEADER_NAME_RE.match(k) \
                    or any(c in v for c in "\r\n\x00"):
                return {"error": f"invalid header {str(k)[:64]!r}"}
            if k.lower() in _FORBIDDEN_HEADERS:
                continue  # identity, framing and encoding are sandboxd's
            clean.append((k, v))
        data = b""
        if body is not None:
            if not isinstance(body, str):
                return {"error": "body must be a string"}
            data = body.encode("utf-8")
            if len(data) > self.max_fetch_body:
                return {"error": f"request body larger than {self.max_fetch_body} bytes"}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return {"error": "timed out"}
        host = u.hostname
        host_hdr = f"[{host}]" if ":" in host else host
        authority = f"{host_hdr}:{port}" if port else host_hdr
        proxy_auth = ("Proxy-Authorization", "Basic " + base64.b64encode(f"x:{eg.token}".encode()).decode())
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        async with asyncio.timeout(remaining):
            reader, writer = await asyncio.open_connection(eg.proxy_host, eg.proxy_port)
            try:
                if u.scheme == "http":
                    target = urlunsplit(("http", authority, u.path or "/", u.query, ""))
                    return await _h11_exchange(reader, writer, method, target, authority,
                                               [proxy_auth, *clean], data, self.max_fetch_body, url_s)
                # HTTPS: a CONNECT tunnel as the sandbox, then TLS to the gateway's
                # interception (trusting the gateway CA), then the request.
                tunnel = f"{host_hdr}:{port or 443}"
                resp = await _h11_exchange(reader, writer, "CONNECT", tunnel, tunnel, [proxy_auth], b"",
                                           self.max_fetch_body, url_s)
                if not 200 <= resp["status"] < 300:
                    return resp  # the gateway's refusal (e.g. 403 with its JSON reason), as is
                ctx = ssl.create_default_context(cafile=str(eg.ca_cert) if eg.ca_cert else None)
                await writer.start_tls(ctx, server_hostname=host)
                return await _h11_exchange(reader, writer, method, path, authority, clean, data,
                                           self.max_fetch_body, url_s)
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except Exception:  # noqa: BLE001
                    pass


async def _h11_exchange(reader, writer, method: str, target: str, host: str, headers: list[tuple[str, str]],
                        body: bytes, cap: int, url: str) -> dict:
    """One HTTP/1.1 request/response on an open stream (Connection: close)."""
    import h11

    conn = h11.Connection(h11.CLIENT)
    hdrs = [("Host", host), *headers, ("Connection", "close")]
    if method != "CONNECT":
        hdrs.append(("Accept-Encoding", "identity"))
        if body or method in ("POST", "PUT", "PATCH"):
            hdrs.append(("Content-Length", str(len(body))))
    writer.write(conn.send(h11.Request(method=method, target=target, headers=hdrs)))
    if body:
        writer.write(conn.send(h11.Data(data=body)))
    if method != "CONNECT":
        writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()
    resp = None
    chunks: list[bytes] = []
    size = 0
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        if isinstance(ev, h11.InformationalResponse):
            continue
        if isinstance(ev, h11.Response):
            resp = ev
            if method == "CONNECT" and 200 <= ev.status_code < 300:
                break
            continue
        if isinstance(ev, h11.Data):
            size += len(ev.data)
            if size > cap:
                return {"error": f"response body larger than {cap} bytes"}
            chunks.append(bytes(ev.data))
            continue
        break  # EndOfMessage, ConnectionClosed or PAUSED
    if resp is None:
        return {"error": "no response"}
    hmap: dict[str, str] = {}
    charset = "utf-8"
    for k, v in resp.headers:
        k, v = k.decode("latin-1").lower(), v.decode("latin-1")
        hmap[k] = f"{hmap[k]}, {v}" if k in hmap else v
        if k == "content-type":
            m = re.search(r"charset=\"?([A-Za-z0-9._-]+)", v)
            if m:
                charset = m.group(1)
    raw = b"".join(chunks)
    try:
        text = raw.decode(charset, errors="replace")
    except LookupError:
        text = raw.decode("utf-8", errors="replace")
    return {"status": resp.status_code, "statusText": resp.reason.decode("latin-1", errors="replace"),
            "headers": hmap, "body": text, "url": url}


# -- helpers ---------------------------------------------------------------------------------

class _OOM(Exception):
    pass


class _JSError(Exception):
    pass


class _Output:
    """Streams output to the caller, at most ``cap`` bytes per exec."""

    def __init__(self, cb: OutputCallback, cap: int) -> None:
        self.cb, self.cap, self.sent, self.cut = cb, cap, 0, False

    def emit(self, stream: str, text: str) -> None:
        if self.cut or not text:
            return
        data = text.encode("utf-8", errors="replace")
        if self.sent + len(data) > self.cap:
            data = data[: max(0, self.cap - self.sent)]
            self.cut = True
        self.sent += len(data)
        if data:
            self.cb(stream, data)
        if self.cut:
            self.cb("stderr", b"\n[output truncated]\n")

    def emit_all(self, items: list) -> None:
        for item in items:
            if isinstance(item, list) and len(item) == 2 and item[0] in ("stdout", "stderr") \
                    and isinstance(item[1], str):
                self.emit(item[0], item[1])

    @staticmethod
    def truncated_in_js(st: dict) -> bool:
        return bool(st.get("truncated"))

    def note_truncated(self) -> None:
        if not self.cut:
            self.cut = True
            self.cb("stderr", b"\n[output truncated]\n")


def _parse_state(text: object) -> dict:
    if not isinstance(text, str):
        raise _JSError("isolate protocol error")
    try:
        st = json.loads(text)
    except ValueError:
        raise _JSError("isolate protocol error") from None
    if not isinstance(st, dict):
        raise _JSError("isolate protocol error")
    st.setdefault("out", [])
    st.setdefault("reqs", [])
    for k in ("settled", "ok", "timers", "inflight"):
        st.setdefault(k, False if k in ("settled", "ok") else 0)
    st.setdefault("uncaught", None)
    st.setdefault("error", None)
    st["next"] = max(0.0, float(st.get("next") or 0))
    if not isinstance(st["out"], list) or not isinstance(st["reqs"], list):
        raise _JSError("isolate protocol error")
    st["reqs"] = [r for r in st["reqs"] if isinstance(r, list) and len(r) == 2 and isinstance(r[0], int)]
    return st


def _line(s: object) -> str:
    s = str(s)
    return s if s.endswith("\n") else s + "\n"


def _scrub(msg: str, token: str) -> str:
    if token:
        for secret in (token, base64.b64encode(f"x:{token}".encode()).decode()):
            msg = msg.replace(secret, "[redacted]")
    return msg[:500]


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _oserr(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "path is a symbolic link"
    return e.strerror or e.__class__.__name__


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# workspace files: sandboxd.tiers.paths (shared with the namespace tier)


def _clean_workspaces(ws_root: Path, keep: set[str]) -> None:
    try:
        entries = list(os.scandir(ws_root))
    except FileNotFoundError:
        return
    for e in entries:
        if e.name not in keep:
            _rmtree(Path(e.path))


# -- the worker-process front -------------------------------------------------------------------
#
# Some V8 failures are fatal to the whole process and cannot be caught by an
# embedder (e.g. ``new Array(3e8).fill(0)`` ends in "Fatal JavaScript out of
# memory: invalid table size", which aborts the process whatever the isolate's
# memory limit). So the daemon does not host isolates itself: ``IsolateBackend``
# runs them in worker processes (``python -m sandboxd.tiers.isolate --worker``)
# and talks to them over a pipe (one JSON object per line). A worker that dies
# takes only its own sandboxes with it: they are reported failed (exec returns
# exit 1 with the reason on stderr; later calls raise TierError) and the next
# create starts a new worker. Workers exit when their stdin closes, so a crashed
# daemon leaves no worker behind. Workspace files are handled by the daemon side
# directly (same directories); the token travels to the worker in the create /
# resume message only, and the fetch bridge runs there.

_LINE_LIMIT = 64 << 20


def _spec_to_dict(spec: SandboxSpec) -> dict:
    lim = spec.limits
    return {"id": spec.id, "tenant": spec.tenant, "agent": spec.agent, "labels": dict(spec.labels),
            "tier": spec.tier, "limits": {"cpu_millicores": lim.cpu_millicores, "memory_mb": lim.memory_mb,
                                          "pids": lim.pids, "exec_timeout_s": lim.exec_timeout_s}}


def _spec_from_dict(d: dict) -> SandboxSpec:
    from .base import Limits
    return SandboxSpec(id=d["id"], tenant=d["tenant"], agent=d["agent"], labels=d.get("labels") or {},
                       tier=d.get("tier", "isolate"), limits=Limits(**d["limits"]))


def _egress_to_dict(e: Egress) -> dict:
    return {"proxy_host": e.proxy_host, "proxy_port": e.proxy_port, "token": e.token,
            "ca_cert": str(e.ca_cert) if e.ca_cert else None, "transparent_port": e.transparent_port,
            "dns_port": e.dns_port}


def _egress_from_dict(d: dict) -> Egress:
    return Egress(proxy_host=d["proxy_host"], proxy_port=d["proxy_port"], token=d.get("token") or "",
                  ca_cert=Path(d["ca_cert"]) if d.get("ca_cert") else None,
                  transparent_port=d.get("transparent_port", 0), dns_port=d.get("dns_port", 0))


class _WorkerDied(Exception):
    pass


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.ids: set[str] = set()
        self.pending: dict[int, tuple[asyncio.Future, OutputCallback | None]] = {}
        self.next_id = 1
        self.dead: str | None = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                    fut, cb = self.pending.get(msg.get("id"), (None, None))
                except (ValueError, AttributeError):
                    continue
                if fut is None:
                    continue
                if "out" in msg:
                    if cb is not None:
                        stream, data = msg["out"]
                        cb(stream, base64.b64decode(data))
                    continue
                self.pending.pop(msg["id"], None)
                if not fut.done():
                    fut.set_result(msg)
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass
        finally:
            rc = await self._wait_exit()
            self.dead = f"the isolate worker exited ({rc}){self._last_error()}"
            for fut, _ in self.pending.values():
                if not fut.done():
                    fut.set_exception(_WorkerDied(self.dead))
            self.pending.clear()

    async def _wait_exit(self):
        try:
            return await asyncio.wait_for(self.proc.wait(), 5)
        except (asyncio.TimeoutError, TimeoutError):
            self.kill()
            return await self.proc.wait()

    def _last_error(self) -> str:
        try:
            lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines()]
        except OSError:
            return ""
        for ln in lines:
            if "Fatal" in ln or "out of memory" in ln.lower():
                return ": " + ln.strip("# ")[:200]
        return ""

    def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    async def call(self, op: str, *, on_output: OutputCallback | None = None, timeout: float | None = None,
                   **args) -> object:
        if self.dead:
            raise _WorkerDied(self.dead)
        rid = self.next_id
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = (fut, on_output)
        try:
            self.proc.stdin.write(json.dumps({"id": rid, "op": op, **args}).encode() + b"\n")
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            self.pending.pop(rid, None)
            raise _WorkerDied(self.dead or "the isolate worker is gone") from None
        try:
            msg = await asyncio.wait_for(fut, timeout) if timeout else await fut
        except (asyncio.TimeoutError, TimeoutError):
            # the worker did not answer in time even though it enforces the timeout
            # itself: it is stuck; kill it (its sandboxes fail) rather than wait forever.
            self.kill()
            raise _WorkerDied("the isolate worker stopped responding and was killed") from None
        finally:
            self.pending.pop(rid, None)
        if not msg.get("ok"):
            raise TierError(msg.get("error") or "isolate worker error")
        return msg.get("result")


class IsolateBackend(Backend):
    """The ``isolate`` tier as the daemon uses it: isolates run in worker
    processes (``workers`` of them, sandboxes spread over them), so a fatal V8
    error kills one worker and fails its sandboxes, never the daemon."""

    name = "isolate"

    def __init__(self, root: Path, *, workers: int = 1, python: str | None = None, **options) -> None:
        import sys
        self.root = Path(root)
        self.ws_root = self.root / "workspaces"
        self.nworkers = max(1, workers)
        self.python = python or sys.executable
        self.options = options
        self.max_file_bytes = options.get("max_file_bytes", 64 << 20)
        self.grace_s = options.get("grace_s", 1.0)
        self._workers: list[_Worker] = []
        self._where: dict[str, _Worker] = {}
        self._failed: dict[str, str] = {}
        self._spawn_lock = asyncio.Lock()
        self._seq = 0

    # -- workers -------------------------------------------------------------------------------
    async def _pick(self) -> _Worker:
        async with self._spawn_lock:
            self._workers = [w for w in self._workers if not w.dead]
            if len(self._workers) < self.nworkers:
                self._workers.append(await self._spawn())
            return min(self._workers, key=lambda w: len(w.ids))

    async def _spawn(self) -> _Worker:
        self.root.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        log_path = self.root / f"worker-{os.getpid()}-{self._seq}.log"
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "sandboxd.tiers.isolate", "--worker", str(self.root),
                "--options", json.dumps(self.options),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                limit=_LINE_LIMIT, env=env, start_new_session=True)
        w = _Worker(proc, log_path)
        try:
            if await w.call("ping", timeout=30) != "pong":
                raise _WorkerDied("bad handshake")
        except BaseException as e:
            w.kill()
            raise TierError(f"cannot start an isolate worker: {e}") from None
        return w

    def _worker_of(self, sandbox_id: str) -> _Worker:
        if sandbox_id in self._failed:
            raise TierError(f"sandbox {sandbox_id} failed: {self._failed[sandbox_id]}; destroy it")
        w = self._where.get(sandbox_id)
        if w is None:
            raise TierError(f"no running isolate sandbox {sandbox_id!r}")
        if w.dead:
            self._fail_all(w)
            raise TierError(f"sandbox {sandbox_id} failed: {w.dead}; destroy it")
        return w

    def _fail_all(self, w: _Worker) -> None:
        for sid in list(w.ids):
            self._failed[sid] = w.dead or "the isolate worker died"
            self._where.pop(sid, None)
        w.ids.clear()

    # -- Backend ---------------------------------------------------------------------------------
    async def create(self, spec: SandboxSpec, egress: Egress) -> None:
        await self._start("create", spec, egress)

    async def resume(self, spec: SandboxSpec, egress: Egress, snapshot_dir: Path) -> None:
        await self._start("resume", spec, egress, snapshot_dir=str(snapshot_dir))

    async def _start(self, op: str, spec: SandboxSpec, egress: Egress, **extra) -> None:
        if spec.id in self._where:
            raise TierError(f"sandbox {spec.id} already exists")
        w = await self._pick()
        w.ids.add(spec.id)
        try:
            await w.call(op, spec=_spec_to_dict(spec), egress=_egress_to_dict(egress), timeout=60, **extra)
        except _WorkerDied as e:
            w.ids.discard(spec.id)
            if _ID_RE.match(spec.id):
                _rmtree(self.ws_root / spec.id)
            raise TierError(f"sandbox {spec.id}: {e}") from None
        except BaseException:
            w.ids.discard(spec.id)
            raise
        self._failed.pop(spec.id, None)
        self._where[spec.id] = w

    async def exec(self, sandbox_id: str, command: list[str] | str, *, timeout_s: float,
                   on_output: OutputCallback, stdin: bytes | None = None,
                   env: Mapping[str, str] | None = None) -> ExecResult:
        w = self._worker_of(sandbox_id)
        t0 = time.monotonic()
        guard = max(0.0, float(timeout_s or 0)) or 3600.0
        try:
            r = await w.call("exec", on_output=on_output, timeout=guard + 4 * self.grace_s + 10,
                             sid=sandbox_id, command=command, timeout_s=timeout_s,
                             stdin=base64.b64encode(stdin).decode() if stdin is not None else None,
                             env=dict(env) if env is not None else None)
        except _WorkerDied as e:
            self._fail_all(w)
            self._failed[sandbox_id] = str(e)
            on_output("stderr", f"error: {e}; this sandbox failed\n".encode())
            return ExecResult(exit_code=1, timed_out=False, duration_s=time.monotonic() - t0)
        return ExecResult(exit_code=int(r["exit_code"]), timed_out=bool(r["timed_out"]),
                          duration_s=float(r["duration_s"]))

    async def sleep(self, sandbox_id: str, snapshot_dir: Path) -> None:
        w = self._worker_of(sandbox_id)
        try:
            await w.call("sleep", sid=sandbox_id, snapshot_dir=str(snapshot_dir), timeout=120)
        except _WorkerDied as e:
            self._fail_all(w)
            raise TierError(f"sandbox {sandbox_id}: {e}") from None
        w.ids.discard(sandbox_id)
        self._where.pop(sandbox_id, None)

    async def destroy(self, sandbox_id: str) -> None:
        w = self._where.pop(sandbox_id, None)
        self._failed.pop(sandbox_id, None)
        if w is not None:
            w.ids.discard(sandbox_id)
            if not w.dead:
                try:
                    await w.call("destroy", sid=sandbox_id, timeout=30)
                except (_WorkerDied, TierError):
                    pass
        if _ID_RE.match(sandbox_id or ""):
            _rmtree(self.ws_root / sandbox_id)

    async def adopt_or_clean(self, known_ids: set[str]) -> set[str]:
        """Isolates live only in worker processes of this daemon (they exit with it):
        nothing is adopted; workspaces of unknown ids are removed."""
        _clean_workspaces(self.ws_root, set(known_ids) | set(self._where))
        return set()

    async def put_file(self, sandbox_id: str, path: str, data: bytes) -> None:
        self._worker_of(sandbox_id)
        _put_file(self.ws_root / sandbox_id, path, data, self.max_file_bytes)

    async def get_file(self, sandbox_id: str, path: str) -> bytes:
        self._worker_of(sandbox_id)
        return _get_file(self.ws_root / sandbox_id, path, self.max_file_bytes)

    async def list_files(self, sandbox_id: str, path: str = ".") -> list[dict]:
        self._worker_of(sandbox_id)
        return _list_files(self.ws_root / sandbox_id, path)

    async def close(self) -> None:
        """Stop the workers (their isolates go with them)."""
        for w in self._workers:
            try:
                w.proc.stdin.close()
            except Exception:  # noqa: BLE001
                pass
        for w in self._workers:
            try:
                await asyncio.wait_for(w.proc.wait(), 5)
            except (asyncio.TimeoutError, TimeoutError):
                w.kill()
                await w.proc.wait()
            w.reader.cancel()
        self._workers = []

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if not w.dead]


async def _worker_main(root: Path, options: dict) -> None:
    import sys
    backend = InProcessIsolateBackend(root, **options)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    tasks: set[asyncio.Task] = set()

    def send(obj: dict) -> None:
        out.write(json.dumps(obj).encode() + b"\n")
        out.flush()

    async def handle(msg: dict) -> None:
        rid, op = msg.get("id"), msg.get("op")
        try:
            if op == "ping":
                result = "pong"
            elif op == "create":
                await backend.create(_spec_from_dict(msg["spec"]), _egress_from_dict(msg["egress"]))
                result = None
            elif op == "resume":
                await backend.resume(_spec_from_dict(msg["spec"]), _egress_from_dict(msg["egress"]),
                                     Path(msg["snapshot_dir"]))
                result = None
            elif op == "exec":
                stdin = base64.b64decode(msg["stdin"]) if msg.get("stdin") is not None else None
                r = await backend.exec(
                    msg["sid"], msg["command"], timeout_s=msg["timeout_s"], stdin=stdin, env=msg.get("env"),
                    on_output=lambda s, d: send({"id": rid, "out": [s, base64.b64encode(d).decode()]}))
                result = {"exit_code": r.exit_code, "timed_out": r.timed_out, "duration_s": r.duration_s}
            elif op == "sleep":
                await backend.sleep(msg["sid"], Path(msg["snapshot_dir"]))
                result = None
            elif op == "destroy":
                await backend.destroy(msg["sid"])
                result = None
            else:
                raise TierError(f"unknown operation {op!r}")
            send({"id": rid, "ok": True, "result": result})
        except TierError as e:
            send({"id": rid, "ok": False, "error": str(e)})
        except asyncio.CancelledError:
            send({"id": rid, "ok": False, "error": "cancelled (sandbox destroyed)"})
        except Exception as e:  # noqa: BLE001
            send({"id": rid, "ok": False, "error": f"internal error: {e.__class__.__name__}"})

    while True:
        line = await reader.readline()
        if not line:
            break  # the daemon is gone: so are we
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        t = asyncio.create_task(handle(msg))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    for sid in list(backend._boxes):
        await backend.destroy(sid)


if __name__ == "__main__":
    import argparse
    import sys
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--options", default="{}")
    a = ap.parse_args()
    asyncio.run(_worker_main(Path(a.worker), json.loads(a.options)))
    sys.exit(0)
