"""Container networking for the runc backend: the host bridge, a veth per job, and addresses.

Flynn gives each host a /24 of the overlay (flannel leases it and calls `POST /host/network`);
the host creates bridge `flynnbr0` holding the subnet's .1, and each non-host-network job gets a
veth pair whose host end is in the bridge and whose other end is `eth0` in the job's network
namespace, with an address from the subnet and a default route via the bridge. Egress leaves
through NAT (an iptables MASQUERADE rule). `SubnetAllocator` hands out the addresses and
remembers them across restarts; `HostNetwork` does the netlink work with pyroute2's synchronous
API, whose methods block and are meant to be called via `asyncio.to_thread` (pyroute2's async
API breaks under uvloop). `HostNetwork` can also manage a bridge inside a named network
namespace standing in for a host, which is how several test hosts share one machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import ipaddress
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from flynn_host.atomicfile import write_json_atomic

__all__ = [
    "HostNetwork",
    "NetworkError",
    "SubnetAllocator",
    "SubnetExhaustedError",
    "create_netns",
    "delete_netns",
    "in_netns",
    "iproute_in",
    "list_netns",
    "netns_path",
    "veth_name",
]

NETNS_DIR = Path("/var/run/netns")


class NetworkError(RuntimeError):
    """A network operation failed; the message says which and why."""


class SubnetExhaustedError(NetworkError):
    """Every job address of the subnet is taken."""


class SubnetAllocator:
    """Job addresses of one host subnet, each given to one job at a time, kept in a JSON file.

    In `100.100.3.0/24`, .1 belongs to the bridge and jobs get .2–.254. The file is replaced
    atomically on every change, so a crash loses at most the change being made.
    """

    def __init__(self, state_file: Path, subnet: str) -> None:
        self.state_file = Path(state_file)
        self.network = ipaddress.IPv4Network(subnet, strict=False)
        if self.network.num_addresses < 4:
            raise ValueError(f"subnet {subnet} is too small for a bridge and a job")
        self.gateway = str(self.network.network_address + 1)
        self._lock = threading.Lock()
        self._allocations: dict[str, str] = self._load()

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        if data.get("subnet") != str(self.network):
            # A new lease means the old addresses are meaningless; start afresh.
            return {}
        return dict(data.get("allocations", {}))

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            self.state_file, {"subnet": str(self.network), "allocations": self._allocations}
        )

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    def allocations(self) -> dict[str, str]:
        """Job id → address, a copy."""
        with self._lock:
            return dict(self._allocations)

    def allocate(self, job_id: str) -> str:
        """The job's address: the one it already has, else the lowest free one."""
        with self._lock:
            if job_id in self._allocations:
                return self._allocations[job_id]
            taken = set(self._allocations.values()) | {self.gateway}
            for host in self.network.hosts():
                ip = str(host)
                if ip not in taken:
                    self._allocations[job_id] = ip
                    self._save()
                    return ip
            raise SubnetExhaustedError(
                f"no free address in {self.network}: all {len(self._allocations)} are taken"
            )

    def release(self, job_id: str) -> None:
        """Free the job's address; releasing an unknown job is not an error."""
        with self._lock:
            if self._allocations.pop(job_id, None) is not None:
                self._save()


def veth_name(job_id: str, prefix: str = "fh") -> str:
    """Interface name for a job: a short hash, since Linux allows 15 characters."""
    return prefix + hashlib.sha256(job_id.encode()).hexdigest()[:10]


def netns_path(name_or_path: str) -> str:
    """A named namespace's path under /var/run/netns; a path is returned as it is."""
    return name_or_path if "/" in name_or_path else str(NETNS_DIR / name_or_path)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")


def create_netns(name: str) -> str:
    """Create a named network namespace and return its path.

    By `ip netns add`, not pyroute2's `netns.create`, which forks the calling process: a fork
    of the multi-threaded daemon, whose clean-up once signalled the daemon itself."""
    _ip("netns", "add", name)
    return str(NETNS_DIR / name)


