"""The admin API (aiohttp), loopback by default, bearer-token protected.

Open endpoints: ``GET /healthz`` (the process is up), ``GET /readyz`` (a policy
set is loaded and the enforcement self-test passes). Everything else needs
``Authorization: Bearer <admin token>``; the token is read from
``EGRESS_ADMIN_TOKEN`` or ``<state dir>/admin-token`` (created 0600).

=====================  =======================================================
``GET /metrics``       Prometheus metrics (also protected)
``POST /v1/reload``    reload policies now; 200 with the new version, 422 with
                       file:line:column problems (the last good set stays)
``GET /v1/policy``     active version, files, policies, rule count
``POST /v1/decide``    explain a hypothetical request (no traffic is sent)
``POST /v1/tokens``    mint a token {tenant, agent, session?, labels?, ttl_seconds?}
``POST /v1/revocations``  revoke a token by id {token_id}
``GET /v1/revocations``   revoked token ids
``GET /v1/bindings``   source-address bindings (transparent mode)
``POST /v1/bindings``  {address, tenant, agent, session?, labels?}
``DELETE /v1/bindings/{address}``
=====================  =======================================================
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from pathlib import Path

from aiohttp import web

from gateway import tokens
from gateway.config import parse_hostport
from gateway.policy.model import Principal, Request
from gateway.resolver import HostError, normalise_host
from gateway.runtime import Gateway

TOKEN_FILE = "admin-token"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")  # same rule as token claims


def admin_token(state_dir: str | Path) -> str:
    env = os.environ.get("EGRESS_ADMIN_TOKEN")
    if env:
        return env
    path = Path(state_dir) / TOKEN_FILE
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
        except FileExistsError:
            pass
    return path.read_text().strip()


def _err(status: int, code: str, message: str, **extra) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except Exception:
        raise web.HTTPBadRequest(text='{"error": "bad_request", "message": "body must be a JSON object"}',
                                 content_type="application/json")
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "bad_request", "message": "body must be a JSON object"}',
                                 content_type="application/json")
    return body


def _labels(value, what="labels") -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{what} must be an object of string values")
    return value


def make_app(gw: Gateway, token: str) -> web.Application:
    open_paths = {"/healthz", "/readyz"}

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path not in open_paths:
            got = request.headers.get("Authorization", "")
            scheme, _, value = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                return _err(401, "unauthorized", "admin API needs Authorization: Bearer <admin token> "
                                                 "(see <state dir>/admin-token)")
        try:
            return await handler(request)
        except ValueError as e:
            return _err(400, "bad_request", str(e))

    app = web.Application(middlewares=[auth])
    r = app.router

    async def healthz(_):
        return web.json_response({"status": "ok"})

    async def readyz(_):
        ok, detail = gw.self_test()
        body = {"ready": ok, "policy_version": gw.policies.version, "self_test": detail}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(_):
        return web.Response(body=gw.metrics.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def reload(_):
        import asyncio
        res = await asyncio.to_thread(gw.reload, "admin")
        return web.json_response(res.to_dict(), status=200 if res.ok else 422)

    async def policy(_):
        ps = gw.policies
        return web.json_response({
            "version": ps.version, "loaded": gw.store.loaded, "rules": ps.rule_count,
            "directory": str(gw.store.directory), "files": [str(f) for f in ps.files],
            "policies": [{"name": p.name, "file": p.file, "mode": p.mode, "rules": [x.name for x in p.rules]}
                         for p in ps.policies],
            "last_reload": gw.store.last_result.to_dict() if gw.store.last_result else None,
        })

    async def decide(request):
        body = await _json_body(request)
        p = body.get("principal") or {}
        q = body.get("request") or {}
        if not isinstance(p, dict) or not isinstance(q, dict):
            raise ValueError("principal and request must be objects")
        if not p.get("tenant") or not p.get("agent"):
            raise ValueError("principal.tenant and principal.agent are required")
        principal = Principal.make(str(p["tenant"]), str(p["agent"]), str(p.get("session", "")),
                                   _labels(p.get("labels"), "principal.labels"), str(p.get("token_id", "")))
        if "url" in q:
            from urllib.parse import urlsplit
            u = urlsplit(str(q["url"]))
            if not u.hostname:
                raise ValueError("request.url needs a host")
            scheme = u.scheme or "https"
            host, port, path, query = u.hostname, u.port or (443 if scheme in ("https", "wss") else 80), \
                u.path or "/", u.query
        else:
            scheme = str(q.get("scheme", "https"))
            host = str(q.get("host", ""))
            port = int(q.get("port") or (443 if scheme in ("https", "wss") else 80))
            path, query = str(q.get("path", "/")), str(q.get("query", ""))
        try:
            host = normalise_host(host)
        except HostError as e:
            raise ValueError(f"request host: {e}") from None
        headers = {str(k).lower(): str(v) for k, v in (q.get("headers") or {}).items()}
        req = Request(host=host, port=port, scheme=scheme, method=str(q.get("method", "GET")).upper(),
                      path=path, query=query, headers=headers, sni=host if scheme in ("https", "wss") else "")
        if "addresses" in body:
            from gateway.addresses import classify
            from gateway.policy.model import Destination
            if not isinstance(body["addresses"], list):
                raise ValueError("addresses must be a list of IP addresses")
            dest = Destination(tuple(classify(str(a), self_addresses=gw.resolver.self_addresses)
                                     for a in body["addresses"]), via="given")
        else:
            dest = await gw.resolver.resolve(host, port)
        d, seconds = gw.decide(principal, req, dest)
        out = d.to_dict()
        out.update({
            "applicable_policies": gw.policies.applicable(principal),
            "destination": {"ips": [str(c.address) for c in dest.addresses],
                            "classes": [c.klass.value for c in dest.addresses], "error": dest.error,
                            "via": dest.via},
            "dial": d.dial, "evaluated": d.evaluated, "decision_us": round(seconds * 1e6, 1),
        })
        return web.json_response(out)

    async def mint(request):
        body = await _json_body(request)
        try:
            tok = gw.identity.mint(tenant=str(body.get("tenant", "")), agent=str(body.get("agent", "")),
                                   session=str(body.get("session", "")), labels=_labels(body.get("labels")),
                                   ttl_seconds=int(body.get("ttl_seconds", 3600)))
        except (ValueError, TypeError) as e:
            raise ValueError(str(e)) from None
        claims = tokens.verify(tok, gw.identity.keys)
        return web.json_response({"token": tok, "token_id": claims.token_id, "expires_at": claims.expires_at},
                                 status=201)

    async def revoke(request):
        body = await _json_body(request)
        tid = body.get("token_id")
        if not isinstance(tid, str) or not tid:
            raise ValueError("token_id is required")
        failed = await gw.revoke_identity(tid)
        return web.json_response({"revoked": tid, "leases_not_revoked": len(failed)})

    async def revocations(_):
        return web.json_response({"revoked": sorted(gw.identity.revoked)})

    async def bindings(_):
        return web.json_response({"bindings": {a: {**p.to_cel(), "labels": dict(p.labels)}
                                               for a, p in gw.identity.bindings.items()}})

    async def bind(request):
        body = await _json_body(request)
        addr = body.get("address")
        if not isinstance(addr, str):
            raise ValueError("address is required")
        tenant, agent = body.get("tenant"), body.get("agent")
        if not tenant or not agent:
            raise ValueError("tenant and agent are required")
        for what, v in (("tenant", tenant), ("agent", agent), ("session", body.get("session", "") or "x")):
            if not isinstance(v, str) or not NAME_RE.match(v):
                raise ValueError(f"{what} must match {NAME_RE.pattern}")
        principal = Principal.make(tenant, agent, body.get("session", "") or "", _labels(body.get("labels")),
                                   str(body.get("token_id", "")), "binding")
        try:
            a = gw.identity.bind(addr, principal)
        except ValueError:
            raise ValueError(f"address {addr!r} is not an IP address") from None
        gw.audit.write({"event": "binding_added", "address": a, "tenant": tenant, "agent": agent})
        return web.json_response({"address": a, "principal": {**principal.to_cel(), "labels": dict(principal.labels)}},
                                 status=201)

    async def unbind(request):
        addr = request.match_info["address"]
        try:
            found = gw.identity.unbind(addr)
        except ValueError:
            raise ValueError(f"address {addr!r} is not an IP address") from None
        if not found:
            return _err(404, "not_found", f"no binding for {addr}")
        gw.audit.write({"event": "binding_removed", "address": addr})
        return web.json_response({"removed": addr})

    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_post("/v1/reload", reload)
    r.add_get("/v1/policy", policy)
    r.add_post("/v1/decide", decide)
    r.add_post("/v1/tokens", mint)
    r.add_post("/v1/revocations", revoke)
    r.add_get("/v1/revocations", revocations)
    r.add_get("/v1/bindings", bindings)
    r.add_post("/v1/bindings", bind)
    r.add_delete("/v1/bindings/{address}", unbind)
    return app


async def start_admin(gw: Gateway) -> web.AppRunner:
    host, port = parse_hostport(gw.config.admin, "admin")
    token = admin_token(gw.config.state_dir)
    runner = web.AppRunner(make_app(gw, token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    import logging
    logging.getLogger("egress.admin").info("admin API on http://%s:%d (token in %s)", host, port,
                                           "EGRESS_ADMIN_TOKEN" if os.environ.get("EGRESS_ADMIN_TOKEN")
                                           else Path(gw.config.state_dir) / TOKEN_FILE)
    return runner
