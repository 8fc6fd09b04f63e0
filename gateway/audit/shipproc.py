"""The shipper as a separate process: sinks never run in the proxy's process.

The gateway process only appends to the spool. A child process (this module,
``python -m gateway.audit.shipproc``) reads the spool, runs one SinkWorker
thread per sink (gateway.audit.shipper) and writes the acknowledgement files.
So a sink's CPU, its TLS handshakes, a hung receiver or a bug in a sink never
take the proxy's event loop or its interpreter lock (measured: in-process sink
threads cost the proxy ~5-8% of its throughput under load; benchmarks/README.md).

Parent <-> child, over pipes (nothing on disk, nothing in argv or the
environment):

* stdin, one JSON line from the parent: the spool directory, the sinks'
  settings and the values of the secret references they use (resolved by the
  parent, which has the secret backends). The child then waits on stdin: EOF
  means the parent is gone, and the child stops (also PR_SET_PDEATHSIG).
* stdout, JSON lines from the child: ``{"event": {...}}`` notable events
  (sink_failure, sink_recovered) that the parent records in the spool (it is the
  spool's only writer), and ``{"stats": {...}}`` once a second for the metrics.

The parent restarts a child that died, with backoff; a child holds an flock on
``acks/.shipper.lock`` so two never deliver for the same spool.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

log = logging.getLogger("egress.audit")

PR_SET_PDEATHSIG = 1
SHIPPER_NICE = 10
REPO_ROOT = Path(__file__).resolve().parents[2]


# -- the parent's side ----------------------------------------------------------------------

class _Stats:
    def __init__(self):
        self.delivered = self.retries = self.failed = 0
        self.up = True
        self.last_delivery = 0.0
        self.last_error = ""


class _SinkRef:
    def __init__(self, name: str, kind: str):
        self.name, self.kind = name, kind


class WorkerView:
    """What the metrics see of one sink delivered by the child."""

    def __init__(self, spool, name: str, kind: str):
        self.spool = spool
        self.sink = _SinkRef(name, kind)
        self.reader = spool.reader(name)  # creates the ack file at the head for a new sink
        self.reader.external = True
        self.stats = _Stats()

    def backlog_bytes(self) -> int:
        self.reader.refresh()
        return self.reader.backlog()

    def backlog_events(self) -> int:
        return max(0, self.spool.seq - self.reader.acked.seq)


class ShipperProcess:
    def __init__(self, spool, sinks_config: tuple[dict, ...], resolve: Callable[[str], str], *,
                 drain: float = 2.0):
        self.spool = spool
        self.drain = drain
        resolved: dict[str, str] = {}

        def capture(ref: str) -> str:
            v = resolve(ref)
            resolved[ref] = v
            return v

        # Build every sink here once, in the parent, to fail at start-up with a clear error
        # (and to resolve the secret references); the child builds them again. Building is
        # idempotent: a file sink's start-up recovery (leftover compression, retention)
        # simply finds nothing left to do the second time.
        built = build_sinks_from(sinks_config, capture)
        self.workers = [WorkerView(spool, s.name, s.kind) for s, _ in built]
        for s, _ in built:
            s.close()
        self._spec = {"dir": str(spool.dir), "sinks": list(sinks_config), "secrets": resolved, "drain": drain}
        self._proc: subprocess.Popen | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        self.restarts = 0

    def start(self) -> "ShipperProcess":
        if self.workers:
            self._monitor = threading.Thread(target=self._run, name="egress-shipper-monitor", daemon=True)
            self._monitor.start()
        return self

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        proc = subprocess.Popen([sys.executable, "-m", "gateway.audit.shipproc"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, preexec_fn=_die_with_parent,
                                close_fds=True)
        proc.stdin.write((json.dumps(self._spec) + "\n").encode())
        proc.stdin.flush()
        return proc

    def _run(self) -> None:
        backoff = 0.5
        while not self._closing:
            started = time.monotonic()
            try:
                with self._lock:
                    if self._closing:
                        return
                    self._proc = proc = self._spawn()
            except OSError as e:
                log.error("cannot start the audit shipper process: %s", e)
                time.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                continue
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "event" in msg:
                    self.spool.write(msg["event"])
                elif "stats" in msg:
                    for w in self.workers:
                        st = msg["stats"].get(w.sink.name)
                        if st:
                            for k in ("delivered", "retries", "failed", "up", "last_delivery", "last_error"):
                                setattr(w.stats, k, st.get(k, getattr(w.stats, k)))
            rc = proc.wait()
            if self._closing:
                return
            self.restarts += 1
            for w in self.workers:
                w.stats.up = False
            log.error("the audit shipper process exited (status %s); restarting", rc)
            self.spool.write({"event": "sink_failure", "sink": "*", "state": "shipper_exited",
                              "error": f"shipper process exited with status {rc}"})
            if time.monotonic() - started > 60:
                backoff = 0.5
            time.sleep(backoff)
            backoff = min(30.0, backoff * 2)

    def stop(self, drain: float | None = None) -> None:
        with self._lock:
            self._closing = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()  # EOF: deliver what is there (up to the drain time), then exit
            except OSError:
                pass
            try:
                proc.wait(timeout=(self.drain if drain is None else drain) + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._monitor is not None:
            self._monitor.join(timeout=5)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


def build_sinks_from(sinks_config, resolve):
    from gateway.audit.config import AuditConfig, build_sinks
    return build_sinks(AuditConfig(sinks=tuple(sinks_config)), resolve)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setpgrp()  # terminal signals (Ctrl-C) go to the gateway, which stops us in order
    try:
        os.nice(SHIPPER_NICE)  # delivery yields the CPU to traffic; the spool absorbs bursts
    except OSError:
        pass


# -- the child's side ------------------------------------------------------------------------

def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s egress.shipper: %(message)s")
    spec = json.loads(sys.stdin.readline())
    out_lock = threading.Lock()
    out = sys.stdout

    def send(obj) -> None:
        data = json.dumps(obj, default=str) + "\n"
        with out_lock:
            try:
                out.write(data)
                out.flush()
            except (OSError, ValueError):
                pass

    from gateway.audit.shipper import Shipper
    from gateway.audit.spool import SpoolView
    d = Path(spec["dir"])
    lock = open(d / "acks" / ".shipper.lock", "a")
    while True:  # a previous shipper may still be draining
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            time.sleep(0.1)
    secrets = spec.get("secrets", {})
    view = SpoolView(d, lambda ev: send({"event": ev}))
    sinks = build_sinks_from(spec["sinks"], lambda ref: secrets[ref])
    shipper = Shipper(view, sinks).start()
    # Plain flags, not an Event: a signal handler must not take a lock the main thread
    # may hold (Event.set from a handler deadlocked against Event.wait here).
    stopping = [False]

    def on_term(*_a) -> None:
        stopping[0] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch_stdin() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        stopping[0] = True

    threading.Thread(target=watch_stdin, daemon=True).start()
    last = time.monotonic()
    while not stopping[0]:
        time.sleep(0.1)
        if time.monotonic() - last >= 1.0:
            last = time.monotonic()
            send({"stats": {w.sink.name: {k: v for k, v in asdict(w.stats).items() if k != "delivery_seconds"}
                            for w in shipper.workers}})
    shipper.stop(drain=float(spec.get("drain", 2.0)))
    send({"stats": {w.sink.name: {k: v for k, v in asdict(w.stats).items() if k != "delivery_seconds"}
                    for w in shipper.workers}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
