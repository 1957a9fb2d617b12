"""The router as a whole (`flynn-host component router`: its workers, the controller's routes
and discoverd's backends) against a real controller on a real PostgreSQL, a real discoverd on a
real etcd, and backends that are local HTTP and TCP servers registered in discoverd.

Instances are registered with a TTL of an hour (the store's), so the tests add and remove
them with single calls instead of heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flynn_host.dev.controller import ControllerProcess, controller_process, pg_server
from flynn_host.dev.host import etcd_member, free_ports, require_programs

DOMAIN = "dev.localflynn.test"  # the controller fixture's DEFAULT_ROUTE_DOMAIN
WAIT = 1.0  # a route change must take effect within a second


# --- discoverd, in a thread of its own ---------------------------------------------------------


class Discoverd:
    """discoverd's API for a fresh key prefix of an etcd member, served on loopback by a thread
    running its own event loop."""

    def __init__(self, etcd_url: str) -> None:
        from flynn_discoverd.etcd import EtcdClient
        from flynn_discoverd.server import serve
        from flynn_discoverd.store import Store

        (self.port,) = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def start() -> None:
            self.store = Store(EtcdClient([etcd_url]), prefix=f"/r-{uuid.uuid4().hex[:8]}",
                               ttl=3600)  # fmt: skip
            self.runner = await serve(self.store, "127.0.0.1", self.port)
            started.set()

        self.thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self.thread.start()
        if not started.wait(30):
            raise RuntimeError("discoverd did not start")

    def _run(self, start: Callable[[], Any]) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            await self.runner.cleanup()
            await self.store.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return json.loads(raw) if raw.strip() else None

    def register(self, service: str, addr: str, job_id: str = "") -> str:
        from flynn_discoverd.types import instance_id

        with contextlib.suppress(urllib.error.HTTPError):
            self.call("PUT", f"/services/{service}", {"leader_type": "oldest"})
        iid = instance_id("tcp", addr)
        meta = {"FLYNN_JOB_ID": job_id or f"host-{uuid.uuid4()}", "FLYNN_APP_ID": "test"}
        self.call("PUT", f"/services/{service}/instances/{iid}",
                  {"addr": addr, "proto": "tcp", "meta": meta})  # fmt: skip
        return iid

    def deregister(self, service: str, addr: str) -> None:
        from flynn_discoverd.types import instance_id

        self.call("DELETE", f"/services/{service}/instances/{instance_id('tcp', addr)}")


# --- backends ----------------------------------------------------------------------------------


class _Served:
    """A loopback server run by a daemon thread: `addr`, and `close()`."""

    def _serve(self, server: socketserver.ThreadingTCPServer) -> None:
        self.server = server
        server.daemon_threads = True
        self.addr = f"127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Backend(_Served):
    """An HTTP server on 127.0.0.1 answering `GET /` with its name; `GET /slow?s=N` answers
    after N seconds."""

    def __init__(self, name: str) -> None:
        self.name = name

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.startswith("/slow"):
                    time.sleep(float(self.path.split("s=")[1]))
                body = json.dumps({"backend": name, "headers": dict(self.headers)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler))


class EchoServer(_Served):
    """A TCP server on 127.0.0.1 that sends back what it receives, prefixed with its name."""

    def __init__(self, name: str) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while data := self.request.recv(65536):
                    self.request.sendall(name.encode() + b":" + data)

        self._serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler))


# --- the router --------------------------------------------------------------------------------


class Router:
    def __init__(self, ctl_url: str, key: str, discoverd_url: str, workers: int = 2) -> None:
        self.http_port, self.https_port, self.api_port = free_ports(3)
        self.tmp = Path(tempfile.mkdtemp(prefix="flynn-router-test-"))
        self.log = self.tmp / "router.log"
        env = {
            **os.environ,
            "CONTROLLER_URL": ctl_url,
            "CONTROLLER_KEY": key,
            "DISCOVERD": discoverd_url,
            "LISTEN_IP": "127.0.0.1",
            "EXTERNAL_IP": "127.0.0.1",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flynn_host.cli.main", "component", "router",
             "--http-port", str(self.http_port), "--https-port", str(self.https_port),
             "--api-port", str(self.api_port), "--workers", str(workers),
             "--tcp-ip", "127.0.0.1"],
            env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while b"worker(s) on http" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"router did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def get(self, host: str, path: str = "/", timeout: float = 5) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                     headers={"Host": host})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def state(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.api_port}/debug/state"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its workers, should any be left
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    require_programs("etcd")
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(pg_server())
        ctl: ControllerProcess = stack.enter_context(controller_process(pg))
        etcd = stack.enter_context(etcd_member("router-etcd-"))
        disc = Discoverd(etcd.client_url)
        stack.callback(disc.close)
        yield {"pg": pg, "controller": ctl, "discoverd": disc, "stack": stack}


@pytest.fixture
def backends() -> Iterator[Callable[[str], Backend]]:
    made: list[Any] = []

    def make(name: str) -> Backend:
        made.append(Backend(name))
        return made[-1]

    yield make
    for b in made:
        b.close()


def ctl_call(ctl: ControllerProcess, method: str, path: str, body: Any = None) -> Any:
    import base64

    auth = base64.b64encode(f":{ctl.key}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(ctl.url + path, data=data, method=method,
                                 headers={"Authorization": f"Basic {auth}",
                                          "Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
        return json.loads(raw) if raw.strip() else None


def new_app(ctl: ControllerProcess) -> dict[str, Any]:
    return dict(ctl_call(ctl, "POST", "/apps", {"name": f"r{uuid.uuid4().hex[:8]}"}))


# --- tests -------------------------------------------------------------------------------------


def test_a_router_started_after_its_routes_serves_them_and_follows_changes_within_a_second(
    world: dict[str, Any], backends: Callable[[str], Backend]
) -> None:
    ctl, disc = world["controller"], world["discoverd"]
    app = new_app(ctl)  # with its default route <name>.<domain> → <name>-web
    web = backends("web-1")
    disc.register(f"{app['name']}-web", web.addr)
    router = Router(ctl.url, ctl.key, disc.url)
    try:
        host = f"{app['name']}.{DOMAIN}"
        wait_for(lambda: router.get(host)[0] == 200, 10, "the default route serves")
        assert json.loads(router.get(host)[1])["backend"] == "web-1"

        # a new route, then its removal, take effect within a second
        other = f"other-{app['name']}.test"
        assert router.get(other)[0] == 404
        body = {"type": "http", "service": f"{app['name']}-web", "domain": other}
        route = ctl_call(ctl, "POST", f"/apps/{app['id']}/routes", body)
        took = wait_for(lambda: router.get(other)[0] == 200, WAIT, "the new route serves")
        print(f"route added → served in {took * 1000:.0f} ms")
        ctl_call(ctl, "DELETE", f"/apps/{app['id']}/routes/http/{route['id']}")
        took = wait_for(lambda: router.get(other)[0] == 404, WAIT, "the removed route 404s")
        print(f"route removed → 404 in {took * 1000:.0f} ms")

        # backends come and go with discoverd
        web2 = backends("web-2")
        disc.register(f"{app['name']}-web", web2.addr)

        def both() -> bool:
            seen = {json.loads(router.get(host)[1])["backend"] for _ in range(6)}
            return seen == {"web-1", "web-2"}

        wait_for(both, 5, "both backends serve")
        disc.deregister(f"{app['name']}-web", web.addr)
        disc.deregister(f"{app['name']}-web", web2.addr)
        wait_for(lambda: router.get(host)[0] == 503, 5, "no backend: 503")
    finally:
        router.close()


def test_a_tcp_route_pipes_to_its_service_and_goes_when_removed(
    world: dict[str, Any],
) -> None:
    ctl, disc = world["controller"], world["discoverd"]
    app = new_app(ctl)
    echo = EchoServer("echo-1")
    router = Router(ctl.url, ctl.key, disc.url, workers=1)
    try:
        disc.register(f"{app['name']}-tcp", echo.addr)
        route = ctl_call(ctl, "POST", f"/apps/{app['id']}/routes",
                         {"type": "tcp", "service": f"{app['name']}-tcp"})  # fmt: skip
        port = route["port"]
        assert 3000 <= port <= 3500

        def echoes() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(b"hello")
                    s.shutdown(socket.SHUT_WR)  # half-close: the answer still comes back
                    got = b""
                    while data := s.recv(100):
                        got += data
                    return got == b"echo-1:hello"
            except OSError:
                return False

        wait_for(echoes, 5, "the TCP route echoes through the router")
        ctl_call(ctl, "DELETE", f"/apps/{app['id']}/routes/tcp/{route['id']}")

        def closed() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return False
            except OSError:
                return True

        wait_for(closed, WAIT, "the removed TCP route's port is closed")
    finally:
        router.close()
        echo.close()


def test_a_backend_of_a_drain_route_is_reported_drained_after_its_last_request(
    world: dict[str, Any], backends: Callable[[str], Backend]
) -> None:
    from flynn_router.client import events

    ctl, disc = world["controller"], world["discoverd"]
    app = new_app(ctl)
    svc = f"{app['name']}-drain"
    domain = f"drain-{app['name']}.test"
    body = {"type": "http", "service": svc, "domain": domain, "drain_backends": True}
    ctl_call(ctl, "POST", f"/apps/{app['id']}/routes", body)
    web = backends("slow-1")
    job_id = f"host1-{uuid.uuid4()}"
    disc.register(svc, web.addr, job_id=job_id)
    router = Router(ctl.url, ctl.key, disc.url)
    try:
        wait_for(lambda: router.get(domain)[0] == 200, 10, "the drain route serves")
        seen: list[tuple[float, str]] = []

        async def watch() -> None:
            async for ev in events(f"http://127.0.0.1:{router.api_port}",
                                   types=("backend-down", "backend-drained")):  # fmt: skip
                if ev.get("job_id") == job_id:
                    seen.append((time.monotonic(), ev["event"]))
                    if ev["event"] == "backend-drained":
                        return

        watcher = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(watch(), 30)))
        watcher.start()
        time.sleep(0.3)  # the event stream is open
        slow: dict[str, Any] = {}
        req = threading.Thread(target=lambda: slow.update(r=router.get(domain, "/slow?s=2")))
        req.start()
        time.sleep(0.5)  # the slow request is in flight
        down_at = time.monotonic()
        disc.deregister(svc, web.addr)
        req.join(10)
        done_at = time.monotonic()
        watcher.join(35)
        assert slow["r"][0] == 200, "the request in flight completes"
        kinds = [k for _, k in seen]
        assert kinds == ["backend-down", "backend-drained"], seen
        assert seen[0][0] - down_at < 1.0, "backend-down comes at once"
        assert seen[1][0] >= done_at - 0.2, "backend-drained only once the request completed"
    finally:
        router.close()


def test_the_router_serves_its_last_routes_while_the_controller_is_away_and_catches_up(
    world: dict[str, Any], backends: Callable[[str], Backend]
) -> None:
    ctl, disc, pg = world["controller"], world["discoverd"], world["pg"]
    app = new_app(ctl)
    web = backends("web-away")
    disc.register(f"{app['name']}-web", web.addr)
    # a controller of its own on the same database, stopped and started again on its port
    port = free_ports(1)[0]
    env = {"PORT": str(port)}
    with contextlib.ExitStack() as stack:
        own = stack.enter_context(controller_process(pg, env=env))
        router = Router(own.url, own.key, disc.url)
        stack.callback(router.close)
        host = f"{app['name']}.{DOMAIN}"
        wait_for(lambda: router.get(host)[0] == 200, 10, "served")
        own.proc.send_signal(signal.SIGTERM)
        own.proc.wait(15)
        for _ in range(10):
            assert router.get(host)[0] == 200, "the last routes are served without a controller"
            time.sleep(0.1)
        # a route made while this router's controller is away (through the other one)
        late = f"late-{app['name']}.test"
        ctl_call(ctl, "POST", f"/apps/{app['id']}/routes",
                 {"type": "http", "service": f"{app['name']}-web", "domain": late})  # fmt: skip
        assert router.get(late)[0] == 404
        stack.enter_context(controller_process(pg, env=env))
        took = wait_for(lambda: router.get(late)[0] == 200, 15, "caught up with the controller")
        print(f"caught up {took:.1f} s after the controller was started again")


def test_following_routes_outlives_discoverd_errors(world: dict[str, Any]) -> None:
    """A router on a host that rejoins finds the controller through its host's discoverd,
    which may answer errors while its member catches up: the router keeps trying."""
    from flynn_discoverd.client import DiscoverdError
    from flynn_router.follow import RouteSource

    ctl = world["controller"]
    app = new_app(ctl)
    calls = 0

    async def url() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise DiscoverdError("unavailable", "etcd member is not ready", 503)
        if calls == 2:
            raise RuntimeError("anything else")
        return str(ctl.url)

    listed: list[list[Any]] = []

    async def follow() -> None:
        source = RouteSource(url, ctl.key, listed.append, lambda r: None, lambda r: None)
        task = asyncio.create_task(source.run())
        try:
            await asyncio.wait_for(source.synced.wait(), 30)
        finally:
            task.cancel()

    asyncio.run(follow())
    assert calls == 3
    assert f"{app['name']}.{DOMAIN}" in {r.domain for r in listed[-1]}
