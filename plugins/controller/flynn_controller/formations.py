"""Formations: how many processes of each type of a release an app wants. A change writes a
`scale` event (object id `<app id>:<release id>`), which is what the scheduler follows through
`GET /formations` (an SSE stream of expanded formations: first those changed since `since`,
then an empty `{}` marking the end of that batch, then every change as it happens) or polls
with `GET /formations?active=true`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web

from flynn_controller.api import (
    APP_COLUMNS,
    HUB,
    empty_response,
    fetch_one,
    find_app,
    json_response,
    operation,
    pool,
    read_json,
    uuid_param,
)
from flynn_controller.errors import APIError, NotFound, validation_error
from flynn_controller.events import EventFilter, emit, newest_id
from flynn_controller.releases import (
    ARTIFACT_COLUMNS,
    RELEASE_COLUMNS,
    claim_release,
    find_release,
)
from flynn_controller.render import app_json, artifact_json, formation_json, release_json
from flynn_controller.sse import EventStream, wants_stream
from flynn_controller.types import fmt_time

FORMATION_COLUMNS = "app_id, release_id, processes, tags, hosts, created_at, updated_at, deleted_at"
# `put_formation_row(hosts=KEEP)`: leave the formation's host restriction as it is
KEEP: Any = object()


async def scale_event(
    conn: asyncpg.Connection,
    app_id: Any,
    release_id: Any,
    processes: dict[str, int] | None,
    prev: dict[str, int] | None,
) -> None:
    data: dict[str, Any] = {}
    if prev:
        data["prev_processes"] = prev
    data["processes"] = processes
    data["release"] = str(release_id)
    await emit(conn, "scale", f"{app_id}:{release_id}", data, app_id=str(app_id))


async def put_formation_row(
    conn: asyncpg.Connection,
    app: asyncpg.Record,
    release: asyncpg.Record,
    processes: dict[str, int] | None,
    tags: dict[str, Any] | None = None,
    hosts: dict[str, list[str]] | None = KEEP,
) -> asyncpg.Record:
    """Create or replace a formation in the caller's transaction, with its `scale` event.
    `hosts` (only the deployer sets it) restricts types to hosts; KEEP leaves it as it is."""
    prev = await conn.fetchrow(
        "SELECT processes, hosts, deleted_at FROM formations WHERE app_id = $1"
        " AND release_id = $2 FOR UPDATE",
        app["app_id"],
        release["release_id"],
    )
    if hosts is KEEP:
        hosts = prev["hosts"] if prev is not None else None
    row = await conn.fetchrow(
        "INSERT INTO formations (app_id, release_id, processes, tags, hosts)"
        " VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (app_id, release_id) DO UPDATE SET processes = $3, tags = $4,"
        " hosts = $5, updated_at = now(), deleted_at = NULL"
        f" RETURNING {FORMATION_COLUMNS}",
        app["app_id"],
        release["release_id"],
        processes,
        tags,
        hosts or None,
    )
    await claim_release(conn, app, release)
    prev_processes = prev["processes"] if prev and prev["deleted_at"] is None else None
    await scale_event(conn, app["app_id"], release["release_id"], processes, prev_processes)
    return row


def check_processes(release: asyncpg.Record, processes: dict[str, int] | None) -> None:
    if release["artifact_id"] is None:
        raise validation_error("", "release is not deployable")
    unknown = sorted(set(processes or {}) - set(release["processes"] or {}))
    if unknown:
        raise validation_error(
            "",
            "Requested formation includes process types that do not exist in release."
            f" Invalid process types: [{' '.join(unknown)}]",
        )


@operation(
    "PUT",
    "/apps/{app}/formations/{release}",
    "Scale a release of an app",
    body="formation",
    response="formation",
)
async def put_formation(request: web.Request) -> web.Response:
    body = await read_json(request, "formation")
    async with pool(request).acquire() as conn, conn.transaction():
        app = await find_app(conn, request.match_info["app"], lock=True)
        release = await find_release(conn, request.match_info["release"])
        processes = body.get("processes")
        check_processes(release, processes)
        row = await put_formation_row(conn, app, release, processes, body.get("tags"))
    return json_response(formation_json(row))


async def expanded(
    conn: asyncpg.Connection | asyncpg.Pool, app_id: Any, release_id: Any
) -> dict[str, Any] | None:
    """ExpandedFormation: the app, release and artifact objects with the counts; `processes`
    is null (and `deleted` true) for a deleted formation or app."""
    f = await conn.fetchrow(
        f"SELECT {FORMATION_COLUMNS} FROM formations WHERE app_id = $1 AND release_id = $2",
        app_id,
        release_id,
    )
    if f is None:
        return None
    app = await conn.fetchrow(
        f"SELECT {APP_COLUMNS}, deleted_at FROM apps WHERE app_id = $1", app_id
    )
    release = await conn.fetchrow(
        f"SELECT {RELEASE_COLUMNS} FROM releases WHERE release_id = $1", release_id
    )
    out: dict[str, Any] = {"app": app_json(app), "release": release_json(release)}
    if release["artifact_id"] is not None:
        artifact = await conn.fetchrow(
            f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE artifact_id = $1",
            release["artifact_id"],
        )
        out["artifact"] = artifact_json(artifact)
    deleted = f["deleted_at"] is not None or app["deleted_at"] is not None
    out["processes"] = None if deleted else f["processes"]
    if f["tags"]:
        out["tags"] = f["tags"]
    if f["hosts"]:
        out["hosts"] = f["hosts"]
    out["updated_at"] = fmt_time(f["updated_at"])
    if deleted:
        out["deleted"] = True
    return out


@operation(
    "GET",
    "/apps/{app}/formations/{release}",
    "Get a formation (?expand=true)",
    response="formation",
    params=("expand",),
)
async def get_formation(request: web.Request) -> web.Response:
    db = pool(request)
    app = await find_app(db, request.match_info["app"])
    release_id = uuid_param(request.match_info["release"])
    row = await fetch_one(
        db,
        f"SELECT {FORMATION_COLUMNS} FROM formations WHERE app_id = $1 AND release_id = $2"
        " AND deleted_at IS NULL",
        app["app_id"],
        release_id,
    )
    if request.query.get("expand") == "true":
        return json_response(await expanded(db, app["app_id"], row["release_id"]))
    return json_response(formation_json(row))


@operation("DELETE", "/apps/{app}/formations/{release}", "Delete a formation (scale to nothing)")
async def delete_formation(request: web.Request) -> web.Response:
    async with pool(request).acquire() as conn, conn.transaction():
        app = await find_app(conn, request.match_info["app"], lock=True)
        release_id = uuid_param(request.match_info["release"])
        prev = await conn.fetchval(
            "SELECT processes FROM formations WHERE app_id = $1 AND release_id = $2"
            " AND deleted_at IS NULL FOR UPDATE",
            app["app_id"],
            release_id,
        )
        if prev is None and not await conn.fetchval(
            "SELECT 1 FROM formations WHERE app_id = $1 AND release_id = $2 AND deleted_at IS NULL",
            app["app_id"],
            release_id,
        ):
            raise NotFound()
        await conn.execute(
            "UPDATE formations SET processes = NULL, deleted_at = now(), updated_at = now()"
            " WHERE app_id = $1 AND release_id = $2",
            app["app_id"],
            release_id,
        )
        await scale_event(conn, app["app_id"], release_id, None, prev)
    return empty_response()


@operation("GET", "/apps/{app}/formations", "List an app's formations", response="formation_list")
async def list_app_formations(request: web.Request) -> web.Response:
    app = await find_app(pool(request), request.match_info["app"])
    rows = await pool(request).fetch(
        f"SELECT {FORMATION_COLUMNS} FROM formations WHERE app_id = $1 AND deleted_at IS NULL"
        " ORDER BY created_at DESC",
        app["app_id"],
    )
    return json_response([formation_json(r) for r in rows])


async def active_formations(db: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT f.app_id, f.release_id FROM formations f JOIN apps a USING (app_id)"
        " WHERE f.deleted_at IS NULL AND a.deleted_at IS NULL"
        " AND EXISTS (SELECT 1 FROM jsonb_each(f.processes) p WHERE (p.value)::int > 0)"
        " ORDER BY f.updated_at"
    )
    out = []
    for r in rows:
        e = await expanded(db, r["app_id"], r["release_id"])
        if e is not None:
            out.append(e)
    return out


def _since(request: web.Request) -> datetime | None:
    raw = request.query.get("since")
    if not raw:
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise validation_error("since", "must be an RFC 3339 time") from None


@operation(
    "GET",
    "/formations",
    "Active formations (?active=true) or a stream of formation changes (SSE)",
    response="expanded_formation_list",
    stream=True,
    params=("active", "since"),
)
async def formations(request: web.Request) -> web.StreamResponse:
    db = pool(request)
    if request.query.get("active") == "true":
        return json_response(await active_formations(db))
    if not wants_stream(request):
        raise APIError("validation_error", "use ?active=true or Accept: text/event-stream")
    since = _since(request)
    sub = request.app[HUB].subscribe(EventFilter(object_types=frozenset({"scale"})))
    try:
        floor = await newest_id(db)  # the batch below covers every change up to here
        async with EventStream(request) as stream:
            query = "SELECT app_id, release_id FROM formations"
            args: list[Any] = []
            if since is not None:
                query += " WHERE updated_at > $1"
                args.append(since)
            for r in await db.fetch(query + " ORDER BY updated_at", *args):
                e = await expanded(db, r["app_id"], r["release_id"])
                if e is not None:
                    await stream.send(e)
            await stream.send({})
            while True:
                event = await sub.queue.get()
                if event is None:
                    await stream.error(sub.error or "stream closed")
                    break
                if event["id"] <= floor:
                    continue
                app_id, _, release_id = event["object_id"].partition(":")
                e = await expanded(db, app_id, release_id)
                if e is not None:
                    await stream.send(e)
    finally:
        request.app[HUB].unsubscribe(sub)
    return stream.response
