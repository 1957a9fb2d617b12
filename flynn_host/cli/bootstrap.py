"""`flynn-host bootstrap`: wait for the cluster's hosts, then run the bootstrap manifest's steps
(see docs/bootstrap.md)."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

from flynn_host.bootstrap import State, StepError, StepInfo, run_steps, wait_for_hosts
from flynn_host.bootstrap.manifest import ManifestError, parse_manifest, read_manifest
from flynn_host.bootstrap.output import json_logger, text_logger
from flynn_host.cli.usage import Parser
from flynn_host.client import DEFAULT_ADDR

USAGE = """\
usage: flynn-host bootstrap [options] [<manifest>]

Options:
  -n, --min-hosts=MIN    minimum number of hosts required to be online
  -t, --timeout=SECS     seconds to wait for hosts to come online [default: 120]
  --json                 format log output as json
  --from-backup=FILE     bootstrap from backup file
  --discovery=TOKEN      use discovery token to connect to cluster
  --peer-ips=IPLIST      use IP address list to connect to cluster
  --steps=STEPS          only run the given STEPS (comma separated)
  --job-timeout=SECS     seconds to wait for each job to start [default: 30]

Bootstrap layer 1 using the provided manifest (default /etc/flynn/bootstrap-manifest.json,
else the one shipped with flynn-host; - reads it from standard input).
"""


def load_actions() -> dict[str, type]:
    from flynn_host.plugins.manager import make_plugin_manager

    actions: dict[str, type] = {}
    for batch in make_plugin_manager().hook.flynn_host_bootstrap_actions():
        for name, cls in (batch or {}).items():
            if name in actions and actions[name] is not cls:
                raise ValueError(f"two plugins offer the bootstrap action {name!r}")
            actions[name] = cls
    return actions


def peer_addrs(text: str) -> list[str]:
    """`ip` or `ip:port` entries (port 1113 by default)."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        out.append(item if ":" in item else f"{item}:1113")
    return out


def discovery_addrs(token: str) -> list[str]:
    """The hosts registered at a discovery token URL (`GET <token>/instances`)."""
    url = token.rstrip("/") + "/instances"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"cannot get the cluster's hosts from {url}: {getattr(exc, 'reason', exc)}"
        ) from None
    addrs = []
    for inst in data.get("data") or []:
        u = str(inst.get("url", "")).split("://", 1)[-1].rstrip("/")
        if u:
            addrs.append(u)
    if not addrs:
        raise ValueError(f"no hosts are registered at {url}")
    return addrs


def positive(value: str, flag: str) -> float:
    try:
        n = float(value)
    except ValueError:
        n = -1
    if n <= 0:
        raise ValueError(f"invalid {flag} value {value!r}")
    return n


def cmd_bootstrap(argv: list[str]) -> int:
    p = Parser(USAGE)
    p.add_argument("-n", "--min-hosts")
    p.add_argument("-t", "--timeout", default="120")
    p.add_argument("--json", action="store_true")
    p.add_argument("--from-backup")
    p.add_argument("--discovery")
    p.add_argument("--peer-ips")
    p.add_argument("--steps")
    p.add_argument("--job-timeout", default="30")
    p.add_argument("manifest", nargs="?")
    args = p.parse(argv)
    if args.from_backup:
        print("flynn-host bootstrap: --from-backup is not supported yet", file=sys.stderr)
        return 1
    timeout = positive(args.timeout, "--timeout")
    job_timeout = positive(args.job_timeout, "--job-timeout")
    if args.peer_ips:
        addrs = peer_addrs(args.peer_ips)
    elif args.discovery:
        addrs = discovery_addrs(args.discovery)
    else:
        local = os.environ.get("FLYNN_HOST_ADDR") or DEFAULT_ADDR
        addrs = peer_addrs(local.split("://", 1)[-1].rstrip("/"))
    min_hosts = int(positive(args.min_hosts, "--min-hosts")) if args.min_hosts else len(addrs)
    singleton = min_hosts == 1
    if os.environ.get("SINGLETON"):
        singleton = os.environ["SINGLETON"].lower() in ("1", "true", "yes")
    only = [s.strip() for s in args.steps.split(",") if s.strip()] if args.steps else None

    emit = json_logger() if args.json else text_logger()
    actions = load_actions()
    text, where = read_manifest(args.manifest)
    try:
        hosts = wait_for_hosts(addrs, min_hosts, timeout, emit)
    except StepError as exc:
        emit(StepInfo("online-hosts", "check", "error", error=str(exc)))
        return 1
    state = State(hosts=hosts, singleton=singleton, job_timeout=job_timeout, emit=emit)
    try:
        steps = parse_manifest(text, where, state.template_data())
    except ManifestError as exc:
        print(f"flynn-host bootstrap: {exc}", file=sys.stderr)
        return 1
    if only is not None:
        unknown = sorted(set(only) - {s["id"] for s in steps})
        if unknown:
            print(
                f"flynn-host bootstrap: --steps names steps not in {where}: {', '.join(unknown)}",
                file=sys.stderr,
            )
            return 1
    return 0 if run_steps(steps, actions, state, only) else 1
