"""A development cluster on one machine: several `flynn-host daemon` "hosts", each in its own
network namespace behind one bridge, started from source and removed completely afterwards.

`script/cluster` is the command-line face of `Cluster`; tests use the same class. The cluster
is a bridge in the root namespace holding the subnet's .1 (`10.201.0.1/24` for the default
cluster), and per host a network namespace `flynn-<name>-host<i>` whose `eth0` (a veth whose
other end is in the bridge) has `10.201.0.(10+i)`, with a default route via the bridge
(`cluster_network`). Each daemon runs in its namespace through `nsenter --net` only, so it
shares the machine's mount namespace and its overlay and loop mounts stay visible (and
removable) from outside (`cluster_hosts`). Every path a host writes is under
`<base>/<name>/host<i>/`; what was made is written to `<base>/<name>/cluster.json` so another
process can stop, exec into or remove the cluster. `down` works from that file *and* from the
names alone, so a half-made cluster is removed too. See docs/cluster.md.

Size: the cluster's whole life (up, bootstrap, a host stopped and started, down) in one
class; the hosts' and the network's details are in `cluster_hosts` and `cluster_network`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flynn_host.atomicfile import write_atomic, write_json_atomic
from flynn_host.client import HostClient
from flynn_host.dev import cluster_network as net
from flynn_host.dev import etchosts, registry_proxy
from flynn_host.dev.cluster_hosts import (
    DAEMON_STOP_TIMEOUT,
    HTTP_PORT,
    DevClusterHost,
    bootstrap_images,
    cgroup_pids,
    host_ids,
    job_namespaces,
    kill_all,
    netns_pids,
    pid_alive,
    remove_containers,
    wait_gone,
    write_launcher,
)
from flynn_host.dev.cluster_network import DEFAULT_NAME
from flynn_host.dev.host import mounts_under
from flynn_host.networking.links import NETNS_DIR, delete_netns
from flynn_host.runtime import images
from flynn_host.runtime.cgroups import cgroups_of, remove_cgroups

DEFAULT_BASE = Path(os.environ.get("FLYNN_CLUSTER_DIR", "/var/lib/flynn-cluster"))
MAX_HOSTS = 50
NAME_RE = re.compile(r"[a-z0-9]{1,8}")

Say = Callable[[str], None]


class ClusterError(RuntimeError):
    """Something a user can cause or fix; the message says what and what to do."""


def _quiet(_: str) -> None:
    pass


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
        k = net.subnet_index(self.name)
        self.network = ipaddress.IPv4Network(f"10.201.{k}.0/24")
        self.gateway = f"10.201.{k}.1"
        self.bridge = net.bridge_name(self.name)
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
        return self.dir.exists() or net.bridge_exists(self.bridge) or bool(self._namespaces())

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

    def up(
        self,
        n: int = 3,
        bootstrap: bool = True,
        host_id_prefix: str = "host",
        without_steps: tuple[str, ...] = (),
    ) -> None:
        """Create the bridge, `n` host namespaces and daemons, wait until each answers, and
        (with `bootstrap`) run `flynn-host init` and `flynn-host bootstrap` (the packaged
        manifest, less the steps `without_steps` names). On any failure everything made is
        removed before the error is raised."""
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
                netns=net.dev_host_netns(self.name, i), veth=net.dev_host_veth(self.name, i),
                dir=str(self.dir / f"host{i}"),
            )
            for i in range(1, n + 1)
        ]  # fmt: skip
        try:
            self.dir.mkdir(parents=True)
            key = secrets.token_hex(32)
            write_atomic(self.key_file, key + "\n", fsync=False, mode=0o600)
            self.save()
            write_launcher(self.bin_dir)
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
                proxy = self._start_registry_proxy()
                self.say(f"bootstrapping {n} host(s), CLUSTER_DOMAIN={self.domain}")
                extra = [self._manifest(without_steps)] if without_steps else []
                self._run_checked(self.hosts[0], ["bootstrap", "--min-hosts", str(n),
                                                  "--peer-ips", ",".join(self.ips()), *extra],
                                  env={"CLUSTER_DOMAIN": self.domain,
                                       "BUILD_CA_CERTS": local_ca_certs(),
                                       "BUILD_HTTPS_PROXY": proxy},
                                  capture=False)  # fmt: skip
                names = etchosts.cluster_names(self.domain)
                self.say(f"/etc/hosts: {' '.join(names)} -> {self.hosts[0].ip}")
                etchosts.add(self.name, self.hosts[0].ip, names)
        except BaseException:
            self.say("up failed; removing what was made")
            self.down()
            raise

    def _manifest(self, without_steps: tuple[str, ...]) -> str:
        """The packaged bootstrap manifest less some steps, written in the cluster's directory."""
        from flynn_host.bootstrap.manifest import read_manifest

        text, _ = read_manifest(None)
        steps = [s for s in json.loads(text) if s.get("id") not in without_steps]
        path = self.dir / "bootstrap-manifest.json"
        write_atomic(path, json.dumps(steps, indent=2) + "\n", fsync=False)
        return str(path)

    def _check_subnet_free(self) -> None:
        for addr in net.addresses_in(self.network)[:1]:
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

    def _make_bridge(self) -> None:
        net.make_bridge(self.bridge, self.gateway)

    def _make_host_network(self, h: DevClusterHost) -> None:
        net.make_host_netns(self.name, h.index, h.netns, h.veth, h.ip, self.bridge, self.gateway)

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
        h.start_daemon(self.host_env(h))
        self.save()

    def _wait_answering(self, h: DevClusterHost, timeout: float = 30.0) -> None:
        client = HostClient(h.url, timeout=2, key=self.key)
        deadline = time.monotonic() + timeout
        while True:
            if not h.pid or not pid_alive(h.pid):
                raise ClusterError(f"{h.id}: daemon exited; its log:\n{h.log_tail()}")
            with contextlib.suppress(OSError, ConnectionError):
                client.status()
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{h.id}: no answer at {h.url} in {timeout:.0f}s; log:\n"
                                   f"{h.log_tail()}")  # fmt: skip
            time.sleep(0.1)

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
            net.remove_host_netns(h.netns, h.veth)
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
        return net.cluster_namespaces(self.name)

    def down(self) -> None:
        """Remove everything of the cluster, made by this process or not, whole or half-made:
        daemons (SIGTERM, then SIGKILL), every process in the namespaces, runc containers,
        mounts and loop devices under the directory, cgroups, namespaces, veths, the bridge
        and the directory. Nothing existing is fine."""
        ns_names = sorted({h.netns for h in self.hosts} | set(self._namespaces()))
        etchosts.remove(self.name)
        self._stop_registry_proxy()
        self._stop_daemons()
        for ns in ns_names:
            if Path(NETNS_DIR / ns).exists():
                kill_all(netns_pids(ns))
        for ns in ns_names:
            if Path(NETNS_DIR / ns).exists():
                wait_gone(netns_pids(ns), 10)
        remove_containers(self._host_dirs())
        for mnt in sorted(mounts_under(self.dir), key=len, reverse=True):
            subprocess.run(["umount", "-d", "-l", mnt], capture_output=True)
        for host_id in self._host_ids():
            remove_cgroups(f"flynn/{host_id}")
        for ns in ns_names + job_namespaces(self._host_dirs()):
            delete_netns(ns)
        net.remove_links(self.name, self.bridge)
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.base.rmdir()  # only when no other cluster is there
        self.hosts = []

    def _host_dirs(self) -> list[Path]:
        found = {Path(h.dir) for h in self.hosts}
        if self.dir.exists():
            found |= {p for p in self.dir.glob("host*") if p.is_dir()}
        return sorted(found)

    def _host_ids(self) -> list[str]:
        return sorted({h.id for h in self.hosts} | set(host_ids(self._host_dirs())))

    @property
    def registry_proxy_pid_file(self) -> Path:
        return self.dir / "registry-proxy.pid"

    def _start_registry_proxy(self) -> str:
        """The package registries for the cluster's builds (flynn_host.dev.registry_proxy),
        on the bridge's address; returns its URL."""
        listen = f"{self.gateway}:{registry_proxy.PORT}"
        log = self.dir / "registry-proxy.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "flynn_host.dev.registry_proxy", "--listen", listen,
             "--log", str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.registry_proxy_pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.gateway, registry_proxy.PORT), timeout=1),
            ):
                self.say(f"registry proxy for builds at {listen} (log {log})")
                return f"http://{listen}"
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise ClusterError(f"the registry proxy did not start on {listen}")

    def _stop_registry_proxy(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.registry_proxy_pid_file.read_text())
            if pid_alive(pid):
                kill_all([pid], signal.SIGTERM)
                kill_all(wait_gone([pid], 5))

    def _stop_daemons(self) -> None:
        pids = [h.pid for h in self.hosts if h.pid and pid_alive(h.pid)]
        kill_all(pids, signal.SIGTERM)
        left = wait_gone(pids, DAEMON_STOP_TIMEOUT)
        kill_all(left)
        wait_gone(left, 10)

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
    found += [f"link {n}" for n in net.cluster_links(cluster.name, cluster.bridge)]
    found += [f"mount {m}" for m in mounts_under(cluster.dir)]
    out = subprocess.run(["pgrep", "-f", str(cluster.dir) + "/"], capture_output=True,
                         text=True).stdout  # fmt: skip
    found += [f"process {p}" for p in out.split()]
    if any(line.endswith(etchosts.tag(cluster.name)) for line in etchosts.lines()):
        found.append(f"/etc/hosts line of {cluster.name}")
    return found


@contextlib.contextmanager
def running_cluster(n: int, **kw: Any) -> Iterator[Cluster]:
    """`Cluster(**kw)` brought up with `n` hosts and removed at the end."""
    bootstrap = kw.pop("bootstrap", True)
    with Cluster(**kw) as c:
        c.up(n, bootstrap=bootstrap)
        yield c


LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")


def local_ca_certs() -> str:
    """The machine's own certificate authorities (Debian's /usr/local/share/ca-certificates,
    e.g. a TLS-inspecting proxy's): a cluster on this machine trusts them in its builds too
    (`BUILD_CA_CERTS`), or builds could not reach PyPI and npm from where the machine does.
    An explicit `$BUILD_CA_CERTS` wins."""
    if "BUILD_CA_CERTS" in os.environ:
        return os.environ["BUILD_CA_CERTS"]
    pems = []
    for path in sorted(LOCAL_CA_DIR.rglob("*.crt")) if LOCAL_CA_DIR.is_dir() else []:
        text = path.read_text(errors="replace").strip()
        if "-----BEGIN CERTIFICATE-----" in text:
            pems.append(text)
    return "\n".join(pems)
