"""The lean master's hook dispatch behaves like mitmproxy's AddonManager."""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import exceptions, options
from mitmproxy.master import Master
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpResponseHook
from mitmproxy.test import tflow

from gateway.master import install_hook_dispatch


class Rec:
    def __init__(self, name, calls, *, fail=False, halt=False, is_async=False):
        self.name, self.calls, self.fail, self.halt = name, calls, fail, halt
        if is_async:
            self.requestheaders = self._async_rh

    def requestheaders(self, f):
        self.calls.append(self.name)
        if self.fail:
            raise RuntimeError("boom")
        if self.halt:
            raise exceptions.AddonHalt()

    async def _async_rh(self, f):
        await asyncio.sleep(0)
        self.calls.append(self.name + "-async")


class Updater:
    def __init__(self, calls):
        self.calls = calls

    def update(self, flows):
        self.calls.append("update")


def run(addons, hook_cls=HttpRequestHeadersHook):
    async def main():
        m = Master(options.Options(), event_loop=asyncio.get_running_loop(), with_termlog=False)
        m.addons.add(*addons)
        install_hook_dispatch(m)
        await m.addons.handle_lifecycle(hook_cls(tflow.tflow(resp=True)))
        return m
    return asyncio.run(main())


def test_calls_implementers_in_order_and_awaits_async(caplog):
    calls = []
    run([Rec("a", calls), Rec("b", calls, is_async=True), Rec("c", calls)])
    assert calls == ["a", "b-async", "c"]


def test_error_is_logged_and_next_addon_still_runs(caplog):
    calls = []
    with caplog.at_level(logging.ERROR):
        run([Rec("a", calls, fail=True), Rec("b", calls)])
    assert calls == ["a", "b"]
    assert any("Addon error: boom" in r.getMessage() for r in caplog.records)


def test_addon_halt_stops_the_hook():
    calls = []
    run([Rec("a", calls, halt=True), Rec("b", calls)])
    assert calls == ["a"]


def test_update_pass_only_when_implemented():
    calls = []
    run([Rec("a", calls), Updater(calls)])
    assert calls == ["a", "update"]
    calls.clear()
    run([Rec("a", calls)], HttpResponseHook)  # nobody implements response or update
    assert calls == []


def test_dispatch_follows_changes_to_the_addon_chain():
    calls = []

    async def main():
        m = Master(options.Options(), event_loop=asyncio.get_running_loop(), with_termlog=False)
        m.addons.add(Rec("a", calls))
        install_hook_dispatch(m)
        f = tflow.tflow()
        await m.addons.handle_lifecycle(HttpRequestHeadersHook(f))
        m.addons.add(Rec("b", calls))
        await m.addons.handle_lifecycle(HttpRequestHeadersHook(f))
    asyncio.run(main())
    assert calls == ["a", "a", "b"]
