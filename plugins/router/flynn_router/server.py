"""The router API (`router-api` in discoverd): `GET /.well-known/status`, `GET /events`
(Server-Sent Events of `set`, `remove`, `backend-up`, `backend-down`, `backend-drained`,
filtered with `?types=a,b`) and `GET /debug/state` (what this router serves). Anything else is
404, which Flynn's bootstrap waits for to know the router is up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from flynn_host.errors import FlynnError
from flynn_host.httphelper import errors_middleware, sse_response, write_sse
from flynn_router.types import EVENT_KINDS, StreamEvent

log = logging.getLogger("flynn_router")

SUBSCRIBER_BUFFER = 10000  # events a slow subscriber may fall behind before it is dropped


class EventHub:
    """Fans the router's events out to every `GET /events` subscriber."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[StreamEvent | None]] = set()

    def publish(self, event: StreamEvent) -> None:
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("an event subscriber fell behind: dropping it")
                self.subscribers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)

    def stream(self, kinds: set[str]) -> AsyncIterator[dict[str, Any]]:
        """The events from now on: subscribed at once, before the caller sends its headers,
        so that a client that has them misses nothing published after."""
        queue: asyncio.Queue[StreamEvent | None] = asyncio.Queue(SUBSCRIBER_BUFFER)
        self.subscribers.add(queue)
        return self._events(queue, kinds)

    async def _events(
        self, queue: asyncio.Queue[StreamEvent | None], kinds: set[str]
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            while (event := await queue.get()) is not None:
                if not kinds or event.event in kinds:
                    yield event.to_json()
            raise ConnectionError("too slow: events were dropped")
        finally:
            self.subscribers.discard(queue)


HUB = web.AppKey("hub", EventHub)
STATE = web.AppKey("state", object)


def make_app(hub: EventHub, state: Callable[[], dict[str, Any]]) -> web.Application:
    app = web.Application(middlewares=[errors_middleware()])
    app[HUB] = hub
    app[STATE] = state

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    async def events(request: web.Request) -> web.StreamResponse:
        kinds = {k for k in request.query.get("types", "").split(",") if k}
        unknown = kinds - set(EVENT_KINDS)
        if unknown:
            raise FlynnError(
                "validation_error", f"unknown event types: {', '.join(sorted(unknown))}"
            )
        resp = sse_response()
        await write_sse(request, resp, hub.stream(kinds))
        return resp

    async def debug_state(request: web.Request) -> web.Response:
        return web.json_response(state())

    app.router.add_get("/.well-known/status", status)
    app.router.add_get("/events", events)
    app.router.add_get("/debug/state", debug_state)
    return app
