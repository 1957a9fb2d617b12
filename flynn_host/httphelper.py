"""HTTP helpers shared by every aiohttp API in the project (Flynn's `pkg/httphelper` and
`pkg/sse`): the error middleware that answers in Flynn's error JSON, reading a JSON body with
Flynn's `syntax_error` (bounded in size, time and nesting: `flynn_host.limits`), and event
streams: telling an SSE request apart and writing one with Flynn's framing and keep-alives
(the host API's job events and discoverd's service events both go through `write_sse`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from aiohttp import web

from flynn_host import limits
from flynn_host.errors import FlynnError

log = logging.getLogger(__name__)

# seconds without an event after which a stream sends a `:` comment line, as Flynn's do: it
# keeps proxies from closing an idle stream and shows the client the server is still there
SSE_KEEPALIVE = 30.0


async def read_json(
    request: web.Request,
    required: bool = True,
    max_bytes: int = limits.MAX_JSON_BODY,
    within: float = limits.BODY_TIMEOUT,
) -> Any:
    """The request's JSON body; an empty body is a `syntax_error` unless not `required`.
    A body over `max_bytes` is `request_body_too_big`, one that has not all arrived
    `within` seconds `request_timeout`, and invalid UTF-8, invalid JSON or JSON nested deeper
    than `limits.MAX_JSON_DEPTH` a `syntax_error`."""
    too_big = FlynnError("request_body_too_big", f"request body is larger than {max_bytes} bytes")
    if (request.content_length or 0) > max_bytes:
        raise too_big  # refused before reading any of it
    try:
        async with asyncio.timeout(within):
            body = await limits.read_stream(request.content, max_bytes, "request body")
    except limits.TooBig:
        raise too_big from None
    except TimeoutError:
        raise FlynnError(
            "request_timeout", f"request body not received within {within:g} seconds"
        ) from None
    if not body.strip():
        if required:
            raise FlynnError("syntax_error", "request body is empty: expected JSON")
        return None
    try:
        return limits.loads_json(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FlynnError("syntax_error", f"invalid JSON: {exc}") from exc


def wants_stream(request: web.Request) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


def sse_response(headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """A response for an event stream: Flynn's SSE headers, plus `headers`."""
    return web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            **(headers or {}),
        }
    )


async def write_sse(
    request: web.Request,
    resp: web.StreamResponse,
    events: AsyncIterator[Any],
    keepalive: float = SSE_KEEPALIVE,
) -> None:
    """Send `resp`'s headers, then each of `events` (JSON values) as Flynn frames SSE: a
    `data: <json>` line and a blank line; a `:` line after `keepalive` seconds without an event;
    when `events` raises, `event: error` with its message, which ends the stream (the headers
    are gone: a status can no longer say it). Returns when `events` ends or the client goes
    away, and closes `events` either way. A cancellation (a shutdown ending the stream)
    propagates, for the caller to handle."""
    it = aiter(events)
    pending: asyncio.Future[Any] | None = None
    with contextlib.suppress(ConnectionResetError):
        try:
            await resp.prepare(request)
            while True:
                # the next event is awaited in a task of its own that outlives a keep-alive:
                # cancelling it on a timeout would end the iterator (an etcd watch, say)
                if pending is None:
                    pending = asyncio.ensure_future(anext(it))
                done, _ = await asyncio.wait({pending}, timeout=keepalive)
                if not done:
                    await resp.write(b":\n")
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    log.warning("event stream of %s failed: %s", request.path, exc)
                    pending = None
                    msg = str(exc).replace("\n", " ")
                    await resp.write(f"event: error\ndata: {msg}\n\n".encode())
                    break
                pending = None
                await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()


def errors_middleware(
    translate: Callable[[Exception], FlynnError | None] | None = None,
    headers: Callable[[web.Request], dict[str, str]] | None = None,
) -> Any:
    """Middleware turning every error into Flynn's error JSON (a `FlynnError`'s code and
    status; aiohttp's 404/405/413; anything else `unknown_error`, logged), never a bare 500.
    `translate` maps an API's own exceptions to a FlynnError (None: not one of them);
    `headers` adds headers to every error response."""

    def respond(request: web.Request, body: dict[str, Any], status: int) -> web.Response:
        return web.Response(text=json.dumps(body), status=status, content_type="application/json",
                            headers=headers(request) if headers else None)  # fmt: skip

    def error(request: web.Request, err: FlynnError) -> web.Response:
        return respond(request, err.to_json(), err.status)

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except FlynnError as err:
            return error(request, err)
        except web.HTTPException as exc:
            if exc.status == 404:
                return error(request, FlynnError("not_found", f"no route for {request.path}"))
            if exc.status == 405:
                body = {"code": "method_not_allowed", "message": f"{request.method} not allowed"}
                return respond(request, body, 405)
            if exc.status == 413:
                return error(request, FlynnError("request_body_too_big", "request body too big"))
            raise
        except Exception as exc:  # our bug, or an API's own error: never a bare 500 page
            translated = translate(exc) if translate else None
            if translated is not None:
                return error(request, translated)
            log.exception("%s %s failed", request.method, request.path)
            return error(request, FlynnError("unknown_error", f"internal error: {exc}"))

    return middleware
