"""Running slugbuilder: a job from the `slugbuilder` image, started directly on a host of the
cluster (as Flynn's receiver does, not through the controller) with the source tar on its
stdin and its output streamed back through the host's attach protocol.

The job runs in the `background` partition with the app's `slugbuilder` process resources
(or the defaults below); it is the app's own code running, so it gets nothing a user job
would not. Whatever ends the build (its exit, an error, the pusher going away), the job is
stopped before `run` returns.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from flynn_host.runtime import attach

log = logging.getLogger("flynn_gitreceive.builds")

HOST_SERVICE = "flynn-host"
ATTACH_FLAGS = (
    attach.ATTACH_STDOUT | attach.ATTACH_STDERR | attach.ATTACH_STDIN | attach.ATTACH_STREAM
)
GIB = 1 << 30
# a build installs dependencies and packs the slug in its writable layer
DEFAULT_RESOURCES: dict[str, dict[str, int]] = {
    "memory": {"request": GIB, "limit": 2 * GIB},
    "temp_disk": {"request": 4 * GIB, "limit": 4 * GIB},
    "max_fd": {"request": 10000, "limit": 10000},
}
CHUNK = 1 << 16
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)


class BuildError(Exception):
    """The build could not be run (no host, the image, the host refused the job)."""


def _headers() -> dict[str, str]:
    key = os.environ.get("FLYNN_HOST_KEY", "")
    return {"Authorization": "Basic " + base64.b64encode(f":{key}".encode()).decode()}


async def pick_host() -> tuple[str, str]:
    """A random host of the cluster: (id, API URL)."""
    from flynn_discoverd.client import Client

    async with Client() as discoverd:
        instances = await discoverd.instances(HOST_SERVICE)
    hosts = [(i.meta.get("id", ""), f"http://{i.addr}") for i in instances]
    if not hosts:
        raise BuildError("no host is available to run the build")
    return random.choice(hosts)


class Host:
    def __init__(self, host_id: str, url: str) -> None:
        self.id = host_id
        self.url = url
        self.session = aiohttp.ClientSession(timeout=TIMEOUT, headers=_headers())

    async def close(self) -> None:
        await self.session.close()

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, json=body) as resp:
            data = await resp.json(content_type=None) if resp.content_length != 0 else None
            return resp.status, data

    async def image(self, name: str, manifest_url: str) -> dict[str, Any]:
        """The host's record of the image at `manifest_url` (imported under `name`; importing
        again is cheap when the layers are cached, and follows a changed manifest)."""
        status, body = await self.request(
            "POST", "/host/images", {"manifest_url": manifest_url, "name": name}
        )
        if status != 200:
            message = body.get("message") if isinstance(body, dict) else body
            raise BuildError(f"host {self.id} cannot import image {name}: {message or status}")
        return dict(body)

    async def stop(self, job_id: str) -> None:
        with contextlib.suppress(Exception):
            status, job = await self.request("GET", f"/host/jobs/{job_id}")
            if (
                status == 200
                and isinstance(job, dict)
                and job.get("status") in ("done", "crashed", "failed")
            ):
                return
            await self.request("DELETE", f"/host/jobs/{job_id}")


def build_job(
    job_id: str,
    image: dict[str, Any],
    args: list[str],
    env: dict[str, str],
    metadata: dict[str, str],
    resources: dict[str, Any] | None,
) -> dict[str, Any]:
    entry = ((image.get("manifest") or {}).get("entrypoints") or {}).get("_default") or {}
    merged = {k: dict(v) for k, v in DEFAULT_RESOURCES.items()}
    for typ, spec in (resources or {}).items():
        limit = (spec or {}).get("limit")
        if limit:
            merged[typ] = {"request": (spec or {}).get("request") or limit, "limit": limit}
    return {
        "id": job_id,
        "mountspecs": list(image.get("mountspecs") or []),
        "metadata": metadata,
        "resources": merged,
        "partition": "background",
        "config": {
            "args": args,
            "env": {**{k: str(v) for k, v in (entry.get("env") or {}).items()}, **env},
            "working_dir": "/",
            "stdin": True,
            "disable_log": False,
        },
    }


async def run(
    image_uri: str,
    args: list[str],
    env: dict[str, str],
    metadata: dict[str, str],
    resources: dict[str, Any] | None,
    source: Path,
    on_output: Callable[[bytes], None],
) -> int:
    """Run slugbuilder on a random host with `source` on stdin; `on_output` gets its output
    as it comes. Returns its exit status."""
    host_id, url = await pick_host()
    host = Host(host_id, url)
    job_id = f"{host_id}-{uuid.uuid4()}"
    put = False
    try:
        image = await host.image("slugbuilder", image_uri)
        job = build_job(job_id, image, args, env, metadata, resources)
        status, body = await host.request("PUT", f"/host/jobs/{job_id}", job)
        if status != 200:
            message = body.get("message") if isinstance(body, dict) else body
            raise BuildError(f"host {host_id} refused the build job: {message or status}")
        put = True
        reader, writer = await attach.attach_host(
            url,
            {"job_id": job_id, "flags": ATTACH_FLAGS, "height": 0, "width": 0},
            key=os.environ.get("FLYNN_HOST_KEY", ""),
        )
        try:
            return await _pipe(reader, writer, source, on_output)
        finally:
            writer.close()
    except attach.AttachError as exc:
        raise BuildError(f"attaching to the build job: {exc.message}") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise BuildError(f"host {host_id}: {exc}") from None
    finally:
        if put:
            await asyncio.shield(host.stop(job_id))
        await host.close()


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    source: Path,
    on_output: Callable[[bytes], None],
) -> int:
    async def send() -> None:
        with source.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                writer.write(attach.data_frame(attach.STDIN, chunk))
                await writer.drain()
        writer.write(attach.data_frame(attach.STDIN, b""))  # EOF
        await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while True:
            frame = await attach.read_frame(reader)
            if frame is None:
                raise BuildError("the build job's host closed the connection")
            if frame.kind == "data" and frame.stream in (attach.STDOUT, attach.STDERR):
                on_output(frame.data)
            elif frame.kind == "exit":
                return frame.status or 0
            elif frame.kind == "error":
                raise BuildError(f"the build job failed: {frame.message}")
    finally:
        if not sender.done():
            sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
