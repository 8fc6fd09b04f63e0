"""A throw-away network namespace ("sandbox") wired to the root namespace by a
veth pair, for transparent-mode tests.

Layout (X random, so parallel runs do not collide)::

    root namespace                         namespace egt-<rand>
    <name>h  10.231.X.1/30   <--veth-->    <name>s  10.231.X.2/30, lo up
                                           routes: 10.231.X.0/30 on-link only

The namespace has no default route: it can reach 10.231.X.1 and nothing else.
``redirect()`` adds an nftables table (``ip egt_<rand>``) whose prerouting NAT
chain redirects TCP arriving on the host end of the veth to a local port
(mitmproxy's transparent mode reads the original destination back with
SO_ORIGINAL_DST from conntrack) and whose input chain drops everything else
that arrives from the sandbox.

``Sandbox.close()`` removes the nft table, the veth pair and the namespace; it
is safe to call more than once and after a partial set-up.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Iterable, Sequence

PREFIX = "10.231"


# The policy of the sandboxd tests: tenant "sbx" may GET the loopback test upstream.
SANDBOX_POLICY = """\
apiVersion: egress/v1
kind: Policy
name: sandbox
selector: principal.tenant == "sbx"
rules:
  - name: upstream-get
    action: allow
    when: request.method == "GET" && request.host == "upstream.test"
    reason: Sandboxes may read from the test upstream.
    allow_internal: ["127.0.0.0/8"]
"""


def missing_prerequisites() -> str | None:
    """Why the namespace tests cannot run here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces, veth, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install -y iproute2 nftables)"
    return None


def _run(args: Sequence[str], *, check: bool = True, input: str | None = None,
         timeout: float = 20) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def _subnet_in_use(net: ipaddress.IPv4Network) -> bool:
    out = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    out += _run(["ip", "-4", "route", "show", "table", "all"], check=False).stdout
    for token in out.split():
        try:
            other = ipaddress.ip_network(token, strict=False)
        except ValueError:
            continue
        if other.version == 4 and other.overlaps(net) and other.prefixlen > 0:
            return True
    return False


