"""Forced egress for process sandboxes: the network half of the ``namespace`` tier.

Every sandbox gets its own network namespace ``<prefix>-<id>`` wired to the host
by a veth pair (host end ``<prefix><key>`` in the host namespace, peer ``eth0``
inside) on a /30 of its own, default route inside via the host end, IPv6
disabled inside. The sandbox's only reachable destinations are the gateway's
explicit proxy port and the DNS answerer on the host end's address; every other
TCP connection is redirected into the gateway's transparent listener (so code
that ignores proxy settings still lands in the gateway, attributed by source
address through a gateway binding the daemon makes for ``SandboxNet.sandbox_ip``);
everything else (UDP, ICMP, IPv6, other protocols, spoofed source addresses,
forwarding to any other interface) is dropped.

All rules live in the HOST namespace, in one nftables table per daemon
(``inet egress_sandboxd``), keyed by the host veth name, so root inside the
sandbox's namespace (changing routes, addresses, re-enabling IPv6, flushing its
own nft ruleset) cannot change them. Layout of the table::

    prerouting filter (priority raw-10): iifname vmap @guard_v -> sb_<key>_guard (anti-spoof, IPv6)
                                         iifname "<prefix>*" drop  (veth without rules)
    prerouting nat   (priority dstnat):  iifname vmap @nat_v   -> sb_<key>_nat
    input filter     (priority filter-10): iifname vmap @in_v -> sb_<key>_input
                                         iifname "<prefix>*" drop
    forward filter   (priority filter-10): iifname vmap @fwd_v -> sb_<key>_fwd (drop)
                                         iifname/oifname "<prefix>*" drop

A drop in any nftables base chain is final whatever other tables say, so the
confinement holds even if another table accepts. Per-sandbox named counters
``sb_<key>_{spoof,ipv6,udp,icmp,tcp,other,fwd}`` count what was dropped.

Names are derived from the sandbox id (``key`` = the first 10 hex digits of
sha256(id)); the host veth carries the id as its alias. A restarted daemon finds
leftovers with ``list_leftovers()`` and removes them with ``cleanup()``. Every
operation is idempotent; a failed ``create`` removes what it made, then raises.

Only ``ip`` (iproute2) and ``nft`` are needed; run as root.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Iterable, Sequence

DEFAULT_PREFIX = "egsb"
DEFAULT_TABLE = "egress_sandboxd"
DEFAULT_POOL = "10.230.0.0/16"
COUNTERS = ("spoof", "ipv6", "udp", "icmp", "tcp", "other", "fwd")

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,4}$")
_TABLE_RE = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


class NetPlumbError(Exception):
    """A plumbing operation failed (one line, for the API caller)."""


@dataclass(frozen=True)
class GatewayPorts:
    """Gateway endpoints the sandbox may reach, all on the host end's address.

    The gateway (or whatever answers there) must listen on that address or a
    wildcard address. ``transparent_port`` 0: other TCP is dropped instead of
    redirected. ``dns_port`` 0: DNS is dropped. DNS to port 53 of ANY address is
    redirected to ``dns_port`` (so a hard-coded resolver gets the gateway's
    answerer, never the outside).
    """
    proxy_port: int
    transparent_port: int = 0
    dns_port: int = 0

    def __post_init__(self) -> None:
        for name in ("proxy_port", "transparent_port", "dns_port"):
            v = getattr(self, name)
            if not isinstance(v, int) or not (0 <= v <= 65535):
                raise NetPlumbError(f"{name} must be a port number, got {v!r}")
        if self.proxy_port == 0:
            raise NetPlumbError("proxy_port is required")


@dataclass(frozen=True)
class Names:
    sandbox_id: str
    key: str
    netns: str
    veth_host: str
    veth_ns: str  # name inside the namespace

    @classmethod
    def of(cls, sandbox_id: str, prefix: str = DEFAULT_PREFIX) -> "Names":
        _check_id(sandbox_id)
        _check_prefix(prefix)
        key = key_of(sandbox_id)
        return cls(sandbox_id, key, f"{prefix}-{sandbox_id}", f"{prefix}{key}", "eth0")

    def chain(self, kind: str) -> str:
        return f"sb_{self.key}_{kind}"

    def counter(self, kind: str) -> str:
        return f"sb_{self.key}_{kind}"


def key_of(sandbox_id: str) -> str:
    return hashlib.sha256(sandbox_id.encode()).hexdigest()[:10]


def _check_id(sandbox_id: str) -> None:
    if not isinstance(sandbox_id, str) or not _ID_RE.match(sandbox_id):
        raise NetPlumbError(f"invalid sandbox id {sandbox_id!r} (lower-case letters, digits, '-', <= 40 chars)")


def _check_prefix(prefix: str) -> None:
    if not _PREFIX_RE.match(prefix or ""):
        raise NetPlumbError(f"invalid prefix {prefix!r} (a letter then up to 4 lower-case letters/digits)")


def _check_table(table: str) -> None:
    if not _TABLE_RE.match(table or ""):
        raise NetPlumbError(f"invalid nft table name {table!r}")


# -- running commands ------------------------------------------------------------------------

def _run(args: Sequence[str], *, input: str | None = None, check: bool = True,
         timeout: float = 20) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetPlumbError(f"{args[0]}: {e}") from e
    if check and r.returncode != 0:
        msg = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise NetPlumbError(f"{' '.join(args[:4])} failed ({r.returncode}): {msg[0] if msg else ''}")
    return r


# The table's base chains are created once; a lock keeps concurrent creates in
# one process from racing on it (nft transactions are atomic across processes).
_table_lock = threading.Lock()


def _base_ruleset(table: str, prefix: str) -> str:
    w = f'"{prefix}*"'
    # `add` is idempotent for tables/chains/maps; the catch-all rules are only
    # added when the chains are (re)created (see ensure_table).
    return f"""
