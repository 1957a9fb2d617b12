"""Fixtures for flannel: discoverd's own fixtures (a real etcd member, stores, APIs on
loopback), a discoverd client against a fresh API per test, and pairs of throwaway network
namespaces ("hosts") joined by a veth pair in 10.211.0.0/24. Everything is removed afterwards,
even when a test fails."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from flannel_netns import TwoHosts, ip
from flynn_discoverd.client import Client

from flynn_host.networking.links import create_netns, delete_netns

# discoverd's fixtures, loaded from its tests' conftest under a name of their own
_spec = importlib.util.spec_from_file_location(
    "flannel_tests_discoverd_fixtures",
    Path(__file__).parents[2] / "discoverd" / "tests" / "conftest.py",
)
assert _spec is not None and _spec.loader is not None
_discoverd = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _discoverd  # dataclasses look their module up
_spec.loader.exec_module(_discoverd)
etcd_member = _discoverd.etcd_member
make_store = _discoverd.make_store
store = _discoverd.store
make_api = _discoverd.make_api
api = _discoverd.api
Api = _discoverd.Api


@pytest.fixture
async def make_client(api: Api) -> AsyncIterator[object]:
    """Factory: `make_client()` is a discoverd client of this test's API (closed afterwards)."""
    clients: list[Client] = []

    def factory() -> Client:
        c = Client([api.url])
        clients.append(c)
        return c

    yield factory
    for c in clients:
        await c.close()


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    """Network namespaces `tflan<id>a` and `tflan<id>b`, joined by a veth pair holding
    10.211.0.1 and 10.211.0.2 (/24), loopback up. Deleting them removes every device."""
    tag = uuid.uuid4().hex[:6]
    hosts = TwoHosts(f"tflan{tag}a", f"tflan{tag}b")
    try:
        for name in (hosts.a, hosts.b):
            create_netns(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip("link", "add", f"tfl{tag}a", "netns", hosts.a, "type", "veth",
           "peer", "name", f"tfl{tag}b", "netns", hosts.b)  # fmt: skip
        for name, dev, addr in (
            (hosts.a, f"tfl{tag}a", hosts.ip_a),
            (hosts.b, f"tfl{tag}b", hosts.ip_b),
        ):
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", name, "link", "set", dev, "up")
        yield hosts
    finally:
        for name in (hosts.a, hosts.b):
            delete_netns(name)
