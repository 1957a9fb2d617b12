"""Artifacts, releases and an app's current release.

An artifact is deduplicated by (type, uri): posting one that exists answers the existing
artifact (every slug app shares the slugrunner artifact this way). Types: Flynn's `docker`
(a registry URI, `[scheme://]host/...?name=repo&id=...`) and `flynn`, this project's squashfs
images (the URI of an image manifest). A release keeps a client-supplied `id`, and every
process type gets Flynn's default resources (memory 1 GiB, max_fd 10000) filled in.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

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
from flynn_controller.errors import object_exists, validation_error
from flynn_controller.events import emit
from flynn_controller.render import artifact_json, release_json
from flynn_controller.types import is_uuid, new_id, with_default_resources

ARTIFACT_COLUMNS = "artifact_id, type, uri, meta, created_at"
RELEASE_COLUMNS = "release_id, artifact_id, env, meta, processes, created_at"


def check_uri(uri: str) -> None:
    """As Go's url.ParseRequestURI: an absolute URI (scheme and something after it) or an
    absolute path; no spaces or control characters."""
    if any(c.isspace() or not c.isprintable() for c in uri):
        raise validation_error("uri", "is invalid")
    if uri.startswith("/"):
        return
    parsed = urllib.parse.urlsplit(uri)
    if not parsed.scheme or not (parsed.netloc or parsed.path):
        raise validation_error("uri", "is invalid")


@operation(
    "POST",
    "/artifacts",
    "Create an artifact (or get the one with this type and uri)",
    body="artifact",
    response="artifact",
)
async def create_artifact(request: web.Request) -> web.Response:
    body = await read_json(request, "artifact")
    check_uri(body["uri"])
    async with pool(request).acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO artifacts (artifact_id, type, uri, meta) VALUES ($1, $2, $3, $4)"
            f" ON CONFLICT (type, uri) WHERE deleted_at IS NULL DO NOTHING"
            f" RETURNING {ARTIFACT_COLUMNS}",
            body.get("id") or new_id(),
            body["type"],
            body["uri"],
            body.get("meta"),
        )
        if row is None:
            row = await conn.fetchrow(
                f"SELECT {ARTIFACT_COLUMNS} FROM artifacts"
                " WHERE type = $1 AND uri = $2 AND deleted_at IS NULL",
                body["type"],
                body["uri"],
            )
            return json_response(artifact_json(row))
        out = artifact_json(row)
        await emit(conn, "artifact", out["id"], out)
    return json_response(out)


@operation("GET", "/artifacts", "List artifacts", response="artifact_list")
async def list_artifacts(request: web.Request) -> web.Response:
    rows = await pool(request).fetch(
        f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE deleted_at IS NULL"
        " ORDER BY created_at DESC"
    )
    return json_response([artifact_json(r) for r in rows])


@operation("GET", "/artifacts/{id}", "Get an artifact", response="artifact")
async def get_artifact(request: web.Request) -> web.Response:
    row = await fetch_one(
        pool(request),
        f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE artifact_id = $1 AND deleted_at IS NULL",
        uuid_param(request.match_info["id"]),
    )
    return json_response(artifact_json(row))


def _processes(processes: dict[str, Any] | None) -> dict[str, Any] | None:
    if not processes:
        return processes
    out = {}
    for name, proc in processes.items():
        proc = {k: v for k, v in (proc or {}).items() if v is not None}
        proc["resources"] = with_default_resources(proc.get("resources"))
        out[name] = proc
    return out


@operation(
    "POST",
    "/releases",
    "Create a release (a client-supplied id is kept)",
    body="release",
    response="release",
)
async def create_release(request: web.Request) -> web.Response:
    body = await read_json(request, "release")
    artifact = body.get("artifact")
    async with pool(request).acquire() as conn, conn.transaction():
        release_id = uuid_param(body["id"]) if body.get("id") else new_id()
        try:
            row = await conn.fetchrow(
                "INSERT INTO releases (release_id, artifact_id, env, meta, processes)"
                f" VALUES ($1, $2, $3, $4, $5) RETURNING {RELEASE_COLUMNS}",
                release_id,
                uuid_param(artifact) if artifact else None,
                body.get("env") or None,
                body.get("meta") or None,
                _processes(body.get("processes")),
            )
        except asyncpg.UniqueViolationError:
            raise object_exists(f"release {release_id} already exists") from None
        except asyncpg.ForeignKeyViolationError:
            raise validation_error(
                "artifact", f"could not find artifact with ID {artifact}"
            ) from None
        out = release_json(row)
        await emit(conn, "release", out["id"], out)
    return json_response(out)


@operation("GET", "/releases", "List releases", response="release_list")
async def list_releases(request: web.Request) -> web.Response:
    rows = await pool(request).fetch(
        f"SELECT {RELEASE_COLUMNS} FROM releases WHERE deleted_at IS NULL ORDER BY created_at DESC"
    )
    return json_response([release_json(r) for r in rows])


async def find_release(conn: asyncpg.Connection | asyncpg.Pool, ref: str) -> asyncpg.Record:
    row = await fetch_one(
        conn,
        f"SELECT {RELEASE_COLUMNS} FROM releases WHERE release_id = $1 AND deleted_at IS NULL",
        uuid_param(ref),
    )
    return row


@operation("GET", "/releases/{id}", "Get a release", response="release")
async def get_release(request: web.Request) -> web.Response:
    return json_response(release_json(await find_release(pool(request), request.match_info["id"])))


@operation(
    "GET", "/apps/{app}/releases", "List an app's releases, newest first", response="release_list"
)
async def list_app_releases(request: web.Request) -> web.Response:
    app = await find_app(pool(request), request.match_info["app"])
    rows = await pool(request).fetch(
        f"SELECT {RELEASE_COLUMNS} FROM releases r WHERE deleted_at IS NULL AND"
        " (app_id = $1 OR EXISTS (SELECT 1 FROM formations f"
        "  WHERE f.app_id = $1 AND f.release_id = r.release_id))"
        " ORDER BY created_at DESC",
        app["app_id"],
    )
    return json_response([release_json(r) for r in rows])


@operation(
    "GET",
    "/apps/{app}/release",
    "Get an app's current release (bare 404 if none)",
    response="release",
)
async def get_app_release(request: web.Request) -> web.Response:
    # one query: a missing app and an app without a release are both a bare 404
    ref = request.match_info["app"]
    cols = ", ".join(f"r.{c}" for c in RELEASE_COLUMNS.split(", "))
    where = "a.name = $1"
    args: list[Any] = [ref]
    if is_uuid(ref):
        where = "(a.app_id = $2::uuid OR a.name = $1)"
        args.append(uuid_param(ref))
    row = await fetch_one(
        pool(request),
        f"SELECT {cols} FROM apps a JOIN releases r ON r.release_id = a.release_id"
        f" WHERE a.deleted_at IS NULL AND {where}",
        *args,
    )
    return json_response(release_json(row))


async def set_app_release(
    conn: asyncpg.Connection, app: asyncpg.Record, release: asyncpg.Record
) -> None:
    """Make `release` the app's current one, with its `app_release` event (in the caller's
    transaction)."""
    prev = None
    if app["release_id"] is not None:
        prev = await conn.fetchrow(
            f"SELECT {RELEASE_COLUMNS} FROM releases WHERE release_id = $1", app["release_id"]
        )
    await conn.execute(
        "UPDATE apps SET release_id = $2, updated_at = now() WHERE app_id = $1",
        app["app_id"],
        release["release_id"],
    )
    await claim_release(conn, app, release)
    data: dict[str, Any] = {"release": release_json(release)}
    if prev is not None:
        data["prev_release"] = release_json(prev)
    await emit(conn, "app_release", str(release["release_id"]), data, app_id=str(app["app_id"]))


async def claim_release(
    conn: asyncpg.Connection, app: asyncpg.Record, release: asyncpg.Record
) -> None:
    """Record the app a release was first used by (so `flynn release` lists it)."""
    await conn.execute(
        "UPDATE releases SET app_id = $1 WHERE release_id = $2 AND app_id IS NULL",
        app["app_id"],
        release["release_id"],
    )


@operation(
    "PUT",
    "/apps/{app}/release",
    "Set an app's current release (no deployment)",
    body="id",
    response="release",
)
async def put_app_release(request: web.Request) -> web.Response:
    body = await read_json(request, "id")
    async with pool(request).acquire() as conn, conn.transaction():
        app = await find_app(conn, request.match_info["app"], lock=True)
        release = await conn.fetchrow(
            f"SELECT {RELEASE_COLUMNS} FROM releases WHERE release_id = $1 AND deleted_at IS NULL",
            uuid_param(body["id"]),
        )
        if release is None:
            raise validation_error("id", f"could not find release with ID {body['id']}")
        await set_app_release(conn, app, release)
    return json_response(release_json(release))


@operation(
    "DELETE",
    "/apps/{app}/releases/{id}",
    "Delete a release the app does not run (and its artifact if no other release uses it)",
)
async def delete_app_release(request: web.Request) -> web.Response:
    """What a push that failed to deploy leaves is taken away (gitreceive): the release, its
    formation if scaled to nothing, and its artifact when nothing else names it. The app's
    current release, or one it runs processes of, stays."""
    db = pool(request)
    async with db.acquire() as conn, conn.transaction():
        app = await find_app(conn, request.match_info["app"])
        release = await find_release(conn, request.match_info["id"])
        if app["release_id"] == release["release_id"]:
            raise validation_error("id", "is the app's current release")
        formation = await conn.fetchrow(
            "SELECT processes FROM formations WHERE app_id = $1 AND release_id = $2"
            " AND deleted_at IS NULL",
            app["app_id"],
            release["release_id"],
        )
        if formation is not None and any(
            int(n or 0) > 0 for n in (formation["processes"] or {}).values()
        ):
            raise validation_error("id", "has processes running: scale them to 0 first")
        await conn.execute(
            "UPDATE formations SET deleted_at = now() WHERE app_id = $1 AND release_id = $2",
            app["app_id"],
            release["release_id"],
        )
        await conn.execute(
            "UPDATE releases SET deleted_at = now() WHERE release_id = $1", release["release_id"]
        )
        if release["artifact_id"] is not None:
            await conn.execute(
                "UPDATE artifacts SET deleted_at = now() WHERE artifact_id = $1 AND NOT EXISTS"
                " (SELECT 1 FROM releases WHERE artifact_id = $1 AND deleted_at IS NULL)",
                release["artifact_id"],
            )
    return json_response({"app": str(app["app_id"]), "release": str(release["release_id"])})