table inet {table} {{
  map guard_v {{ type ifname : verdict; }}
  map nat_v {{ type ifname : verdict; }}
  map in_v {{ type ifname : verdict; }}
  map fwd_v {{ type ifname : verdict; }}
  chain pre_guard {{
    type filter hook prerouting priority raw - 10; policy accept;
    iifname vmap @guard_v
    iifname {w} counter drop comment "sandbox veth without rules"
  }}
  chain pre_nat {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname vmap @nat_v
  }}
  chain in_filter {{
    type filter hook input priority filter - 10; policy accept;
    iifname vmap @in_v
    iifname {w} counter drop comment "sandbox veth without rules"
  }}
  chain fwd_filter {{
    type filter hook forward priority filter - 10; policy accept;
    iifname vmap @fwd_v
    iifname {w} counter drop comment "no forwarding from sandboxes"
    oifname {w} counter drop comment "no forwarding to sandboxes"
  }}
}}
"""


def ensure_table(table: str = DEFAULT_TABLE, prefix: str = DEFAULT_PREFIX) -> None:
    """Create the daemon's table with its base chains (once; idempotent)."""
    _check_table(table)
    _check_prefix(prefix)
    with _table_lock:
        r = _run(["nft", "list", "chain", "inet", table, "fwd_filter"], check=False)
        if r.returncode == 0 and f'"{prefix}*"' in r.stdout and "@fwd_v" in r.stdout:
            return
        # (re)create the whole table atomically: an incomplete table (crash
        # between statements cannot happen within one nft -f, but someone may
        # have deleted a chain) is replaced. Per-sandbox chains are lost with it;
        # the caller recreates sandboxes it knows.
        _run(["nft", "-f", "-"], input=f"table inet {table}\ndelete table inet {table}\n"
                                       + _base_ruleset(table, prefix))


def delete_table(table: str = DEFAULT_TABLE) -> None:
    _check_table(table)
    r = _run(["nft", "delete", "table", "inet", table], check=False)
    if r.returncode != 0 and "No such file" not in r.stderr:
        raise NetPlumbError(f"nft delete table inet {table}: {r.stderr.strip()}")


# -- subnets ------------------------------------------------------------------------------------

