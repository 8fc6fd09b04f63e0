"""The mitmproxy addon: a thin shell that turns flows into policy decisions.

Per request it (1) establishes who is calling (token in Proxy-Authorization in
explicit mode, source-address binding in transparent mode), (2) checks that
CONNECT target, TLS SNI and Host agree, (3) resolves the destination once and
classifies every address, (4) asks the pure policy engine, (5) audits and
counts the decision, and (6) either answers with a structured deny or pins
the upstream connection to the address that was checked.

Pinning: after an allow, ``request.data.host`` is set to the checked address
(the Host header and :authority are left alone), so mitmproxy dials that
address and re-uses connections per address; ``server_connect`` restores the
TLS SNI (and so the certificate name that is verified) to the host name, and
refuses any connection to an address that was not checked for this client.

Used by ``egress gateway run`` (on the lean master, gateway.master) and by
``mitmdump -s gateway/mitmdump_entry.py`` (options ``egress_*``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import TransparentMode

from gateway.config import GatewayConfig, load_config, parse_host_overrides
from gateway.policy.model import (
    CODE_IDENTITY, CODE_MISMATCH, CODE_PLAINTEXT_INJECTION, CODE_SECRET_NOT_GRANTED, CODE_SECRET_UNAVAILABLE, DENY,
    Decision, Destination, Principal, Request,
)
from gateway.resolver import HostError, normalise_host
from gateway.secrets.inject import PLACEHOLDER_PREFIX, placeholders_in
from gateway.secrets.scrub import StreamScrubber, scrub_bytes
from gateway.secrets.scrub import variants as scrub_variants
from gateway.secrets.store import SecretUnavailable
from gateway.runtime import CODE_AUDIT, STATUS, Gateway, deny_decision

log = logging.getLogger("egress.addon")

HOP_HEADERS_TO_STRIP = ("proxy-authorization", "proxy-connection")
_PLACEHOLDER_BYTES = re.compile(rb"egress-secret:([a-z0-9][a-z0-9._-]{0,62})")
SCRUB_BUFFERED_MAX = 1 << 20  # responses to injected requests up to this size are scrubbed whole
_HOP_BYTES = frozenset(h.encode() for h in HOP_HEADERS_TO_STRIP)


@dataclass
class ConnState:
    """What is known about one client connection."""

    principal: Principal | None = None
    expires_at: int = 0
    target: tuple[str, int] | None = None  # CONNECT host, port
    destination: Destination | None = None  # resolved once per tunnel
    pins: dict[tuple[str, int], str] = field(default_factory=dict)  # (ip, port) -> host name


def _same_host(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _split_host_header(value: str, default_port: int) -> tuple[str, int] | None:
    v = value.strip()
    if not v:
        return None
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif v.count(":") == 1:
        host, _, port = v.partition(":")
    else:
        host, port = v, ""
    if port and not port.isdigit():
        return None
    return host, int(port) if port else default_port


class EgressGateway:
    """mitmproxy addon. Pass a ready ``Gateway`` (lean master) or configure it
    through the ``egress_*`` options (mitmdump)."""

    def __init__(self, gateway: Gateway | None = None, *, manage_admin: bool = True):
        self.gw = gateway
        self.manage_admin = manage_admin
        self.conns: dict[str, ConnState] = {}
        self._tasks: list[asyncio.Task] = []
        self._admin_runner = None
        self._tls_applied = False
        self._prepared_cache: dict[tuple, tuple] = {}  # (injection, values) -> prepared headers (see _prepared)

    # -- mitmproxy lifecycle ------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option("egress_config", str, "", "Gateway configuration file (YAML).")
        loader.add_option("egress_policies", str, "", "Policy directory (default: the bundled policies/default).")
        loader.add_option("egress_state_dir", str, "", "State directory (CA, signing key, bindings, audit).")
        loader.add_option("egress_admin", str, "", "Admin API HOST:PORT (default 127.0.0.1:8081; 'off' disables).")
        loader.add_option("egress_hosts", Sequence[str], [], "Static host overrides NAME=ADDRESS.")
        loader.add_option("egress_upstream_ca", Sequence[str], [], "Extra CA files trusted for upstream TLS.")
        loader.add_option("egress_audit", str, "", "Audit spool directory (default <state dir>/audit).")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if opts.ssl_insecure:
            raise exceptions.OptionsError("egress gateway: upstream TLS verification cannot be turned off "
                                          "(ssl_insecure); add a CA with egress_upstream_ca instead")
        if getattr(opts, "save_stream_file", None):
            raise exceptions.OptionsError("egress gateway: saving flows (-w / save_stream_file) would write "
                                          "injected credentials and proxy tokens to disk; it is not allowed")
        if opts.connection_strategy != "lazy":
            # Dial only after the per-request decision, to the checked address.
            opts.update(connection_strategy="lazy")
        if self.gw is None:
            try:
                cfg = load_config(
                    opts.egress_config or None,
                    policies=opts.egress_policies or None,
                    state_dir=opts.egress_state_dir or None,
                    admin=("" if opts.egress_admin == "off" else (opts.egress_admin or None)),
                    upstream_ca=tuple(opts.egress_upstream_ca) or None,
                    audit=opts.egress_audit or None,
                    extra_hosts=parse_host_overrides(opts.egress_hosts) if opts.egress_hosts else None,
                )
                gw = Gateway(cfg)
                gw.load_policies()
            except Exception as e:
                raise exceptions.OptionsError(f"egress gateway: {e}") from None
            self.gw = gw
        if not self._tls_applied:
            self._tls_applied = True
            apply_tls_options(self.gw.config, opts)

    async def running(self) -> None:
        gw = self.gw
        if gw is None:
            return
        loop = asyncio.get_running_loop()
        if self.manage_admin and gw.config.admin:
            from gateway.admin import start_admin
            try:
                self._admin_runner = await start_admin(gw)
            except OSError as e:
                # An error logged during start-up makes mitmproxy exit (ErrorCheck).
                log.error("admin API cannot listen on %s: %s", gw.config.admin, e.strerror or e)
                return
        if gw.config.reload_interval > 0:
            self._tasks.append(loop.create_task(self._poll_policies(gw.config.reload_interval)))
        if gw.secrets.backends.get("vault-dynamic") is not None:
            self._tasks.append(loop.create_task(self._maintain_leases(30.0)))
        try:
            loop.add_signal_handler(signal.SIGHUP, self._sighup)
        except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover - not main thread
            pass

    def _sighup(self) -> None:
        asyncio.get_running_loop().create_task(asyncio.to_thread(self.gw.reload, "sighup"))

    async def _poll_policies(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                # Checking runs here (a few stats); only a reload goes to a thread.
                # A thread that polls in a loop would contend for the GIL and
                # stall the proxy (p99 latency).
                if self.gw.store.changed():
                    await asyncio.to_thread(self.gw.store.poll)
            except Exception:  # pragma: no cover
                log.exception("policy poll failed")

    async def _maintain_leases(self, interval: float) -> None:
        """Renew leases that are still in use and revoke those of expired identities."""
        vault = self.gw.secrets.backends["vault-dynamic"]
        while True:
            await asyncio.sleep(interval)
            try:
                for lease_id in await vault.revoke_expired_owners():
                    self.gw.audit.write({"event": "lease_revoked", "lease": lease_id.rsplit("/", 1)[0],
                                         "reason": "identity expired"})
                failed = await vault.renew_leases(margin=2 * interval)
                if failed:
                    log.warning("%d Vault lease(s) could not be renewed", len(failed))
            except Exception:  # pragma: no cover
                log.exception("lease maintenance failed")

    async def done(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        if self.gw is not None:
            self.gw.close()

    def client_disconnected(self, client) -> None:
        self.conns.pop(client.id, None)

    # -- helpers ----------------------------------------------------------------------

    def _respond(self, flow: http.HTTPFlow, decision: Decision, *, proxy_auth: bool = False) -> None:
        r = self.gw.deny_response(decision, flow.id, proxy_auth=proxy_auth)
        flow.response = http.Response.make(r.status, r.body, r.headers)

    def _deny(self, flow: http.HTTPFlow, code: str, reason: str, *, principal=None, request=None,
              identity_code: str = "", proxy_auth: bool = False, destination=None) -> None:
        d = deny_decision(code, reason, self.gw.policies.version)
        self._respond(flow, d, proxy_auth=proxy_auth)  # first: the deny stands whatever happens next
        if request is None:
            request = _raw_request(flow)
        try:
            self.gw.record(request_id=flow.id, principal=principal, request=request, decision=d,
                           source=_peer(flow), identity_code=identity_code, destination=destination,
                           status=flow.response.status_code)
        except Exception:
            log.exception("could not record a deny")
            self.gw.metrics.audit_failures.inc()

    def _internal_error(self, flow: http.HTTPFlow, what: str) -> None:
        """Fail closed after an unexpected error; never raises."""
        log.exception("%s failed", what)
        try:
            self._deny(flow, "internal_error", f"the gateway failed while checking this {what}")
        except Exception:
            _static_deny(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        """Backstop: a request that reached this point was either refused (it has
        a response) or allowed and pinned (egress_host). Anything else, e.g. a hook
        that failed in a way no handler caught, is refused here, never forwarded."""
        if flow.response is None and "egress_host" not in flow.metadata:
            log.error("request %s reached forwarding without a decision; refused", flow.id)
            try:
                self._deny(flow, "internal_error", "the request was not decided by the gateway")
            except Exception:
                _static_deny(flow)

    # -- explicit mode: CONNECT -----------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.gw is None:
            return _unavailable(flow)
        try:
            await self._http_connect(flow)
        except Exception:
            self._internal_error(flow, "CONNECT")

    async def _http_connect(self, flow: http.HTTPFlow) -> None:
        gw = self.gw
        req = flow.request
        header = req.headers.get("proxy-authorization")
        for h in HOP_HEADERS_TO_STRIP:
            req.headers.pop(h, None)
        ident = gw.identity.from_proxy_authorization(header)
        if ident.principal is None:
            return self._identity_denied(flow, ident, proxy_auth=True)
        principal = ident.principal
        try:
            host = normalise_host(req.host)
        except HostError as e:
            self._deny(flow, CODE_MISMATCH, f"invalid CONNECT target: {e}", principal=principal)
            return
        port = req.port
        destination = await gw.resolver.resolve(host, port)
        pre = gw.policies.could_allow(principal, host, destination)
        probe = Request(host=host, port=port, scheme="https", method="CONNECT", path="", sni="")
        if pre is not None:
            d = Decision(DENY, pre.code, pre.rule, pre.reason, gw.policies.version)
            self._respond(flow, d)  # first: the deny stands whatever happens next
            gw.record(request_id=flow.id, principal=principal, request=probe, decision=d,
                      source=_peer(flow), destination=destination, status=flow.response.status_code)
            return
        self.conns[flow.client_conn.id] = ConnState(principal, ident.expires_at, (host, port), destination)

    # -- every request ----------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow):
        """Synchronous unless the destination needs a DNS lookup (then it returns
        a coroutine, which mitmproxy awaits): most requests go to hosts that are
        cached, literal or overridden, and a coroutine per request costs."""
        if flow.response is not None:
            return None
        if self.gw is None:
            return _unavailable(flow)
        try:
            pending = self._requestheaders(flow)
        except Exception:
            self._internal_error(flow, "request")
            return None
        if pending is None:
            return None
        if isinstance(pending, tuple):
            return self._finish_async(flow, pending)
        return self._guarded(flow, pending)  # fetching credentials

    async def _guarded(self, flow: http.HTTPFlow, pending) -> None:
        try:
            await pending
        except Exception:
            self._internal_error(flow, "request")

    async def _finish_async(self, flow: http.HTTPFlow, pending) -> None:
        try:
            destination = await self.gw.resolver.resolve(pending[2].host, pending[2].port)
            more = self._decide(flow, *pending, destination)
            if more is not None:
                await more
        except Exception:
            self._internal_error(flow, "request")

    def _requestheaders(self, flow: http.HTTPFlow):
        gw = self.gw
        req = flow.request
        client = flow.client_conn
        transparent = isinstance(client.proxy_mode, TransparentMode)
        headers = _lower_headers(req.headers)
        header = headers.pop("proxy-authorization", None)
        if header is not None or "proxy-connection" in headers:
            headers.pop("proxy-connection", None)
            req.headers.fields = tuple(f for f in req.headers.fields if f[0].lower() not in _HOP_BYTES)
        state = self.conns.get(client.id)
        tls = req.scheme == "https"
        default_port = 443 if tls else 80
        client_sni = (client.sni or "").lower().rstrip(".")

        # 1. who is calling
        if transparent:
            ident = gw.identity.for_source(client.peername[0])
            proxy_auth = False
        elif state is not None and state.target is not None:
            ident = gw.identity.still_valid(state.principal, state.expires_at)
            proxy_auth = False  # inside a tunnel a 407 would not reach the client's proxy logic
        else:
            ident = gw.identity.from_proxy_authorization(header)
            proxy_auth = True
        if ident.principal is None:
            return self._identity_denied(flow, ident, proxy_auth=proxy_auth)
        principal = ident.principal
        flow.metadata["egress_expires"] = ident.expires_at

        # 2. which host, and do CONNECT target / SNI / Host agree
        if req.is_http2 or req.is_http3:
            host_header = req.host_header or ""
        else:
            host_header = headers.get("host", "")
        hh = _split_host_header(host_header, default_port) if host_header else None
        try:
            # An HTTP/1 absolute-form target (``GET http://name/ HTTP/1.1``) in
            # transparent mode or inside a CONNECT tunnel is forwarded by
            # mitmproxy as it is, and the upstream then routes by that authority
            # and ignores Host (RFC 9112, 3.2.2). It must name the same host and
            # port as Host, and goes on in origin-form. (In plain explicit mode
            # mitmproxy has already made it origin-form; HTTP/2 has no such form.)
            if (req.authority and req.method != "CONNECT" and not (req.is_http2 or req.is_http3)
                    and (transparent or (state is not None and state.target is not None))):
                target = _split_host_header(req.authority, default_port)
                if (target is None or hh is None or target[1] != hh[1]
                        or not _same_host(normalise_host(target[0]), normalise_host(hh[0]))):
                    return self._mismatch(flow, principal, f"request target authority {req.authority} differs "
                                                           f"from Host {host_header}")
                req.authority = ""
            if transparent:
                names = []
                if client_sni:
                    names.append(normalise_host(client_sni))
                if hh is not None:
                    names.append(normalise_host(hh[0]))
                if len(names) == 2 and not _same_host(names[0], names[1]):
                    return self._mismatch(flow, principal, f"TLS SNI {names[0]} and Host {names[1]} differ")
                host = names[0] if names else normalise_host(req.host)
                port = req.port
            elif state is not None and state.target is not None:
                # Inside a tunnel mitmproxy takes request.host from the CONNECT
                # target; the Host header (or :authority) is what the upstream sees.
                thost, tport = state.target
                host, port = thost, tport
                if hh is None:
                    return self._mismatch(flow, principal, "request inside a CONNECT tunnel has no Host header")
                if not _same_host(normalise_host(hh[0]), thost) or hh[1] != tport:
                    return self._mismatch(flow, principal, f"Host {host_header} differs from the CONNECT target "
                                                           f"{thost}:{tport}")
                if client_sni and not _same_host(normalise_host(client_sni), thost):
                    return self._mismatch(flow, principal, f"TLS SNI {client_sni} differs from CONNECT target {thost}")
            else:
                host = normalise_host(req.host)
                port = req.port
                if hh is not None and (not _same_host(normalise_host(hh[0]), host) or hh[1] != port):
                    return self._mismatch(flow, principal, f"Host header {host_header} differs from the request "
                                                           f"target {host}:{port}")
        except HostError as e:
            return self._mismatch(flow, principal, f"invalid host: {e}")

        # 3. the request as policy sees it
        path, _, query = req.path.partition("?")
        scheme = req.scheme
        if headers.get("upgrade", "").lower() == "websocket":
            scheme = "wss" if tls else "ws"
        request = Request(host=host, port=port, scheme=scheme, method=req.method, path=path, query=query,
                          headers=headers, sni=client_sni, mode="transparent" if transparent else "explicit")

        # 4. resolve once (per tunnel, or per request from a short cache)
        if state is not None and state.target is not None and state.destination is not None:
            destination = state.destination
        else:
            destination = gw.resolver.lookup_cached(host)
            if destination is None:
                return (principal, state, request, tls)  # finish after an async DNS lookup
        return self._decide(flow, principal, state, request, tls, destination)

    def _decide(self, flow, principal, state, request, tls, destination):
        """Decide, check and inject credentials, audit, then deny or pin. Returns
        a coroutine when secrets must be fetched first (else None)."""
        gw = self.gw
        decision, seconds = gw.decide(principal, request, destination)
        if decision.allowed and decision.dial is None:  # cannot happen: an allow always has a checked address
            decision = deny_decision("internal_error", "no checked address to connect to", decision.policy_version)
        aliases = placeholders_in(request.headers.items())
        if decision.allowed and (decision.inject is not None or aliases):
            refused = self._injection_refusal(decision, aliases, request)
            if refused is not None:
                decision = refused
            else:
                refs = decision.inject.refs(aliases)
                values = gw.secrets.cached_all(refs, owner=_owner(principal))
                if values is None:
                    return self._inject_async(flow, principal, state, request, tls, destination, decision,
                                              seconds, refs)
                return self._inject_and_forward(flow, principal, state, request, tls, destination, decision,
                                                seconds, values)
        self._finish(flow, principal, state, request, tls, destination, decision, seconds)
        return None

    def _injection_refusal(self, decision, aliases, request):
        inj = decision.inject
        v = decision.policy_version
        if aliases:
            missing = sorted(a for a in aliases if inj is None or inj.alias(a) is None)
            if missing:
                shown = ", ".join(PLACEHOLDER_PREFIX + a for a in missing if a) or "a malformed egress-secret: placeholder"
                return Decision(DENY, CODE_SECRET_NOT_GRANTED, decision.rule,
                                f"the request carries {shown}, which rule {decision.rule} does not grant",
                                v)
        if inj is not None and request.scheme not in ("https", "wss") and not inj.allow_plaintext:
            return Decision(DENY, CODE_PLAINTEXT_INJECTION, decision.rule,
                            f"rule {decision.rule} injects credentials, which are only sent over verified TLS "
                            f"(use https)", v)
        return None

    async def _inject_async(self, flow, principal, state, request, tls, destination, decision, seconds, refs):
        try:
            values = await self.gw.secrets.resolve_all(refs, owner=_owner(principal),
                                                        owner_expires=flow.metadata.get("egress_expires", 0))
        except SecretUnavailable as e:
            d = Decision(DENY, CODE_SECRET_UNAVAILABLE, decision.rule,
                         f"credential {e.ref} is unavailable: {e.reason}", decision.policy_version)
            self._finish(flow, principal, state, request, tls, destination, d, seconds)
            return
        except Exception:
            log.exception("secret resolution failed")
            d = deny_decision("internal_error", "the gateway failed while fetching credentials",
                              decision.policy_version)
            self._finish(flow, principal, state, request, tls, destination, d, seconds)
            return
        self._inject_and_forward(flow, principal, state, request, tls, destination, decision, seconds, values)

    def _prepared(self, inj, values: dict) -> tuple:
        """For one injection and one set of values (memoised): the header names it
        replaces, the rendered header fields (bytes), the placeholder values,
        the byte spellings to scrub, and the reference names for the audit."""
        key = (id(inj), tuple(values.items()))
        hit = self._prepared_cache.get(key)
        if hit is not None and hit[0] is inj:
            return hit[1]
        replaced = {n.encode() for n, _ in inj.headers} | {b"accept-encoding"}
        # Ask for an uncompressed response, so reflected credentials can be found.
        added = tuple((n.encode(), t.render(values).encode()) for n, t in inj.headers) + \
            ((b"accept-encoding", b"identity"),)
        placeholders = {a.encode(): values[r].encode() for a, r in inj.placeholders if r in values}
        prepared = (frozenset(replaced), added, placeholders, scrub_variants(values.values()),
                    tuple(str(r) for r in values))
        if len(self._prepared_cache) >= 1024:
            self._prepared_cache.clear()
        self._prepared_cache[key] = (inj, prepared)
        return prepared

    def _inject_and_forward(self, flow, principal, state, request, tls, destination, decision, seconds, values):
        try:
            replaced, added, placeholders, needles, names = self._prepared(decision.inject, values)
        except KeyError:  # a reference without a value: never send partial credentials
            d = deny_decision(CODE_SECRET_UNAVAILABLE, "a credential could not be resolved", decision.policy_version)
            self._finish(flow, principal, state, request, tls, destination, d, seconds)
            return
        fields = []
        for k, v in flow.request.headers.fields:
            if k.lower() in replaced:
                continue
            if b"egress-secret:" in v:
                v = _PLACEHOLDER_BYTES.sub(lambda m: placeholders[m.group(1)], v)
            fields.append((k, v))
        flow.request.headers.fields = tuple(fields) + added
        flow.metadata["egress_scrub"] = needles  # reflection scrubbing; never logged
        self._finish(flow, principal, state, request, tls, destination, decision, seconds, secrets=names)

    def _finish(self, flow, principal, state, request, tls, destination, decision, seconds, secrets=()) -> None:
        gw = self.gw
        host, port = request.host, request.port
        written = gw.record(request_id=flow.id, principal=principal, request=request, decision=decision,
                            source=_peer(flow), destination=destination, decision_seconds=seconds,
                            secrets=secrets, status=0 if decision.allowed else STATUS.get(decision.code, 403))
        if decision.allowed and not written:
            # nothing leaves that is not on record: the audit spool could not take this decision
            decision = deny_decision(CODE_AUDIT, gw.audit.refusal_reason(), decision.policy_version)
        if not decision.allowed:
            self._respond(flow, decision)
            return

        # pin the checked address; the SNI stays the host name (see server_connect)
        if state is None:
            state = self.conns.setdefault(flow.client_conn.id, ConnState())
        key = (decision.dial, port)
        pinned = state.pins.get(key)
        if pinned is not None and pinned != host and tls:
            # A TLS connection to this address was verified for another name.
            r = gw.deny_response(deny_decision(CODE_MISMATCH, f"connection to {decision.dial} is in use for "
                                               f"{pinned}; open a new connection for {host}",
                                               decision.policy_version), flow.id, status=421)
            flow.response = http.Response.make(r.status, r.body, r.headers)
            return
        state.pins[key] = host
        flow.request.data.host = decision.dial
        flow.metadata["egress_host"] = host
        flow.metadata["egress_principal"] = principal

    # -- reflection scrubbing ----------------------------------------------------------

    def _scrubbed(self, flow, where: str, hits: int) -> None:
        self.gw.audit.write({"event": "reflection_scrubbed", "request_id": flow.id, "where": where,
                             "occurrences": hits, "host": flow.metadata.get("egress_host", "")})
        self.gw.metrics.reflections.labels(where).inc(hits)

    # -- completion: status, bytes, timings of allowed requests ----------------------------

    def _complete(self, flow, error: str = "") -> None:
        md = flow.metadata
        if "egress_host" not in md or "egress_done" in md:
            return
        md["egress_done"] = True
        try:
            req = flow.request.data  # the plain fields, without the property layers
            resp = flow.response
            body = req.content
            sent = len(body) if body is not None else _length(flow.request.headers)
            status = received = 0
            upstream = total = -1.0
            end = 0.0
            if resp is not None and not error:
                r = resp.data
                status = r.status_code
                body = r.content
                if body is not None:
                    received = len(body)
                else:
                    received = getattr(resp.stream, "bytes", None)
                    if received is None:
                        received = _length(resp.headers)
                if r.timestamp_start and req.timestamp_end:
                    upstream = r.timestamp_start - req.timestamp_end
                end = r.timestamp_end or 0.0
            if req.timestamp_start:
                total = (end or time.time()) - req.timestamp_start
            p = md.get("egress_principal")
            self.gw.record_completion(flow.id, p.tenant if p is not None else None, status, sent, received,
                                      upstream, total, error)
        except Exception:
            log.exception("could not record the completion of %s", flow.id)
            self.gw.metrics.audit_failures.inc()

    def error(self, flow) -> None:
        if isinstance(flow, http.HTTPFlow) and flow.error is not None:
            self._complete(flow, error=flow.error.msg or "error")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        needles = flow.metadata.get("egress_scrub")
        if not needles or flow.response is None:
            if flow.response is not None and flow.response.stream is True:
                flow.response.stream = _ByteCounter()  # a streamed body: count it for the audit
            return
        resp = flow.response
        fields, hits = [], 0
        for k, v in resp.headers.fields:
            v2, n = scrub_bytes(v, needles)
            hits += n
            fields.append((k, v2))
        if hits:
            resp.headers.fields = tuple(fields)
            self._scrubbed(flow, "header", hits)
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # Asked for identity, got a compressed body: it cannot be checked while
            # streaming, so it is not passed on (fail closed).
            self.gw.audit.write({"event": "reflection_unverifiable", "request_id": flow.id,
                                 "content_encoding": encoding[:40]})
            flow.kill()
            return
        length = resp.headers.get("content-length", "")
        # mitmproxy may already have chosen to stream (stream_large_bodies): then
        # the scrubber must be the stream, whatever the size.
        if length.isdigit() and int(length) <= SCRUB_BUFFERED_MAX and not resp.stream:
            flow.metadata["egress_scrub_buffered"] = True  # small body: scrubbed whole in response()
        else:  # unknown or large: streamed, scrubbed chunk by chunk
            resp.stream = StreamScrubber(needles, on_hit=lambda n: self._scrubbed(flow, "body", n))

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get("egress_scrub_buffered") and flow.response is not None:
            raw = flow.response.raw_content
            if raw:
                content, hits = scrub_bytes(raw, flow.metadata["egress_scrub"])
                if hits:
                    flow.response.raw_content = content
                    self._scrubbed(flow, "body", hits)
        self._complete(flow)

    def websocket_message(self, flow) -> None:
        needles = flow.metadata.get("egress_scrub")
        if not needles or flow.websocket is None or not flow.websocket.messages:
            return
        msg = flow.websocket.messages[-1]
        if msg.from_client:
            return
        content, hits = scrub_bytes(msg.content, needles)
        if hits:
            msg.content = content
            self._scrubbed(flow, "websocket", hits)

    def _identity_denied(self, flow, ident, *, proxy_auth: bool) -> None:
        """407 (explicit proxy, outside a tunnel) or 403, with the reason."""
        self.gw.identity_failure(ident)
        self._deny(flow, CODE_IDENTITY, f"identity required: {ident.message}", identity_code=ident.code,
                   proxy_auth=proxy_auth)

    def _mismatch(self, flow, principal, reason: str) -> None:
        self._deny(flow, CODE_MISMATCH, reason, principal=principal)

    # -- connections ---------------------------------------------------------------------

    def server_connect(self, data) -> None:
        """Only ever dial an address that a decision checked for this client."""
        state = self.conns.get(data.client.id)
        addr = data.server.address
        host = state.pins.get((addr[0], addr[1])) if (state is not None and addr) else None
        if host is None or self.gw is None:
            data.server.error = "egress gateway: refusing to connect to an address that was not checked by policy"
            return
        if data.server.sni is None or data.server.sni == addr[0]:
            data.server.sni = host

    def tcp_start(self, flow) -> None:
        """Raw TCP (non-HTTP inside CONNECT or transparent) cannot be checked: refuse."""
        if self.gw is not None:
            self.gw.record(request_id=flow.id, principal=None, request=None,
                       decision=deny_decision("destination_mismatch", "non-HTTP traffic is not allowed",
                                              self.gw.policies.version), source=_peer(flow))
        flow.kill()

    def udp_start(self, flow) -> None:
        flow.kill()


def _owner(principal: Principal) -> str:
    """Who leased secrets belong to (revoked with it): the token id, or the binding."""
    if principal.token_id:
        return principal.token_id
    return f"{principal.source}:{principal.tenant}/{principal.agent}/{principal.session}"


def _raw_request(flow) -> Request | None:
    """What was asked, as sent (for audit events of requests refused before
    the host could be checked)."""
    try:
        r = flow.request
        transparent = isinstance(flow.client_conn.proxy_mode, TransparentMode)
        return Request(host=(r.pretty_host or "")[:255].lower(), port=r.port, scheme=r.scheme, method=r.method,
                       path=r.path.partition("?")[0][:2048], sni=(flow.client_conn.sni or ""),
                       mode="transparent" if transparent else "explicit")
    except Exception:  # pragma: no cover - audit must not fail the deny
        return None


class _ByteCounter:
    """``response.stream`` for a streamed body nobody else transforms: passes it through, counting."""

    __slots__ = ("bytes",)

    def __init__(self):
        self.bytes = 0

    def __call__(self, data: bytes):
        self.bytes += len(data)
        return data if data else []  # an empty chunk would end a chunked HTTP/1 body early


def _length(headers) -> int:
    v = headers.get("content-length", "")
    return int(v) if v.isdigit() else 0


def _static_deny(flow) -> None:
    """The last resort when even building a deny failed: a fixed 500 refusal."""
    flow.response = http.Response.make(
        500, b'{"decision": "deny", "code": "internal_error", "reason": "the egress gateway failed while '
             b'checking this request"}\n',
        {"Content-Type": "application/json", "X-Egress-Decision": "deny"})


def _unavailable(flow) -> None:
    """The gateway failed to start (bad configuration): refuse everything."""
    flow.response = http.Response.make(
        503, b'{"decision": "deny", "code": "policy_unavailable", "reason": "the egress gateway is not '
             b'configured (see its log)"}\n',
        {"Content-Type": "application/json", "X-Egress-Decision": "deny"})


def _lower_headers(headers) -> dict[str, str]:
    """Lowercase names, repeated headers joined with ", " (raw fields: the
    Headers API decodes and case-folds on every access)."""
    out: dict[str, str] = {}
    for k, v in headers.fields:
        name = k.decode("latin-1").lower()
        value = v.decode("utf-8", "surrogateescape")
        if name in out:
            out[name] = out[name] + ", " + value
        else:
            out[name] = value
    return out


def _peer(flow) -> str:
    try:
        return flow.client_conn.peername[0]
    except Exception:  # pragma: no cover
        return ""


def apply_tls_options(cfg: GatewayConfig, opts: Any) -> None:
    """Gateway CA in <state dir>/ca; extra upstream CAs added to certifi's bundle
    (mitmproxy's own setting replaces the default bundle, it does not extend it)."""
    updates: dict[str, Any] = {}
    confdir = str(Path(cfg.state_dir).resolve() / "ca")
    if opts.confdir != confdir:
        Path(confdir).mkdir(parents=True, exist_ok=True, mode=0o700)
        updates["confdir"] = confdir
    if cfg.upstream_ca:
        bundle = write_ca_bundle(cfg)
        if opts.ssl_verify_upstream_trusted_ca != str(bundle):
            updates["ssl_verify_upstream_trusted_ca"] = str(bundle)
    if updates:
        opts.update(**updates)


def write_ca_bundle(cfg: GatewayConfig) -> Path:
    import certifi

    parts = [Path(certifi.where()).read_text()]
    for ca in cfg.upstream_ca:
        text = Path(ca).read_text()
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ValueError(f"upstream_ca: {ca} holds no PEM certificate")
        parts.append(f"# extra upstream CA from {ca}\n{text}")
    path = Path(cfg.state_dir) / "upstream-ca-bundle.pem"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    return path
