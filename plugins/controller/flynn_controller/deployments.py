"""Deployments: `POST /apps/:app/deploy` moves an app to a new release.

When the app runs no processes (no current release, or a formation of 0), the release becomes
current at once and the deployment answers `complete` with `finished_at` set, which the 2015
CLI takes as done without waiting. Otherwise the deployment is `pending`, a `deployment` task
is queued and clients follow its `deployment` events (`pending` → `running` → `complete` or
`failed`). One deployment per app at a time.

The task is the deployer's (`deployer.py`): it runs the app's strategy against the jobs the
scheduler reports, and rolls back when the new release's jobs do not come up.
"""

from __future__ import annotations

from aiohttp import web

from flynn_controller import tasks
from flynn_controller.api import (
    fetch_one,
    find_app,
    json_response,
    operation,
    pool,
    read_json,
    uuid_param,
)
from flynn_controller.deployer import DEPLOYMENT_COLUMNS, deployment_event
from flynn_controller.errors import validation_error
from flynn_controller.formations import check_processes
from flynn_controller.releases import RELEASE_COLUMNS, set_app_release
from flynn_controller.render import deployment_json

IN_PROGRESS = "Cannot create deploy, there is already one in progress for this app."


@operation(
    "POST", "/apps/{app}/deploy", "Deploy a release to an app", body="id", response="deployment"
)
async def create_deployment(request: web.Request) -> web.Response:
    body = await read_json(request, "id")
    async with pool(request).acquire() as conn, conn.transaction():
        app = await find_app(conn, request.match_info["app"], lock=True)
        release = await conn.fetchrow(
            f"SELECT {RELEASE_COLUMNS} FROM releases WHERE release_id = $1 AND deleted_at IS NULL",
            uuid_param(body["id"]),
        )
        if release is None:
            raise validation_error("id", f"could not find release with ID {body['id']}")
        if await conn.fetchval(
            "SELECT 1 FROM deployments WHERE app_id = $1 AND finished_at IS NULL",
            app["app_id"],
        ):
            raise validation_error("", IN_PROGRESS)
        old = None
        if app["release_id"] is not None:
            old = await conn.fetchval(
                "SELECT processes FROM formations WHERE app_id = $1 AND release_id = $2"
                " AND deleted_at IS NULL",
                app["app_id"],
                app["release_id"],
            )
        running = sum((old or {}).values())
        if running:
            check_processes(release, old)
        row = await conn.fetchrow(
            "INSERT INTO deployments (deployment_id, app_id, old_release_id, new_release_id,"
            " strategy, status, processes, deploy_timeout, finished_at)"
            " VALUES (gen_random_uuid(), $1, $2, $3, $4, $5, $6, $7,"
            " CASE WHEN $8 THEN now() END)"
            f" RETURNING {DEPLOYMENT_COLUMNS}",
            app["app_id"],
            app["release_id"],
            release["release_id"],
            app["strategy"],
            "pending" if running else "complete",
            old,
            app["deploy_timeout"],
            not running,
        )
        if running:
            await deployment_event(conn, row, "pending")
            await tasks.enqueue(conn, "deployment", {"id": str(row["deployment_id"])})
        else:
            await set_app_release(conn, app, release)
            await deployment_event(conn, row, "complete")
    if running:
        tasks.wake(request.app)
    return json_response(deployment_json(row))


@operation(
    "GET", "/apps/{app}/deployments", "List an app's deployments", response="deployment_list"
)
async def list_deployments(request: web.Request) -> web.Response:
    app = await find_app(pool(request), request.match_info["app"])
    rows = await pool(request).fetch(
        f"SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE app_id = $1 ORDER BY created_at DESC",
        app["app_id"],
    )
    return json_response([deployment_json(r) for r in rows])


@operation("GET", "/deployments/{id}", "Get a deployment", response="deployment")
async def get_deployment(request: web.Request) -> web.Response:
    row = await fetch_one(
        pool(request),
        f"SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE deployment_id = $1",
        uuid_param(request.match_info["id"]),
    )
    return json_response(deployment_json(row))
