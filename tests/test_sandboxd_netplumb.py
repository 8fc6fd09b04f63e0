"""sandboxd.netplumb: forced egress for process sandboxes, against a REAL gateway.

Layout (X random per run, so runs do not collide; the test's own nft table
and interface prefix are random too)::

    host namespace                                   netns <prefix>-<id>   (the sandbox)
      gateway: explicit  H:P, transparent H:T        eth0  S  default via H
      DNS stub           H:D
      <prefix><key>  H   <------------------------->
      egtt<rand>h    10.234.X.9  <-->  netns egtt-<rand>  10.234.X.10   (the "other"
                                       default via .9; listener TCP/UDP + nft counter)   destination)
      upstreams on 127.0.0.1

The sandbox host veth gets ``forwarding=1`` (that interface only), so that
without the host-side rules a packet to the other namespace WOULD be forwarded:
only the rules stop it. All traffic stays on loopback and on the veths this
module creates; everything is removed in teardown, also on failure.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandboxd import dnsstub, netplumb
from tests.support.gateway import GatewayProc, start_gateway
from tests.support.netns import SANDBOX_POLICY, _subnet_in_use, missing_prerequisites
from tests.support.procs import Upstreams, free_port, start_upstreams

pytestmark = pytest.mark.netns

TENANT = "sbx"
SANDBOX_ID = "sb-netplumb-1"

POLICY = SANDBOX_POLICY

LISTENER = textwrap.dedent("""
    import json, socket, sys, threading
    log = open(sys.argv[1], "a", buffering=1)
    host = sys.argv[2]
    def note(**kw):
        log.write(json.dumps(kw) + "\\n")
    def tcp(port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port)); s.listen(16)
        while True:
            c, a = s.accept(); note(proto="tcp", port=port, peer=a[0]); c.close()
    def udp(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, port))
        while True:
            d, a = s.recvfrom(4096); note(proto="udp", port=port, peer=a[0], n=len(d))
    ports = [int(p) for p in sys.argv[3:]]
    for p in ports:
        threading.Thread(target=tcp, args=(p,), daemon=True).start()
        threading.Thread(target=udp, args=(p,), daemon=True).start()
    note(proto="ready")
    threading.Event().wait()
