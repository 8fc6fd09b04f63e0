"""``egress``: the one command-line tool.

Exit codes: 0 ok, 1 the thing checked failed (a policy problem, a denied
request in ``policy decide``), 2 usage or configuration error, 3 cannot reach
the admin API.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

EPILOG_MAIN = """\
examples:
  egress gateway run                                  # defaults: policies/default, proxy 127.0.0.1:8080
  TOKEN=$(egress token mint --tenant demo --agent a1)
  curl -x http://x:$TOKEN@127.0.0.1:8080 http://demo.localhost:8000/
  egress policy check policies/default
  egress policy decide --tenant demo --agent a1 GET http://169.254.169.254/

Every subcommand has its own --help with examples.
"""


from gateway.clierror import CliError  # noqa: E402  (re-exported: gateway.cli.CliError)


def parse_duration(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 90s, 30m, 1h, 7d)")
    n = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if n <= 0:
        raise argparse.ArgumentTypeError("duration must be positive")
    return n


def parse_label(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"invalid label {text!r} (use KEY=VALUE)")
    return k, v


# -- gateway ------------------------------------------------------------------------

def cmd_gateway_run(args) -> int:
    import asyncio

    from gateway.config import ConfigError, load_config, parse_host_overrides
    from gateway.policy.loader import PolicyLoadError
    from gateway.runtime import Gateway

    try:
        cfg = load_config(
            args.config, listen=args.listen, modes=tuple(args.mode) if args.mode else None,
            policies=args.policies, state_dir=args.state_dir,
            admin=("" if args.no_admin else args.admin), upstream_ca=tuple(args.upstream_ca) or None,
            audit=args.audit, engine=args.engine,
            extra_hosts=parse_host_overrides(args.host) if args.host else None,
        )
    except ConfigError as e:
        raise CliError(str(e)) from None
    try:
        gw = Gateway(cfg)
    except (ValueError, RuntimeError, OSError) as e:  # audit sinks, spool in use, unreadable files
        raise CliError(f"the gateway did not start: {e}", 2) from None
    try:
        gw.load_policies()
    except PolicyLoadError as e:
        gw.close()
        for p in e.problems:
            print(f"error: {p}", file=sys.stderr)
        raise CliError(f"policies in {cfg.policies} are invalid; the gateway did not start", 1) from None
    from gateway.master import run_gateway, setup_logging
    setup_logging(args.verbose)
    ps = gw.policies
    specs = ", ".join(f"{s.kind} on {s.host}:{s.port}" for s in cfg.mode_specs())
    print(f"egress gateway: {specs}; policies {cfg.policies} ({len(ps.policies)} policies, "
          f"{ps.rule_count} rules, version {ps.version})", file=sys.stderr)
    print(f"  state dir {Path(cfg.state_dir).resolve()}  audit {cfg.audit_dir} ({len(cfg.audit.sinks)} sink(s))  "
          f"admin {('http://' + cfg.admin) if cfg.admin else 'off'}", file=sys.stderr)
    print(f"  clients trust the gateway CA: {Path(cfg.state_dir).resolve() / 'ca' / 'mitmproxy-ca-cert.pem'} "
          f"(created on first start)", file=sys.stderr)
    try:
        asyncio.run(run_gateway(gw, verbose=args.verbose))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_gateway_ca(args) -> int:
    p = Path(args.state_dir).resolve() / "ca" / "mitmproxy-ca-cert.pem"
    if not p.exists():
        raise CliError(f"no gateway CA yet at {p}: start the gateway once (egress gateway run) to create it", 1)
    print(p)
    return 0


# -- tokens -------------------------------------------------------------------------------

def cmd_token_mint(args) -> int:
    from gateway import tokens
    from gateway.identity import load_or_create_signing_key

    key = load_or_create_signing_key(Path(args.state_dir) / "identity")
    try:
        tok = tokens.mint(key, tenant=args.tenant, agent=args.agent, session=args.session or "",
                          labels=dict(args.label or []), ttl_seconds=args.ttl)
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.json:
        c = tokens.verify(tok, tokens.VerifyKeys.from_private(key))
        print(json.dumps({"token": tok, "token_id": c.token_id, "tenant": c.tenant, "agent": c.agent,
                          "expires_at": c.expires_at}))
    else:
        print(tok)
    return 0


def cmd_token_inspect(args) -> int:
    from gateway import tokens
    from gateway.identity import load_or_create_signing_key

    key = load_or_create_signing_key(Path(args.state_dir) / "identity")
    try:
        raw = args.token if args.token not in (None, "-") else sys.stdin.readline()
        c = tokens.verify(raw.strip(), tokens.VerifyKeys.from_private(key))
    except tokens.TokenError as e:
        print(f"invalid token ({e.code}): {e}", file=sys.stderr)
        return 1
    print(json.dumps({"valid": True, "token_id": c.token_id, "tenant": c.tenant, "agent": c.agent,
                      "session": c.session, "labels": dict(c.labels), "issued_at": c.issued_at,
                      "expires_at": c.expires_at, "key_id": c.key_id}, indent=1))
    return 0


def _admin_call(args, method: str, path: str, body=None) -> dict:
    from gateway.admin import admin_token

    url = args.admin_url.rstrip("/") + path
    token = admin_token(args.state_dir) if (os.environ.get("EGRESS_ADMIN_TOKEN") or
                                            (Path(args.state_dir) / "admin-token").exists()) else ""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("message", "")
        except Exception:
            msg = ""
        raise CliError(f"admin API {method} {path}: HTTP {e.code} {msg}".rstrip(), 1) from None
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"cannot reach the admin API at {args.admin_url}: {getattr(e, 'reason', e)} "
                       f"(is the gateway running?)", 3) from None


def cmd_token_revoke(args) -> int:
    out = _admin_call(args, "POST", "/v1/revocations", {"token_id": args.token_id})
    print(f"revoked {out['revoked']}")
    return 0


def cmd_binding_add(args) -> int:
    out = _admin_call(args, "POST", "/v1/bindings", {"address": args.address, "tenant": args.tenant,
                                                     "agent": args.agent, "session": args.session or "",
                                                     "labels": dict(args.label or [])})
    print(json.dumps(out))
    return 0


def cmd_binding_remove(args) -> int:
    out = _admin_call(args, "DELETE", f"/v1/bindings/{args.address}")
    print(json.dumps(out))
    return 0


def cmd_binding_list(args) -> int:
    print(json.dumps(_admin_call(args, "GET", "/v1/bindings"), indent=1))
    return 0


def cmd_reload(args) -> int:
    out = _admin_call(args, "POST", "/v1/reload")
    print(json.dumps(out, indent=1))
    return 0 if out.get("ok") else 1


# -- local secret store -----------------------------------------------------------------------

def _store_op(args, op):
    """Run ``op(store)`` on the local store; bad names are usage errors (2),
    an unusable store is a failure (1)."""
    from gateway.secrets.local import LocalStore, StoreError
    try:
        return op(LocalStore(args.state_dir))
    except StoreError as e:
        raise CliError(str(e), 1) from None
    except ValueError as e:
        raise CliError(str(e)) from None


def cmd_secret_put(args) -> int:
    if sys.stdin.isatty():
        print(f"value for {args.name} (then Enter):", file=sys.stderr)
    value = sys.stdin.readline().rstrip("\r\n")
    _store_op(args, lambda st: st.put(args.name, value))
    print(f"stored {args.name} (local:{args.name})", file=sys.stderr)
    return 0


def cmd_secret_get(args) -> int:
    value = _store_op(args, lambda st: st.get(args.name))
    if value is None:
        raise CliError(f"no secret named {args.name}", 1)
    print(value)
    return 0


def cmd_secret_ls(args) -> int:
    for n in _store_op(args, lambda st: st.names()):
        print(n)
    return 0


def cmd_secret_rm(args) -> int:
    if not _store_op(args, lambda st: st.delete(args.name)):
        raise CliError(f"no secret named {args.name}", 1)
    return 0


def cmd_secret_check(args) -> int:
    """Resolve every reference the policies' inject blocks name; report (names only)."""
    import asyncio

    from gateway.config import ConfigError, load_config
    from gateway.runtime import build_secret_resolver
    from gateway.secrets.store import SecretUnavailable

    ps = _load_policies(args.policies, "rust")
    try:
        cfg = load_config(args.config, policies=args.policies, state_dir=args.state_dir)
    except ConfigError as e:
        raise CliError(str(e)) from None
    uses: dict = {}
    for pol in ps.policies:
        for rule in pol.rules:
            inj = getattr(rule, "inject", None)
            if inj is None:
                continue
            for r in inj.refs(frozenset(a for a, _ in inj.placeholders)):
                uses.setdefault(r, []).append(f"{pol.name}/{rule.name}")
    resolver = build_secret_resolver(cfg)

    async def check():
        out = []
        for ref, rules in uses.items():
            try:
                await resolver.resolve(ref)
                out.append((ref, rules, ""))
            except SecretUnavailable as e:
                out.append((ref, rules, e.reason))
        return out
    results = asyncio.run(check())
    missing = [r for r in results if r[2]]
    for ref, rules, reason in results:
        print(f"{'MISSING' if reason else 'ok':<8} {ref}  (used by {', '.join(rules)})"
              + (f": {reason}" if reason else ""))
    print(f"{len(results)} reference(s), {len(missing)} missing", file=sys.stderr)
    return 1 if missing else 0