def addresses_in_use() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of every address and route on the host (all tables)."""
    out = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    out += _run(["ip", "-4", "route", "show", "table", "all"], check=False).stdout
    nets = []
    for token in out.split():
        try:
            n = ipaddress.ip_network(token, strict=False)
        except ValueError:
            continue
        if n.version == 4 and n.prefixlen > 0:
            nets.append(n)
    return nets


class SubnetPool:
    """Hands out /30s from a private pool, skipping anything that overlaps an
    address or route on the host (or a /30 already handed out)."""

    def __init__(self, pool: str = DEFAULT_POOL, prefixlen: int = 30):
        self.pool = ipaddress.ip_network(pool)
        if self.pool.version != 4 or not self.pool.is_private:
            raise NetPlumbError(f"subnet pool {pool} must be a private IPv4 network")
        self.prefixlen = prefixlen
        self._held: set[ipaddress.IPv4Network] = set()
        self._lock = threading.Lock()

    def allocate(self) -> str:
        with self._lock:
            used = addresses_in_use()
            for net in self.pool.subnets(new_prefix=self.prefixlen):
                if net in self._held or any(net.overlaps(u) for u in used):
                    continue
                self._held.add(net)
                return str(net)
        raise NetPlumbError(f"subnet pool {self.pool} exhausted")

    def hold(self, subnet: str) -> None:
        """Mark a subnet as taken (a sandbox adopted after a restart)."""
        with self._lock:
            self._held.add(ipaddress.ip_network(subnet))

    def release(self, subnet: str) -> None:
        with self._lock:
            self._held.discard(ipaddress.ip_network(subnet))


# -- one sandbox ----------------------------------------------------------------------------------

@dataclass
class SandboxNet:
    names: Names
    subnet: str
    host_ip: str  # host end of the veth: where the sandbox reaches the gateway and DNS
    sandbox_ip: str  # the sandbox's address: bind it to the sandbox's identity in the gateway
    ports: GatewayPorts
    table: str = DEFAULT_TABLE
    prefix: str = DEFAULT_PREFIX

    @property
    def netns(self) -> str:
        return self.names.netns

    @property
    def veth_host(self) -> str:
        return self.names.veth_host

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.names.netns}"

    def resolv_conf(self) -> str:
        """The resolv.conf the sandbox should see (bind-mount it into the sandbox)."""
        return f"nameserver {self.host_ip}\noptions timeout:2 attempts:2\n"

    # -- create / destroy ------------------------------------------------------------------
    @classmethod
    def create(cls, sandbox_id: str, subnet: str, ports: GatewayPorts, *, table: str = DEFAULT_TABLE,
               prefix: str = DEFAULT_PREFIX) -> "SandboxNet":
        """Create the namespace, veth pair and host-side rules; on failure remove
        whatever was made and raise NetPlumbError. If a sandbox net with this id
        exists already (leftover), it is removed first."""
        _check_table(table)
        names = Names.of(sandbox_id, prefix)
        net = ipaddress.ip_network(subnet)
        if net.version != 4 or net.prefixlen > 30 or not net.is_private:
            raise NetPlumbError(f"subnet {subnet} must be a private IPv4 network of /30 or larger")
        hosts = list(net.hosts()) if net.num_addresses <= 1024 else [net[1], net[2]]
        sb = cls(names, str(net), str(hosts[0]), str(hosts[1]), ports, table, prefix)
        ensure_table(table, prefix)
        cleanup_one(names, table=table)
        try:
            sb._setup(net.prefixlen)
        except BaseException as e:
            problems = cleanup_one(names, table=table)
            if isinstance(e, NetPlumbError):
                raise NetPlumbError(f"{e}" + (f" (cleanup: {'; '.join(problems)})" if problems else "")) from e
            raise
        return sb

    @classmethod
    def attach(cls, sandbox_id: str, subnet: str, ports: GatewayPorts, *, table: str = DEFAULT_TABLE,
               prefix: str = DEFAULT_PREFIX) -> "SandboxNet":
        """The SandboxNet of a sandbox that exists already (a restarted daemon
        adopting it, with the subnet and ports from its state file). Raises
        NetPlumbError if any part of it is missing; the caller then destroys
        and recreates it."""
        names = Names.of(sandbox_id, prefix)
        net = ipaddress.ip_network(subnet)
        hosts = list(net.hosts()) if net.num_addresses <= 1024 else [net[1], net[2]]
        sb = cls(names, str(net), str(hosts[0]), str(hosts[1]), ports, table, prefix)
        lo = list_leftovers(prefix, table).get(names.key)
        missing = []
        if lo is None or lo.netns != names.netns:
            missing.append("netns")
        if lo is None or lo.veth_host != names.veth_host:
            missing.append("veth")
        have = set(lo.nft if lo else [])
        for kind in ("guard", "nat", "input", "fwd"):
            if f"chain {names.chain(kind)}" not in have:
                missing.append(f"chain {kind}")
        for mp in ("guard_v", "nat_v", "in_v", "fwd_v"):
            if f"element {mp} {names.veth_host}" not in have:
                missing.append(f"{mp} element")
        if not missing:
            addrs = _run(["ip", "-4", "-o", "addr", "show", "dev", names.veth_host], check=False).stdout
            if f" {sb.host_ip}/" not in addrs:
                missing.append(f"host address {sb.host_ip}")
        if missing:
            raise NetPlumbError(f"sandbox net {sandbox_id} is incomplete: missing {', '.join(missing)}")
        return sb

    def _setup(self, plen: int) -> None:
        n = self.names
        # rules first: the veth is covered by the catch-all drop until they exist
        _run(["nft", "-f", "-"], input=self._ruleset())
        _run(["ip", "netns", "add", n.netns])
        # everything in the namespace in one process; IPv6 off before any link is up
        _run(["ip", "netns", "exec", n.netns, "sh", "-ec",
              "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6;"
              "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6;"
              "echo 0 > /proc/sys/net/ipv4/ip_forward"])
        batch = "\n".join([
            f"link add {n.veth_host} type veth peer name {n.veth_ns} netns {n.netns}",
            f"link set {n.veth_host} alias {self.prefix}:{n.sandbox_id}",
            f"addr add {self.host_ip}/{plen} dev {n.veth_host}",
        ]) + "\n"
        _run(["ip", "-batch", "-"], input=batch)
        _write_sysctl(f"net/ipv6/conf/{n.veth_host}/disable_ipv6", "1")
        _run(["ip", "link", "set", n.veth_host, "up"])
        inner = "\n".join([
            "link set lo up",
            f"addr add {self.sandbox_ip}/{plen} dev {n.veth_ns}",
            f"link set {n.veth_ns} up",
            f"route add default via {self.host_ip} dev {n.veth_ns}",
        ]) + "\n"
        _run(["ip", "-n", n.netns, "-batch", "-"], input=inner)

    def _ruleset(self) -> str:
        n, t, p = self.names, self.table, self.ports
        c = n.counter
        h, s = self.host_ip, self.sandbox_ip
        nat = [f"ip daddr {h} tcp dport {p.proxy_port} accept"]
        allow = [f"ip saddr {s} ip daddr {h} tcp dport {p.proxy_port} accept"]
        if p.dns_port:
            nat.append(f"meta l4proto {{ tcp, udp }} th dport 53 redirect to :{p.dns_port}")
            allow.append(f"ip saddr {s} ip daddr {h} meta l4proto {{ tcp, udp }} th dport {p.dns_port} accept")
        if p.transparent_port:
            nat.append(f"meta l4proto tcp redirect to :{p.transparent_port}")
            allow.append(f"ip saddr {s} ip daddr {h} tcp dport {p.transparent_port} accept")
        nat.append("accept")
        lines = [f"table inet {t} {{"]
        for k in COUNTERS:
            lines.append(f"  counter {c(k)} {{ }}")
        lines += [
            f"  chain {n.chain('guard')} {{",
            f"    meta nfproto ipv6 counter name {c('ipv6')} drop",
            f"    ip saddr != {s} counter name {c('spoof')} drop",
            "    accept",
            "  }",
            f"  chain {n.chain('nat')} {{",
            *[f"    {r}" for r in nat],
            "  }",
            f"  chain {n.chain('input')} {{",
            *[f"    {r}" for r in allow],
            f"    meta l4proto udp counter name {c('udp')} drop",
            f"    meta l4proto icmp counter name {c('icmp')} drop",
            f"    meta l4proto tcp counter name {c('tcp')} drop",
            f"    counter name {c('other')} drop",
            "  }",
            f"  chain {n.chain('fwd')} {{",
            f"    counter name {c('fwd')} drop",
            "  }",
            "}",
            f'add element inet {t} guard_v {{ "{n.veth_host}" : goto {n.chain("guard")} }}',
            f'add element inet {t} nat_v {{ "{n.veth_host}" : goto {n.chain("nat")} }}',
            f'add element inet {t} in_v {{ "{n.veth_host}" : goto {n.chain("input")} }}',
            f'add element inet {t} fwd_v {{ "{n.veth_host}" : goto {n.chain("fwd")} }}',
        ]
        return "\n".join(lines) + "\n"

    def destroy(self) -> None:
        """Remove namespace, veth and rules; idempotent. Raises if something stays."""
        problems = cleanup_one(self.names, table=self.table)
        if problems:
            raise NetPlumbError("; ".join(problems))

    # -- inspection ------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Packets dropped per kind for this sandbox (spoof, ipv6, udp, icmp, tcp, other)."""
        out: dict[str, int] = {}
        for k in COUNTERS:
            r = _run(["nft", "-j", "list", "counter", "inet", self.table, self.names.counter(k)], check=False)
            if r.returncode != 0:
                continue
            for item in json.loads(r.stdout).get("nftables", []):
                if "counter" in item:
                    out[k] = int(item["counter"].get("packets", 0))
        return out

    def exec_args(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names.netns, *args]


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(f"/proc/sys/{path}", "w") as f:
            f.write(value)
    except OSError as e:
        raise NetPlumbError(f"sysctl {path}: {e}") from e


