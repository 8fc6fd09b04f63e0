"""Fault test: nothing is lost. Under steady load through the real gateway, the
real rsyslog receiving the audit (over RELP, acknowledged) is stopped for a
while and restarted, and the gateway is SIGKILLed once and restarted on the same
state. Afterwards every request a client saw answered has its decision event at
rsyslog exactly once after de-duplication by event id."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import requests

from tests.support.gateway import start_gateway
from tests.support.procs import start_upstreams
from tests.support.rsyslog import Rsyslog, missing_reason
from tests.test_e2e_audit import POLICY


pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=f"real rsyslog needed: {missing_reason()}")


class Load:
    """Client threads sending GET /echo/fault-<thread>-<n> through the gateway, back to
    back; a request counts as answered when the client got a 200."""

    def __init__(self, threads: int = 3):
        self.target = None  # (proxy url, upstream base)
        self.answered: set[str] = set()
        self.attempts = 0
        self.failures = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def start(self):
        for t in self._threads:
            t.start()
        return self

    def _run(self, i: int) -> None:
        n = 0
        s = None
        current = None
        while not self._stop.is_set():
            target = self.target
            if target is None:
                time.sleep(0.02)
                continue
            if target is not current or s is None:
                s = requests.Session()
                s.trust_env = False
                s.proxies = {"http": target[0]}
                current = target
            n += 1
            path = f"/echo/fault-{i}-{n}"
            with self._lock:
                self.attempts += 1
            try:
                r = s.get(target[1] + path, timeout=3)
                if r.status_code == 200:
                    with self._lock:
                        self.answered.add(path)
                else:
                    self.failures += 1
            except requests.RequestException:
                self.failures += 1
                s = None
                time.sleep(0.02)

    def count(self) -> int:
        with self._lock:
            return len(self.answered)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_more(load: Load, n: int, timeout: float = 20) -> None:
    goal = load.count() + n
    deadline = time.monotonic() + timeout
    while load.count() < goal:
        assert time.monotonic() < deadline, f"load stalled at {load.count()} answered requests"
        time.sleep(0.02)


def test_syslog_outage_and_gateway_sigkill_lose_nothing(tmp_path):
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "10-acme.yaml").write_text(POLICY)
    rs = Rsyslog(tmp_path / "rsyslog", relp=True)
    ups = start_upstreams(tmp_path / "up", tls=False)
    try:
        rs.start()
        _run_fault_test(tmp_path, pol, rs, ups)
    finally:
        ups.stop()
        rs.stop()


def _run_fault_test(tmp_path, pol, rs, ups):
    config = {"audit": {"sinks": [{"name": "rsyslog", "type": "relp", "address": f"127.0.0.1:{rs.relp_port}",
                                   "batch_wait": 0.05, "backoff_initial": 0.05, "backoff_max": 0.5}]}}

    started = []

    def start():
        g = start_gateway(tmp_path, pol, hosts={"upstream.test": "127.0.0.1"}, config=config, name="gw")
        started.append(g)
        return g

    try:
        _load_and_faults(rs, ups, start)
    finally:
        for g in started:
            g.stop()


def _load_and_faults(rs, ups, start):
    gw = start()
    token = gw.mint("acme", "loadgen", ttl_seconds=3600)
    base = f"http://upstream.test:{ups.http_port}"
    load = Load().start()
    try:
        load.target = (gw.proxy_url(token), base)
        wait_more(load, 60)
        # 1. the receiver goes away for a while; the gateway keeps answering, spooling
        rs.stop()
        during_outage = load.count()
        time.sleep(2.0)
        wait_more(load, 60)
        assert load.count() > during_outage
        rs.start()
        deadline = time.monotonic() + 20
        while not any(e.get("event") == "sink_recovered" for e in gw.audit_events()):
            assert time.monotonic() < deadline, "the sink did not recover after rsyslog came back"
            time.sleep(0.05)
        wait_more(load, 60)
        # 2. the gateway is killed without warning, and restarted on the same state
        shippers = _children(gw.proc.pid)
        assert shippers, "the gateway runs its sinks in a child process"
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.popen.wait(10)
        deadline = time.monotonic() + 15  # its shipper notices, delivers what it can (2 s), and exits
        while any(_alive(p) for p in shippers):
            assert time.monotonic() < deadline, "the shipper process outlived its gateway"
            time.sleep(0.1)
        before_restart = load.count()
        gw = start()
        load.target = (gw.proxy_url(token), base)
        wait_more(load, 60)
        assert load.count() > before_restart
    finally:
        load.stop()
    answered = set(load.answered)
    # 3. wait for the backlog to drain, then compare with what rsyslog holds
    def delivered() -> dict[str, set[str]]:
        by_path: dict[str, set[str]] = {}
        for rec in rs.records():
            try:
                ev = json.loads(rec["msg"])
            except ValueError:
                continue
            if ev.get("event") == "decision" and ev.get("decision") == "allow":
                by_path.setdefault(ev["request"]["path"], set()).add(ev["id"])
        return by_path

    deadline = time.monotonic() + 60
    while not answered <= set(delivered()) and time.monotonic() < deadline:
        time.sleep(0.2)
    by_path = delivered()
    missing = sorted(answered - set(by_path))
    assert not missing, f"{len(missing)} answered request(s) missing at rsyslog, e.g. {missing[:5]}"
    twice = {p: ids for p, ids in by_path.items() if p in answered and len(ids) != 1}
    assert not twice, f"requests recorded under more than one event id: {list(twice.items())[:3]}"
    present = sum(1 for p in answered if len(by_path.get(p, ())) == 1)
    assert present == len(answered) and len(answered) >= 240
    # the outage was real: the sink failed and recovered, and said so in the trail
    kinds = [json.loads(r["msg"]).get("event") for r in rs.records() if r["msg"].startswith("{")]
    assert "sink_failure" in kinds and "sink_recovered" in kinds
    ids = [json.loads(r["msg"])["id"] for r in rs.records() if r["msg"].startswith("{")]
    print(f"fault test: {len(answered)} answered requests, {load.attempts} attempts, "
          f"{len(ids)} messages at rsyslog, {len(ids) - len(set(ids))} duplicate(s) removed")