# -- audit ----------------------------------------------------------------------------------------

def _audit_files(args) -> list[Path]:
    """Explicit files, else the spool's segments (``--dir``, else <state dir>/audit)."""
    from gateway.audit.query import default_files
    if getattr(args, "files", None):
        for f in args.files:
            if not Path(f).is_file():
                raise CliError(f"cannot read {f}: no such file", 1)
        return [Path(f) for f in args.files]
    d = Path(args.dir) if getattr(args, "dir", None) else Path(args.state_dir) / "audit"
    files = default_files(d)
    if not files:
        raise CliError(f"no audit spool segments in {d} (give --dir, --state-dir or files)", 1)
    return files


def _audit_filter(args):
    from gateway.audit.query import Filter, parse_time
    try:
        since = parse_time(args.since) if getattr(args, "since", None) else None
        until = parse_time(args.until) if getattr(args, "until", None) else None
    except ValueError as e:
        raise CliError(str(e)) from None
    return Filter(tenant=getattr(args, "tenant", None), agent=getattr(args, "agent", None),
                  decision=getattr(args, "decision", None), event=getattr(args, "event", None),
                  request_id=getattr(args, "request_id", None), host=getattr(args, "host", None),
                  since=since, until=until)


def _print_event(ev: dict, raw: bytes, fmt: str) -> None:
    from gateway.audit.formats import convert
    if fmt == "json":
        sys.stdout.write(raw.decode("utf-8", "replace") + "\n")
    else:
        sys.stdout.write(json.dumps(convert(ev, fmt), separators=(",", ":")) + "\n")


