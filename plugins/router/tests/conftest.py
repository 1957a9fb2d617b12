"""Fixtures for the router's data plane: real worker processes (`flynn-host component
router-worker`) on free loopback ports, driven over stdin as the supervisor drives them;
backends served on other loopback addresses (127.0.0.x) by aiohttp or by raw asyncio servers
for behaviour no framework would show (dying mid-response, closing a kept-alive connection);
certificates made on the fly. Every process is killed and every server closed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from flynn_host.dev.certs import self_signed
from flynn_host.dev.host import free_ports

WORKER_COMMAND = [sys.executable, "-m", "flynn_host.cli.main", "component", "router-worker"]


def http_route(domain: str, service: str, path: str = "/", **extra: Any) -> dict[str, Any]:
    """An HTTP route in the controller's JSON."""
    return {
        "type": "http",
        "id": extra.pop("id", None) or str(uuid.uuid4()),
        "service": service,
        "domain": domain,
        "path": path,
        **extra,
    }


class Worker:
    """A running router worker and the supervisor's end of its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process, settings: dict[str, Any]) -> None:
        self.proc = proc
        self.settings = settings
        self.http_port: int = settings["http_ports"][0] if settings["http_ports"] else 0
        self.https_port: int = settings["https_ports"][0] if settings["https_ports"] else 0
        self.messages: list[dict[str, Any]] = []  # everything the worker said, in order
        self._new = asyncio.Condition()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self._pings = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            async for line in self.proc.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                async with self._new:
                    self.messages.append(msg)
                    self._new.notify_all()
        finally:
            await self.proc.wait()
            async with self._new:
                self._new.notify_all()  # waiters see the end

    async def send(self, **msg: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        await self.proc.stdin.drain()

    async def wait_for(
        self, op: str, within: float = 5.0, start: int = 0, **match: Any
    ) -> dict[str, Any]:
        """The first message `op` (with the given fields) from index `start` on."""

        def found() -> dict[str, Any] | None:
            for msg in self.messages[start:]:
                if msg.get("op") == op and all(msg.get(k) == v for k, v in match.items()):
                    return msg
            return None

        async with asyncio.timeout(within), self._new:
            while (msg := found()) is None:
                if self.proc.returncode is not None:
                    raise AssertionError(f"worker exited before {op!r}: {self.proc.returncode}")
                await self._new.wait()
        return msg

    async def sync(self) -> None:
        """Return once the worker has handled everything sent before."""
        self._pings += 1
        await self.send(op="ping", id=self._pings)
        await self.wait_for("pong", id=self._pings)

    async def routes(self, *routes: dict[str, Any]) -> None:
        await self.send(op="routes", routes=list(routes))
        await self.sync()

    async def backends(self, service: str, *addrs: str, leader: str | None = None) -> None:
        await self.send(
            op="backends",
            service=service,
            backends=[{"addr": a, "job_id": f"job-{a}", "app_id": "app"} for a in addrs],
            leader=leader,
        )
        await self.sync()

    def memory_kb(self, field: str = "VmRSS") -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"no {field} for {self.pid}")

    def alive(self) -> bool:
        return self.proc.returncode is None

    async def stop(self, sig: int | None = None, within: float = 15.0) -> int:
        """Stop as the supervisor would (close stdin, or send `sig`); the exit status."""
        if self.proc.returncode is None:
            if sig is None:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            else:
                self.proc.send_signal(sig)
        try:
            async with asyncio.timeout(within):
                return await self.proc.wait()
        finally:
            await self.kill()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@pytest.fixture
async def start_worker() -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    """Factory: `await start_worker(**settings)` starts a worker on free loopback ports (or
    the `http_ports`/`https_ports` given) and waits for it to be ready."""
    started: list[Worker] = []

    async def start(**settings: Any) -> Worker:
        settings.setdefault("ip", "127.0.0.1")
        settings.setdefault("tcp_ip", "127.0.0.1")
        if "http_ports" not in settings:
            settings["http_ports"] = free_ports(1)
        if "https_ports" not in settings:
            settings["https_ports"] = free_ports(1) if settings.get("tls_cert") else []
        env = dict(os.environ, FLYNN_ROUTER_WORKER=json.dumps(settings))
        env.pop("DEBUG", None)
        proc = await asyncio.create_subprocess_exec(
            *WORKER_COMMAND,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        worker = Worker(proc, settings)
        started.append(worker)
        await worker.wait_for("ready", within=15)
        return worker

    yield start
    for worker in started:
        await worker.kill()


@pytest.fixture
async def worker(start_worker: Callable[..., Awaitable[Worker]]) -> Worker:
    return await start_worker()


# --- backends ---------------------------------------------------------------------------


class Servers:
    """Backends started by a test: aiohttp apps and raw asyncio servers."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.raw: list[asyncio.Server] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    async def app(self, app: web.Application, host: str = "127.0.0.2") -> str:
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1
        )
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        self.runners.append(runner)
        port = runner.addresses[0][1]
        return f"{host}:{port}"

    async def named(self, name: str, host: str = "127.0.0.2") -> str:
        """A backend answering every request with JSON: its name, the request's method,
        path, headers, body size and the client port (which connection it came on)."""

        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            peer = request.transport.get_extra_info("peername") if request.transport else None
            return web.json_response(
                {
                    "name": name,
                    "method": request.method,
                    "path": request.path_qs,
                    "headers": dict(request.headers),
                    "header_list": list(request.headers.items()),
                    "size": len(body),
                    "peer_port": peer[1] if peer else None,
                }
            )

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", handle)
        return await self.app(app, host)

    async def raw_server(
        self,
        handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        host: str = "127.0.0.2",
    ) -> str:
        async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)
            try:
                await handle(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self.tasks.discard(task)
                writer.close()

        server = await asyncio.start_server(wrapped, host, 0)
        self.raw.append(server)
        return f"{host}:{server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        for server in self.raw:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        for runner in self.runners:
            await runner.cleanup()


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    s = Servers()
    yield s
    await s.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def closed_port_addr(host: str = "127.0.0.3") -> str:
    """An address nothing listens on (connections are refused)."""
    (port,) = free_ports(1)
    return f"{host}:{port}"


async def read_response(
    reader: asyncio.StreamReader, head: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a raw connection (Content-Length, chunked, or to EOF;
    none if it answers a HEAD request)."""
    block = await reader.readuntil(b"\r\n\r\n")
    lines = block.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if head or status < 200 or status in (204, 304):
        return status, headers, b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            parts.append(await reader.readexactly(size))
            await reader.readline()
        body = b"".join(parts)
    else:
        body = await reader.read()
    return status, headers, body


class MemoryWatch:
    """Samples a process's resident memory while a test runs: `peak_growth_kb()` is the
    highest RSS seen minus the RSS at the start."""

    def __init__(self, worker: Worker, interval: float = 0.02) -> None:
        self.worker = worker
        self.interval = interval
        self.start_kb = worker.memory_kb()
        self.peak_kb = self.start_kb
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError, AssertionError):
                self.peak_kb = max(self.peak_kb, self.worker.memory_kb())
            await asyncio.sleep(self.interval)

    async def stop(self) -> int:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(OSError, AssertionError):
            self.peak_kb = max(self.peak_kb, self.worker.memory_kb())
        return self.peak_kb - self.start_kb


# --- certificates -----------------------------------------------------------------------


def make_cert(*names: str) -> tuple[str, str]:
    """A self-signed certificate for `names` (the first is the CN), PEM text and its key."""
    return self_signed(*names)


# --- the helpers above, for tests (fixtures: conftest modules are not importable by name) --


@pytest.fixture
def make_route() -> Callable[..., dict[str, Any]]:
    return http_route


@pytest.fixture
def make_cert_pair() -> Callable[..., tuple[str, str]]:
    return make_cert


@pytest.fixture
def closed_addr() -> Callable[..., str]:
    return closed_port_addr


@pytest.fixture
def memory_watch() -> Callable[[Worker], MemoryWatch]:
    return MemoryWatch


class RawClient:
    """A raw TCP (or TLS) connection to a worker, for bytes no HTTP client would send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(
        self, within: float = 10.0, head: bool = False
    ) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(within):
            return await read_response(self.reader, head)

    async def closed(self, within: float = 10.0) -> bool:
        """Whether the worker closes the connection (EOF or reset) within `within` s,
        dropping whatever else arrives."""
        try:
            async with asyncio.timeout(within):
                while await self.reader.read(65536):
                    pass
        except ConnectionError:
            return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def raw_client() -> AsyncIterator[Callable[..., Awaitable[RawClient]]]:
    """Factory: `await raw_client(port, ssl=None, server_hostname=None)`."""
    clients: list[RawClient] = []

    async def connect(port: int, host: str = "127.0.0.1", **kw: Any) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20, **kw)
        client = RawClient(reader, writer)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()
