"""The vxlan backend in two throwaway network namespaces joined by a veth pair: each gets
`flannel.1` and the other's lease, and a ping crosses the overlay; entries of a lease that goes
away are removed, and so are stale ones found at start-up."""

from __future__ import annotations

import ipaddress
import os
import subprocess

import pytest
from flannel_netns import TwoHosts, ip
from flynn_flannel.vxlan import Peer, VxlanDevice, VxlanError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

SUBNET_A = ipaddress.IPv4Network("100.100.3.0/24")
SUBNET_B = ipaddress.IPv4Network("100.100.4.0/24")


def ping(netns: str, src: str, dst: str) -> bool:
    cmd = ["ip", "netns", "exec", netns, "busybox", "ping", "-c1", "-W1", "-I", src, dst]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def add_bridge(netns: str, address: str) -> None:
    """A bridge holding an address inside the lease, as the host's flynnbr0 would."""
    ip("-n", netns, "link", "add", "tfbridge", "type", "bridge")
    ip("-n", netns, "addr", "add", address, "dev", "tfbridge")
    ip("-n", netns, "link", "set", "tfbridge", "up")


def test_overlay_ping_and_peer_removal(two_hosts: TwoHosts) -> None:
    a, b = VxlanDevice(netns=two_hosts.a), VxlanDevice(netns=two_hosts.b)
    info_a = a.ensure(two_hosts.ip_a, SUBNET_A)
    info_b = b.ensure(two_hosts.ip_b, SUBNET_B)
    assert info_a.mtu == info_b.mtu == 1450  # veth MTU 1500 − 50
    peer_a = Peer(SUBNET_A, two_hosts.ip_a, info_a.mac)
    peer_b = Peer(SUBNET_B, two_hosts.ip_b, info_b.mac)
    assert a.sync_peers([peer_b]).added == 3
    assert b.sync_peers([peer_a]).added == 3
    assert a.sync_peers([peer_b]).added == 0  # already in step
    assert a.entries() == {
        "routes": {("100.100.4.0/24", "100.100.4.0")},
        "neighbours": {("100.100.4.0", info_b.mac)},
        "fdb": {(info_b.mac, two_hosts.ip_b)},
    }
    details = ip("-n", two_hosts.a, "-d", "link", "show", "flannel.1").stdout
    assert "vxlan id 1 local 10.211.0.1" in details and "dstport 8472" in details
    assert "nolearning" in details
    addrs = ip("-n", two_hosts.a, "-4", "addr", "show", "dev", "flannel.1").stdout
    assert "inet 100.100.3.0/32" in addrs

    add_bridge(two_hosts.a, "100.100.3.1/24")
    add_bridge(two_hosts.b, "100.100.4.1/24")
    assert ping(two_hosts.a, "100.100.3.1", "100.100.4.1")
    assert ping(two_hosts.b, "100.100.4.1", "100.100.3.1")

    # B's lease goes away: A forgets it, and the overlay no longer reaches B
    assert a.sync_peers([]).removed == 3
    assert a.entries() == {"routes": set(), "neighbours": set(), "fdb": set()}
    assert not ping(two_hosts.a, "100.100.3.1", "100.100.4.1")


def test_stale_entries_removed_and_device_kept(two_hosts: TwoHosts) -> None:
    a = VxlanDevice(netns=two_hosts.a)
    info = a.ensure(two_hosts.ip_a, SUBNET_A)
    ns = two_hosts.a
    # left over from an earlier run: a lease that no longer exists, and B's old MAC
    ip(
        "-n",
        ns,
        "route",
        "add",
        "100.100.9.0/24",
        "via",
        "100.100.9.0",
        "dev",
        "flannel.1",
        "onlink",
    )
    ip("-n", ns, "neigh", "add", "100.100.9.0", "lladdr", "02:00:00:00:00:09", "dev", "flannel.1",
       "nud", "permanent")  # fmt: skip
    ip("-n", ns, "neigh", "add", "100.100.4.0", "lladdr", "02:00:00:00:00:04", "dev", "flannel.1",
       "nud", "permanent")  # fmt: skip
    subprocess.run(["bridge", "-n", ns, "fdb", "add", "02:00:00:00:00:09", "dev", "flannel.1",
                    "dst", "10.211.0.9"], check=True)  # fmt: skip
    peer_b = Peer(SUBNET_B, two_hosts.ip_b, "02:00:00:00:00:44")
    changes = a.sync_peers([peer_b])
    assert changes.removed == 4 and changes.added == 3
    assert a.entries() == {
        "routes": {("100.100.4.0/24", "100.100.4.0")},
        "neighbours": {("100.100.4.0", "02:00:00:00:00:44")},
        "fdb": {("02:00:00:00:00:44", two_hosts.ip_b)},
    }
    # a restart with the same settings keeps the device (and its MAC and entries)
    assert a.ensure(two_hosts.ip_a, SUBNET_A).mac == info.mac
    assert len(a.entries()["routes"]) == 1
    # other settings (a VNI change) replace it
    assert a.ensure(two_hosts.ip_a, SUBNET_A, vni=7).mac != info.mac
    assert "vxlan id 7" in ip("-n", ns, "-d", "link", "show", "flannel.1").stdout
    a.delete()
    assert not a.exists()


def test_unknown_local_ip(two_hosts: TwoHosts) -> None:
    with pytest.raises(VxlanError, match="no interface holds 10.211.0.77"):
        VxlanDevice(netns=two_hosts.a).ensure("10.211.0.77", SUBNET_A)