def cmd_audit_export(args) -> int:
    from gateway.audit.query import iter_events
    problems: list[str] = []
    flt = _audit_filter(args)
    joined = set() if flt.joins else None
    try:
        for ev, raw in iter_events(_audit_files(args), problems):
            if flt.match(ev, joined):
                _print_event(ev, raw, args.format)
    except OSError as e:
        raise CliError(f"cannot read {e.filename}: {e.strerror}", 1) from None
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


def cmd_audit_query(args) -> int:
    from gateway.audit.query import iter_events
    flt = _audit_filter(args)
    problems: list[str] = []
    n = 0
    counts: dict[tuple, int] = {}
    joined = set() if flt.joins else None
    try:
        for ev, raw in iter_events(_audit_files(args), problems):
            if not flt.match(ev, joined):
                continue
            n += 1
            if args.count:
                p = ev.get("principal") or {}
                key = (ev.get("event", ""), ev.get("decision", ""), p.get("tenant", ""), p.get("agent", ""))
                counts[key] = counts.get(key, 0) + 1
                continue
            _print_event(ev, raw, args.format)
            if args.limit and n >= args.limit:
                break
    except OSError as e:
        raise CliError(f"cannot read {e.filename}: {e.strerror}", 1) from None
    except BrokenPipeError:
        return 0
    if args.count:
        print(f"{'COUNT':>8}  {'EVENT':<20} {'DECISION':<9} {'TENANT':<20} AGENT")
        for (event, dec, tenant, agent), c in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"{c:>8}  {event:<20} {dec or '-':<9} {tenant or '-':<20} {agent or '-'}")
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{n} matching event(s)", file=sys.stderr)
    return 0