""")

# a client run inside the sandbox: one probe, result as JSON
PROBE = textwrap.dedent("""
    import json, socket, struct, sys, time
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    extra = sys.argv[4] if len(sys.argv) > 4 else ""
    out = {"kind": kind}
    try:
        if kind == "tcp":
            s = socket.create_connection((host, port), timeout=3)
            out["connected"] = True
            s.sendall(b"SSH-2.0-sandbox-probe\\r\\n")
            s.settimeout(4)
            got = b""
            try:
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        out["closed"] = True
                        break
                    got += chunk
            except socket.timeout:
                out["closed"] = False
            except ConnectionResetError:
                out["closed"] = True
            out["received"] = got.decode("latin-1")
        elif kind == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            if extra:
                s.bind((extra, 0))
            for _ in range(3):
                s.sendto(b"exfil-" + b"x" * 50, (host, port))
            s.settimeout(1)
            try:
                out["reply"] = s.recv(4096).hex()
            except (socket.timeout, ConnectionRefusedError) as e:
                out["reply"] = None
        elif kind == "icmp":
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            body = b"\\x08\\x00\\x00\\x00\\x12\\x34\\x00\\x01" + b"ping" * 8
            csum = 0
            for i in range(0, len(body), 2):
                csum += (body[i] << 8) + body[i + 1]
            csum = (csum >> 16) + (csum & 0xFFFF); csum = ~(csum + (csum >> 16)) & 0xFFFF
            pkt = body[:2] + struct.pack("!H", csum) + body[4:]
            for _ in range(3):
                s.sendto(pkt, (host, 0))
            s.settimeout(1.5)
            replies = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:
                try:
                    data, a = s.recvfrom(4096)
                except socket.timeout:
                    break
                if data[20] == 0:  # echo reply
                    replies.append(a[0])
            out["replies"] = replies
        elif kind == "tcp6":
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.settimeout(3)
            s.connect((host, port))
            out["connected"] = True
        elif kind == "dns":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(3)
            s.sendto(bytes.fromhex(extra), (host, port))
            out["reply"] = s.recv(4096).hex()
        elif kind == "dnstcp":
            q = bytes.fromhex(extra)
            s = socket.create_connection((host, port), timeout=3)
            s.sendall(struct.pack("!H", len(q)) + q)
            n = struct.unpack("!H", s.recv(2))[0]
            data = b""
            while len(data) < n:
                data += s.recv(n - len(data))
            out["reply"] = data.hex()
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
""")


def run(args, *, input=None, check=True, timeout=20):
    r = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


def _pick_base() -> ipaddress.IPv4Network:
    for _ in range(50):
        net = ipaddress.ip_network(f"10.234.{secrets.randbelow(256)}.0/24")
        if not _subnet_in_use(net):
            return net
    raise RuntimeError("no free 10.234.X.0/24 for the test")


@dataclass
class Target:
    """Another network namespace with a listener: what the sandbox must never reach."""
    netns: str
    veth: str
    host_ip: str
    ip: str
    log: Path
    ports: list[int]
    proc: subprocess.Popen | None = None

    def events(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def hits(self, since: int = 0) -> list[dict]:
        return [e for e in self.events() if e["proto"] != "ready"][since:]

    def packets_from(self, source: str) -> int:
        r = run(["ip", "netns", "exec", self.netns, "nft", "-j", "list", "counter", "ip", "tgt", "from_sandbox"])
        for item in json.loads(r.stdout)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise AssertionError("no counter")


def make_target(base: ipaddress.IPv4Network, tmp: Path, sandbox_net: str, ports: list[int]) -> Target:
    tag = secrets.token_hex(3)
    sub = list(base.subnets(new_prefix=30))[2]
    h, t = [str(a) for a in sub.hosts()]
    tg = Target(f"egtt-{tag}", f"egtt{tag}h", h, t, tmp / f"target-{tag}.log", ports)
    try:
        _setup_target(tg, sandbox_net)
    except BaseException:
        remove_target(tg)
        raise
    return tg


def _setup_target(tg: Target, sandbox_net: str) -> None:
    h, t, ports = tg.host_ip, tg.ip, tg.ports
    run(["ip", "netns", "add", tg.netns])
    run(["ip", "link", "add", tg.veth, "type", "veth", "peer", "name", "eth0", "netns", tg.netns])
    run(["ip", "addr", "add", f"{h}/30", "dev", tg.veth])
    run(["ip", "link", "set", tg.veth, "up"])
    run(["ip", "-n", tg.netns, "-batch", "-"], input=f"link set lo up\naddr add {t}/30 dev eth0\nlink set eth0 up\n"
                                                      f"route add default via {h}\n")
    run(["ip", "netns", "exec", tg.netns, "nft", "-f", "-"], input=f"""
