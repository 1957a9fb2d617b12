"""The cluster's hosts as the controller reaches them: each flynn-host daemon is an instance
of discoverd service `flynn-host` whose meta `id` is its host id, and its API takes the
cluster's host key, which system jobs get as `FLYNN_HOST_KEY`. A job id names its host (the
part before the first `-`), so a job is found without asking every host."""

from __future__ import annotations

import base64
import os
from typing import Any

import aiohttp

HOST_SERVICE = "flynn-host"
TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)


class HostUnknown(Exception):
    """No host of that id is registered (gone, or never was)."""


class HostsUnreachable(Exception):
    """discoverd, which knows the hosts, does not answer."""


async def list_hosts() -> dict[str, str]:
    """host id -> API URL of every host registered in discoverd (none outside a cluster)."""
    from flynn_discoverd.client import Client, DiscoverdError, UnreachableError

    if os.environ.get("DISCOVERD", "none") in ("", "none"):
        return {}  # not in a cluster: there are no hosts to find
    try:
        async with Client() as discoverd:
            instances = await discoverd.instances(HOST_SERVICE)
    except (DiscoverdError, UnreachableError, aiohttp.ClientError, OSError) as exc:
        raise HostsUnreachable(str(exc)) from None
    return {i.meta["id"]: f"http://{i.addr}" for i in instances if i.meta.get("id")}


async def host_url(host_id: str) -> str:
    url = (await list_hosts()).get(host_id)
    if url is None:
        raise HostUnknown(host_id)
    return url


def _headers() -> dict[str, str]:
    key = os.environ.get("FLYNN_HOST_KEY", "")
    return {"Authorization": "Basic " + base64.b64encode(f":{key}".encode()).decode()}


def headers() -> dict[str, str]:
    """The host API's auth header, with the cluster's host key (`FLYNN_HOST_KEY`)."""
    return _headers()


async def host_request(
    host_id: str, method: str, path: str, body: Any = None, *, url: str | None = None
) -> tuple[int, Any]:
    """(status, JSON body or None) of a host API call (to `url` when the caller knows it)."""
    url = url or await host_url(host_id)
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT, headers=_headers()) as session,
        session.request(method, url + path, json=body) as resp,
    ):
        out = await resp.json(content_type=None) if resp.content_length != 0 else None
        return resp.status, out


class ImageError(Exception):
    """A host could not find or import an artifact's image."""


async def job_image(host_id: str, artifact: dict[str, Any], *, url: str | None = None) -> Any:
    """The host's record of an artifact's image (`manifest`, `mountspecs` naming the host's
    cached layers), imported there from the artifact's manifest URL the first time."""
    from flynn_controller.jobconfig import image_name

    if artifact.get("type") != "flynn":
        raise ImageError(
            f"artifact {artifact.get('id')}: type {artifact.get('type')!r} cannot run here"
            " (only Flynn images, type flynn, can: this cluster reaches no Docker registry)"
        )
    name = image_name(artifact)
    status, body = await host_request(host_id, "GET", f"/host/images/{name}", url=url)
    if status == 404:
        status, body = await host_request(
            host_id, "POST", "/host/images", {"manifest_url": artifact["uri"], "name": name},
            url=url,
        )  # fmt: skip
        if status == 200:
            status, body = await host_request(host_id, "GET", f"/host/images/{name}", url=url)
    if status != 200 or not isinstance(body, dict):
        message = body.get("message") if isinstance(body, dict) else body
        raise ImageError(f"host {host_id}: image {name} from {artifact.get('uri')}: {message}")
    return body
