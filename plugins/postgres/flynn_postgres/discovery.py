"""The node and discoverd: finding the cluster's etcd through discoverd (`find_etcd`), and
keeping this node's instance in discoverd service `<scope>` with the service's leader on
Patroni's primary (`Registration`), so `leader.<scope>.discoverd` is the primary and nothing
else (docs/postgres.md#discoverd).

The rule is `decide`, a pure function of what Patroni says about this node and who discoverd's
leader is. The primary registers and makes itself leader. A node that stops being the primary
while it may be the leader deregisters at once: discoverd's manual leader is an instance id,
and an instance id is a hash of the address, so the only way to stop being leader without
naming another instance is for the instance to go. It registers again (as a replica) only once
another instance leads, since re-registering its address earlier would bring back the same id
the leader key may still name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from enum import Enum
from urllib.parse import urlsplit

import aiohttp
from flynn_discoverd.client import (
    Client,
    DiscoverdError,
    Heartbeater,
    HeartbeatTiming,
    ObjectExistsError,
    UnreachableError,
    env_instance_meta,
)
from flynn_discoverd.types import ETCD_CLIENT_PORT_OFFSET, LEADER_MANUAL, instance_id

from flynn_postgres.patroni import NodeState

log = logging.getLogger("postgres")

DISCOVERD_PORT = 1111
MASTER = "master"  # the instance role of the primary: Patroni 3.0.2's word for it
# errors discoverd calls raise when it is away or refuses; the node retries on its next look
DISCOVERD_ERRORS = (UnreachableError, DiscoverdError, aiohttp.ClientError, TimeoutError, OSError)


class DiscoveryError(Exception):
    """The etcd members could not be found through discoverd."""


# ---- etcd through discoverd ------------------------------------------------------------------


def etcd_hosts_from_peers(peers: list[str]) -> list[str]:
    """etcd client endpoints (`host:port`) from discoverd's `/raft/peers` (`ip:port` or
    `http://ip:port`, the nodes' API addresses): each node's etcd listens on its API port +
    1268. Order kept, duplicates dropped."""
    hosts: list[str] = []
    for peer in peers:
        parsed = urlsplit(peer if "://" in peer else f"//{peer}")
        try:
            port = parsed.port or DISCOVERD_PORT
        except ValueError:
            continue
        if not parsed.hostname:
            continue
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        endpoint = f"{host}:{port + ETCD_CLIENT_PORT_OFFSET}"
        if endpoint not in hosts:
            hosts.append(endpoint)
    return hosts


async def find_etcd(
    client: Client, within: float = 120.0, every: float = 0.5, log_every: float = 5.0
) -> list[str]:
    """The etcd endpoints of discoverd's nodes, asking until discoverd answers with at least
    one (a node may start while discoverd is still coming up on a booting cluster), for at
    most `within` s; raises DiscoveryError naming the last problem."""
    deadline = time.monotonic() + within
    logged = 0.0
    while True:
        try:
            hosts = etcd_hosts_from_peers(await client.raft_peers())
            if hosts:
                return hosts
            problem = "discoverd lists no peers"
        except DISCOVERD_ERRORS as exc:
            problem = str(exc) or type(exc).__name__
        now = time.monotonic()
        if now >= deadline:
            raise DiscoveryError(
                f"no etcd endpoints from discoverd ({', '.join(client.urls)}) within "
                f"{within:.0f}s: {problem}"
            )
        if now - logged >= log_every:
            log.info("waiting for discoverd to list its etcd members: %s", problem)
            logged = now
        await asyncio.sleep(every)


# ---- registration and the leader -------------------------------------------------------------


class Action(Enum):
    NONE = "none"
    REGISTER = "register"  # with the node's current role
    SET_LEADER = "set_leader"
    UPDATE_META = "update_meta"  # the registered role is not the current one
    STEP_DOWN = "step_down"  # deregister: stop being (or possibly being) the leader


def instance_role(state: NodeState | None) -> str | None:
    """The `role` an instance of this node shows in discoverd: `master` for the running
    primary, else what Patroni reports (`replica`, ...); None while that is unknown or in
    between: Patroni does not answer, or PostgreSQL is still a primary that Patroni no longer
    leads (it is about to demote)."""
    if state is None:
        return None
    if state.is_primary:
        return MASTER
    if state.role in ("master", "primary", ""):
        return None
    return state.role


def decide(
    role: str | None, registered: str | None, leader: str | None, me: str, stopping: bool
) -> Action:
    """The next step for this node's instance. `role`: `instance_role` now; `registered`: the
    role the registered instance shows (None: not registered); `leader`: discoverd's leader's
    instance id as last read (None: none or unknown); `me`: this node's instance id;
    `stopping`: the node is shutting down and only leaves.

    The primary registers and leads. Anything else that may lead (registered as the primary,
    or discoverd's leader) leaves at once. A non-primary joins only once another instance
    leads (see the module docstring)."""
    if role == MASTER:
        if stopping:
            return Action.NONE
        if registered is None:
            return Action.REGISTER
        if leader != me:
            return Action.SET_LEADER
        return Action.UPDATE_META if registered != MASTER else Action.NONE
    if registered == MASTER or (registered is not None and leader == me):
        return Action.STEP_DOWN
    if role is None or stopping:
        return Action.NONE
    if registered is None:
        return Action.REGISTER if leader is not None and leader != me else Action.NONE
    return Action.UPDATE_META if registered != role else Action.NONE


class Registration:
    """This node's instance (`addr` = PostgreSQL's `ip:port`) in discoverd service `scope`,
    moved by `step` (called with each look at Patroni) according to `decide`. Errors from
    discoverd are logged and the step is tried again on the next look."""

    def __init__(self, client: Client, scope: str, addr: str, name: str) -> None:
        self.client = client
        self.scope = scope
        self.addr = addr
        self.name = name
        self.me = instance_id("tcp", addr)
        self.stopping = False
        self._service_made = False
        self._hb: Heartbeater | None = None
        self._registered: str | None = None
        self._leader: str | None = None
        self._lock = asyncio.Lock()  # a step and close() never interleave
        self._last_error = ""
        self._last_error_at = 0.0

    def meta(self, role: str) -> dict[str, str]:
        """The instance's meta, with the job's FLYNN_* variables as `register` adds them (a
        meta update replaces the whole meta)."""
        return {"POSTGRES_ID": self.name, "role": role, **env_instance_meta()}

    async def step(self, state: NodeState | None) -> None:
        """Act on one look at Patroni: as many actions as it takes (at most a few), so a
        promotion becomes a registration and a leader change in the same look."""
        async with self._lock:
            try:
                await self._step(instance_role(state))
            except DISCOVERD_ERRORS as exc:
                self._log_error(exc)

    async def _step(self, role: str | None) -> None:
        if not self._service_made and not self.stopping:
            with contextlib.suppress(ObjectExistsError):
                await self.client.add_service(self.scope, LEADER_MANUAL)
            self._service_made = True
        if role == MASTER or (self._registered is None and role is not None):
            leader = await self.client.leader(self.scope)
            self._leader = leader.id if leader is not None else None
        for _ in range(4):
            action = decide(role, self._registered, self._leader, self.me, self.stopping)
            if action is Action.NONE:
                return
            await self._do(action, role)

    async def _do(self, action: Action, role: str | None) -> None:
        if action is Action.REGISTER:
            assert role is not None
            # one attempt: the next look tries again, so Patroni's changes are never missed
            # behind a registration that retries for a minute
            timing = HeartbeatTiming(register_timeout=0.0)
            self._hb = await self.client.register(
                self.scope, self.addr, meta=self.meta(role), timing=timing
            )
            self._registered = role
            log.info("discoverd: registered %s in %s as %s", self.addr, self.scope, role)
        elif action is Action.SET_LEADER:
            await self.client.set_leader(self.scope, self.me)
            self._leader = self.me
            log.info(
                "discoverd: %s is now the leader of %s (Patroni's primary)", self.addr, self.scope
            )
        elif action is Action.UPDATE_META:
            assert self._hb is not None and role is not None
            await self._hb.set_meta(self.meta(role))
            self._registered = role
        elif action is Action.STEP_DOWN:
            await self._deregister()
            log.info("discoverd: %s left %s: this node is not the primary", self.addr, self.scope)

    async def _deregister(self) -> None:
        """Delete the instance (the heartbeater's close). Forgotten here even if discoverd did
        not answer: its lease then lapses within the TTL, and no heartbeat renews it."""
        hb, self._hb, self._registered = self._hb, None, None
        self._leader = None
        if hb is not None:
            await hb.close()

    def _log_error(self, exc: BaseException) -> None:
        """One line per new problem, or every 5 s while it lasts (the node looks several
        times a second)."""
        text = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if text != self._last_error or now - self._last_error_at >= 5.0:
            log.warning("discoverd: %s", text)
            self._last_error, self._last_error_at = text, now

    async def close(self) -> None:
        """Leave discoverd (the node stops)."""
        async with self._lock:
            self.stopping = True
            await self._deregister()
        await self.client.close()
