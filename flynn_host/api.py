"""The host API (port 1113): Flynn's paths and JSON (README.md#host-api-port-1113).

Jobs (`/host/jobs`), their event streams (SSE), signals, host status, the job network
(`POST /host/network`, from flannel), resource checks, attach
(`POST /attach`, upgraded to Flynn's framing and proxied to the job's shim), volumes
(`/storage/...`), plugins (`/plugins`) and `/.well-known/status`. Errors are Flynn's JSON.

Every body is read through `httphelper.read_json` (capped in size, time and nesting: see
`flynn_host.limits`) and checked before anything acts on it: a request either gets a clear 4xx
naming the field, or does what it asked; it never gets a 500, a hang, or a 101 followed by a
traceback.

Size: longer than most modules, on purpose. The API is one route table (`make_app`) and the
short handlers it names, which share the key guard, the stream tracking and the error handling,
and a reader checks one against the other; split by path, each part would be a few handlers and
the table would point across files. The longest section, attach, is this side of a protocol
whose framing lives in `flynn_host.runtime.attach`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import hmac
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from flynn_host import __version__, httphelper, limits
from flynn_host.errors import FlynnError, ValidationError
from flynn_host.httphelper import read_json, wants_stream
from flynn_host.networking.jobnet import parse_network
from flynn_host.networking.links import NetworkError
from flynn_host.plugins.manager import list_plugins
from flynn_host.runtime import attach, logs
from flynn_host.types import RUNNING, STARTING, Job, int_field, parse_signal

if TYPE_CHECKING:
    from flynn_host.daemon import Host

log = logging.getLogger(__name__)

HOST: web.AppKey[Host] = web.AppKey("host")
# the long-lived handlers (event streams, attach sessions): shutdown ends them at once
STREAMS: web.AppKey[Streams] = web.AppKey("streams")
ATTACH_LINGER = 2.0
# what a load balancer or monitor may ask without the host key
OPEN_PATHS = frozenset({"/host/status", "/.well-known/status"})
# ports one resource check may ask about (each is a bind in the event loop)
MAX_CHECK_PORTS = 1024
# strings the host keeps and hands on (discoverd's URL goes into every job's environment)
MAX_FIELD = 2048


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


errors_middleware = httphelper.errors_middleware()


class Streams:
    """The handlers that hold a connection open for as long as the client likes. The daemon
    ends them all when it shuts down, so no client can hold the shutdown up."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closing = False

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        if self.closing:
            raise FlynnError("service_unavailable", "the host is shutting down", retry=True)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            yield
        finally:
            self.tasks.discard(task)

    async def close(self) -> None:
        self.closing = True
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _presented_key(request: web.Request) -> str | None:
    """The key in `Authorization: Basic` (any user, the key as password, as Flynn's clients
    send the controller key) or `Authorization: Bearer`."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def guard_middleware(host_key: str) -> Any:
    """The host API is root on this host: refuse requests made by web pages (a browser sends
    `Origin` or `Sec-Fetch-*` headers with them; no client of this API does), and requests
    without the cluster's host key, except the health checks."""
    expected = host_key.encode()

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if "Origin" in request.headers or "Sec-Fetch-Mode" in request.headers:
            raise FlynnError("forbidden", "the host API does not answer requests from web pages")
        if request.path in OPEN_PATHS and request.method in ("GET", "HEAD"):
            return await handler(request)
        presented = _presented_key(request)
        if presented is None or not hmac.compare_digest(presented.encode(), expected):
            raise FlynnError(
                "unauthorized",
                "the host API requires the cluster's host key (Authorization header)",
            )
        return await handler(request)

    return guard