# -- leftovers and cleanup --------------------------------------------------------------------------

@dataclass
class Leftover:
    key: str
    sandbox_id: str | None = None  # None when only nft objects remain (id unknown)
    netns: str | None = None
    veth_host: str | None = None
    nft: list[str] = field(default_factory=list)  # "chain NAME" / "counter NAME" / "element MAP NAME"


def _table_objects(table: str) -> dict:
    r = _run(["nft", "-j", "list", "table", "inet", table], check=False)
    if r.returncode != 0:
        return {"chains": [], "counters": [], "elements": []}
    chains, counters, elements = [], [], []
    for item in json.loads(r.stdout).get("nftables", []):
        if "chain" in item:
            chains.append(item["chain"]["name"])
        elif "counter" in item:
            counters.append(item["counter"]["name"])
        elif "map" in item:
            for el in item["map"].get("elem", []) or []:
                k = el[0] if isinstance(el, list) else el
                if isinstance(k, str):
                    elements.append((item["map"]["name"], k))
    return {"chains": chains, "counters": counters, "elements": elements}


_SB_OBJ = re.compile(r"^sb_([0-9a-f]{10})_[a-z0-9]+$")


def list_leftovers(prefix: str = DEFAULT_PREFIX, table: str = DEFAULT_TABLE) -> dict[str, Leftover]:
    """Everything on the host that belongs to sandbox nets of this prefix/table,
    keyed by name key. Meant for a daemon starting up: keep what it knows,
    ``cleanup()`` the rest."""
    _check_prefix(prefix)
    _check_table(table)
    found: dict[str, Leftover] = {}

    def get(key: str) -> Leftover:
        return found.setdefault(key, Leftover(key))

    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix + "-"):
            sid = name[len(prefix) + 1:]
            if _ID_RE.match(sid):
                lo = get(key_of(sid))
                lo.sandbox_id, lo.netns = sid, name
    r = _run(["ip", "-o", "link", "show"], check=False)
    for line in r.stdout.splitlines():
        m = re.match(r"^\d+:\s+([^:@\s]+)", line)
        if not m:
            continue
        name = m.group(1)
        key = name[len(prefix):]
        if name.startswith(prefix) and re.fullmatch(r"[0-9a-f]{10}", key):
            lo = get(key)
            lo.veth_host = name
            a = re.search(r"alias (\S+)", line)
            if a and a.group(1).startswith(prefix + ":"):
                sid = a.group(1)[len(prefix) + 1:]
                if _ID_RE.match(sid) and key_of(sid) == key:
                    lo.sandbox_id = lo.sandbox_id or sid
    objs = _table_objects(table)
    for ch in objs["chains"]:
        m = _SB_OBJ.match(ch)
        if m:
            get(m.group(1)).nft.append(f"chain {ch}")
    for ct in objs["counters"]:
        m = _SB_OBJ.match(ct)
        if m:
            get(m.group(1)).nft.append(f"counter {ct}")
    for mp, el in objs["elements"]:
        key = el[len(prefix):]
        if el.startswith(prefix) and re.fullmatch(r"[0-9a-f]{10}", key):
            get(key).nft.append(f"element {mp} {el}")
    return found


