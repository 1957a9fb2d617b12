"""The controller as the scheduler reaches it (formations stream, job reports, routes), and
the SSE reader it shares with the hosts' job streams (see `scheduler`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from flynn_controller.scheduler_state import Job

log = logging.getLogger("flynn_controller.scheduler")

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=5)
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5, sock_read=90)
ROUTES_TTL = 5.0  # seconds an app's routes are taken as known


class Controller:
    """The controller's API as the scheduler uses it (base URL found by `url()`)."""

    def __init__(self, url: Callable[[], Any], key: str) -> None:
        self._url = url
        self.auth = aiohttp.BasicAuth("", key)
        self.session: aiohttp.ClientSession | None = None
        self._routes: dict[str, tuple[float, list[dict[str, Any]]]] = {}

    async def __aenter__(self) -> Controller:
        self.session = aiohttp.ClientSession(auth=self.auth, timeout=HTTP_TIMEOUT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def formations(self) -> AsyncIterator[dict[str, Any]]:
        """The `GET /formations` stream: every formation, `{}`, then each change."""
        assert self.session is not None
        base = await self._url()
        async with self.session.get(
            base + "/formations",
            headers={"Accept": "text/event-stream"},
            timeout=STREAM_TIMEOUT,
        ) as resp:
            if resp.status != 200:
                raise ConnectionError(f"controller: GET /formations: {resp.status}")
            async for data in sse_data(resp):
                yield data

    async def put_job(self, job: Job) -> None:
        assert self.session is not None
        body: dict[str, Any] = {"state": job.reported, "release": job.release_id}
        if job.type:
            body["type"] = job.type
        if job.exit_status is not None:
            body["exit_status"] = job.exit_status
        if job.error:
            body["host_error"] = job.error
        base = await self._url()
        async with self.session.put(f"{base}/apps/{job.app_id}/jobs/{job.id}", json=body) as r:
            if r.status >= 500:
                raise ConnectionError(f"controller: PUT job {job.id}: {r.status}")
            if r.status != 200:
                # refused for good (an app deleted meanwhile, a state gone back): not retried
                log.info("controller refused job %s %s: %s", job.id, body, await r.text())

    async def jobs(self, app_id: str) -> list[dict[str, Any]]:
        """The controller's records of the app's jobs."""
        assert self.session is not None
        base = await self._url()
        async with self.session.get(f"{base}/apps/{app_id}/jobs") as resp:
            if resp.status != 200:
                raise ConnectionError(f"controller: GET jobs of {app_id}: {resp.status}")
            found = await resp.json(content_type=None)
        return [j for j in found or [] if isinstance(j, dict)]

    async def routes(self, app_id: str) -> list[dict[str, Any]]:
        """The app's routes (known for ROUTES_TTL seconds)."""
        cached = self._routes.get(app_id)
        if cached is not None and time.monotonic() - cached[0] < ROUTES_TTL:
            return cached[1]
        assert self.session is not None
        base = await self._url()
        async with self.session.get(f"{base}/apps/{app_id}/routes") as resp:
            routes = await resp.json(content_type=None) if resp.status == 200 else None
        out = [r for r in routes or [] if isinstance(r, dict)]
        self._routes[app_id] = (time.monotonic(), out)
        return out


async def sse_data(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON `data` of each event of an SSE response; an `error` event raises."""
    event, data = "", []
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif not line:
            if data:
                payload = json.loads("\n".join(data))
                if event == "error":
                    raise ConnectionError(f"stream error: {payload}")
                yield payload
            event, data = "", []