table ip tgt {{
  counter from_sandbox {{ }}
  chain input {{ type filter hook input priority filter; policy accept;
    ip saddr {sandbox_net} counter name from_sandbox
  }}
}}
""")
    tg.proc = subprocess.Popen(["ip", "netns", "exec", tg.netns, sys.executable, "-c", LISTENER, str(tg.log), t,
                                *map(str, ports)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not any(e["proto"] == "ready" for e in tg.events()):
        if time.monotonic() > deadline or tg.proc.poll() is not None:
            raise RuntimeError("target listener did not start")
        time.sleep(0.05)


def remove_target(tg: Target) -> None:
    if tg.proc is not None and tg.proc.poll() is None:
        tg.proc.kill()
        tg.proc.wait(timeout=5)
    run(["ip", "link", "del", tg.veth], check=False)
    run(["ip", "netns", "del", tg.netns], check=False)


@dataclass
class Env:
    net: netplumb.SandboxNet
    gw: GatewayProc
    ups: Upstreams
    stub: dnsstub.DnsStub
    target: Target
    base: ipaddress.IPv4Network
    table: str
    prefix: str
    tmp: Path

    def run_in(self, args, timeout=30, **kw) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        return subprocess.run(self.net.exec_args(args), capture_output=True, text=True, timeout=timeout, env=env,
                              **kw)

    def probe(self, kind: str, host: str, port: int = 0, extra: str = "") -> dict:
        r = self.run_in([sys.executable, "-c", PROBE, kind, host, str(port), extra])
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def curl(self, *args: str) -> subprocess.CompletedProcess:
        return self.run_in(["curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *args])

    def decisions(self, path: str) -> list[dict]:
        return [e for e in self.gw.audit_events() if e.get("event") == "decision"
                and e.get("request", {}).get("path") == path]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    why = missing_prerequisites()
    if why:
        pytest.skip(f"sandboxd netplumb tests: {why}")
    tmp = tmp_path_factory.mktemp("netplumb")
    pol = tmp / "policies"
    pol.mkdir()
    (pol / "10-sandbox.yaml").write_text(POLICY)
    tag = secrets.token_hex(2)
    prefix, table = f"t{tag}", f"egress_sandboxd_t{tag}"
    base = _pick_base()
    sb_subnet = str(list(base.subnets(new_prefix=30))[0])
    ports = netplumb.GatewayPorts(free_port(), free_port(), free_port())
    net = gw = ups = stub = target = None
    resolv_dir = Path("/etc/netns") / f"{prefix}-{SANDBOX_ID}"
    etc_netns_existed = resolv_dir.parent.exists()
    try:
        net = netplumb.SandboxNet.create(SANDBOX_ID, sb_subnet, ports, table=table, prefix=prefix)
        # the sandbox's host end may forward (that interface only): only the rules stop forwarding
        Path(f"/proc/sys/net/ipv4/conf/{net.veth_host}/forwarding").write_text("1")
        resolv_dir.mkdir(parents=True, exist_ok=True)  # `ip netns exec` bind-mounts it over /etc/resolv.conf
        (resolv_dir / "resolv.conf").write_text(net.resolv_conf())
        target = make_target(base, tmp, sb_subnet, [free_port(), free_port(), 53])
        ups = start_upstreams(tmp / "up")
        stub = dnsstub.DnsStub(net.host_ip, ports.dns_port, net.host_ip).start()
        gw = start_gateway(tmp, pol, listen_host=net.host_ip, proxy_port=ports.proxy_port,
                           transparent=(net.host_ip, ports.transparent_port),
                           hosts={"upstream.test": "127.0.0.1"}, upstream_ca=[ups.ca.cert])
        status, out = gw.admin("POST", "/v1/bindings", {"address": net.sandbox_ip, "tenant": TENANT,
                                                         "agent": SANDBOX_ID})
        assert status in (200, 201), out
        yield Env(net, gw, ups, stub, target, base, table, prefix, tmp)
    finally:
        for thing in (gw, ups, stub):
            if thing is not None:
                try:
                    thing.stop()
                except Exception:
                    pass
        if target is not None:
            remove_target(target)
        if resolv_dir.exists():
            (resolv_dir / "resolv.conf").unlink(missing_ok=True)
            resolv_dir.rmdir()
            if not etc_netns_existed:
                resolv_dir.parent.rmdir()
        problems = []
        if net is not None:
            try:
                net.destroy()
            except netplumb.NetPlumbError as e:
                problems.append(str(e))
        left = netplumb.list_leftovers(prefix, table)
        problems += netplumb.cleanup(left.values(), table=table, prefix=prefix)
        netplumb.delete_table(table)
        assert not left and not problems, f"teardown incomplete: {left} {problems}"


# -- layout ----------------------------------------------------------------------------------------

def test_layout(env):
    n = env.net
    assert n.netns == f"{env.prefix}-{SANDBOX_ID}" and len(n.veth_host) <= 15
    routes = env.run_in(["ip", "-4", "route"]).stdout
    assert f"default via {n.host_ip} dev eth0" in routes
    assert env.run_in(["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"]).stdout.strip() == "1"
    assert env.run_in(["cat", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"]).stdout.strip() == "1"
    assert Path(f"/proc/sys/net/ipv6/conf/{n.veth_host}/disable_ipv6").read_text().strip() == "1"
    assert "inet6" not in env.run_in(["ip", "addr"]).stdout
    # the rules live in the host namespace; the sandbox's namespace has none
    assert env.run_in(["nft", "list", "ruleset"]).stdout.strip() == ""
    assert n.veth_host in run(["nft", "list", "table", "inet", env.table]).stdout


def test_target_listener_is_reachable_without_the_sandbox(env):
    """Control: from the host namespace the other namespace's listener does see TCP and UDP."""
    import socket
    before = len(env.target.hits())
    with socket.create_connection((env.target.ip, env.target.ports[0]), timeout=3):
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"control", (env.target.ip, env.target.ports[1]))
    deadline = time.monotonic() + 3
    while len(env.target.hits()) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    protos = sorted(e["proto"] for e in env.target.hits()[before:])
    assert protos == ["tcp", "udp"], env.target.hits()
    # and the kernel WOULD forward sandbox traffic there (only the rules stop it)
    r = run(["ip", "route", "get", env.target.ip, "from", env.net.sandbox_ip, "iif", env.net.veth_host])
    assert f"dev {env.target.veth}" in r.stdout, r.stdout


