"""One-off jobs: `POST /apps/:app/jobs` (`flynn run`, `flynn pg`) starts a command from a
release on a random host, detached (answered with the Job) or attached (`Upgrade:
flynn-attach/0`: the connection becomes the job's stdio in Flynn's attach frames).

The release may be another app's (`flynn pg` runs the postgres app's release inside the user's
app); the job belongs to the app in the URL, and it is that app whose trust counts: a user
app's job never runs privileged (`jobconfig.build_job`). The job id is `<host id>-<uuid>`, so
`DELETE /apps/:app/jobs/:id` finds its host again.

Attached, the job is put on the host first and attached to at once, with the host replaying
the job's log (`ATTACH_LOGS`) so nothing the job printed before the attach is lost; the
host's status bytes are read here, so the client's first byte after the 101 is a frame, as
the 2015 client expects. From there bytes are piped both ways unchanged. A client that goes
away before the job has ended takes the job with it: it is stopped on its host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from flynn_controller import hosts
from flynn_controller.api import find_app, json_response, operation, pool, read_json
from flynn_controller.errors import APIError, validation_error
from flynn_controller.jobconfig import build_job
from flynn_controller.releases import ARTIFACT_COLUMNS, RELEASE_COLUMNS
from flynn_controller.render import app_json, artifact_json, release_json
from flynn_controller.types import is_uuid, with_default_resources
from flynn_host.runtime import attach

log = logging.getLogger("flynn_controller.runjobs")

UPGRADE = "flynn-attach/0"
ATTACH_FLAGS = (
    attach.ATTACH_STDOUT | attach.ATTACH_STDERR | attach.ATTACH_STDIN
    | attach.ATTACH_LOGS | attach.ATTACH_STREAM
)  # fmt: skip
LINGER = 2.0  # seconds a client gets to close after the job's last frame
CHUNK = 65536
ENDED = ("done", "crashed", "failed")  # host job states of a job that no longer runs


@operation("POST", "/apps/{app}/jobs",
           "Run a one-off job; attached (the job's stdio) with `Upgrade: flynn-attach/0`",
           body="new_job", response="job")  # fmt: skip
async def run_job(request: web.Request) -> web.StreamResponse:
    body = await read_json(request, "new_job")
    attached = request.headers.get("Upgrade", "").lower() == UPGRADE
    app, release, artifact = await _job_sources(request, body)
    host_id, url = await _pick_host()
    job_id = f"{host_id}-{uuid.uuid4()}"
    try:
        image = await hosts.job_image(host_id, artifact, url=url)
    except hosts.ImageError as exc:
        raise APIError("unknown_error", str(exc)) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise APIError("unknown_error", f"host {host_id}: {exc}", retry=True) from None
    job = new_host_job(job_id, app, release, image, body, attached)
    if not job["config"]["args"]:
        raise validation_error("cmd", "is required: the release's image has no default command")
    await _put_job(host_id, url, job)
    if not attached:
        out = {"id": job_id, "app": app["id"], "release": release["id"], "state": "starting"}
        if body.get("cmd"):
            out["cmd"] = body["cmd"]
        return json_response(out)
    return await _attach(request, host_id, url, job_id, body)


def new_host_job(
    job_id: str,
    app: dict[str, Any],
    release: dict[str, Any],
    image: dict[str, Any],
    body: dict[str, Any],
    attached: bool,
) -> dict[str, Any]:
    """The host job of a NewJob: the release's command line replaced by the job's, its env
    (the release's only with `release_env`), a TTY if asked, stdin when attached."""
    meta = {k: v for k, v in (body.get("meta") or {}).items()
            if not k.startswith("flynn-controller.")}  # fmt: skip
    job = build_job(
        job_id=job_id,
        app=app,
        release=release,
        process_type="",
        image=image,
        cmd=body.get("cmd"),
        entrypoint=body.get("entrypoint"),
        env=body.get("env"),
        release_env=bool(body.get("release_env")),
        extra_metadata=meta,
    )
    job["config"]["tty"] = bool(body.get("tty")) and attached
    job["config"]["stdin"] = attached
    job["config"]["disable_log"] = bool(body.get("disable_log"))
    job["resources"] = with_default_resources(body.get("resources"))
    return job


async def _job_sources(
    request: web.Request, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The app (from the URL), the release and its artifact, as JSON objects."""
    db = pool(request)
    app = app_json(await find_app(db, request.match_info["app"]))
    ref = body["release"]
    row = None
    if is_uuid(ref.lower()):
        row = await db.fetchrow(
            f"SELECT {RELEASE_COLUMNS} FROM releases WHERE release_id = $1::uuid"
            " AND deleted_at IS NULL",
            ref.lower(),
        )
    if row is None:
        raise validation_error("release", f"could not find release with ID {ref}")
    release = release_json(row)
    if row["artifact_id"] is None:
        raise validation_error("release", f"{release['id']} has no artifact to run")
    art = await db.fetchrow(
        f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE artifact_id = $1", row["artifact_id"]
    )
    if art is None:
        raise validation_error("release", f"artifact {row['artifact_id']} does not exist")
    return app, release, artifact_json(art)


async def _pick_host() -> tuple[str, str]:
    """A random host of the cluster: (id, API URL)."""
    try:
        found = await hosts.list_hosts()
    except hosts.HostsUnreachable as exc:
        raise APIError("unknown_error", f"cannot list the cluster's hosts: {exc}",
                       retry=True) from None  # fmt: skip
    if not found:
        raise APIError("unknown_error", "no hosts are available to run the job")
    host_id = random.choice(sorted(found))
    return host_id, found[host_id]


async def _put_job(host_id: str, url: str, job: dict[str, Any]) -> None:
    try:
        status, answer = await hosts.host_request(
            host_id, "PUT", f"/host/jobs/{job['id']}", job, url=url
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise APIError("unknown_error", f"host {host_id}: {exc}", retry=True) from None
    if status != 200:
        message = answer.get("message") if isinstance(answer, dict) else None
        raise APIError("unknown_error", f"host {host_id} refused the job: {message or status}")


async def _stop_if_running(host_id: str, url: str, job_id: str) -> None:
    """Stop the job unless it has ended (best effort: the host may be gone too)."""
    try:
        status, job = await hosts.host_request(host_id, "GET", f"/host/jobs/{job_id}", url=url)
        if status == 200 and isinstance(job, dict) and job.get("status") in ENDED:
            return
        await hosts.host_request(host_id, "DELETE", f"/host/jobs/{job_id}", url=url)
    except Exception as exc:  # noqa: BLE001 - nobody is left to tell but the log
        log.warning("stopping job %s on %s: %s", job_id, host_id, exc)


# --- attached ---------------------------------------------------------------------------------


class _Feeder:
    """Takes the bytes of the upgraded connection (aiohttp's payload-parser interface)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.reader.feed_data(data)
        return False, b""

    def feed_eof(self) -> None:
        self.reader.feed_eof()


async def _attach(
    request: web.Request, host_id: str, url: str, job_id: str, body: dict[str, Any]
) -> web.StreamResponse:
    """Attach to the job on its host, then answer 101 and pipe the connection through."""
    attach_req = {
        "job_id": job_id,
        "flags": ATTACH_FLAGS,
        "height": body.get("tty_lines") or 0,
        "width": body.get("tty_columns") or 0,
    }
    try:
        # the host's API takes the cluster's host key, which the controller gets as a system
        # job (see hosts.py)
        host_reader, host_writer = await attach.attach_host(
            url, attach_req, key=os.environ.get("FLYNN_HOST_KEY", "")
        )
    except BaseException as exc:
        await asyncio.shield(_stop_if_running(host_id, url, job_id))
        if isinstance(exc, attach.AttachError):
            raise APIError("unknown_error", f"attaching to job {job_id}: {exc.message}") from None
        if isinstance(exc, OSError):
            raise APIError("unknown_error", f"host {host_id}: {exc}", retry=True) from None
        raise

    resp = web.StreamResponse(status=101, headers={"Upgrade": UPGRADE, "Connection": "Upgrade"})
    client = asyncio.StreamReader()
    try:
        await resp.prepare(request)
        assert request.protocol is not None
        request.protocol.set_parser(_Feeder(client))  # type: ignore[arg-type]
        resp.force_close()
        await _pipe(request, resp, client, host_reader, host_writer)
    except (ConnectionError, asyncio.CancelledError):
        pass
    except Exception:
        log.exception("attached job %s", job_id)
    finally:
        host_writer.close()
        await asyncio.shield(_stop_if_running(host_id, url, job_id))
    return resp


async def _pipe(
    request: web.Request,
    resp: web.StreamResponse,
    client: asyncio.StreamReader,
    host_reader: asyncio.StreamReader,
    host_writer: asyncio.StreamWriter,
) -> None:
    """Copy bytes both ways until the host ends the stream (after the job's exit frame) or
    the client goes away. When the host ends it, the client gets a half-close and a moment to
    read the last frames and close itself: closing with its input unread would reset the
    connection and could lose the exit frame."""

    async def down() -> None:
        while data := await host_reader.read(CHUNK):
            await resp.write(data)

    async def up() -> None:
        while data := await client.read(CHUNK):
            host_writer.write(data)
            await host_writer.drain()

    down_task = asyncio.create_task(down())
    up_task = asyncio.create_task(up())
    try:
        await asyncio.wait({down_task, up_task}, return_when=asyncio.FIRST_COMPLETED)
        if down_task.done():
            down_task.result()  # a broken client connection is the caller's to see
            transport = request.transport
            if transport is not None and transport.can_write_eof():
                transport.write_eof()
            await asyncio.wait({up_task}, timeout=LINGER)
    finally:
        for task in (down_task, up_task):
            task.cancel()
        for task in (down_task, up_task):
            with contextlib.suppress(BaseException):
                await task
