"""Redeploying the stateful system apps on a 3-host cluster booted with `flynn-host
bootstrap`, as `flynn -a <app> env set X=1` does (a new release of the app, deployed with the
app's strategy), while they are in use:

- postgres (`sirenia`): a writer inserts through `leader.postgres.discoverd` throughout; the
  deployment completes, every acknowledged write is there afterwards, and the appliance is
  healthy on the new release (three nodes on three hosts, one primary);
- discoverd (`discoverd-meta`): a prober asks every host's discoverd over HTTP and DNS, and
  the controller, every 100 ms; the deployment completes, the controller never stops
  answering, each discoverd is away only during its own host's step (never two at once, and
  never as long as an instance's TTL), and every host runs the new release's discoverd;
- a new release whose process crashes, of either app: the deployment fails and the app is
  back on its release, whole (the strategies move back node by node, host by host).

The measured pauses are printed (run with -s to see them).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flynn_host.dev import postgres as pg
from flynn_host.dev.cluster import Cluster
from flynn_host.dev.controller import cluster_controller
from flynn_host.dev.postgres import Writer, healthy, missing_acks, wait_for
from tests.dev.test_cluster import booted_cluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)"),
]

CALL_POST = """
import base64, json, sys, urllib.request
url, key = sys.argv[1], sys.argv[2]
def call(method, path, body):
    data = body if isinstance(body, str) else json.dumps(body)
    req = urllib.request.Request(url + path, data=data.encode(), method=method, headers={
        "Content-Type": "application/json", "Accept": "application/json",
        "Authorization": "Basic " + base64.b64encode((":" + key).encode()).decode()})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())
"""

CALL = """
import base64, json, sys, urllib.request
url, key = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url, headers={"Accept": "application/json"})
req.add_header("Authorization", "Basic " + base64.b64encode((":" + key).encode()).decode())
with urllib.request.urlopen(req, timeout=10) as resp:
    print(resp.read().decode())
"""

# Probes every target every 100 ms until SIGTERM, then prints, per target, the spans during
# which it did not answer: an http(s) URL (0.5 s timeout) or dns:<server ip>:<name> (an A
# query over UDP, 0.5 s timeout, answered with at least one record).
PROBE = r"""
import json, random, signal, socket, struct, sys, threading, time, urllib.request

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())

def dns(ip, name):
    qid = random.randrange(65536)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0\0\1\0\1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(q, (ip, 53))
        data = s.recv(4096)
    rid, flags, _, answers = struct.unpack(">HHHH", data[:8])
    if rid != qid or flags & 0xF or not answers:
        raise OSError(f"rcode {flags & 0xF}, {answers} answers")

def probe(target):
    if target.startswith("dns:"):
        _, ip, name = target.split(":", 2)
        dns(ip, name)
    else:
        with urllib.request.urlopen(target, timeout=0.5) as r:
            r.read()

spans = {t: [] for t in sys.argv[1:]}
probes = {t: 0 for t in sys.argv[1:]}

def run(target):
    down = None
    while not stop.is_set():
        began = time.time()
        try:
            probe(target)
            if down is not None:
                spans[target].append([down[0], time.time() - down[0], down[1]])
                down = None
        except Exception as exc:
            if down is None:
                down = (began, str(exc)[:100])
        probes[target] += 1
        stop.wait(max(0.0, 0.1 - (time.time() - began)))
    if down is not None:
        spans[target].append([down[0], time.time() - down[0], down[1] + " (still)"])

threads = [threading.Thread(target=run, args=(t,)) for t in spans]
for t in threads:
    t.start()
print("probing", flush=True)
for t in threads:
    t.join()
print(json.dumps({"spans": spans, "probes": probes}), flush=True)
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with booted_cluster(3) as c:
        yield c


