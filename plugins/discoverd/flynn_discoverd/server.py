"""discoverd's HTTP API (docs/discoverd.md#http-api): Flynn's paths, JSON, status codes and
SSE framing over a `Store`. Every node serves every request from etcd, so there is no proxy
mode and no redirect to a leader. Responses carry `Discoverd-Index`: the etcd revision last
seen.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from flynn_discoverd.etcd import EtcdUnavailable
from flynn_discoverd.store import Store
from flynn_discoverd.types import (
    DOWN,
    EVENT_KINDS,
    LEADER,
    UP,
    UPDATE,
    Event,
    Instance,
    ServiceConfig,
    ServiceMeta,
    check_service_name,
)
from flynn_host import httphelper
from flynn_host.errors import FlynnError, ValidationError, not_found
from flynn_host.httphelper import read_json, wants_stream

STORE: web.AppKey[Store] = web.AppKey("store", Store)
SHUTDOWN: web.AppKey[asyncio.Event] = web.AppKey("shutdown", asyncio.Event)


def json_response(request: web.Request, data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data),
        status=status,
        content_type="application/json",
        headers=index_header(request),
    )


def index_header(request: web.Request) -> dict[str, str]:
    return {"Discoverd-Index": str(request.app[STORE].revision)}


def _etcd_errors(exc: Exception) -> FlynnError | None:
    if isinstance(exc, EtcdUnavailable):
        return FlynnError("service_unavailable", f"etcd unavailable: {exc}", retry=True)
    return None


errors_middleware = httphelper.errors_middleware(translate=_etcd_errors, headers=index_header)


def service_name(request: web.Request) -> str:
    return check_service_name(request.match_info["service"])


async def stream(
    request: web.Request, first: list[Event], rest: AsyncIterator[Event], kinds: set[str]
) -> web.StreamResponse:
    """An event stream (`httphelper.write_sse`: Flynn's framing and keep-alives, and
    `event: error` when etcd fails) of the `first` events, then those of `rest` whose kind is
    one of `kinds`. Its headers carry `Discoverd-Index`."""

    async def events() -> AsyncIterator[dict[str, Any]]:
        try:
            for event in first:
                yield event.to_json()
            async for event in rest:
                if event.kind in kinds:
                    yield event.to_json()
        finally:
            await rest.aclose()  # type: ignore[attr-defined]  # the etcd watch

    resp = httphelper.sse_response(index_header(request))
    await httphelper.write_sse(request, resp, events())
    return resp


# --- services ---------------------------------------------------------------------------------


async def put_service(request: web.Request) -> web.Response:
    name = service_name(request)
    config = ServiceConfig.from_json(await read_json(request, required=False))
    await request.app[STORE].add_service(name, config)
    return json_response(request, config.to_json())


async def delete_service(request: web.Request) -> web.Response:
    await request.app[STORE].remove_service(service_name(request))
    return json_response(request, {})


async def get_service(request: web.Request) -> web.StreamResponse:
    """Always a stream of every kind of event, preceded by the current state."""
    store = request.app[STORE]
    state, rev = await store.state(service_name(request))
    kinds = set(EVENT_KINDS)
    return await stream(request, state.current_events(kinds, True), store.events(state, rev), kinds)


async def put_meta(request: web.Request) -> web.Response:
    meta = ServiceMeta.from_json(await read_json(request))
    saved = await request.app[STORE].set_meta(service_name(request), meta)
    return json_response(request, saved.to_json())


async def get_meta(request: web.Request) -> web.Response:
    meta = await request.app[STORE].get_meta(service_name(request))
    return json_response(request, meta.to_json())


# --- instances --------------------------------------------------------------------------------


async def put_instance(request: web.Request) -> web.Response:
    name = service_name(request)
    inst = Instance.from_json(await read_json(request), request.match_info["id"])
    saved = await request.app[STORE].register(name, inst)
    return json_response(request, saved.to_json())


async def delete_instance(request: web.Request) -> web.Response:
    await request.app[STORE].deregister(service_name(request), request.match_info["id"])
    return json_response(request, {})


async def get_instances(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    state, rev = await store.state(service_name(request))
    if not wants_stream(request):
        insts = sorted(state.instances.values(), key=lambda i: i.index)
        return json_response(request, [i.to_json() for i in insts])
    kinds = {UP, UPDATE, DOWN}
    return await stream(
        request, state.current_events(kinds, False), store.events(state, rev), kinds
    )


# --- leader -----------------------------------------------------------------------------------


async def put_leader(request: web.Request) -> web.Response:
    raw = await read_json(request)
    inst_id = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(inst_id, str) or not inst_id:
        raise ValidationError("id", "must be an instance id")
    await request.app[STORE].set_leader(service_name(request), inst_id)
    return json_response(request, {})


async def get_leader(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    state, rev = await store.state(service_name(request))
    if wants_stream(request):
        kinds = {LEADER}
        return await stream(
            request, state.current_events(kinds, False), store.events(state, rev), kinds
        )
    leader = state.leader()
    if leader is None:
        raise not_found("no leader found")
    return json_response(request, leader.to_json())


# --- raft (the etcd cluster) ------------------------------------------------------------------


async def raft_leader(request: web.Request) -> web.Response:
    host = await request.app[STORE].raft_leader()
    if host is None:
        raise FlynnError("service_unavailable", "no leader", retry=True)
    return json_response(request, {"host": host})


async def raft_peers(request: web.Request) -> web.Response:
    return json_response(request, await request.app[STORE].raft_peers())


async def put_peer(request: web.Request) -> web.Response:
    raw = await read_json(request, required=False)
    peer_url = raw.get("peer_url") if isinstance(raw, dict) else None
    if peer_url is not None and not isinstance(peer_url, str):
        raise ValidationError("peer_url", "must be a URL")
    index = await request.app[STORE].add_peer(request.match_info["peer"], peer_url)
    return json_response(request, {"last_index": index})


async def delete_peer(request: web.Request) -> web.Response:
    await request.app[STORE].remove_peer(request.match_info["peer"])
    return json_response(request, {})


# --- process ----------------------------------------------------------------------------------


async def ping(request: web.Request) -> web.Response:
    return json_response(request, {})


async def shutdown(request: web.Request) -> web.Response:
    """Asks `serve` to stop; the etcd member (and its data) is the caller's to stop."""
    request.app[SHUTDOWN].set()
    return json_response(request, {"last_index": request.app[STORE].revision})