# -- the allowed paths -------------------------------------------------------------------------------

def test_explicit_proxy_with_token_is_allowed(env):
    token = env.gw.mint(TENANT, "explicit-agent")
    proxy = f"http://x:{token}@{env.net.host_ip}:{env.net.ports.proxy_port}"
    r = env.curl("-x", proxy, f"http://upstream.test:{env.ups.http_port}/echo/np-explicit")
    body, _, code = r.stdout.rpartition("\n")
    assert code == "200", (r.stdout, r.stderr)
    assert json.loads(body)["path"] == "/echo/np-explicit"
    ev = env.decisions("/echo/np-explicit")[-1]
    assert ev["decision"] == "allow" and ev["request"]["mode"] == "explicit"
    assert ev["principal"]["via"] == "token" and ev["principal"]["agent"] == "explicit-agent"
    # without a token: 407, nothing served
    r = env.curl("-x", f"http://{env.net.host_ip}:{env.net.ports.proxy_port}",
                 f"http://upstream.test:{env.ups.http_port}/echo/np-anon")
    assert r.stdout.rpartition("\n")[2] == "407"
    assert "/echo/np-anon" not in env.ups.stats()["paths"]


def test_noproxy_lands_in_gateway_attributed_to_sandbox(env):
    """curl --noproxy '*' to the 'upstream' (by name through the sandbox DNS,
    and by the other namespace's address): both end in the gateway, decided
    for the binding of the sandbox address; the other namespace sees nothing."""
    before = len(env.target.hits())
    p = env.ups.http_port
    r = env.curl("--noproxy", "*", f"http://upstream.test:{p}/echo/np-dns")
    assert r.stdout.endswith("\n200"), (r.stdout, r.stderr)
    assert ("upstream.test", dnsstub.QTYPE_A) in env.stub.seen
    r = env.curl("--noproxy", "*", "--resolve", f"upstream.test:{p}:{env.target.ip}",
                 f"http://upstream.test:{p}/echo/np-ip")
    assert r.stdout.endswith("\n200"), (r.stdout, r.stderr)
    for path in ("/echo/np-dns", "/echo/np-ip"):
        ev = env.decisions(path)[-1]
        assert ev["decision"] == "allow" and ev["request"]["mode"] == "transparent"
        assert ev["principal"] == {**ev["principal"], "tenant": TENANT, "agent": SANDBOX_ID, "via": "binding"}
        assert ev["source"] == env.net.sandbox_ip and ev["dial"] == "127.0.0.1"
    assert env.target.hits(before) == []
    assert env.target.packets_from(env.net.sandbox_ip) == 0


