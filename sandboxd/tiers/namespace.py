"""The ``namespace`` tier: any Linux program, under bubblewrap, in a network
namespace whose only way out is the gateway, with cgroup limits.

Per sandbox (``NamespaceBackend.create``):

* a ``netplumb.SandboxNet`` (netns ``<prefix>-<id>``, veth, host-side nft rules)
  and a ``dnsstub.DnsStub`` on its host end (when ``Egress.dns_port``);
* a cgroup ``egress-sandboxd/<id>`` with the spec's CPU, memory and pids limits
  (``sandboxd.cgroups``: v2 when available, else v1);
* ``<root>/workspaces/<id>`` (mode 0700, owned by the unprivileged host uid the
  sandbox runs as) and ``<root>/etc/<id>`` (the files the sandbox sees in
  /etc: resolv.conf -> the stub, hosts, passwd, group, nsswitch.conf and the
  gateway CA at ``/etc/egress/gateway-ca.pem``);
* the sandbox environment: ``HTTP(S)_PROXY``/``http(s)_proxy`` =
  ``http://x:<token>@<host end>:<proxy_port>`` (docs/tokens.md: the token as the
  proxy password), ``NO_PROXY=localhost,127.0.0.1``, ``SSL_CERT_FILE``,
  ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, ``PIP_CERT``, ``GIT_SSL_CAINFO``,
  ``NODE_EXTRA_CA_CERTS`` -> the CA inside. The token is only in memory and in the
  environment of the sandbox's processes (never in argv, files, logs or errors).

Each exec (``exec``) runs as::

    sh (as root: writes its pid into the exec's cgroup leaf in every hierarchy)
     -> nsenter --net=/run/netns/<netns>
     -> setpriv --reuid/--regid <host uid> --clear-groups --inh-caps=-all --no-new-privs
     -> bwrap --unshare-all --share-net --die-with-parent --new-session --cap-drop ALL
              --uid 1000 --gid 1000, ro /usr (+ /bin /lib... as on the host), a tmpfs /etc
              with only the sandbox's files, --proc /proc, --dev /dev, tmpfs /tmp,
              the workspace read-write at /workspace (the cwd)
     -> the command

bwrap runs unprivileged (an unprivileged user namespace), so the sandbox's uid
1000 is the unprivileged host uid outside: files it can reach on the host are
only those readable by "other". A timeout (or the end of the exec) kills the
whole cgroup leaf of that exec (every process it started, also detached ones).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .. import cgroups, dnsstub, netplumb
from .base import Backend, Egress, ExecResult, OutputCallback, SandboxSpec, TierError
from .paths import get_file as _get_file
from .paths import list_files as _list_files
from .paths import put_file as _put_file
from .paths import rmtree as _rmtree

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
CA_PATH = "/etc/egress/gateway-ca.pem"
SANDBOX_UID = 1000
DEFAULT_HOST_UID = 64000  # unprivileged host uid/gid the sandbox runs as outside
_META = "meta.json"
# the only environment host-side helpers (sh, nsenter, setpriv, bwrap) ever get
_HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
_WS = "workspace"


@dataclass
class _Sandbox:
    spec: SandboxSpec
    egress: Egress
    net: netplumb.SandboxNet
    stub: dnsstub.DnsStub | None
    ws: Path
    etc: Path
    env: dict = field(default_factory=dict)  # holds the token: never logged or written
    execs: int = 0


def _scrub(msg: str, token: str) -> str:
    if token:
        msg = msg.replace(token, "[redacted]")
    return msg.splitlines()[0][:500] if msg else msg


class NamespaceBackend(Backend):
    name = "namespace"

    def __init__(self, root: Path, *, pool: netplumb.SubnetPool | None = None,
                 table: str = netplumb.DEFAULT_TABLE, prefix: str = netplumb.DEFAULT_PREFIX,
                 cgroup_parent: str = cgroups.DEFAULT_PARENT, host_uid: int = DEFAULT_HOST_UID,
                 max_file_bytes: int = 64 << 20, max_output_bytes: int = 16 << 20,
                 bwrap: str = "bwrap") -> None:
        self.root = Path(root)
        self.pool = pool or netplumb.SubnetPool()
        self.table, self.prefix = table, prefix
        self.host_uid = host_uid
        self.max_file_bytes, self.max_output_bytes = max_file_bytes, max_output_bytes
        self.tools = {}
        for tool in ("nsenter", "setpriv", bwrap):
            found = shutil.which(tool, path=_HOST_ENV["PATH"])
            if found is None:
                raise TierError(f"namespace tier needs `{tool}` (util-linux / bubblewrap)")
            self.tools[tool] = found
        self.bwrap = self.tools[bwrap]
        self.cg = cgroups.CgroupManager(cgroup_parent)
        self._sb: dict[str, _Sandbox] = {}
        self._leaf_n = 0
        for d in ("workspaces", "etc", "meta"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)  # the sandbox uid must traverse to its workspace

    # -- paths -------------------------------------------------------------------------------
    def _ws(self, sid: str) -> Path:
        return self.root / "workspaces" / sid

    def _etc(self, sid: str) -> Path:
        return self.root / "etc" / sid

    def _meta(self, sid: str) -> Path:
        return self.root / "meta" / f"{sid}.json"

    def _get(self, sid: str) -> _Sandbox:
        sb = self._sb.get(sid)
        if sb is None:
            raise TierError(f"no such sandbox: {sid}")
        return sb

    # -- create / resume ------------------------------------------------------------------------
    async def create(self, spec: SandboxSpec, egress: Egress) -> None:
        await self._start(spec, egress, None)

    async def resume(self, spec: SandboxSpec, egress: Egress, snapshot_dir: Path) -> None:
        src = Path(snapshot_dir) / _WS
        if not src.is_dir() or src.is_symlink():
            raise TierError(f"cannot resume {spec.id}: snapshot has no workspace")
        await self._start(spec, egress, src)

    async def _start(self, spec: SandboxSpec, egress: Egress, restore: Path | None) -> None:
        if not _ID_RE.match(spec.id or ""):
            raise TierError(f"invalid sandbox id {spec.id!r}")
        if spec.id in self._sb:
            raise TierError(f"sandbox {spec.id} exists already")
        try:
            sb = await asyncio.to_thread(self._setup, spec, egress, restore)
        except TierError as e:
            raise TierError(_scrub(str(e), egress.token)) from None
        self._sb[spec.id] = sb

    def _setup(self, spec: SandboxSpec, egress: Egress, restore: Path | None) -> _Sandbox:
        sid = spec.id
        lim = spec.limits
        net = stub = None
        subnet = None
        try:
            if egress.ca_cert is not None and not Path(egress.ca_cert).is_file():
                raise TierError(f"gateway CA {egress.ca_cert} is not a file")
            subnet = self.pool.allocate()
            ports = netplumb.GatewayPorts(egress.proxy_port, egress.transparent_port, egress.dns_port)
            net = netplumb.SandboxNet.create(sid, subnet, ports, table=self.table, prefix=self.prefix)
            if egress.dns_port:
                stub = dnsstub.DnsStub(net.host_ip, egress.dns_port, net.host_ip).start()
            self.cg.create(sid, cpu_millicores=int(lim.cpu_millicores), memory_mb=int(lim.memory_mb),
                           pids=int(lim.pids))
            ws, etc = self._ws(sid), self._etc(sid)
            _rmtree(ws)
            _rmtree(etc)
            if restore is not None:
                shutil.copytree(restore, ws, symlinks=True)
                _chown_tree(ws, self.host_uid)
            else:
                ws.mkdir(mode=0o700)
                os.chown(ws, self.host_uid, self.host_uid)
            os.chmod(ws, 0o700)
            self._write_etc(etc, net, egress)
            self._meta(sid).write_text(json.dumps({
                "id": sid, "subnet": subnet, "proxy_port": egress.proxy_port,
                "transparent_port": egress.transparent_port, "dns_port": egress.dns_port,
                "tenant": spec.tenant, "agent": spec.agent}))
            return _Sandbox(spec, egress, net, stub, ws, etc, self._env(net, egress))
        except BaseException as e:
            if stub is not None:
                stub.stop()
            problems = self._release_all(sid)
            if subnet is not None:
                self.pool.release(subnet)
            if isinstance(e, (TierError, netplumb.NetPlumbError, cgroups.CgroupError, OSError)):
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                extra = f" (cleanup: {'; '.join(problems)})" if problems else ""
                raise TierError(f"cannot create sandbox {sid}: {why}{extra}") from None
            raise

    def _write_etc(self, etc: Path, net: netplumb.SandboxNet, egress: Egress) -> None:
        etc.mkdir(mode=0o755, parents=True)
        files = {
            "resolv.conf": net.resolv_conf(),
            "hosts": "127.0.0.1 localhost\n127.0.1.1 sandbox\n",
            "hostname": "sandbox\n",
            "passwd": "root:x:0:0:root:/root:/bin/sh\n"
                      f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:/workspace:/bin/sh\n"
                      "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            "group": f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\nnogroup:x:65534:\n",
            "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
        }
        for name, text in files.items():
            (etc / name).write_text(text)
            os.chmod(etc / name, 0o644)
        if egress.ca_cert is not None:
            shutil.copyfile(egress.ca_cert, etc / "gateway-ca.pem")
            os.chmod(etc / "gateway-ca.pem", 0o644)

    def _env(self, net: netplumb.SandboxNet, egress: Egress) -> dict:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/workspace", "USER": "sandbox", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
               "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1"}
        if egress.token:
            url = f"http://x:{egress.token}@{net.host_ip}:{egress.proxy_port}"
            for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
                env[k] = url
        if egress.ca_cert is not None:
            for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "GIT_SSL_CAINFO",
                      "NODE_EXTRA_CA_CERTS"):
                env[k] = CA_PATH
        return env

    # -- exec ------------------------------------------------------------------------------------
    def _bwrap_args(self, sb: _Sandbox) -> list[str]:
        a = [self.bwrap, "--unshare-all", "--share-net", "--die-with-parent", "--new-session",
             "--cap-drop", "ALL", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
             "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            p = Path("/" + top)
            if p.is_symlink():
                a += ["--symlink", os.readlink(p), f"/{top}"]
            elif p.is_dir():
                a += ["--ro-bind", str(p), f"/{top}"]
        a += ["--tmpfs", "/etc"]
        for name in ("resolv.conf", "hosts", "hostname", "passwd", "group", "nsswitch.conf"):
            a += ["--ro-bind", str(sb.etc / name), f"/etc/{name}"]
        for host in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
                     "/etc/localtime", "/etc/mime.types"):
            a += ["--ro-bind-try", host, host]
        if (sb.etc / "gateway-ca.pem").exists():
            a += ["--ro-bind", str(sb.etc / "gateway-ca.pem"), CA_PATH]
        a += ["--remount-ro", "/etc", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
              "--bind", str(sb.ws), "/workspace", "--remount-ro", "/", "--chdir", "/workspace"]
        return a

    async def exec(self, sandbox_id: str, command: list[str] | str, *, timeout_s: float,
                   on_output: OutputCallback, stdin: bytes | None = None,
                   env: Mapping[str, str] | None = None) -> ExecResult:
        sb = self._get(sandbox_id)
        if isinstance(command, str):
            command = ["/bin/sh", "-c", command]
        if not command or not all(isinstance(c, str) and "\x00" not in c for c in command):
            raise TierError("command must be a non-empty list of strings")
        penv = dict(sb.env)
        for k, v in (env or {}).items():
            if not isinstance(k, str) or not _ENV_NAME_RE.match(k) or not isinstance(v, str) or "\x00" in v:
                raise TierError(f"invalid environment variable {str(k)[:64]!r}")
            penv[k] = v
        timeout = max(0.0, min(float(timeout_s), float(sb.spec.limits.exec_timeout_s)))
        self._leaf_n += 1
        leaf = f"x{self._leaf_n}"
        try:
            procs = self.cg.add_leaf(sandbox_id, leaf)
        except cgroups.CgroupError as e:
            raise TierError(f"sandbox {sandbox_id}: {e}") from None
        # The sandbox's environment (with its token) reaches bwrap through an
        # inherited memfd (`--args FD`: --clearenv + --setenv pairs), so it is
        # neither in any process's argv (world-readable /proc/PID/cmdline) nor in
        # the environment of the host-side helpers (no LD_PRELOAD & co. from a
        # caller for the root `sh`/nsenter).
        env_args = ["--clearenv"]
        for k, v in penv.items():
            env_args += ["--setenv", k, v]
        blob = b"".join(a.encode() + b"\0" for a in env_args)
        if len(blob) > 1 << 20:
            self.cg.remove_leaf(sandbox_id, leaf)
            raise TierError("environment too large (> 1 MiB)")
        fd = os.memfd_create("sandbox-env", 0)  # not CLOEXEC: passed to the chain via pass_fds
        try:
            os.write(fd, blob)
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError:
            os.close(fd)
            self.cg.remove_leaf(sandbox_id, leaf)
            raise
        place = 'while [ "$1" != -- ]; do echo $$ > "$1"; shift; done; shift; exec "$@"'
        argv = ["/bin/sh", "-ec", place, "sh", *procs, "--",
                self.tools["nsenter"], f"--net={sb.net.netns_path}",
                self.tools["setpriv"], f"--reuid={self.host_uid}", f"--regid={self.host_uid}", "--clear-groups",
                "--inh-caps=-all", "--no-new-privs",
                *self._bwrap_args(sb), "--args", str(fd), "--", *command]
        sb.execs += 1
        t0 = time.monotonic()
        timed_out = False
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(_HOST_ENV),
                    start_new_session=True, cwd="/", pass_fds=(fd,))
            finally:
                os.close(fd)
            budget = [self.max_output_bytes]

            async def pump(stream, name: str) -> None:
                while True:
                    chunk = await stream.read(65536)
                    if not chunk:
                        return
                    if budget[0] <= 0:
                        continue
                    chunk = chunk[:budget[0]]
                    budget[0] -= len(chunk)
                    on_output(name, chunk)
                    if budget[0] <= 0:
                        on_output("stderr", b"\n[output truncated]\n")

            async def feed() -> None:
                if stdin is not None and proc.stdin is not None:
                    try:
                        proc.stdin.write(stdin)
                        await proc.stdin.drain()
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    finally:
                        proc.stdin.close()

            tasks = [asyncio.ensure_future(pump(proc.stdout, "stdout")),
                     asyncio.ensure_future(pump(proc.stderr, "stderr")), asyncio.ensure_future(feed())]
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                timed_out = True
            # the end of the exec (or its timeout): nothing it started survives
            await asyncio.to_thread(self.cg.remove_leaf, sandbox_id, leaf)
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await proc.wait()
            done, pending = await asyncio.wait(tasks, timeout=5)
            for t in pending:
                t.cancel()
            rc = proc.returncode
            code = 128 - rc if rc is not None and rc < 0 else rc
            if timed_out:
                on_output("stderr", f"\n[timed out after {timeout:g} s; killed]\n".encode())
                code = 124 if code in (None, 0) else code
            return ExecResult(int(code if code is not None else 1), timed_out, time.monotonic() - t0)
        except OSError as e:
            raise TierError(f"sandbox {sandbox_id}: cannot start the command: {e.strerror or e}") from None
        finally:
            sb.execs -= 1
            await asyncio.to_thread(self.cg.remove_leaf, sandbox_id, leaf)

    # -- files -------------------------------------------------------------------------------------
    async def put_file(self, sandbox_id: str, path: str, data: bytes) -> None:
        sb = self._get(sandbox_id)
        await asyncio.to_thread(_put_file, sb.ws, path, bytes(data), self.max_file_bytes, self.host_uid)

    async def get_file(self, sandbox_id: str, path: str) -> bytes:
        sb = self._get(sandbox_id)
        return await asyncio.to_thread(_get_file, sb.ws, path, self.max_file_bytes)

    async def list_files(self, sandbox_id: str, path: str = ".") -> list[dict]:
        sb = self._get(sandbox_id)
        return await asyncio.to_thread(_list_files, sb.ws, path)

    # -- sleep / destroy -----------------------------------------------------------------------------
    async def sleep(self, sandbox_id: str, snapshot_dir: Path) -> None:
        sb = self._get(sandbox_id)
        if sb.execs:
            raise TierError(f"cannot sleep sandbox {sandbox_id}: an exec is running")
        dest = Path(snapshot_dir) / _WS
        try:
            await asyncio.to_thread(self._copy_out, sb.ws, dest)
        except OSError as e:
            raise TierError(f"cannot sleep sandbox {sandbox_id}: {e.strerror or e}") from None
        await self.destroy(sandbox_id)

    @staticmethod
    def _copy_out(ws: Path, dest: Path) -> None:
        _rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # symlinks are copied as links (never followed); sockets/FIFOs are skipped
        shutil.copytree(ws, dest, symlinks=True, ignore=_special_files)

    async def destroy(self, sandbox_id: str) -> None:
        if not _ID_RE.match(sandbox_id or ""):
            raise TierError(f"invalid sandbox id {sandbox_id!r}")
        sb = self._sb.pop(sandbox_id, None)
        if sb is not None and sb.stub is not None:
            sb.stub.stop()
        problems = await asyncio.to_thread(self._release_all, sandbox_id)
        if sb is not None:
            self.pool.release(sb.net.subnet)
        if problems:
            raise TierError(f"destroy {sandbox_id}: {'; '.join(problems)}")

    def _release_all(self, sid: str) -> list[str]:
        problems: list[str] = []
        if not self.cg.remove(sid):
            problems.append("cgroup not removed (processes left)")
        problems += netplumb.cleanup_one(netplumb.Names.of(sid, self.prefix), table=self.table)
        for p in (self._ws(sid), self._etc(sid), self._meta(sid)):
            try:
                _rmtree(p)
            except OSError as e:
                problems.append(f"remove {p.name}: {e.strerror}")
        return problems

    async def adopt_or_clean(self, known_ids: set[str]) -> set[str]:
        return await asyncio.to_thread(self._adopt_or_clean, set(known_ids))

    def _adopt_or_clean(self, known: set[str]) -> set[str]:
        """Remove leftovers of unknown ids (net, cgroups, workspaces, etc, meta);
        adopt known ids whose net, cgroup, workspace and meta are all present.
        An adopted sandbox has NO token (it was never written anywhere): its
        processes get no proxy variables until it is re-created; their traffic is
        still forced through the gateway (transparent, attributed by binding)."""
        netplumb.cleanup_unknown(known, prefix=self.prefix, table=self.table)
        for sid in self.cg.list_ids() - known:
            self.cg.remove(sid)
        seen = set()
        for sub in ("workspaces", "etc"):
            for e in (self.root / sub).iterdir():
                seen.add(e.name)
                if e.name not in known:
                    _rmtree(e)
        for e in (self.root / "meta").iterdir():
            sid = e.name[:-5] if e.name.endswith(".json") else e.name
            if sid not in known:
                _rmtree(e)
        adopted: set[str] = set()
        for sid in known:
            if sid in self._sb:
                adopted.add(sid)
                continue
            try:
                meta = json.loads(self._meta(sid).read_text())
                if not (self._ws(sid).is_dir() and self._etc(sid).is_dir() and self.cg.exists(sid)):
                    continue
                ports = netplumb.GatewayPorts(meta["proxy_port"], meta["transparent_port"], meta["dns_port"])
                net = netplumb.SandboxNet.attach(sid, meta["subnet"], ports, table=self.table, prefix=self.prefix)
                egress = Egress(proxy_host=net.host_ip, proxy_port=meta["proxy_port"],
                                transparent_port=meta["transparent_port"], dns_port=meta["dns_port"],
                                ca_cert=(self._etc(sid) / "gateway-ca.pem")
                                if (self._etc(sid) / "gateway-ca.pem").exists() else None)
                stub = dnsstub.DnsStub(net.host_ip, meta["dns_port"], net.host_ip).start() \
                    if meta["dns_port"] else None
            except (OSError, ValueError, KeyError, netplumb.NetPlumbError):
                continue
            self.cg.clear_leaves(sid)
            self.pool.hold(meta["subnet"])
            spec = SandboxSpec(id=sid, tenant=meta.get("tenant", ""), agent=meta.get("agent", ""))
            self._sb[sid] = _Sandbox(spec, egress, net, stub, self._ws(sid), self._etc(sid),
                                     self._env(net, egress))
            adopted.add(sid)
        return adopted

    async def close(self) -> None:
        """Stop the DNS stubs (the sandboxes stay; for tests and daemon shutdown)."""
        for sb in self._sb.values():
            if sb.stub is not None:
                sb.stub.stop()


# -- helpers ------------------------------------------------------------------------------------------

def _special_files(d: str, names: list[str]) -> set[str]:
    out = set()
    for n in names:
        try:
            st = os.lstat(os.path.join(d, n))
        except OSError:
            out.add(n)
            continue
        import stat as _s
        if not (_s.S_ISREG(st.st_mode) or _s.S_ISDIR(st.st_mode) or _s.S_ISLNK(st.st_mode)):
            out.add(n)
    return out


def _chown_tree(root: Path, uid: int) -> None:
    os.lchown(root, uid, uid)
    for cur, dirs, files in os.walk(root):
        for n in dirs + files:
            os.lchown(os.path.join(cur, n), uid, uid)
