"""The development cluster's hosts: what each one is (`DevClusterHost`: its namespace, address,
directory and daemon), how its `flynn-host daemon` is run (from this repository's source, or the
frozen bundle named by `FLYNN_HOST_BIN`), and the processes, containers and job namespaces a
host leaves, found from its directory so that `down` removes them whoever started them.

`flynn_host.dev.cluster` puts the parts together; see docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flynn_host.dev.host import delete_runc_containers
from flynn_host.networking.jobnet import netns_name
from flynn_host.networking.links import NETNS_DIR
from flynn_host.runtime.cgroups import cgroups_of

ROOT = Path(__file__).resolve().parents[2]
HTTP_PORT = 1113
# a daemon stops its jobs (30 s SIGTERM→SIGKILL each by default) before it exits
DAEMON_STOP_TIMEOUT = 45.0


@dataclass
class DevClusterHost:
    """One host of the cluster: its namespace, address, directory and daemon."""

    index: int
    id: str
    ip: str
    netns: str
    veth: str
    dir: str
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{HTTP_PORT}"

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    @property
    def config_file(self) -> Path:
        return Path(self.dir) / "host.json"

    @property
    def log_file(self) -> Path:
        return Path(self.dir) / "daemon.log"

    @property
    def run_dir(self) -> Path:
        return Path(self.dir) / "run"

    def daemon_args(self) -> list[str]:
        d = Path(self.dir)
        return [
            "daemon", "--id", self.id, "--external-ip", self.ip,
            "--http-port", str(HTTP_PORT),
            "--state", str(d / "state.json"), "--volpath", str(d / "vol"),
            "--work-dir", str(d / "work"), "--run-dir", str(self.run_dir),
            "--log-dir", str(d / "log"), "--log-file", str(self.log_file),
        ]  # fmt: skip

    def start_daemon(self, env: dict[str, str]) -> None:
        """Start the host's daemon in its namespace, logging to its log file."""
        argv = ["nsenter", f"--net={self.netns_path}", "--", *flynn_host_command(),
                *self.daemon_args()]  # fmt: skip
        with open(self.log_file, "ab") as log:
            # nsenter execs the daemon, so its pid is the daemon's
            proc = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        self.pid = proc.pid
        # The daemon outlives this object (another process may stop it) and pid_alive() reaps
        # it by pid; marking the Popen finished keeps it from warning that it still runs.
        proc.returncode = 0

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_text(errors="replace")[-chars:]
        return ""


def flynn_host_command() -> list[str]:
    """How to run `flynn-host`: `FLYNN_HOST_BIN` (the frozen bundle) or this repo's source."""
    if os.environ.get("FLYNN_HOST_BIN"):
        return [os.environ["FLYNN_HOST_BIN"]]
    return [sys.executable, "-m", "flynn_host.cli.main"]


def write_launcher(bin_dir: Path) -> None:
    """`<bin_dir>/flynn-host`, the `flynn-host` found first on `exec`'s PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / "flynn-host"
    cmd = " ".join(f"'{a}'" for a in flynn_host_command())
    launcher.write_text(
        f'#!/bin/sh\nPYTHONPATH="{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" exec {cmd} "$@"\n'
    )
    launcher.chmod(0o755)


def bootstrap_images() -> list[str]:
    """The images the bootstrap manifest runs (each host must have them imported first)."""
    try:
        from flynn_host.bootstrap.manifest import manifest_path

        path = manifest_path(None)
        steps = json.loads(path.read_text()) if path else []
        names = {s["artifact"]["image"] for s in steps if "image" in s.get("artifact", {})}
    except (ImportError, OSError, ValueError, TypeError, AttributeError):
        names = set()
    return sorted(names) or ["components"]


# --- processes --------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone; one of ours is reaped here)."""
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def netns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of `pids` runs; return those still running after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if pid_alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def cgroup_pids(rel: str) -> list[int]:
    """Every process in the cgroup `rel` and below it, in any hierarchy."""
    pids: set[int] = set()
    for d in cgroups_of(rel):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
    return sorted(pids)


def kill_all(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# --- what hosts leave, found from their directories -------------------------------------------


def host_ids(host_dirs: list[Path]) -> list[str]:
    """The ids the daemons in `host_dirs` used: the directories under each run dir
    (`<run>/<id>/runc`)."""
    ids: set[str] = set()
    for d in host_dirs:
        if (d / "run").exists():
            ids |= {p.name for p in (d / "run").iterdir() if p.is_dir()}
    return sorted(ids)


def job_namespaces(host_dirs: list[Path]) -> list[str]:
    """Network namespaces the hosts made for their jobs and did not remove (a host that
    was killed): the jobs are in each host's state file."""
    names = []
    for d in host_dirs:
        with contextlib.suppress(OSError, ValueError):
            state = json.loads((d / "state.json").read_text())
            jobs = state.get("jobs", state) if isinstance(state, dict) else {}
            names += [netns_name(job_id) for job_id in jobs]
    return [n for n in names if (NETNS_DIR / n).exists()]


def remove_containers(host_dirs: list[Path]) -> None:
    """Kill the hosts' shims and delete every runc container they have."""
    for d in host_dirs:
        run = d / "run"
        out = subprocess.run(["pgrep", "-f", f"shim {run}/"], capture_output=True,
                             text=True).stdout  # fmt: skip
        kill_all([int(p) for p in out.split()])
        for root in run.glob("*/runc") if run.exists() else []:
            delete_runc_containers(root)