# -- everything else ---------------------------------------------------------------------------------

def test_direct_tcp_to_other_namespace_never_arrives(env):
    before = len(env.target.hits())
    out = env.probe("tcp", env.target.ip, env.target.ports[0])
    # redirected into the gateway, which closes a non-HTTP connection without dialing
    assert out.get("received", "") == "", out
    n_before = len(env.gw.audit_events())
    out = env.probe("tcp", env.target.ip, 22)
    deadline = time.monotonic() + 5
    while True:
        new = env.gw.audit_events()[n_before:]
        if any(e.get("source") == env.net.sandbox_ip and e.get("decision") == "deny" for e in new):
            break
        assert time.monotonic() < deadline, f"no deny recorded for the redirected connection: {new} {out}"
        time.sleep(0.1)
    assert env.target.hits(before) == []
    assert env.target.packets_from(env.net.sandbox_ip) == 0


def test_gateway_admin_and_host_ports_are_not_reachable(env):
    """TCP to any other host port (even the admin port) is redirected to the transparent listener."""
    for port in (env.gw.admin_port, env.ups.http_port):
        out = env.probe("tcp", env.net.host_ip, port)
        assert "HTTP/1.1 200" not in out.get("received", ""), out
    r = env.curl("--noproxy", "*", f"http://{env.net.host_ip}:{env.gw.admin_port}/readyz")
    assert not r.stdout.endswith("\n200") or "decision" in r.stdout


def test_udp_is_dropped(env):
    before_hits, c0 = len(env.target.hits()), env.net.counters()
    out = env.probe("udp", env.target.ip, env.target.ports[1])
    assert out["reply"] is None, out
    out = env.probe("udp", env.net.host_ip, env.target.ports[1])
    assert out["reply"] is None, out
    time.sleep(0.3)
    c1 = env.net.counters()
    assert c1["fwd"] >= c0["fwd"] + 3, (c0, c1)  # to the other namespace: forward chain drop
    assert c1["udp"] >= c0["udp"] + 3, (c0, c1)  # to the host: input chain drop
    assert env.target.hits(before_hits) == []
    assert env.target.packets_from(env.net.sandbox_ip) == 0


def test_icmp_fails(env):
    c0 = env.net.counters()
    for dest in (env.net.host_ip, env.target.ip):
        out = env.probe("icmp", dest)
        assert "error" not in out and out["replies"] == [], out
    c1 = env.net.counters()
    assert c1["icmp"] >= c0["icmp"] + 3 and c1["fwd"] >= c0["fwd"] + 3, (c0, c1)
    assert env.target.packets_from(env.net.sandbox_ip) == 0


def test_ipv6_fails(env):
    out = env.probe("tcp6", "::1", env.net.ports.transparent_port)
    assert "error" in out, out
    out = env.probe("tcp6", "fd00::1", 80)
    assert "error" in out, out


def test_dns_answers_only_the_gateway_and_nothing_leaves(env):
    before = len(env.target.hits())
    label = secrets.token_hex(24)  # 48 chars of "data"
    name = f"{label}.{secrets.token_hex(8)}.exfil.example"
    q = dnsstub.build_query(name).hex()
    for dest in (env.net.host_ip, env.target.ip):  # a hard-coded resolver is redirected too
        for kind in ("dns", "dnstcp"):
            out = env.probe(kind, dest, 53, q)
            assert "error" not in out, out
            reply = bytes.fromhex(out["reply"])
            rcode = reply[3] & 0xF
            if rcode == 0:
                assert reply[-4:] == bytes(map(int, env.net.host_ip.split("."))), out
            else:
                assert rcode == dnsstub.RCODE_REFUSED
    assert sum(1 for n, _ in env.stub.seen if n == name) == 4
    # too long (max_name_len 100): refused
    long_name = ".".join(secrets.token_hex(30) for _ in range(3)) + ".example"
    out = env.probe("dns", env.net.host_ip, 53, dnsstub.build_query(long_name).hex())
    assert bytes.fromhex(out["reply"])[3] & 0xF == dnsstub.RCODE_REFUSED
    # other types: refused; AAAA: empty
    out = env.probe("dns", env.net.host_ip, 53, dnsstub.build_query("x.example", 16).hex())
    assert bytes.fromhex(out["reply"])[3] & 0xF == dnsstub.RCODE_REFUSED
    out = env.probe("dns", env.net.host_ip, 53, dnsstub.build_query("x.example", 28).hex())
    r = bytes.fromhex(out["reply"])
    assert r[3] & 0xF == 0 and r[6:8] == b"\x00\x00"
    assert env.target.hits(before) == []
    assert env.target.packets_from(env.net.sandbox_ip) == 0


