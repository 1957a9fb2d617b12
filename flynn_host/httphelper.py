"""HTTP helpers shared by every aiohttp API in the project (Flynn's `pkg/httphelper`): the
error middleware that answers in Flynn's error JSON, reading a JSON body with Flynn's
`syntax_error` (bounded in size, time and nesting: `flynn_host.limits`), and telling an SSE
request apart."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from flynn_host import limits
from flynn_host.errors import FlynnError

log = logging.getLogger(__name__)


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
