"""The event stream writer the host API and discoverd share (`httphelper.write_sse`), served by
aiohttp on loopback: Flynn's framing, keep-alives that leave the events' iterator alone, the
error framing, and the iterator closed when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from flynn_host import httphelper
from flynn_host.dev.host import free_port

Events = Callable[[], AsyncIterator[Any]]


@contextlib.asynccontextmanager
async def serve(
    events: Events, keepalive: float = 30.0, handler_cancellation: bool = False
) -> AsyncIterator[str]:
    """`events()` served as an event stream on loopback; yields its URL."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = httphelper.sse_response({"X-Extra": "1"})
        await httphelper.write_sse(request, resp, events(), keepalive=keepalive)
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    try:
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def body_of(url: str) -> tuple[dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 200
        return dict(resp.headers), await resp.read()


async def test_events_are_framed_as_flynn_frames_them() -> None:
    async def events() -> AsyncIterator[Any]:
        yield {"event": "start", "job_id": "h-1"}
        yield [1, "two"]

    async with serve(events) as url:
        headers, body = await body_of(url)
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache" and headers["X-Extra"] == "1"
    assert body == b'data: {"event": "start", "job_id": "h-1"}\n\ndata: [1, "two"]\n\n'


async def test_keep_alive_in_silence_leaves_the_iterator_running() -> None:
    cancelled = []
    speak = asyncio.Event()

    async def events() -> AsyncIterator[Any]:
        try:
            await speak.wait()  # silent until the client has had two keep-alives
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        yield "late"

    async with (
        serve(events, keepalive=0.1) as url,
        aiohttp.ClientSession() as s,
        s.get(url) as resp,
    ):
        assert [await resp.content.readline() for _ in range(2)] == [b":\n", b":\n"]
        speak.set()
        rest = await resp.read()
    assert not cancelled
    late = b'data: "late"\n\n'  # after, perhaps, more keep-alives
    assert rest.endswith(late) and rest.removesuffix(late).replace(b":\n", b"") == b"", rest


async def test_a_failing_iterator_ends_the_stream_with_the_error_framing() -> None:
    async def events() -> AsyncIterator[Any]:
        yield 1
        raise RuntimeError("etcd unavailable:\nno leader")

    async with serve(events) as url:
        _, body = await body_of(url)
    assert body == b"data: 1\n\nevent: error\ndata: etcd unavailable: no leader\n\n"


@pytest.mark.parametrize("handler_cancellation", [True, False], ids=["discoverd", "host-api"])
async def test_the_iterator_is_closed_when_the_client_goes_away(handler_cancellation: bool) -> None:
    closed = asyncio.Event()

    async def events() -> AsyncIterator[Any]:
        try:
            yield "first"
            await asyncio.sleep(3600)
            yield "never"
        finally:
            closed.set()

    # discoverd's server cancels a handler whose client went away; the host API's does not,
    # and its stream ends at the next write, a keep-alive
    async with serve(events, 0.1, handler_cancellation) as url:
        async with aiohttp.ClientSession() as s, s.get(url) as resp:
            assert await resp.content.readline() == b'data: "first"\n'
        await asyncio.wait_for(closed.wait(), 5)