def test_root_inside_cannot_open_anything(env):
    """As root in the sandbox netns: flush nft, replace the default route,
    add another (spoofed) address, re-enable IPv6: the host-side rules still hold."""
    n = env.net
    before, c0 = len(env.target.hits()), n.counters()
    spoof = str(list(env.base.subnets(new_prefix=30))[7][2])  # e.g. another sandbox's address
    mac = Path(f"/sys/class/net/{n.veth_host}/address").read_text().strip()
    # on-link routes + a static neighbour entry: packets really leave eth0 (no ARP needed)
    script = (f"nft flush ruleset; ip route replace default dev eth0; ip addr add {spoof}/32 dev eth0;"
              f"ip route add {env.target.ip}/32 dev eth0 src {spoof};"
              f"ip neigh replace {env.target.ip} lladdr {mac} dev eth0 nud permanent;"
              "echo 0 > /proc/sys/net/ipv6/conf/all/disable_ipv6; echo 0 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6;"
              "ip -6 addr add fd77::2/64 dev eth0 nodad; ip -6 route add default dev eth0")
    r = env.run_in(["sh", "-c", script])
    assert r.returncode == 0, r.stderr
    try:
        out = env.probe("udp", env.target.ip, env.target.ports[1])
        assert out["reply"] is None
        out = env.probe("udp", env.target.ip, env.target.ports[1], spoof)
        assert out["reply"] is None
        out = env.probe("tcp", env.target.ip, env.target.ports[0])
        assert out.get("received", "") == "", out
        out = env.probe("tcp6", "fd77::1", 80)
        assert "error" in out, out
        time.sleep(0.3)
        c1 = n.counters()
        assert c1["spoof"] >= c0["spoof"] + 3, (c0, c1)
        assert env.target.hits(before) == []
        assert env.target.packets_from(n.sandbox_ip) == 0
        # the explicit proxy is still the way out
        token = env.gw.mint(TENANT, "after-tamper")
        r = env.curl("-x", f"http://x:{token}@{n.host_ip}:{n.ports.proxy_port}",
                     f"http://upstream.test:{env.ups.http_port}/echo/np-after")
        assert r.stdout.endswith("\n200"), r.stdout
    finally:
        env.run_in(["sh", "-c", f"ip addr del {spoof}/32 dev eth0; ip route del {env.target.ip}/32;"
                                f"ip neigh del {env.target.ip} dev eth0;"
                                "ip route replace default via " + n.host_ip + " dev eth0;"
                                "ip -6 addr flush dev eth0; echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6;"
                                "echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6"])


# -- lifecycle -----------------------------------------------------------------------------------------

