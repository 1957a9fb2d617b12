"""The HTTP/1.1 reverse proxy of a router worker: client connections in, backend connections
out, both raw `asyncio.Protocol`s parsed by httptools, so that a request costs a few callbacks
and one or two writes per side rather than a framework's objects.

A client connection parses requests (`ClientConnection`); each request becomes an `Exchange`
that picks a backend of its route, takes an idle connection to that backend from the `Pool`
or opens one (`Upstream`), and relays the request head and body to it and the response back.
Bodies are never held whole: each chunk is written on as it arrives, and a side whose write
buffer fills pauses reading on the other side until it drains. An `Upgrade` the backend
accepts (101) turns both connections into a byte pump.

What Flynn's router did and this keeps: routing by host and path; 404 without a route, 503
without a backend (with the operator's page); a backend that refuses a connection is passed
over for the next; `X-Forwarded-For/-Proto/-Port`, `X-Request-Start` and `X-Request-Id` are
set; hop-by-hop headers stop here; sticky routes follow the `_backend` cookie; a route may
turn off upstream keep-alive. What it adds for a Python process to stay up under abuse: a time
limit for the header block, a size limit for it, and PROXY protocol v1 for a load balancer
in front.

This module holds what a worker sees of the proxy: `ProxyConfig`, `Proxy` (the state its
listeners share) and `http_protocol_factory`. The client side is in `downstream`
(`ClientConnection`, `Exchange`), the backend side in `upstream` (`Upstream`, `Pool`), and
what both use in `httputil` (header kinds, status lines and error answers, request ids,
`_Timer`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from flynn_router.downstream import ClientConnection
from flynn_router.httputil import _error_response
from flynn_router.inflight import InFlight
from flynn_router.sticky import StickyCookies
from flynn_router.table import RouteTable
from flynn_router.upstream import Pool


@dataclass(frozen=True)
class ProxyConfig:
    connect_timeout: float = 5.0  # to open a connection to a backend
    response_header_timeout: float = 60.0  # from the request's end to the response's head
    idle_timeout: float = 60.0  # a client's keep-alive connection between requests
    header_timeout: float = 10.0  # for a request's whole header block (slowloris)
    max_header_size: int = 16 * 1024  # request line + headers; beyond: 431
    max_response_header_size: int = 64 * 1024  # a backend's response head; beyond: 502
    error_503_page: bytes | None = None  # body of "no backend" answers (HTML)
    proxy_protocol: bool = False  # clients start with a PROXY v1 line
    pool_size: int = 64  # idle connections kept per backend
    pool_idle_timeout: float = 90.0  # an idle pooled connection is closed after this
    linger: float = 2.0  # reading (and dropping) a request body we answered early


class Proxy:
    """What the HTTP and HTTPS listeners of a worker share: the routing table, the upstream
    pool, the open client connections (for a graceful stop) and the settings."""

    def __init__(
        self,
        table: RouteTable,
        config: ProxyConfig,
        cookies: StickyCookies | None,
        inflight: InFlight,
    ) -> None:
        self.table = table
        self.config = config
        self.cookies = cookies
        self.inflight = inflight
        self.pool = Pool(config.pool_size, config.pool_idle_timeout)
        self.clients: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # connections being opened
        self.closing = False
        self._all_closed: asyncio.Event | None = None
        self._errors: dict[tuple[int, bool, bool, bool], bytes] = {}

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` as a task held until it ends (the loop keeps only weak references)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def protocol_factory(self, scheme: str, port: int) -> Callable[[], asyncio.Protocol]:
        forwarded = b"X-Forwarded-Proto: %s\r\nX-Forwarded-Port: %d\r\n" % (scheme.encode(), port)
        tls = scheme == "https"

        def factory() -> asyncio.Protocol:
            return ClientConnection(self, forwarded, tls)

        return factory

    def error_response(
        self, status: int, close: bool, keep_alive_header: bool, head: bool
    ) -> bytes:
        key = (status, close, keep_alive_header, head)
        out = self._errors.get(key)
        if out is None:
            body = self.config.error_503_page if status == 503 else None
            out = self._errors[key] = _error_response(status, body, close, keep_alive_header, head)
        return out

    def shutdown(self) -> None:
        """Stop keeping connections alive: idle ones close now, busy ones after their
        response."""
        self.closing = True
        for client in list(self.clients):
            client.close_if_idle()

    async def wait_closed(self) -> None:
        """Wait until every client connection has closed (after `shutdown`)."""
        if self.clients:
            self._all_closed = asyncio.Event()
            await self._all_closed.wait()

    def client_closed(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        if not self.clients and self._all_closed is not None:
            self._all_closed.set()

    def abort(self) -> None:
        """Close everything at once (the end of a stop)."""
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        self.pool.close_all()


def http_protocol_factory(
    table: RouteTable,
    config: ProxyConfig,
    cookies: StickyCookies | None,
    inflight: InFlight,
    scheme: str,
    port: int,
    proxy: Proxy | None = None,
) -> Callable[[], asyncio.Protocol]:
    """The protocol factory of one listener (`scheme` "http" or "https", `port` its port, as
    the backend sees them in X-Forwarded-Proto/-Port). Listeners of one worker pass the same
    `proxy` so that they share one upstream pool."""
    if proxy is None:
        proxy = Proxy(table, config, cookies, inflight)
    return proxy.protocol_factory(scheme, port)
