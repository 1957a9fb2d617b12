"""Flynn's HTTP error conventions (pkg/httphelper), as the 2015 CLI tests them:

- an error is JSON `{"code", "message", "detail"?, "retry"}` with `Content-Type:
  application/json`, its status set by the code;
- "not found" is a *bare* 404: no body, no content type — the CLI compares it with its
  `ErrNotFound` sentinel, and a JSON 404 would make commands like `flynn env` fail;
- database or network trouble is `unknown_error` with `retry: true`, which the CLI retries
  silently for 10 s (a PostgreSQL fail-over looks like that to it).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from flynn_host.errors import FlynnError


class APIError(FlynnError):
    """An error answered as Flynn's error JSON (the host API's `FlynnError`: the same codes,
    statuses and body)."""

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=json.dumps(self.to_json()).encode(),
            content_type="application/json",
        )


class NotFound(Exception):
    """Answered as a bare 404."""


def validation_error(field: str, message: str) -> APIError:
    """Flynn's validation error: the message starts with the field, `detail.field` names it."""
    text = f"{field} {message}" if field else message
    return APIError("validation_error", text, {"field": field} if field else None)


def conflict(message: str, detail: Any = None) -> APIError:
    return APIError("conflict", message, detail)


def object_exists(message: str) -> APIError:
    return APIError("object_exists", message)


def unknown_error(retry: bool) -> APIError:
    return APIError("unknown_error", "Something went wrong", retry=retry)


def bare(status: int) -> web.Response:
    """A response with no body and no content type (404, 401)."""
    return web.Response(status=status)
