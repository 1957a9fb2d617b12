"""Subnet leases in discoverd: the shared network config and one subnet per host, all in the
meta of service `flannel`, changed only by compare-and-swap on the meta's index, so hosts
leasing at the same moment never get the same subnet (the loser re-reads and tries again).

A host whose public IP already holds a lease keeps it, which is what lets a restarted flannel
keep its subnet and its jobs' addresses. Expired leases (hosts gone for a whole TTL without
renewing) are free to be taken again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flynn_discoverd.client import (
    Client,
    ObjectExistsError,
    PreconditionFailedError,
)
from flynn_discoverd.types import ServiceMeta

from flynn_flannel.types import (
    LEASE_TTL,
    SERVICE,
    ConfigError,
    FlannelState,
    Lease,
    NetworkConfig,
)

log = logging.getLogger("flannel")


class NoFreeSubnetError(Exception):
    """Every subnet of the network is leased."""


async def ensure_config(client: Client, wanted: NetworkConfig) -> NetworkConfig:
    """Create service `flannel` (if missing) and store `wanted` as the network config unless
    one is stored already: the first writer wins, and everyone returns the stored config."""
    with contextlib.suppress(ObjectExistsError):
        await client.add_service(SERVICE)
    while True:
        meta = await client.get_meta(SERVICE)
        state = FlannelState.from_json(meta.data if meta else None)
        if state.config is not None:
            return state.config
        state.config = wanted
        try:
            await client.set_meta(SERVICE, ServiceMeta(state.to_json(), meta.index if meta else 0))
            return wanted
        except (ObjectExistsError, PreconditionFailedError):
            continue  # someone else wrote first: read theirs


async def read_state(client: Client) -> tuple[FlannelState, int]:
    """The stored config and leases, and the meta index they were read at."""
    meta = await client.get_meta(SERVICE)
    if meta is None:
        raise ConfigError("service flannel has no meta: the network config is missing")
    state = FlannelState.from_json(meta.data)
    if state.config is None:
        raise ConfigError("service flannel's meta has no network config")
    return state, meta.index


def pick_subnet(
    config: NetworkConfig, leases: dict[str, Lease], now: datetime | None = None
) -> ipaddress.IPv4Network:
    """The lowest subnet no live lease holds."""
    taken = {lease.subnet for lease in leases.values() if not lease.expired(now)}
    for subnet in config.subnets():
        if subnet not in taken:
            return subnet
    raise NoFreeSubnetError(f"no free subnet left in {config.network}")


@dataclass
class Acquired:
    lease: Lease
    new: bool  # False when this host's earlier lease was kept
    config: NetworkConfig
    index: int  # the meta index after the write


async def acquire_lease(
    client: Client,
    public_ip: str,
    http_port: int,
    backend_type: str,
    backend_data: dict[str, Any],
    *,
    ttl: float | None = None,
) -> Acquired:
    """Lease a subnet for the host at `public_ip` (its own earlier one if it has one), or renew
    it: the expiry moves to now + TTL and the port and backend data are brought up to date."""
    lifetime = LEASE_TTL if ttl is None else timedelta(seconds=ttl)
    while True:
        state, index = await read_state(client)
        assert state.config is not None
        now = datetime.now(UTC)
        lease = state.lease_of(public_ip)
        new = lease is None or lease.expired(now) or lease.subnet not in state.config.subnets()
        if new:
            if lease is not None:  # expired or outside a changed network: start again
                del state.leases[lease.key]
            lease = Lease(pick_subnet(state.config, state.leases, now), public_ip)
        assert lease is not None
        lease.http_port = http_port
        lease.backend_type = backend_type
        lease.backend_data = dict(backend_data)
        lease.expiration = now + lifetime
        state.leases[lease.key] = lease
        try:
            stored = await client.set_meta(SERVICE, ServiceMeta(state.to_json(), index))
        except PreconditionFailedError:
            # another host changed the leases since we read them: read again
            await asyncio.sleep(random.uniform(0, 0.05))
            continue
        return Acquired(lease, new, state.config, stored.index)


async def release_lease(client: Client, public_ip: str) -> bool:
    """Remove the lease of the host at `public_ip` (for clean-up; flannel keeps its lease when
    it stops). Returns whether there was one."""
    while True:
        state, index = await read_state(client)
        lease = state.lease_of(public_ip)
        if lease is None:
            return False
        del state.leases[lease.key]
        try:
            await client.set_meta(SERVICE, ServiceMeta(state.to_json(), index))
            return True
        except PreconditionFailedError:
            continue
