"""The blobstore's HTTP API (Flynn's): a blob's name is the URL path.

- `GET`/`HEAD /<path>`: the blob, with `Content-Length`, `Content-Type` (as stored),
  `ETag` (quoted hex SHA-256) and `Accept-Ranges: bytes`; one `Range: bytes=a-b|a-|-n` gives
  206 and `Content-Range` (416 when it starts past the end; several ranges get the whole blob),
  `If-Range` and `If-None-Match` (304) are honoured. Streamed in chunks from the store.
- `PUT /<path>`: the body (Content-Length or chunked) becomes the blob, replacing the old one
  whole or not at all; 200 with an empty body. Its `Content-Type` is stored.
- `DELETE /<path>`: 200, or 404.
- A missing blob is 404 with the body `NotFound`; other methods 405; a path with a `..`
  segment 400; repeated slashes count as one.
- `GET /.well-known/status` is 200 `{"data": {"status": "healthy"}}` while the store answers
  (503 otherwise), and not a blob.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from flynn_blobstore.store import Store, StoreError
from flynn_blobstore.types import DEFAULT_CONTENT_TYPE, STATUS_PATH

log = logging.getLogger("flynn_blobstore")

STORE = web.AppKey("store", Store)
READ_CHUNK = 1 << 18  # bytes asked of the request body at a time
STATUS_TIMEOUT = 5.0
METHODS = "GET, HEAD, PUT, DELETE"

RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
SLASHES = re.compile(r"//+")


def not_found() -> web.Response:
    return web.Response(status=404, text="NotFound")


def blob_name(request: web.Request) -> str | None:
    """The blob name of the request (its decoded path), or None if it has a `..` segment
    (checked on the path as sent, before anything resolved the dots away)."""
    raw = urllib.parse.unquote(request.raw_path.split("?", 1)[0])
    if ".." in raw.split("/"):
        return None
    # `/a//b` is `/a/b`, as a directory would have it
    return SLASHES.sub("/", request.path)


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """(first byte, length) of a single `bytes=` range of a blob of `size` bytes; None when
    the whole blob is to be sent (no range, one we do not parse, several); "unsatisfiable"."""
    m = RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # the last n bytes
        n = int(last)
        if n == 0:
            return "unsatisfiable"
        n = min(n, size)
        return size - n, n
    start = int(first)
    if start >= size:
        return "unsatisfiable"
    end = min(int(last), size - 1) if last else size - 1
    if end < start:
        return None  # syntactically invalid: ignored, as RFC 9110 says
    return start, end - start + 1


def _etag_in(header: str, etag: str) -> bool:
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags


async def get(request: web.Request, name: str) -> web.StreamResponse:
    async with request.app[STORE].open(name) as blob:
        if blob is None:
            return not_found()
        info = blob.info
        etag = f'"{info.etag}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        if_none_match = request.headers.get("If-None-Match")
        if if_none_match and _etag_in(if_none_match, etag):
            return web.Response(status=304, headers=headers)
        start, length, status = 0, info.size, 200
        if_range = request.headers.get("If-Range")
        if "Range" in request.headers and (if_range is None or if_range == etag):
            wanted = parse_range(request.headers["Range"], info.size)
            if wanted == "unsatisfiable":
                headers["Content-Range"] = f"bytes */{info.size}"
                return web.Response(status=416, headers=headers, text="range not satisfiable")
            if isinstance(wanted, tuple):
                start, length = wanted
                status = 206
                headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{info.size}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = info.content_type
        resp.content_length = length
        await resp.prepare(request)
        if request.method != "HEAD" and length:
            sent = 0
            try:
                async for chunk in blob.read(start, length):
                    await resp.write(chunk)
                    sent += len(chunk)
            except ConnectionError:
                log.info("GET %s: the client went away after %d of %d bytes", name, sent, length)
                return resp
        await resp.write_eof()
        return resp


class IncompleteBody(Exception):
    """The client went away before the end of its request's body."""


async def body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; IncompleteBody if the connection ends before the body
    does (short of its Content-Length, or before the last chunk)."""
    try:
        while chunk := await request.content.read(READ_CHUNK):
            yield chunk
    except (ConnectionError, aiohttp.ClientPayloadError) as exc:
        raise IncompleteBody(str(exc) or type(exc).__name__) from exc


async def put(request: web.Request, name: str) -> web.Response:
    if name == "/" or name.endswith("/"):
        return web.Response(status=400, text="a blob's name cannot end with /")
    ctype = request.headers.get("Content-Type") or DEFAULT_CONTENT_TYPE
    try:
        await request.app[STORE].put(name, body_chunks(request), ctype)
    except StoreError as exc:
        return web.Response(status=409, text=str(exc))
    except IncompleteBody as exc:
        # the store dropped what it had written: the client is gone, the answer is for the log
        log.info("PUT %s: the body did not arrive whole (%s); nothing stored", name, exc)
        return web.Response(status=400, text="incomplete body")
    return web.Response(status=200)


async def delete(request: web.Request, name: str) -> web.Response:
    if not await request.app[STORE].delete(name):
        return not_found()
    return web.Response(status=200)


async def handle(request: web.Request) -> web.StreamResponse:
    name = blob_name(request)
    if name is None:
        return web.Response(status=400, text="a path may not have a .. segment")
    if request.method in ("GET", "HEAD"):
        return await get(request, name)
    if request.method == "PUT":
        return await put(request, name)
    if request.method == "DELETE":
        return await delete(request, name)
    return web.Response(status=405, headers={"Allow": METHODS}, text="method not allowed")


async def status(request: web.Request) -> web.Response:
    try:
        await asyncio.wait_for(request.app[STORE].check(), STATUS_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
        log.warning("status: the store does not answer: %s", exc)
        return web.json_response({"data": {"status": "unhealthy"}}, status=503)
    return web.json_response({"data": {"status": "healthy"}})


def make_app(open_store: Callable[[], Awaitable[Store]]) -> web.Application:
    """The API on the store `open_store()` gives; the store is closed when the app is."""

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        app[STORE] = await open_store()
        yield
        await app[STORE].close()

    app = web.Application()
    app.cleanup_ctx.append(store_ctx)
    app.router.add_get(STATUS_PATH, status)
    app.router.add_route("*", "/{name:.*}", handle)
    return app
