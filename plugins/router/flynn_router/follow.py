"""Where the router's state comes from: routes from the controller (`GET /routes`, then its
event stream of `route` and `route_deletion`) and backends from discoverd (a watch of each
routed service). Both keep going through outages: while the controller is away the router
serves the routes it has and catches up when the controller returns; a discoverd watch
reconnects and replays what it missed (`flynn_discoverd.client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from flynn_router.client import sse_messages
from flynn_router.types import Backend, Route

log = logging.getLogger("flynn_router")

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)
# the controller sends an SSE keep-alive every 30 s: a stream silent for longer is dead
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5, sock_read=75)
RETRY_MIN, RETRY_MAX = 0.5, 5.0


class RouteSource:
    """Follows the controller's routes. `on_routes(list)` gets every route when the stream
    (re)connects; `on_set(route)` and `on_remove(route)` each change after that."""

    def __init__(
        self,
        url: Callable[[], Awaitable[str]],
        key: str,
        on_routes: Callable[[list[Route]], None],
        on_set: Callable[[Route], None],
        on_remove: Callable[[Route], None],
    ) -> None:
        self.url = url
        self.auth = aiohttp.BasicAuth("", key)
        self.on_routes = on_routes
        self.on_set = on_set
        self.on_remove = on_remove
        self.synced = asyncio.Event()  # routes loaded at least once
        self.connected = False

    async def run(self) -> None:
        from flynn_discoverd.client import DiscoverdError

        delay = RETRY_MIN
        async with aiohttp.ClientSession(auth=self.auth, timeout=HTTP_TIMEOUT) as session:
            while True:
                try:
                    await self._follow(session)
                except asyncio.CancelledError:
                    raise
                except (DiscoverdError, aiohttp.ClientError, OSError, TimeoutError,
                        ValueError) as exc:  # fmt: skip
                    if self.connected:
                        log.warning("controller route stream: %s; serving the last routes", exc)
                    else:
                        log.info("controller not reachable yet: %s", exc)
                    delay = RETRY_MIN if self.connected else min(delay * 2, RETRY_MAX)
                except Exception as exc:  # noqa: BLE001 - following must outlive anything
                    # e.g. discoverd answering an error while a rejoining host's member
                    # catches up: a router that stopped following would serve no route
                    log.exception("following the controller's routes: %r; retrying", exc)
                    delay = min(delay * 2, RETRY_MAX)
                self.connected = False
                await asyncio.sleep(delay * random.uniform(1, 1.5))

    async def _follow(self, session: aiohttp.ClientSession) -> None:
        base = (await self.url()).rstrip("/")
        # subscribe first, then list: a change made between the two is in the stream, and
        # applying it again on top of the list changes nothing
        async with session.get(
            base + "/events?object_types=route,route_deletion",
            headers={"Accept": "text/event-stream"},
            timeout=STREAM_TIMEOUT,
        ) as stream:
            if stream.status != 200:
                raise aiohttp.ClientResponseError(
                    stream.request_info, (), status=stream.status, message="GET /events"
                )
            async with session.get(base + "/routes") as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message="GET /routes"
                    )
                listed = await resp.json()
            routes = [Route.from_json(r) for r in listed if isinstance(r, dict)]
            self.on_routes(routes)
            self.connected = True
            self.synced.set()
            log.info("routes from the controller at %s: %d", base, len(routes))
            async for event, data in sse_messages(stream):
                if event == "error":
                    raise ValueError(f"controller stream error: {data}")
                self._apply(json.loads(data))
        raise aiohttp.ClientPayloadError("controller stream ended")

    def _apply(self, event: dict[str, Any]) -> None:
        raw = event.get("data")
        if not isinstance(raw, dict):
            return
        route = Route.from_json(raw)
        if event.get("object_type") == "route":
            self.on_set(route)
        elif event.get("object_type") == "route_deletion":
            self.on_remove(route)


class BackendSource:
    """Follows the discoverd instances of the services that routes name: one watch per
    service, started when a route first names it and stopped when no route does.
    `on_backends(service, backends, leader_addr)` gets each service's full list on every
    change; `on_up`/`on_down(service, backend)` each instance that comes or goes."""

    def __init__(
        self,
        discoverd: Any,
        on_backends: Callable[[str, list[Backend], str | None], None],
        on_up: Callable[[str, Backend], None],
        on_down: Callable[[str, Backend], None],
    ) -> None:
        self.discoverd = discoverd
        self.on_backends = on_backends
        self.on_up = on_up
        self.on_down = on_down
        self.watches: dict[str, asyncio.Task[None]] = {}
        self.instances: dict[str, dict[str, Backend]] = {}
        self.leaders: dict[str, str | None] = {}

    def follow(self, services: set[str]) -> None:
        """Watch exactly `services` from now on."""
        for name in set(self.watches) - services:
            self.watches.pop(name).cancel()
            self.instances.pop(name, None)
            self.leaders.pop(name, None)
        for name in services - set(self.watches):
            self.watches[name] = asyncio.create_task(self._watch(name))

    async def close(self) -> None:
        tasks = list(self.watches.values())
        self.watches.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def _watch(self, service: str) -> None:
        from flynn_discoverd.client import DiscoverdError, ObjectExistsError

        delay = RETRY_MIN
        while True:
            try:
                # a route may name a service before any instance registers in it
                with contextlib.suppress(ObjectExistsError):
                    await self.discoverd.add_service(service)
                await self._stream(service)
            except asyncio.CancelledError:
                raise
            except (DiscoverdError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("watching %s in discoverd: %s; retrying", service, exc)
            except Exception as exc:  # noqa: BLE001 - a watch must outlive anything
                log.exception("watching %s in discoverd: %r", service, exc)
            await asyncio.sleep(delay * random.uniform(1, 1.5))
            delay = min(delay * 2, RETRY_MAX)

    async def _stream(self, service: str) -> None:
        # a watch (re)starts from discoverd's current state; what this router was told before
        # is compared with it once the state is complete, so nothing is announced twice
        before = self.instances.get(service, {})
        instances: dict[str, Backend] = {}
        current = False
        async for ev in self.discoverd.watch(service):
            inst = ev.instance
            if ev.kind in ("up", "update") and inst is not None:
                backend = Backend.from_instance_json(inst.to_json())
                fresh = inst.id not in instances
                instances[inst.id] = backend
                if fresh and current:
                    self.on_up(service, backend)
            elif ev.kind == "down" and inst is not None:
                gone = instances.pop(inst.id, None)
                if gone is not None and current:
                    self.on_down(service, gone)
            elif ev.kind == "leader":
                self.leaders[service] = inst.addr if inst is not None else None
            elif ev.kind == "current":
                current = True
                self.instances[service] = instances
                for key, backend in before.items():
                    if key not in instances:
                        self.on_down(service, backend)
                for key, backend in instances.items():
                    if key not in before:
                        self.on_up(service, backend)
            else:
                continue
            if current:
                self.on_backends(service, list(instances.values()), self.leaders.get(service))
