"""The vxlan backend: device `flannel.1` and, for every other host's lease, the three kernel
entries that carry its subnet over the underlay.

    route  100.100.4.0/24 via 100.100.4.0 dev flannel.1 onlink
    neigh  100.100.4.0 lladdr <their VtepMAC> nud permanent        (the ARP answer)
    fdb    <their VtepMAC> dst <their PublicIP> dev flannel.1       (where that MAC lives)

The device holds its own lease's network address as a /32 (100.100.3.0/32), as newer flannel
does: a /32 adds no connected route, so only the explicit per-peer routes above send traffic
into the overlay, and the host's bridge keeps the subnet's .1/24 for the jobs. Packets this host
sends into the overlay take 100.100.3.0 as their source, which the peers route back through
their own route for this host's subnet. Learning is off: nothing is flooded, every entry is
written from the leases.

Everything here uses pyroute2's synchronous API and blocks: call it via `asyncio.to_thread`.
`netns` names a network namespace to work in instead of the current one (a test "host").
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import NetlinkError

from flynn_host.networking.links import iproute_in

DEVICE = "flannel.1"
VXLAN_OVERHEAD = 50  # outer IPv4 (20) + UDP (8) + vxlan (8) + inner Ethernet (14)
KERNEL_DEFAULT_PORT = 8472  # Linux's vxlan port when none is given (not IANA's 4789)
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4
RT_TABLE_MAIN = 254


class VxlanError(RuntimeError):
    """The device could not be set up; the message says why."""


@dataclass(frozen=True)
class Peer:
    """Another host's lease, as the kernel needs it."""

    subnet: ipaddress.IPv4Network
    public_ip: str
    vtep_mac: str

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address)


@dataclass(frozen=True)
class DeviceInfo:
    mac: str
    mtu: int


@dataclass
class Changes:
    added: int = 0
    removed: int = 0