@dataclass
class Sandbox:
    tag: str
    netns: str
    veth_host: str
    veth_ns: str
    host_ip: str
    ns_ip: str
    subnet: str
    nft_table: str
    _created: list[str] = field(default_factory=list, repr=False)

    # -- running things inside ------------------------------------------------------
    def exec_args(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]

    def run(self, args: Sequence[str], *, timeout: float = 20, input: str | None = None,
            env: dict | None = None, text: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside the namespace; never raises on a non-zero exit.
        With ``text=False`` stdout is bytes, untouched (no newline translation)."""
        base = dict(os.environ if env is None else env)
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
                  "NO_PROXY", "no_proxy"):
            base.pop(k, None)
        if text:
            return subprocess.run(self.exec_args(args), input=input, capture_output=True, text=True,
                                  timeout=timeout, env=base)
        r = subprocess.run(self.exec_args(args), input=input.encode() if input is not None else None,
                           capture_output=True, timeout=timeout, env=base)
        r.stderr = r.stderr.decode(errors="replace")
        return r

    # -- nftables ---------------------------------------------------------------------
    def redirect(self, ports: Iterable[int], to_port: int) -> None:
        """Redirect TCP from the sandbox to ``ports`` (any address) to the
        local port ``to_port`` on the host end of the veth; drop all else."""
        plist = ", ".join(str(int(p)) for p in sorted(set(ports)))
        ruleset = f"""
table ip {self.nft_table} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{self.veth_host}" tcp dport {{ {plist} }} redirect to :{int(to_port)}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{self.veth_host}" ct state established,related accept
    iifname "{self.veth_host}" ip daddr {self.host_ip} tcp dport {int(to_port)} accept
    iifname "{self.veth_host}" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{self.veth_host}" drop
  }}
}}
"""
        if "nft" not in self._created:
            self._created.append("nft")
        _run(["nft", "-f", "-"], input=ruleset)

    # -- teardown -------------------------------------------------------------------------
    def close(self) -> list[str]:
        """Remove everything this sandbox created; returns the problems (if any)."""
        problems: list[str] = []

        def attempt(args, gone_if):
            r = _run(args, check=False)
            if r.returncode != 0 and not gone_if(r.stderr):
                problems.append(f"{' '.join(args)}: {r.stderr.strip()}")

        if "nft" in self._created:
            attempt(["nft", "delete", "table", "ip", self.nft_table], lambda e: "No such file" in e)
        if "veth" in self._created:
            # deleting one end removes the pair (also if the peer is in the namespace)
            attempt(["ip", "link", "del", self.veth_host], lambda e: "Cannot find device" in e)
        if "netns" in self._created:
            attempt(["ip", "netns", "del", self.netns], lambda e: "No such file" in e)
        self._created.clear()
        return problems

    def leftovers(self) -> list[str]:
        """Whatever of this sandbox is still visible (should be empty after close)."""
        found = []
        if self.netns in _run(["ip", "netns", "list"], check=False).stdout.split():
            found.append(f"netns {self.netns}")
        if _run(["ip", "link", "show", self.veth_host], check=False).returncode == 0:
            found.append(f"link {self.veth_host}")
        if _run(["nft", "list", "table", "ip", self.nft_table], check=False).returncode == 0:
            found.append(f"nft table ip {self.nft_table}")
        return found

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create_sandbox(attempts: int = 20) -> Sandbox:
    """Create the namespace and veth pair (see the module docstring)."""
    last: Exception | None = None
    for _ in range(attempts):
        tag = secrets.token_hex(3)
        x = secrets.randbelow(256)
        net = ipaddress.ip_network(f"{PREFIX}.{x}.0/30")
        if _subnet_in_use(net):
            continue
        hosts = list(net.hosts())
        sb = Sandbox(tag=tag, netns=f"egt-{tag}", veth_host=f"egt{tag}h", veth_ns=f"egt{tag}s",
                     host_ip=str(hosts[0]), ns_ip=str(hosts[1]), subnet=str(net), nft_table=f"egt_{tag}")
        try:
            _setup(sb)
            return sb
        except Exception as e:  # clean up the partial set-up, then retry with new names
            last = e
            sb.close()
    raise RuntimeError(f"could not create a sandbox namespace: {last}")


def _setup(sb: Sandbox) -> None:
    ns = sb.netns
    _run(["ip", "netns", "add", ns])
    sb._created.append("netns")
    _run(["ip", "link", "add", sb.veth_host, "type", "veth", "peer", "name", sb.veth_ns])
    sb._created.append("veth")
    _run(["ip", "link", "set", sb.veth_ns, "netns", ns])
    # IPv6 off on both ends: nothing here speaks it, and it avoids DAD / router solicitations
    for args in (["sysctl", "-q", "-w", f"net.ipv6.conf.{sb.veth_host}.disable_ipv6=1"],
                 ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{sb.veth_ns}.disable_ipv6=1"]):
        _run(args, check=False)
    _run(["ip", "addr", "add", f"{sb.host_ip}/30", "dev", sb.veth_host])
    _run(["ip", "link", "set", sb.veth_host, "up"])
    _run(["ip", "-n", ns, "link", "set", "lo", "up"])
    _run(["ip", "-n", ns, "addr", "add", f"{sb.ns_ip}/30", "dev", sb.veth_ns])
    _run(["ip", "-n", ns, "link", "set", sb.veth_ns, "up"])
    # Only the on-link /30 (added by the kernel with the address); make sure
    # nothing else (in particular no default route) exists.
    routes = [r.strip() for r in _run(["ip", "-n", ns, "-4", "route", "show", "table", "all"]).stdout.splitlines()
              if r.strip()]
    unexpected = [r for r in routes
                  if not (r.startswith(f"{sb.subnet} dev {sb.veth_ns}")
                          or (r.startswith(("local ", "broadcast ")) and (" dev lo " in r or f" dev {sb.veth_ns} " in r)))]
    if unexpected:
        raise RuntimeError(f"unexpected routes in {ns}: {unexpected}")
