"""The controller's vocabulary, shared with its clients: event object types, deployment
strategies and states, job states, the defaults Flynn fills into a process type's resources,
and how times and ids are written on the wire (Go's `time.Time` JSON and dashed UUIDs).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

# --- events -------------------------------------------------------------------------------
OBJECT_TYPES = (
    "app",
    "app_deletion",
    "app_release",
    "deployment",
    "job",
    "scale",
    "release",
    "artifact",
    "provider",
    "resource",
    "resource_deletion",
    "key",
    "key_deletion",
    "route",
    "route_deletion",
    "domain_migration",
)

# --- apps and deployments -----------------------------------------------------------------
STRATEGIES = (
    "all-at-once",
    "one-by-one",
    "one-down-one-up",
    "in-batches",
    "sirenia",
    "postgres",
    "discoverd-meta",
)
DEFAULT_STRATEGY = "all-at-once"
DEFAULT_DEPLOY_TIMEOUT = 30  # seconds, what the 2015 controller gave a new app
APP_NAME = re.compile(r"^[a-z\d]+(-[a-z\d]+)*$")
APP_NAME_MAX = 100
SYSTEM_APP_META = "flynn-system-app"

# Deployment states: pending -> running -> complete | failed (drawn in docs/controller.md)
DEPLOYMENT_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "pending": ("running", "complete", "failed"),
    "running": ("complete", "failed"),
    "complete": (),
    "failed": (),
}

# Job states and the order a job passes through them: a report may only move a job forward
# (the 2015 database's enum check). The three ends share a rank: a job ends once.
JOB_STATE_RANK = {
    "pending": 0,
    "blocked": 0,
    "starting": 1,
    "up": 2,
    "stopping": 3,
    "down": 4,
    "crashed": 4,
    "failed": 4,
}
JOB_STATES = tuple(JOB_STATE_RANK)

# --- releases ------------------------------------------------------------------------------
GIB = 1024**3
DEFAULT_RESOURCES: dict[str, dict[str, int]] = {
    "memory": {"request": GIB, "limit": GIB},
    "max_fd": {"request": 10000, "limit": 10000},
}
RESOURCE_TYPES = ("memory", "max_fd", "max_procs", "cpu", "temp_disk")
ARTIFACT_TYPES = ("docker", "flynn")

# --- routes --------------------------------------------------------------------------------
TCP_PORT_RANGE = (3000, 3500)
RESERVED_TCP_PORTS = (80, 443)
ROUTE_PARENT_PREFIX = "controller/apps/"

UUID_RE = re.compile(r"^[a-f0-9]{8}-?([a-f0-9]{4}-?){3}[a-f0-9]{12}$")


def new_id() -> str:
    return str(uuid.uuid4())


def is_uuid(value: str) -> bool:
    return bool(UUID_RE.match(value))


def fmt_time(t: datetime | None) -> str | None:
    """Go's `time.Time` JSON: RFC 3339 in UTC with a `Z`, microseconds when there are any."""
    if t is None:
        return None
    t = t.astimezone(UTC)
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    if t.microsecond:
        text += f".{t.microsecond:06d}".rstrip("0")
    return text + "Z"


ZERO_TIME = "0001-01-01T00:00:00Z"


def with_default_resources(resources: dict[str, Any] | None) -> dict[str, Any]:
    """A process type's resources with Flynn's defaults filled in: a missing type gets its
    default, a missing limit the type's default limit, a missing request the limit."""
    out: dict[str, Any] = {k: dict(v) for k, v in DEFAULT_RESOURCES.items()}
    for typ, spec in (resources or {}).items():
        spec = dict(spec or {})
        if spec.get("limit") is None and typ in DEFAULT_RESOURCES:
            spec["limit"] = DEFAULT_RESOURCES[typ]["limit"]
        if spec.get("request") is None and spec.get("limit") is not None:
            spec["request"] = spec["limit"]
        out[typ] = {"request": spec.get("request"), "limit": spec.get("limit")}
    return out
