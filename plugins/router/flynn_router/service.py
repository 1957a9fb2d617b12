"""`flynn-host component router`: Flynn's router on one host.

This process is the router's control plane. It follows the controller's routes and the
discoverd instances of every routed service (`follow`), serves the router API on
`--api-port` (`server`), registers `router-api` and `router-http` in discoverd, and runs N
data-plane processes (`flynn-host component router-worker`, `worker`) that share the HTTP,
HTTPS and TCP route ports with SO_REUSEPORT. Each worker gets the routes and backends as JSON
lines on its stdin and reports, on its stdout, when it has drained a backend that went away;
once every worker has, the API streams `backend-drained`. A worker that dies is started again
and given the whole state.

Flags (Flynn's): --http-port (8080), --https-port (4433), --tcp-ip ($LISTEN_IP), --tcp-range-start
(3000), --tcp-range-end (3500), --tls-cert/--tls-key (PEM files), --api-port ($PORT, else 5000),
and --workers (the number of CPUs). Environment (Flynn's): TLSCERT/TLSKEY (the default
certificate, PEM), COOKIE_KEY (base64 of 32 bytes: sticky-session cookies), PROXY_PROTOCOL=true,
LEGACY_TLS=true (TLS 1.0 and 1.1 too), DEFAULT_HTTP_PORT, DEFAULT_HTTPS_PORT,
ADDITIONAL_HTTP_PORTS, ADDITIONAL_HTTPS_PORTS (comma lists), ERROR_503_PAGE_URL (fetched once,
at most 1 MB). The controller is found in discoverd (service `controller`) or named by
CONTROLLER_URL; its key is CONTROLLER_KEY (or AUTH_KEY).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import secrets
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from flynn_router.follow import BackendSource, RouteSource
from flynn_router.server import EventHub, make_app
from flynn_router.sticky import decode_key
from flynn_router.types import (
    BACKEND_DOWN,
    BACKEND_DRAINED,
    BACKEND_UP,
    REMOVE,
    SET,
    Backend,
    Route,
    StreamEvent,
)

log = logging.getLogger("flynn_router")

WORKER_RESTART_DELAY = 1.0
DRAIN_GIVE_UP = 60.0  # seconds after which a drain that never completed is forgotten
MAX_ERROR_PAGE = 1 << 20


@dataclass
class Settings:
    http_ports: list[int] = field(default_factory=lambda: [8080])
    https_ports: list[int] = field(default_factory=lambda: [4433])
    ip: str = "0.0.0.0"
    tcp_ip: str = "0.0.0.0"
    tcp_range: tuple[int, int] = (3000, 3500)
    api_port: int = 5000
    workers: int = 1
    tls_cert: str = ""
    tls_key: str = ""
    cookie_key: str = ""
    proxy_protocol: bool = False
    legacy_tls: bool = False
    error_503_page_url: str = ""
    controller_url: str = ""
    controller_key: str = ""
    external_ip: str = "127.0.0.1"

    def worker_config(self, error_page: str | None) -> dict[str, Any]:
        return {
            "http_ports": self.http_ports,
            "https_ports": self.https_ports if self.tls_cert else [],
            "ip": self.ip,
            "tcp_ip": self.tcp_ip,
            "tls_cert": self.tls_cert,
            "tls_key": self.tls_key,
            "cookie_key": self.cookie_key,
            "proxy_protocol": self.proxy_protocol,
            "legacy_tls": self.legacy_tls,
            "error_503_page": error_page,
        }


def _ports(first: int, more: str) -> list[int]:
    out = [first]
    for p in more.split(","):
        if p.strip() and int(p) not in out:
            out.append(int(p))
    return out


def settings_from(argv: list[str], env: dict[str, str]) -> Settings:
    parser = argparse.ArgumentParser(
        prog="flynn-host component router",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--http-port", type=int, default=int(env.get("DEFAULT_HTTP_PORT") or 8080))
    parser.add_argument(
        "--https-port", type=int, default=int(env.get("DEFAULT_HTTPS_PORT") or 4433)
    )
    parser.add_argument("--tcp-ip", default=env.get("LISTEN_IP") or "0.0.0.0")
    parser.add_argument("--tcp-range-start", type=int, default=3000)
    parser.add_argument("--tcp-range-end", type=int, default=3500)
    parser.add_argument("--tls-cert", default="", help="default certificate (PEM file)")
    parser.add_argument("--tls-key", default="", help="its private key (PEM file)")
    parser.add_argument("--api-port", type=int, default=int(env.get("PORT") or 5000))
    parser.add_argument("--workers", type=int, default=int(env.get("ROUTER_WORKERS") or 0))
    args = parser.parse_args(argv)
    cert = env.get("TLSCERT", "")
    key = env.get("TLSKEY", "")
    if args.tls_cert:
        with open(args.tls_cert) as f:
            cert = f.read()
    if args.tls_key:
        with open(args.tls_key) as f:
            key = f.read()
    if bool(cert) != bool(key):
        parser.error("a TLS certificate needs its key, and a key its certificate")
    cookie_key = env.get("COOKIE_KEY", "")
    if cookie_key:
        try:
            decode_key(cookie_key)
        except ValueError as exc:
            parser.error(f"COOKIE_KEY must be the base64 encoding of 32 bytes ({exc})")
    else:
        # one key for this router's workers; routers of other hosts will not read its
        # cookies (bootstrap gives every router the same COOKIE_KEY)
        cookie_key = base64.b64encode(secrets.token_bytes(32)).decode()
    try:
        http_ports = _ports(args.http_port, env.get("ADDITIONAL_HTTP_PORTS", ""))
        https_ports = _ports(args.https_port, env.get("ADDITIONAL_HTTPS_PORTS", ""))
    except ValueError:
        parser.error("ADDITIONAL_HTTP(S)_PORTS must be comma-separated port numbers")
    return Settings(
        http_ports=http_ports,
        https_ports=https_ports,
        ip=env.get("LISTEN_IP") or "0.0.0.0",
        tcp_ip=args.tcp_ip,
        tcp_range=(args.tcp_range_start, args.tcp_range_end),
        api_port=args.api_port,
        workers=args.workers or os.cpu_count() or 1,
        tls_cert=cert,
        tls_key=key,
        cookie_key=cookie_key,
        proxy_protocol=env.get("PROXY_PROTOCOL") == "true",
        legacy_tls=env.get("LEGACY_TLS") == "true",
        error_503_page_url=env.get("ERROR_503_PAGE_URL", ""),
        controller_url=env.get("CONTROLLER_URL", ""),
        controller_key=(env.get("CONTROLLER_KEY") or env.get("AUTH_KEY") or "").split(",")[0],
        external_ip=env.get("EXTERNAL_IP") or "127.0.0.1",
    )


class WorkerProcess:
    """One data-plane process and its pipe."""

    def __init__(self, index: int, router: Router) -> None:
        self.index = index
        self.router = router
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.stopping = False

    async def start(self) -> None:
        from flynn_host.frozen import self_command

        env = dict(os.environ, FLYNN_ROUTER_WORKER=json.dumps(self.router.worker_config))
        self.ready.clear()
        self.proc = await asyncio.create_subprocess_exec(
            *self_command(), "component", "router-worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        for message in self.router.snapshot():
            self.send(message)
        self.task = asyncio.create_task(self._read())

    def send(self, message: dict[str, Any]) -> None:
        if self.proc is None or self.proc.stdin is None or self.proc.stdin.is_closing():
            return
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            op = msg.get("op")
            if op == "ready":
                self.ready.set()
            elif op == "drained":
                self.router.worker_drained(self, str(msg.get("addr")))
            elif op == "error":
                log.warning("worker %d: %s", self.index, msg.get("message"))
        code = await self.proc.wait()
        self.router.worker_gone(self)
        if not self.stopping:
            log.error("worker %d exited with %s; starting it again", self.index, code)
            await asyncio.sleep(WORKER_RESTART_DELAY)
            if not self.stopping:
                await self.start()

    async def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # EOF: finish what is in flight, then exit
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


class Router:
    """The router's state (routes, each service's backends, drains in progress) and its
    workers; every change is sent to each worker and published on the events stream."""

    def __init__(self, settings: Settings, worker_config: dict[str, Any]) -> None:
        self.settings = settings
        self.worker_config = worker_config
        self.routes: dict[str, Route] = {}
        self.backends: dict[str, tuple[list[Backend], str | None]] = {}
        self.hub = EventHub()
        self.workers = [WorkerProcess(i, self) for i in range(settings.workers)]
        # addr → (workers still carrying requests to it, the backend, its service, since)
        self.draining: dict[str, tuple[set[int], Backend, str, float]] = {}
        self.backend_source: BackendSource | None = None

    # --- state for a (re)started worker --------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"op": "routes", "routes": [r.to_json() for r in self.routes.values()]}
        ]
        for service, (backends, leader) in self.backends.items():
            out.append(self._backends_message(service, backends, leader))
        return out

    @staticmethod
    def _backends_message(service: str, backends: list[Backend], leader: str | None) -> Any:
        return {
            "op": "backends",
            "service": service,
            "backends": [b.to_json() for b in backends],
            "leader": leader,
        }

    def _broadcast(self, message: dict[str, Any]) -> None:
        for w in self.workers:
            w.send(message)

    # --- routes (from the controller) -----------------------------------------------------

    def _follow_services(self) -> None:
        services = {r.service for r in self.routes.values()}
        for gone in set(self.backends) - services:
            del self.backends[gone]
        if self.backend_source is not None:
            self.backend_source.follow(services)

    def on_routes(self, routes: list[Route]) -> None:
        new = {r.id: r for r in routes}
        for rid, old in self.routes.items():
            if rid not in new:
                self.hub.publish(StreamEvent(REMOVE, route=old))
        for rid, route in new.items():
            if self.routes.get(rid) != route:
                self.hub.publish(StreamEvent(SET, route=route))
        self.routes = new
        self._broadcast({"op": "routes", "routes": [r.to_json() for r in routes]})
        self._follow_services()

    def on_set(self, route: Route) -> None:
        self.routes[route.id] = route
        self._broadcast({"op": "set", "route": route.to_json()})
        self.hub.publish(StreamEvent(SET, route=route))
        self._follow_services()

    def on_remove(self, route: Route) -> None:
        old = self.routes.pop(route.id, None)
        if old is None:
            return
        self._broadcast({"op": "remove", "id": route.id})
        self.hub.publish(StreamEvent(REMOVE, route=old))
        self._follow_services()

    # --- backends (from discoverd) --------------------------------------------------------

    def on_backends(self, service: str, backends: list[Backend], leader: str | None) -> None:
        self.backends[service] = (backends, leader)
        self._broadcast(self._backends_message(service, backends, leader))

    def on_up(self, service: str, backend: Backend) -> None:
        self.draining.pop(backend.addr, None)
        self.hub.publish(StreamEvent(BACKEND_UP, backend=backend, service=service))

    def on_down(self, service: str, backend: Backend) -> None:
        self.hub.publish(StreamEvent(BACKEND_DOWN, backend=backend, service=service))
        now = time.monotonic()
        for addr, (_, _, _, since) in list(self.draining.items()):
            if now - since > DRAIN_GIVE_UP:
                del self.draining[addr]
        live = {w.index for w in self.workers if w.proc is not None and w.proc.returncode is None}
        # on_backends follows at once and sends the workers the list without it; each
        # worker answers `drained` when nothing it carries goes there any more
        self.draining[backend.addr] = (live, backend, service, now)

    def worker_drained(self, worker: WorkerProcess, addr: str) -> None:
        entry = self.draining.get(addr)
        if entry is None:
            return
        entry[0].discard(worker.index)
        if not entry[0]:
            del self.draining[addr]
            self.hub.publish(StreamEvent(BACKEND_DRAINED, backend=entry[1], service=entry[2]))

    def worker_gone(self, worker: WorkerProcess) -> None:
        for addr in list(self.draining):
            self.worker_drained(worker, addr)

    def state(self) -> dict[str, Any]:
        return {
            "routes": [r.to_json() for r in self.routes.values()],
            "backends": {
                s: {"backends": [b.to_json() for b in bs], "leader": leader}
                for s, (bs, leader) in self.backends.items()
            },
            "workers": [
                {"index": w.index, "pid": w.proc.pid if w.proc else None, "ready": w.ready.is_set()}
                for w in self.workers
            ],
            "draining": sorted(self.draining),
            "settings": {
                k: v
                for k, v in asdict(self.settings).items()
                if k not in ("tls_key", "cookie_key", "controller_key", "tls_cert")
            },
        }


def controller_url_finder(discoverd: Any, settings: Settings) -> Any:
    async def url() -> str:
        if settings.controller_url:
            return settings.controller_url
        instances = await discoverd.instances("controller")
        if not instances:
            raise ConnectionError("no controller registered in discoverd")
        return f"http://{random.choice(instances).addr}"

    return url


async def fetch_error_page(url: str) -> str | None:
    if not url:
        return None
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.get(url) as resp,
        ):
            body = await resp.content.read(MAX_ERROR_PAGE + 1)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("ERROR_503_PAGE_URL %s: %s; using the plain 503", url, exc)
        return None
    if resp.status != 200 or len(body) > MAX_ERROR_PAGE:
        log.warning("ERROR_503_PAGE_URL %s: status %d, %d bytes; using the plain 503", url,
                    resp.status, len(body))  # fmt: skip
        return None
    return body.decode("utf-8", "replace")


async def run(settings: Settings) -> int:
    from flynn_discoverd.client import Client

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not settings.controller_key:
        print("router: CONTROLLER_KEY (or AUTH_KEY) must be set", file=sys.stderr)
        return 2
    router = Router(settings, settings.worker_config(await fetch_error_page(
        settings.error_503_page_url)))  # fmt: skip
    discoverd = Client()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(discoverd.close)
        runner = web.AppRunner(make_app(router.hub, router.state), shutdown_timeout=1.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, settings.ip, settings.api_port).start()
        for w in router.workers:
            stack.push_async_callback(w.stop)
            await w.start()
        router.backend_source = BackendSource(
            discoverd, router.on_backends, router.on_up, router.on_down
        )
        stack.push_async_callback(router.backend_source.close)
        source = RouteSource(
            controller_url_finder(discoverd, settings),
            settings.controller_key,
            router.on_routes,
            router.on_set,
            router.on_remove,
        )
        following = asyncio.create_task(source.run())
        stack.callback(following.cancel)
        await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in router.workers)), 30)
        print(
            f"router: {settings.workers} worker(s) on http {settings.http_ports}"
            f" https {router.worker_config['https_ports']}, API on :{settings.api_port}",
            flush=True,
        )
        register = asyncio.create_task(_register(discoverd, settings, stop))
        stack.callback(register.cancel)
        await stop.wait()
        log.info("stopping: deregistering, then letting the workers finish their requests")
    return 0


async def _register(discoverd: Any, settings: Settings, stop: asyncio.Event) -> None:
    """Register `router-api` and `router-http`, retrying until discoverd takes them (the
    registrations are heartbeated by the client until it closes)."""
    wanted = {
        "router-api": f"{settings.external_ip}:{settings.api_port}",
        "router-http": f"{settings.external_ip}:{settings.http_ports[0]}",
    }
    while wanted and not stop.is_set():
        for service, addr in list(wanted.items()):
            try:
                await discoverd.add_service_and_register(service, addr)
                del wanted[service]
            except Exception as exc:  # noqa: BLE001 - discoverd not there yet
                log.info("registering %s in discoverd: %s; retrying", service, exc)
        if wanted:
            await asyncio.sleep(2)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        settings = settings_from(argv, dict(os.environ))
    except OSError as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        return uvloop.run(run(settings))
    except KeyboardInterrupt:
        return 0
