"""Built-in plugin: the log mux, which ships every app job's output lines to the log
aggregators (flynn_host/logmux/, docs/logmux.md). Disabled (`--disable-plugin logmux`), the
host ships nothing, and follows job output only for other plugins' `flynn_host_job_log`."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from flynn_host.plugins.hookspecs import Host, hookimpl

if TYPE_CHECKING:
    from aiohttp import web

    from flynn_host.logmux.service import LogMux

# each daemon's log mux, while its service runs (one daemon per process, but hooks get the host)
_muxes: weakref.WeakKeyDictionary[Host, LogMux] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def _running(host: Host) -> AsyncIterator[None]:
    from flynn_host.logmux.service import LogMux, Settings

    mux = LogMux(host, Settings.from_env())
    await mux.start()
    _muxes[host] = mux
    try:
        yield
    finally:
        _muxes.pop(host, None)
        await mux.stop()


@hookimpl
def flynn_host_services(host: Host) -> list[AbstractAsyncContextManager[None]]:
    return [_running(host)]


@hookimpl
def flynn_host_job_log(host: Host, job_id: str, entry: dict[str, Any]) -> None:
    mux = _muxes.get(host)
    if mux is not None:
        mux.sequencer.offer(job_id, entry)


@hookimpl
def flynn_host_job_event(host: Host, event: dict[str, Any]) -> None:
    mux = _muxes.get(host)
    if mux is not None and event.get("event") == "cleanup":
        mux.sequencer.forget(event["job_id"])


@hookimpl
def flynn_host_http_apps(host: Host) -> list[tuple[str, web.Application]]:
    from aiohttp import web

    async def status(request: web.Request) -> web.Response:
        mux = _muxes.get(host)
        return web.json_response(mux.status() if mux is not None else {})

    app = web.Application()
    app.router.add_get("/status", status)
    return [("/logmux", app)]
