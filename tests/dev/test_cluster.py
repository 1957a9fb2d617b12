"""`script/cluster` and `flynn_host.dev.cluster`: real daemons in their own network namespaces
behind a bridge, reached from the root namespace and from each other, taken down and brought
back, and removed without a trace, also after a failed `up`. Each test cluster has its own
name, subnet (10.201.<k>.0/24) and host ids, so it does not collide with a developer's."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flynn_host.client import HostClient
from flynn_host.dev import cluster_network
from flynn_host.dev.cluster import Cluster, ClusterError, leftovers
from flynn_host.dev.cluster_hosts import DevClusterHost, netns_pids
from flynn_host.dev.host import ROOT, busybox_job, mounts_under, wait_for
from flynn_host.runtime import images
from flynn_host.runtime.cgroups import cgroups_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")

SCRIPT = ROOT / "script" / "cluster"


def new_cluster() -> Cluster:
    """A cluster with an unused name, subnet and bridge (not yet up)."""
    for _ in range(50):
        name = f"t{uuid.uuid4().hex[:6]}"
        c = Cluster(name)
        try:
            c._check_subnet_free()
        except ClusterError:
            continue
        if not c.exists():
            return c
    raise AssertionError("no free test cluster name")


ROUTER_STEPS = ("router", "router-wait", "controller-route", "controller-route-wait")
BLOBSTORE_STEPS = ("blobstore", "blobstore-wait")
GITRECEIVE_STEPS = ("slugbuilder-image", "slugrunner-image", "gitreceive", "gitreceive-wait",
                    "gitreceive-route", "gitreceive-route-wait")  # fmt: skip
LOGAGGREGATOR_STEPS = ("logaggregator", "logaggregator-wait")
# the deployed apps that need the scheduler, and the final check that they are all healthy
SCHEDULED_STEPS = (*BLOBSTORE_STEPS, *ROUTER_STEPS, *GITRECEIVE_STEPS, *LOGAGGREGATOR_STEPS,
                   "status-check")  # fmt: skip
# the apps a booted cluster runs
SYSTEM_APPS = {"discoverd", "flannel", "postgres", "controller", "blobstore", "router",
               "gitreceive", "logaggregator"}  # fmt: skip


@contextlib.contextmanager
def booted_cluster(n: int, scheduler: bool = True) -> Iterator[Cluster]:
    """A new cluster of `n` hosts booted with `flynn-host bootstrap`; removed afterwards, and
    nothing of it may be left. Without `scheduler` the hand-over step is left out: nothing
    replaces a job that stops (for tests that act as the scheduler themselves)."""
    c = new_cluster()
    try:
        # without the scheduler nothing deploys the blobstore or the router either
        skip = () if scheduler else ("scheduler", "scheduler-wait", *SCHEDULED_STEPS)
        c.up(n, bootstrap=True, host_id_prefix=f"{c.name}h", without_steps=skip)
        yield c
    finally:
        c.down()
        assert leftovers(c) == []


def up(c: Cluster, n: int = 2) -> Cluster:
    c.up(n, bootstrap=False, host_id_prefix=f"{c.name}h")
    return c


def assert_gone(c: Cluster, host_ids: list[str]) -> None:
    assert leftovers(c) == []
    assert [cg for i in host_ids for cg in cgroups_of(f"flynn/{i}")] == []


def script(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = new_cluster()
    try:
        yield up(c)
    finally:
        ids = [h.id for h in c.hosts]
        c.down()
        assert_gone(c, ids)


def test_daemons_answer_from_the_root_namespace(cluster: Cluster) -> None:
    k = cluster_network.subnet_index(cluster.name)
    assert cluster.ips() == [f"10.201.{k}.11", f"10.201.{k}.12"]
    for i, ip in enumerate(cluster.ips(), 1):
        status = HostClient(f"{ip}:1113").status()
        assert status["id"] == f"{cluster.name}h{i}"
        assert cluster.host_url(i) == f"http://{ip}:1113"
        assert status["flags"]["state"].startswith(str(cluster.dir / f"host{i}") + "/")


def test_exec_runs_in_the_hosts_namespace(cluster: Cluster) -> None:
    out = cluster.exec("host2", ["ip", "-4", "-br", "addr"], capture_output=True, text=True)
    assert out.returncode == 0
    assert f"{cluster.ips()[1]}/24" in out.stdout and cluster.ips()[0] not in out.stdout
    route = cluster.exec(2, ["ip", "route"], capture_output=True, text=True).stdout
    assert f"default via {cluster.gateway} dev eth0" in route
    ps = cluster.exec("host2", ["flynn-host", "ps"], capture_output=True, text=True)
    assert ps.returncode == 0, ps.stderr
    assert ps.stdout.startswith("ID")
    assert cluster.exec(1, ["sh", "-c", "exit 3"]).returncode == 3


def test_hosts_reach_each_other_over_the_bridge(cluster: Cluster) -> None:
    code = (
        "import json, sys, urllib.request as u;"
        f"print(json.load(u.urlopen('{cluster.host_url(2)}/host/status', timeout=5))['id'])"
    )
    out = cluster.exec(1, [sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == cluster.host(2).id


def wait_answering(c: Cluster, i: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        try:
            return c.client(i, timeout=2).status()
        except (ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "crash"])
def test_a_host_stops_and_comes_back_with_its_id_and_state(
    cluster: Cluster, busybox_manifest: Path, kill: bool
) -> None:
    h = cluster.host(2)
    job_id = f"{h.id}-{uuid.uuid4().hex}"
    cluster.client(2).add_job(busybox_job(job_id, ["true"]))
    deadline = time.monotonic() + 20
    while cluster.client(2).get_job(job_id)["status"] not in ("done", "crashed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    old_pid = h.pid

    cluster.stop_host(2, kill=kill)
    assert h.pid is None and netns_pids(h.netns) == []
    with pytest.raises(ConnectionError):
        cluster.client(2, timeout=2).status()
    assert Cluster(cluster.name).host(2).pid is None  # what another process sees
    assert cluster.client(1).status()["id"] == cluster.host(1).id  # the others run on

    cluster.start_host(2)
    assert h.pid and h.pid != old_pid
    status = wait_answering(cluster, 2)
    assert status["id"] == h.id and status["flags"]["external_ip"] == h.ip
    assert cluster.client(2).get_job(job_id)["job"]["id"] == job_id  # state kept
    with pytest.raises(ClusterError, match="already running"):
        cluster.start_host(2)


def test_the_script(cluster: Cluster) -> None:
    name = ["--name", cluster.name]
    ips = script("ips", *name)
    assert ips.returncode == 0, ips.stderr
    assert ips.stdout.split() == cluster.ips()
    status = script("status", *name)
    assert status.returncode == 0 and status.stdout.count("running") == 2
    ps = script("exec", *name, "host1", "flynn-host", "ps")
    assert ps.returncode == 0 and ps.stdout.startswith("ID"), ps.stderr
    assert script("exec", *name, "host2", "sh", "-c", "exit 5").returncode == 5
    again = script("up", "-n", "1", "--no-bootstrap", *name)
    assert again.returncode == 1
    assert f"script/cluster down --name {cluster.name}" in again.stderr
    assert cluster.client(1).status()  # refusing did not touch it
    missing = script("ips", "--name", "tnone0")
    assert missing.returncode == 1 and "not up" in missing.stderr
    assert script("exec", *name, "host9", "true").returncode == 1


def test_down_leaves_nothing_behind(busybox_manifest: Path) -> None:
    c = up(new_cluster(), n=1)
    ids = [h.id for h in c.hosts]
    try:
        job_id = f"{ids[0]}-{uuid.uuid4().hex}"
        c.client(1).add_job(busybox_job(job_id, ["sleep", "300"]))
        deadline = time.monotonic() + 20
        while c.client(1).get_job(job_id)["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert mounts_under(c.dir) and cgroups_of(f"flynn/{ids[0]}")
    finally:
        # from another process, as `script/cluster down` is used
        down = script("down", "--name", c.name)
    assert down.returncode == 0, down.stderr
    assert_gone(c, ids)
    assert script("down", "--name", c.name).returncode == 0  # idempotent


def test_a_failed_up_removes_what_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    c = new_cluster()
    real_wait = Cluster._wait_answering

    def fail_on_host2(self: Cluster, h: DevClusterHost, timeout: float = 30) -> None:
        if h.index == 2:
            raise ClusterError("simulated failure")
        real_wait(self, h, timeout)

    monkeypatch.setattr(Cluster, "_wait_answering", fail_on_host2)
    with pytest.raises(ClusterError, match="simulated"):
        up(c, n=2)
    assert_gone(c, [f"{c.name}h1", f"{c.name}h2"])


def test_a_daemon_that_cannot_start_fails_up_with_its_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = new_cluster()
    monkeypatch.setenv("FLYNN_HOST_BIN", "/bin/false")
    with pytest.raises(ClusterError, match="daemon exited"):
        up(c, n=1)
    assert_gone(c, [f"{c.name}h1"])


def test_down_of_nothing_is_fine() -> None:
    c = new_cluster()
    c.down()
    c.down()
    assert leftovers(c) == []


def test_names_are_checked() -> None:
    with pytest.raises(ClusterError, match="invalid cluster name"):
        Cluster("Bad-Name")
    assert cluster_network.bridge_name("default") == "flynnclu0"
    assert cluster_network.subnet_index("default") == 0
    assert all(len(cluster_network.dev_host_veth("abcdefgh", i)) <= 15 for i in range(1, 51))


@pytest.mark.slow
def test_up_bootstraps_the_layer_0_platform() -> None:
    manifest = images.images_dir() / "components" / "manifest.json"
    if not manifest.exists():  # `make dev` builds it: a run as root does not skip for it
        pytest.fail(f"{manifest} is missing: run `make images` first", pytrace=False)
    c = new_cluster()
    ids = [f"{c.name}h1", f"{c.name}h2"]
    try:
        c.up(2, bootstrap=True, host_id_prefix=f"{c.name}h")

        def counts() -> tuple[int, dict[str, int]]:
            postgres, controller = 0, {}
            for i in (1, 2):
                jobs = c.client(i).list_jobs(active=True)
                meta = [j["job"].get("metadata") or {} for j in jobs.values()]
                apps = sorted(m.get("flynn-controller.app_name", "") for m in meta)
                # Layer 0 and the router on every host; the PostgreSQL appliance's jobs and
                # the controller's spread over the hosts
                assert apps.count("discoverd") == apps.count("flannel") == 1, jobs
                assert apps.count("router") == 1, jobs
                assert set(apps) <= SYSTEM_APPS
                postgres += apps.count("postgres")
                for m in meta:
                    if m.get("flynn-controller.app_name") == "controller":
                        typ = m["flynn-controller.type"]
                        controller[typ] = controller.get(typ, 0) + 1
            return postgres, controller

        # 3 nodes and 2 API processes; the controller's formation after the hand-over, which
        # the scheduler fills in (its scheduler omni: one on each host)
        wanted = (5, {"web": 2, "worker": 2, "scheduler": 2})
        wait_for(lambda: counts() == wanted, timeout=60, what="the platform's jobs")
    finally:
        c.down()
    assert_gone(c, ids)
