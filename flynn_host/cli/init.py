"""`flynn-host init`: write the host config file (`/etc/flynn/host.json`) that `flynn-host
daemon` reads, optionally creating a new cluster at a discovery service first.

The file is Flynn's `{"args": [...], "env": {...}}`. An existing file is updated, not replaced:
its `env`, its other sections (`plugins`) and its other daemon flags are kept, and each flag
given here replaces that flag's earlier value. The file is written atomically (a temporary file
renamed over it), creating its directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from flynn_host.atomicfile import write_atomic
from flynn_host.cli.usage import Parser
from flynn_host.client import HOST_KEY_ENV
from flynn_host.config import check_host_key, load_config_file

USAGE = """\
usage: flynn-host init [options]

Options:
  --init-discovery      create and join a discovery token
  --discovery=TOKEN     join cluster with discovery token
  --peer-ips=IPLIST     join cluster using IPs
  --external-ip=IP      external IP address of host, defaults to the first IPv4 address of eth0
  --host-key=KEY        the cluster's host key (default: $FLYNN_HOST_KEY, the file's, or a new one)
  --file=NAME           file to write to [default: /etc/flynn/host.json]

Write the config file that `flynn-host daemon` reads. It holds the cluster's host key, which
every request to a host's API must carry, so it is readable by root only. Every host of a
cluster needs the same key: give the first host's to the others with --host-key.
"""

DEFAULT_DISCOVERY_SERVER = "https://discovery.flynn.io"
# flags that take a value, so that an existing file's args can be parsed into pairs
VALUE_FLAGS = ("--external-ip", "--peer-ips", "--discovery")


def check_ip(value: str, flag: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"invalid {flag} {value!r}: not an IP address") from None
    return value


def check_ip_list(value: str) -> str:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError("invalid --peer-ips: empty list")
    for item in items:
        check_ip(item, "--peer-ips entry")
    return ",".join(items)


def create_discovery_token() -> str:
    """Flynn's discovery API: `POST <server>/clusters` → 201 with the cluster URL in Location."""
    server = os.environ.get("DISCOVERY_SERVER", DEFAULT_DISCOVERY_SERVER).rstrip("/")
    req = urllib.request.Request(f"{server}/clusters", data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            location = resp.headers.get("Location")
            status = resp.status
    except urllib.error.HTTPError as exc:
        raise ValueError(
            f"discovery server {server} refused to create a cluster: HTTP {exc.code}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(
            f"cannot reach the discovery server {server} ({getattr(exc, 'reason', exc)}); "
            "set DISCOVERY_SERVER to use another, or pass --discovery=TOKEN or --peer-ips"
        ) from None
    if status != 201 or not location:
        raise ValueError(
            f"discovery server {server} answered HTTP {status} without a cluster "
            "URL (Location header)"
        )
    return urllib.parse.urljoin(f"{server}/clusters", location)


def merge_args(old: list[str], new: dict[str, str]) -> list[str]:
    """`old` without the flags in `new` (`--flag value` and `--flag=value` forms), then `new`."""
    out: list[str] = []
    skip = False
    for arg in old:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in new:
            skip = "=" not in arg and name in VALUE_FLAGS
            continue
        out.append(arg)
    for flag, value in new.items():
        out += [flag, value]
    return out


def write_config(path: Path, flags: dict[str, str], host_key: str | None = None) -> dict[str, Any]:
    """Update (or create) the config file; `host_key` replaces the file's key, and a file
    without one gets a new random key."""
    # an existing file is updated (read as the daemon reads it), a missing one created
    data = load_config_file(str(path)) if path.exists() else {}
    data["args"] = merge_args([str(a) for a in data.get("args") or []], flags)
    data.setdefault("env", {})
    if host_key is not None:
        data["host_key"] = check_host_key(host_key, "--host-key")
    elif not data.get("host_key"):
        data["host_key"] = secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    # root only: the host key is root on every host of the cluster
    write_atomic(path, json.dumps(data, indent=2) + "\n", fsync=False, mode=0o600)
    return data


def cmd_init(argv: list[str]) -> int:
    p = Parser(USAGE)
    p.add_argument("--init-discovery", action="store_true")
    p.add_argument("--discovery")
    p.add_argument("--peer-ips")
    p.add_argument("--external-ip")
    p.add_argument("--host-key")
    p.add_argument("--file", default="/etc/flynn/host.json")
    args = p.parse(argv)
    if args.init_discovery and args.discovery:
        raise ValueError("use either --init-discovery or --discovery, not both")
    flags: dict[str, str] = {}
    if args.external_ip:
        flags["--external-ip"] = check_ip(args.external_ip, "--external-ip")
    if args.peer_ips:
        flags["--peer-ips"] = check_ip_list(args.peer_ips)
    if args.discovery:
        flags["--discovery"] = args.discovery
    if args.init_discovery:
        token = create_discovery_token()
        print(token)
        flags["--discovery"] = token
    path = Path(args.file)
    had_key = path.exists() and bool(load_config_file(str(path)).get("host_key"))
    host_key = args.host_key or os.environ.get(HOST_KEY_ENV) or None
    write_config(path, flags, host_key)
    print(f"wrote {args.file}", file=sys.stderr)
    if host_key is None and not had_key:
        print(f"generated a new host key in {args.file} (root only): give the other hosts of "
              "this cluster the same one, with `flynn-host init --host-key=...`",
              file=sys.stderr)  # fmt: skip
    return 0
