"""``egress policy explain``: why one request is allowed or denied.

Prints every policy and rule considered for one request, each expression's
value (or evaluation error), the destination checks (DNS, SSRF: which address,
which ``allow_internal``), the shadow outcome, the secret references the
winning rule would inject (names only, never values), the dial address and why
the winner won. The trace comes from ``PolicySet.explain``
(gateway.policy.engine), which uses the gateway's own plan, route, CEL input
and precedence, and whose final decision is ``PolicySet.decide``'s: when
explain's own derivation ever disagrees with it, a loud error is printed.

The request is given like ``egress policy decide`` takes it (METHOD URL,
--tenant/--agent/...), built by ``gateway.policytools.ptest.build_case``; or
taken from a recorded decision event (``--request-id ID --audit PATH``,
rebuilt by ``gateway.policytools.records.case_from_event``), in which case
what the record lacks is listed and the re-decided outcome is compared with
the recorded one.

Exit status: 0 allowed, 1 denied, 2 bad input (bad request, unknown request
id, a policy set that does not load).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from gateway.clierror import CliError
from gateway.policytools import load_policy_set

DEFAULT_POLICIES = str(Path(__file__).resolve().parent.parent.parent / "policies" / "default")

EPILOG = """\
examples:
  egress policy explain --tenant demo --agent a1 GET http://demo.localhost:8000/
  egress policy explain --tenant acme --agent a1 --label team=red \\
      --header 'x-debug: on' POST https://api.github.com/repos/acme/x/issues
  egress policy explain --tenant demo --agent a1 --address 10.0.0.5 GET https://example.com/
  egress policy explain --request-id 3f2a9c... --audit .state/audit     # a recorded decision
  egress policy explain --format json --tenant demo --agent a1 GET http://demo.localhost:8000/

Every candidate rule is evaluated, even after the outcome is known; rules the
gateway itself skips (they cannot change the outcome) are marked. Header
values are not recorded in audit events: give them with --header when
explaining a recorded request.