async def well_known_status(request: web.Request) -> web.Response:
    store = request.app[STORE]
    try:
        leader = await store.etcd.leader_id()
    except EtcdUnavailable:
        leader = None
    if leader is None:
        body = {"status": "unhealthy", "detail": {"etcd": "no leader"}}
        return json_response(request, {"data": body}, status=500)
    return json_response(request, {"data": {"status": "healthy"}})


def make_app(store: Store) -> web.Application:
    app = web.Application(middlewares=[errors_middleware])
    app[STORE] = store
    app[SHUTDOWN] = asyncio.Event()
    r = app.router
    r.add_get("/.well-known/status", well_known_status)
    r.add_get("/ping", ping)
    r.add_post("/shutdown", shutdown)
    r.add_put("/services/{service}", put_service)
    r.add_delete("/services/{service}", delete_service)
    r.add_get("/services/{service}", get_service)
    r.add_put("/services/{service}/meta", put_meta)
    r.add_get("/services/{service}/meta", get_meta)
    r.add_get("/services/{service}/instances", get_instances)
    r.add_put("/services/{service}/instances/{id}", put_instance)
    r.add_delete("/services/{service}/instances/{id}", delete_instance)
    r.add_put("/services/{service}/leader", put_leader)
    r.add_get("/services/{service}/leader", get_leader)
    r.add_get("/raft/leader", raft_leader)
    r.add_get("/raft/peers", raft_peers)
    r.add_put("/raft/peers/{peer}", put_peer)
    r.add_delete("/raft/peers/{peer}", delete_peer)
    return app


async def serve(store: Store, host: str, port: int) -> web.AppRunner:
    """Starts the API on host:port and returns its runner (`await runner.cleanup()` stops it;
    `runner.app[SHUTDOWN]` is set by `POST /shutdown`)."""
    # handler_cancellation: a client that goes away ends its SSE stream and its etcd watch.
    # shutdown_timeout: how long a stopping node lets requests finish (aiohttp waits up to
    # twice that: for handlers, then for their cancellation). Its requests are etcd round
    # trips of milliseconds and its streams are cut anyway; while it waits, the node's host
    # has no discoverd (a deployment replaces it only once it has stopped): 1 s made 2 s of
    # the ~2.7 s each host went without one
    runner = web.AppRunner(make_app(store), shutdown_timeout=0.2, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