async def sse_events(
    request: web.Request,
    queue: asyncio.Queue[dict[str, Any] | None],
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> web.StreamResponse:
    """The job events put in `queue` as an event stream (`httphelper.write_sse`: Flynn's
    framing and keep-alives), until a None or an event `until` accepts. Tracked, so a shutdown
    ends it at once; the cancellation that does so ends the stream quietly."""

    async def events() -> AsyncIterator[dict[str, Any]]:
        while (event := await queue.get()) is not None:
            yield event
            if until is not None and until(event):
                return

    resp = httphelper.sse_response()
    with request.app[STREAMS].track(), contextlib.suppress(asyncio.CancelledError):
        await httphelper.write_sse(request, resp, events())
    return resp


# --- jobs -------------------------------------------------------------------------------------


async def list_jobs(request: web.Request) -> web.StreamResponse:
    host = request.app[HOST]
    if wants_stream(request):
        async with host.jobs.subscribe() as queue:
            return await sse_events(request, queue)
    active = request.query.get("active") == "true"
    return json_response({j.job.id: j.to_json() for j in host.jobs.list(active_only=active)})


async def get_job(request: web.Request) -> web.StreamResponse:
    host = request.app[HOST]
    job_id = request.match_info["id"]
    if wants_stream(request):
        async with host.jobs.subscribe(job_id) as queue:
            job = host.jobs.get(job_id)  # an unknown job is a 404, not a stream that never ends
            if job.ended:
                # a stream of a finished job says how it ended, then closes
                queue.put_nowait({"event": "stop", "job_id": job_id, "job": job.to_json()})
                queue.put_nowait(None)
            return await sse_events(request, queue, until=lambda e: e["event"] == "cleanup")
    return json_response(host.jobs.get(job_id).to_json())


async def put_job(request: web.Request) -> web.Response:
    host = request.app[HOST]
    raw = await read_json(request)
    job = Job.from_json(raw, request.match_info["id"])
    for i, spec in enumerate(job.mountspecs):
        try:
            host.layers.check_url(spec.url)
        except limits.FileRefused as exc:
            raise ValidationError(f"mountspecs[{i}].url", f"is refused: {exc}") from exc
    host.jobs.add(job)
    return json_response({})


async def delete_job(request: web.Request) -> web.Response:
    host = request.app[HOST]
    job = host.jobs.get(request.match_info["id"])
    # out of discoverd before the signal: no client is sent to a job that is stopping
    await host.services.deregister(job.job.id)
    host.jobs.stop(job.job.id)
    return json_response({})


async def discoverd_deregister(request: web.Request) -> web.Response:
    """Flynn's `PUT /host/jobs/:id/discoverd-deregister`: the job's instances leave
    discoverd; the job goes on running (the scheduler stops it once routers drained it)."""
    host = request.app[HOST]
    job = host.jobs.get(request.match_info["id"])
    await host.services.deregister(job.job.id)
    return json_response({})


async def signal_job(request: web.Request) -> web.Response:
    try:
        sig = parse_signal(request.match_info["signal"])
    except ValueError as exc:
        raise ValidationError("signal", str(exc)) from exc
    await request.app[HOST].jobs.signal(request.match_info["id"], sig)
    return json_response({})


# --- host -------------------------------------------------------------------------------------


def _plain_string(raw: dict[str, Any], key: str) -> None:
    """An optional string the host keeps and hands on: printable, of sane length."""
    value = raw.get(key)
    if value is not None and (
        not isinstance(value, str) or len(value) > MAX_FIELD or not value.isprintable()
    ):
        raise ValidationError(key, f"must be a printable string of at most {MAX_FIELD} characters")


def _http_url(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > MAX_FIELD or not value.isprintable():
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError for a port that is not one)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in value


async def host_discoverd(request: web.Request) -> web.Response:
    """discoverd's job tells its host where discoverd answers (docs/discoverd.md#its-host)."""
    raw = await read_json(request)
    if not isinstance(raw, dict):
        raise ValidationError("", "body must be a JSON object")
    # the URL goes into every new job's environment and the host registers there: a value
    # that would fail later (a NUL, a port of 99999) is refused here
    if not _http_url(raw.get("url")):
        raise ValidationError("url", "must be an http(s) URL")
    for key in ("job_id", "dns"):
        _plain_string(raw, key)
    host = request.app[HOST]
    host.discoverd.set(raw)
    return json_response({})


async def host_network(request: web.Request) -> web.Response:
    """flannel's job tells its host the subnet it leased: the host makes its bridge."""
    info = parse_network(await read_json(request))
    host = request.app[HOST]
    try:
        await host.network.configure(info)
    except NetworkError as exc:
        raise FlynnError("unknown_error", f"configuring the job network: {exc}") from exc
    return json_response({})


async def host_status(request: web.Request) -> web.Response:
    host = request.app[HOST]
    return json_response(host.status())


def port_in_use(port: int, proto: str, ip: str) -> bool:
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            # as servers bind: connections in TIME_WAIT do not make a port busy
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip or "0.0.0.0", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


async def resource_check(request: web.Request) -> web.Response:
    host = request.app[HOST]
    raw = await read_json(request)
    ports = raw.get("ports") if isinstance(raw, dict) else None
    if not isinstance(ports, list) or len(ports) > MAX_CHECK_PORTS:
        raise ValidationError("ports", f"must be an array of at most {MAX_CHECK_PORTS} ports")
    conflicts = []
    for i, p in enumerate(ports):
        if not isinstance(p, dict):
            raise ValidationError(f"ports[{i}]", "must be an object")
        int_field(p.get("port"), f"ports[{i}].port", 0, 65535)
        proto = p.get("proto") or "tcp"
        if proto not in ("tcp", "udp"):
            raise ValidationError(f"ports[{i}].proto", "must be tcp or udp")
        if port_in_use(p["port"], proto, host.config.listen_ip):
            conflicts.append({"port": p["port"], "proto": proto})
    if conflicts:
        raise FlynnError("conflict", "ports are in use", {"ports": conflicts})
    return json_response({})


async def well_known_status(request: web.Request) -> web.Response:
    return json_response({"data": {"status": "healthy", "version": __version__}})


async def plugins(request: web.Request) -> web.Response:
    return json_response(list_plugins(request.app[HOST].pm))


# --- volumes ----------------------------------------------------------------------------------


async def create_volume(request: web.Request) -> web.Response:
    host = request.app[HOST]
    provider = request.match_info["provider"]
    if provider != "default":
        raise FlynnError("not_found", f"volume provider {provider} not found")
    body = await read_json(request, required=False)
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise ValidationError("", "body must be a JSON object")
    meta = body.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise ValidationError("meta", "must be an object")
    return json_response(host.volumes.create(meta, body.get("id") or None))


async def list_volumes(request: web.Request) -> web.Response:
    return json_response(request.app[HOST].volumes.list())


async def get_volume(request: web.Request) -> web.Response:
    return json_response(request.app[HOST].volumes.get(request.match_info["id"]))


async def delete_volume(request: web.Request) -> web.Response:
    host = request.app[HOST]
    vid = request.match_info["id"]
    host.volumes.get(vid)
    for job in host.jobs.list(active_only=True):
        if any(v.get("volume") == vid for v in job.job.config.get("volumes") or []):
            raise FlynnError("conflict", f"volume {vid} is in use by job {job.job.id}")
    host.volumes.delete(vid)
    return json_response({})


# --- images (this project's extension: Flynn hosts got images through TUF downloads) ------


async def import_image(request: web.Request) -> web.Response:
    raw = await read_json(request)
    ref = raw.get("manifest_url") if isinstance(raw, dict) else None
    if (
        not isinstance(ref, str)
        or not ref.isprintable()
        or not ref.startswith(("/", "file://", "http://", "https://"))
    ):
        raise ValidationError(
            "manifest_url", "must be an absolute path or a file:// or http(s):// URL"
        )
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise ValidationError("name", "must be a string")
    return json_response(await request.app[HOST].images.import_image(raw["manifest_url"], name))


async def list_images(request: web.Request) -> web.Response:
    return json_response(request.app[HOST].images.list())


async def get_image(request: web.Request) -> web.Response:
    return json_response(request.app[HOST].images.get(request.match_info["name"]))


async def delete_image(request: web.Request) -> web.Response:
    request.app[HOST].images.delete(request.match_info["name"])
    return json_response({})


async def gc_images(request: web.Request) -> web.Response:
    host = request.app[HOST]
    in_use = set(host.backend.layers_in_use)
    for job in host.jobs.list(active_only=True):  # starting jobs hold no mount yet
        in_use |= {s.id for s in job.job.mountspecs}
    return json_response({"removed": host.images.gc(in_use)})


# --- attach -----------------------------------------------------------------------------------


async def _discard_until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


class _Feeder:
    """Receives the bytes of an upgraded connection (aiohttp's payload-parser interface)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.reader.feed_data(data)
        return False, b""

    def feed_eof(self) -> None:
        self.reader.feed_eof()


async def attach_job(request: web.Request) -> web.StreamResponse:
    host = request.app[HOST]
    req = _attach_request(await read_json(request))
    flags = req.get("flags") or 0
    job = host.jobs.get(req["job_id"])
    resp = web.StreamResponse(
        status=101, headers={"Upgrade": "flynn-attach/0", "Connection": "Upgrade"}
    )
    # tracked from before the upgrade: a shutdown refuses a new attach, or ends this one
    with request.app[STREAMS].track():
        await resp.prepare(request)
        return await _attached(request, host, job, req, flags, resp)


async def _attached(
    request: web.Request,
    host: Host,
    job: Any,
    req: dict[str, Any],
    flags: int,
    resp: web.StreamResponse,
) -> web.StreamResponse:
    """An upgraded attach connection, from the status byte to the lingering close."""
    client = asyncio.StreamReader()
    assert request.protocol is not None
    request.protocol.set_parser(_Feeder(client))  # type: ignore[arg-type]
    resp.force_close()
    try:
        if job.status == STARTING:
            await resp.write(bytes([attach.STATUS_WAITING]))
            await host.jobs.wait_started(job.job.id)
        shim = None
        if job.status == RUNNING:
            with contextlib.suppress(OSError):
                shim = await host.backend.attach(job.job.id, req)
        sent = None
        if shim is not None:
            await resp.write(bytes([attach.STATUS_SUCCESS]))
            sent = await _proxy(client, resp, *shim)
            # a request that does not follow the job is answered once the shim has sent what
            # there is, which may be nothing yet (a job just started has logged nothing)
            if (
                sent["exit"]
                or not flags & attach.ATTACH_STREAM
                and (sent["frames"] or sent["done"])
            ):
                return resp
        # the job ended while we attached (or its shim went away): finish from the job's
        # record and log file, replaying the log only if the shim sent nothing of it
        await asyncio.wait_for(host.jobs.wait_ended(job.job.id), 30)
        await _attach_ended(host, job, req, flags, resp, sent)
    except (ConnectionResetError, asyncio.CancelledError):
        return resp
    except Exception as exc:
        # past the upgrade, an HTTP error response would corrupt the stream: send a frame
        log.exception("attach to %s failed", job.job.id)
        with contextlib.suppress(Exception):
            await resp.write(attach.error_frame(f"attach failed: {exc}"))
    # a lingering close: closing with the client's last frames unread would make the kernel
    # reset the connection, and a reset makes the client drop what it has not read yet (the
    # exit frame). Half-close, then read until the client closes.
    with contextlib.suppress(Exception):
        transport = request.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
        await asyncio.wait_for(_discard_until_eof(client), ATTACH_LINGER)
    return resp


def _attach_request(req: Any) -> dict[str, Any]:
    """Check an attach request before the upgrade: past the 101, an error can only be a frame,
    and a value the shim or the log reader refuses would end the stream with a traceback."""
    if not isinstance(req, dict) or not isinstance(req.get("job_id"), str):
        raise ValidationError("job_id", "must be a string")
    if req.get("flags") is not None:
        int_field(req["flags"], "flags", 0, attach.ALL_FLAGS)
    for key in ("height", "width"):  # a terminal size, 16 bits in the resize frame
        if req.get(key) is not None:
            int_field(req[key], key, 0, 0xFFFF)
    if req.get("lines") is not None:
        int_field(req["lines"], "lines", 0, 2**31 - 1)
    return req


async def _attach_ended(
    host: Host,
    job: Any,
    req: dict[str, Any],
    flags: int,
    resp: web.StreamResponse,
    sent: dict[str, Any] | None,
) -> None:
    """Attach to a job that is no longer running: replay its log, then how it ended. `sent`
    is what a shim connection already delivered (None: not even the status byte)."""
    if sent is None:
        if job.error and job.status == "failed" and not flags & attach.ATTACH_LOGS:
            # the error frame's type byte (2) is also the status byte Flynn's clients read
            await resp.write(attach.error_frame(job.error))
            return
        await resp.write(bytes([attach.STATUS_SUCCESS]))
    streams = {s for s, f in (("stdout", attach.ATTACH_STDOUT), ("stderr", attach.ATTACH_STDERR))
               if flags & f}  # fmt: skip
    if flags & attach.ATTACH_LOGS and not (sent and sent["frames"]):
        path = str(host.backend.log_path(job.job.id))
        for entry in logs.read_entries(path, lines=req.get("lines"), streams=streams):
            stream = attach.STDOUT if entry["s"] == "stdout" else attach.STDERR
            await resp.write(attach.data_frame(stream, logs.format_entry(entry)))
    if flags & attach.ATTACH_STREAM:
        ended = sent["eof"] if sent else set()
        for stream in sorted({attach.STDOUT if s == "stdout" else attach.STDERR for s in streams}):
            if stream not in ended:
                await resp.write(attach.data_frame(stream, b""))
        if job.status == "failed":
            await resp.write(attach.error_frame(job.error or "job failed"))
        else:
            await resp.write(attach.exit_frame(job.exit_status or 0))


async def _proxy(
    client: asyncio.StreamReader,
    resp: web.StreamResponse,
    shim_reader: asyncio.StreamReader,
    shim_writer: asyncio.StreamWriter,
) -> dict[str, Any]:
    """Forward frames both ways between the client and the job's shim, which already speaks
    Flynn's attach framing. Returns what reached the client: whether any frame did, which
    streams were ended, whether the exit frame was sent, and whether the shim ended the
    stream itself (`done`) rather than going away."""
    sent: dict[str, Any] = {"frames": 0, "eof": set(), "exit": False, "done": False}

    async def upstream() -> None:
        while data := await client.read(65536):
            shim_writer.write(data)
            await shim_writer.drain()

    up = asyncio.create_task(upstream())
    try:
        while (frame := await attach.read_frame(shim_reader)) is not None:
            await resp.write(attach.encode_frame(frame))
            sent["frames"] += 1
            if frame.kind == "data" and not frame.data:
                sent["eof"].add(frame.stream)
            elif frame.kind in ("exit", "error"):
                sent["exit"] = True
                break
        else:
            sent["done"] = True
    except (OSError, ValueError, asyncio.IncompleteReadError):
        pass  # the shim went away: the caller finishes the stream from the job's record
    finally:
        up.cancel()
        with contextlib.suppress(BaseException):
            await up
        shim_writer.close()
    return sent


def make_app(host: Host) -> web.Application:
    middlewares = [errors_middleware, guard_middleware(host.config.host_key)]
    app = web.Application(middlewares=middlewares, client_max_size=limits.MAX_JSON_BODY)
    app[HOST] = host
    app[STREAMS] = Streams()
    r = app.router
    r.add_get("/host/jobs", list_jobs)
    r.add_get("/host/jobs/{id}", get_job)
    r.add_put("/host/jobs/{id}", put_job)
    r.add_delete("/host/jobs/{id}", delete_job)
    r.add_put("/host/jobs/{id}/signal/{signal}", signal_job)
    r.add_put("/host/jobs/{id}/discoverd-deregister", discoverd_deregister)
    r.add_get("/host/status", host_status)
    r.add_post("/host/discoverd", host_discoverd)
    r.add_post("/host/network", host_network)
    r.add_post("/host/resource-check", resource_check)
    r.add_post("/attach", attach_job)
    r.add_post("/storage/providers/{provider}/volumes", create_volume)
    r.add_get("/storage/volumes", list_volumes)
    r.add_get("/storage/volumes/{id}", get_volume)
    r.add_delete("/storage/volumes/{id}", delete_volume)
    r.add_post("/host/images", import_image)
    r.add_get("/host/images", list_images)
    r.add_post("/host/images/gc", gc_images)
    r.add_get("/host/images/{name}", get_image)
    r.add_delete("/host/images/{name}", delete_image)
    r.add_get("/plugins", plugins)
    r.add_get("/.well-known/status", well_known_status)
    for prefix, sub in host.plugin_apps():
        sub.middlewares.append(errors_middleware)
        app.add_subapp(prefix, sub)
    return app