def test_destroy_and_leftovers_after_a_crash(env):
    subnets = list(env.base.subnets(new_prefix=30))
    ports = netplumb.GatewayPorts(3128, 3129, 5353)
    a = netplumb.SandboxNet.create("crash-a", str(subnets[4]), ports, table=env.table, prefix=env.prefix)
    b = netplumb.SandboxNet.create("crash-b", str(subnets[5]), ports, table=env.table, prefix=env.prefix)
    # create again with the same id: the leftover is replaced, not duplicated
    a = netplumb.SandboxNet.create("crash-a", str(subnets[4]), ports, table=env.table, prefix=env.prefix)
    # a "crash" half-way: b's namespace disappears, its rules stay
    run(["ip", "netns", "del", b.netns])
    left = netplumb.list_leftovers(env.prefix, env.table)
    ids = {lo.sandbox_id for lo in left.values()}
    assert {"crash-a", SANDBOX_ID} <= ids
    lb = left[netplumb.key_of("crash-b")]
    assert lb.netns is None and lb.nft  # id unknown without netns/veth, found by key
    # a restarted daemon adopts the complete one, refuses the broken one
    again = netplumb.SandboxNet.attach("crash-a", str(subnets[4]), ports, table=env.table, prefix=env.prefix)
    assert again.sandbox_ip == a.sandbox_ip and again.veth_host == a.veth_host
    with pytest.raises(netplumb.NetPlumbError, match="netns"):
        netplumb.SandboxNet.attach("crash-b", str(subnets[5]), ports, table=env.table, prefix=env.prefix)
    alive, problems = netplumb.cleanup_unknown({SANDBOX_ID, "crash-a"}, prefix=env.prefix, table=env.table)
    assert alive == {SANDBOX_ID, "crash-a"} and problems == []
    left = netplumb.list_leftovers(env.prefix, env.table)
    assert set(left) == {netplumb.key_of(SANDBOX_ID), netplumb.key_of("crash-a")}
    a.destroy()
    a.destroy()  # idempotent
    left = netplumb.list_leftovers(env.prefix, env.table)
    assert set(left) == {netplumb.key_of(SANDBOX_ID)}
    assert run(["ip", "link", "show", a.veth_host], check=False).returncode != 0
    assert a.netns not in run(["ip", "netns", "list"]).stdout
    # the live sandbox still works
    assert env.curl("-x", f"http://x:{env.gw.mint(TENANT, 'a2')}@{env.net.host_ip}:{env.net.ports.proxy_port}",
                    f"http://upstream.test:{env.ups.http_port}/echo/np-still").stdout.endswith("\n200")


def test_veth_without_rules_is_dropped(env):
    """Fail closed: an interface named like a sandbox veth but without rules
    (e.g. half-way through create, or rules lost) has everything dropped."""
    tag = secrets.token_hex(2)
    ns, host_if = f"egtc-{tag}", f"{env.prefix}zz{tag}"
    sub = list(env.base.subnets(new_prefix=30))[12]
    h, c = [str(a) for a in sub.hosts()]
    try:
        run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "addr", "add", f"{h}/30", "dev", host_if])
        Path(f"/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6").write_text("1")
        Path(f"/proc/sys/net/ipv4/conf/{host_if}/forwarding").write_text("1")
        run(["ip", "link", "set", host_if, "up"])
        run(["ip", "-n", ns, "-batch", "-"], input=f"link set lo up\naddr add {c}/30 dev eth0\nlink set eth0 up\n"
                                                    f"route add default via {h}\n")
        before = len(env.target.hits())
        env_ = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        for kind, dest, port in (("udp", env.target.ip, env.target.ports[1]), ("tcp", env.target.ip,
                                                                                  env.target.ports[0]),
                                 ("tcp", h, env.gw.proxy_port), ("udp", h, 53)):
            r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, kind, dest, str(port)],
                               capture_output=True, text=True, timeout=30, env=env_)
            out = json.loads(r.stdout)
            assert not out.get("connected") and not out.get("reply"), out
        assert env.target.hits(before) == []
        chain = run(["nft", "list", "chain", "inet", env.table, "pre_guard"]).stdout
        m = [line for line in chain.splitlines() if f'"{env.prefix}*"' in line]
        assert m and "packets 0 " not in m[0], chain
    finally:
        run(["ip", "link", "del", host_if], check=False)
        run(["ip", "netns", "del", ns], check=False)


