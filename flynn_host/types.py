"""Flynn's host types: the job JSON (`host.Job`), its container config and resources, the
`ActiveJob` a host reports, job events, and the job state machine.

Field names are Flynn's (`host/types/types.go`) so that real Flynn clients and the controller
speak to this host unchanged. Parsing is strict where a wrong value would only fail later inside a
container (a clear 400 naming the field is better than a crashed job): types as Go's
encoding/json would check them (`true` is not an integer), integers within what runc, the kernel
and mkfs accept, no NUL in what becomes a C string. It is lenient about fields this host does
not use yet (they are kept so a job round-trips).

Size: longer than most modules, on purpose: it is one schema, Flynn's job JSON, and each type's
fields are checked next to where they are declared (resources, config, mountspecs, the job, the
active job with its state machine); split, a field's check would sit in one file and its type in
another.

`job_key` is here, beside the job id it is derived from, because both the runtime (a job's
directories) and networking (its namespace name) use it and neither should import the other.
"""

from __future__ import annotations

import hashlib
import re
import signal as _signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flynn_host import limits
from flynn_host.errors import ValidationError
from flynn_host.runtime import seccomp

# --- job states -------------------------------------------------------------------------------

STARTING = "starting"
RUNNING = "running"
DONE = "done"
CRASHED = "crashed"
FAILED = "failed"

# The job state machine (drawn in README.md#host-api-port-1113): every transition the host
# makes is listed here and `ActiveJob.set_state` refuses any other, so a bug shows up as an
# error, not a strange state.
TRANSITIONS: dict[str, frozenset[str]] = {
    STARTING: frozenset({RUNNING, FAILED}),
    RUNNING: frozenset({DONE, CRASHED}),
    DONE: frozenset(),
    CRASHED: frozenset(),
    FAILED: frozenset(),
}
ENDED_STATES = frozenset({DONE, CRASHED, FAILED})

PARTITIONS = ("system", "background", "user")
SYSTEM_PARTITION = "system"

# config fields that give a job a way out of its sandbox (the host's files, network, devices,
# cgroups or extra capabilities): only platform components, in the system partition, get them
SYSTEM_ONLY_FIELDS = (
    "mounts",
    "host_network",
    "host_pid_namespace",
    "linux_capabilities",
    "writeable_cgroups",
    "allowed_devices",
)

# --- resources --------------------------------------------------------------------------------

MIB = 1024 * 1024
GIB = 1024 * MIB

RESOURCE_DEFAULTS: dict[str, int] = {
    "memory": 1 * GIB,
    "cpu": 1000,
    "temp_disk": 100 * MIB,
    "max_fd": 10000,
}
RESOURCE_TYPES = ("memory", "cpu", "temp_disk", "max_fd", "max_procs")
# The range each resource may take, so that a job the API accepts is not refused later by runc,
# the kernel or mkfs (measured): below 4 MiB the container's own processes do not fit in the
# memory cgroup (runc's Go init runs in it before the job; on a loaded host 4 MiB failed now and
# then, so the floor is 16 MiB), runc needs about 8 open files before it execs, tini and the
# job are 2 processes, mkfs.ext2 needs 128 KiB (1 MiB leaves room for the overlay's
# directories). cpu.shares stops at 262144 (256000 millicores), RLIMIT_NOFILE at fs.nr_open
# (2^20 by default), pids at 2^22 (PID_MAX_LIMIT); ext4 files stop below 16 TiB and mkfs of
# 1 TiB takes half a second.
RESOURCE_BOUNDS: dict[str, tuple[int, int]] = {
    "memory": (16 * MIB, 16 * 1024 * GIB),
    "cpu": (1, 256000),
    "temp_disk": (1 * MIB, 1024 * GIB),
    "max_fd": (16, 1 << 20),
    "max_procs": (2, 1 << 22),
}
# execve refuses a single argument or environment string of 32 pages or more (MAX_ARG_STRLEN)
MAX_ARG_BYTES = 32 * 4096 - 1
MAX_PATH_BYTES = 4096  # PATH_MAX, terminating NUL included: mount and chdir refuse longer
MAX_ID = 2**32 - 2  # uid_t/gid_t; 2^32-1 is (uid_t)-1, "no change"

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "m": MIB,
    "mb": MIB,
    "g": GIB,
    "gb": GIB,
    "t": 1024 * GIB,
    "tb": 1024 * GIB,
}


