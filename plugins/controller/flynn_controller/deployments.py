"""Deployments: `POST /apps/:app/deploy` moves an app to a new release.

When the app runs no processes (no current release, or a formation of 0), the release becomes
current at once and the deployment answers `complete` with `finished_at` set, which the 2015
CLI takes as done without waiting. Otherwise the deployment is `pending`, a `deployment` task
is queued and clients follow its `deployment` events (`pending` → `running` → `complete` or
`failed`). One deployment per app at a time.

The task here moves the formations (new release scaled to the old counts, made current, old
release scaled to 0) and completes. Waiting for the new jobs to come up, and the strategies
(`one-by-one`, `sirenia`, ...), belong to the scheduler and deployer, which replace this task.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from flynn_controller import tasks
from flynn_controller.api import (
    APP_COLUMNS,
    fetch_one,
    find_app,
    json_response,
    operation,
    pool,
    read_json,
    uuid_param,
)
from flynn_controller.errors import validation_error
from flynn_controller.events import emit
from flynn_controller.formations import check_processes, put_formation_row
from flynn_controller.releases import RELEASE_COLUMNS, set_app_release
from flynn_controller.render import deployment_json
from flynn_controller.types import DEPLOYMENT_TRANSITIONS

DEPLOYMENT_COLUMNS = (
    "deployment_id, app_id, old_release_id, new_release_id, strategy, status, processes,"
    " deploy_timeout, created_at, finished_at"
)
IN_PROGRESS = "Cannot create deploy, there is already one in progress for this app."


async def advance(
    conn: asyncpg.Connection, row: asyncpg.Record, status: str, error: str | None = None
) -> asyncpg.Record:
    """Move a deployment to `status` along DEPLOYMENT_TRANSITIONS, with its event."""
    if status not in DEPLOYMENT_TRANSITIONS[row["status"]]:
        raise ValueError(f"deployment {row['deployment_id']}: {row['status']} -> {status}")
    row = await conn.fetchrow(
        "UPDATE deployments SET status = $2,"
        " finished_at = CASE WHEN $2 IN ('complete', 'failed') THEN now() END"
        f" WHERE deployment_id = $1 RETURNING {DEPLOYMENT_COLUMNS}",
        row["deployment_id"],
        status,
    )
    await deployment_event(conn, row, status, error)
    return row


async def deployment_event(
    conn: asyncpg.Connection, row: asyncpg.Record, status: str, error: str | None = None
) -> None:
    data: dict[str, Any] = {
        "app": str(row["app_id"]),
        "deployment": str(row["deployment_id"]),
        "release": str(row["new_release_id"]),
        "status": status,
    }
    if error:
        data["error"] = error
    await emit(
        conn,
        "deployment",
        str(row["deployment_id"]),
        data,
        app_id=str(row["app_id"]),
        unique_id=f"{row['deployment_id']}|{status}",
    )


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


@tasks.handler("deployment")
async def run_deployment(
    db: asyncpg.Pool, args: dict[str, Any], attempt: int, app_: web.Application
) -> None:
    try:
        await _deploy(db, args["id"])
    except Exception as exc:
        if attempt < tasks.MAX_ATTEMPTS:
            raise
        async with db.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE deployment_id = $1"
                " AND finished_at IS NULL FOR UPDATE",
                args["id"],
            )
            if row is not None:
                await advance(conn, row, "failed", str(exc) or type(exc).__name__)


async def _deploy(db: asyncpg.Pool, deployment_id: str) -> None:
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE deployment_id = $1 FOR UPDATE",
            deployment_id,
        )
        if row is None or row["finished_at"] is not None:
            return
        app = await conn.fetchrow(
            f"SELECT {APP_COLUMNS} FROM apps WHERE app_id = $1 FOR UPDATE", row["app_id"]
        )
        new = await conn.fetchrow(
            f"SELECT {RELEASE_COLUMNS} FROM releases WHERE release_id = $1",
            row["new_release_id"],
        )
        row = await advance(conn, row, "running")
        processes = row["processes"] or {}
        await put_formation_row(conn, app, new, processes)
        await set_app_release(conn, app, new)
        if row["old_release_id"] is not None and row["old_release_id"] != new["release_id"]:
            old = await conn.fetchrow(
                f"SELECT {RELEASE_COLUMNS} FROM releases WHERE release_id = $1",
                row["old_release_id"],
            )
            await put_formation_row(conn, app, old, {t: 0 for t in processes})
        await advance(conn, row, "complete")


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
