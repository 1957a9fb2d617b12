"""The host's job network: what flannel told the host (`POST /host/network`), the bridge made
from it, the addresses given to jobs, and the `resolv.conf` jobs see.

Until the network is configured, a job without `host_network` gets a network namespace with
loopback only (what Layer 0's own jobs, which all use the host network, never notice). Once it
is, each such job gets a named namespace `fj-<key>` holding an `eth0` in the bridge, an address
from the host's subnet, the bridge address as gateway and as DNS server (discoverd's DNS listens
there), and `EXTERNAL_IP` set to its address. The configuration and the allocations are kept
beside the host's state file, so a restarted daemon adopts its jobs' addresses and builds the
same bridge again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from flynn_host.atomicfile import write_json_atomic
from flynn_host.config import HostConfig
from flynn_host.errors import ValidationError
from flynn_host.networking.links import (
    HostNetwork,
    NetworkError,
    SubnetAllocator,
    create_netns,
    delete_netns,
    in_netns,
    list_netns,
    netns_path,
    veth_name,
)
from flynn_host.types import job_key

log = logging.getLogger(__name__)

NETNS_PREFIX = "fj-"
DEFAULT_MTU = 1500


def netns_name(job_id: str) -> str:
    """The job's namespace name: unique across every host of the machine (job ids carry the
    host id) and short (the same key as the job's directories, `types.job_key`)."""
    return NETNS_PREFIX + job_key(job_id)


# Address space a job network may never take: the host's own (this network, loopback,
# link-local) and what is not unicast (multicast, reserved, broadcast).
RESERVED_NETWORKS = [ipaddress.IPv4Network(n) for n in
                     ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3")]  # fmt: skip


def parse_network(raw: Any) -> dict[str, Any]:
    """Validate a `POST /host/network` body: `{"job_id", "subnet", "mtu"}`. The host makes a
    bridge and a NAT rule from it, so a subnet that would take over the host's routing
    (0.0.0.0/0, loopback) is refused here."""
    if not isinstance(raw, dict):
        raise ValidationError("", "body must be a JSON object")
    subnet = raw.get("subnet")
    if not isinstance(subnet, str):
        raise ValidationError("subnet", "must be a CIDR string such as 100.100.3.0/24")
    try:
        net = ipaddress.IPv4Network(subnet, strict=False)
    except ValueError as exc:
        raise ValidationError("subnet", f"invalid IPv4 subnet {subnet!r}: {exc}") from exc
    if "/" not in subnet or not 8 <= net.prefixlen <= 30:
        raise ValidationError("subnet", f"{subnet!r} needs a prefix from /8 to /30")
    if any(net.overlaps(r) for r in RESERVED_NETWORKS):
        raise ValidationError("subnet", f"{subnet!r} is not unicast address space jobs may use")
    mtu = raw.get("mtu")
    if mtu is None or (mtu == 0 and not isinstance(mtu, bool)):
        mtu = DEFAULT_MTU  # as Flynn: 0 means the default
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 65535:
        raise ValidationError("mtu", "must be an integer between 576 and 65535")
    job_id = raw.get("job_id") or ""
    if not isinstance(job_id, str) or len(job_id) > 256 or not job_id.isprintable():
        raise ValidationError("job_id", "must be a printable string of at most 256 characters")
    return {"job_id": job_id, "subnet": str(net), "mtu": mtu}


def _has_netns(name: str) -> bool:
    return os.path.exists(netns_path(name))


def sandbox_netns(name: str, blocked_ports: list[int]) -> None:
    """Fence a user job's namespace: its outgoing TCP connections to `blocked_ports` (the host
    API and etcd's ports, on any address, IPv4 and IPv6) are reset by a netfilter table in the
    namespace itself. The job cannot lift it: user jobs have neither CAP_NET_ADMIN nor
    CAP_NET_RAW (which could send frames around netfilter), so `ping` works through the
    kernel's unprivileged ICMP sockets, enabled here for every group instead."""
    ports = ", ".join(str(p) for p in sorted(set(blocked_ports)))
    rules = (
        "table inet flynn_job {\n"
        "  chain output {\n"
        "    type filter hook output priority 0; policy accept;\n"
        f"    tcp dport {{ {ports} }} reject with tcp reset\n"
        "  }\n"
        "}\n"
    )
    # nsenter, not `ip netns exec`: it only enters the network namespace (no mount namespace
    # or /sys remount), and runs no shell
    done = subprocess.run(["nsenter", f"--net={netns_path(name)}", "nft", "-f", "-"],
                          input=rules, capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise NetworkError(f"firewall for {name}: nft: {done.stderr.strip()}")
    with in_netns(name):  # /proc/sys/net shows the namespace of the thread that opens it
        Path("/proc/sys/net/ipv4/ping_group_range").write_text("0 2147483647\n")


class JobNetwork:
    """One host's job networking. Blocking netlink work runs in worker threads."""

    def __init__(self, config: HostConfig) -> None:
        state = config.state
        self.bridge_name = config.bridge_name
        self.protected_ports = list(config.protected_ports)
        self.config_file = state.with_name(state.name + ".network")
        self.addresses_file = state.with_name(state.name + ".addresses")
        self.resolv_conf = state.with_name(state.name + ".resolv.conf")
        self.info: dict[str, Any] | None = None
        self.net: HostNetwork | None = None
        self.alloc: SubnetAllocator | None = None
        self._lock = asyncio.Lock()

    @property
    def configured(self) -> bool:
        return self.net is not None

    def status(self) -> dict[str, Any] | None:
        """Flynn's `HostStatus.network`: `{"job_id", "subnet", "mtu", "resolvers"}`."""
        if self.info is None or self.net is None:
            return None
        return {**self.info, "resolvers": [self.net.gateway]}

    async def restore(self) -> None:
        """At start-up: rebuild the bridge a previous daemon was told about."""
        try:
            saved = json.loads(self.config_file.read_text())
        except FileNotFoundError:
            return
        except ValueError:
            log.warning("ignoring unreadable network config %s", self.config_file)
            return
        await self.configure(saved, save=False)

    async def configure(self, info: dict[str, Any], save: bool = True) -> None:
        """Make the bridge for `info` (validated by `parse_network`); the same subnet again is a
        no-op, a new one replaces the bridge (jobs attached to the old one keep their veths
        until they end)."""
        async with self._lock:
            same = self.info is not None and self.info["subnet"] == info["subnet"]
            if same and self.info is not None and self.info["mtu"] == info["mtu"]:
                self.info = info
            else:
                if self.net is not None and not same:
                    log.warning("subnet changes from %s to %s", self.info, info["subnet"])
                    await asyncio.to_thread(self.net.teardown)
                net = HostNetwork(self.bridge_name, info["subnet"], info["mtu"])
                await asyncio.to_thread(net.setup)
                self.net, self.info = net, info
                self.alloc = SubnetAllocator(self.addresses_file, info["subnet"])
                self.resolv_conf.write_text(f"nameserver {net.gateway}\n")
                log.info("job network %s on %s, mtu %d", info["subnet"], self.bridge_name,
                         info["mtu"])  # fmt: skip
            if save:
                write_json_atomic(self.config_file, info)

    async def attach(self, job_id: str, sandboxed: bool = True) -> tuple[str, str] | None:
        """Give the job a namespace with an address; returns (namespace path, address), or
        None while the host has no network. A `sandboxed` job (any outside the system
        partition) cannot connect to the protected ports. On failure nothing is left."""
        async with self._lock:
            net, alloc = self.net, self.alloc
        if net is None or alloc is None:
            return None
        name = netns_name(job_id)
        ip = ""
        try:
            path = await asyncio.to_thread(create_netns, name)
            if sandboxed:
                await asyncio.to_thread(sandbox_netns, name, self.protected_ports)
            ip = alloc.allocate(job_id)
            await asyncio.to_thread(net.attach, job_id, name, ip)
        except BaseException:
            await self.detach(job_id)
            raise
        return path, ip

    async def detach(self, job_id: str) -> None:
        """Remove the job's veth and namespace and free its address (each if present)."""
        net, alloc = self.net, self.alloc
        if net is not None:
            await asyncio.to_thread(net.detach, job_id)
        if _has_netns(netns_name(job_id)):
            await asyncio.to_thread(delete_netns, netns_name(job_id))
        if alloc is not None:
            alloc.release(job_id)

    async def cleanup_orphans(self, known: set[str]) -> None:
        """Remove namespaces, veths and addresses of jobs the host no longer knows."""
        names = {netns_name(j) for j in known}
        ours = {netns_name(j) for j in (self.alloc.allocations() if self.alloc else {})}
        for name in list_netns():
            # only namespaces this host made: a cluster's hosts share /var/run/netns
            if name in ours and name not in names:
                log.info("removing orphaned job network namespace %s", name)
                await asyncio.to_thread(delete_netns, name)
        if self.alloc is None or self.net is None:
            return
        for job_id in set(self.alloc.allocations()) - known:
            log.info("releasing the address of unknown job %s", job_id)
            await asyncio.to_thread(self.net.detach, job_id)
            self.alloc.release(job_id)

    async def teardown(self) -> None:
        """When the daemon stops its jobs: remove the bridge and NAT rule (the saved config
        rebuilds them at the next start)."""
        if self.net is not None:
            try:
                await asyncio.to_thread(self.net.teardown)
            except NetworkError as exc:
                log.warning("removing the job network: %s", exc)


__all__ = ["JobNetwork", "netns_name", "parse_network", "veth_name"]
