"""Fixtures for discoverd: real etcd members on free loopback ports in temporary directories
(one member shared by a module, or a fresh 3-member cluster), stores with a private key prefix
per test, and discoverd APIs served on loopback. Everything is stopped and removed afterwards."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from flynn_discoverd.etcd import EtcdClient, EtcdProcess
from flynn_discoverd.server import serve
from flynn_discoverd.store import Store

from flynn_host.dev.host import etcd_member as temporary_etcd_member
from flynn_host.dev.host import free_ports, require_programs


@pytest.fixture(scope="module")
def etcd_member() -> Iterator[EtcdProcess]:
    with temporary_etcd_member("discoverd-etcd-") as p:
        yield p


@pytest.fixture
async def make_store(etcd_member: EtcdProcess) -> AsyncIterator[object]:
    """Factory: `make_store(ttl=2)`; all stores of a test share one fresh key prefix, as the
    discoverd nodes of one cluster would."""
    prefix = f"/t-{uuid.uuid4().hex[:8]}"
    made: list[Store] = []

    def factory(**kw: object) -> Store:
        store = Store(EtcdClient([etcd_member.client_url]), prefix=prefix, **kw)  # type: ignore[arg-type]
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.close()


@pytest.fixture
async def store(make_store) -> Store:  # type: ignore[no-untyped-def]
    return make_store(ttl=2)


@dataclass
class Api:
    url: str
    http: aiohttp.ClientSession
    store: Store


@pytest.fixture
async def make_api() -> AsyncIterator[object]:
    """Factory: `await make_api(store)` serves discoverd's API for `store` on loopback."""
    runners = []
    http = aiohttp.ClientSession()

    async def factory(store: Store) -> Api:
        (port,) = free_ports(1)
        runners.append(await serve(store, "127.0.0.1", port))
        return Api(f"http://127.0.0.1:{port}", http, store)

    yield factory
    for runner in runners:
        await runner.cleanup()
    await http.close()


@pytest.fixture
async def api(make_api, store: Store) -> Api:  # type: ignore[no-untyped-def]
    return await make_api(store)


@pytest.fixture
def etcd_cluster() -> Iterator[list[EtcdProcess]]:
    """Three etcd members on 127.0.0.1 with distinct ports, as one new cluster."""
    require_programs("etcd")
    ports = free_ports(6)
    token = f"test-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="discoverd-etcd3-") as tmp:
        names = ["n1", "n2", "n3"]
        peers = {n: f"http://127.0.0.1:{ports[2 * i + 1]}" for i, n in enumerate(names)}
        members = [
            EtcdProcess(
                n,
                Path(tmp) / n,
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                initial_cluster=peers,
                cluster_token=token,
            )
            for i, n in enumerate(names)
        ]
        try:
            for m in members:
                m.start()
            for m in members:
                m.wait_healthy()
            yield members
        finally:
            for m in members:
                m.stop()