def parse_size(text: str) -> int:
    """Parse `512MB`, `2G`, `100` (bytes) into bytes; raise ValueError on anything else."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid size {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_limits(text: str) -> dict[str, dict[str, int]]:
    """Parse the CLI limit syntax `memory=2G,temp_disk=200MB,max_fd=1024` into resources JSON."""
    out: dict[str, dict[str, int]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in RESOURCE_TYPES:
            raise ValueError(
                f"invalid limit {part!r} (expected one of {', '.join(RESOURCE_TYPES)})"
            )
        amount = parse_size(value) if name in ("memory", "temp_disk") else int(value)
        out[name] = {"limit": amount, "request": amount}
    return out


def int_field(value: Any, where: str, lo: int, hi: int) -> int:
    """`value` if it is an integer from `lo` to `hi`. JSON `true` is not an integer, although
    Python's bool is an int subclass."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationError(where, f"must be an integer from {lo} to {hi}")
    return value


def _bool(raw: dict[str, Any], key: str, where: str = "") -> None:
    """A field that must be a boolean when given: the string "false" is not false."""
    if raw.get(key) is not None and not isinstance(raw[key], bool):
        raise ValidationError(f"{where}.{key}" if where else key, "must be a boolean")


def _c_string(value: Any, where: str, what: str = "a string") -> str:
    """A string that becomes a C string (argv, env, a path): no NUL, and what execve takes."""
    if not isinstance(value, str) or "\0" in value:
        raise ValidationError(where, f"must be {what} without NUL bytes")
    if len(value.encode(errors="surrogatepass")) > MAX_ARG_BYTES:
        raise ValidationError(where, f"must be at most {MAX_ARG_BYTES} bytes")
    return value


def _resources(raw: Any) -> dict[str, dict[str, int]]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValidationError("resources", "must be an object")
    out: dict[str, dict[str, int]] = {}
    for name, spec in raw.items():
        if name not in RESOURCE_TYPES:
            raise ValidationError(f"resources.{name}", "is not a known resource type")
        if not isinstance(spec, dict):
            raise ValidationError(f"resources.{name}", "must be an object")
        limit = spec.get("limit", spec.get("request"))
        request = spec.get("request", limit)
        lo, hi = RESOURCE_BOUNDS[name]
        for key, value in (("limit", limit), ("request", request)):
            if value is not None:
                int_field(value, f"resources.{name}.{key}", lo, hi)
        if limit is not None:
            out[name] = {"limit": limit, "request": request if request is not None else limit}
    for name, default in RESOURCE_DEFAULTS.items():
        out.setdefault(name, {"limit": default, "request": default})
    return out


# --- job JSON ---------------------------------------------------------------------------------