@pytest.fixture(scope="module")
def flynn(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`flynn <args>` on host 1, set up for the cluster's controller: (exit status, output)."""
    home = tmp_path_factory.mktemp("flynn")
    env = {"HOME": str(home), "FLYNNRC": str(home / ".flynnrc")}
    cli = os.path.join(os.path.dirname(sys.executable), "flynn")

    def run(*args: str, timeout: float = 600) -> tuple[int, str]:
        out = cluster.exec(1, [cli, *args], env=env, capture_output=True, text=True,
                           timeout=timeout, cwd=str(home))  # fmt: skip
        return out.returncode, out.stdout + out.stderr

    url, key, _ = cluster_controller(cluster)
    status, out = run("cluster", "add", "--no-git", "default", url, key)
    assert status == 0, out
    return run


def api(c: Cluster, path: str) -> Any:
    """A GET of the controller's API from host 1."""
    url, key, _ = cluster_controller(c)
    out = c.exec(1, [sys.executable, "-c", CALL, url + path, key], capture_output=True,
                 text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def redeploy(c: Cluster, flynn: Any, app: str) -> tuple[dict[str, Any], float]:
    """`flynn -a <app> env set X=...` (a new release, deployed): the deployment, its time."""
    old = api(c, f"/apps/{app}/release")["id"]
    started = time.monotonic()
    status, out = flynn("-a", app, "env", "set", f"DEPLOY_TEST={int(time.time())}")
    took = time.monotonic() - started
    assert status == 0, out
    new = re.search(r"Created release (\S+)\.", out).group(1)  # type: ignore[union-attr]
    deployment = api(c, f"/apps/{app}/deployments")[0]
    assert (deployment["old_release"], deployment["new_release"]) == (old, new), deployment
    return deployment, took


def release_of(job: dict[str, Any]) -> str:
    return str(job["job"]["metadata"].get("flynn-controller.release"))


def test_postgres_is_replaced_node_by_node_without_losing_a_write(
    cluster: Cluster, flynn: Any
) -> None:
    _, body = wait_for(lambda: (a := pg.api_request(cluster, 1, "POST", "/databases"))[0]
                       == 200 and a, 60, every=1)  # fmt: skip
    env = {k: str(v) for k, v in body["env"].items()}
    status, out = pg.run_job(cluster, 1, "psql -qtA -c 'CREATE TABLE acked (id int PRIMARY KEY)'",
                             env)  # fmt: skip
    assert status == 0, out
    wait_for(lambda: healthy(cluster), pg.FAILOVER)
    before = {n.job_id for n in pg.nodes(cluster)}
    writer = Writer(cluster, host=3).start(env)
    try:
        writer.wait_acks(20, 30)
        began = time.time()
        deployment, took = redeploy(cluster, flynn, "postgres")
        ended = time.time()
        writer.wait_acks(20, 60, after=ended)
    finally:
        writer.stop()
    assert deployment["status"] == "complete", deployment
    assert deployment["strategy"] == "sirenia"
    acks = sorted(t for _, t in writer.acks())
    pauses = [b - a for a, b in itertools.pairwise(acks) if b >= began and a <= ended]
    print(f"\npostgres deployment: {took:.1f} s, {len(pauses)} writes acknowledged meanwhile,"
          f" longest pause between two {max(pauses):.2f} s")  # fmt: skip
    wait_for(lambda: healthy(cluster), pg.FAILOVER)
    acked = [i for i, _ in writer.acks()]
    assert missing_acks(cluster, pg.primary(cluster), env, acked) == []
    nodes = pg.nodes(cluster)
    assert sorted(n.host for n in nodes) == [1, 2, 3]
    assert {release_of(n.job) for n in nodes} == {deployment["new_release"]}
    assert not before & {n.job_id for n in nodes}
    assert sorted(pg.roles(cluster).values()) == ["leader", "replica", "sync_standby"]
    assert {release_of(j) for _, _, j in pg.app_jobs(cluster, "web")} == {deployment["new_release"]}
    formations = {f["release"]: f for f in api(cluster, "/apps/postgres/formations")}
    assert formations[deployment["new_release"]]["processes"] == {"postgres": 3, "web": 2}
    assert "hosts" not in formations[deployment["new_release"]]
    assert set(formations[deployment["old_release"]]["processes"].values()) == {0}


def deploy_release(c: Cluster, app: str, change: Any) -> dict[str, Any]:
    """A new release of `app` made from the current one by `change(release)`, deployed
    through the API; the finished deployment."""
    url, key, _ = cluster_controller(c)
    current = api(c, f"/apps/{app}/release")
    body = {
        k: current[k]
        for k in ("artifact", "artifacts", "env", "processes", "meta")
        if current.get(k) is not None
    }
    change(body)
    script = CALL_POST + f"\nrelease = call('POST', '/releases', {json.dumps(body)!r})"
    script += f"\nd = call('POST', '/apps/{app}/deploy', json.dumps({{'id': release['id']}}))"
    script += "\nprint(json.dumps(d))"
    out = c.exec(1, [sys.executable, "-c", script, url, key], capture_output=True, text=True,
                 timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    deployment = json.loads(out.stdout)
    return dict(wait_for(lambda: (d := api(c, f"/deployments/{deployment['id']}"))["status"]
                         in ("complete", "failed") and d, 300, every=1))  # fmt: skip


def test_a_crashing_postgres_release_leaves_the_appliance_as_it_was(cluster: Cluster) -> None:
    wait_for(lambda: healthy(cluster), pg.FAILOVER)
    before = {n.job_id for n in pg.nodes(cluster)}
    release = api(cluster, "/apps/postgres/release")["id"]
    deployment = deploy_release(
        cluster, "postgres", lambda r: r["env"].update({"POSTGRES_MODE": "no-such-mode"})
    )
    assert deployment["status"] == "failed"
    events = api(cluster, f"/events?object_types=deployment&object_id={deployment['id']}")
    assert "New job of type postgres crashed" in events[0]["data"]["error"]
    wait_for(lambda: healthy(cluster), pg.FAILOVER)
    # no node of the appliance was touched: the new one never joined
    assert {n.job_id for n in pg.nodes(cluster)} == before
    assert api(cluster, "/apps/postgres/release")["id"] == release


def discoverd_jobs(c: Cluster) -> dict[int, list[dict[str, Any]]]:
    return {h.index: [j for j in c.client(h.index).list_jobs(active=True).values()
                      if j["job"]["metadata"].get("flynn-controller.app_name") == "discoverd"
                      and j["status"] == "running"] for h in c.hosts}  # fmt: skip


def test_discoverd_is_replaced_host_by_host_while_it_answers(cluster: Cluster, flynn: Any) -> None:
    statuses = {h.index: cluster.client(h.index).request("GET", "/host/status") for h in
                cluster.hosts}  # fmt: skip
    controller_url, _, _ = cluster_controller(cluster)
    path = "/services/controller/instances"
    targets = {f"discoverd http on host {i}": f"{s['discoverd']['url']}{path}"
               for i, s in statuses.items()}  # fmt: skip
    targets |= {f"discoverd dns on host {i}": f"dns:{s['discoverd']['dns'].rpartition(':')[0]}"
                ":controller.discoverd" for i, s in statuses.items()}  # fmt: skip
    targets["controller"] = f"{controller_url}/ping"
    host1 = cluster.host(1)
    prober = subprocess.Popen(
        ["nsenter", f"--net={host1.netns_path}", "--", sys.executable, "-c", PROBE,
         *targets.values()],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert prober.stdout is not None and prober.stdout.readline().strip() == "probing"
        time.sleep(1)
        deployment, took = redeploy(cluster, flynn, "discoverd")
        time.sleep(1)
    finally:
        prober.send_signal(signal.SIGTERM)
        report, _ = prober.communicate(timeout=30)
    found = json.loads(report.strip().splitlines()[-1])
    spans = {name: found["spans"][t] for name, t in targets.items()}
    print(f"\ndiscoverd deployment: {took:.1f} s; answers missed (start, seconds, error):")
    for name, missed in spans.items():
        print(f"  {name}: {[(round(s, 1), round(d, 2), e) for s, d, e in missed]}")
    assert deployment["status"] == "complete", deployment
    assert deployment["strategy"] == "discoverd-meta"
    assert spans["controller"] == []
    # each host's discoverd was away once, briefly, and never two at once
    away = sorted((s, s + d, name) for name, missed in spans.items() if "http" in name
                  for s, d, _ in missed)  # fmt: skip
    assert len(away) <= 3 and all(end - start < 8 for start, end, _ in away), away
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(away)), away
    # every host runs the new release's discoverd, and names it
    jobs = discoverd_jobs(cluster)
    assert {i: [release_of(j) for j in js] for i, js in jobs.items()} == {
        i: [deployment["new_release"]] for i in (1, 2, 3)
    }
    for h in cluster.hosts:
        status = cluster.client(h.index).request("GET", "/host/status")
        assert status["discoverd"]["job_id"] == jobs[h.index][0]["job"]["id"]
        assert status["discoverd"]["dns"]
    assert len(pg.discoverd(cluster, "/raft/peers")) == 3
    assert len(pg.discoverd(cluster, "/services/flynn-host/instances")) == 3
    wait_for(lambda: healthy(cluster), pg.FAILOVER)


def test_a_crashing_discoverd_release_is_moved_back_host_by_host(cluster: Cluster) -> None:
    release = api(cluster, "/apps/discoverd/release")["id"]

    def bad_flag(r: dict[str, Any]) -> None:
        r["processes"]["app"]["args"] = [*r["processes"]["app"]["args"], "--no-such-flag"]

    deployment = deploy_release(cluster, "discoverd", bad_flag)
    assert deployment["status"] == "failed"
    assert api(cluster, "/apps/discoverd/release")["id"] == release
    jobs = discoverd_jobs(cluster)
    assert {i: [release_of(j) for j in js] for i, js in jobs.items()} == {
        i: [release] for i in (1, 2, 3)
    }
    for h in cluster.hosts:
        status = cluster.client(h.index).request("GET", "/host/status")
        assert status["discoverd"]["job_id"] == jobs[h.index][0]["job"]["id"]
    formations = {f["release"]: f for f in api(cluster, "/apps/discoverd/formations")}
    assert formations[release]["processes"] == {"app": 1} and "hosts" not in formations[release]
    assert len(pg.discoverd(cluster, "/raft/peers")) == 3
