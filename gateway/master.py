"""A lean mitmproxy master: only the addons the gateway needs.

Stock mitmdump loads ~30 addons, each called on every hook; measured here that
costs about half the throughput (~510 vs ~940 req/s per core). The gateway
needs the proxy server, layer selection, TLS configuration, option handling,
h2c refusal and a start-up error check; nothing else. Hooks are dispatched only
to the addons implementing them (_HookDispatch): another ~15-20% per request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys

import inspect

from mitmproxy import exceptions, flow, hooks, options
from mitmproxy.addonmanager import traverse
from mitmproxy.addons import core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from gateway.addon import EgressGateway, apply_tls_options
from gateway.runtime import Gateway

QUIET_LOGGERS = ("mitmproxy", "hpack", "h2", "h11", "celpy", "lark", "aiohttp.access", "asyncio", "passlib",
                 "urllib3", "websockets", "wsproto")


def setup_logging(verbose: bool = False) -> None:
    """mitmproxy sets the root logger to DEBUG; chatty libraries then cost a lot
    on the hot path. Keep them at WARNING and print our own INFO lines."""
    root = logging.getLogger()
    if not any(getattr(h, "_egress", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        h._egress = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


class _HookDispatch:
    """Calls each hook only on the addons that implement it.

    mitmproxy's AddonManager walks every addon for every hook of every flow
    and then runs an ``update`` pass for UIs; with no addon implementing the
    hook that still costs ~30 us (measured), four times per request. This
    dispatcher keeps, per hook name, the callables that implement it (the
    addon chain is fixed once the lean master runs; the list is rebuilt if it
    changes), calls them in chain order with mitmproxy's error handling (an
    addon error is logged, AddonHalt stops the hook), and skips the update
    pass when no addon implements ``update``.
    """

    def __init__(self, manager):
        self.mgr = manager
        self._cache: dict[str, tuple] = {}
        self._chain_key: tuple = ()

    def _implementers(self, name: str) -> tuple:
        key = (id(self.mgr.chain), len(self.mgr.chain))
        if key != self._chain_key:
            self._cache.clear()
            self._chain_key = key
        funcs = self._cache.get(name)
        if funcs is None:
            found = []
            for addon in traverse(self.mgr.chain):
                func = getattr(addon, name, None)
                if func is not None and callable(func):
                    found.append(func)
            funcs = self._cache[name] = tuple(found)
        return funcs

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        funcs = self._implementers(event.name)
        if funcs:
            args = event.args()
            for func in funcs:
                try:
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
                except exceptions.AddonHalt:
                    break
                except exceptions.OptionsError:
                    raise
                except Exception as e:
                    logging.getLogger("mitmproxy.addonmanager").error(f"Addon error: {e}", exc_info=True)
        if self._implementers("update") and isinstance(event.args()[0], flow.Flow):
            await self.mgr.trigger_event(hooks.UpdateHook([event.args()[0]]))


def install_hook_dispatch(m: Master) -> None:
    """Route the proxy's per-flow hooks through _HookDispatch (an attribute of
    this master's AddonManager instance; mitmproxy itself is not changed)."""
    m.addons.handle_lifecycle = _HookDispatch(m.addons).handle_lifecycle


def lean_addons() -> list:
    return [core.Core(), disable_h2c.DisableH2C(), proxyserver.Proxyserver(), next_layer.NextLayer(),
            tlsconfig.TlsConfig()]


def build_master(gateway: Gateway | None, *, with_gateway_addon: bool = True,
                 modes: list[str] | None = None, extra_options: dict | None = None) -> Master:
    """A master running ``gateway`` (or, with ``gateway=None`` and
    ``with_gateway_addon=False``, a bare lean proxy for benchmarks)."""
    opts = options.Options()
    m = Master(opts, event_loop=asyncio.get_running_loop(), with_termlog=False)
    m.addons.add(*lean_addons())
    if with_gateway_addon:
        m.addons.add(EgressGateway(gateway))
    m.addons.add(errorcheck.ErrorCheck())
    install_hook_dispatch(m)
    updates = {"connection_strategy": "lazy", "stream_large_bodies": "1m"}
    if gateway is not None:
        updates["mode"] = modes or [s.mitmproxy_mode() for s in gateway.config.mode_specs()]
    elif modes:
        updates["mode"] = modes
    updates.update(extra_options or {})
    opts.update(**updates)
    if gateway is not None:
        apply_tls_options(gateway.config, opts)
    return m


def tune_gc() -> None:
    """The compiled policy set, mitmproxy and its dependencies are long-lived:
    move them out of the collector's view (gc.freeze), so collections only
    walk per-request objects. Thresholds stay at their defaults: raising them
    (20000, 20, 20) made collections rare but long (p99 latency +15 ms)."""
    gc.collect()
    gc.freeze()


async def run_gateway(gateway: Gateway, *, verbose: bool = False) -> None:
    setup_logging(verbose)
    m = build_master(gateway)
    setup_logging(verbose)  # mitmproxy's Master resets the root level
    tune_gc()
    await m.run()
