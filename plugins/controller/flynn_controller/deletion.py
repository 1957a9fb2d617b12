"""The `app_deletion` task: what `DELETE /apps/:app` sets going. In order:

1. the resources only this app uses are deprovisioned at their providers (each marked
   deleted once its provider removed it); resources shared with other apps are unlinked;
2. in one transaction: the app's routes are removed, its formations scaled to nothing, the
   app marked deleted (its name becomes free), and the `app_deletion` event written with
   what was removed — the event `flynn delete` waits for.

A provider that fails is retried (the task queue's attempts); after the last attempt the
`app_deletion` event carries the error and the app stays, minus the resources already
removed, so `flynn delete` can be run again.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from flynn_controller import tasks
from flynn_controller.api import APP_COLUMNS
from flynn_controller.events import emit
from flynn_controller.formations import scale_event
from flynn_controller.render import resource_json
from flynn_controller.resources import (
    PROVIDER_COLUMNS,
    RESOURCE_COLUMNS,
    remove_resource,
    resource_apps,
)
from flynn_controller.routes import ROUTE_COLUMNS, delete_route_row


def _event(app_id: str, routes: list[Any], resources: list[Any], error: str) -> dict[str, Any]:
    return {
        "app_deletion": {
            "app": app_id,
            "deleted_routes": routes,
            "deleted_resources": resources,
        },
        "error": error,
    }


@tasks.handler("app_deletion")
async def delete_app(
    db: asyncpg.Pool, args: dict[str, Any], attempt: int, app_: web.Application
) -> None:
    app_id = args["app"]
    removed: list[dict[str, Any]] = []
    try:
        await _remove_resources(db, app_id, removed)
    except Exception as exc:
        if attempt < tasks.MAX_ATTEMPTS:
            raise
        async with db.acquire() as conn, conn.transaction():
            await emit(
                conn,
                "app_deletion",
                app_id,
                _event(app_id, [], removed, f"deprovisioning a resource failed: {exc}"),
                app_id=app_id,
            )
        return
    async with db.acquire() as conn, conn.transaction():
        app = await conn.fetchrow(
            f"SELECT {APP_COLUMNS} FROM apps WHERE app_id = $1 AND deleted_at IS NULL FOR UPDATE",
            app_id,
        )
        if app is None:
            return  # deleted by an earlier task
        routes = []
        for row in await conn.fetch(
            f"SELECT {ROUTE_COLUMNS} FROM routes WHERE app_id = $1 AND deleted_at IS NULL"
            " ORDER BY path DESC NULLS LAST",  # path routes before the `/` they depend on
            app_id,
        ):
            routes.append(await delete_route_row(conn, row))
        for f in await conn.fetch(
            "UPDATE formations SET processes = NULL, deleted_at = now(), updated_at = now()"
            " WHERE app_id = $1 AND deleted_at IS NULL RETURNING release_id",
            app_id,
        ):
            await scale_event(conn, app_id, f["release_id"], None, None)
        await conn.execute(
            "UPDATE apps SET deleted_at = now(), updated_at = now() WHERE app_id = $1", app_id
        )
        await emit(conn, "app_deletion", app_id, _event(app_id, routes, removed, ""), app_id=app_id)


async def _remove_resources(db: asyncpg.Pool, app_id: str, removed: list[dict[str, Any]]) -> None:
    """Deprovision the app's own resources, unlink shared ones; `removed` collects them."""
    rows = await db.fetch(
        f"SELECT {', '.join('r.' + c for c in RESOURCE_COLUMNS.split(', '))}"
        " FROM resources r JOIN app_resources ar USING (resource_id)"
        " WHERE ar.app_id = $1 AND ar.deleted_at IS NULL AND r.deleted_at IS NULL",
        app_id,
    )
    for row in rows:
        apps = await resource_apps(db, row["resource_id"])
        if apps == [app_id]:
            provider = await db.fetchrow(
                f"SELECT {PROVIDER_COLUMNS} FROM providers WHERE provider_id = $1",
                row["provider_id"],
            )
            removed.append(await remove_resource(db, provider, row))
        else:
            async with db.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE app_resources SET deleted_at = now()"
                    " WHERE app_id = $1 AND resource_id = $2",
                    app_id,
                    row["resource_id"],
                )
                out = resource_json(row, [a for a in apps if a != app_id])
                await emit(conn, "resource", out["id"], out, app_id=app_id)
