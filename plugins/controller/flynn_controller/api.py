"""What every handler module shares: the table of operations (method, path, handler, body
schema, summary) from which `server.py` builds the router and `openapi.py` the description,
typed application state, and the request helpers (JSON bodies, looking an app up by name or
id, JSON answers).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web
from flynn_logaggregator.client import DEFAULT_URL as LOGAGGREGATOR_URL

from flynn_controller.errors import APIError, NotFound, validation_error
from flynn_controller.events import EventHub
from flynn_controller.schemas import validate
from flynn_controller.types import is_uuid

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BODY = 1 << 20  # 1 MiB: more than any release or route needs


@dataclass(frozen=True)
class Config:
    """What a controller process is told through its environment."""

    auth_keys: tuple[str, ...]
    default_route_domain: str = ""
    ca_cert: str = ""
    name_seed: str = ""
    version: str = "dev"
    logaggregator_url: str = LOGAGGREGATOR_URL


@dataclass
class Operation:
    method: str
    path: str
    handler: Handler
    summary: str
    body: str | None = None  # schema name in schemas.SCHEMAS
    response: str | None = None  # schema name of the answer, for openapi.json
    stream: bool = False  # may answer text/event-stream
    params: tuple[str, ...] = ()  # query parameters
    auth: bool = True


OPERATIONS: list[Operation] = []


def operation(
    method: str,
    path: str,
    summary: str,
    body: str | None = None,
    response: str | None = None,
    stream: bool = False,
    params: tuple[str, ...] = (),
    auth: bool = True,
) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        OPERATIONS.append(
            Operation(method, path, handler, summary, body, response, stream, params, auth)
        )
        return handler

    return register


# --- application state ------------------------------------------------------------------------
POOL = web.AppKey("pool", asyncpg.Pool)
HUB = web.AppKey("hub", EventHub)
CONFIG = web.AppKey("config", Config)


def pool(request: web.Request) -> asyncpg.Pool:
    return request.app[POOL]


def config(request: web.Request) -> Config:
    return request.app[CONFIG]


# --- requests ----------------------------------------------------------------------------------
async def read_json(request: web.Request, schema: str | None = None) -> Any:
    """The request body as JSON (`syntax_error` if it is not), validated against `schema`."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise APIError("validation_error", "request body is too large")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise APIError("validation_error", "request body is too large")
    try:
        body = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError):
        raise APIError("syntax_error", "The provided JSON input is invalid") from None
    nul = _nul_field(body, "")
    if nul is not None:
        raise validation_error(nul, "must not contain NUL characters")
    if schema is not None:
        if body is None:
            raise APIError("syntax_error", "The provided JSON input is invalid")
        validate(schema, body)
    return body


def _nul_field(value: Any, path: str) -> str | None:
    """The dotted path of the first string (or key) holding U+0000, which PostgreSQL's text
    and jsonb cannot store; None when there is none."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{path}.{k}" if path else str(k)
            if "\x00" in k:
                return here
            found = _nul_field(v, here)
            if found is not None:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _nul_field(v, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


def json_response(obj: Any) -> web.Response:
    return web.Response(
        body=json.dumps(obj, separators=(",", ":")).encode(), content_type="application/json"
    )


def empty_response() -> web.Response:
    """200 with an empty body: the 2015 CLI treats 201/204 as errors."""
    return web.Response(status=200)


APP_COLUMNS = "app_id, name, meta, strategy, release_id, deploy_timeout, created_at, updated_at"


async def find_app(
    conn: asyncpg.Connection | asyncpg.Pool, ref: str, lock: bool = False
) -> asyncpg.Record:
    """An app by id or name (a name shaped like a UUID is tried as both), not deleted; a bare
    404 otherwise."""
    suffix = " FOR UPDATE" if lock else ""
    if is_uuid(ref):
        row = await conn.fetchrow(
            f"SELECT {APP_COLUMNS} FROM apps WHERE deleted_at IS NULL"
            f" AND (app_id = $1::uuid OR name = $2){suffix}",
            _dashed(ref),
            ref,
        )
    else:
        row = await conn.fetchrow(
            f"SELECT {APP_COLUMNS} FROM apps WHERE deleted_at IS NULL AND name = $1{suffix}",
            ref,
        )
    if row is None:
        raise NotFound()
    return row


async def fetch_one(
    conn: asyncpg.Connection | asyncpg.Pool, query: str, *args: Any
) -> asyncpg.Record:
    """The one row `query` finds, or a bare 404."""
    row = await conn.fetchrow(query, *args)
    if row is None:
        raise NotFound()
    return row


def _dashed(ref: str) -> str:
    hexes = ref.replace("-", "")
    return f"{hexes[:8]}-{hexes[8:12]}-{hexes[12:16]}-{hexes[16:20]}-{hexes[20:]}"


def uuid_param(ref: str) -> str:
    """A path's id as a dashed UUID, or a bare 404 when it cannot be one."""
    if not is_uuid(ref.lower()):
        raise NotFound()
    return _dashed(ref.lower())


@dataclass
class Query:
    """Query-string helpers that answer bad values with a validation error."""

    request: web.Request

    def get(self, name: str) -> str | None:
        return self.request.query.get(name)

    def int(self, name: str, low: int = 0, high: int = 2**63 - 1) -> int | None:
        raw = self.request.query.get(name)
        if raw is None or raw == "":
            return None
        try:
            value = int(raw)
        except ValueError:
            raise APIError(
                "validation_error", f"{name} must be an integer", {"field": name}
            ) from None
        if not low <= value <= high:
            raise APIError(
                "validation_error", f"{name} must be between {low} and {high}", {"field": name}
            )
        return value

    def bool(self, name: str) -> bool:
        return self.request.query.get(name, "") in ("true", "1", "yes")
