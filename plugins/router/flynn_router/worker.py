"""A router worker: one data-plane process, driven by the router's supervisor over its stdin
and stdout, one JSON object a line.

The worker opens its own listening sockets with SO_REUSEPORT, so that the supervisor can run
several workers on the same ports and the kernel spreads connections between them; it serves
HTTP and HTTPS with `flynn_router.proxy` and TCP routes with `flynn_router.tcp`, all from its
own copy of the routing table, which the supervisor keeps current:

    supervisor -> worker  {"op": "routes", "routes": [...]}       every route (replaces all)
                          {"op": "set", "route": {...}}           one route added or changed
                          {"op": "remove", "id": "..."}           one route gone
                          {"op": "backends", "service": "...", "backends": [{"addr", "job_id",
                           "app_id"}...], "leader": "ip:port"|null}
                          {"op": "ping", "id": ...}               answered by "pong" (a barrier)
    worker -> supervisor  {"op": "ready"}                         listeners are bound
                          {"op": "drained", "addr": "ip:port"}    a removed backend has nothing
                                                                  in flight from this worker
                          {"op": "error", "message": "..."}       for the supervisor's log
                          {"op": "pong", "id": ...}

EOF on stdin (the supervisor is gone) or SIGTERM stops the worker gracefully: listeners close,
requests in flight get up to `shutdown_timeout` seconds, then it exits 0. Settings come from
the environment variable FLYNN_ROUTER_WORKER (JSON, see `WorkerSettings`); logs go to stderr.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import os
import resource
import signal
import ssl
import sys
import threading
from dataclasses import dataclass, field, fields
from typing import Any

import uvloop

from flynn_router.inflight import InFlight
from flynn_router.proxy import Proxy, ProxyConfig
from flynn_router.sticky import StickyCookies
from flynn_router.table import RouteTable
from flynn_router.tcp import TCPRoutes, listening_socket
from flynn_router.tls import ServerTLS
from flynn_router.types import Backend, Route

log = logging.getLogger("flynn_router.worker")

BACKLOG = 65535  # the kernel caps it at net.core.somaxconn


@dataclass
class WorkerSettings:
    http_ports: list[int] = field(default_factory=lambda: [8080])
    https_ports: list[int] = field(default_factory=lambda: [4433])
    ip: str = "0.0.0.0"
    tcp_ip: str = "0.0.0.0"
    tls_cert: str = ""
    tls_key: str = ""
    cookie_key: str = ""  # base64 of 32 bytes; empty: no sticky sessions
    proxy_protocol: bool = False
    legacy_tls: bool = False
    error_503_page: str | None = None
    connect_timeout: float = 5.0
    response_header_timeout: float = 60.0
    idle_timeout: float = 60.0
    header_timeout: float = 10.0
    max_header_size: int = 16 * 1024
    shutdown_timeout: float = 10.0

    @classmethod
    def from_json(cls, text: str) -> WorkerSettings:
        raw: dict[str, Any] = json.loads(text) if text.strip() else {}
        if not isinstance(raw, dict):
            raise ValueError("FLYNN_ROUTER_WORKER must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            # a newer supervisor may know more: not a reason to leave the ports unserved
            log.warning("ignoring unknown settings: %s", ", ".join(sorted(unknown)))
        given = {k: v for k, v in raw.items() if k in known}
        # null means "the default", except for the 503 page, where it means "none"
        settings = cls(**{k: v for k, v in given.items() if v is not None or k == "error_503_page"})
        settings.http_ports = [int(p) for p in settings.http_ports]
        settings.https_ports = [int(p) for p in settings.https_ports]
        return settings

    def proxy_config(self) -> ProxyConfig:
        page = self.error_503_page
        return ProxyConfig(
            connect_timeout=self.connect_timeout,
            response_header_timeout=self.response_header_timeout,
            idle_timeout=self.idle_timeout,
            header_timeout=self.header_timeout,
            max_header_size=self.max_header_size,
            error_503_page=page.encode() if page is not None else None,
            proxy_protocol=self.proxy_protocol,
        )


def main(argv: list[str]) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if os.environ.get("DEBUG") else logging.INFO,
        format=f"router-worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    if argv:
        print("usage: flynn-host component router-worker", file=sys.stderr)
        print("(settings: FLYNN_ROUTER_WORKER, JSON; commands: stdin)", file=sys.stderr)
        return 2
    try:
        settings = WorkerSettings.from_json(os.environ.get("FLYNN_ROUTER_WORKER", ""))
    except (ValueError, TypeError) as e:
        log.error("bad FLYNN_ROUTER_WORKER: %s", e)
        return 2
    raise_file_limit()
    return uvloop.run(Worker(settings).run())


def raise_file_limit() -> None:
    """Every connection is a file descriptor (two when proxied): use all the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit to %d: %s", target, e)


