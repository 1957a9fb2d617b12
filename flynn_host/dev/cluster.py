"""A development cluster on one machine: several `flynn-host daemon` "hosts", each in its own
network namespace behind one bridge, started from source and removed completely afterwards.

`script/cluster` is the command-line face of `Cluster`; tests use the same class. The cluster
is a bridge in the root namespace holding the subnet's .1 (`10.201.0.1/24` for the default
cluster), and per host a network namespace `flynn-<name>-host<i>` whose `eth0` (a veth whose
other end is in the bridge) has `10.201.0.(10+i)`, with a default route via the bridge. Each
daemon runs in its namespace through `nsenter --net` only, so it shares the machine's mount
namespace and its overlay and loop mounts stay visible (and removable) from outside. Every path
a host writes is under `<base>/<name>/host<i>/`; what was made is written to
`<base>/<name>/cluster.json` so another process can stop, exec into or remove the cluster.
`down` works from that file *and* from the names alone, so a half-made cluster is removed too.
See docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from flynn_host.atomicfile import write_atomic, write_json_atomic
from flynn_host.client import HostClient
from flynn_host.dev.host import delete_runc_containers, mounts_under
from flynn_host.networking.links import NETNS_DIR, create_netns, delete_netns, iproute_in
from flynn_host.runtime import images
from flynn_host.runtime.cgroups import cgroups_of, remove_cgroups

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_NAME = "default"
DEFAULT_BASE = Path(os.environ.get("FLYNN_CLUSTER_DIR", "/var/lib/flynn-cluster"))
HTTP_PORT = 1113
MAX_HOSTS = 50
NAME_RE = re.compile(r"[a-z0-9]{1,8}")
# a daemon stops its jobs (30 s SIGTERM→SIGKILL each by default) before it exits
DAEMON_STOP_TIMEOUT = 45.0

Say = Callable[[str], None]


class ClusterError(RuntimeError):
    """Something a user can cause or fix; the message says what and what to do."""


def _quiet(_: str) -> None:
    pass


# --- names and addresses, all derived from the cluster's name ---------------------------------


def subnet_index(name: str) -> int:
    """The third octet of the cluster's subnet: 0 for the default cluster, otherwise a number
    1–254 derived from the name (so a test cluster does not collide with a developer's)."""
    if name == DEFAULT_NAME:
        return 0
    return 1 + int(hashlib.sha256(name.encode()).hexdigest(), 16) % 254


def bridge_name(name: str) -> str:
    return "flynnclu0" if name == DEFAULT_NAME else f"fc{name}br"


def dev_host_veth(name: str, i: int) -> str:
    """Root end of host i's veth: `fc<name>h<i>`, at most 2+8+1+2 = 13 characters."""
    return f"fc{name}h{i}"


def dev_host_netns(name: str, i: int) -> str:
    return f"flynn-{name}-host{i}"


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


def flynn_host_command() -> list[str]:
    """How to run `flynn-host`: `FLYNN_HOST_BIN` (the frozen bundle) or this repo's source."""
    if os.environ.get("FLYNN_HOST_BIN"):
        return [os.environ["FLYNN_HOST_BIN"]]
    return [sys.executable, "-m", "flynn_host.cli.main"]


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


# --- the cluster ------------------------------------------------------------------------------


@dataclass
class Cluster:
    """A cluster of `flynn-host` daemons in network namespaces; use as a context manager in
    tests (it is always removed on exit, whatever happened)."""

    name: str = DEFAULT_NAME
    base: Path = DEFAULT_BASE
    domain: str = ""
    say: Say = _quiet
    hosts: list[DevClusterHost] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise ClusterError(f"invalid cluster name {self.name!r}: use 1-8 of a-z and 0-9")
        self.base = Path(self.base)
        self.domain = self.domain or os.environ.get("CLUSTER_DOMAIN", f"{self.name}.localflynn")
        k = subnet_index(self.name)
        self.network = ipaddress.IPv4Network(f"10.201.{k}.0/24")
        self.gateway = f"10.201.{k}.1"
        self.bridge = bridge_name(self.name)
        if self.state_file.exists():
            try:
                self.load()
            except (OSError, ValueError, TypeError, KeyError):
                # unreadable: `down` still finds everything by its names
                self.hosts = []

    # --- description ---------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        return self.base / self.name

    @property
    def state_file(self) -> Path:
        return self.dir / "cluster.json"

    @property
    def bin_dir(self) -> Path:
        return self.dir / "bin"

    @property
    def key_file(self) -> Path:
        return self.dir / "host-key"

    @property
    def key(self) -> str | None:
        """The cluster's host key (every host's config has it; made by `up`)."""
        with contextlib.suppress(OSError):
            return self.key_file.read_text().strip()
        return None

    def load(self) -> None:
        data = json.loads(self.state_file.read_text())
        self.hosts = [DevClusterHost(**h) for h in data["hosts"]]
        self.domain = data.get("domain", self.domain)

    def save(self) -> None:
        data = {
            "name": self.name, "subnet": str(self.network), "gateway": self.gateway,
            "bridge": self.bridge, "dir": str(self.dir), "domain": self.domain,
            "hosts": [asdict(h) for h in self.hosts],
        }  # fmt: skip
        write_json_atomic(self.state_file, data, fsync=False, indent=2)

    def exists(self) -> bool:
        """Anything of this cluster on the machine: its file, directory, bridge or a namespace."""
        with IPRoute() as ipr:
            bridge = bool(ipr.link_lookup(ifname=self.bridge))
        return self.dir.exists() or bridge or bool(self._namespaces())

    def host(self, which: int | str) -> DevClusterHost:
        """A host by index (1-based), `host<i>` or its id."""
        if not self.hosts:
            raise ClusterError(f"cluster {self.name!r} is not up (script/cluster up)")
        for h in self.hosts:
            if which in (h.index, str(h.index), f"host{h.index}", h.id):
                return h
        names = ", ".join(f"host{h.index}" for h in self.hosts)
        raise ClusterError(f"no host {which!r} in cluster {self.name!r} (hosts: {names})")

    def ips(self) -> list[str]:
        return [h.ip for h in self.hosts]

    def host_url(self, which: int | str) -> str:
        return self.host(which).url

    def client(self, which: int | str, timeout: float = 30.0) -> HostClient:
        return HostClient(self.host(which).url, timeout=timeout, key=self.key)

    # --- up --------------------------------------------------------------------------------

    def up(self, n: int = 3, bootstrap: bool = True, host_id_prefix: str = "host") -> None:
        """Create the bridge, `n` host namespaces and daemons, wait until each answers, and
        (with `bootstrap`) run `flynn-host init` and `flynn-host bootstrap`. On any failure
        everything made is removed before the error is raised."""
        if not 1 <= n <= MAX_HOSTS:
            raise ClusterError(f"-n must be between 1 and {MAX_HOSTS}")
        if self.exists():
            down = "script/cluster down" + (
                "" if self.name == DEFAULT_NAME else f" --name {self.name}"
            )
            raise ClusterError(
                f"cluster {self.name!r} already exists (or parts of it: {self.dir}, bridge "
                f"{self.bridge}, namespaces flynn-{self.name}-host*); run "
                f"`{down}` first"
            )
        self._check_subnet_free()
        self._check_ids_free([f"{host_id_prefix}{i}" for i in range(1, n + 1)])
        self.hosts = [
            DevClusterHost(
                index=i, id=f"{host_id_prefix}{i}", ip=str(self.network.network_address + 10 + i),
                netns=dev_host_netns(self.name, i), veth=dev_host_veth(self.name, i),
                dir=str(self.dir / f"host{i}"),
            )
            for i in range(1, n + 1)
        ]  # fmt: skip
        try:
            self.dir.mkdir(parents=True)
            key = secrets.token_hex(32)
            write_atomic(self.key_file, key + "\n", fsync=False, mode=0o600)
            self.save()
            self._write_launcher()
            self.say(f"bridge {self.bridge} {self.gateway}/24")
            self._make_bridge()
            for h in self.hosts:
                self.say(f"{h.id}: namespace {h.netns}, eth0 {h.ip}/24 (veth {h.veth})")
                self._make_host_network(h)
                Path(h.dir).mkdir(parents=True)
                # one host key for the whole cluster, root-only as `flynn-host init` keeps it
                config = {"args": [], "env": {}, "host_key": key}
                write_atomic(h.config_file, json.dumps(config) + "\n", fsync=False, mode=0o600)
            if bootstrap:
                # Flynn's order: `init` writes host.json, then the daemon starts from it
                for h in self.hosts:
                    self.say(f"{h.id}: flynn-host init")
                    self._run_checked(h, ["init", "--external-ip", h.ip,
                                          "--peer-ips", ",".join(self.ips()),
                                          "--file", str(h.config_file)])  # fmt: skip
            for h in self.hosts:
                self.say(f"{h.id}: starting daemon (log {h.log_file})")
                self._start_daemon(h)
            for h in self.hosts:
                self._wait_answering(h)
                self.say(f"{h.id}: answering at {h.url}")
            if bootstrap:
                for name in bootstrap_images():
                    manifest = images.images_dir() / name / "manifest.json"
                    for h in self.hosts:
                        self.say(f"{h.id}: flynn-host image import --name={name} {manifest}")
                        self._run_checked(h, ["image", "import", str(manifest), f"--name={name}"])
                self.say(f"bootstrapping {n} host(s), CLUSTER_DOMAIN={self.domain}")
                self._run_checked(self.hosts[0], ["bootstrap", "--min-hosts", str(n),
                                                  "--peer-ips", ",".join(self.ips())],
                                  env={"CLUSTER_DOMAIN": self.domain}, capture=False)  # fmt: skip
        except BaseException:
            self.say("up failed; removing what was made")
            self.down()
            raise

    def _check_subnet_free(self) -> None:
        with IPRoute() as ipr:
            for a in ipr.get_addr(family=2):
                addr = a.get_attr("IFA_ADDRESS")
                if addr and ipaddress.IPv4Address(addr) in self.network:
                    raise ClusterError(
                        f"subnet {self.network} is already in use on this machine ({addr}); "
                        "another cluster name maps to it: pick another --name"
                    )

    def _check_ids_free(self, ids: list[str]) -> None:
        # cgroups are named by host id alone (flynn/<id>), so two clusters must not share ids
        used = [i for i in ids if cgroups_of(f"flynn/{i}")]
        if used:
            raise ClusterError(
                f"host id(s) {', '.join(used)} are in use on this machine (cgroups flynn/<id> "
                "exist: another cluster or daemon); use another --host-id-prefix"
            )

    def _write_launcher(self) -> None:
        """`<dir>/bin/flynn-host`, the `flynn-host` found first on `exec`'s PATH."""
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        launcher = self.bin_dir / "flynn-host"
        cmd = " ".join(f"'{a}'" for a in flynn_host_command())
        launcher.write_text(
            f'#!/bin/sh\nPYTHONPATH="{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" exec {cmd} "$@"\n'
        )
        launcher.chmod(0o755)

    def _make_bridge(self) -> None:
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            idx = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.addr("add", index=idx, address=self.gateway, prefixlen=24)
            ipr.link("set", index=idx, state="up")

    def _make_host_network(self, h: DevClusterHost) -> None:
        create_netns(h.netns)
        peer_tmp = f"fc{self.name}p{h.index}"
        ns_fd = os.open(h.netns_path, os.O_RDONLY)
        try:
            with IPRoute() as ipr:
                bridge = ipr.link_lookup(ifname=self.bridge)[0]
                ipr.link("add", ifname=h.veth, kind="veth", peer={"ifname": peer_tmp})
                idx = ipr.link_lookup(ifname=h.veth)[0]
                ipr.link("set", index=idx, master=bridge, state="up")
                peer = ipr.link_lookup(ifname=peer_tmp)[0]
                ipr.link("set", index=peer, net_ns_fd=ns_fd)
        finally:
            os.close(ns_fd)
        with iproute_in(h.netns) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            idx = ns.link_lookup(ifname=peer_tmp)[0]
            # a MAC fixed by the address: a host whose namespace is made again is found at
            # once by neighbours still holding its old ARP entry (REACHABLE for up to 45 s)
            mac = "02:66:" + ":".join(f"{int(o):02x}" for o in h.ip.split("."))
            ns.link("set", index=idx, ifname="eth0", address=mac)
            ns.addr("add", index=idx, address=h.ip, prefixlen=24)
            ns.link("set", index=idx, state="up")
            ns.route("add", dst="0.0.0.0/0", gateway=self.gateway)

    # --- daemons ---------------------------------------------------------------------------

    def host_env(self, h: DevClusterHost) -> dict[str, str]:
        """The environment of a host's daemon and of `exec` on it."""
        return {
            **os.environ,
            "FLYNN_HOST_CONFIG": str(h.config_file),
            "FLYNN_HOST_ADDR": f"127.0.0.1:{HTTP_PORT}",
            "FLYNN_IMAGES": str(images.images_dir()),
            "CLUSTER_DOMAIN": self.domain,
            "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        }

    def _start_daemon(self, h: DevClusterHost) -> None:
        if h.pid and pid_alive(h.pid):
            raise ClusterError(f"{h.id} is already running (pid {h.pid})")
        if not Path(h.netns_path).exists():
            raise ClusterError(f"{h.id}: namespace {h.netns} is missing; recreate the cluster")
        argv = ["nsenter", f"--net={h.netns_path}", "--", *flynn_host_command(), *h.daemon_args()]
        with open(h.log_file, "ab") as log:
            # nsenter execs the daemon, so its pid is the daemon's
            proc = subprocess.Popen(
                argv, env=self.host_env(h), cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        h.pid = proc.pid
        # The daemon outlives this object (another process may stop it) and pid_alive() reaps
        # it by pid; marking the Popen finished keeps it from warning that it still runs.
        proc.returncode = 0
        self.save()

    def _wait_answering(self, h: DevClusterHost, timeout: float = 30.0) -> None:
        client = HostClient(h.url, timeout=2, key=self.key)
        deadline = time.monotonic() + timeout
        while True:
            if not h.pid or not pid_alive(h.pid):
                raise ClusterError(f"{h.id}: daemon exited; its log:\n{self.log_tail(h)}")
            with contextlib.suppress(OSError, ConnectionError):
                client.status()
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{h.id}: no answer at {h.url} in {timeout:.0f}s; log:\n"
                                   f"{self.log_tail(h)}")  # fmt: skip
            time.sleep(0.1)

    def log_tail(self, h: DevClusterHost, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return h.log_file.read_text(errors="replace")[-chars:]
        return ""

    def stop_host(
        self, which: int | str, kill: bool = False, remove_namespace: bool = False
    ) -> None:
        """Take a host down: SIGTERM its daemon (which stops its jobs) and wait, or with `kill`
        SIGKILL every process in its namespace at once, as a crash would. Its directory and
        state stay, for `start_host`; its namespace (with its bridge, VXLAN device and NAT
        rule) stays too unless `remove_namespace`, as if the machine were replaced."""
        h = self.host(which)
        if kill or remove_namespace:
            # the host's processes: its namespace's, and its jobs' (which have namespaces of
            # their own, but live in the host's cgroups)
            kill_all(
                netns_pids(h.netns) + cgroup_pids(f"flynn/{h.id}") + ([h.pid] if h.pid else [])
            )
            wait_gone(netns_pids(h.netns) + cgroup_pids(f"flynn/{h.id}"), 10)
        elif h.pid and pid_alive(h.pid):
            os.kill(h.pid, signal.SIGTERM)
            if wait_gone([h.pid], DAEMON_STOP_TIMEOUT):
                kill_all([h.pid])
                wait_gone([h.pid], 10)
        if remove_namespace:
            delete_netns(h.netns)
            with IPRoute() as ipr, contextlib.suppress(NetlinkError):
                for idx in ipr.link_lookup(ifname=h.veth):
                    ipr.link("del", index=idx)
        h.pid = None
        self.save()

    def start_host(self, which: int | str, timeout: float = 30.0) -> None:
        """Start a stopped host's daemon again, with the same id, address and directories
        (making its namespace again if it was removed)."""
        h = self.host(which)
        if not Path(h.netns_path).exists():
            self._make_host_network(h)
        self._start_daemon(h)
        try:
            self._wait_answering(h, timeout)
        except ClusterError:
            self.stop_host(h.index, kill=True)
            raise

    def status(self) -> list[dict[str, Any]]:
        """Each host: its address, daemon pid, whether it runs and answers, its job count."""
        rows = []
        for h in self.hosts:
            row: dict[str, Any] = {"host": f"host{h.index}", "id": h.id, "ip": h.ip,
                                   "pid": h.pid, "running": bool(h.pid and pid_alive(h.pid)),
                                   "answering": False, "jobs": None}  # fmt: skip
            with contextlib.suppress(Exception):
                jobs = HostClient(h.url, timeout=2, key=self.key).list_jobs(active=True)
                row["answering"], row["jobs"] = True, len(jobs)
            rows.append(row)
        return rows

    # --- exec ------------------------------------------------------------------------------

    def exec(self, which: int | str, argv: list[str], env: dict[str, str] | None = None,
             **kw: Any) -> subprocess.CompletedProcess[Any]:  # fmt: skip
        """Run `argv` in the host's network namespace, with `flynn-host` talking to that host's
        daemon; keyword arguments go to `subprocess.run`."""
        h = self.host(which)
        if not argv:
            raise ClusterError("exec: no command given")
        return subprocess.run(["nsenter", f"--net={h.netns_path}", "--", *argv],
                              env={**self.host_env(h), **(env or {})}, **kw)  # fmt: skip

    def _run_checked(self, h: DevClusterHost, args: list[str], env: dict[str, str] | None = None,
                     capture: bool = True) -> None:  # fmt: skip
        proc = self.exec(h.index, ["flynn-host", *args], env=env, text=True,
                         capture_output=capture)  # fmt: skip
        if proc.returncode != 0:
            out = ((proc.stdout or "") + (proc.stderr or "")).strip() if capture else ""
            raise ClusterError(f"{h.id}: flynn-host {args[0]} failed "
                               f"(exit {proc.returncode}){': ' + out if out else ''}")  # fmt: skip

    # --- down ------------------------------------------------------------------------------

    def _namespaces(self) -> list[str]:
        pattern = re.compile(rf"flynn-{self.name}-host\d+")
        with contextlib.suppress(OSError):
            return sorted(n for n in os.listdir(NETNS_DIR) if pattern.fullmatch(n))
        return []

    def down(self) -> None:
        """Remove everything of the cluster, made by this process or not, whole or half-made:
        daemons (SIGTERM, then SIGKILL), every process in the namespaces, runc containers,
        mounts and loop devices under the directory, cgroups, namespaces, veths, the bridge
        and the directory. Nothing existing is fine."""
        ns_names = sorted({h.netns for h in self.hosts} | set(self._namespaces()))
        self._stop_daemons()
        for ns in ns_names:
            if Path(NETNS_DIR / ns).exists():
                kill_all(netns_pids(ns))
        for ns in ns_names:
            if Path(NETNS_DIR / ns).exists():
                wait_gone(netns_pids(ns), 10)
        self._remove_containers()
        for mnt in sorted(mounts_under(self.dir), key=len, reverse=True):
            subprocess.run(["umount", "-d", "-l", mnt], capture_output=True)
        for host_id in self._host_ids():
            remove_cgroups(f"flynn/{host_id}")
        for ns in ns_names + self._job_namespaces():
            delete_netns(ns)
        self._remove_links()
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.base.rmdir()  # only when no other cluster is there
        self.hosts = []

    def _host_dirs(self) -> list[Path]:
        found = {Path(h.dir) for h in self.hosts}
        if self.dir.exists():
            found |= {p for p in self.dir.glob("host*") if p.is_dir()}
        return sorted(found)

    def _job_namespaces(self) -> list[str]:
        """Network namespaces the hosts made for their jobs and did not remove (a host that
        was killed): the jobs are in each host's state file."""
        from flynn_host.networking.jobnet import netns_name

        names = []
        for d in self._host_dirs():
            with contextlib.suppress(OSError, ValueError):
                state = json.loads((d / "state.json").read_text())
                jobs = state.get("jobs", state) if isinstance(state, dict) else {}
                names += [netns_name(job_id) for job_id in jobs]
        return [n for n in names if (NETNS_DIR / n).exists()]

    def _host_ids(self) -> list[str]:
        ids = {h.id for h in self.hosts}
        for d in self._host_dirs():
            # the ids a daemon used are the directories under its run dir (<run>/<id>/runc)
            if (d / "run").exists():
                ids |= {p.name for p in (d / "run").iterdir() if p.is_dir()}
        return sorted(ids)

    def _stop_daemons(self) -> None:
        pids = [h.pid for h in self.hosts if h.pid and pid_alive(h.pid)]
        kill_all(pids, signal.SIGTERM)
        left = wait_gone(pids, DAEMON_STOP_TIMEOUT)
        kill_all(left)
        wait_gone(left, 10)

    def _remove_containers(self) -> None:
        for d in self._host_dirs():
            run = d / "run"
            out = subprocess.run(["pgrep", "-f", f"shim {run}/"], capture_output=True,
                                 text=True).stdout  # fmt: skip
            kill_all([int(p) for p in out.split()])
            for root in run.glob("*/runc") if run.exists() else []:
                delete_runc_containers(root)

    def _remove_links(self) -> None:
        veth = re.compile(rf"fc{self.name}[hp]\d+")
        with IPRoute() as ipr:
            for link in ipr.get_links():
                ifname = link.get_attr("IFLA_IFNAME")
                if ifname == self.bridge or veth.fullmatch(ifname or ""):
                    with contextlib.suppress(NetlinkError):
                        ipr.link("del", index=link["index"])
            # a deleted namespace's veth may linger a moment while the kernel frees it
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(
                veth.fullmatch(ln.get_attr("IFLA_IFNAME") or "") for ln in ipr.get_links()
            ):
                time.sleep(0.05)

    # --- context manager -----------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def leftovers(cluster: Cluster) -> list[str]:
    """What of `cluster` is still on the machine (empty when it is fully removed): for tests."""
    found = []
    if cluster.dir.exists():
        found.append(f"directory {cluster.dir}")
    found += [f"namespace {n}" for n in cluster._namespaces()]
    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifname = link.get_attr("IFLA_IFNAME") or ""
            if ifname == cluster.bridge or re.fullmatch(rf"fc{cluster.name}[hp]\d+", ifname):
                found.append(f"link {ifname}")
    found += [f"mount {m}" for m in mounts_under(cluster.dir)]
    out = subprocess.run(["pgrep", "-f", str(cluster.dir) + "/"], capture_output=True,
                         text=True).stdout  # fmt: skip
    found += [f"process {p}" for p in out.split()]
    return found


@contextlib.contextmanager
def running_cluster(n: int, **kw: Any) -> Iterator[Cluster]:
    """`Cluster(**kw)` brought up with `n` hosts and removed at the end."""
    bootstrap = kw.pop("bootstrap", True)
    with Cluster(**kw) as c:
        c.up(n, bootstrap=bootstrap)
        yield c