exit status: 0 allowed, 1 denied, 2 bad input"""


def register(policy_subparsers, fmt) -> None:
    e = policy_subparsers.add_parser(
        "explain", formatter_class=fmt, help="show every policy and rule considered for one request, and why",
        description="Explain one decision: every policy and rule considered, each expression's value, the "
                    "destination checks and why the winner won. The decision is the gateway's own "
                    "(PolicySet.decide).",
        epilog=EPILOG)
    e.add_argument("method", nargs="?", help="HTTP method (not with --request-id)")
    e.add_argument("url", nargs="?", help="absolute URL (not with --request-id)")
    e.add_argument("--tenant", help="tenant (required unless --request-id)")
    e.add_argument("--agent", help="agent name (required unless --request-id)")
    e.add_argument("--session", help="session id (optional)")
    e.add_argument("--label", action="append", type=_parse_label, metavar="KEY=VALUE",
                   help="label for policy selectors, repeatable (e.g. registries=read)")
    e.add_argument("--header", action="append", metavar="'NAME: VALUE'",
                   help="request header, repeatable (with --request-id: supplies values the record lacks)")
    e.add_argument("--address", action="append",
                   help="pretend the host resolves to this address (repeatable; with --request-id: "
                        "replaces the recorded addresses)")
    e.add_argument("--host", action="append", metavar="NAME=ADDRESS", help="static host override")
    e.add_argument("--now", metavar="TIME", help="the request time CEL sees as `now` (ISO 8601; default: "
                                                 "the clock, or the recorded event's time)")
    e.add_argument("--request-id", metavar="ID", help="explain the request of this recorded decision event")
    e.add_argument("--audit", metavar="PATH",
                   help="audit events to search for --request-id: a .jsonl(.gz) file, a spool directory "
                        "(seg-*.jsonl) or a state directory (default <state dir>/audit, $EGRESS_STATE_DIR "
                        "or .state)")
    e.add_argument("--policies", default=DEFAULT_POLICIES, help="policy directory (default: the bundled "
                                                                "policies/default)")
    e.add_argument("--engine", choices=("rust", "python"), default="rust")
    e.add_argument("--format", choices=("text", "json"), default="text",
                   help="text: a readable tree (default); json: the full trace")
    e.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="highlight the winner in text output (auto: when stdout is a terminal)")
    e.set_defaults(func=cmd_policy_explain)


def _parse_label(text: str) -> tuple[str, str]:
    import argparse
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"invalid label {text!r} (use KEY=VALUE)")
    return k, v


def _error(message: str) -> CliError:
    return CliError(message, 2)


# -- inputs -----------------------------------------------------------------------------------

def _headers(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in items or []:
        k, sep, v = h.partition(":")
        if not sep or not k.strip():
            raise _error(f"--header: expected 'NAME: VALUE', got {h!r}")
        out[k.strip().lower()] = v.strip()
    return out


def _hosts(items: list[str] | None) -> dict[str, tuple[str, ...]] | None:
    if not items:
        return None
    from gateway.config import ConfigError, parse_host_overrides
    try:
        return parse_host_overrides(items)
    except ConfigError as e:
        raise _error(str(e)) from None


def _now(text: str | None) -> _dt.datetime | None:
    if not text:
        return None
    try:
        d = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _error(f"--now: not an ISO 8601 time: {text!r}") from None
    return d if d.tzinfo else d.replace(tzinfo=_dt.timezone.utc)


def _load(directory: str, engine: str):
    return load_policy_set(directory, engine, code=2)


def case_from_args(args):
    """(principal, request, destination) from the command line, the way
    ``egress policy decide`` builds them (ptest.build_case, not strict)."""
    from gateway.policytools.ptest import CaseError, build_case

    if not args.method or not args.url:
        raise _error("give METHOD URL (or --request-id ID)")
    if not args.tenant or not args.agent:
        raise _error("--tenant and --agent are required (unless --request-id)")
    principal = {"tenant": args.tenant, "agent": args.agent, "session": args.session or "",
                 "labels": dict(args.label or [])}
    request = {"method": args.method, "url": args.url, "headers": _headers(args.header)}
    try:
        return build_case(principal, request, args.address, _hosts(args.host), now=_now(args.now),
                          resolve_dns=True, strict=False)
    except CaseError as e:
        raise _error(e.message) from None


def _default_audit() -> str:
    return os.path.join(os.environ.get("EGRESS_STATE_DIR", ".state"), "audit")


def find_event(paths: list[str], request_id: str) -> tuple[dict, str]:
    """The ``decision`` event of ``request_id`` (the last one, if repeated)
    and where it is (file:line)."""
    from gateway.policytools.records import AuditPathError, Reader

    try:
        reader = Reader(paths)
        found = None
        for ev in reader:
            if ev.get("event") == "decision" and ev.get("request_id") == request_id:
                found = (ev, reader.where)
    except AuditPathError as e:
        raise _error(str(e)) from None
    if found is None:
        raise _error(f"no decision event with request id {request_id!r} in {', '.join(paths)}")
    return found


def case_from_record(args):
    """(principal, request, destination, record info) for --request-id."""
    import dataclasses

    from gateway.policytools.ptest import CaseError, build_destination
    from gateway.policytools.records import NotReplayable, case_from_event

    for name in ("method", "url", "tenant", "agent", "session", "label"):
        if getattr(args, name):
            flag = name.upper() if name in ("method", "url") else f"--{name}"
            raise _error(f"{flag} cannot be used with --request-id: the request comes from the record")
    audit = args.audit or _default_audit()
    event, where = find_event([audit], args.request_id)
    try:
        case = case_from_event(event)
    except NotReplayable as e:
        raise _error(f"request {args.request_id} cannot be explained ({e.kind}): {e}") from None
    request, destination = case.request, case.destination
    supplied = []
    if args.header:
        request = dataclasses.replace(request, headers={**request.headers, **_headers(args.header)})
        supplied.append("request.headers (from --header)")
    if args.now:
        request = dataclasses.replace(request, at=_now(args.now))
        supplied.append("now (from --now)")
    if args.address or args.host:
        try:
            destination = build_destination(request.host, request.port, args.address, _hosts(args.host),
                                            resolve_dns=False)
        except CaseError as e:
            raise _error(e.message) from None
        supplied.append("destination (from --address/--host)")
    info = {"request_id": case.recorded.request_id, "where": where, "ts": case.recorded.ts,
            "recorded": case.recorded, "unknowns": list(case.unknowns), "supplied": supplied,
            "connect": case.is_connect, "url": case.url}
    return case.principal, request, destination, info


# -- what the record lacks ----------------------------------------------------------------------

_UNKNOWN_TEXT = {
    "request.headers": "header values are never recorded; the request is re-decided without headers "
                       "(give them with --header 'name: value')",
    "request.query": "query values were redacted (name=REDACTED); rules see the redacted query",
    "now": "the decision time is approximated by the event's ts",
    "destination": "the recorded address classes differ from what the addresses classify as now",
}


def _reads(rule, what: str) -> bool:
    use = rule.use
    if use is None:
        return True
    if what == "now":
        return "now" in use.fields
    if what == "destination":
        return "destination" in use.fields
    req = use.fields.get("request", set()) if "request" in use.fields else set()
    field = what.split(".", 1)[1]
    return req is None or field in req


def record_report(ps, trace, info) -> dict[str, Any]:
    """What the record lacks (and which considered rules read it), and the
    recorded vs re-decided outcome."""
    rules = {r.id: r for p in ps.policies for r in p.rules}
    considered = [r.id for r in trace.rules() if r.status == "evaluated"]
    lacks = []
    supplied = {text.split(" ", 1)[0] for text in info["supplied"]}  # "request.headers (from --header)"
    for u in info["unknowns"]:
        if u in supplied:
            continue
        readers = [rid for rid in considered if rid in rules and _reads(rules[rid], u)]
        if u == "destination":
            matters = True  # the destination checks always read it
        else:
            matters = bool(readers)
        lacks.append({"input": u, "what": _UNKNOWN_TEXT.get(u, u), "read_by": readers, "matters": matters})
    rec = info["recorded"]
    d = trace.decision
    same = (rec.decision, rec.code, rec.rule) == (d.action, d.code, d.rule)
    notes = []
    if rec.policy_version and rec.policy_version != d.policy_version:
        notes.append(f"the policy set changed since: recorded under {rec.policy_version}, "
                     f"re-decided under {d.policy_version}")
    engine_codes = {"allowed", "policy_deny", "default_deny", "ssrf_blocked", "dns_failure"}
    if rec.code and rec.code not in engine_codes:
        notes.append(f"the recorded code {rec.code} comes from the gateway around the policy decision "
                     "(identity, audit, secrets, the gateway's own address...), not from the policies")
    if info["connect"]:
        notes.append("the record is a CONNECT refused before the tunnel opened (the pre-check, "
                     "PolicySet.could_allow, on the host alone); below is the full decision of a request "
                     "to that host")
    if not same and any(x["matters"] for x in lacks):
        notes.append("the outcome may differ because of what the record lacks (see above)")
    return {"request_id": info["request_id"], "where": info["where"], "ts": info["ts"],
            "recorded": {"decision": rec.decision, "code": rec.code, "rule": rec.rule,
                         "reason": rec.reason, "policy_version": rec.policy_version},
            "redecided": {"decision": d.action, "code": d.code, "rule": d.rule, "reason": d.reason,
                          "policy_version": d.policy_version},
            "same": same, "lacks": lacks, "supplied": list(info["supplied"]), "notes": notes}


# -- command ------------------------------------------------------------------------------------

def cmd_policy_explain(args) -> int:
    return _explain(args)


def _explain(args) -> int:
    if args.request_id:
        ps = _load(args.policies, args.engine)
        principal, request, destination, info = case_from_record(args)
    else:
        if args.audit:
            raise _error("--audit needs --request-id")
        ps = _load(args.policies, args.engine)
        principal, request, destination = case_from_args(args)
        info = None
    trace = ps.explain(principal, request, destination)
    out = trace.to_dict()
    record = None
    if info is not None:
        record = record_report(ps, trace, info)
        out["record"] = record
        if info["connect"]:
            pre = ps.could_allow(principal, request.host, destination)
            out["record"]["precheck"] = None if pre is None else {
                "decision": pre.action, "code": pre.code, "rule": pre.rule, "reason": pre.reason}
    if args.format == "json":
        print(json.dumps(out, indent=1, ensure_ascii=False))
    else:
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty()
                                           and not os.environ.get("NO_COLOR"))
        sys.stdout.write(render_text(trace, record, color=color))
    if not trace.consistent:
        bar = "!" * 78
        print(f"{bar}\nEXPLAIN DISAGREES WITH DECIDE - this is a bug in the policy engine or in explain.\n"
              f"The decision shown is PolicySet.decide's; the trace around it may be wrong:\n"
              + "\n".join(f"  - {m}" for m in trace.mismatches) + f"\n{bar}", file=sys.stderr)
    return 0 if trace.decision.allowed else 1


# -- text output ----------------------------------------------------------------------------------

MARK_TRUE, MARK_FALSE, MARK_ERROR, MARK_SKIP = "✓", "✗", "!", "-"


class _Style:
    def __init__(self, on: bool):
        self.on = on

    def _w(self, code: str, s: str) -> str:
        return f"\x1b[{code}m{s}\x1b[0m" if self.on else s

    def bold(self, s): return self._w("1", s)
    def green(self, s): return self._w("32", s)
    def red(self, s): return self._w("31", s)
    def yellow(self, s): return self._w("33", s)
    def dim(self, s): return self._w("2", s)
    def win(self, s): return f"\x1b[1;7m {s} \x1b[0m" if self.on else f"<== {s}"


def _marked(s, value, error, *, other: str | None = None) -> tuple[str, str]:
    """(mark, shown value) of an evaluated expression: error, true, or anything else
    (``other``: the mark for a value that is neither true nor false)."""
    if error is not None:
        return s.yellow(MARK_ERROR), s.yellow(f"error: {error}")
    if value is True:
        return s.green(MARK_TRUE), "true"
    if other is not None and value is not False:
        return other, _val(value)
    return s.dim(MARK_FALSE), _val(value)


def _val(v: Any) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    try:
        return json.dumps(v, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(v)


def _indent_expr(text: str, pad: str) -> str:
    lines = text.strip("\n").split("\n")
    return ("\n" + pad).join(line.rstrip() for line in lines)


def _url(req: dict) -> str:
    scheme, host, port = req["scheme"], req["host"], req["port"]
    default = {"http": 80, "ws": 80, "https": 443, "wss": 443}.get(scheme)
    h = f"[{host}]" if ":" in host else host
    netloc = h if port == default else f"{h}:{port}"
    q = f"?{req['query']}" if req.get("query") else ""
    return f"{scheme}://{netloc}{req['path']}{q}"


def render_text(trace, record: dict | None = None, *, color: bool = False) -> str:
    s = _Style(color)
    d = trace.decision
    req, p = trace.request, trace.principal
    out: list[str] = []
    w = out.append

    labels = ", ".join(f"{k}={v}" for k, v in sorted(p["labels"].items()))
    w(s.bold(f"{req['method']} {_url(req)}"))
    w(f"  principal    tenant={p['tenant']} agent={p['agent']}"
      + (f" session={p['session']}" if p["session"] else "") + (f" labels: {labels}" if labels else "")
      + f" (via {p['source']})")
    hdrs = ", ".join(sorted(req.get("headers", {}))) or "(none)"
    w(f"  request      mode={req['mode']} sni={req['sni'] or '-'} headers: {hdrs}")
    w(f"  now          {trace.now}")
    dst = trace.destination
    if dst["error"]:
        w(f"  destination  {s.red('did not resolve')}: {dst['error']} (via {dst['via']})")
    else:
        w("  destination  " + (", ".join(f"{a.address} ({a.klass})" for a in trace.addresses) or "(no address)")
          + f" via {dst['via']}")
    n_rules = sum(len(pt.rules) for pt in trace.policies)
    w(f"  policy set   {trace.policy_version}, {len(trace.policies)} policies, {n_rules} rules, "
      f"{trace.engine} engine")

    if record is not None:
        w("")
        w(s.bold(f"Recorded request {record['request_id']}") + f"  ({record['where']}, {record['ts']})")
        rec, red = record["recorded"], record["redecided"]
        w(f"  recorded     {rec['decision']} {rec['code']} {rec['rule'] or '-'}  (policy {rec['policy_version']})")
        verdict = s.green("same") if record["same"] else s.red("DIFFERENT")
        w(f"  re-decided   {red['decision']} {red['code']} {red['rule'] or '-'}  -> {verdict}")
        if record["lacks"]:
            w("  the record lacks:")
            for x in record["lacks"]:
                who = (f"; read by the rules considered: {', '.join(x['read_by'])}" if x["read_by"]
                       else ("" if x["input"] == "destination" else "; no rule considered reads it"))
                w(f"    - {x['input']}: {x['what']}{who}")
        for sup in record["supplied"]:
            w(f"  supplied     {sup}")
        pre = record.get("precheck", "absent")
        if pre != "absent":
            w("  pre-check    " + ("would open the tunnel" if pre is None else
                                   f"{pre['decision']} {pre['code']} {pre['rule'] or '-'}: {pre['reason']}"))
        for n in record["notes"]:
            w(f"  note         {n}")

    w("")
    w(s.bold("Policies") + " (file order; rules in order)")
    width = max([len(pt.name) for pt in trace.policies] + [4])
    for pt in trace.policies:
        mark, sv = _marked(s, pt.selector_value, pt.selector_error)
        head = f"  {mark} {pt.name:<{width}}  {pt.mode:<7}  {pt.file}:{pt.line}"
        w(head if pt.applicable else s.dim(head))
        w(f"      selector  {_indent_expr(pt.selector, ' ' * 16)}  -> {sv}")
        if not pt.applicable:
            w(s.dim(f"      not applicable: {pt.why}; {len(pt.rules)} rule(s) not considered"))
            continue
        if pt.selector_error is not None:
            w(s.yellow(f"      {pt.why}"))
        rwidth = max(len(r.id) for r in pt.rules)
        for r in pt.rules:
            _render_rule(w, s, r, rwidth, trace)
    w("")
    w(s.bold("Destination checks"))
    for c in trace.checks:
        w(f"  {c}")

    w("")
    verdict = s.green("ALLOW") if d.allowed else s.red("DENY")
    w(s.bold("Decision: ") + f"{verdict}  code={d.code}  rule={d.rule or '-'}")
    w(f"  reason     {d.reason}")
    w(f"  dial       {d.dial or '-'}")
    w(f"  version    {d.policy_version}")
    w(s.bold("Why"))
    for line in trace.why:
        w(f"  - {line}")
    if trace.inject is not None:
        inj = trace.inject
        state = "injected" if inj["applied"] else "not injected (the request is denied)"
        w(s.bold("Injection") + f" by {inj['rule']}, {state}; secret references (names only):")
        for name, refs in inj["headers"].items():
            w(f"  header {name}: {', '.join(refs) or '(no reference)'}")
        for alias, ref in inj["placeholders"].items():
            w(f"  placeholder egress-secret:{alias} -> {ref}")
        if inj["allow_plaintext"]:
            w("  allow_plaintext: true")
    if d.shadow is not None:
        sh = d.shadow
        w(s.bold("Shadow outcome: ") + f"{sh.action.upper()}  code={sh.code}  rule={sh.rule or '-'}")
        for line in trace.shadow_why:
            w(f"  - {line}")
    skipped = sum(1 for r in trace.rules() if r.status == "evaluated" and not r.gateway_evaluates)
    w(s.dim(f"decide evaluates {d.evaluated} expression(s)" + (f"; explain also ran {skipped} it skips"
                                                                  if skipped else "")))
    if d.errors:
        w("errors decide reports:")
        for e in d.errors:
            w(f"  - {e}")
    if not trace.consistent:
        w(s.red("EXPLAIN DISAGREES WITH DECIDE (see stderr)"))
    return "\n".join(out) + "\n"


def _render_rule(w, s: _Style, r, width: int, trace) -> None:
    pad = " " * 10
    tag = f"{r.action:<5} {r.id:<{width}}"
    if r.status != "evaluated":
        w(s.dim(f"    {MARK_SKIP} {tag}  skipped: {r.note}"))
        return
    if r.error is not None:
        mark = s.yellow(MARK_ERROR)
        value = s.yellow(f"error: {r.error}") + " -> " + ("match (fail closed)" if r.matched else "no match")
    elif r.matched:
        mark, value = s.green(MARK_TRUE), "true"
    else:
        mark, value = s.dim(MARK_FALSE), "false"
    is_winner = r.id == trace.winner and r.role.startswith(("WINNER", "won"))
    line = f"  {'▶' if is_winner else ' '} {mark} {tag}  {value}"
    if r.shadow:
        line += s.dim("  [shadow]")
    if r.role:
        line += "  " + (s.win(r.role) if is_winner else f"<- {r.role}")
    w(line)
    w(f"{pad}when {_indent_expr(r.when, pad + '     ')}")
    for t in r.terms:
        tm, tv = _marked(s, t.value, t.error, other="?")
        w(f"{pad}  {r.op} {tm} {_indent_expr(t.text, pad + '       ')}  -> {tv}")
    notes = [n for n in r.note.split("; ") if n] if r.note else []
    for n in notes:
        w(s.dim(f"{pad}({n})"))
