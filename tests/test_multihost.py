"""Layer 0 on three hosts (network namespaces on a private bridge, `flynn_host.dev.cluster`,
the code behind `script/cluster`), booted from nothing with `flynn-host bootstrap`: discoverd
and flannel on every host, jobs with overlay addresses reaching each other across hosts by
address and by `<service>.discoverd`, egress through NAT, a host lost and brought back, and
nothing left behind afterwards."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import signal
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flynn_host.dev import host as devhost
from flynn_host.dev.cluster import Cluster, leftovers
from flynn_host.dev.host import busybox_job
from flynn_host.networking.jobnet import netns_name
from flynn_host.networking.links import NETNS_DIR
from tests.dev.test_cluster import new_cluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")


def job_namespaces() -> set[str]:
    return (
        {n for n in os.listdir(NETNS_DIR) if n.startswith("fj-")} if NETNS_DIR.exists() else set()
    )


def cluster_jobs(c: Cluster) -> set[str]:
    """The ids of every job the cluster's answering hosts know (ended ones too)."""
    ids: set[str] = set()
    for h in c.hosts:
        with contextlib.suppress(OSError, ConnectionError, ValueError):
            ids |= set(c.client(h.index, timeout=5).list_jobs())
    return ids


def namespaces_left(job_ids: set[str]) -> set[str]:
    """The network namespaces of these jobs that still exist (other clusters' jobs, of tests
    running beside this one, do not count)."""
    return {netns_name(j) for j in job_ids} & job_namespaces()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = new_cluster()
    try:
        c.up(3, bootstrap=True, host_id_prefix=f"{c.name}h")
        yield c
    finally:
        jobs = cluster_jobs(c)
        c.down()
        assert leftovers(c) == []
        assert namespaces_left(jobs) == set()


# a host, a job or discoverd that does not answer (as expected) yet
NOT_YET = (OSError, ValueError, KeyError, AssertionError)
wait_for = functools.partial(devhost.wait_for, every=0.2, ignoring=NOT_YET)


def start_job(c: Cluster, host: int, args: list[str]) -> dict[str, Any]:
    """A busybox job on `host`, once running (its JSON, with `internal_ip`)."""
    client = c.client(host)
    job_id = f"{c.host(host).id}-{uuid.uuid4().hex}"
    client.add_job(busybox_job(job_id, args))
    return wait_for(lambda: (j := client.get_job(job_id))["status"] == "running" and j)


def web_job(c: Cluster, host: int) -> dict[str, Any]:
    """A busybox httpd job on `host` on port 8080 answering `hello from <its address>`."""
    page = "mkdir /www && echo hello from $EXTERNAL_IP > /www/index.html"
    return start_job(c, host, ["sh", "-c", f"{page} && exec httpd -f -p 8080 -h /www"])


def run_job(
    c: Cluster, host: int, script: str, timeout: float = 30.0, partition: str = "user"
) -> tuple[int, str]:
    """Run `sh -c script` in a busybox job on `host`; its exit status and output."""
    client = c.client(host)
    job_id = f"{c.host(host).id}-{uuid.uuid4().hex}"
    client.add_job(busybox_job(job_id, ["sh", "-c", script], partition=partition))
    job = wait_for(lambda: (j := client.get_job(job_id))["status"] in ("done", "crashed") and j,
                   timeout)  # fmt: skip
    out = c.exec(host, ["flynn-host", "log", job_id], capture_output=True, text=True).stdout
    return job["exit_status"], out


