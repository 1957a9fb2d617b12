"""The development cluster's network: a bridge in the root namespace holding the subnet's .1,
and per host a network namespace `flynn-<name>-host<i>` whose `eth0` (a veth whose other end,
`fc<name>h<i>`, is in the bridge) has the host's address and a default route via the bridge.

Every name and the subnet derive from the cluster's name alone, so a cluster is found and
removed by its names even when its `cluster.json` is gone. `flynn_host.dev.cluster` puts the
parts together; see docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import re
import time

from pyroute2 import IPRoute, NetlinkError

from flynn_host.networking.links import NETNS_DIR, create_netns, delete_netns, iproute_in

DEFAULT_NAME = "default"

# --- names and addresses, all derived from the cluster's name ---------------------------------


def subnet_index(name: str) -> int:
    """The third octet of the cluster's subnet: 0 for the default cluster, otherwise a number
    1–254 derived from the name (so a test cluster does not collide with a developer's)."""
    if name == DEFAULT_NAME:
        return 0
    return 1 + int(hashlib.sha256(name.encode()).hexdigest(), 16) % 254


def bridge_name(name: str) -> str:
    return "flynnclu0" if name == DEFAULT_NAME else f"fc{name}br"


def dev_host_veth(name: str, i: int) -> str:
    """Root end of host i's veth: `fc<name>h<i>`, at most 2+8+1+2 = 13 characters."""
    return f"fc{name}h{i}"


def dev_host_netns(name: str, i: int) -> str:
    return f"flynn-{name}-host{i}"


def _veth_pattern(name: str) -> re.Pattern[str]:
    # both ends' names: `fc<name>h<i>` in the bridge, `fc<name>p<i>` before it is moved
    return re.compile(rf"fc{name}[hp]\d+")


# --- making it -------------------------------------------------------------------------------


def addresses_in(network: ipaddress.IPv4Network) -> list[str]:
    """The machine's IPv4 addresses inside `network` (a cluster may use it only if none)."""
    with IPRoute() as ipr:
        found = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2)]
    return [a for a in found if a and ipaddress.IPv4Address(a) in network]


def bridge_exists(bridge: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=bridge))


def make_bridge(bridge: str, gateway: str) -> None:
    with IPRoute() as ipr:
        ipr.link("add", ifname=bridge, kind="bridge")
        idx = ipr.link_lookup(ifname=bridge)[0]
        ipr.addr("add", index=idx, address=gateway, prefixlen=24)
        ipr.link("set", index=idx, state="up")


def make_host_netns(
    name: str, index: int, netns: str, veth: str, ip: str, bridge: str, gateway: str
) -> None:
    """Host `index`'s namespace `netns`, with `eth0` at `ip` on the bridge."""
    create_netns(netns)
    peer_tmp = f"fc{name}p{index}"
    ns_fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
    try:
        with IPRoute() as ipr:
            bridge_idx = ipr.link_lookup(ifname=bridge)[0]
            ipr.link("add", ifname=veth, kind="veth", peer={"ifname": peer_tmp})
            idx = ipr.link_lookup(ifname=veth)[0]
            ipr.link("set", index=idx, master=bridge_idx, state="up")
            peer = ipr.link_lookup(ifname=peer_tmp)[0]
            ipr.link("set", index=peer, net_ns_fd=ns_fd)
    finally:
        os.close(ns_fd)
    with iproute_in(netns) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        idx = ns.link_lookup(ifname=peer_tmp)[0]
        # a MAC fixed by the address: a host whose namespace is made again is found at
        # once by neighbours still holding its old ARP entry (REACHABLE for up to 45 s)
        mac = "02:66:" + ":".join(f"{int(o):02x}" for o in ip.split("."))
        ns.link("set", index=idx, ifname="eth0", address=mac)
        ns.addr("add", index=idx, address=ip, prefixlen=24)
        ns.link("set", index=idx, state="up")
        ns.route("add", dst="0.0.0.0/0", gateway=gateway)


# --- removing it -----------------------------------------------------------------------------


def remove_host_netns(netns: str, veth: str) -> None:
    """A host's namespace and its veth (each if present)."""
    delete_netns(netns)
    with IPRoute() as ipr, contextlib.suppress(NetlinkError):
        for idx in ipr.link_lookup(ifname=veth):
            ipr.link("del", index=idx)


def cluster_namespaces(name: str) -> list[str]:
    """The host namespaces of cluster `name` on this machine, found by their names."""
    pattern = re.compile(rf"flynn-{name}-host\d+")
    with contextlib.suppress(OSError):
        return sorted(n for n in os.listdir(NETNS_DIR) if pattern.fullmatch(n))
    return []


def cluster_links(name: str, bridge: str) -> list[str]:
    """The bridge and veths of cluster `name` on this machine, found by their names."""
    veth = _veth_pattern(name)
    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") or "" for link in ipr.get_links()]
    return [n for n in names if n == bridge or veth.fullmatch(n)]


def remove_links(name: str, bridge: str) -> None:
    """Delete the cluster's bridge and veths, and wait until the kernel has freed the veths."""
    veth = _veth_pattern(name)
    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifname = link.get_attr("IFLA_IFNAME")
            if ifname == bridge or veth.fullmatch(ifname or ""):
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=link["index"])
        # a deleted namespace's veth may linger a moment while the kernel frees it
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
            veth.fullmatch(ln.get_attr("IFLA_IFNAME") or "") for ln in ipr.get_links()
        ):
            time.sleep(0.05)
