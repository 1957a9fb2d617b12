"""The daemon's configuration: Flynn's `flynn-host daemon` flags, the host config file
(`/etc/flynn/host.json`, or `FLYNN_HOST_CONFIG`), and every path the daemon writes.

Every path is configurable so several daemons (the "hosts" of a test cluster, each in its own
network namespace) run side by side on one machine without touching each other's files, runc
state or cgroups: runc state and cgroups are also namespaced by the host id.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from flynn_host.runtime.images import DEFAULT_IMAGES_DIR, images_dir

DEFAULT_CONFIG_FILE = "/etc/flynn/host.json"

# Flynn's default CPU shares of the mandatory partitions (README.md#what-a-job-gets).
DEFAULT_PARTITIONS = {"system": 4096, "background": 4096, "user": 8192}


def default_host_id() -> str:
    """Flynn's default: the hostname with dashes removed (job ids are `<host>-<uuid>`)."""
    return socket.gethostname().split(".")[0].replace("-", "")


def parse_tags(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid tag {part!r}: expected KEY=VAL")
        tags[key] = value
    return tags


@dataclass
class HostConfig:
    """What the daemon runs with. The plain field defaults are `flynn-host daemon`'s flag
    defaults, written here only: its parser and usage text take them through `flag_defaults`."""

    id: str = field(default_factory=default_host_id)
    http_port: int = 1113
    external_ip: str = ""
    listen_ip: str = ""
    state: Path = Path("/var/lib/flynn/host-state.json")
    volpath: Path = Path("/var/lib/flynn/volumes")
    work_dir: Path = Path("/var/lib/flynn/work")
    run_dir: Path = Path("/run/flynn")
    log_dir: Path = Path("/var/log/flynn")
    log_file: Path | None = None
    bridge_name: str = "flynnbr0"
    force: bool = False
    max_job_concurrency: int = 4
    stop_timeout: float = 30.0
    log_max_bytes: int = 10 * 1024 * 1024
    shim_pool: int = 2
    tags: dict[str, str] = field(default_factory=dict)
    partitions: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PARTITIONS))
    disabled_plugins: list[str] = field(default_factory=list)
    components: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    discovery: str = ""  # discovery token URL (`flynn-host init --init-discovery`)
    peer_ips: list[str] = field(default_factory=list)  # the cluster's host IPs
    # the cluster's host key: every host API request but the health checks must carry it
    # (host.json's `host_key`, written root-only by `flynn-host init`, or $FLYNN_HOST_KEY)
    host_key: str = field(default="", repr=False)
    # TCP ports that jobs outside the system partition may not connect to, on any address:
    # the host API and discoverd's etcd (client and peer)
    protected_ports: list[int] = field(default_factory=lambda: [1113, 2379, 2380])
    # the only directories a file:// manifest or layer URL may name a file in (the layer
    # cache is allowed too: see LayerStore); $FLYNN_IMAGES first, then each --image-dir
    image_dirs: list[Path] = field(default_factory=lambda: [images_dir()])

    def __post_init__(self) -> None:
        if self.http_port not in self.protected_ports:
            self.protected_ports = [self.http_port, *self.protected_ports]
        if not re.fullmatch(r"[a-zA-Z0-9_.]{1,64}", self.id):
            raise ValueError(
                f"invalid host id {self.id!r}: use letters, digits, '_' or '.', no '-' "
                "(job ids are <host id>-<uuid>)"
            )

    # --- derived paths ----------------------------------------------------------------------
    @property
    def jobs_dir(self) -> Path:
        return self.work_dir / "jobs"

    @property
    def layer_cache(self) -> Path:
        return self.volpath / "layers"

    @property
    def layer_mounts(self) -> Path:
        return self.work_dir / "layers"

    @property
    def runc_root(self) -> Path:
        return self.run_dir / self.id / "runc"

    @property
    def cgroup_parent(self) -> str:
        """cgroup path (relative to each hierarchy's root) under which this host's jobs live."""
        return f"flynn/{self.id}"

    @property
    def url(self) -> str:
        return f"http://{self.external_ip or '127.0.0.1'}:{self.http_port}"