def cmd_audit_tail(args) -> int:
    import time as _time

    from gateway.audit.query import tail_raw
    flt = _audit_filter(args)
    joined = set() if flt.joins else None
    files = _audit_files(args)

    def show(raw: bytes) -> None:
        try:
            ev = json.loads(raw)
        except ValueError:
            return
        if flt.match(ev, joined):
            _print_event(ev, raw, args.format)

    try:
        for raw in tail_raw(files, args.lines):
            show(raw)
        sys.stdout.flush()
        if not args.follow:
            return 0
        # follow the spool: the newest segment, and the next ones as they appear
        from gateway.audit.spool import segment_files
        d = files[-1].parent
        cur, pos = files[-1], files[-1].stat().st_size
        buf = b""
        while True:
            with open(cur, "rb") as fh:
                fh.seek(pos)
                data = fh.read()
            pos += len(data)
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                if raw:
                    show(raw)
            sys.stdout.flush()
            newer = [f for f in segment_files(d) if f.name > cur.name]
            if newer and not data:
                cur, pos, buf = newer[0], 0, b""
                continue
            _time.sleep(0.25)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0


def cmd_audit_verify(args) -> int:
    from gateway.audit import verify_chain
    files = _audit_files(args)
    try:
        n, brk = verify_chain(files)
    except OSError as e:
        raise CliError(f"cannot read {e.filename}: {e.strerror}", 1) from None
    if brk is not None:
        print(f"BROKEN after {n} good event(s): {brk}")
        return 1
    print(f"ok: {n} event(s) in {len(files)} file(s), hash chain intact")
    return 0


def cmd_audit_status(args) -> int:
    """The spool and each sink's delivery position, read from the files (works with the gateway stopped)."""
    from gateway.audit.spool import Position, Segment, SEGMENT_RE, _backlog, segment_files
    d = Path(args.dir) if args.dir else Path(args.state_dir) / "audit"
    files = segment_files(d)
    if not files:
        raise CliError(f"no audit spool in {d}", 1)
    segs = [Segment(int(SEGMENT_RE.match(f.name).group(1)), f, f.stat().st_size) for f in files]
    total = sum(s.size for s in segs)
    print(f"spool {d}: {len(segs)} segment(s), {total / 1048576:.1f} MiB, events from seq {segs[0].first}")
    acks = sorted((d / "acks").glob("*.json"))
    if not acks:
        print("no sinks have delivered from this spool")
    for a in acks:
        try:
            j = json.loads(a.read_text())
            pos = Position(int(j["segment"]), int(j["offset"]), int(j.get("seq", 0)))
        except (ValueError, KeyError, OSError):
            print(f"  {a.stem}: acknowledgement file unreadable")
            continue
        print(f"  {a.stem}: delivered through seq {pos.seq}, backlog {_backlog(segs, pos) / 1048576:.2f} MiB")
    dl = sorted((d / "deadletter").glob("*.jsonl")) if (d / "deadletter").is_dir() else []
    for f in dl:
        n = sum(1 for line in open(f, "rb") if line.strip())
        print(f"  dead letters {f.name}: {n} event(s) a receiver refused")
    return 0


# -- policies ---------------------------------------------------------------------------------

def _load_policies(directory: str, engine: str = "rust"):
    from gateway.policytools import load_policy_set
    return load_policy_set(directory, engine, code=1)


def cmd_policy_check(args) -> int:
    ps = _load_policies(args.directory, args.engine)
    if args.json:
        print(json.dumps({"ok": True, "version": ps.version, "fingerprint": ps.fingerprint,
                          "policies": len(ps.policies), "rules": ps.rule_count,
                          "policy_fingerprints": ps.policy_fingerprints, "files": [str(f) for f in ps.files]}))
    else:
        print(f"ok: {len(ps.files)} files, {len(ps.policies)} policies, {ps.rule_count} rules, "
              f"version {ps.version}, fingerprint {ps.fingerprint}")
    return 0


def cmd_policy_decide(args) -> int:
    from gateway.config import ConfigError, parse_host_overrides
    from gateway.policytools.ptest import CaseError, build_case

    ps = _load_policies(args.policies, args.engine)
    headers = {}
    for h in args.header or []:
        k, _, v = h.partition(":")
        headers[k.strip().lower()] = v.strip()
    try:
        hosts = parse_host_overrides(args.host) if args.host else None
        principal, req, dest = build_case(
            {"tenant": args.tenant, "agent": args.agent, "session": args.session or "",
             "labels": dict(args.label or [])},
            {"method": args.method, "url": args.url, "headers": headers},
            args.address or None, hosts, resolve_dns=True, strict=False)
    except ConfigError as e:
        raise CliError(str(e)) from None
    except CaseError as e:
        raise CliError(f"--address: {e.message}" if e.field == "addresses" else e.message) from None
    d = ps.decide(principal, req, dest)
    out = d.to_dict()
    out["applicable_policies"] = ps.applicable(principal)
    out["destination"] = {"ips": [str(c.address) for c in dest.addresses],
                          "classes": [c.klass.value for c in dest.addresses], "error": dest.error}
    out["dial"] = d.dial
    print(json.dumps(out, indent=1))
    return 0 if d.allowed else 1


