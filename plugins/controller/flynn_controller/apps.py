"""Apps: create (a generated name when none is given, the default route
`<name>.<DEFAULT_ROUTE_DOMAIN>` unless it is a system app), list, get by name or id, update
meta/strategy/deploy_timeout, and delete — asynchronous, as Flynn's: the request answers at
once and the `app_deletion` task (`deletion.py`) reports with an `app_deletion` event."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from flynn_controller import names, routes, tasks
from flynn_controller.api import (
    APP_COLUMNS,
    config,
    empty_response,
    find_app,
    json_response,
    operation,
    pool,
    read_json,
)
from flynn_controller.errors import object_exists
from flynn_controller.events import emit
from flynn_controller.render import app_json
from flynn_controller.types import (
    DEFAULT_DEPLOY_TIMEOUT,
    DEFAULT_STRATEGY,
    SYSTEM_APP_META,
    new_id,
)

NAME_ATTEMPTS = 10


def is_system_app(meta: dict[str, Any] | None) -> bool:
    return (meta or {}).get(SYSTEM_APP_META) == "true"


async def _insert_app(conn: asyncpg.Connection, body: dict[str, Any], seed: str) -> Any:
    given = body.get("name")
    for attempt in range(NAME_ATTEMPTS):
        name = given or names.generate(seed)
        if not given and attempt == NAME_ATTEMPTS - 1:
            name = f"{name}-{new_id()[:6]}"
        try:
            async with conn.transaction():  # a savepoint: a taken name is retried
                return await conn.fetchrow(
                    "INSERT INTO apps (app_id, name, meta, strategy, deploy_timeout)"
                    f" VALUES ($1, $2, $3, $4, $5) RETURNING {APP_COLUMNS}",
                    body.get("id") or new_id(),
                    name,
                    body.get("meta") or {},
                    body.get("strategy") or DEFAULT_STRATEGY,
                    body.get("deploy_timeout") or DEFAULT_DEPLOY_TIMEOUT,
                )
        except asyncpg.UniqueViolationError as exc:
            if given or exc.constraint_name == "apps_pkey":
                what = f'application "{given}"' if given else f"application {body.get('id')}"
                raise object_exists(f"{what} already exists") from None
    raise AssertionError("unreachable: the last attempt has a unique suffix")


@operation("POST", "/apps", "Create an app", body="app", response="app")
async def create_app(request: web.Request) -> web.Response:
    body = await read_json(request, "app")
    cfg = config(request)
    async with pool(request).acquire() as conn, conn.transaction():
        row = await _insert_app(conn, body, cfg.name_seed)
        app = app_json(row)
        if cfg.default_route_domain and not is_system_app(app["meta"]):
            await routes.insert_route(
                conn,
                row,
                {
                    "type": "http",
                    "domain": f"{app['name']}.{cfg.default_route_domain}",
                    "service": f"{app['name']}-web",
                },
            )
        await emit(conn, "app", app["id"], app, app_id=app["id"])
    return json_response(app)


@operation("GET", "/apps", "List apps, newest first", response="app_list")
async def list_apps(request: web.Request) -> web.Response:
    rows = await pool(request).fetch(
        f"SELECT {APP_COLUMNS} FROM apps WHERE deleted_at IS NULL ORDER BY created_at DESC"
    )
    return json_response([app_json(r) for r in rows])


@operation("GET", "/apps/{app}", "Get an app by name or id", response="app")
async def get_app(request: web.Request) -> web.Response:
    return json_response(app_json(await find_app(pool(request), request.match_info["app"])))


async def _update_app(request: web.Request) -> web.Response:
    body = await read_json(request, "app")
    async with pool(request).acquire() as conn, conn.transaction():
        row = await find_app(conn, request.match_info["app"], lock=True)
        meta = row["meta"] if body.get("meta") is None else body["meta"]
        strategy = body.get("strategy") or row["strategy"]
        timeout = body.get("deploy_timeout") or row["deploy_timeout"]
        row = await conn.fetchrow(
            "UPDATE apps SET meta = $2, strategy = $3, deploy_timeout = $4, updated_at = now()"
            f" WHERE app_id = $1 RETURNING {APP_COLUMNS}",
            row["app_id"],
            meta,
            strategy,
            timeout,
        )
        app = app_json(row)
        await emit(conn, "app", app["id"], app, app_id=app["id"])
    return json_response(app)


@operation("POST", "/apps/{app}", "Update an app's meta, strategy or deploy_timeout", body="app")
async def update_app(request: web.Request) -> web.Response:
    return await _update_app(request)


@operation("POST", "/apps/{app}/meta", "Update an app (as POST /apps/{app})", body="app")
async def update_app_meta(request: web.Request) -> web.Response:
    return await _update_app(request)


@operation("DELETE", "/apps/{app}", "Delete an app (reported by an app_deletion event)")
async def delete_app(request: web.Request) -> web.Response:
    async with pool(request).acquire() as conn, conn.transaction():
        row = await find_app(conn, request.match_info["app"], lock=True)
        await tasks.enqueue(conn, "app_deletion", {"app": str(row["app_id"])})
    tasks.wake(request.app)
    return empty_response()
