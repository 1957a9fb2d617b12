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


async def host_url(host_id: str) -> str:
    from flynn_discoverd.client import Client, DiscoverdError, UnreachableError

    if os.environ.get("DISCOVERD", "none") in ("", "none"):
        raise HostUnknown(host_id)  # not in a cluster: there are no hosts to find
    try:
        async with Client() as discoverd:
            instances = await discoverd.instances(HOST_SERVICE)
    except (DiscoverdError, UnreachableError, aiohttp.ClientError, OSError) as exc:
        raise HostsUnreachable(str(exc)) from None
    for inst in instances:
        if inst.meta.get("id") == host_id:
            return f"http://{inst.addr}"
    raise HostUnknown(host_id)


def _headers() -> dict[str, str]:
    key = os.environ.get("FLYNN_HOST_KEY", "")
    return {"Authorization": "Basic " + base64.b64encode(f":{key}".encode()).decode()}


async def host_request(host_id: str, method: str, path: str) -> tuple[int, Any]:
    """(status, JSON body or None) of a host API call."""
    url = await host_url(host_id)
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT, headers=_headers()) as session,
        session.request(method, url + path) as resp,
    ):
        body = await resp.json(content_type=None) if resp.content_length != 0 else None
        return resp.status, body