# -- parser -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="egress", formatter_class=fmt,
                                description="Egress gateway and policy engine for sandboxed agent code.",
                                epilog=EPILOG_MAIN)
    sub = p.add_subparsers(dest="group", metavar="{gateway,token,binding,secret,audit,policy}")
    sub.required = True

    def state(sp):
        sp.add_argument("--state-dir", default=os.environ.get("EGRESS_STATE_DIR", ".state"),
                        help="gateway state dir: signing key, CA, bindings, audit (default .state or $EGRESS_STATE_DIR)")

    def principal_args(sp):
        sp.add_argument("--tenant", required=True, help="tenant (letters, digits, . _ : -)")
        sp.add_argument("--agent", required=True, help="agent name")
        sp.add_argument("--session", help="session id (optional)")
        sp.add_argument("--label", action="append", type=parse_label, metavar="KEY=VALUE",
                        help="label for policy selectors, repeatable (e.g. registries=read)")

    def admin(sp):
        state(sp)
        sp.add_argument("--admin-url", default=os.environ.get("EGRESS_ADMIN_URL", "http://127.0.0.1:8081"),
                        help="admin API of the running gateway (default http://127.0.0.1:8081 or $EGRESS_ADMIN_URL)")

    # gateway
    g = sub.add_parser("gateway", help="run the gateway").add_subparsers(dest="cmd", metavar="{run,ca}")
    g.required = True
    run = g.add_parser("run", formatter_class=fmt, help="start the proxy and admin API",
                       description="Start the egress gateway (lean mitmproxy master + policy engine).",
                       epilog="""examples:
  egress gateway run
  egress gateway run --listen 0.0.0.0:3128 --mode explicit --mode transparent@0.0.0.0:3129
  egress gateway run --host billing.internal=10.20.0.5 --upstream-ca corp-ca.pem
  egress gateway run --config /etc/egress/gateway.yaml

Policies are re-read when their files change, on SIGHUP and on POST /v1/reload;
an invalid set is rejected and the last good one stays in force.""")
    run.add_argument("--config", help="YAML configuration file (flags override it)")
    run.add_argument("--listen", help="explicit proxy HOST:PORT (default 127.0.0.1:8080)")
    run.add_argument("--mode", action="append",
                     help="explicit | transparent[@HOST:PORT]; repeat for both (default explicit)")
    run.add_argument("--policies", help="policy directory (default: the bundled policies/default)")
    run.add_argument("--state-dir", default=None, help="state directory (default .state)")
    run.add_argument("--admin", help="admin API HOST:PORT (default 127.0.0.1:8081)")
    run.add_argument("--no-admin", action="store_true", help="do not start the admin API")
    run.add_argument("--host", action="append", metavar="NAME=ADDRESS",
                     help="static host override (repeatable), e.g. billing.internal=10.20.0.5")
    run.add_argument("--upstream-ca", action="append", default=[], metavar="FILE",
                     help="extra CA trusted for upstream TLS, added to the system bundle (repeatable)")
    run.add_argument("--audit", metavar="DIR", help="audit spool directory (default <state dir>/audit)")
    run.add_argument("--engine", choices=("rust", "python"), help="CEL engine (default rust)")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(func=cmd_gateway_run)
    ca = g.add_parser("ca", help="print the path of the gateway CA certificate clients must trust")
    state(ca)
    ca.set_defaults(func=cmd_gateway_ca)

    # token
    t = sub.add_parser("token", help="identity tokens").add_subparsers(dest="cmd", metavar="{mint,inspect,revoke}")
    t.required = True
    m = t.add_parser("mint", formatter_class=fmt, help="mint a signed identity token",
                     description="Mint a signed identity token (Ed25519) with the gateway's key.",
                     epilog="""examples:
  TOKEN=$(egress token mint --tenant demo --agent a1 --label registries=read --ttl 2h)
  HTTPS_PROXY=http://x:$TOKEN@127.0.0.1:8080 pip download requests
  curl -x http://x:$TOKEN@127.0.0.1:8080 http://demo.localhost:8000/""")
    principal_args(m)
    m.add_argument("--ttl", type=parse_duration, default=3600, help="lifetime: 90s, 30m, 1h, 7d (default 1h; max 30d)")
    m.add_argument("--json", action="store_true", help="print token, id and expiry as JSON")
    state(m)
    m.set_defaults(func=cmd_token_mint)
    ins = t.add_parser("inspect", help="verify a token (read from stdin) and print its claims")
    ins.add_argument("token", nargs="?", default="-",
                     help="the token, or - (default) to read it from stdin so it stays out of `ps`")
    state(ins)
    ins.set_defaults(func=cmd_token_inspect)
    rv = t.add_parser("revoke", help="revoke a token by id (through the admin API)")
    rv.add_argument("token_id")
    admin(rv)
    rv.set_defaults(func=cmd_token_revoke)

    # bindings
    b = sub.add_parser("binding", help="source-address bindings for transparent mode").add_subparsers(
        dest="cmd", metavar="{add,remove,list}")
    b.required = True
    ba = b.add_parser("add", help="bind a source address to a principal")
    ba.add_argument("address")
    principal_args(ba)
    admin(ba)
    ba.set_defaults(func=cmd_binding_add)
    br = b.add_parser("remove", help="remove a binding")
    br.add_argument("address")
    admin(br)
    br.set_defaults(func=cmd_binding_remove)
    bl = b.add_parser("list", help="list bindings")
    admin(bl)
    bl.set_defaults(func=cmd_binding_list)

    # secrets (local store)
    sec = sub.add_parser("secret", help="the local encrypted secret store").add_subparsers(
        dest="cmd", metavar="{put,get,ls,rm,check}")
    sec.required = True
    sp = sec.add_parser("put", formatter_class=fmt, help="store a secret (value read from stdin, never argv)",
                        epilog="""examples:
  printf %s "$GITHUB_TOKEN" | egress secret put github/token
  # then, in a policy rule: inject: {headers: {authorization: "Bearer ${local:github/token}"}}""")
    sp.add_argument("name")
    state(sp)
    sp.set_defaults(func=cmd_secret_put)
    sg = sec.add_parser("get", help="print a secret's value (for operators; it is the secret)")
    sg.add_argument("name")
    state(sg)
    sg.set_defaults(func=cmd_secret_get)
    sl = sec.add_parser("ls", help="list secret names (never values)")
    state(sl)
    sl.set_defaults(func=cmd_secret_ls)
    sc = sec.add_parser("check", help="resolve every secret reference in a policy set (names only, never values)")
    sc.add_argument("policies", nargs="?", default=str(Path(__file__).resolve().parent.parent / "policies" / "default"))
    sc.add_argument("--config", help="gateway configuration file (for its vault settings)")
    state(sc)
    sc.set_defaults(func=cmd_secret_check)
    sr = sec.add_parser("rm", help="delete a secret")
    sr.add_argument("name")
    state(sr)
    sr.set_defaults(func=cmd_secret_rm)

    # audit
    au = sub.add_parser("audit", help="audit events: tail, query, export, verify, status").add_subparsers(
        dest="cmd", metavar="{tail,query,export,verify,status}")
    au.required = True

    def source(sp, files=True):
        if files:
            sp.add_argument("files", nargs="*", help="audit files in order, plain or .gz (default: the spool's "
                                                      "segments)")
        sp.add_argument("--dir", help="audit spool directory (default <state dir>/audit)")
        state(sp)

    def filters(sp):
        g = sp.add_argument_group("filters (all must match)")
        g.add_argument("--tenant")
        g.add_argument("--agent")
        g.add_argument("--decision", choices=("allow", "deny"))
        g.add_argument("--event", help="event type: decision, request_completed, policy_reload, sink_failure, ...")
        g.add_argument("--request-id")
        g.add_argument("--host", help="destination host")
        g.add_argument("--since", help="time: 2026-12-01T10:00:00Z, 2026-12-01, or relative 15m, 2h, 7d (ago)")
        g.add_argument("--until", help="time, same forms as --since")

    def fmt_arg(sp):
        sp.add_argument("--format", choices=("json", "ocsf", "ecs"), default="json",
                        help="json: the events as spooled (chain fields intact); ocsf: HTTP Activity (4002); ecs")

    ta = au.add_parser("tail", formatter_class=fmt, help="show the latest events; -f follows the spool",
                       epilog="""examples:
  egress audit tail                        # the last 10 events
  egress audit tail -f --decision deny     # follow denies as they happen""")
    ta.add_argument("-n", "--lines", type=int, default=10, help="how many recent events (default 10)")
    ta.add_argument("-f", "--follow", action="store_true", help="keep printing new events (Ctrl-C stops)")
    fmt_arg(ta)
    filters(ta)
    source(ta, files=False)
    ta.set_defaults(func=cmd_audit_tail, files=None)
    q = au.add_parser("query", formatter_class=fmt, help="find events by tenant, agent, decision, time range",
                      epilog="""examples:
  egress audit query --tenant acme --decision deny --since 1h
  egress audit query --agent build-bot --since 2026-12-01 --until 2026-12-02 --format ocsf
  egress audit query --since 1d --count                 # counts by event, decision, tenant, agent
  egress audit query --request-id 3f2a...               # a request's decision and completion""")
    filters(q)
    fmt_arg(q)
    q.add_argument("--count", action="store_true", help="print counts instead of events")
    q.add_argument("--limit", type=int, default=0, help="stop after this many events")
    source(q)
    q.set_defaults(func=cmd_audit_query)
    ex = au.add_parser("export", formatter_class=fmt, help="print audit events as JSON, OCSF or ECS (one per line)",
                       epilog="""examples:
  egress audit export --format ocsf                      # the spool as OCSF HTTP Activity (4002)
  egress audit export --format ecs --since 1d > ecs.ndjson
  egress audit export --format ocsf /var/log/egress/audit-*.jsonl.gz""")
    fmt_arg(ex)
    filters(ex)
    source(ex)
    ex.set_defaults(func=cmd_audit_export)
    ve = au.add_parser("verify", formatter_class=fmt,
                       help="check the hash chain of audit files; report the first break",
                       epilog="""examples:
  egress audit verify                                   # the spool's segments
  egress audit verify $(ls /var/log/egress/audit-*.jsonl.gz) /var/log/egress/audit.jsonl""")
    source(ve)
    ve.set_defaults(func=cmd_audit_verify)
    st = au.add_parser("status", help="spool size and each sink's delivery position and backlog")
    st.add_argument("--dir", help="audit spool directory (default <state dir>/audit)")
    state(st)
    st.set_defaults(func=cmd_audit_status)

    # policy
    pol = sub.add_parser("policy", help="check policies and explain decisions").add_subparsers(
        dest="cmd", metavar="{check,decide,reload,test,explain,lint,replay}")
    pol.required = True
    c = pol.add_parser("check", help="compile every policy file; report problems with file:line:column")
    c.add_argument("directory", nargs="?", default=str(Path(__file__).resolve().parent.parent / "policies" / "default"))
    c.add_argument("--engine", choices=("rust", "python"), default="rust")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_policy_check)
    d = pol.add_parser("decide", formatter_class=fmt, help="decide a hypothetical request offline",
                       description="Decide one request against a policy directory, without sending it.",
                       epilog="""examples:
  egress policy decide --tenant demo --agent a1 GET http://demo.localhost:8000/
  egress policy decide --tenant demo --agent a1 GET http://169.254.169.254/latest/meta-data/
  egress policy decide --tenant demo --agent a1 --address 10.0.0.5 GET https://example.com/

exit status: 0 allowed, 1 denied""")
    d.add_argument("method")
    d.add_argument("url")
    principal_args(d)
    d.add_argument("--header", action="append", metavar="'NAME: VALUE'")
    d.add_argument("--address", action="append", help="pretend the host resolves to this address (repeatable)")
    d.add_argument("--host", action="append", metavar="NAME=ADDRESS", help="static host override")
    d.add_argument("--policies", default=str(Path(__file__).resolve().parent.parent / "policies" / "default"))
    d.add_argument("--engine", choices=("rust", "python"), default="rust")
    d.set_defaults(func=cmd_policy_decide)
    rl = pol.add_parser("reload", help="ask the running gateway to reload its policies now")
    admin(rl)
    rl.set_defaults(func=cmd_reload)
    from gateway.policytools import register_all
    register_all(pol, fmt)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(f"egress: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
