"""What other components use of the router: its API's event stream (`GET /events` of a
`router-api` instance), e.g. to wait for `backend-drained` before stopping a job."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp

STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5, sock_read=75)


async def events(
    api_url: str, types: Iterable[str] = (), session: aiohttp.ClientSession | None = None
) -> AsyncIterator[dict[str, Any]]:
    """The events of the router at `api_url` (`http://ip:port`) as Flynn's StreamEvent JSON
    (`{"event", "route"?, "backend"?, "job_id"?}`), from now on; only `types` when given.
    Ends when the stream does (the router went away); an `error` event raises."""
    own = session is None
    http = session or aiohttp.ClientSession()
    try:
        query = "?types=" + ",".join(types) if types else ""
        async with http.get(
            api_url.rstrip("/") + "/events" + query,
            headers={"Accept": "text/event-stream"},
            timeout=STREAM_TIMEOUT,
        ) as resp:
            if resp.status != 200:
                raise ConnectionError(f"router events: {resp.status} {await resp.text()}")
            async for event, data in sse_messages(resp):
                if event == "error":
                    raise ConnectionError(f"router events: {data}")
                yield json.loads(data)
    finally:
        if own:
            await http.close()


async def sse_messages(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each message of a Server-Sent Events response."""
    event, data = "", []
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" ") if line[5:6] == " " else line[5:])
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif not line:
            if data:
                yield event, "\n".join(data)
            event, data = "", []
