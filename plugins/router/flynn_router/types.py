"""The router's types, with Flynn's JSON: routes as the controller stores them (`Route`),
the backends discoverd names for a route's service (`Backend`), and the events the router
streams from `GET /events` (`StreamEvent`). Other components import these through this
module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# the kinds of events on the router API's `GET /events` stream
SET = "set"
REMOVE = "remove"
BACKEND_UP = "backend-up"
BACKEND_DOWN = "backend-down"
BACKEND_DRAINED = "backend-drained"
EVENT_KINDS = (SET, REMOVE, BACKEND_UP, BACKEND_DOWN, BACKEND_DRAINED)


@dataclass(frozen=True)
class Route:
    """An HTTP route (`domain` + `path`, optional TLS pair and sticky sessions) or a TCP
    route (`port`), sending traffic to the instances of discoverd service `service` (only
    its leader when `leader`)."""

    type: str
    id: str
    service: str
    parent_ref: str = ""
    leader: bool = False
    drain_backends: bool = False
    domain: str = ""
    path: str = "/"
    sticky: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    port: int = 0
    disable_keep_alives: bool = False

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Route:
        """A route from the controller's JSON (its `certificate` object, when present,
        wins over the legacy `tls_cert`/`tls_key`)."""
        cert = raw.get("certificate") or {}
        path = raw.get("path") or "/"
        if not path.endswith("/"):
            path += "/"
        return cls(
            type=str(raw.get("type") or ""),
            id=str(raw.get("id") or ""),
            service=str(raw.get("service") or ""),
            parent_ref=str(raw.get("parent_ref") or ""),
            leader=bool(raw.get("leader")),
            drain_backends=bool(raw.get("drain_backends")),
            domain=str(raw.get("domain") or "").lower(),
            path=path,
            sticky=bool(raw.get("sticky")),
            tls_cert=str(cert.get("cert") or raw.get("tls_cert") or ""),
            tls_key=str(cert.get("key") or raw.get("tls_key") or ""),
            port=int(raw.get("port") or 0),
            disable_keep_alives=bool(raw.get("disable_keep_alives")),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "id": self.id,
            "parent_ref": self.parent_ref,
            "service": self.service,
            "leader": self.leader,
            "drain_backends": self.drain_backends,
        }
        if self.type == "http":
            out.update(domain=self.domain, path=self.path, sticky=self.sticky)
            if self.tls_cert:
                out.update(tls_cert=self.tls_cert, tls_key=self.tls_key)
        else:
            out["port"] = self.port
        return out


@dataclass(frozen=True)
class Backend:
    """One instance of a route's service: where to send traffic (`addr` = "ip:port") and
    whose job it is (from the instance's discoverd meta)."""

    addr: str
    job_id: str = ""
    app_id: str = ""
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def host(self) -> str:
        return self.addr.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    @classmethod
    def from_instance_json(cls, raw: dict[str, Any]) -> Backend:
        meta = raw.get("meta") or {}
        return cls(
            addr=str(raw["addr"]),
            job_id=str(meta.get("FLYNN_JOB_ID") or ""),
            app_id=str(meta.get("FLYNN_APP_ID") or ""),
            meta=dict(meta),
        )

    def to_json(self) -> dict[str, Any]:
        return {"addr": self.addr, "job_id": self.job_id, "app_id": self.app_id}


@dataclass(frozen=True)
class StreamEvent:
    """An event of `GET /events`: `set`/`remove` carry the route, the backend events the
    backend and its route's service."""

    event: str
    route: Route | None = None
    backend: Backend | None = None
    service: str = ""
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": self.event}
        if self.route is not None:
            out["route"] = self.route.to_json()
        if self.backend is not None:
            out["backend"] = dict(self.backend.to_json(), service=self.service)
            # the scheduler reads the job id at the top level too
            out["job_id"] = self.backend.job_id
        if self.error:
            out["error"] = self.error
        return out
