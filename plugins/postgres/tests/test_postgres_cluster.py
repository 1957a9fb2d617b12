"""Three `flynn-host component postgres` nodes for real, as subprocesses on loopback: a real
etcd, a real discoverd API on it (the `discoverd` fixture), real Patroni and PostgreSQL 15 in
strict mode. Two nodes find etcd through discoverd, one is given `--etcd`. The cluster forms
(primary, sync standby, async standby) and discoverd's leader is Patroni's primary; a SIGKILLed
primary is replaced within seconds, discoverd's leader follows (the delay is printed), no
acknowledged write is lost, and the killed node rejoins as a standby; a SIGTERMed primary hands
over to its sync standby while a writer goes on, and leaves discoverd.

The tests share one cluster (a module fixture) and run in file order: each leaves it with
three running nodes or says what it changed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flynn_host.dev.host import free_ports, require_programs, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runs postgres as postgres)")

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "test-superuser-secret"
SCOPE = "pgcluster"
Discoverd = Any  # conftest.Discoverd: url, etcd (its EtcdProcess)


# ---- helpers: HTTP, psql, processes ----------------------------------------------------------


def get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    """(status, JSON body) of a GET; (0, None) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return 0, None


def psql(port: int, sql: str, timeout: float = 30) -> str:
    out = subprocess.run(
        [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
         "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
        env={**os.environ, "PGPASSWORD": PASSWORD, "PGCONNECT_TIMEOUT": "3"},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, f"psql {sql!r} on {port}: {out.stderr}"
    return out.stdout.strip()


def pids_naming(path: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@dataclass
class Node:
    """One component subprocess (its own process group) with its volume and log."""

    name: str
    root: Path
    discoverd: Discoverd
    etcd_flag: bool  # given --etcd, or finding etcd through discoverd
    port: int = 0
    api_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port, self.api_port = free_ports(2)

    @property
    def data(self) -> Path:
        return self.root / self.name

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        args = [
            "--name", self.name, "--scope", SCOPE, "--data-dir", str(self.data),
            "--listen", "127.0.0.1", "--port", str(self.port), "--api-port", str(self.api_port),
            "--network", "127.0.0.0/8", "--discoverd", self.discoverd.url,
        ]  # fmt: skip
        if self.etcd_flag:
            args += ["--etcd", f"127.0.0.1:{self.discoverd.etcd.client_port}"]
        return args

    def start(self) -> None:
        env = {
            **os.environ,
            "POSTGRES_SUPERUSER_PASSWORD": PASSWORD,
            "POSTGRES_REPLICATION_PASSWORD": "test-replication-secret",
            "FLYNN_JOB_ID": f"job-{self.name}",
        }
        env.pop("POSTGRES_ETCD", None)
        env.pop("DISCOVERD", None)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flynn_host.cli.main", "component", "postgres",
                 *self.args()],
                env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0,
            )  # fmt: skip

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL everything of the node at once, as a host killing its job would: the
        component's process group, Patroni's and the postmaster's (each its own)."""
        groups = [self.proc.pid] if self.running() and self.proc else []
        groups += pids_naming(self.data)  # Patroni (its config) and the postmaster (-D)
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for pid in pids_naming(self.data):  # any not leading its group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def patroni(self, path: str = "/patroni") -> tuple[int, Any]:
        return get_json(f"http://127.0.0.1:{self.api_port}{path}", timeout=1)

    def is_primary(self) -> bool:
        status, body = self.patroni("/primary")
        return (
            status == 200
            and body.get("role") in ("master", "primary")
            and body.get("state") == "running"
        )

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@dataclass
class Cluster:
    discoverd: Discoverd
    nodes: list[Node] = field(default_factory=list)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def members(self) -> dict[str, dict[str, Any]]:
        """Patroni's `/cluster`, asked of any node that answers: name → member."""
        for n in self.nodes:
            if n.running():
                status, body = n.patroni("/cluster")
                if status == 200:
                    return {m["name"]: m for m in body["members"]}
        return {}

    def roles(self) -> dict[str, str]:
        """name → role, for members replaying or serving (state running/streaming)."""
        return {
            name: m["role"]
            for name, m in self.members().items()
            if m.get("state") in ("running", "streaming")
        }

    def instances(self) -> list[dict[str, Any]]:
        status, body = get_json(f"{self.discoverd.url}/services/{SCOPE}/instances")
        return body if status == 200 else []

    def leader(self) -> dict[str, Any] | None:
        status, body = get_json(f"{self.discoverd.url}/services/{SCOPE}/leader", timeout=1)
        return body if status == 200 else None

    def leader_node(self) -> Node | None:
        leader = self.leader()
        return next((n for n in self.nodes if leader and n.addr == leader["addr"]), None)

    def formed(self) -> str | None:
        """The primary's name once there are a leader, a sync standby and an async replica,
        all running, and discoverd's leader is that primary."""
        for n in self.nodes:
            assert n.running(), f"{n.name} exited {n.proc and n.proc.returncode}:\n{n.log_tail()}"
        roles = self.roles()
        if sorted(roles.values()) != ["leader", "replica", "sync_standby"]:
            return None
        primary = next(name for name, role in roles.items() if role == "leader")
        leader = self.leader_node()
        return primary if leader is not None and leader.name == primary else None

    def print_logs(self) -> None:
        for n in self.nodes:
            print(f"---- {n.name} ----\n{n.log_tail()}")


@pytest.fixture(scope="module")
def cluster(discoverd: Discoverd) -> Iterator[Cluster]:
    require_programs("patroni", "pgrep", str(PG_BIN / "postgres"))
    root = Path(tempfile.mkdtemp(prefix="flynn-postgres-cluster-"))
    os.chmod(root, 0o755)  # PostgreSQL runs as postgres
    c = Cluster(discoverd)
    try:
        # node-c is given --etcd; node-a and node-b find etcd through discoverd
        c.nodes = [
            Node(name, root, discoverd, etcd_flag=name == "node-c")
            for name in ("node-a", "node-b", "node-c")
        ]
        for n in c.nodes:
            n.start()
        started = time.monotonic()
        wait_for(c.formed, timeout=150, what="primary + sync + async, discoverd leader", every=0.5)
        print(f"cluster formed in {time.monotonic() - started:.1f}s")
        yield c
    except BaseException:
        c.print_logs()
        raise
    finally:
        for n in c.nodes:
            n.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def logs_on_failure(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[None]:
    """The nodes' logs under a failed test (its report is in before this teardown)."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        cluster.print_logs()


def insert(node: Node, *ids: int) -> None:
    psql(node.port, f"INSERT INTO acks VALUES ({'), ('.join(map(str, ids))})")


def ids_on(node: Node) -> set[int]:
    return {int(x) for x in psql(node.port, "SELECT id FROM acks").split()}


# ---- the tests -------------------------------------------------------------------------------


def test_three_nodes_and_discoverd_leader_is_the_primary(cluster: Cluster) -> None:
    primary = cluster.node(cluster.formed() or "")
    members = cluster.members()
    # Patroni 4 says `streaming` of a replica that streams, `running` of the primary
    assert {m["state"] for m in members.values()} <= {"running", "streaming"}
    # the etcd of nodes a and b came from discoverd's /raft/peers (its API port + 1268)
    etcd = f"etcd 127.0.0.1:{cluster.discoverd.etcd.client_port}"
    for n in cluster.nodes:
        assert etcd in n.log.read_text(), n.log_tail()
    # every node registered, with its POSTGRES_ID, its role and the job's id
    instances = {i["addr"]: i for i in cluster.instances()}
    assert sorted(instances) == sorted(n.addr for n in cluster.nodes)
    for n in cluster.nodes:
        meta = instances[n.addr]["meta"]
        role = "master" if n is primary else "replica"
        assert meta == {"POSTGRES_ID": n.name, "role": role, "FLYNN_JOB_ID": f"job-{n.name}"}
    leader = cluster.leader()
    assert leader is not None
    assert (leader["addr"], leader["meta"]["POSTGRES_ID"]) == (primary.addr, primary.name)
    # strict mode, as the cluster's dynamic config says
    status, config = primary.patroni("/config")
    assert status == 200 and config["synchronous_mode_strict"] is True
    psql(primary.port, "CREATE TABLE acks (id int PRIMARY KEY)")
    insert(primary, 1, 2, 3)


def test_a_killed_primary_is_replaced_and_the_leader_follows(cluster: Cluster) -> None:
    old = cluster.node(cluster.formed() or "")
    survivors = [n for n in cluster.nodes if n is not old]
    # acknowledged in strict mode: on the sync standby too before the INSERT returned
    insert(old, 100)
    killed = time.monotonic()
    old.kill()
    promoted_at: dict[str, float] = {}
    led_at: dict[str, float] = {}
    deadline = killed + 40
    while time.monotonic() < deadline and not (promoted_at and led_at):
        for n in survivors:
            if n.name not in promoted_at and n.is_primary():
                promoted_at[n.name] = time.monotonic()
        leader = cluster.leader_node()
        if leader is not None and leader is not old and leader.name not in led_at:
            led_at[leader.name] = time.monotonic()
        # until the new leader: the old one, or none; never a standby
        assert leader is None or leader is old or leader.name in promoted_at or leader.is_primary()
        time.sleep(0.02)
    assert promoted_at, "no new primary within 40 s"
    (new_name, promoted), *_ = promoted_at.items()
    assert list(led_at) == [new_name], f"discoverd leader {led_at}, Patroni primary {new_name}"
    delay = led_at[new_name] - promoted
    print(
        f"kill -> Patroni primary {new_name}: {promoted - killed:.2f}s; "
        f"promotion -> discoverd leader: {delay:.3f}s"
    )
    assert promoted - killed < 20, cluster.node(new_name).log_tail(6000)
    assert delay < 1.5
    new = cluster.node(new_name)
    assert 100 in ids_on(new), "an acknowledged write was lost"
    insert(new, 101)

    # the killed node comes back on the same data and rejoins as a standby by itself
    old.start()

    def rejoined() -> bool:
        assert old.running(), old.log_tail()
        roles = cluster.roles()
        registered = {i["addr"]: i["meta"]["role"] for i in cluster.instances()}
        return (
            roles.get(old.name) in ("replica", "sync_standby")
            and registered.get(old.addr) == "replica"
        )

    wait_for(rejoined, timeout=60, what=f"{old.name} to rejoin as a standby", every=0.5)
    assert cluster.leader_node() is new
    wait_for(cluster.formed, timeout=30, what="primary + sync + async again", every=0.5)
    wait_for(lambda: {100, 101} <= ids_on(old), timeout=30, what="the rejoined node's data")


class Writer(threading.Thread):
    """Inserts 1000, 1001, ... through discoverd's leader, as a client using
    `leader.<scope>.discoverd` would, and keeps every acknowledged id and when it was."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.acked: list[tuple[int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        next_id = 1000
        while not self.stop.is_set():
            leader = self.cluster.leader_node()
            if leader is None:
                time.sleep(0.05)
                continue
            try:
                psql(leader.port, f"INSERT INTO acks VALUES ({next_id})", timeout=10)
            except (AssertionError, subprocess.TimeoutExpired):
                # the outcome is in doubt (it may have committed before the
                # connection dropped): never reuse the id, or a retry of a
                # committed row fails on its key forever
                next_id += 1
                time.sleep(0.05)
                continue
            self.acked.append((next_id, time.monotonic()))
            next_id += 1


def test_a_stopped_primary_hands_over_to_its_sync_standby(cluster: Cluster) -> None:
    primary = cluster.node(cluster.formed() or "")
    sync = next(n for n, role in cluster.roles().items() if role == "sync_standby")
    writer = Writer(cluster)
    writer.start()
    try:
        wait_for(lambda: len(writer.acked) >= 5, timeout=30, what="the writer to write")
        stopped = time.monotonic()
        assert primary.proc is not None
        primary.proc.send_signal(signal.SIGTERM)
        status = primary.proc.wait(timeout=30)
        took = time.monotonic() - stopped
        assert status == 0, primary.log_tail()
        stop_log = primary.log.read_text()
        stop_log = stop_log[stop_log.rindex("postgres: stopping (") :]
        assert "switched over to " + sync in stop_log
        # it left discoverd when it stopped being the primary, and did not come back
        assert "left pgcluster" in stop_log and "registered" not in stop_log
        assert cluster.node(sync).is_primary()
        # the stopped node left discoverd; the leader is the new primary
        assert primary.addr not in {i["addr"] for i in cluster.instances()}
        assert cluster.leader_node() is cluster.node(sync)
        during = len(writer.acked)
        wait_for(lambda: len(writer.acked) >= during + 5, timeout=30, what="writes to go on")
    finally:
        writer.stop.set()
        writer.join(timeout=30)
    times = [t for _, t in writer.acked]
    gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    print(
        f"stop with switchover: {took:.1f}s; longest pause between acknowledged writes {gap:.2f}s"
    )
    acked = {i for i, _ in writer.acked}
    assert acked <= ids_on(cluster.node(sync)), "an acknowledged write was lost"
