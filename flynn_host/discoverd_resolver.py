"""Name resolution for the daemon's own HTTP clients: `<service>.discoverd` (and
`leader.<service>.discoverd`) resolve through discoverd's API to the service's instances, as
jobs resolve them through discoverd's DNS. The daemon needs it to fetch what lives in the
cluster itself, e.g. a slug app's image manifest and slug layer at
`http://blobstore.discoverd/slugs/...`. A URL without a port (`:80`, the default) reaches an
instance at its registered port. Every other name goes to the system resolver.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

SUFFIX = ".discoverd"


class DiscoverdResolver(AbstractResolver):
    def __init__(self, urls: Callable[[], list[str] | None]) -> None:
        self._urls = urls
        self._default: AbstractResolver | None = None  # made in the loop: it needs one

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        name = host.rstrip(".").lower()
        if not name.endswith(SUFFIX):
            if self._default is None:
                self._default = DefaultResolver()
            return await self._default.resolve(host, port, family)
        urls = self._urls()
        if not urls:
            raise OSError(f"cannot resolve {host}: this host has no discoverd yet")
        from flynn_discoverd.client import Client  # discoverd's client, as any component uses

        service = name.removesuffix(SUFFIX)
        async with Client(urls) as client:
            if service.startswith("leader."):
                leader = await client.leader(service.removeprefix("leader."))
                found = [leader] if leader else []
            else:
                found = await client.instances(service)
        if not found:
            raise OSError(f"cannot resolve {host}: no instances of {service!r} in discoverd")
        random.shuffle(found)
        out: list[ResolveResult] = []
        for inst in found:
            ip, _, inst_port = inst.addr.rpartition(":")
            out.append(
                {
                    "hostname": host,
                    "host": ip,
                    "port": int(inst_port) if port in (0, 80) else port,
                    "family": socket.AF_INET,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
            )
        return out

    async def close(self) -> None:
        if self._default is not None:
            await self._default.close()


def connector(resolver: Any | None) -> Any:
    """An aiohttp connector using `resolver` (None: aiohttp's default)."""
    import aiohttp

    return aiohttp.TCPConnector(resolver=resolver) if resolver is not None else None
