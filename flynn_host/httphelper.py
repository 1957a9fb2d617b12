"""HTTP helpers shared by every aiohttp API in the project (Flynn's `pkg/httphelper`):
reading a JSON body with Flynn's `syntax_error`, and telling an SSE request apart."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from flynn_host.errors import FlynnError


async def read_json(request: web.Request, required: bool = True) -> Any:
    """The request's JSON body; an empty body is a `syntax_error` unless not `required`."""
    body = await request.read()
    if not body.strip():
        if required:
            raise FlynnError("syntax_error", "request body is empty: expected JSON")
        return None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FlynnError("syntax_error", f"invalid JSON: {exc}") from exc


def wants_stream(request: web.Request) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")