def flag_defaults() -> dict[str, Any]:
    """`HostConfig`'s plain defaults by field name: the one place the daemon's flag defaults
    are written. `flynn-host daemon`'s parser and its usage text take them from here (the
    fields with a default factory are not flags' defaults: the host id is the hostname's)."""
    return {f.name: f.default for f in fields(HostConfig) if f.default is not MISSING}


def with_defaults(usage: str, defaults: dict[str, Any]) -> str:
    """`usage` with ` [default: <value>]` after the help of each `--flag=ARG` whose field
    (`flag` with `_` for `-`) has a default other than empty or None."""
    lines = []
    for line in usage.splitlines(keepends=True):
        flag = re.match(r"  --([a-z-]+)=\S+ ", line)
        value = defaults.get(flag[1].replace("-", "_")) if flag else None
        if value is not None and value != "":
            shown = f"{value:g}" if isinstance(value, float) else value
            line = f"{line.rstrip()} [default: {shown}]\n"
        lines.append(line)
    return "".join(lines)


# Flynn's usage text, with this project's flags; the defaults are added from the dataclass (a
# test checks `flynn-host help daemon` against it)
_DAEMON_USAGE = """\
usage: flynn-host daemon [options]

options:
  --http-port=PORT           HTTP port
  --external-ip=IP           external IP of host
  --listen-ip=IP             bind host network services to this IP
  --state=PATH               path to state file
  --id=ID                    host id
  --tags=TAGS                host tags (comma separated list of KEY=VAL pairs)
  --force                    kill all containers booted by flynn-host before starting
  --volpath=PATH             directory to create volumes in
  --work-dir=PATH            job bundles and layer mounts
  --run-dir=PATH             directory for runc state
  --log-dir=DIR              directory to store job logs
  --log-file=FILE            custom log file path
  --discovery=TOKEN          join cluster with discovery token
  --peer-ips=IPLIST          join existing cluster using IPs
  --bridge-name=NAME         network bridge name
  --max-job-concurrency=NUM  maximum number of jobs to start concurrently
  --stop-timeout=SECS        seconds between SIGTERM and SIGKILL when stopping a job
  --log-max-bytes=BYTES      size at which a job's log file is rotated
  --shim-pool=NUM            job shims kept started ahead, to start jobs faster
  --disable-plugin=NAMES     comma separated plugin names not to load
  --component=KIND=NAME      choose the implementation of a component (repeatable)
  --image-dir=PATH           a directory file:// manifests and layers may be read from, besides
                             $FLYNN_IMAGES [default: {images_dir}] (repeatable)
"""

DAEMON_USAGE = with_defaults(_DAEMON_USAGE.format(images_dir=DEFAULT_IMAGES_DIR), flag_defaults())


MIN_HOST_KEY_LENGTH = 16


def check_host_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or len(key) < MIN_HOST_KEY_LENGTH or not key.isprintable():
        raise ValueError(f"{where}: the host key must be at least {MIN_HOST_KEY_LENGTH} "
                         "printable characters")  # fmt: skip
    return key


def load_config_file(path: str | None = None) -> dict[str, Any]:
    """Read Flynn's host config `{"args": [...], "env": {...}}` (plus our `plugins` section).

    A missing default file is fine (a host needs no config); a missing file named explicitly
    through `FLYNN_HOST_CONFIG` is an error, as is a malformed one.
    """
    explicit = path or os.environ.get("FLYNN_HOST_CONFIG")
    target = Path(explicit or DEFAULT_CONFIG_FILE)
    if not target.exists():
        if explicit:
            raise ValueError(f"host config {target} does not exist")
        return {}
    try:
        data = json.loads(target.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read host config {target}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"host config {target}: expected a JSON object")
    if not isinstance(data.get("args", []), list) or not isinstance(data.get("env", {}), dict):
        raise ValueError(f"host config {target}: 'args' must be a list and 'env' an object")
    return data
