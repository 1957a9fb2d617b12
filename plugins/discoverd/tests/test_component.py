"""discoverd as Flynn runs it: three host-network jobs from the `components` image, each
running `/.flynn-host/flynn-host component discoverd` with its etcd member's data on a volume,
forming one cluster through a real flynn-host daemon."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from flynn_discoverd.service import CLIENT_PORT_OFFSET, PEER_PORT_OFFSET
from flynn_discoverd.types import instance_id

from flynn_host.dev import host as devhost
from flynn_host.dev.host import wait_for

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root"), pytest.mark.needs("dig")]


def http(method: str, url: str, body: object = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else None


def answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        resp.read()
    return True


def etcd_pids(api_port: int) -> list[str]:
    """The etcd member of the discoverd node on `api_port` (named after its address)."""
    name = f"discoverd-127-0-0-1-{api_port}"
    out = subprocess.run(["pgrep", "-f", f"etcd --name {name} "], capture_output=True, text=True)
    return out.stdout.split()


@dataclass
class Nodes:
    """Three discoverd jobs on one daemon, on free API ports (each with its etcd member's
    client and peer ports free beside it); node 2 also serves DNS."""

    daemon: devhost.Daemon
    jobs: list[str]
    ports: list[int]
    dns_port: int

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"


@pytest.fixture
def cluster() -> Iterator[Nodes]:
    manifest = devhost.IMAGES / "components" / "manifest.json"
    if not manifest.exists():
        pytest.fail(f"{manifest} is missing: run `make images` first")
    # etcd members leaving together take a few seconds: the test daemon's 3 s grace is too short
    d = devhost.make_daemon(extra_args=["--stop-timeout", "20"])
    ports = devhost.free_ports(3, offsets=(CLIENT_PORT_OFFSET, PEER_PORT_OFFSET))
    dns_port = devhost.free_port()
    try:
        image = d.client.request(
            "POST", "/host/images", {"manifest_url": manifest.as_uri(), "name": "components"}
        )
        peers = ",".join(f"127.0.0.1:{p}" for p in ports)
        jobs = []
        for i, port in enumerate(ports):
            vol = d.client.request("POST", "/storage/providers/default/volumes", {})
            args = ["/.flynn-host/flynn-host", "component", "discoverd", "--data-dir", "/data",
                    "--host", "127.0.0.1", "--addr", f"127.0.0.1:{port}",
                    "--notify", f"{d.url}/host/discoverd"]  # fmt: skip
            if i == 1:
                args += ["--dns-addr", f"127.0.0.1:{dns_port}", "--recursors", ""]
            job_id = d.new_job_id()
            d.client.add_job(
                {
                    "id": job_id,
                    "partition": "system",
                    "mountspecs": image["mountspecs"],
                    "config": {
                        "args": args,
                        "host_bundle": True,
                        "host_network": True,
                        "env": {"DISCOVERD_PEERS": peers},
                        "volumes": [
                            {"target": "/data", "volume": vol["id"], "delete_on_stop": True}
                        ],  # fmt: skip
                    },
                    "resources": {"temp_disk": {"limit": 256 * 1024 * 1024}},
                }
            )
            jobs.append(job_id)
        nodes = Nodes(d, jobs, ports, dns_port)
        for i in range(3):
            wait_for(lambda i=i: answers(f"{nodes.url(i)}/ping"), 60, f"node {i + 1}",
                     ignoring=(OSError,))  # fmt: skip
        yield nodes
    finally:
        d.cleanup()


def test_three_discoverd_jobs_form_one_cluster(cluster: Nodes) -> None:
    d, jobs = cluster.daemon, cluster.jobs
    for job_id in jobs:
        assert d.client.get_job(job_id)["status"] == "running"
    one, two, three = (cluster.url(i) for i in range(3))
    # the host learnt where discoverd is (POST /host/discoverd from a node)
    assert d.client.status()["discoverd"]["url"] in {one, two, three}
    http("PUT", f"{one}/services/web", {})
    inst = {"addr": "10.20.30.40:8080", "proto": "tcp"}
    http("PUT", f"{one}/services/web/instances/{instance_id('tcp', inst['addr'])}", inst)
    # registered through node 1, seen through node 3's API and node 2's DNS
    (seen,) = http("GET", f"{three}/services/web/instances")
    assert seen["addr"] == "10.20.30.40:8080"
    dig = ["dig", "+short", "@127.0.0.1", "-p", str(cluster.dns_port)]
    assert subprocess.run([*dig, "web.discoverd"], capture_output=True,
                          text=True).stdout.split() == ["10.20.30.40"]  # fmt: skip
    assert subprocess.run([*dig, "leader.web.discoverd"], capture_output=True,
                          text=True).stdout.split() == ["10.20.30.40"]  # fmt: skip
    srv = subprocess.run([*dig, "SRV", "_web._tcp.discoverd"], capture_output=True, text=True)
    iid = instance_id("tcp", inst["addr"])
    assert srv.stdout.split() == ["1", "1", "8080", f"{iid}.web._i.discoverd."]
    peers = http("GET", f"{three}/raft/peers")
    assert len(peers) == 3
    # the host registered itself in service flynn-host once discoverd reported in
    listing = wait_for(lambda: (out := d.run_cli("list").stdout.splitlines())[1:] and out, 20,
                       "the host in `flynn-host list`", every=0.2)  # fmt: skip
    assert listing[0].split() == ["ID", "ADDR"]
    assert listing[1].split() == [d.host_id, f"127.0.0.1:{d.port}"]
    found = json.loads(d.run_cli("discover", "--json", "web").stdout)
    assert [i["addr"] for i in found] == ["10.20.30.40:8080"]
    # discoverd supervises its etcd member: killed, it is restarted and rejoins
    before = etcd_pids(cluster.ports[1])
    assert len(before) == 1
    subprocess.run(["kill", "-9", before[0]], check=True)
    wait_for(lambda: (now := etcd_pids(cluster.ports[1])) and now != before, 20,
             "node 2's etcd member restarted", every=0.2)  # fmt: skip
    http("PUT", f"{two}/services/web/meta", {"data": "after restart", "index": 0})
    assert http("GET", f"{three}/services/web/meta")["data"] == "after restart"

    # a daemon that stops marks itself shutting down, then leaves the flynn-host service
    events: list[tuple[str, str]] = []
    watching, first_event = threading.Event(), threading.Event()

    def watch() -> None:
        req = urllib.request.Request(f"{three}/services/flynn-host/instances",
                                     headers={"Accept": "text/event-stream"})  # fmt: skip
        with contextlib.suppress(OSError), urllib.request.urlopen(req, timeout=30) as resp:
            watching.set()
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    meta = (event.get("instance") or {}).get("meta", {})
                    events.append((event["kind"], meta.get("shutdown", "")))
                    first_event.set()
                    if event["kind"] == "down":
                        return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert watching.wait(10)
    assert first_event.wait(10)  # the stream's current instance (the host) came first
    d.stop()  # SIGTERM: deregisters, then stops its jobs (the discoverd nodes)
    watcher.join(30)
    assert events[0] == ("up", "")
    assert events[-2:] == [("update", "true"), ("down", "true")]
    d.start()  # the jobs were stopped with the daemon: start it again to check what is left
    for job_id in jobs:
        final = d.client.get_job(job_id)
        assert final["status"] == "done", (final["exit_status"], final["error"])


def test_discoverd_jobs_stop_cleanly(cluster: Nodes) -> None:
    d, jobs = cluster.daemon, cluster.jobs
    for job_id in jobs:
        d.client.stop_job(job_id)
    for job_id in jobs:
        final = d.wait_job(job_id)
        assert final["status"] == "done", (
            final["exit_status"],
            final["error"],
            d.run_cli("log", job_id).stdout[-1500:],
        )
        assert "discoverd: stopped" in d.run_cli("log", job_id).stdout
    # stopping the jobs stopped their etcd members too (nothing left behind)
    assert [etcd_pids(port) for port in cluster.ports] == [[], [], []]
