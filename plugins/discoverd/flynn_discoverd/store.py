"""Flynn's service registry kept entirely in etcd, so any discoverd node can serve any request.

Key layout, under a prefix (default `/discoverd`):

    services/<svc>/config          ServiceConfig JSON (+ "write"); its existence is the service's
    services/<svc>/meta            {"data", "write"}; index = the key's mod_revision
    services/<svc>/leader          manual leader: an instance id
    services/<svc>/instances/<id>  {"addr","proto","meta"}, attached to a lease of the TTL;
                                   index = the key's create_revision
    nodes/<etcd member name>       the discoverd HTTP address of that member's node

A heartbeat refreshes the instance's lease (the key, hence its index, stays); an instance whose
lease expires is deleted by etcd and watchers see `down`. Writes that depend on the service
existing, and the meta compare-and-swap, are single etcd transactions. Events come from one
etcd watch per subscriber, replayed against a snapshot taken at a known revision, so they are
in order with no gaps.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from flynn_discoverd.etcd import (
    KV,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    compare,
    op_delete,
    op_put,
    op_range,
    range_kvs,
)
from flynn_discoverd.types import (
    CURRENT,
    DEFAULT_TTL,
    DOWN,
    LEADER,
    LEADER_MANUAL,
    SERVICE_META,
    UP,
    UPDATE,
    Event,
    Instance,
    ServiceConfig,
    ServiceMeta,
    check_service_name,
)
from flynn_host.errors import FlynnError, ValidationError, not_found

DISCOVERD_PORT = 1111
ETCD_PEER_PORT = 2380


def instance_value(inst: Instance) -> str:
    return json.dumps({"addr": inst.addr, "proto": inst.proto, "meta": inst.meta}, sort_keys=True)


def instance_from_kv(inst_id: str, kv: KV) -> Instance:
    raw = json.loads(kv.value)
    return Instance(
        addr=raw["addr"],
        proto=raw.get("proto", "tcp"),
        meta=raw.get("meta") or {},
        id=inst_id,
        index=kv.create_revision,
    )


@dataclass
class ServiceState:
    """One service as etcd holds it at a revision; `apply` moves it forward by one key change
    and says which Flynn events that change is."""

    name: str
    config: ServiceConfig | None = None
    instances: dict[str, Instance] = field(default_factory=dict)
    meta: ServiceMeta | None = None
    manual_leader: str | None = None

    def apply(self, suffix: str, kv: KV, deleted: bool) -> list[Event]:
        if suffix == "config":
            self.config = None if deleted else ServiceConfig.from_json(json.loads(kv.value))
        elif suffix == "leader":
            self.manual_leader = None if deleted else kv.value.decode()
        elif suffix == "meta":
            if deleted:
                self.meta = None
                return []
            self.meta = ServiceMeta(data=json.loads(kv.value)["data"], index=kv.mod_revision)
            return [Event(self.name, SERVICE_META, service_meta=self.meta)]
        elif suffix.startswith("instances/"):
            inst_id = suffix.removeprefix("instances/")
            old = self.instances.get(inst_id)
            if deleted:
                if old is None:
                    return []
                del self.instances[inst_id]
                return [Event(self.name, DOWN, instance=old)]
            inst = instance_from_kv(inst_id, kv)
            self.instances[inst_id] = inst
            if old is None:
                return [Event(self.name, UP, instance=inst)]
            if old.to_json() != inst.to_json():
                return [Event(self.name, UPDATE, instance=inst)]
        return []

    def leader(self) -> Instance | None:
        if self.config is not None and self.config.leader_type == LEADER_MANUAL:
            return self.instances.get(self.manual_leader or "")
        if not self.instances:
            return None
        return min(self.instances.values(), key=lambda i: i.index)

    def current_events(self, kinds: set[str], with_current: bool) -> list[Event]:
        """The state as events, for a new subscriber: up…, leader, service_meta, current."""
        out = [
            Event(self.name, UP, instance=i)
            for i in sorted(self.instances.values(), key=lambda i: i.index)
        ]
        leader = self.leader()
        if leader is not None:
            out.append(Event(self.name, LEADER, instance=leader))
        if self.meta is not None:
            out.append(Event(self.name, SERVICE_META, service_meta=self.meta))
        out = [e for e in out if e.kind in kinds]
        if with_current:
            out.append(Event(self.name, CURRENT))
        return out


class Store:
    """discoverd's operations on etcd. Errors a client can cause are `FlynnError`s; an etcd
    that cannot answer raises `EtcdUnavailable` (the server makes it a 503)."""

    def __init__(
        self,
        etcd: EtcdClient,
        prefix: str = "/discoverd",
        ttl: float = DEFAULT_TTL,
        node_name: str | None = None,
        advertise: str | None = None,
    ) -> None:
        self.etcd = etcd
        self.prefix = prefix.rstrip("/")
        self.ttl = ttl
        self.node_name = node_name
        self.advertise = advertise

    @property
    def revision(self) -> int:
        return self.etcd.revision

    async def start(self) -> None:
        """Publishes this node's etcd member name → discoverd address (for /raft/*)."""
        if self.node_name and self.advertise:
            await self.etcd.put(self._node_key(self.node_name), self.advertise)

    async def close(self) -> None:
        await self.etcd.close()

    # keys

    def _svc(self, service: str) -> str:
        return f"{self.prefix}/services/{check_service_name(service)}/"

    def _config(self, service: str) -> str:
        return self._svc(service) + "config"

    def _inst(self, service: str, inst_id: str) -> str:
        return self._svc(service) + "instances/" + inst_id

    def _node_key(self, name: str) -> str:
        return f"{self.prefix}/nodes/{name}"

    def _exists(self, service: str) -> dict[str, Any]:
        return compare(self._config(service), "CREATE", 0, "GREATER")

    # services

    async def add_service(self, service: str, config: ServiceConfig) -> int:
        key = self._config(service)
        write = uuid.uuid4().hex  # tells our own retried write from another's (see set_meta)
        value = json.dumps({**config.to_json(), "write": write})
        ok, resp, rev = await self.etcd.txn(
            [compare(key, "CREATE", 0)], [op_put(key, value)], [op_range(key)]
        )
        if not ok:
            current = range_kvs(resp[0])
            if current and json.loads(current[0].value).get("write") == write:
                return current[0].mod_revision
            raise FlynnError("object_exists", f"service {service!r} already exists")
        return rev

    async def remove_service(self, service: str) -> int:
        ok, _, rev = await self.etcd.txn(
            [self._exists(service)], [op_delete(self._svc(service), prefix=True)]
        )
        if not ok:
            raise not_found(f"service {service!r} not found")
        return rev

    async def state(self, service: str) -> tuple[ServiceState, int]:
        """A snapshot of the service and the revision it was read at (404 if unknown)."""
        prefix = self._svc(service)
        kvs, rev = await self.etcd.range(prefix, prefix=True)
        state = ServiceState(service)
        for kv in kvs:
            state.apply(kv.key.removeprefix(prefix), kv, deleted=False)
        if state.config is None:
            raise not_found(f"service {service!r} not found")
        return state, rev

    # instances

    async def register(self, service: str, inst: Instance) -> Instance:
        """Registers an instance, or heartbeats it if it is registered: its lease is refreshed
        so its key, and its index, survive."""
        key, value = self._inst(service, inst.id), instance_value(inst)
        ok, resp, _ = await self.etcd.txn([self._exists(service)], [op_range(key)])
        if not ok:
            raise not_found(f"service {service!r} not found")
        kvs = range_kvs(resp[0])
        old = kvs[0] if kvs else None
        if old is not None and old.lease and await self.etcd.lease_keepalive(old.lease) > 0:
            if old.value == value.encode():
                return Instance(inst.addr, inst.proto, inst.meta, inst.id, old.create_revision)
            ok, _, _ = await self.etcd.txn(
                [self._exists(service), compare(key, "MOD", old.mod_revision)],
                [op_put(key, value, old.lease)],
            )
            if ok:
                return Instance(inst.addr, inst.proto, inst.meta, inst.id, old.create_revision)
        lease = await self.etcd.lease_grant(self.ttl)
        ok, resp, _ = await self.etcd.txn(
            [self._exists(service)], [op_put(key, value, lease), op_range(key)]
        )
        if not ok:
            await self.etcd.lease_revoke(lease)
            raise not_found(f"service {service!r} not found")
        index = range_kvs(resp[1])[0].create_revision
        return Instance(inst.addr, inst.proto, inst.meta, inst.id, index)

    async def deregister(self, service: str, inst_id: str) -> int:
        key = self._inst(service, inst_id)
        ok, resp, rev = await self.etcd.txn(
            [self._exists(service)], [op_range(key), op_delete(key)], [op_range(key)]
        )
        if not ok:
            raise not_found(f"service {service!r} not found")
        kvs = range_kvs(resp[0])
        if not kvs:
            raise not_found(f"instance {inst_id!r} not found")
        if kvs[0].lease:
            await self.etcd.lease_revoke(kvs[0].lease)
        return rev

    async def instances(self, service: str) -> list[Instance]:
        state, _ = await self.state(service)
        return sorted(state.instances.values(), key=lambda i: i.index)

    # leader

    async def leader(self, service: str) -> Instance | None:
        state, _ = await self.state(service)
        return state.leader()

    async def set_leader(self, service: str, inst_id: str) -> int:
        state, _ = await self.state(service)
        if state.config is None or state.config.leader_type != LEADER_MANUAL:
            raise ValidationError("leader_type", "must be manual to set the leader")
        key = self._svc(service) + "leader"
        ok, _, rev = await self.etcd.txn([self._exists(service)], [op_put(key, inst_id)])
        if not ok:
            raise not_found(f"service {service!r} not found")
        return rev

    # metadata

    async def get_meta(self, service: str) -> ServiceMeta:
        state, _ = await self.state(service)
        if state.meta is None:
            raise not_found(f"service {service!r} has no metadata")
        return state.meta

    async def set_meta(self, service: str, meta: ServiceMeta) -> ServiceMeta:
        """Compare-and-swap: index 0 creates only, otherwise it must be the current index.

        Each write carries a unique id: if etcd applied it but the answer was lost and the
        client retried on another member, the retry fails its compare yet finds its own write,
        and reports success rather than a false conflict."""
        key = self._svc(service) + "meta"
        write = uuid.uuid4().hex
        cas = compare(key, "CREATE", 0) if meta.index == 0 else compare(key, "MOD", meta.index)
        ops = [op_put(key, json.dumps({"data": meta.data, "write": write}))]
        if meta.leader_id:
            ops.append(op_put(self._svc(service) + "leader", meta.leader_id))
        ok, resp, rev = await self.etcd.txn(
            [self._exists(service), cas], ops, [op_range(self._config(service)), op_range(key)]
        )
        if not ok:
            if not range_kvs(resp[0]):
                raise not_found(f"service {service!r} not found")
            current = range_kvs(resp[1])
            if current and json.loads(current[0].value).get("write") == write:
                return ServiceMeta(data=meta.data, index=current[0].mod_revision)
            if meta.index == 0:
                raise FlynnError("object_exists", "service metadata already exists")
            raise FlynnError("precondition_failed", f"service metadata index is not {meta.index}")
        return ServiceMeta(data=meta.data, index=rev)

    # events

    async def events(self, state: ServiceState, revision: int) -> AsyncIterator[Event]:
        """Every change to the service after `revision` as Flynn events, applied to `state`,
        in revision order. A `leader` event follows each revision that changes the leader.
        Ends after the service is deleted (with `down` for each of its instances)."""
        prefix = self._svc(state.name)
        leader = state.leader()
        async for batch in self.etcd.watch(prefix, prefix=True, start_revision=revision + 1):
            i = 0
            while i < len(batch):
                rev = batch[i].kv.mod_revision
                while i < len(batch) and batch[i].kv.mod_revision == rev:
                    ev = batch[i]
                    deleted = ev.type == "DELETE"
                    for out in state.apply(ev.kv.key.removeprefix(prefix), ev.kv, deleted):
                        yield out
                    i += 1
                new = state.leader()
                if new is not None and (leader is None or new.id != leader.id):
                    yield Event(state.name, LEADER, instance=new)
                leader = new
            if state.config is None:
                return

    # the etcd cluster, seen as Flynn's raft peers

    async def _node_addrs(self) -> dict[str, str]:
        kvs, _ = await self.etcd.range(f"{self.prefix}/nodes/", prefix=True)
        return {kv.key.rsplit("/", 1)[1]: kv.value.decode() for kv in kvs}

    @staticmethod
    def _fallback_addr(member: dict[str, Any]) -> str:
        urls = member.get("clientURLs") or member.get("peerURLs") or [""]
        host = urlsplit(urls[0]).hostname or ""
        return f"{host}:{DISCOVERD_PORT}"

    async def raft_leader(self) -> str | None:
        leader_id = await self.etcd.leader_id()
        if leader_id is None:
            return None
        addrs = await self._node_addrs()
        for m in await self.etcd.member_list():
            if str(m.get("ID")) == leader_id:
                return addrs.get(m.get("name", ""), self._fallback_addr(m))
        return None

    async def raft_peers(self) -> list[str]:
        addrs = await self._node_addrs()
        return [
            addrs.get(m.get("name", ""), self._fallback_addr(m))
            for m in await self.etcd.member_list()
        ]

    async def add_peer(self, peer: str, peer_url: str | None = None) -> int:
        """Adds an etcd member for the discoverd node at `peer` (ip:port); its etcd peer URL
        defaults to http://ip:2380. The node then starts its member with cluster state
        `existing`."""
        host = peer.rsplit(":", 1)[0]
        url = peer_url or f"http://{host}:{ETCD_PEER_PORT}"
        for m in await self.etcd.member_list():
            if url in m.get("peerURLs", []):
                return self.revision
        try:
            await self.etcd.member_add([url])
        except EtcdUnavailable as exc:  # e.g. a cluster up for less than 5 s: "unhealthy"
            raise FlynnError(
                "service_unavailable", f"cannot add peer {peer}: {exc}", retry=True
            ) from exc
        except EtcdError as exc:
            raise FlynnError("validation_error", f"cannot add peer {peer}: {exc}") from exc
        return self.revision

    async def remove_peer(self, peer: str) -> None:
        addrs = await self._node_addrs()
        host = peer.rsplit(":", 1)[0]
        for m in await self.etcd.member_list():
            name = m.get("name", "")
            hosts = {urlsplit(u).hostname for u in m.get("peerURLs", [])}
            if addrs.get(name) == peer or (name not in addrs and host in hosts):
                await self.etcd.member_remove(m["ID"])
                if name:
                    await self.etcd.delete(self._node_key(name))
                return
        raise not_found(f"peer {peer!r} not found")