def emit(message: dict[str, Any]) -> None:
    """One message to the supervisor."""
    try:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass  # the supervisor is gone; EOF on stdin stops us


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.table = RouteTable()
        self.inflight = InFlight(on_idle=self._backend_idle)
        # which services list each backend address, to know when one has left them all
        self.service_addrs: dict[str, set[str]] = {}
        self.addr_refs: dict[str, int] = {}
        self.draining: set[str] = set()
        self.tcp: TCPRoutes | None = None  # once there are TCP routes
        self._tcp_dirty = False
        self._tcp_task: asyncio.Task[None] | None = None
        self.proxy: Proxy | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        s = self.settings
        cookies = None
        if s.cookie_key:
            try:
                cookies = StickyCookies.from_base64(s.cookie_key)
            except (ValueError, binascii.Error) as e:
                self.report_error(f"cookie_key: {e}; sticky sessions are off")
        proxy = self.proxy = Proxy(self.table, s.proxy_config(), cookies, self.inflight)

        servers: list[asyncio.Server] = []
        try:
            for port in s.http_ports:
                sock = listening_socket(s.ip, port, BACKLOG)
                factory = proxy.protocol_factory("http", port)
                servers.append(await loop.create_server(factory, sock=sock, backlog=BACKLOG))
            if s.https_ports and s.tls_cert and s.tls_key:
                tls = ServerTLS(self.table, s.tls_cert, s.tls_key, legacy=s.legacy_tls)
                for port in s.https_ports:
                    sock = listening_socket(s.ip, port, BACKLOG)
                    factory = proxy.protocol_factory("https", port)
                    servers.append(
                        await loop.create_server(
                            factory,
                            sock=sock,
                            backlog=BACKLOG,
                            ssl=tls.context,
                            ssl_handshake_timeout=s.header_timeout,
                        )
                    )
            elif s.https_ports:
                log.info("no default certificate: HTTPS listeners not started")
        except (OSError, ssl.SSLError, ValueError) as e:
            self.report_error(f"cannot listen: {e}")
            for server in servers:
                server.close()
            return 1
        self.table.listeners.append(self._table_changed)

        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        read_lines(loop, lines)
        emit({"op": "ready"})
        log.info(
            "serving http %s, https %s on %s",
            s.http_ports,
            s.https_ports if len(servers) > len(s.http_ports) else [],
            s.ip,
        )

        commands = loop.create_task(self._commands(lines))
        stopped = loop.create_task(stop.wait())
        await asyncio.wait((commands, stopped), return_when=asyncio.FIRST_COMPLETED)
        commands.cancel()
        stopped.cancel()

        log.info("stopping: letting requests in flight finish")
        for server in servers:
            server.close()
        proxy.shutdown()
        try:
            async with asyncio.timeout(s.shutdown_timeout):
                await proxy.wait_closed()
        except TimeoutError:
            log.info("%d connections still open: closing them", len(proxy.clients))
        proxy.abort()
        if self._tcp_task is not None:
            self._tcp_task.cancel()
        if self.tcp is not None:
            await self.tcp.close()
        return 0

    async def _commands(self, lines: asyncio.Queue[bytes | None]) -> None:
        while True:
            line = await lines.get()
            if line is None:
                return
            if not line.strip():
                continue
            try:
                self.command(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                self.report_error(f"bad command {line[:200]!r}: {e}")

    def command(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op == "routes":
            self.table.replace_routes([Route.from_json(r) for r in msg.get("routes") or []])
        elif op == "set":
            self.table.set_route(Route.from_json(msg["route"]))
        elif op == "remove":
            self.table.remove_route(str(msg["id"]))
        elif op == "backends":
            backends = [
                Backend(
                    addr=str(b["addr"]),
                    job_id=str(b.get("job_id") or ""),
                    app_id=str(b.get("app_id") or ""),
                )
                for b in msg.get("backends") or []
            ]
            self.set_backends(str(msg["service"]), backends, msg.get("leader") or None)
        elif op == "ping":
            emit({"op": "pong", "id": msg.get("id")})
        else:
            raise ValueError(f"unknown op {op!r}")

    def report_error(self, message: str) -> None:
        log.warning("%s", message)
        emit({"op": "error", "message": message})

    # --- backends and draining -------------------------------------------------------------

    def set_backends(self, service: str, backends: list[Backend], leader: str | None) -> None:
        self.table.set_backends(service, backends, leader)
        new = {b.addr for b in backends}
        old = self.service_addrs.get(service, set())
        if new:
            self.service_addrs[service] = new
        else:
            self.service_addrs.pop(service, None)
        for addr in new - old:
            self.addr_refs[addr] = self.addr_refs.get(addr, 0) + 1
            self.draining.discard(addr)
        for addr in old - new:
            refs = self.addr_refs.get(addr, 0) - 1
            if refs > 0:
                self.addr_refs[addr] = refs
                continue
            self.addr_refs.pop(addr, None)
            if self.proxy is not None:
                self.proxy.pool.close_addr(addr)
            if self.inflight.count(addr):
                self.draining.add(addr)
            else:
                emit({"op": "drained", "addr": addr})

    def _backend_idle(self, addr: str) -> None:
        if addr in self.draining:
            self.draining.discard(addr)
            if self.proxy is not None:
                self.proxy.pool.close_addr(addr)
            emit({"op": "drained", "addr": addr})

    # --- TCP routes ------------------------------------------------------------------------

    def _table_changed(self, what: str) -> None:
        if what != "route":
            return
        if self.tcp is None and not self.table.tcp_routes():
            return  # no TCP routes, and none before
        self._tcp_dirty = True
        if self._tcp_task is None:
            self._tcp_task = asyncio.get_running_loop().create_task(self._sync_tcp())

    async def _sync_tcp(self) -> None:
        try:
            while self._tcp_dirty:
                self._tcp_dirty = False
                if self.tcp is None:
                    self.tcp = TCPRoutes(
                        self.table, self.settings.tcp_ip, self.inflight, self.report_error
                    )
                await self.tcp.sync()
        except Exception as e:
            log.exception("TCP routes")
            self.report_error(f"TCP routes: {e}")
        finally:
            self._tcp_task = None


def read_lines(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[bytes | None]) -> None:
    """Feed stdin's lines to `lines` (None at EOF) from a daemon thread. A thread works for
    any kind of stdin (pipe, file, terminal); it reads the descriptor with os.read, holding
    no lock of sys.stdin that could block the interpreter's exit."""

    def put(item: bytes | None) -> None:
        try:
            loop.call_soon_threadsafe(lines.put_nowait, item)
        except RuntimeError:
            pass  # the loop is closed: the worker is exiting

    def reader() -> None:
        buf = bytearray()
        while True:
            try:
                chunk = os.read(0, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                if buf:
                    put(bytes(buf))
                put(None)
                return
            start = len(buf)
            buf += chunk
            end = buf.find(b"\n", start)
            while end >= 0:
                put(bytes(buf[:end]))
                del buf[: end + 1]
                end = buf.find(b"\n")

    threading.Thread(target=reader, name="stdin", daemon=True).start()
