"""discoverd's types, with Flynn's JSON (docs/discoverd.md#types): instances, service config
and metadata, and the events streamed to watchers. Other components import these through this
module."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from flynn_host.errors import ValidationError

# fullmatch, not `$`, which also matches before a trailing newline
SERVICE_NAME_RE = re.compile(r"[a-z0-9-]+")
PROTO_RE = re.compile(r"[a-z0-9]+")

DEFAULT_TTL = 10.0  # seconds an instance lives without a heartbeat (Flynn's DefaultInstanceTTL)

# event kinds, as Flynn serialises them
UP = "up"
UPDATE = "update"
DOWN = "down"
LEADER = "leader"
CURRENT = "current"
SERVICE_META = "service_meta"
EVENT_KINDS = (UP, UPDATE, DOWN, LEADER, CURRENT, SERVICE_META)

LEADER_OLDEST = "oldest"
LEADER_MANUAL = "manual"

# each node's etcd member listens beside its API port: clients on port + 1268 and peers on
# port + 1269 (2379 and 2380 for 1111), so a node's API address (`/raft/peers`) is enough to
# find its etcd
ETCD_CLIENT_PORT_OFFSET = 1268
ETCD_PEER_PORT_OFFSET = 1269


def check_service_name(name: str) -> str:
    if not SERVICE_NAME_RE.fullmatch(name or ""):
        raise ValidationError("service", "name must match [a-z0-9-]+")
    return name


def instance_id(proto: str, addr: str) -> str:
    """Flynn's instance id: hex MD5 of `proto-addr` (docs/discoverd.md#types)."""
    return hashlib.md5(f"{proto}-{addr}".encode()).hexdigest()


@dataclass
class Instance:
    """A registered instance of a service. `index` is the order of its first registration
    (unique, increasing, stable while it lives): the etcd create revision of its key."""

    addr: str
    proto: str = "tcp"
    meta: dict[str, str] = field(default_factory=dict)
    id: str = ""
    index: int = 0

    def __post_init__(self) -> None:
        if not self.id:
            self.id = instance_id(self.proto, self.addr)

    @classmethod
    def from_json(cls, raw: Any, expected_id: str | None = None) -> Instance:
        if not isinstance(raw, dict):
            raise ValidationError("", "instance must be a JSON object")
        addr, proto = raw.get("addr"), raw.get("proto") or "tcp"
        if not isinstance(addr, str) or not re.fullmatch(r".+:\d{1,5}", addr):
            raise ValidationError("addr", "must be host:port")
        if not isinstance(proto, str) or not PROTO_RE.fullmatch(proto):
            raise ValidationError("proto", "must be lower-case letters and digits")
        meta = raw.get("meta") or {}
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise ValidationError("meta", "must be an object of strings")
        want = instance_id(proto, addr)
        given = raw.get("id") or want
        if given != want or (expected_id is not None and expected_id != want):
            raise ValidationError("id", f"must be md5(proto-addr) = {want}")
        index = raw.get("index") or 0
        return cls(addr=addr, proto=proto, meta=dict(meta), id=want, index=int(index))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "addr": self.addr,
            "proto": self.proto,
            "meta": self.meta,
            "index": self.index,
        }

    @property
    def host(self) -> str:
        return self.addr.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])


@dataclass
class ServiceConfig:
    leader_type: str = LEADER_OLDEST

    @classmethod
    def from_json(cls, raw: Any) -> ServiceConfig:
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ValidationError("", "service config must be a JSON object")
        leader_type = raw.get("leader_type") or LEADER_OLDEST
        if leader_type not in (LEADER_OLDEST, LEADER_MANUAL):
            raise ValidationError("leader_type", "must be oldest or manual")
        return cls(leader_type=leader_type)

    def to_json(self) -> dict[str, Any]:
        return {"leader_type": self.leader_type}


@dataclass
class ServiceMeta:
    """Service metadata with compare-and-swap on `index`: 0 creates only; otherwise it must
    equal the current index. `leader_id` (write only) sets a manual leader atomically."""

    data: Any = None
    index: int = 0
    leader_id: str | None = None

    @classmethod
    def from_json(cls, raw: Any) -> ServiceMeta:
        if not isinstance(raw, dict):
            raise ValidationError("", "service meta must be a JSON object")
        index = raw.get("index", 0)
        if not isinstance(index, int) or index < 0:
            raise ValidationError("index", "must be a non-negative integer")
        leader_id = raw.get("leader_id") or None
        if leader_id is not None and not isinstance(leader_id, str):
            raise ValidationError("leader_id", "must be an instance id")
        return cls(data=raw.get("data"), index=index, leader_id=leader_id)

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data, "index": self.index}


@dataclass
class Event:
    service: str
    kind: str
    instance: Instance | None = None
    service_meta: ServiceMeta | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"service": self.service, "kind": self.kind}
        if self.instance is not None:
            out["instance"] = self.instance.to_json()
        if self.service_meta is not None:
            out["service_meta"] = self.service_meta.to_json()
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Event:
        inst = raw.get("instance")
        meta = raw.get("service_meta")
        return cls(
            service=raw["service"],
            kind=raw["kind"],
            instance=Instance.from_json(inst) if inst else None,
            service_meta=ServiceMeta.from_json(meta) if meta else None,
        )
