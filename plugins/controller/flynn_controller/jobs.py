"""Jobs as the scheduler reports them: `PUT /apps/:app/jobs/:id` records a job's state (with
one `job` event per job and state), `GET /apps/:app/jobs[/:id]` reads them back.

A job's state only moves forward (`types.JOB_STATE_RANK`): a report that would take it back
(an `up` arriving after its `down`) is refused with a validation error on `state`, as the 2015
database's enum check did. A job id carries its host, the part before the first `-`:
`DELETE /apps/:app/jobs/:id` stops the job there (`hosts.py`). Running jobs comes with the
scheduler.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from flynn_controller import hosts
from flynn_controller.api import (
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
from flynn_controller.events import emit
from flynn_controller.render import job_json
from flynn_controller.types import JOB_STATE_RANK

JOB_COLUMNS = (
    "job_id, host_id, app_id, release_id, process_type, state, cmd, meta, exit_status,"
    " host_error, created_at, updated_at"
)


def host_of(job_id: str) -> str:
    host, sep, rest = job_id.partition("-")
    if not sep or not host or not rest:
        raise validation_error("id", "must be <host id>-<job uuid>")
    return host


async def record_job(
    conn: asyncpg.Connection, app: asyncpg.Record, job_id: str, body: dict[str, Any]
) -> dict[str, Any]:
    """Upsert a job's report in the caller's transaction, with its `job` event."""
    state = body["state"]
    current = await conn.fetchval("SELECT state FROM jobs WHERE job_id = $1 FOR UPDATE", job_id)
    if current is not None and JOB_STATE_RANK[state] < JOB_STATE_RANK[current]:
        raise validation_error("state", f"cannot go from {current} to {state}")
    release = body.get("release")
    try:
        row = await conn.fetchrow(
            "INSERT INTO jobs (job_id, host_id, app_id, release_id, process_type, state, cmd,"
            " meta, exit_status, host_error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            " ON CONFLICT (job_id) DO UPDATE SET state = $6,"
            " release_id = coalesce($4, jobs.release_id),"
            " process_type = coalesce($5, jobs.process_type), cmd = coalesce($7, jobs.cmd),"
            " meta = coalesce($8, jobs.meta), exit_status = coalesce($9, jobs.exit_status),"
            " host_error = coalesce($10, jobs.host_error), updated_at = now()"
            f" WHERE jobs.app_id = $3 RETURNING {JOB_COLUMNS}",
            job_id,
            host_of(job_id),
            app["app_id"],
            uuid_param(release) if release else None,
            body.get("type"),
            state,
            body.get("cmd"),
            body.get("meta"),
            body.get("exit_status"),
            body.get("host_error") or None,
        )
    except asyncpg.ForeignKeyViolationError:
        raise validation_error("release", f"could not find release with ID {release}") from None
    if row is None:
        raise validation_error("id", "belongs to another app")
    out = job_json(row)
    await emit(conn, "job", job_id, out, app_id=str(app["app_id"]), unique_id=f"{job_id}|{state}")
    return out


@operation("PUT", "/apps/{app}/jobs/{id}", "Record a job's state (the scheduler's report)",
           body="job", response="job")  # fmt: skip
async def put_job(request: web.Request) -> web.Response:
    body = await read_json(request, "job")
    job_id = request.match_info["id"]
    if body.get("id") not in (None, "", job_id):
        raise validation_error("id", "must be the id in the URL")
    async with pool(request).acquire() as conn, conn.transaction():
        app = await find_app(conn, request.match_info["app"])
        out = await record_job(conn, app, job_id, body)
    return json_response(out)


@operation("GET", "/apps/{app}/jobs", "List an app's jobs, newest first", response="job_list")
async def list_jobs(request: web.Request) -> web.Response:
    app = await find_app(pool(request), request.match_info["app"])
    rows = await pool(request).fetch(
        f"SELECT {JOB_COLUMNS} FROM jobs WHERE app_id = $1 ORDER BY created_at DESC",
        app["app_id"],
    )
    return json_response([job_json(r) for r in rows])


@operation("GET", "/apps/{app}/jobs/{id}", "Get a job", response="job")
async def get_job(request: web.Request) -> web.Response:
    app = await find_app(pool(request), request.match_info["app"])
    row = await fetch_one(
        pool(request),
        f"SELECT {JOB_COLUMNS} FROM jobs WHERE app_id = $1 AND job_id = $2",
        app["app_id"],
        request.match_info["id"],
    )
    return json_response(job_json(row))


@operation("DELETE", "/apps/{app}/jobs/{id}", "Stop a job of the app on its host")
async def delete_job(request: web.Request) -> web.Response:
    """Stop the job on its host; the scheduler reports the job's end. A job that is not the
    app's (by the host's record of it) or whose host is gone is a bare 404."""
    app = await find_app(pool(request), request.match_info["app"])
    job_id = request.match_info["id"]
    host_id, sep, rest = job_id.partition("-")
    if not sep or not host_id or not rest:
        raise NotFound()
    try:
        status, job = await hosts.host_request(host_id, "GET", f"/host/jobs/{job_id}")
        if status == 404:
            raise NotFound()
        if status != 200 or not isinstance(job, dict):
            raise APIError("unknown_error", f"host {host_id} answered {status}", retry=True)
        meta = (job.get("job") or {}).get("metadata") or {}
        if meta.get("flynn-controller.app") != str(app["app_id"]):
            raise NotFound()
        status, _ = await hosts.host_request(host_id, "DELETE", f"/host/jobs/{job_id}")
    except hosts.HostUnknown:
        raise NotFound() from None
    except (hosts.HostsUnreachable, aiohttp.ClientError, TimeoutError) as exc:
        raise APIError("unknown_error", f"host {host_id}: {exc}", retry=True) from None
    if status not in (200, 404):
        raise APIError("unknown_error", f"host {host_id} answered {status}", retry=True)
    return empty_response()
