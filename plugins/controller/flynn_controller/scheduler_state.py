"""What the scheduler believes, as data: formations, hosts and jobs as it knows them, the
restart counts, and Flynn's restart backoff (see `scheduler`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

ACTIVE = ("pending", "starting", "running")
HOST_STATE = {"starting": "starting", "running": "up", "done": "down", "crashed": "down",
              "failed": "down"}  # fmt: skip
ENDED = ("done", "crashed", "failed")


def restart_delay(restarts: int) -> float:
    """Flynn's backoff before restarting a job that stopped unexpectedly: the first five
    restarts at once, the next ten after 10 s, then every 30 s."""
    if restarts < 5:
        return 0.0
    if restarts < 15:
        return 10.0
    return 30.0


FormationKey = tuple[str, str]  # (app id, release id)


@dataclass
class Formation:
    app: dict[str, Any]
    release: dict[str, Any]
    artifact: dict[str, Any] | None
    processes: dict[str, int]
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    # the hosts a type may run on while a deployment moves it host by host (none: any)
    hosts: dict[str, list[str]] = field(default_factory=dict)

    @property
    def key(self) -> FormationKey:
        return (str(self.app["id"]), str(self.release["id"]))

    def process(self, typ: str) -> dict[str, Any]:
        return dict((self.release.get("processes") or {}).get(typ) or {})

    def omni(self, typ: str) -> bool:
        return bool(self.process(typ).get("omni"))

    def host_network(self, typ: str) -> bool:
        return bool(self.process(typ).get("host_network"))

    def volumes(self, typ: str) -> list[dict[str, Any]]:
        return list(self.process(typ).get("volumes") or [])

    def allows(self, typ: str, host_id: str) -> bool:
        only = self.hosts.get(typ)
        return only is None or host_id in only


@dataclass
class Host:
    id: str
    url: str
    tags: dict[str, str] = field(default_factory=dict)
    shutdown: bool = False
    healthy: bool = True
    checks: int = 0
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)

    def matches(self, tags: dict[str, str]) -> bool:
        return all(self.tags.get(k) == v for k, v in tags.items())


@dataclass
class Job:
    id: str
    host_id: str
    app_id: str
    app_name: str
    release_id: str
    type: str  # "" for a one-off job
    state: str = "pending"  # pending, blocked, starting, running, stopping, done/crashed/failed
    started_at: float = 0.0  # monotonic, when the host said running
    wanted: bool = True  # False once the scheduler decided to stop it
    volume_ids: list[str] = field(default_factory=list)
    exit_status: int | None = None
    error: str | None = None
    reported: str = ""
    # False while the host has not registered the job's port services in discoverd: it is
    # reported `up` only then, so a deploy never counts a job clients cannot reach yet
    registered: bool = True

    @property
    def key(self) -> FormationKey:
        return (self.app_id, self.release_id)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE and self.wanted

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host_id": self.host_id,
            "app": self.app_id,
            "app_name": self.app_name,
            "release": self.release_id,
            "type": self.type,
            "state": self.state,
            "wanted": self.wanted,
            "up_for": round(time.monotonic() - self.started_at, 1) if self.started_at else None,
        }


@dataclass
class Restarts:
    count: int = 0  # unexpected stops (Flynn's restart backoff)
    failures: int = 0  # starts that failed in a row (placement retried with a delay)
    not_before: float = 0.0  # monotonic time before which no replacement starts
