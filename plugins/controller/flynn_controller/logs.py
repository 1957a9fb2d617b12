"""`GET /apps/:app/log`: an app's log, read from the log aggregator (docs/logaggregator.md) and
passed on as Flynn's controller did (`appLog`):

- as `text/plain`, the aggregator's newline-delimited JSON messages unchanged, each piece
  written as soon as it arrives (Flynn flushed every 50 ms);
- with `Accept: text/event-stream`, one SSE message `{"event":"message","data":<message>}`
  per message, and `{"event":"eof"}` last when the aggregator ends the body.

`follow`, `job_id`, `lines`, `process_type` (and `stream_types`, which later Flynn clients
send) go to the aggregator as given and mean what they meant there: without `follow` the last
`lines` messages (all when absent or 0); with it the last `lines`, then new messages until the
client goes away (so only new ones without `lines`). The app is found by name or id (a bare
404 otherwise) and its *id* is the aggregator's channel, the one the hosts ship to.

A `lines` outside 0–10000 is a validation error before the aggregator is asked. An aggregator
that cannot be reached is a 500 `unknown_error`, the status and code Flynn answered, with a
message that says so (Flynn's said "Something went wrong"); not `retry: true`, which the 2015
client would retry for 10 s before saying anything.

aiohttp does not cancel a handler whose client went away, and a follow may wait a long time
with nothing to write: while it waits the copy looks at the client's connection every
`GONE_CHECK` seconds, and once it is gone it leaves, which closes the aggregator's response.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiohttp
from aiohttp import web
from flynn_logaggregator.client import Client
from flynn_logaggregator.types import MAX_LINES

from flynn_controller.api import Query, config, find_app, operation, pool
from flynn_controller.errors import APIError
from flynn_controller.sse import EventStream, wants_stream
from flynn_host.errors import FlynnError

log = logging.getLogger("flynn_controller.logs")

GONE_CHECK = 0.25  # seconds between looks at the client's connection while nothing comes


class ClientGone(ConnectionError):
    """The client closed its connection (a ConnectionError, as a failed write would be)."""


@operation(
    "GET",
    "/apps/{app}/log",
    "An app's log: NDJSON, or SSE with Accept: text/event-stream",
    stream=True,
    params=("follow", "job_id", "lines", "process_type", "stream_types"),
)
async def app_log(request: web.Request) -> web.StreamResponse:
    app = await find_app(pool(request), request.match_info["app"])
    q = Query(request)
    lines = q.int("lines", 0, MAX_LINES)
    process_types = request.query.getall("process_type", [])
    url = config(request).logaggregator_url
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(Client(url))
        try:
            body = await stack.enter_async_context(
                client.log_body(
                    str(app["app_id"]),
                    follow=q.get("follow") == "true",
                    lines=lines,
                    job_id=q.get("job_id") or "",
                    process_type=process_types[-1] if process_types else "",
                    stream_types=tuple(s for s in (q.get("stream_types") or "").split(",") if s),
                )
            )
        except FlynnError as exc:  # the aggregator's own error answer
            raise APIError(exc.code, exc.message, exc.detail, exc.retry) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("log of %s: the log aggregator at %s: %s", app["name"], url, exc)
            raise APIError(
                "unknown_error", f"the log aggregator ({url}) cannot be reached: {exc}"
            ) from None
        if wants_stream(request):
            return await _events(request, body)
        return await _plain(request, body)


async def _plain(request: web.Request, body: aiohttp.StreamReader) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
    try:
        await resp.prepare(request)  # headers at once: a follow may have nothing for a while
        while chunk := await _read(request, body):
            await resp.write(chunk)
        await resp.write_eof()
    except ConnectionError:  # the client went away: nothing to tell it
        pass
    return resp


async def _events(request: web.Request, body: aiohttp.StreamReader) -> web.StreamResponse:
    async with EventStream(request) as stream:
        rest = b""
        while chunk := await _read(request, body):
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    await stream.send({"event": "message", "data": json.loads(line)})
        if rest.strip():
            await stream.send({"event": "message", "data": json.loads(rest)})
        await stream.send({"event": "eof"})
    return stream.response


async def _read(request: web.Request, body: aiohttp.StreamReader) -> bytes:
    """The aggregator's next bytes, b"" at the end of its body (also when it broke: logged, and
    the client sees the end, as Flynn's did); ClientGone if the client leaves first.
    `readany` takes nothing from the buffer before it waits, so a wait cut short loses no
    bytes (a cut-short `readline` would)."""
    while True:
        try:
            async with asyncio.timeout(GONE_CHECK):
                return await body.readany()
        except TimeoutError:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ClientGone() from None
        except aiohttp.ClientError as exc:
            log.warning("log: the log aggregator's answer broke off: %s", exc)
            return b""
