"""Real upstream HTTP/HTTPS/WebSocket servers for end-to-end tests.

Run as a subprocess::

    python -m tests.support.upstreams --host 127.0.0.1 --http-port 0 \
        --https-port 0 --cert CHAIN --key KEY --ready-file PATH

HTTPS is served only when ``--cert``/``--key`` are given. Once every socket is
bound, ``{"http": port, "https": port-or-null, "pid": pid}`` is written
atomically (temp file + rename) to ``--ready-file``. SIGTERM/SIGINT shut the
server down cleanly (exit status 0).

Routes (any method):

* ``/echo...``      JSON description of the request (see ``_echo``)
* ``/status/{code}`` that status, JSON ``{"status": code}``
* ``/bytes/{n}``     ``n`` bytes of ``b"x"`` (capped at 10 MB)
* ``/slow/{ms}``     sleeps ``ms`` (capped at 10 000) then JSON
* ``/ws``            WebSocket echo: text ``m`` -> ``"echo:" + m``; binary as is
* ``/__stats``       ``{"requests": n, "paths": [...last 200 paths...]}``;
                     requests to ``/__stats`` itself are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import ssl
import sys
import weakref
from pathlib import Path

from aiohttp import WSMsgType, web

MAX_BYTES = 10 * 1024 * 1024
MAX_SLOW_MS = 10_000
MAX_BODY = 64 * 1024 * 1024
STATS_KEEP = 200

STATS_KEY = web.AppKey("stats", dict)
SOCKETS_KEY = web.AppKey("websockets", weakref.WeakSet)


def _split_raw(request: web.Request) -> tuple[str, str]:
    raw = request.raw_path
    path, _, query = raw.partition("?")
    return path, query


@web.middleware
async def _count(request: web.Request, handler):
    path, _ = _split_raw(request)
    if path not in ("/__stats", "/__seen"):
        stats = request.app[STATS_KEY]
        stats["requests"] += 1
        stats["paths"].append(path)
        stats["seen"].append({"path": path, "headers": [[k, v] for k, v in request.headers.items()]})
    return await handler(request)


def _server_port(request: web.Request) -> int | None:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return sockname[1] if sockname else None


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    path, query = _split_raw(request)
    return web.json_response(
        {
            "method": request.method,
            "path": path,
            "query": query,
            "headers": [
                [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers
            ],
            "body": body.decode("utf-8", errors="replace"),
            "scheme": "https" if request.transport and request.transport.get_extra_info(
                "sslcontext"
            ) else "http",
            "host_header": request.headers.get("Host"),
            "client": request.remote,
            "server_port": _server_port(request),
            "version": f"{request.version.major}.{request.version.minor}",
        }
    )


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    if not 200 <= code <= 599:
        return web.json_response({"error": f"unsupported status {code}"}, status=400)
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"status": code}, status=code)


async def _bytes(request: web.Request) -> web.Response:
    n = min(int(request.match_info["n"]), MAX_BYTES)
    return web.Response(body=b"x" * n, content_type="application/octet-stream")


async def _slow(request: web.Request) -> web.Response:
    ms = min(int(request.match_info["ms"]), MAX_SLOW_MS)
    await asyncio.sleep(ms / 1000)
    return web.json_response({"slept_ms": ms})


async def _ws(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    request.app[SOCKETS_KEY].add(ws)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str("echo:" + msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type == WSMsgType.ERROR:
            break
    return ws


async def _stats(request: web.Request) -> web.Response:
    stats = request.app[STATS_KEY]
    return web.json_response({"requests": stats["requests"], "paths": list(stats["paths"])})


async def _redirect(request: web.Request) -> web.Response:
    """302 to the URL in ``?to=`` (to test that credentials do not follow redirects)."""
    return web.Response(status=302, headers={"Location": request.query.get("to", "/")})


async def _seen(request: web.Request) -> web.Response:
    """What arrived (path and headers of the last requests), read directly by tests."""
    return web.json_response({"seen": list(request.app[STATS_KEY]["seen"])})


async def _reflect_stream(request: web.Request) -> web.StreamResponse:
    """Echo the request's headers back in a response header and in a chunked,
    streamed body cut into 7-byte pieces (a reflection a gateway must scrub)."""
    auth = request.headers.get("Authorization", "")
    resp = web.StreamResponse(headers={"Content-Type": "application/json", "X-Reflected": auth})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    body = json.dumps({k: v for k, v in request.headers.items()}).encode()
    for i in range(0, len(body), 7):
        await resp.write(body[i:i + 7])
        await asyncio.sleep(0)
    await resp.write_eof()
    return resp


async def _close_websockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS_KEY]):
        await ws.close(code=1001, message=b"server shutdown")


def make_app() -> web.Application:
    app = web.Application(middlewares=[_count], client_max_size=MAX_BODY)
    app[STATS_KEY] = {"requests": 0, "paths": collections.deque(maxlen=STATS_KEEP),
                      "seen": collections.deque(maxlen=STATS_KEEP)}
    app[SOCKETS_KEY] = weakref.WeakSet()
    app.on_shutdown.append(_close_websockets)
    app.router.add_route("*", "/__stats", _stats)
    app.router.add_route("GET", "/__seen", _seen)
    app.router.add_route("*", "/redirect", _redirect)
    app.router.add_route("*", "/reflect-stream", _reflect_stream)
    app.router.add_route("*", "/ws", _ws)
    app.router.add_route("*", r"/status/{code:\d+}", _status)
    app.router.add_route("*", r"/bytes/{n:\d+}", _bytes)
    app.router.add_route("*", r"/slow/{ms:\d+}", _slow)
    app.router.add_route("*", r"/echo{tail:.*}", _echo)
    return app


def _bind(host: str, port: int) -> socket.socket:
    family, type_, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _write_ready(path: str, data: dict) -> None:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, target)


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    runner = web.AppRunner(make_app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        http_sock = _bind(args.host, args.http_port)
        await web.SockSite(runner, http_sock).start()
        ports = {"http": http_sock.getsockname()[1], "https": None}
        if args.cert:
            ctx = _server_ssl_context(args.cert, args.key or args.cert)
            https_sock = _bind(args.host, args.https_port)
            await web.SockSite(runner, https_sock, ssl_context=ctx).start()
            ports["https"] = https_sock.getsockname()[1]
        ports["pid"] = os.getpid()
        if args.ready_file:
            _write_ready(args.ready_file, ports)
        print(f"upstreams ready: {json.dumps(ports)}", flush=True)
        await stop.wait()
        print("upstreams: shutting down", flush=True)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.upstreams")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=0)
    p.add_argument("--https-port", type=int, default=0)
    p.add_argument("--cert", help="PEM certificate chain (leaf first); enables HTTPS")
    p.add_argument("--key", help="PEM private key for --cert")
    p.add_argument("--ready-file", help="where to write the bound ports as JSON")
    args = p.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
