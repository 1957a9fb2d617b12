"""TCP routes: a listener per route port (shared by the workers with SO_REUSEPORT), each
connection piped to a backend of the route's service, chosen round robin when the
connection arrives. Half-closes pass through: when one side finishes sending, the other is
told (`write_eof`) and the pipe goes on in the other direction until it finishes too.

Routes come and go with the table: `sync()` opens listeners for new routes and closes those of
removed ones (connections already piped carry on until their ends close them)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Callable

from flynn_router.inflight import InFlight
from flynn_router.table import RouteTable

log = logging.getLogger("flynn_router.tcp")

CONNECT_TIMEOUT = 5.0
CHUNK = 65536


def listening_socket(ip: str, port: int, backlog: int = 1024) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT, so every worker of the router listens on it."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((ip, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


class TCPRoutes:
    """The worker's TCP route listeners, kept in step with `table`'s TCP routes."""

    def __init__(
        self,
        table: RouteTable,
        ip: str,
        inflight: InFlight,
        report_error: Callable[[str], None],
    ) -> None:
        self.table = table
        self.ip = ip
        self.inflight = inflight
        self.report_error = report_error
        self.servers: dict[int, asyncio.Server] = {}
        self.failed: set[int] = set()

    async def sync(self) -> None:
        wanted = set(self.table.tcp_routes())
        for port in sorted(set(self.servers) - wanted):
            server = self.servers.pop(port)
            server.close()
        self.failed &= wanted
        for port in sorted(wanted - set(self.servers) - self.failed):
            try:
                sock = listening_socket(self.ip, port)
            except OSError as exc:
                self.failed.add(port)
                self.report_error(f"TCP route port {port}: {exc.strerror or exc}")
                continue
            self.servers[port] = await asyncio.start_server(
                functools.partial(self._serve, port), sock=sock
            )

    async def close(self) -> None:
        for server in self.servers.values():
            server.close()
        self.servers.clear()

    async def _serve(
        self, port: int, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        route = self.table.tcp_route(port)
        backend = self.table.pick(route) if route is not None else None
        if backend is None:
            client_w.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(backend.host, backend.port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, ConnectionRefusedError):
                self.table.mark_refused(backend.addr)
            log.debug("TCP route %d: backend %s: %s", port, backend.addr, exc)
            client_w.transport.abort()
            return
        self.inflight.begin(backend.addr)
        try:
            await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))
        finally:
            for w in (up_w, client_w):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
            self.inflight.end(backend.addr)
