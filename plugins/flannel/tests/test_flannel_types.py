"""The network config and its validation, lease keys and subnet choice (no discoverd)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from flynn_flannel.leases import NoFreeSubnetError, pick_subnet
from flynn_flannel.types import ConfigError, FlannelState, Lease, NetworkConfig


def net(s: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(s)


def test_defaults() -> None:
    c = NetworkConfig.make()
    assert c.to_json() == {
        "Network": "100.100.0.0/16",
        "SubnetLen": 24,
        "SubnetMin": "100.100.1.0",
        "SubnetMax": "100.100.255.0",
        "Backend": {"Type": "vxlan", "VNI": 1},
    }
    subnets = c.subnets()
    assert subnets[0] == net("100.100.1.0/24") and len(subnets) == 255
    assert NetworkConfig.from_json(c.to_json()) == c


def test_network_override_and_small_networks() -> None:
    assert NetworkConfig.make("10.5.0.0/16", "alloc").to_json()["Backend"]["Type"] == "alloc"
    small = NetworkConfig.make("10.9.8.0/25")
    assert small.subnet_len == 26
    assert small.subnets() == [net("10.9.8.64/26")]  # the first is skipped
    assert NetworkConfig.make("10.9.8.0/24").subnet_len == 25
    assert NetworkConfig.make("10.9.0.0/23").subnet_len == 24


@pytest.mark.parametrize(
    ("network", "backend", "message"),
    [
        ("100.100.0.0/33", "", "not a valid IPv4 CIDR"),
        ("banana", "", "not a valid IPv4 CIDR"),
        ("100.100.0.1/16", "", "not a valid IPv4 CIDR"),  # host bits set
        ("10.0.0.0/29", "", "too small"),
        ("100.100.0.0/16", "host-gw", "not supported"),
        ("100.100.0.0/16", "udp", "not supported"),
    ],
)
def test_invalid_config(network: str, backend: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NetworkConfig.make(network, backend)


def test_stored_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        NetworkConfig.from_json({"Network": "nope"})
    with pytest.raises(ConfigError, match="outside"):
        NetworkConfig.from_json({"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"})


def test_lease_json_round_trip() -> None:
    lease = Lease(
        net("100.100.3.0/24"), "10.0.0.2", 5002, "vxlan", {"VtepMAC": "aa:bb:cc:dd:ee:ff"}
    )
    raw = FlannelState(NetworkConfig.make(), {lease.key: lease}).to_json()
    assert list(raw["subnets"]) == ["100.100.3.0-24"]
    assert raw["subnets"]["100.100.3.0-24"]["Expiration"].endswith("Z")
    back = FlannelState.from_json(raw)
    assert back.lease_of("10.0.0.2").subnet == lease.subnet
    assert back.lease_of("10.0.0.2").vtep_mac == "aa:bb:cc:dd:ee:ff"
    assert lease.gateway == "100.100.3.1"


def test_pick_subnet_skips_taken_and_reuses_expired() -> None:
    c = NetworkConfig.make("10.7.0.0/22")  # subnets .1, .2, .3 (/24); .0 skipped
    past = datetime.now(UTC) - timedelta(seconds=1)
    leases = {
        "a": Lease(net("10.7.1.0/24"), "1.1.1.1"),
        "b": Lease(net("10.7.2.0/24"), "1.1.1.2", expiration=past),
    }
    assert pick_subnet(c, leases) == net("10.7.2.0/24")
    leases["b"].expiration = datetime.now(UTC) + timedelta(hours=1)
    assert pick_subnet(c, leases) == net("10.7.3.0/24")
    leases["c"] = Lease(net("10.7.3.0/24"), "1.1.1.3")
    with pytest.raises(NoFreeSubnetError):
        pick_subnet(c, leases)
