"""flannel's data, as it is stored in the meta of discoverd service `flannel`
(docs/flannel.md#the-service-meta): the
network config every host shares, and one lease per host, keyed by subnet:

    {"config": {"Network": "100.100.0.0/16", "SubnetLen": 24, "SubnetMin": "100.100.1.0",
                "SubnetMax": "100.100.255.0", "Backend": {"Type": "vxlan", "VNI": 1}},
     "subnets": {"100.100.3.0-24": {"PublicIP": "10.0.0.2", "HTTPPort": 5002,
                                    "BackendType": "vxlan",
                                    "BackendData": {"VtepMAC": "aa:bb:cc:dd:ee:ff"},
                                    "Expiration": "2026-11-28T08:00:00Z"}}}
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

SERVICE = "flannel"
DEFAULT_NETWORK = "100.100.0.0/16"
DEFAULT_BACKEND = "vxlan"
BACKENDS = ("vxlan", "alloc")
DEFAULT_VNI = 1
LEASE_TTL = timedelta(hours=24)
RENEW_MARGIN = timedelta(hours=1)
SMALLEST_NETWORK_PREFIX = 28  # a /28 split in two /29s leaves one usable subnet


class ConfigError(ValueError):
    """The network config (from flags, environment or discoverd) is unusable; says why."""


def _ip(value: Any, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError) as e:
        raise ConfigError(f"{what}: {value!r} is not an IPv4 address") from e


@dataclass(frozen=True)
class NetworkConfig:
    """The overlay network and how it is cut into per-host subnets. Build with `make()`,
    which fills in the defaults and validates, or `from_json()` for a stored one."""

    network: ipaddress.IPv4Network
    subnet_len: int
    subnet_min: ipaddress.IPv4Address
    subnet_max: ipaddress.IPv4Address
    backend: str = DEFAULT_BACKEND
    vni: int = DEFAULT_VNI
    port: int = 0  # vxlan UDP port; 0 is the kernel's default (8472)

    @classmethod
    def make(
        cls, network: str = "", backend: str = "", vni: int = DEFAULT_VNI, port: int = 0
    ) -> NetworkConfig:
        network = network or DEFAULT_NETWORK
        try:
            net = ipaddress.IPv4Network(network, strict=True)
        except ValueError as e:
            raise ConfigError(f"network {network!r} is not a valid IPv4 CIDR: {e}") from e
        if net.prefixlen > SMALLEST_NETWORK_PREFIX:
            raise ConfigError(
                f"network {net} is too small: the smallest is a /{SMALLEST_NETWORK_PREFIX}"
            )
        subnet_len = 24 if net.prefixlen < 24 else net.prefixlen + 1
        size = 1 << (32 - subnet_len)
        # the first subnet is skipped (its .0 would be the network's own address)
        first = net.network_address + size
        last = net.broadcast_address + 1 - size
        return cls(net, subnet_len, first, last, backend or DEFAULT_BACKEND, vni, port).checked()

    def checked(self) -> NetworkConfig:
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"backend {self.backend!r} is not supported (supported: {', '.join(BACKENDS)})"
            )
        if not self.network.prefixlen < self.subnet_len <= 30:
            raise ConfigError(f"SubnetLen {self.subnet_len} does not fit network {self.network}")
        for name, ip in (("SubnetMin", self.subnet_min), ("SubnetMax", self.subnet_max)):
            if ip not in self.network:
                raise ConfigError(f"{name} {ip} is outside network {self.network}")
        if self.subnet_min > self.subnet_max:
            raise ConfigError(f"SubnetMin {self.subnet_min} is above SubnetMax {self.subnet_max}")
        if not 0 < self.vni < 1 << 24:
            raise ConfigError(f"VNI {self.vni} must be between 1 and 16777215")
        return self

    @classmethod
    def from_json(cls, raw: Any) -> NetworkConfig:
        if not isinstance(raw, dict):
            raise ConfigError("flannel config must be a JSON object")
        try:
            net = ipaddress.IPv4Network(raw.get("Network", ""), strict=True)
        except ValueError as e:
            raise ConfigError(f"Network {raw.get('Network')!r} is not a valid CIDR") from e
        defaults = cls.make(str(net))
        backend = raw.get("Backend") or {}
        try:
            return cls(
                network=net,
                subnet_len=int(raw.get("SubnetLen") or defaults.subnet_len),
                subnet_min=_ip(raw.get("SubnetMin") or defaults.subnet_min, "SubnetMin"),
                subnet_max=_ip(raw.get("SubnetMax") or defaults.subnet_max, "SubnetMax"),
                backend=str(backend.get("Type") or DEFAULT_BACKEND),
                vni=int(backend.get("VNI") or DEFAULT_VNI),
                port=int(backend.get("Port") or 0),
            ).checked()
        except (TypeError, ValueError, AttributeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"flannel config is malformed: {e}") from e

    def to_json(self) -> dict[str, Any]:
        backend: dict[str, Any] = {"Type": self.backend, "VNI": self.vni}
        if self.port:
            backend["Port"] = self.port
        return {
            "Network": str(self.network),
            "SubnetLen": self.subnet_len,
            "SubnetMin": str(self.subnet_min),
            "SubnetMax": str(self.subnet_max),
            "Backend": backend,
        }

    def subnets(self) -> list[ipaddress.IPv4Network]:
        """Every subnet hosts may lease, lowest first."""
        size = 1 << (32 - self.subnet_len)
        out = []
        ip = self.subnet_min
        while ip <= self.subnet_max:
            out.append(ipaddress.IPv4Network(f"{ip}/{self.subnet_len}"))
            ip += size
        return out


def subnet_key(subnet: ipaddress.IPv4Network) -> str:
    """`100.100.3.0/24` is stored as `100.100.3.0-24` (a `/` cannot be in the key)."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(key.replace("-", "/"), strict=True)


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class Lease:
    """One host's subnet: where its VTEP answers (`public_ip`, `vtep_mac`) and its HTTP port."""

    subnet: ipaddress.IPv4Network
    public_ip: str
    http_port: int = 0
    backend_type: str = DEFAULT_BACKEND
    backend_data: dict[str, Any] = field(default_factory=dict)
    expiration: datetime = field(default_factory=lambda: datetime.now(UTC) + LEASE_TTL)

    @property
    def key(self) -> str:
        return subnet_key(self.subnet)

    @property
    def vtep_mac(self) -> str:
        return str(self.backend_data.get("VtepMAC", ""))

    @property
    def gateway(self) -> str:
        """The subnet's .1: the host bridge's address, what `FLANNEL_SUBNET` names."""
        return str(self.subnet.network_address + 1)

    def expired(self, now: datetime | None = None) -> bool:
        return self.expiration <= (now or datetime.now(UTC))

    @classmethod
    def from_json(cls, key: str, raw: Any) -> Lease:
        if not isinstance(raw, dict):
            raise ConfigError(f"lease {key} must be a JSON object")
        try:
            expiration = parse_time(raw["Expiration"]) if raw.get("Expiration") else None
            return cls(
                subnet=parse_subnet_key(key),
                public_ip=str(_ip(raw.get("PublicIP"), f"lease {key} PublicIP")),
                http_port=int(raw.get("HTTPPort") or 0),
                backend_type=str(raw.get("BackendType") or DEFAULT_BACKEND),
                backend_data=dict(raw.get("BackendData") or {}),
                # a lease without an expiry never expires (as one stored far in the future)
                expiration=expiration or datetime.max.replace(tzinfo=UTC),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"lease {key} is malformed: {e}") from e

    def to_json(self) -> dict[str, Any]:
        return {
            "PublicIP": self.public_ip,
            "HTTPPort": self.http_port,
            "BackendType": self.backend_type,
            "BackendData": self.backend_data,
            "Expiration": format_time(self.expiration),
        }


@dataclass
class FlannelState:
    """The whole of service `flannel`'s meta `data`: config and leases."""

    config: NetworkConfig | None
    leases: dict[str, Lease] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any) -> FlannelState:
        if not isinstance(raw, dict):
            return cls(None)
        config = NetworkConfig.from_json(raw["config"]) if raw.get("config") else None
        leases = {}
        for key, value in (raw.get("subnets") or {}).items():
            leases[key] = Lease.from_json(key, value)
        return cls(config, leases)

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json() if self.config else None,
            "subnets": {k: lease.to_json() for k, lease in sorted(self.leases.items())},
        }

    def lease_of(self, public_ip: str) -> Lease | None:
        for lease in self.leases.values():
            if lease.public_ip == public_ip:
                return lease
        return None
