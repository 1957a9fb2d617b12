"""Tests for `flynn_host.networking.links`: the address allocator, and a real bridge with two job
namespaces attached, all inside a network namespace standing in for the host so that nothing
on the machine itself is touched. Everything is removed afterwards, even when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flynn_host.networking import links as network
from flynn_host.networking.links import HostNetwork, SubnetAllocator, SubnetExhaustedError

ROOT = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, veth, iptables)")


def test_allocator_unique_and_stable(tmp_path: Path) -> None:
    alloc = SubnetAllocator(tmp_path / "ips.json", "100.127.9.0/24")
    a, b = alloc.allocate("job-a"), alloc.allocate("job-b")
    assert (a, b) == ("100.127.9.2", "100.127.9.3")
    assert alloc.allocate("job-a") == a
    assert alloc.gateway == "100.127.9.1"


def test_allocator_persists(tmp_path: Path) -> None:
    state = tmp_path / "ips.json"
    alloc = SubnetAllocator(state, "100.127.9.0/24")
    a = alloc.allocate("job-a")
    again = SubnetAllocator(state, "100.127.9.0/24")
    assert again.allocate("job-a") == a
    assert again.allocate("job-b") != a
    assert json.loads(state.read_text())["allocations"] == {"job-a": a, "job-b": "100.127.9.3"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_allocator_exhaustion_and_release(tmp_path: Path) -> None:
    alloc = SubnetAllocator(tmp_path / "ips.json", "100.127.9.0/24")
    ips = {alloc.allocate(f"job-{i}") for i in range(253)}
    assert len(ips) == 253 and "100.127.9.1" not in ips and "100.127.9.255" not in ips
    with pytest.raises(SubnetExhaustedError, match="no free address in 100.127.9.0/24"):
        alloc.allocate("one-too-many")
    freed = alloc.allocate("job-7")
    alloc.release("job-7")
    alloc.release("never-allocated")
    assert alloc.allocate("newcomer") == freed
    assert SubnetAllocator(tmp_path / "ips.json", "100.127.9.0/24").allocate("newcomer") == freed


def test_veth_name_is_short_and_stable() -> None:
    name = network.veth_name("a-very-long-job-id-" * 5)
    assert len(name) <= 15 and name == network.veth_name("a-very-long-job-id-" * 5)
    assert name != network.veth_name("other")


def _ip(ns: str, *args: str) -> str:
    cmd = ["ip", "netns", "exec", ns, "ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _link_names(ns: str) -> set[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ip", "-o", "link"], capture_output=True, text=True, check=True
    ).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


# iputils' ping if installed, else busybox's (Debian's minimal images lack the former).
PING = ["ping"] if shutil.which("ping") else ["busybox", "ping"]


def _ping(ns: str, ip: str) -> bool:
    args = ["ip", "netns", "exec", ns, *PING, "-c1", "-W1", ip]
    return subprocess.run(args, capture_output=True).returncode == 0


@pytest.fixture
def fake_host() -> Iterator[tuple[HostNetwork, str, list[str]]]:
    """A host namespace with a HostNetwork in it; yields (net, host ns, [job a, job b, an
    "outside" namespace])."""
    tag = secrets.token_hex(2)
    host_ns, jobs = f"fht{tag}h", [f"fht{tag}a", f"fht{tag}b", f"fht{tag}o"]
    subnet = f"100.127.{secrets.randbelow(200) + 20}.0/24"
    net = HostNetwork(f"fht{tag}", subnet, mtu=1400, host_netns=host_ns)
    try:
        network.create_netns(host_ns)
        for ns in jobs:
            network.create_netns(ns)
        yield net, host_ns, jobs
    finally:
        with contextlib.suppress(Exception):
            net.teardown()
        for ns in [*jobs, host_ns]:
            network.delete_netns(ns)


@needs_root
def test_bridge_jobs_and_nat(fake_host: tuple[HostNetwork, str, list[str]], tmp_path: Path) -> None:
    net, host_ns, jobs = fake_host
    net.setup()
    net.setup()  # idempotent
    assert net.bridge_exists() and net.has_nat_rule()
    rules = subprocess.run(
        ["ip", "netns", "exec", host_ns, "iptables", "-t", "nat", "-S", "POSTROUTING"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert rules.count("MASQUERADE") == 1

    a, b, outside = jobs
    alloc = SubnetAllocator(tmp_path / "ips.json", str(net.network))
    ips = {}
    for ns in (a, b):
        ips[ns] = alloc.allocate(ns)
        # One by name, one by path, as the runc backend may have either.
        target = ns if ns.endswith("a") else f"/var/run/netns/{ns}"
        info = net.attach(ns, target, ips[ns])
        assert info["gateway"] == net.gateway and info["mtu"] == 1400
        assert info["veth"] in _link_names(host_ns)
        assert _link_names(ns) == {"lo", "eth0"}
        assert "mtu 1400" in _ip(ns, "link", "show", "eth0")
    with pytest.raises(network.NetworkError, match="already attached"):
        net.attach(a, a, ips[a])
    assert _link_names(a) == {"lo", "eth0"}

    assert _ping(a, ips[b]) and _ping(b, ips[a])
    assert _ping(a, net.gateway) and _ping(b, net.gateway)
    route = subprocess.run(
        ["ip", "netns", "exec", a, "ip", "route", "show", "default"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"via {net.gateway} dev eth0" in route

    # Egress: "outside" hangs off the host on another link and has no route back to the job
    # subnet, so its replies come back only because the host masquerades (and forwards).
    _ip(host_ns, "link", "add", "fhtx", "type", "veth", "peer", "name", "fhty", "netns", outside)
    _ip(host_ns, "addr", "add", "192.0.2.1/24", "dev", "fhtx")
    _ip(host_ns, "link", "set", "fhtx", "up")
    _ip(outside, "addr", "add", "192.0.2.2/24", "dev", "fhty")
    _ip(outside, "link", "set", "fhty", "up")
    assert _ping(a, "192.0.2.2")

    net.detach(b)
    net.detach(b)  # a missing veth is not an error
    assert network.veth_name(b) not in _link_names(host_ns)
    assert _link_names(b) == {"lo"}
    assert not _ping(a, ips[b])

    net.teardown()
    assert not net.bridge_exists() and not net.has_nat_rule()
    assert network.veth_name(a) not in _link_names(host_ns)


def _mac(ns: str, link: str) -> str:
    return _ip(ns, "-br", "link", "show", link).split()[2]


@needs_root
def test_bridge_mac_stays_put_as_jobs_come_and_go(
    fake_host: tuple[HostNetwork, str, list[str]], tmp_path: Path
) -> None:
    """A bridge whose MAC is not set takes its lowest port's: a job's veth with a lower MAC
    would change it, and every other job's ARP entry for the gateway would name a MAC nobody
    has (their traffic off the subnet stopped until it was renewed)."""
    net, host_ns, jobs = fake_host
    net.setup()
    assert (
        _mac(host_ns, net.bridge_name)
        == net.bridge_mac()
        == "02:fb:" + ":".join(f"{int(o):02x}" for o in net.gateway.split("."))
    )
    a, b, _ = jobs
    alloc = SubnetAllocator(tmp_path / "ips.json", str(net.network))
    ip_a = alloc.allocate(a)
    net.attach(a, a, ip_a)
    # a job's own MAC follows from its address: a stale ARP entry for a reused address holds
    assert (
        _mac(a, "eth0")
        == network.job_mac(ip_a)
        == "02:42:" + ":".join(f"{int(o):02x}" for o in ip_a.split("."))
    )
    assert _ping(a, net.gateway)
    before = _ip(a, "neigh", "show", net.gateway)
    info = net.attach(b, b, alloc.allocate(b))
    # the lowest MAC there is, on a port of the bridge
    _ip(host_ns, "link", "set", info["veth"], "address", "02:00:00:00:00:01")
    assert _mac(host_ns, net.bridge_name) == net.bridge_mac()
    net.detach(b)
    assert _mac(host_ns, net.bridge_name) == net.bridge_mac()
    assert net.bridge_mac() in before and _ping(a, net.gateway)


@needs_root
def test_attach_without_bridge_leaves_nothing(
    fake_host: tuple[HostNetwork, str, list[str]],
) -> None:
    net, host_ns, jobs = fake_host
    with pytest.raises(network.NetworkError, match="does not exist"):
        net.attach(jobs[0], jobs[0], str(net.network.network_address + 2))
    assert _link_names(host_ns) == {"lo"}


@needs_root
def test_netns_helpers() -> None:
    name = f"fht{secrets.token_hex(2)}n"
    try:
        path = network.create_netns(name)
        assert (
            Path(path).exists()
            and name
            in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        )
    finally:
        network.delete_netns(name)
    assert not Path(f"/var/run/netns/{name}").exists()
    network.delete_netns(name)  # missing is fine


@needs_root
def test_current_namespace(fake_host: tuple[HostNetwork, str, list[str]]) -> None:
    """The daemon's own case (no `host_netns`): IPRoute, /proc ip_forward and plain iptables,
    run in a child process placed in the test host's namespace, so the machine is untouched."""
    net, host_ns, jobs = fake_host
    ip = str(net.network.network_address + 9)
    code = (
        "import sys; from pathlib import Path\n"
        "from flynn_host.networking.links import HostNetwork\n"
        "net = HostNetwork(sys.argv[1], sys.argv[2])\n"
        "if sys.argv[3] == 'up':\n"
        "    net.setup(); net.setup(); net.attach(sys.argv[4], sys.argv[4], sys.argv[5])\n"
        "    assert Path('/proc/sys/net/ipv4/ip_forward').read_text().strip() == '1'\n"
        "    assert net.has_nat_rule() and net.bridge_exists()\n"
        "else:\n"
        "    net.teardown(); assert not net.has_nat_rule() and not net.bridge_exists()\n"
    )
    run = ["ip", "netns", "exec", host_ns, sys.executable, "-c", code, net.bridge_name]
    subprocess.run([*run, str(net.network), "up", jobs[0], ip], check=True, cwd=ROOT)
    assert _ping(jobs[0], net.gateway)
    subprocess.run([*run, str(net.network), "down"], check=True, cwd=ROOT)
    assert _link_names(host_ns) == {"lo"}
    assert _link_names(jobs[0]) == {"lo"}