def delete_netns(name: str) -> None:
    """Delete a named network namespace; a missing one is not an error."""
    if (NETNS_DIR / name).exists():
        _ip("netns", "delete", name)


def list_netns() -> list[str]:
    return sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.exists() else []


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name_or_path: str) -> Iterator[None]:
    """Run the block with the calling thread in another network namespace (setns affects only
    the calling thread), then return it to its own. Use from a worker thread: sockets opened
    inside, such as an `IPRoute()`'s netlink socket, stay in that namespace."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path(name_or_path), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


@contextlib.contextmanager
def iproute_in(name_or_path: str | None) -> Iterator[Any]:
    """An `IPRoute` working in the named namespace (None: the thread's own)."""
    with contextlib.ExitStack() as stack:
        if name_or_path:
            stack.enter_context(in_netns(name_or_path))
        ipr = IPRoute()
        stack.callback(ipr.close)
        yield ipr


def _ignore(err: NetlinkError, *codes: int) -> None:
    if err.code not in codes:
        raise err


def job_mac(ip: str) -> str:
    """A job's `eth0` MAC: `02:42:` and its IPv4 address's octets (locally administered)."""
    return "02:42:" + ":".join(f"{int(o):02x}" for o in ip.split("."))


class HostNetwork:
    """The host's bridge, NAT rule and job veths. Every method blocks: call via
    `asyncio.to_thread`.

    `host_netns` names a network namespace to work in instead of the current one (a test
    "host"); the iptables rule and `ip_forward` are then set in that namespace.
    """

    def __init__(
        self, bridge_name: str, subnet: str, mtu: int = 1500, host_netns: str | None = None
    ) -> None:
        if not 0 < len(bridge_name) <= 15:
            raise ValueError(f"bridge name {bridge_name!r} must be 1-15 characters")
        self.bridge_name = bridge_name
        self.network = ipaddress.IPv4Network(subnet, strict=False)
        self.gateway = str(self.network.network_address + 1)
        self.mtu = mtu
        self.host_netns = host_netns

    # --- helpers ---------------------------------------------------------------------------

    def _ipr(self) -> contextlib.AbstractContextManager[Any]:
        return iproute_in(self.host_netns)

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        if self.host_netns:
            args = ["ip", "netns", "exec", self.host_netns, *args]
        proc = subprocess.run(args, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise NetworkError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def _nat_rule(self) -> list[str]:
        return [
            "POSTROUTING",
            "-s",
            str(self.network),
            "!",
            "-o",
            self.bridge_name,
            "-j",
            "MASQUERADE",
        ]

    def has_nat_rule(self) -> bool:
        return (
            self._run(
                ["iptables", "-w", "-t", "nat", "-C", *self._nat_rule()], check=False
            ).returncode
            == 0
        )

    def _enable_forwarding(self) -> None:
        if self.host_netns:
            self._run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        else:
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")

    # --- bridge ----------------------------------------------------------------------------

    def bridge_mac(self) -> str:
        """The bridge's own MAC, fixed by its address (`02:fb:` + the gateway's octets). A
        bridge whose address was never set takes the lowest MAC of its ports and changes it
        as veths come and go: every running job's ARP entry for its gateway then names a MAC
        nobody has, and its traffic off the subnet stops until the entry is renewed (seconds
        to a minute) — each time any job on the host starts or stops."""
        return "02:fb:" + ":".join(f"{int(o):02x}" for o in self.gateway.split("."))

    def setup(self) -> None:
        """Create the bridge with the subnet's .1 and a fixed MAC, up, with the MTU; enable
        forwarding; add the NAT rule. Safe to call again."""
        with self._ipr() as ipr:
            try:
                ipr.link("add", ifname=self.bridge_name, kind="bridge")
            except NetlinkError as e:
                _ignore(e, errno.EEXIST)
            idx = ipr.link_lookup(ifname=self.bridge_name)[0]
            ipr.link("set", index=idx, address=self.bridge_mac())
            try:
                ipr.addr("add", index=idx, address=self.gateway, prefixlen=self.network.prefixlen)
            except NetlinkError as e:
                _ignore(e, errno.EEXIST)
            ipr.link("set", index=idx, mtu=self.mtu, state="up")
        self._enable_forwarding()
        if not self.has_nat_rule():
            self._run(["iptables", "-w", "-t", "nat", "-A", *self._nat_rule()])

    def teardown(self) -> None:
        """Remove the NAT rule, the veths still in the bridge (a bridge's ports outlive it),
        and the bridge. Forwarding stays on: other things on the host may rely on it."""
        while self.has_nat_rule():
            self._run(["iptables", "-w", "-t", "nat", "-D", *self._nat_rule()])
        with self._ipr() as ipr:
            for bridge in ipr.link_lookup(ifname=self.bridge_name):
                for link in ipr.get_links():
                    if link.get_attr("IFLA_MASTER") == bridge:
                        with contextlib.suppress(NetlinkError):
                            ipr.link("del", index=link["index"])
                ipr.link("del", index=bridge)

    def bridge_exists(self) -> bool:
        with self._ipr() as ipr:
            return bool(ipr.link_lookup(ifname=self.bridge_name))

    # --- jobs ------------------------------------------------------------------------------

    def attach(self, job_id: str, job_netns: str, ip: str) -> dict[str, Any]:
        """Give a job's network namespace (a name or a path) an `eth0` in the bridge with `ip`,
        and a default route via the bridge. Returns what the job was given."""
        host_if, peer_tmp = veth_name(job_id), veth_name(job_id, "fp")
        prefix = self.network.prefixlen
        ns_fd = os.open(netns_path(job_netns), os.O_RDONLY)
        try:
            with self._ipr() as ipr:
                bridge = ipr.link_lookup(ifname=self.bridge_name)
                if not bridge:
                    raise NetworkError(f"bridge {self.bridge_name} does not exist; call setup()")
                try:
                    ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": peer_tmp})
                except NetlinkError as e:
                    if e.code == errno.EEXIST:
                        raise NetworkError(f"job {job_id} is already attached ({host_if})") from e
                    raise
                idx = ipr.link_lookup(ifname=host_if)[0]
                try:
                    ipr.link("set", index=idx, master=bridge[0], mtu=self.mtu, state="up")
                    peer = ipr.link_lookup(ifname=peer_tmp)[0]
                    ipr.link("set", index=peer, mtu=self.mtu, net_ns_fd=ns_fd)
                    self._configure_job_side(job_netns, peer_tmp, ip, prefix)
                except BaseException:
                    # Nothing half-done: deleting the host end takes the peer with it.
                    with contextlib.suppress(NetlinkError):
                        ipr.link("del", index=idx)
                    raise
        finally:
            os.close(ns_fd)
        return {
            "veth": host_if,
            "ip": ip,
            "prefixlen": prefix,
            "gateway": self.gateway,
            "mtu": self.mtu,
        }

    def _configure_job_side(self, job_netns: str, peer: str, ip: str, prefix: int) -> None:
        with iproute_in(job_netns) as ns:
            lo = ns.link_lookup(ifname="lo")[0]
            ns.link("set", index=lo, state="up")
            idx = ns.link_lookup(ifname=peer)[0]
            # a MAC fixed by the address, as Docker does: an address is given again to a later
            # job, and the host (and the jobs beside it) may still hold the old job's MAC for
            # it in their ARP caches for half a minute; with this, that entry is still right
            ns.link("set", index=idx, ifname="eth0", address=job_mac(ip))
            ns.addr("add", index=idx, address=ip, prefixlen=prefix)
            ns.link("set", index=idx, state="up")
            ns.route("add", dst="0.0.0.0/0", gateway=self.gateway)

    def detach(self, job_id: str) -> None:
        """Remove the job's veth (its `eth0` goes with it); a missing one is not an error."""
        with self._ipr() as ipr:
            for idx in ipr.link_lookup(ifname=veth_name(job_id)):
                try:
                    ipr.link("del", index=idx)
                except NetlinkError as e:
                    _ignore(e, errno.ENODEV)
