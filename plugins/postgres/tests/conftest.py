"""Fixtures for postgres: a real single-member etcd on free loopback ports (discoverd's
`EtcdProcess`), a real discoverd API on such an etcd (`discoverd`), a temporary volume
directory the `postgres` user can reach, and running singleton nodes (etcd, Patroni and
PostgreSQL 15 on loopback), one shared by a test module. All are stopped and removed
afterwards, whatever the tests did."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from flynn_discoverd.etcd import EtcdClient, EtcdProcess
from flynn_discoverd.server import serve
from flynn_discoverd.store import Store
from flynn_discoverd.types import ETCD_CLIENT_PORT_OFFSET, ETCD_PEER_PORT_OFFSET
from postgres_nodes import Node, running_singleton, temporary_volume_root

from flynn_host.dev.host import etcd_member as temporary_etcd_member
from flynn_host.dev.host import free_ports, require_programs


@pytest.fixture
def etcd_member() -> Iterator[EtcdProcess]:
    with temporary_etcd_member("postgres-etcd-") as p:
        yield p


@pytest.fixture
def volume_root() -> Iterator[Path]:
    with temporary_volume_root() as root:
        yield root


@dataclass
class Discoverd:
    """A discoverd node as the component runs it: its API on `url` and its etcd member on the
    API port + 1268, so `GET /raft/peers` leads to `etcd`."""

    url: str
    etcd: EtcdProcess


def make_temp_root(prefix: str) -> Path:
    """A fresh directory traversable by the `postgres` user (tempfile makes 0700 directories,
    and PostgreSQL runs as postgres, not root)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    return root


@pytest.fixture(scope="module")
def discoverd() -> Iterator[Discoverd]:
    """A real etcd member and discoverd's API server (`flynn_discoverd.server.serve`) on it,
    served from a thread of the test process with its own event loop, for a module of tests
    whose nodes run as subprocesses."""
    require_programs("etcd")
    (port,) = free_ports(1, offsets=(ETCD_CLIENT_PORT_OFFSET, ETCD_PEER_PORT_OFFSET))
    tmp = make_temp_root("postgres-discoverd-")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="discoverd", daemon=True)
    runner: web.AppRunner | None = None
    store: Store | None = None

    async def start(etcd: EtcdProcess) -> None:
        nonlocal runner, store
        store = Store(
            EtcdClient([etcd.client_url]), node_name=etcd.name, advertise=f"http://127.0.0.1:{port}"
        )
        await store.start()
        runner = await serve(store, "127.0.0.1", port)

    async def stop() -> None:
        if runner is not None:
            await runner.cleanup()
        if store is not None:
            await store.close()

    etcd = EtcdProcess(
        "m1",
        tmp / "etcd",
        client_port=port + ETCD_CLIENT_PORT_OFFSET,
        peer_port=port + ETCD_PEER_PORT_OFFSET,
    )
    try:
        with etcd:
            thread.start()
            asyncio.run_coroutine_threadsafe(start(etcd), loop).result(timeout=30)
            try:
                yield Discoverd(f"http://127.0.0.1:{port}", etcd)
            finally:
                asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=30)
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        loop.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def singleton_node() -> Iterator[Node]:
    """One singleton node leading its own etcd, for a whole test module, in `available` mode:
    a singleton acknowledges writes alone (in `strict` mode every commit would wait)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (runs postgres as postgres)")
    with (
        temporary_etcd_member("postgres-etcd-") as etcd,
        temporary_volume_root() as root,
        running_singleton(etcd.client_port, root, "pgapi", "available") as node,
    ):
        yield node


@pytest.fixture
def strict_node(singleton_node: Node) -> Iterator[Node]:
    """A second singleton (scope `pgstrict`, the same etcd) in `strict` mode: it leads, but
    with no synchronous standby it acknowledges no commit."""
    with (
        temporary_volume_root() as root,
        running_singleton(singleton_node.etcd_port, root, "pgstrict", "strict") as node,
    ):
        yield node
