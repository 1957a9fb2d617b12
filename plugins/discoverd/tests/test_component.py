"""discoverd as Flynn runs it: three host-network jobs from the `components` image, each
running `/.flynn-host/flynn-host component discoverd` with its etcd member's data on a volume,
forming one cluster through a real flynn-host daemon."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from flynn_discoverd.types import instance_id

from flynn_host import devhost

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# discoverd API ports; each node's etcd uses port + 1268 (clients) and + 1269 (peers)
PORTS = (31111, 31211, 31311)
DNS_PORT = 31053


def http(method: str, url: str, body: object = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else None


def wait_for(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def cluster() -> Iterator[tuple[devhost.Daemon, list[str]]]:
    manifest = devhost.IMAGES / "components" / "manifest.json"
    if not manifest.exists():
        pytest.fail(f"{manifest} is missing: run `make images` first")
    # etcd members leaving together take a few seconds: the test daemon's 3 s grace is too short
    d = devhost.make_daemon(extra_args=["--stop-timeout", "20"])
    try:
        image = d.client.request(
            "POST", "/host/images", {"manifest_url": manifest.as_uri(), "name": "components"}
        )
        peers = ",".join(f"127.0.0.1:{p}" for p in PORTS)
        jobs = []
        for i, port in enumerate(PORTS):
            vol = d.client.request("POST", "/storage/providers/default/volumes", {})
            args = ["/.flynn-host/flynn-host", "component", "discoverd", "--data-dir", "/data",
                    "--host", "127.0.0.1", "--addr", f"127.0.0.1:{port}",
                    "--notify", f"{d.url}/host/discoverd"]  # fmt: skip
            if i == 1:
                args += ["--dns-addr", f"127.0.0.1:{DNS_PORT}", "--recursors", ""]
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
        for port in PORTS:
            wait_for(f"http://127.0.0.1:{port}/ping")
        yield d, jobs
    finally:
        d.cleanup()


def test_three_discoverd_jobs_form_one_cluster(cluster):
    d, jobs = cluster
    for job_id in jobs:
        assert d.client.get_job(job_id)["status"] == "running"
    one, _, three = (f"http://127.0.0.1:{p}" for p in PORTS)
    # the host learnt where discoverd is (POST /host/discoverd from a node)
    assert d.client.status()["discoverd"]["url"] in {f"http://127.0.0.1:{p}" for p in PORTS}
    http("PUT", f"{one}/services/web", {})
    inst = {"addr": "10.20.30.40:8080", "proto": "tcp"}
    http("PUT", f"{one}/services/web/instances/{instance_id('tcp', inst['addr'])}", inst)
    # registered through node 1, seen through node 3's API and node 2's DNS
    (seen,) = http("GET", f"{three}/services/web/instances")
    assert seen["addr"] == "10.20.30.40:8080"
    dig = ["dig", "+short", "@127.0.0.1", "-p", str(DNS_PORT)]
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
    deadline = time.monotonic() + 20
    while len(d.run_cli("list").stdout.splitlines()) < 2:
        assert time.monotonic() < deadline, d.run_cli("list")
        time.sleep(0.2)
    listing = d.run_cli("list").stdout.splitlines()
    assert listing[0].split() == ["ID", "ADDR"]
    assert listing[1].split() == [d.host_id, f"127.0.0.1:{d.port}"]
    found = json.loads(d.run_cli("discover", "--json", "web").stdout)
    assert [i["addr"] for i in found] == ["10.20.30.40:8080"]
    # stopping the jobs stops their etcd members too (nothing left behind)
    # discoverd supervises its etcd member: killed, it is restarted and rejoins
    name = "discoverd-127-0-0-1-31211"
    before = subprocess.run(["pgrep", "-f", f"etcd --name {name} "], capture_output=True,
                            text=True).stdout.split()  # fmt: skip
    assert len(before) == 1
    subprocess.run(["kill", "-9", before[0]], check=True)
    deadline = time.monotonic() + 20
    while True:
        now = subprocess.run(["pgrep", "-f", f"etcd --name {name} "], capture_output=True,
                             text=True).stdout.split()  # fmt: skip
        if now and now != before:
            break
        assert time.monotonic() < deadline, "etcd member was not restarted"
        time.sleep(0.2)
    two = f"http://127.0.0.1:{PORTS[1]}"
    http("PUT", f"{two}/services/web/meta", {"data": "after restart", "index": 0})
    assert http("GET", f"{three}/services/web/meta")["data"] == "after restart"

    # a daemon that stops marks itself shutting down, then leaves the flynn-host service
    events: list[tuple[str, str]] = []
    watching = threading.Event()

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
                    if event["kind"] == "down":
                        return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert watching.wait(10)
    time.sleep(0.3)  # the stream's current instances arrive first
    d.stop()  # SIGTERM: deregisters, then stops its jobs (the discoverd nodes)
    watcher.join(30)
    assert events[0] == ("up", "")
    assert events[-2:] == [("update", "true"), ("down", "true")]
    d.start()  # the jobs were stopped with the daemon: start it again to check what is left
    for job_id in jobs:
        final = d.client.get_job(job_id)
        assert final["status"] == "done", (final["exit_status"], final["error"])


def test_discoverd_jobs_stop_cleanly(cluster):
    d, jobs = cluster
    started = time.monotonic()
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
    print(f"three discoverd jobs stopped in {time.monotonic() - started:.1f}s")
    out = subprocess.run(["pgrep", "-f", "etcd.*discoverd-127-0-0-1-31"], capture_output=True)
    assert out.stdout == b""