def discoverd(c: Cluster, host: int, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(f"http://{c.host(host).ip}:1111{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def register(c: Cluster, via: int, service: str, addr: str) -> None:
    discoverd(c, via, "PUT", f"/services/{service}", {})
    iid = hashlib.md5(f"tcp-{addr}".encode()).hexdigest()
    discoverd(c, via, "PUT", f"/services/{service}/instances/{iid}", {"addr": addr})


def dns_a(c: Cluster, host: int, name: str) -> list[str]:
    """A records for `name` from discoverd's DNS on `host`'s bridge address."""
    subnet = c.client(host).status()["network"]["subnet"]
    server = subnet.rsplit(".", 1)[0] + ".1"
    out = c.exec(host, ["dig", "+short", "+time=2", "+tries=1", f"@{server}", name],
                 capture_output=True, text=True).stdout  # fmt: skip
    return sorted(out.split())


def test_three_hosts_boot_with_discoverd_and_distinct_subnets(cluster: Cluster) -> None:
    subnets = []
    for i in (1, 2, 3):
        status = cluster.client(i).status()
        assert status["discoverd"]["url"] == f"http://{cluster.host(i).ip}:1111"
        subnets.append(status["network"]["subnet"])
        assert status["network"]["mtu"] == 1450  # vxlan's 50 bytes under the bridge's 1500
    assert len(set(subnets)) == 3 and all(s.startswith("100.100.") for s in subnets)

    def listed() -> bool:  # each host registers in discoverd once discoverd told it where
        out = cluster.exec(1, ["flynn-host", "list"], capture_output=True, text=True).stdout
        return all(cluster.host(i).id in out for i in (1, 2, 3))

    wait_for(listed)
    leases = discoverd(cluster, 2, "GET", "/services/flannel/meta")["data"]["subnets"]
    assert sorted(v["PublicIP"] for v in leases.values()) == cluster.ips()


def test_job_on_host1_reaches_job_on_host3_by_address_and_by_name(cluster: Cluster) -> None:
    server = web_job(cluster, 3)
    ip = server["internal_ip"]
    assert ip.startswith(cluster.client(3).status()["network"]["subnet"].rsplit(".", 1)[0])
    status, out = run_job(cluster, 1, f"wget -q -O- http://{ip}:8080/")
    assert (status, out.strip()) == (0, f"hello from {ip}")
    register(cluster, 2, "web3", f"{ip}:8080")
    assert wait_for(lambda: dns_a(cluster, 1, "web3.discoverd") == [ip])
    status, out = run_job(
        cluster, 1, "cat /etc/resolv.conf; wget -q -O- http://web3.discoverd:8080/"
    )
    assert status == 0, out
    assert f"hello from {ip}" in out
    cluster.client(3).stop_job(server["job"]["id"])


def test_job_reaches_the_private_bridge_through_nat(cluster: Cluster) -> None:
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            seen.append(self.client_address[0])
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"outside")

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer((cluster.gateway, 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        status, out = run_job(
            cluster, 2, f"wget -q -O- http://{cluster.gateway}:{srv.server_port}/"
        )
    finally:
        srv.shutdown()
        srv.server_close()
    assert (status, out.strip()) == (0, "outside")
    assert seen == [cluster.host(2).ip]  # masqueraded to the host's address


def test_user_jobs_cannot_reach_host_apis_or_etcd(cluster: Cluster) -> None:
    """The fence of docs/security.md: from a user job on host 2, every host's API and etcd
    ports refuse, wherever they are (host 1, its own host's bridge address); discoverd still
    answers. A system job on the same host reaches them all."""
    h1 = cluster.host(1).ip
    gateway2 = cluster.client(2).status()["network"]["subnet"].rsplit(".", 1)[0] + ".1"
    targets = [f"{h1}:1113", f"{h1}:2379", f"{h1}:2380", f"{gateway2}:1113", f"{h1}:1111"]
    # busybox nc connects and, its stdin empty, closes at once: no output when it connected
    script = (
        "".join(
            f"echo {t} $(nc -w 5 {t.replace(':', ' ')} </dev/null 2>&1 | tr -d '\\n');"
            for t in targets
        )
        + "echo ping_group_range $(cat /proc/sys/net/ipv4/ping_group_range)"
    )

    def results(partition: str) -> dict[str, str]:
        status, out = run_job(cluster, 2, script, partition=partition)
        assert status == 0, out
        return {ln.split(" ")[0]: ln.partition(" ")[2] for ln in out.strip().splitlines()}

    user = results("user")
    for t in targets[:4]:
        assert user[t].endswith("Connection refused"), user
    assert user[f"{h1}:1111"] == "", user  # discoverd's API answers user jobs
    # no CAP_NET_RAW for user jobs: ping needs the kernel's unprivileged ICMP sockets
    assert user["ping_group_range"].split() == ["0", "2147483647"], user
    system = results("system")
    assert all(system[t] == "" for t in targets), system


def host_links(c: Cluster, host: int) -> set[str]:
    out = c.exec(host, ["ip", "-o", "link", "show", "master", "flynnbr0"],
                 capture_output=True, text=True).stdout  # fmt: skip
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_ended_jobs_leave_no_veth_address_or_namespace(cluster: Cluster) -> None:
    links = host_links(cluster, 2)
    addresses = Path(cluster.host(2).dir) / "state.json.addresses"
    # written at the host's first job address: there may have been none yet
    allocated = json.loads(addresses.read_text())["allocations"] if addresses.exists() else {}
    job = start_job(cluster, 2, ["sleep", "600"])
    assert len(host_links(cluster, 2) - links) == 1
    assert job["job"]["id"] in json.loads(addresses.read_text())["allocations"]
    cluster.client(2).stop_job(job["job"]["id"])
    wait_for(lambda: host_links(cluster, 2) == links and not namespaces_left({job["job"]["id"]}))
    assert json.loads(addresses.read_text())["allocations"] == allocated
    nat = cluster.exec(2, ["iptables", "-t", "nat", "-S", "POSTROUTING"], capture_output=True,
                       text=True).stdout  # fmt: skip
    assert nat.count("MASQUERADE") == 1  # the host's one rule, none per job


def test_a_killed_daemon_leaves_its_jobs_reachable_and_adopts_them(cluster: Cluster) -> None:
    """Host 3's daemon alone is killed: its jobs run on (their shims hold them), its own
    registration leaves DNS after the TTL; restarted, it adopts the jobs and registers again."""
    subnet3 = cluster.client(3).status()["network"]["subnet"]
    server = web_job(cluster, 3)
    ip = server["internal_ip"]
    assert wait_for(lambda: len(dns_a(cluster, 1, "flynn-host.discoverd")) == 3)
    pid = cluster.host(3).pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: len(dns_a(cluster, 1, "flynn-host.discoverd")) == 2, timeout=60)
    assert run_job(cluster, 1, f"wget -q -O- http://{ip}:8080/") == (0, f"hello from {ip}\n")
    cluster.start_host(3)
    assert cluster.client(3).get_job(server["job"]["id"])["status"] == "running"
    assert cluster.client(3).status()["network"]["subnet"] == subnet3
    assert wait_for(lambda: len(dns_a(cluster, 1, "flynn-host.discoverd")) == 3, timeout=60)
    assert run_job(cluster, 2, f"wget -q -O- http://{ip}:8080/") == (0, f"hello from {ip}\n")
    cluster.client(3).stop_job(server["job"]["id"])


def test_a_host_lost_and_brought_back(cluster: Cluster) -> None:
    """Host 3 is lost (every process killed, its namespace with its bridge and VXLAN device
    removed): hosts 1 and 2 keep discoverd's quorum and their traffic; host 3's instances leave
    DNS after the TTL; once its namespace and daemon are back and bootstrap is rerun, its jobs
    are reachable again on the same subnet."""
    subnet3 = cluster.client(3).status()["network"]["subnet"]
    wait_for(lambda: len(dns_a(cluster, 1, "flannel.discoverd")) == 3)
    server = web_job(cluster, 2)

    cluster.stop_host(3, remove_namespace=True)
    assert wait_for(lambda: len(dns_a(cluster, 1, "flannel.discoverd")) == 2, timeout=60)
    assert wait_for(lambda: len(dns_a(cluster, 1, "flynn-host.discoverd")) == 2, timeout=60)
    register(cluster, 1, "after-loss", "10.9.9.9:1")  # writes need a quorum
    assert discoverd(cluster, 2, "GET", "/services/after-loss/instances")[0]["addr"] == "10.9.9.9:1"
    ip = server["internal_ip"]
    assert run_job(cluster, 1, f"wget -q -O- http://{ip}:8080/") == (0, f"hello from {ip}\n")

    cluster.start_host(3)
    # its own discoverd is not back yet: it registers through its peers' (--peer-ips)
    assert wait_for(lambda: len(dns_a(cluster, 1, "flynn-host.discoverd")) == 3, timeout=60)
    rerun = cluster.exec(1, ["flynn-host", "bootstrap", "--min-hosts", "3", "--peer-ips",
                             ",".join(cluster.ips())], env={"CLUSTER_DOMAIN": cluster.domain},
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert cluster.client(3).status()["network"]["subnet"] == subnet3
    assert wait_for(lambda: len(dns_a(cluster, 1, "flannel.discoverd")) == 3, timeout=60)
    back = web_job(cluster, 3)
    assert back["internal_ip"].rsplit(".", 1)[0] == subnet3.rsplit(".", 1)[0]
    ip = back["internal_ip"]
    assert run_job(cluster, 1, f"wget -q -O- http://{ip}:8080/") == (0, f"hello from {ip}\n")
    for host, job in ((2, server), (3, back)):
        cluster.client(host).stop_job(job["job"]["id"])


def test_one_host_cluster_boots_and_its_jobs_resolve_each_other() -> None:
    """A single host (singleton bootstrap): discoverd's etcd alone, the host's own subnet."""
    c = new_cluster()
    try:
        c.up(1, bootstrap=True, host_id_prefix=f"{c.name}h")
        status = c.client(1).status()
        assert status["network"]["subnet"].startswith("100.100.")
        server = web_job(c, 1)
        ip = server["internal_ip"]
        register(c, 1, "solo", f"{ip}:8080")
        assert run_job(c, 1, "wget -q -O- http://solo.discoverd:8080/") == (0, f"hello from {ip}\n")
    finally:
        jobs = cluster_jobs(c)
        c.down()
        assert leftovers(c) == []
        assert namespaces_left(jobs) == set()
