"""The PostgreSQL appliance (`plugins/postgres`) on a development cluster
(`flynn_host.dev.cluster`), as its tests and `bench/postgres_failover.py` drive it: find the
nodes and the primary, run one-off jobs from the `postgres` image (psql, a writer that records
each acknowledged id), kill a node's job and start it again on its volume, ask the provider API
for a database.

Until the scheduler exists (issue 13) nothing restarts a job that died: `restart_node` plays
the scheduler's part (a new job with the dead one's config and volume on the same host). What
it does not do is any database step: the node finds its way back by itself.

Everything runs through a host's API or inside a host's network namespace (`Cluster.exec`):
the job network (100.100.0.0/16) is not routed to the machine's root namespace.
"""

from __future__ import annotations

import json
import shlex
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flynn_host.dev.cluster import Cluster

APP = "postgres"
IMAGE = "postgres"
SERVICE = "postgres"
DISCOVERD_PORT = 1111
PATRONI_PORT = 8008
# Patroni's role of a primary: `master` before 3.0.3, `primary` since
PRIMARY = ("master", "primary")
# how long tests give a fail-over: generous, Patroni's TTL is 10 s
FAILOVER = 60.0


class NotYet(Exception):
    """What is waited for has not happened yet."""


def wait_for(check: Callable[[], Any], timeout: float = 60.0, every: float = 0.2) -> Any:
    """`check()`'s first truthy result; NotYet, OSError and ValueError count as not yet."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except (NotYet, OSError, ValueError, KeyError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s (last: {last!r})")
        time.sleep(every)


@dataclass
class Node:
    """One postgres node: the host (1-based index) running it, its job and its address."""

    host: int
    job_id: str
    ip: str
    job: dict[str, Any]

    @property
    def env(self) -> dict[str, str]:
        return dict(self.job["job"]["config"]["env"])


def app_jobs(c: Cluster, typ: str, app: str = APP) -> list[tuple[int, str, dict[str, Any]]]:
    """(host, job id, job) of every running job of `app`'s process type `typ`, on the hosts
    that answer (a partitioned host's API cannot be reached from here)."""
    out = []
    for h in c.hosts:
        try:
            jobs = c.client(h.index, timeout=3).list_jobs(active=True)
        except OSError:
            continue
        for jid, job in jobs.items():
            meta = job["job"].get("metadata") or {}
            if meta.get("flynn-controller.app_name") != app:
                continue
            if meta.get("flynn-controller.type") == typ and job["status"] == "running":
                out.append((h.index, jid, job))
    return out


def nodes(c: Cluster) -> list[Node]:
    return [Node(h, jid, job["internal_ip"], job) for h, jid, job in app_jobs(c, "postgres")]


def discoverd(c: Cluster, path: str, host: int = 1) -> Any:
    """A GET of discoverd's API on `host` (its address is reachable from here)."""
    url = f"http://{c.host(host).ip}:{DISCOVERD_PORT}{path}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read() or b"null")


def leader_addr(c: Cluster, service: str = SERVICE) -> str | None:
    """`leader.<service>.discoverd`'s address, or None while there is no leader."""
    for h in c.hosts:
        try:
            leader = discoverd(c, f"/services/{service}/leader", h.index)
            return str(leader["addr"]) if leader else None
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
        except OSError:
            continue  # that host's discoverd is down: ask another
    raise NotYet("no discoverd answers")


def primary(c: Cluster) -> Node:
    """The node discoverd names leader (its address is the primary's)."""
    addr = leader_addr(c)
    for node in nodes(c):
        if addr == f"{node.ip}:5432":
            return node
    raise NotYet(f"the leader {addr} is none of the running nodes")


def curl_json(c: Cluster, host: int, url: str, method: str = "GET") -> Any:
    out = c.exec(host, ["curl", "-sf", "--max-time", "3", "-X", method, url],
                 capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        raise NotYet(f"{method} {url}: curl exit {out.returncode}")
    return json.loads(out.stdout or "null")


def patroni(c: Cluster, node: Node, path: str = "/patroni") -> Any:
    """Patroni's REST API of `node`, from its host."""
    return curl_json(c, node.host, f"http://{node.ip}:{PATRONI_PORT}{path}")


def psql(c: Cluster, node: Node, sql: str, env: dict[str, str] | None = None) -> str:
    """Run `sql` on `node` directly as the superuser (from its host); its output, tuples only."""
    env = env or {"PGUSER": "postgres", "PGPASSWORD": node.env["POSTGRES_SUPERUSER_PASSWORD"]}
    out = c.exec(
        node.host,
        ["psql", "-h", node.ip, "-d", env.get("PGDATABASE", "postgres"), "-v", "ON_ERROR_STOP=1",
         "-qtA", "-c", sql],
        env={**env, "PGCONNECT_TIMEOUT": "3"}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if out.returncode != 0:
        raise NotYet(f"psql on {node.ip}: {out.stderr.strip()}")
    return out.stdout.strip()


# --- the cluster's health and data ---------------------------------------------------------


def roles(c: Cluster) -> dict[str, str]:
    """Patroni's view: member name -> role, from the primary."""
    members = patroni(c, primary(c), "/cluster")["members"]
    return {m["name"]: m["role"] for m in members if m.get("state") in ("running", "streaming")}


def healthy(c: Cluster) -> bool:
    """Three nodes running: a leader, a sync standby, a replica; discoverd's leader on it."""
    found = sorted(roles(c).values())
    return found == ["leader", "replica", "sync_standby"] and primary(c) is not None


def count_and_sum(c: Cluster, node: Node, env: dict[str, str]) -> str:
    super_env = {"PGUSER": "postgres", "PGPASSWORD": node.env["POSTGRES_SUPERUSER_PASSWORD"],
                 "PGDATABASE": env["PGDATABASE"]}  # fmt: skip
    return psql(c, node, "SELECT count(*), coalesce(sum(id), 0) FROM acked", super_env)


def missing_acks(c: Cluster, node: Node, env: dict[str, str], acked: list[int]) -> list[int]:
    super_env = {"PGUSER": "postgres", "PGPASSWORD": node.env["POSTGRES_SUPERUSER_PASSWORD"],
                 "PGDATABASE": env["PGDATABASE"]}  # fmt: skip
    present = {int(x) for x in psql(c, node, "SELECT id FROM acked", super_env).split()}
    return sorted(set(acked) - present)


# --- jobs ----------------------------------------------------------------------------------------


def image_job(
    c: Cluster, host: int, args: list[str], env: dict[str, str] | None = None, image: str = IMAGE
) -> dict[str, Any]:
    """A user job of `image` (imported on every host by bootstrap) running `args`."""
    mountspecs = c.client(host).request("GET", f"/host/images/{image}")["mountspecs"]
    return {
        "id": f"{c.host(host).id}-{uuid.uuid4().hex}",
        "mountspecs": mountspecs,
        "config": {"args": args, "env": env or {}},
        "resources": {},
    }


def start_job(c: Cluster, host: int, job: dict[str, Any]) -> str:
    c.client(host).add_job(job)
    return str(job["id"])


def job_log(c: Cluster, host: int, job_id: str) -> str:
    out = c.exec(host, ["flynn-host", "log", job_id], capture_output=True, text=True)
    return out.stdout


def run_job(
    c: Cluster, host: int, script: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str]:
    """Run `sh -c script` in a `postgres` image job; its exit status and output."""
    job_id = start_job(c, host, image_job(c, host, ["sh", "-c", script], env))
    client = c.client(host)
    job = wait_for(lambda: (j := client.get_job(job_id))["status"] in ("done", "crashed",
                   "failed") and j, timeout)  # fmt: skip
    return int(job.get("exit_status") or 0), job_log(c, host, job_id)


def api_request(c: Cluster, host: int, method: str, path: str) -> tuple[int, Any]:
    """A request to `http://postgres-api.discoverd<path>` from a job on `host` (through
    discoverd's DNS, as an app would): the status and the JSON answer."""
    code = (
        "import json, sys, urllib.request, urllib.error\n"
        f"req = urllib.request.Request('http://postgres-api.discoverd{path}', method={method!r})\n"
        "try:\n"
        "    resp = urllib.request.urlopen(req, timeout=20)\n"
        "    status, body = resp.status, resp.read()\n"
        "except urllib.error.HTTPError as exc:\n"
        "    status, body = exc.code, exc.read()\n"
        "print(json.dumps({'status': status, 'body': json.loads(body or b'null')}))\n"
    )
    status, out = run_job(c, host, f"python3 -c {shlex.quote(code)}")
    if status != 0:
        raise NotYet(f"{method} {path}: the job exited {status}: {out[-500:]}")
    answer = json.loads(out.strip().splitlines()[-1])
    return answer["status"], answer["body"]


def kill_job(c: Cluster, node: Node) -> None:
    """SIGKILL the node's whole job (its init, and with it every process of the job)."""
    c.client(node.host).request("PUT", f"/host/jobs/{node.job_id}/signal/9")


def restart_node(c: Cluster, node: Node) -> Node:
    """A new job with `node`'s config and volume on its host (the scheduler's part)."""
    old = c.client(node.host).get_job(node.job_id)["job"]
    job_id = f"{c.host(node.host).id}-{uuid.uuid4().hex}"
    config = {**old["config"], "env": {**old["config"]["env"], "FLYNN_JOB_ID": job_id}}
    job = {**old, "id": job_id, "config": config}
    start_job(c, node.host, job)
    running = wait_for(lambda: (j := c.client(node.host).get_job(job_id))["status"] == "running"
                       and j)  # fmt: skip
    return Node(node.host, job_id, running["internal_ip"], running)


# --- a writer that records what was acknowledged -------------------------------------------------

# A connection to a primary that a partition cut off would hang (nothing answers, nothing
# resets it): unacknowledged data gives up after tcp_user_timeout, a silent peer after the
# keepalives, so the writer tries again through the name instead of waiting forever.
WRITER = r"""
CONNINFO="dbname=$PGDATABASE tcp_user_timeout=2000 keepalives=1 keepalives_idle=1"
CONNINFO="$CONNINFO keepalives_interval=1 keepalives_count=2"
i=${FIRST_ID:-0}
while true; do
  i=$((i+1))
  began=$(date +%s.%N)
  if psql -qtA -v ON_ERROR_STOP=1 -d "$CONNINFO" -c "INSERT INTO acked (id) VALUES ($i)" \
       >/dev/null 2>&1; then
    echo "ack $i $(date +%s.%N) $began"
  else
    echo "fail $i $(date +%s.%N)"
    sleep 0.1
  fi
done
"""


@dataclass
class Writer:
    """A job inserting first + 1, first + 2, ... through `leader.postgres.discoverd`, one psql
    connection per insert; each id whose commit was acknowledged is printed `ack ID TIME
    BEGAN` (unix times: acknowledged, and when its psql started)."""

    c: Cluster
    host: int
    first: int = 0
    job_id: str = ""

    def start(self, env: dict[str, str]) -> Writer:
        env = {**env, "PGHOST": "leader.postgres.discoverd", "PGCONNECT_TIMEOUT": "2",
               "FIRST_ID": str(self.first)}  # fmt: skip
        self.job_id = start_job(self.c, self.host, image_job(self.c, self.host,
                                ["sh", "-c", WRITER], env))  # fmt: skip
        return self

    def acks(self) -> list[tuple[int, float]]:
        """(id, unix time) of every acknowledged insert so far."""
        return [(i, acked) for i, acked, _ in self.acks_begun()]

    def acks_begun(self) -> list[tuple[int, float, float]]:
        """(id, acknowledged at, begun at) of every acknowledged insert so far."""
        out = []
        for line in job_log(self.c, self.host, self.job_id).splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0] == "ack":
                out.append((int(parts[1]), float(parts[2]), float(parts[3])))
        return out

    def wait_acks(self, count: int, timeout: float = 60.0, after: float = 0.0) -> None:
        """Until `count` inserts (acknowledged after unix time `after`) are acknowledged; on
        a timeout the error shows the writer's last lines."""
        try:
            wait_for(lambda: len([t for _, t in self.acks() if t > after]) >= count, timeout)
        except TimeoutError as exc:
            tail = job_log(self.c, self.host, self.job_id).splitlines()[-15:]
            raise TimeoutError(f"{exc}; the writer's last lines:\n" + "\n".join(tail)) from None

    def stop(self) -> None:
        client = self.c.client(self.host)
        client.stop_job(self.job_id)
        wait_for(lambda: client.get_job(self.job_id)["status"] in ("done", "crashed", "failed"))