def test_subnet_pool_skips_addresses_in_use(env):
    pool = netplumb.SubnetPool(str(env.base))
    first, second = pool.allocate(), pool.allocate()
    taken = {env.net.subnet, str(list(env.base.subnets(new_prefix=30))[2])}  # the sandbox's and the target's
    assert first != second and not ({first, second} & taken), (first, second)
    pool.release(first)
    assert pool.allocate() == first
    with pytest.raises(netplumb.NetPlumbError):
        netplumb.SubnetPool("8.8.8.0/24")  # not private: refused (nothing is sent)


def test_failed_create_leaves_nothing(env, monkeypatch):
    with pytest.raises(netplumb.NetPlumbError):
        netplumb.GatewayPorts(0)
    with pytest.raises(netplumb.NetPlumbError):
        netplumb.SandboxNet.create("Bad_Id", "10.234.0.0/30", netplumb.GatewayPorts(3128), table=env.table,
                                   prefix=env.prefix)
    # fail at the last step (inside the namespace), after rules, netns and veth exist
    subnets = list(env.base.subnets(new_prefix=30))
    real = netplumb._run

    def failing(args, **kw):
        if list(args[:3]) == ["ip", "-n", f"{env.prefix}-half-made"]:
            raise netplumb.NetPlumbError("injected failure")
        return real(args, **kw)

    monkeypatch.setattr(netplumb, "_run", failing)
    with pytest.raises(netplumb.NetPlumbError, match="injected"):
        netplumb.SandboxNet.create("half-made", str(subnets[6]), netplumb.GatewayPorts(3128), table=env.table,
                                   prefix=env.prefix)
    monkeypatch.setattr(netplumb, "_run", real)
    assert netplumb.key_of("half-made") not in netplumb.list_leftovers(env.prefix, env.table)
    assert f"{env.prefix}-half-made" not in run(["ip", "netns", "list"]).stdout


def test_create_to_ready_latency(env, capsys):
    subnets = list(env.base.subnets(new_prefix=30))
    ports = netplumb.GatewayPorts(3128, 3129, 5353)
    times = []
    for i in range(30):
        t0 = time.perf_counter()
        sb = netplumb.SandboxNet.create(f"bench-{i}", str(subnets[8 + (i % 4)]), ports, table=env.table,
                                        prefix=env.prefix)
        times.append(time.perf_counter() - t0)
        sb.destroy()
    times.sort()
    p50 = statistics.median(times) * 1000
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000
    with capsys.disabled():
        print(f"\nsandbox net create-to-ready over {len(times)}: p50 {p50:.1f} ms, p99 {p99:.1f} ms,"
              f" min {times[0] * 1000:.1f} ms")
    (env.tmp.parent / "netplumb-latency.json").write_text(json.dumps({"p50_ms": p50, "p99_ms": p99}))
    assert p50 <= 100, f"p50 {p50:.1f} ms"


# -- the DNS stub's core, without namespaces -------------------------------------------------------

def test_dnsstub_answer_core():
    a = dnsstub.answer(dnsstub.build_query("Upstream.Test"), "10.0.0.1")
    assert a[:2] == b"\x12\x34" and a[3] & 0xF == 0 and a[6:8] == b"\x00\x01" and a[-4:] == bytes([10, 0, 0, 1])
    # malformed / hostile input: never an exception, never an answer carrying data
    for q in (b"", b"\x00" * 11, b"\x12\x34\x81\x00" + b"\x00" * 8,  # a response, not a query
              dnsstub.build_query("a.b")[:-3],  # truncated
              b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # pointer loop
              b"\x12\x34\x01\x00\x00\x02" + b"\x00" * 6):  # two questions
        r = dnsstub.answer(q, "10.0.0.1")
        assert r is None or (r[3] & 0xF) == dnsstub.RCODE_FORMERR
    for _ in range(200):
        q = bytearray(dnsstub.build_query(secrets.token_hex(8) + ".x"))
        q[secrets.randbelow(len(q))] = secrets.randbelow(256)
        r = dnsstub.answer(bytes(q), "10.0.0.1")
        assert r is None or len(r) <= len(q) + 16
