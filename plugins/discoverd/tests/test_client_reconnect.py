"""The discoverd client's watch against the real server (discoverd's API over a real etcd
member; `test_client.py` has the same behaviour against a test double): when its connection
is cut, by a restart of the server or by the network, it reconnects, reports what it missed,
each change once, and goes on with live events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from flynn_discoverd.client import Client
from flynn_discoverd.server import serve
from flynn_discoverd.store import Store
from flynn_discoverd.types import Event, Instance, ServiceConfig, ServiceMeta

from flynn_host.dev.host import free_port, wait_for_async

WITHIN = 30.0  # a deadline for what takes well under a second on an idle machine


def inst(port: int, **meta: str) -> Instance:
    return Instance(addr=f"10.0.0.1:{port}", meta=dict(meta))


def kinds(events: list[Event]) -> list[tuple[str, str | None]]:
    return [(e.kind, e.instance.addr if e.instance else None) for e in events]


async def take(it: AsyncIterator[Event], n: int) -> list[Event]:
    async with asyncio.timeout(WITHIN):
        return [await anext(it) for _ in range(n)]


class Server:
    """discoverd's API for a store on one loopback port, which can be stopped and started
    again on the same port."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.runner = await serve(self.store, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()  # open event streams are closed too
            self.runner = None


@pytest.fixture
async def server(make_store) -> AsyncIterator[Server]:  # type: ignore[no-untyped-def]
    s = Server(make_store(ttl=10))
    await s.start()
    yield s
    await s.stop()


class CuttableProxy:
    """A TCP proxy on loopback in front of `upstream_port`: `cut()` resets every connection through
    it and refuses new ones (closing them at once) until `mend()`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refusing = False
        self.accepted = 0
        self.open: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        self.accepted += 1
        self.open.add(writer)  # a cut from now on resets it, even before it is joined up
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            self.open.discard(writer)
            writer.close()
            return
        self.open.add(up_writer)
        if writer.transport.is_closing():  # cut meanwhile
            up_writer.transport.abort()
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self.open.discard(w)
                w.close()

    def cut(self) -> None:
        self.refusing = True
        for w in list(self.open):
            w.transport.abort()  # a reset, as a lost network path ends up

    def mend(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


@pytest.fixture
async def proxy(server: Server) -> AsyncIterator[CuttableProxy]:
    p = CuttableProxy(server.port)
    await p.start()
    yield p
    await p.close()


async def test_watch_catches_up_after_the_server_restarts(server: Server) -> None:
    store = server.store
    await store.add_service("web", ServiceConfig())
    a = await store.register("web", inst(1))
    b = await store.register("web", inst(2))
    async with Client([server.url], reconnect_delay=0.05) as client:
        it = client.watch("web")
        assert kinds(await take(it, 4)) == [
            ("up", a.addr), ("up", b.addr), ("leader", a.addr), ("current", None),
        ]  # fmt: skip

        await server.stop()  # the watcher's stream is cut, and it cannot reconnect yet
        # while it is away: a leaves (b leads), c arrives, b's meta changes, meta is set
        await store.deregister("web", a.id)
        c = await store.register("web", inst(3))
        await store.register("web", inst(2, role="x"))
        meta = await store.set_meta("web", ServiceMeta(data={"v": 1}, index=0))
        await server.start()

        missed = await take(it, 5)
        assert sorted(kinds(missed)) == sorted([
            ("down", a.addr), ("leader", b.addr), ("up", c.addr), ("update", b.addr),
            ("service_meta", None),
        ])  # fmt: skip
        update = next(e for e in missed if e.kind == "update")
        assert update.instance is not None and update.instance.meta == {"role": "x"}
        assert next(e for e in missed if e.kind == "service_meta").service_meta == meta
        # nothing more of what was missed (no second `current`): the next event is live
        d = await store.register("web", inst(4))
        assert kinds(await take(it, 1)) == [("up", d.addr)]
        await it.aclose()


async def test_watch_catches_up_after_its_connection_is_cut(
    server: Server, proxy: CuttableProxy
) -> None:
    store = server.store
    await store.add_service("web", ServiceConfig())
    a = await store.register("web", inst(1))
    async with Client([proxy.url], reconnect_delay=0.05) as client:
        it = client.watch("web", kinds=("up", "down", "update", "current"))
        assert kinds(await take(it, 2)) == [("up", a.addr), ("current", None)]
        assert proxy.accepted == 1

        proxy.cut()  # the server runs on; the watcher's TCP connection is reset
        b = await store.register("web", inst(2))
        await store.deregister("web", a.id)
        proxy.mend()

        missed = await take(it, 2)
        assert sorted(kinds(missed)) == sorted([("up", b.addr), ("down", a.addr)])
        assert proxy.accepted >= 2  # it did reconnect
        c = await store.register("web", inst(3))
        assert kinds(await take(it, 1)) == [("up", c.addr)]
        await it.aclose()


async def test_watch_cut_again_and_again_while_instances_come_and_go(
    server: Server, proxy: CuttableProxy
) -> None:
    """Whenever the cuts fall, what the watcher is told adds up: no instance comes up twice or
    goes down unseen, and in the end it knows exactly the instances there are."""
    store = server.store
    await store.add_service("web", ServiceConfig())
    seen: dict[str, Instance] = {}
    wrong: list[str] = []

    async def watch(client: Client) -> None:
        async for ev in client.watch("web", kinds=("up", "down", "update")):
            assert ev.instance is not None
            known = ev.instance.id in seen
            if (ev.kind == "up") == known:
                wrong.append(f"{ev.kind} {ev.instance.addr}, known: {known}")
            if ev.kind == "down":
                seen.pop(ev.instance.id, None)
            else:
                seen[ev.instance.id] = ev.instance

    async with Client([proxy.url], reconnect_delay=0.05) as client:
        watcher = asyncio.create_task(watch(client))
        cuts = 0
        try:
            for port in range(50):
                await store.register("web", inst(port))
                if port % 3 == 2:
                    await store.deregister("web", inst(port - 1).id)
                if port % 4 == 0:
                    cuts += 1
                    connections = proxy.accepted
                    proxy.cut()  # the reset happens now: what follows is missed
                    await store.register("web", inst(port, cut=str(cuts)))  # an update
                    proxy.mend()
                    # what happens while it reconnects and replays may be seen either way
                    await wait_for_async(lambda n=connections: proxy.accepted > n, WITHIN,
                                         "the watcher reconnecting")  # fmt: skip

            async def told_all() -> bool:
                there = {i.id: i.to_json() for i in await store.instances("web")}
                return {k: v.to_json() for k, v in seen.items()} == there

            await wait_for_async(told_all, WITHIN, "the watcher knowing every instance")
            assert wrong == []
            assert proxy.accepted == cuts + 1
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
