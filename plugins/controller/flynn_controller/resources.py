"""Providers and resources. A provider is a name and a URL (the postgres appliance's is
`http://postgres-api.discoverd/databases`); provisioning POSTs the request's `config` to that
URL, which answers `{"id", "env"}`; deprovisioning is `DELETE <url>?id=<external id>`.

Nothing is left half-done: a resource whose database row cannot be written after the provider
made it is deprovisioned again, and a resource is only marked deleted once its provider has
removed it.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from flynn_controller.api import (
    fetch_one,
    find_app,
    json_response,
    operation,
    pool,
    read_json,
    uuid_param,
)
from flynn_controller.errors import APIError, NotFound, object_exists, validation_error
from flynn_controller.events import emit
from flynn_controller.render import provider_json, resource_json
from flynn_controller.types import is_uuid, new_id

PROVIDER_COLUMNS = "provider_id, name, url, created_at, updated_at"
RESOURCE_COLUMNS = "resource_id, provider_id, external_id, env, created_at"
PROVIDER_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)


# --- providers --------------------------------------------------------------------------
@operation(
    "POST", "/providers", "Register a resource provider", body="provider", response="provider"
)
async def create_provider(request: web.Request) -> web.Response:
    body = await read_json(request, "provider")
    async with pool(request).acquire() as conn, conn.transaction():
        try:
            row = await conn.fetchrow(
                "INSERT INTO providers (provider_id, name, url) VALUES ($1, $2, $3)"
                f" RETURNING {PROVIDER_COLUMNS}",
                body.get("id") or new_id(),
                body["name"],
                body["url"],
            )
        except asyncpg.UniqueViolationError:
            raise object_exists(f'provider "{body["name"]}" already exists') from None
        out = provider_json(row)
        await emit(conn, "provider", out["id"], out)
    return json_response(out)


@operation("GET", "/providers", "List providers", response="provider_list")
async def list_providers(request: web.Request) -> web.Response:
    rows = await pool(request).fetch(
        f"SELECT {PROVIDER_COLUMNS} FROM providers WHERE deleted_at IS NULL"
        " ORDER BY created_at DESC"
    )
    return json_response([provider_json(r) for r in rows])


async def find_provider(conn: asyncpg.Connection | asyncpg.Pool, ref: str) -> asyncpg.Record:
    if is_uuid(ref):
        row = await conn.fetchrow(
            f"SELECT {PROVIDER_COLUMNS} FROM providers WHERE deleted_at IS NULL"
            " AND (provider_id = $1::uuid OR name = $2)",
            uuid_param(ref),
            ref,
        )
    else:
        row = await conn.fetchrow(
            f"SELECT {PROVIDER_COLUMNS} FROM providers WHERE deleted_at IS NULL AND name = $1",
            ref,
        )
    if row is None:
        raise NotFound()
    return row


@operation("GET", "/providers/{provider}", "Get a provider by name or id", response="provider")
async def get_provider(request: web.Request) -> web.Response:
    return json_response(
        provider_json(await find_provider(pool(request), request.match_info["provider"]))
    )


# --- talking to a provider ------------------------------------------------------------
async def _provider_error(resp: aiohttp.ClientResponse, what: str) -> APIError:
    text = (await resp.text())[:2000]
    retry = resp.status >= 500
    message = text.strip() or f"status {resp.status}"
    try:
        body = json.loads(text)
        if isinstance(body, dict) and body.get("message"):
            message = str(body["message"])
            retry = bool(body.get("retry", retry))
    except ValueError:
        pass
    return APIError("unknown_error", f"{what}: {message}", retry=retry)


async def provision(provider: asyncpg.Record, config: Any) -> dict[str, Any]:
    what = f"provider {provider['name']}"
    try:
        async with (
            aiohttp.ClientSession(timeout=PROVIDER_TIMEOUT) as session,
            session.post(provider["url"], json={} if config is None else config) as resp,
        ):
            if resp.status != 200:
                raise await _provider_error(resp, what)
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise APIError(
            "unknown_error", f"{what}: {exc or type(exc).__name__}", retry=True
        ) from None
    env = body.get("env") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(env, dict):
        raise APIError("unknown_error", f"{what}: the answer has no env")
    return {"id": str(body.get("id") or ""), "env": {str(k): str(v) for k, v in env.items()}}


async def deprovision(provider: asyncpg.Record, external_id: str | None) -> None:
    if not external_id:
        return
    what = f"provider {provider['name']}"
    url = provider["url"]
    url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"id": external_id})
    try:
        async with (
            aiohttp.ClientSession(timeout=PROVIDER_TIMEOUT) as session,
            session.delete(url) as resp,
        ):
            # already gone at the provider counts as removed
            if resp.status not in (200, 404):
                raise await _provider_error(resp, what)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise APIError(
            "unknown_error", f"{what}: {exc or type(exc).__name__}", retry=True
        ) from None


# --- resources ---------------------------------------------------------------------------
async def resource_apps(conn: asyncpg.Connection | asyncpg.Pool, resource_id: Any) -> list[str]:
    rows = await conn.fetch(
        "SELECT app_id FROM app_resources WHERE resource_id = $1 AND deleted_at IS NULL"
        " ORDER BY created_at",
        resource_id,
    )
    return [str(r["app_id"]) for r in rows]


async def _resource_events(
    conn: asyncpg.Connection, kind: str, out: dict[str, Any], apps: list[str]
) -> None:
    """One event per app using the resource (or one without an app)."""
    for app_id in apps or [None]:
        await emit(conn, kind, out["id"], out, app_id=app_id)


@operation(
    "POST",
    "/providers/{provider}/resources",
    "Provision a resource",
    body="resource_req",
    response="resource",
)
async def create_resource(request: web.Request) -> web.Response:
    body = await read_json(request, "resource_req")
    db = pool(request)
    provider = await find_provider(db, request.match_info["provider"])
    apps = []
    for ref in body.get("apps") or []:
        try:
            apps.append(await find_app(db, ref))
        except NotFound:
            raise validation_error("apps", f"app {ref} does not exist") from None
    made = await provision(provider, body.get("config"))
    try:
        async with db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO resources (resource_id, provider_id, external_id, env)"
                f" VALUES ($1, $2, $3, $4) RETURNING {RESOURCE_COLUMNS}",
                new_id(),
                provider["provider_id"],
                made["id"],
                made["env"],
            )
            for app in apps:
                await conn.execute(
                    "INSERT INTO app_resources (app_id, resource_id) VALUES ($1, $2)"
                    " ON CONFLICT DO NOTHING",
                    app["app_id"],
                    row["resource_id"],
                )
            app_ids = [str(a["app_id"]) for a in apps]
            out = resource_json(row, app_ids)
            await _resource_events(conn, "resource", out, app_ids)
    except BaseException:
        # the provider made it but we could not record it: take it back
        try:
            await deprovision(provider, made["id"])
        except APIError:
            pass
        raise
    return json_response(out)


@operation(
    "GET",
    "/providers/{provider}/resources",
    "List a provider's resources",
    response="resource_list",
)
async def list_provider_resources(request: web.Request) -> web.Response:
    db = pool(request)
    provider = await find_provider(db, request.match_info["provider"])
    rows = await db.fetch(
        f"SELECT {RESOURCE_COLUMNS} FROM resources WHERE provider_id = $1"
        " AND deleted_at IS NULL ORDER BY created_at DESC",
        provider["provider_id"],
    )
    return json_response(
        [resource_json(r, await resource_apps(db, r["resource_id"])) for r in rows]
    )


async def _find_resource(
    conn: asyncpg.Connection | asyncpg.Pool, request: web.Request
) -> tuple[asyncpg.Record, asyncpg.Record]:
    provider = await find_provider(conn, request.match_info["provider"])
    row = await fetch_one(
        conn,
        f"SELECT {RESOURCE_COLUMNS} FROM resources WHERE resource_id = $1 AND provider_id = $2"
        " AND deleted_at IS NULL",
        uuid_param(request.match_info["id"]),
        provider["provider_id"],
    )
    return provider, row


@operation("GET", "/providers/{provider}/resources/{id}", "Get a resource", response="resource")
async def get_resource(request: web.Request) -> web.Response:
    db = pool(request)
    _, row = await _find_resource(db, request)
    return json_response(resource_json(row, await resource_apps(db, row["resource_id"])))


@operation(
    "PUT",
    "/providers/{provider}/resources/{id}",
    "Record a resource made elsewhere (import)",
    body="resource",
    response="resource",
)
async def put_resource(request: web.Request) -> web.Response:
    body = await read_json(request, "resource")
    db = pool(request)
    provider = await find_provider(db, request.match_info["provider"])
    resource_id = uuid_param(request.match_info["id"])
    async with db.acquire() as conn, conn.transaction():
        apps = [await find_app(conn, ref) for ref in body.get("apps") or []]
        row = await conn.fetchrow(
            "INSERT INTO resources (resource_id, provider_id, external_id, env)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (resource_id) DO UPDATE"
            " SET external_id = $3, env = $4, deleted_at = NULL"
            f" WHERE resources.provider_id = $2 RETURNING {RESOURCE_COLUMNS}",
            resource_id,
            provider["provider_id"],
            body.get("external_id"),
            body.get("env"),
        )
        if row is None:
            raise validation_error("id", "belongs to another provider")
        for app in apps:
            await conn.execute(
                "INSERT INTO app_resources (app_id, resource_id) VALUES ($1, $2)"
                " ON CONFLICT (app_id, resource_id) DO UPDATE SET deleted_at = NULL",
                app["app_id"],
                resource_id,
            )
        app_ids = await resource_apps(conn, resource_id)
        out = resource_json(row, app_ids)
        await _resource_events(conn, "resource", out, app_ids)
    return json_response(out)


async def remove_resource(db: asyncpg.Pool, provider: asyncpg.Record, row: asyncpg.Record) -> Any:
    """Deprovision at the provider, then mark deleted with `resource_deletion` events."""
    await deprovision(provider, row["external_id"])
    async with db.acquire() as conn, conn.transaction():
        app_ids = await resource_apps(conn, row["resource_id"])
        await conn.execute(
            "UPDATE resources SET deleted_at = now() WHERE resource_id = $1", row["resource_id"]
        )
        await conn.execute(
            "UPDATE app_resources SET deleted_at = now() WHERE resource_id = $1"
            " AND deleted_at IS NULL",
            row["resource_id"],
        )
        out = resource_json(row, app_ids)
        await _resource_events(conn, "resource_deletion", out, app_ids)
    return out


@operation(
    "DELETE", "/providers/{provider}/resources/{id}", "Deprovision a resource", response="resource"
)
async def delete_resource(request: web.Request) -> web.Response:
    db = pool(request)
    provider, row = await _find_resource(db, request)
    return json_response(await remove_resource(db, provider, row))


@operation("GET", "/apps/{app}/resources", "List an app's resources", response="resource_list")
async def list_app_resources(request: web.Request) -> web.Response:
    db = pool(request)
    app = await find_app(db, request.match_info["app"])
    rows = await db.fetch(
        f"SELECT {', '.join('r.' + c for c in RESOURCE_COLUMNS.split(', '))}"
        " FROM resources r JOIN app_resources ar USING (resource_id)"
        " WHERE ar.app_id = $1 AND ar.deleted_at IS NULL AND r.deleted_at IS NULL"
        " ORDER BY r.created_at DESC",
        app["app_id"],
    )
    return json_response(
        [resource_json(r, await resource_apps(db, r["resource_id"])) for r in rows]
    )


@operation("GET", "/resources", "List every resource", response="resource_list")
async def list_resources(request: web.Request) -> web.Response:
    db = pool(request)
    rows = await db.fetch(
        f"SELECT {RESOURCE_COLUMNS} FROM resources WHERE deleted_at IS NULL"
        " ORDER BY created_at DESC"
    )
    return json_response(
        [resource_json(r, await resource_apps(db, r["resource_id"])) for r in rows]
    )