class VxlanDevice:
    def __init__(self, name: str = DEVICE, netns: str | None = None) -> None:
        self.name = name
        self.netns = netns

    def _ipr(self) -> contextlib.AbstractContextManager[Any]:
        # setns in this thread, not pyroute2's NetNS (which forks the process)
        return iproute_in(self.netns)

    def _index(self, ipr: Any) -> int:
        found = ipr.link_lookup(ifname=self.name)
        if not found:
            raise VxlanError(f"device {self.name} does not exist")
        return int(found[0])

    # --- the device ------------------------------------------------------------------------

    def underlay(self, local_ip: str) -> tuple[int, int]:
        """The index and MTU of the interface holding `local_ip`."""
        with self._ipr() as ipr:
            for addr in ipr.get_addr(family=socket.AF_INET):
                if local_ip in (addr.get_attr("IFA_LOCAL"), addr.get_attr("IFA_ADDRESS")):
                    index = addr["index"]
                    mtu = ipr.get_links(index)[0].get_attr("IFLA_MTU")
                    return int(index), int(mtu)
        raise VxlanError(f"no interface holds {local_ip} (check --iface / EXTERNAL_IP)")

    def ensure(
        self,
        local_ip: str,
        subnet: ipaddress.IPv4Network | None = None,
        vni: int = 1,
        port: int = 0,
    ) -> DeviceInfo:
        """Create (or keep, if it matches) the vxlan device on the interface holding
        `local_ip`, with MTU = underlay MTU − 50 and, when `subnet` is given, address
        `subnet`'s .0/32 (and no other), and set it up. An existing device with other settings
        is replaced (its MAC changes). Returns its MAC and MTU."""
        under, under_mtu = self.underlay(local_ip)
        mtu = under_mtu - VXLAN_OVERHEAD
        want_port = port or KERNEL_DEFAULT_PORT
        with self._ipr() as ipr:
            found = ipr.link_lookup(ifname=self.name)
            if found and not self._matches(ipr.get_links(found[0])[0], vni, local_ip, want_port):
                ipr.link("del", index=found[0])
                found = []
            if not found:
                extra = {"vxlan_port": port} if port else {}
                try:
                    ipr.link(
                        "add", ifname=self.name, kind="vxlan", vxlan_id=vni,
                        vxlan_local=local_ip, vxlan_link=under, vxlan_learning=0, **extra,
                    )  # fmt: skip
                except NetlinkError as e:
                    raise VxlanError(f"creating {self.name}: {e}") from e
            index = self._index(ipr)
            ipr.link("set", index=index, mtu=mtu)
            if subnet is not None:
                self._set_address(ipr, index, str(subnet.network_address))
            ipr.link("set", index=index, state="up")
            link = ipr.get_links(index)[0]
            return DeviceInfo(mac=link.get_attr("IFLA_ADDRESS"), mtu=link.get_attr("IFLA_MTU"))

    @staticmethod
    def _set_address(ipr: Any, index: int, address: str) -> None:
        for addr in ipr.get_addr(index=index, family=socket.AF_INET):
            if addr.get_attr("IFA_LOCAL") != address or addr["prefixlen"] != 32:
                ipr.addr("del", index=index, address=addr.get_attr("IFA_LOCAL"),
                         prefixlen=addr["prefixlen"])  # fmt: skip
        try:
            ipr.addr("add", index=index, address=address, prefixlen=32)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise

    @staticmethod
    def _matches(link: Any, vni: int, local_ip: str, port: int) -> bool:
        info = link.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
            return False
        data = info.get_attr("IFLA_INFO_DATA")
        return (
            data.get_attr("IFLA_VXLAN_ID") == vni
            and data.get_attr("IFLA_VXLAN_LOCAL") == local_ip
            and data.get_attr("IFLA_VXLAN_PORT") == port
        )

    def exists(self) -> bool:
        with self._ipr() as ipr:
            return bool(ipr.link_lookup(ifname=self.name))

    def delete(self) -> None:
        """Remove the device (and with it every route, neighbour and fdb entry on it). flannel
        does not do this when it stops; it is for clean-up."""
        with self._ipr() as ipr:
            for index in ipr.link_lookup(ifname=self.name):
                ipr.link("del", index=index)

    # --- peers -----------------------------------------------------------------------------

    def entries(self) -> dict[str, set[tuple[str, str]]]:
        """What the device holds now: routes (subnet, via), neighbours (ip, mac) and fdb
        entries (mac, dst)."""
        with self._ipr() as ipr:
            index = self._index(ipr)
            return self._entries(ipr, index)

    def _entries(self, ipr: Any, index: int) -> dict[str, set[tuple[str, str]]]:
        routes = set()
        for r in ipr.get_routes(family=socket.AF_INET, oif=index):
            if r.get_attr("RTA_TABLE") != RT_TABLE_MAIN or r.get_attr("RTA_DST") is None:
                continue
            dst = f"{r.get_attr('RTA_DST')}/{r['dst_len']}"
            routes.add((dst, r.get_attr("RTA_GATEWAY") or ""))
        neighbours = {
            (n.get_attr("NDA_DST"), (n.get_attr("NDA_LLADDR") or "").lower())
            for n in ipr.get_neighbours(family=socket.AF_INET, ifindex=index)
            if n.get_attr("NDA_DST")
        }
        fdb = {
            ((f.get_attr("NDA_LLADDR") or "").lower(), f.get_attr("NDA_DST") or "")
            for f in ipr.fdb("dump", ifindex=index)
            if f["ifindex"] == index
        }
        return {"routes": routes, "neighbours": neighbours, "fdb": fdb}

    def sync_peers(self, peers: Iterable[Peer]) -> Changes:
        """Make the device's routes, neighbours and fdb entries exactly those of `peers`:
        stale ones (of leases that went away or changed) are removed, missing ones added."""
        peers = list(peers)
        want = {
            "routes": {(str(p.subnet), p.gateway) for p in peers},
            "neighbours": {(p.gateway, p.vtep_mac.lower()) for p in peers},
            "fdb": {(p.vtep_mac.lower(), p.public_ip) for p in peers},
        }
        changes = Changes()
        with self._ipr() as ipr:
            index = self._index(ipr)
            have = self._entries(ipr, index)
            # stale first: an fdb entry for a MAC that moved must go before the new one is added
            for dst, _via in have["routes"] - want["routes"]:
                net = ipaddress.IPv4Network(dst)
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst=str(net.network_address), dst_len=net.prefixlen,
                              oif=index, table=RT_TABLE_MAIN)  # fmt: skip
                    changes.removed += 1
            for ip, mac in have["neighbours"] - want["neighbours"]:
                with contextlib.suppress(NetlinkError):
                    ipr.neigh("del", dst=ip, lladdr=mac or None, ifindex=index)
                    changes.removed += 1
            for mac, dst in have["fdb"] - want["fdb"]:
                with contextlib.suppress(NetlinkError):
                    ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst or None)
                    changes.removed += 1
            for mac, dst in want["fdb"] - have["fdb"]:
                ipr.fdb("add", ifindex=index, lladdr=mac, dst=dst)
                changes.added += 1
            for ip, mac in want["neighbours"] - have["neighbours"]:
                ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=index, state=NUD_PERMANENT)
                changes.added += 1
            for dst, via in want["routes"] - have["routes"]:
                net = ipaddress.IPv4Network(dst)
                ipr.route("replace", dst=str(net.network_address), dst_len=net.prefixlen,
                          gateway=via, oif=index, flags=RTNH_F_ONLINK)  # fmt: skip
                changes.added += 1
        return changes
