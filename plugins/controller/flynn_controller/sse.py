"""Server-Sent Events framed the way the 2015 CLI's parser (pkg/sse) needs them:

- the status line and headers are sent at once, before any event: the CLI opens a stream and
  only then makes the change it waits for (`flynn scale` opens the job stream, then PUTs);
- `\\n` line ends only (a `\\r\\n` blank line is never seen as the end of a message);
- one `data: ` line per message holding the whole JSON, then one blank line;
- a keep-alive is a lone comment line `:\\n` with no blank line after it (an empty message
  would be a JSON error on the client), sent after `SSE_KEEPALIVE` seconds (default 30) idle;
- an error ends the stream as `event: error` with the text as data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any

from aiohttp import web

CONTENT_TYPE = "text/event-stream; charset=utf-8"

log = logging.getLogger("flynn_controller.sse")


def keepalive_interval() -> float:
    try:
        return max(0.05, float(os.environ.get("SSE_KEEPALIVE", "30")))
    except ValueError:
        return 30.0


def wants_stream(request: web.Request) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


class EventStream:
    """An open SSE response. Use as `async with EventStream(request) as s: await s.send(x)`."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": CONTENT_TYPE,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            },
        )
        self.interval = keepalive_interval()
        self._lock = asyncio.Lock()
        self._last_write = 0.0
        self._keepalive: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventStream:
        # a StreamResponse sends its status line and headers in prepare() itself
        await self.response.prepare(self.request)
        self._last_write = asyncio.get_running_loop().time()
        self._keepalive = asyncio.create_task(self._keep_alive())
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        if exc is None or not isinstance(exc, Exception):
            return False  # done, or cancelled: let it go on
        # the headers are out: a failure can only end the stream, as an `event: error`
        if not isinstance(exc, ConnectionError):
            log.warning("event stream ended by %r", exc)
            with contextlib.suppress(Exception):
                await self.error("Something went wrong")
        return True

    async def _write(self, data: bytes) -> None:
        async with self._lock:
            await self.response.write(data)
            self._last_write = asyncio.get_running_loop().time()

    async def send(self, obj: Any) -> None:
        await self._write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    async def error(self, message: str) -> None:
        text = message.replace("\n", " ")
        await self._write(f"event: error\ndata: {text}\n\n".encode())

    async def _keep_alive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            idle = loop.time() - self._last_write
            if idle >= self.interval:
                try:
                    await self._write(b":\n")
                except (ConnectionError, RuntimeError):
                    return
                continue
            await asyncio.sleep(self.interval - idle)