def cleanup(leftovers: Iterable[Leftover], *, table: str = DEFAULT_TABLE,
            prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove the given leftovers; returns the problems (empty: all gone)."""
    problems: list[str] = []
    for lo in leftovers:
        problems += _cleanup_key(lo.key, netns=lo.netns, veth=lo.veth_host or f"{prefix}{lo.key}", table=table)
    return problems


def cleanup_unknown(known_ids: set[str], *, prefix: str = DEFAULT_PREFIX,
                    table: str = DEFAULT_TABLE) -> tuple[set[str], list[str]]:
    """At daemon start: remove every sandbox net whose id is not in known_ids.
    Returns (ids found alive among known_ids, problems)."""
    known_keys = {key_of(i): i for i in known_ids}
    los = list_leftovers(prefix, table)
    alive = {known_keys[k] for k in los if k in known_keys}
    return alive, cleanup([lo for k, lo in los.items() if k not in known_keys], table=table, prefix=prefix)


def cleanup_one(names: Names, *, table: str = DEFAULT_TABLE) -> list[str]:
    return _cleanup_key(names.key, netns=names.netns, veth=names.veth_host, table=table)


def _cleanup_key(key: str, *, netns: str | None, veth: str, table: str) -> list[str]:
    problems: list[str] = []
    # 1. rules (map elements first: they reference the chains; counters last)
    objs = _table_objects(table)
    stmts = [f'delete element inet {table} {mp} {{ "{el}" }}' for mp, el in objs["elements"] if el == veth]
    mine = [c for c in objs["chains"] if _SB_OBJ.match(c) and _SB_OBJ.match(c).group(1) == key]
    stmts += [f"flush chain inet {table} {c}" for c in mine]
    stmts += [f"delete chain inet {table} {c}" for c in mine]
    stmts += [f"delete counter inet {table} {c}" for c in objs["counters"]
              if _SB_OBJ.match(c) and _SB_OBJ.match(c).group(1) == key]
    if stmts:
        r = _run(["nft", "-f", "-"], input="\n".join(stmts) + "\n", check=False)
        if r.returncode != 0:
            problems.append(f"nft cleanup of {key}: {r.stderr.strip()}")
    # 2. veth (deleting the host end removes the pair)
    r = _run(["ip", "link", "del", veth], check=False)
    if r.returncode != 0 and "Cannot find device" not in r.stderr:
        problems.append(f"ip link del {veth}: {r.stderr.strip()}")
    # 3. namespace
    if netns:
        r = _run(["ip", "netns", "del", netns], check=False)
        if r.returncode != 0 and "No such file" not in r.stderr:
            problems.append(f"ip netns del {netns}: {r.stderr.strip()}")
    return problems
