"""The daemon's resolver for `*.discoverd` names (flynn_host.discoverd_resolver), against a
stand-in for discoverd's HTTP API on loopback (what it asks: a service's instances, its
leader): an instance's address and its own port for a URL without one, a leader, a clear error
for a service with no instances or no discoverd, and every other name through the system."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from flynn_host.discoverd_resolver import DiscoverdResolver

INSTANCES = {
    "blobstore": [{"addr": "100.100.1.5:80", "proto": "tcp"}],
    "web": [{"addr": "100.100.2.7:8080", "proto": "tcp"}],
}


@pytest.fixture
async def discoverd() -> AsyncIterator[str]:
    async def instances(request: web.Request) -> web.Response:
        return web.json_response(INSTANCES.get(request.match_info["name"], []))

    async def leader(request: web.Request) -> web.Response:
        found = INSTANCES.get(request.match_info["name"])
        if not found:
            return web.json_response({"code": "not_found", "message": "no leader"}, status=404)
        return web.json_response(found[0])

    app = web.Application()
    app.router.add_get("/services/{name}/instances", instances)
    app.router.add_get("/services/{name}/leader", leader)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


async def test_service_names_resolve_to_their_instances(discoverd: str) -> None:
    resolver = DiscoverdResolver(lambda: [discoverd])
    try:
        [found] = await resolver.resolve("blobstore.discoverd", 80)
        assert (found["host"], found["port"]) == ("100.100.1.5", 80)
        # no port in the URL: the instance's own
        [found] = await resolver.resolve("web.discoverd", 80)
        assert (found["host"], found["port"]) == ("100.100.2.7", 8080)
        # a port in the URL is kept
        [found] = await resolver.resolve("web.discoverd", 9000)
        assert found["port"] == 9000
        [found] = await resolver.resolve("leader.web.discoverd", 80)
        assert found["host"] == "100.100.2.7"
        with pytest.raises(OSError, match="no instances of 'nothing'"):
            await resolver.resolve("nothing.discoverd", 80)
        [local, *_] = await resolver.resolve("localhost", 80, socket.AF_INET)
        assert local["host"] == "127.0.0.1"
    finally:
        await resolver.close()


async def test_without_discoverd_the_error_says_so() -> None:
    resolver = DiscoverdResolver(lambda: None)
    with pytest.raises(OSError, match="no discoverd yet"):
        await resolver.resolve("blobstore.discoverd", 80)
    await resolver.close()