def _obj(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValidationError(where, "must be an object")
    return raw


def _str_map(raw: Any, where: str) -> dict[str, str]:
    raw = _obj(raw, where)
    for k, v in raw.items():
        if not isinstance(v, str):
            raise ValidationError(f"{where}.{k}", "must be a string")
    return dict(raw)


def _env(raw: Any, where: str) -> dict[str, str]:
    """Environment variables: each `KEY=VALUE` becomes one C string of the job's environment."""
    env = _str_map(raw, where)
    for key, value in env.items():
        if not key or "=" in key or "\0" in key:
            raise ValidationError(f"{where}.{key}", "name must be non-empty, without '=' or NUL")
        _c_string(f"{key}={value}", f"{where}.{key}")
    return env


def _list(raw: Any, where: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValidationError(where, "must be an array")
    return raw


@dataclass
class MountSpec:
    """One read-only squashfs layer of a job's root filesystem."""

    id: str
    url: str
    size: int
    sha512_256: str
    type: str = "squashfs"
    meta: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any, where: str) -> MountSpec:
        raw = _obj(raw, where)
        if raw.get("type", "squashfs") != "squashfs":
            raise ValidationError(f"{where}.type", 'must be "squashfs"')
        url = raw.get("url")
        if not isinstance(url, str) or not re.fullmatch(r"(file|https?)://[^\x00-\x20\x7f]+", url):
            raise ValidationError(f"{where}.url", "must be a file://, http:// or https:// URL")
        size = int_field(raw.get("size"), f"{where}.size", 1, limits.MAX_LAYER_SIZE)
        digest = _obj(raw.get("hashes"), f"{where}.hashes").get("sha512_256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValidationError(f"{where}.hashes.sha512_256", "must be 64 hex digits")
        layer_id = raw.get("id") or digest
        if not isinstance(layer_id, str) or not re.fullmatch(
            r"[0-9a-zA-Z_-][0-9a-zA-Z_.-]{0,127}", layer_id
        ):
            raise ValidationError(f"{where}.id", "must be a plain identifier")
        return cls(
            id=layer_id,
            url=url,
            size=size,
            sha512_256=digest,
            meta=_str_map(raw.get("meta"), f"{where}.meta"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "id": self.id,
            "url": self.url,
            "size": self.size,
            "hashes": {"sha512_256": self.sha512_256},
            "meta": self.meta,
        }


def _check_abs(path: Any, where: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "/../" in f"{path}/":
        raise ValidationError(where, "must be an absolute path without ..")
    if len(path.encode(errors="surrogatepass")) >= MAX_PATH_BYTES:
        raise ValidationError(where, f"must be shorter than {MAX_PATH_BYTES} bytes")
    return _c_string(path, where, "a path")


def _validate_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Check the parts of `config` the host acts on; keep everything else as given."""
    args = raw.get("args")
    if not isinstance(args, list) or not args:
        raise ValidationError("config.args", "must be a non-empty array of strings")
    for i, arg in enumerate(args):
        _c_string(arg, f"config.args[{i}]")
    raw["env"] = _env(raw.get("env"), "config.env")
    for i, mount in enumerate(_list(raw.get("mounts"), "config.mounts")):
        mount = _obj(mount, f"config.mounts[{i}]")
        _check_abs(mount.get("target"), f"config.mounts[{i}].target")
        _check_abs(mount.get("location"), f"config.mounts[{i}].location")
        _bool(mount, "writeable", f"config.mounts[{i}]")
    for i, vol in enumerate(_list(raw.get("volumes"), "config.volumes")):
        vol = _obj(vol, f"config.volumes[{i}]")
        _check_abs(vol.get("target"), f"config.volumes[{i}].target")
        if not isinstance(vol.get("volume"), str) or not vol["volume"]:
            raise ValidationError(f"config.volumes[{i}].volume", "must be a volume id")
        for key in ("writeable", "delete_on_stop"):
            _bool(vol, key, f"config.volumes[{i}]")
    for i, port in enumerate(_list(raw.get("ports"), "config.ports")):
        port = _obj(port, f"config.ports[{i}]")
        int_field(port.get("port", 0), f"config.ports[{i}].port", 0, 65535)
        if port.get("proto", "tcp") not in ("tcp", "udp"):
            raise ValidationError(f"config.ports[{i}].proto", "must be tcp or udp")
    wd = raw.get("working_dir")
    if wd not in (None, ""):
        _check_abs(wd, "config.working_dir")
    for key in ("uid", "gid"):
        if raw.get(key) is not None:
            int_field(raw[key], f"config.{key}", 0, MAX_ID)
    for key in ("tty", "stdin", "data", "host_network", "disable_log", "host_bundle",
                "no_new_privileges"):  # fmt: skip
        if not isinstance(raw.get(key, False), bool):
            raise ValidationError(f"config.{key}", "must be a boolean")
    for i, cap in enumerate(_list(raw.get("linux_capabilities"), "config.linux_capabilities")):
        if not isinstance(cap, str) or not re.fullmatch(r"CAP_[A-Z_]{1,32}", cap):
            raise ValidationError(f"config.linux_capabilities[{i}]", "must be a CAP_ name")
    if raw.get("seccomp") not in (None, *seccomp.PROFILES):
        raise ValidationError("config.seccomp", 'must be "default" or "unconfined"')
    return raw


# fullmatch, not `$`: `$` also matches before a trailing newline
JOB_ID_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")


@dataclass
class Job:
    """Flynn's `host.Job`: what to run. `config` stays a JSON object (Flynn's ContainerConfig)."""

    id: str
    mountspecs: list[MountSpec]
    config: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    resources: dict[str, dict[str, int]] = field(default_factory=dict)
    partition: str = "user"
    resurrect: bool = False
    profiles: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, raw: Any, job_id: str | None = None) -> Job:
        raw = _obj(raw, "job")
        jid = job_id if job_id is not None else raw.get("id")
        if raw.get("id") not in (None, "", jid):
            raise ValidationError("id", "does not match the id in the URL")
        if not isinstance(jid, str) or not JOB_ID_RE.fullmatch(jid):
            raise ValidationError("id", "must be 1-128 letters, digits, '-', '_' or '.'")
        specs = raw.get("mountspecs")
        if not isinstance(specs, list) or not 1 <= len(specs) <= limits.MAX_LAYERS:
            raise ValidationError("mountspecs", f"must be an array of 1-{limits.MAX_LAYERS} layers")
        partition = raw.get("partition") or "user"
        if partition not in PARTITIONS:
            raise ValidationError("partition", f"must be one of {', '.join(PARTITIONS)}")
        config = _validate_config(dict(_obj(raw.get("config"), "config")))
        if partition != SYSTEM_PARTITION:
            for key in SYSTEM_ONLY_FIELDS:
                if config.get(key):
                    raise ValidationError(
                        f"config.{key}", "is only allowed for jobs in the system partition"
                    )
            # without the filter a job reaches the host's keyrings and makes user namespaces
            if config.get("seccomp") == seccomp.UNCONFINED:
                raise ValidationError(
                    "config.seccomp",
                    '"unconfined" is only allowed for jobs in the system partition',
                )
        _bool(raw, "resurrect")
        profiles = _list(raw.get("profiles"), "profiles")
        if not all(isinstance(p, str) for p in profiles):
            raise ValidationError("profiles", "must be an array of strings")
        return cls(
            id=jid,
            mountspecs=[MountSpec.from_json(s, f"mountspecs[{i}]") for i, s in enumerate(specs)],
            config=config,
            metadata=_str_map(raw.get("metadata"), "metadata"),
            resources=_resources(raw.get("resources")),
            partition=partition,
            resurrect=bool(raw.get("resurrect")),
            profiles=list(profiles),
        )

    def registers_services(self) -> bool:
        """Whether the host registers the job's port services in discoverd
        (`flynn_host.jobservices`): tcp ports naming a service, outside partition `system`."""
        return self.partition != SYSTEM_PARTITION and any(
            isinstance(p, dict) and p.get("service") and p.get("port")
            and (p.get("proto") or "tcp") == "tcp"
            for p in self.config.get("ports") or []
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "mountspecs": [m.to_json() for m in self.mountspecs],
            "metadata": self.metadata,
            "resources": self.resources,
            "partition": self.partition,
            "config": self.config,
            "resurrect": self.resurrect,
            "profiles": self.profiles,
        }

    def limit(self, name: str) -> int | None:
        spec = self.resources.get(name)
        return spec["limit"] if spec else None

    @property
    def hostname(self) -> str:
        """Container hostname: the part of the job id after the host id, at most 64 characters
        (README.md#what-a-job-gets)."""
        return self.id.split("-", 1)[-1][:64]


def job_key(job_id: str) -> str:
    """The job's short key: the first 16 hex digits of sha256(job id). It names what the host
    makes for a job where the id would be too long (unix socket paths stay under 108 bytes,
    network namespace names short): its work and run directories, its network namespace."""
    return hashlib.sha256(job_id.encode()).hexdigest()[:16]


def now() -> str:
    """An RFC 3339 timestamp with nanosecond-style precision, as Go's time.Time marshals."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


ZERO_TIME = "0001-01-01T00:00:00Z"


@dataclass
class ActiveJob:
    """A job as this host knows it: Flynn's `host.ActiveJob`."""

    job: Job
    host_id: str
    status: str = STARTING
    internal_ip: str = ""
    pid: int | None = None
    force_stop: bool = False
    created_at: str = field(default_factory=now)
    started_at: str = ZERO_TIME
    ended_at: str = ZERO_TIME
    exit_status: int | None = None
    error: str | None = None
    # not part of Flynn's JSON: monotonic creation order, so listings are stable
    seq: float = field(default_factory=time.time)
    # whether every port service of the job is registered in discoverd (jobservices.py)
    services_registered: bool = False

    def set_state(self, new: str) -> None:
        if new not in TRANSITIONS[self.status]:
            raise RuntimeError(f"job {self.job.id}: invalid transition {self.status} -> {new}")
        self.status = new
        if new == RUNNING:
            self.started_at = now()
        elif new in ENDED_STATES:
            self.ended_at = now()

    @property
    def ended(self) -> bool:
        return self.status in ENDED_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job.to_json(),
            "host_id": self.host_id,
            "internal_ip": self.internal_ip,
            "pid": self.pid,
            "force_stop": self.force_stop,
            "status": self.status,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "exit_status": self.exit_status,
            "error": self.error,
            # not Flynn's: null for a job with no service the host registers, else whether
            # its services are in discoverd (a scheduler reports such a job up only then)
            "discoverd_registered": self.services_registered
            if self.job.registers_services()
            else None,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ActiveJob:
        return cls(
            job=Job.from_json(raw["job"]),
            host_id=raw["host_id"],
            status=raw["status"],
            internal_ip=raw.get("internal_ip", ""),
            pid=raw.get("pid"),
            force_stop=raw.get("force_stop", False),
            created_at=raw.get("created_at", ZERO_TIME),
            started_at=raw.get("started_at", ZERO_TIME),
            ended_at=raw.get("ended_at", ZERO_TIME),
            exit_status=raw.get("exit_status"),
            error=raw.get("error"),
            seq=raw.get("seq", 0.0),
            services_registered=bool(raw.get("discoverd_registered")),
        )


def parse_signal(value: str | int) -> int:
    """Accept `15`, `TERM` or `SIGTERM`; raise ValueError for anything that is not a signal."""
    if isinstance(value, int) or str(value).isdigit():
        num = int(value)
        if not 0 < num < _signal.NSIG:
            raise ValueError(f"invalid signal {value}")
        return num
    name = str(value).upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    sig = getattr(_signal.Signals, name, None)
    if sig is None:
        raise ValueError(f"invalid signal {value}")
    return int(sig)
