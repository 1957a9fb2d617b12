"""Leases in a real discoverd (etcd + API on loopback): the config is written once, hosts get
distinct subnets, a host keeps its subnet, and concurrent leasing never collides."""

from __future__ import annotations

import asyncio
import ipaddress

from flynn_flannel.leases import acquire_lease, ensure_config, read_state, release_lease
from flynn_flannel.types import SERVICE, NetworkConfig

from flynn_host.dev.host import wait_for_async

MAC_A = "aa:aa:aa:00:00:01"


def net(s: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(s)


async def test_config_is_written_once(make_client) -> None:  # type: ignore[no-untyped-def]
    first, second = make_client(), make_client()
    assert await ensure_config(first, NetworkConfig.make()) == NetworkConfig.make()
    # a second writer with another network gets the stored one
    assert await ensure_config(second, NetworkConfig.make("10.5.0.0/16")) == NetworkConfig.make()
    meta = await first.get_meta(SERVICE)
    assert meta.data == {"config": NetworkConfig.make().to_json(), "subnets": {}}


async def test_two_hosts_get_distinct_subnets_and_keep_them(make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    await ensure_config(c, NetworkConfig.make())
    a = await acquire_lease(c, "10.0.0.1", 5002, "vxlan", {"VtepMAC": MAC_A})
    b = await acquire_lease(c, "10.0.0.2", 5002, "vxlan", {"VtepMAC": "bb:00:00:00:00:02"})
    assert (a.lease.subnet, a.new) == (net("100.100.1.0/24"), True)  # 100.100.0.0/24 skipped
    assert (b.lease.subnet, b.new) == (net("100.100.2.0/24"), True)
    # host A restarts with a new device: same subnet, new MAC stored
    again = await acquire_lease(c, "10.0.0.1", 5003, "vxlan", {"VtepMAC": "aa:aa:aa:00:00:09"})
    assert (again.lease.subnet, again.new) == (net("100.100.1.0/24"), False)
    meta = await c.get_meta(SERVICE)
    stored = meta.data["subnets"]["100.100.1.0-24"]
    assert stored["PublicIP"] == "10.0.0.1" and stored["HTTPPort"] == 5003
    assert stored["BackendType"] == "vxlan"
    assert stored["BackendData"] == {"VtepMAC": "aa:aa:aa:00:00:09"}
    assert set(meta.data["subnets"]) == {"100.100.1.0-24", "100.100.2.0-24"}
    # released, the subnet is the lowest free one again
    assert await release_lease(c, "10.0.0.1")
    assert not await release_lease(c, "10.0.0.1")
    c2 = await acquire_lease(c, "10.0.0.3", 5002, "alloc", {})
    assert c2.lease.subnet == net("100.100.1.0/24")


async def test_concurrent_leases_never_collide(make_client) -> None:  # type: ignore[no-untyped-def]
    await ensure_config(make_client(), NetworkConfig.make())
    ips = [f"10.0.1.{i}" for i in range(1, 13)]
    results = await asyncio.gather(
        *(acquire_lease(make_client(), ip, 5002, "vxlan", {"VtepMAC": MAC_A}) for ip in ips)
    )
    subnets = [r.lease.subnet for r in results]
    assert len(set(subnets)) == len(ips)
    assert sorted(subnets) == [net(f"100.100.{i}.0/24") for i in range(1, 13)]
    state, _ = await read_state(make_client())
    assert {lease.public_ip for lease in state.leases.values()} == set(ips)


async def test_network_override_and_expired_leases(make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    await ensure_config(c, NetworkConfig.make("10.250.0.0/16", "alloc"))
    a = await acquire_lease(c, "10.0.0.1", 5002, "alloc", {}, ttl=0.2)
    assert a.lease.subnet == net("10.250.1.0/24")
    await asyncio.sleep(1.1)  # stored to the second: past the expiry
    b = await acquire_lease(c, "10.0.0.2", 5002, "alloc", {})
    assert b.lease.subnet == net("10.250.1.0/24")  # an expired lease is free again
    # the host that let its lease expire gets a new one
    a2 = await acquire_lease(c, "10.0.0.1", 5002, "alloc", {})
    assert (a2.lease.subnet, a2.new) == (net("10.250.2.0/24"), True)


async def test_component_renews_and_re_leases(make_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The component's renew and watch loops (alloc backend: no device; 127.0.0.1 on lo is
    the underlay): a lease with a 2 s TTL is renewed a second before it expires, and one that
    disappears from discoverd is taken again at once."""
    from flynn_flannel.service import Flannel, parse_args

    c = make_client()
    config = await ensure_config(c, NetworkConfig.make(backend="alloc"))
    args = parse_args(["--iface", "127.0.0.1", "--subnet-file", str(tmp_path / "subnet.env"),
                       "--lease-ttl", "2"])  # fmt: skip
    flannel = Flannel(args, c, config, "127.0.0.1")
    await flannel.setup()
    first = flannel.lease.expiration
    assert "FLANNEL_SUBNET=100.100.1.1/24" in (tmp_path / "subnet.env").read_text()
    tasks = [asyncio.ensure_future(flannel.renew()), asyncio.ensure_future(flannel.watch())]
    try:
        await wait_for_async(lambda: flannel.lease.expiration > first, 15, "a renewal")
        assert await release_lease(c, "127.0.0.1")

        async def leased_again() -> object:
            state, _ = await read_state(c)
            return state.lease_of("127.0.0.1")

        lease = await wait_for_async(leased_again, 15, "the lease taken again", every=0.1)
        assert lease.subnet == net("100.100.1.0/24")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
