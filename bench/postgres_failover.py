"""The PostgreSQL appliance's fail-over and write throughput, on development clusters booted with
`flynn-host bootstrap` (the packaged manifest), set against references measured in the same run.

* **RTO**: on three hosts, a writer job inserts through `leader.postgres.discoverd` (a new
  psql connection per insert, so each insert resolves the name again); the primary's whole
  job is SIGKILLed; RTO is from the kill to the acknowledgement of the first insert begun
  after it. Also from
  the kill to discoverd's leader naming the new primary. Reference: Patroni's own `ttl` read
  from the cluster's config in the same run (a dead primary's leader key lapses only then, so
  ttl bounds the RTO from below). The killed node is started again on its volume (what the
  scheduler will do) and is a healthy standby before the next round.
* **writes/s**: `pgbench` (4 clients, one INSERT per transaction, `--time` seconds) from a job
  through `leader.postgres.discoverd`: on the three-node cluster in strict mode (each commit
  waits for the sync standby) against a one-host cluster's singleton (commits are local), the
  reference, booted in the same run.
* **idle memory** of the three-node appliance, 10 s after it is healthy: RSS and PSS summed
  over every process of the node jobs (Patroni, PostgreSQL and its workers) and of the two API
  jobs, from their cgroups.

    python bench/postgres_failover.py [--kills 5] [--time 10] [--json]

It prints, and asserts nothing. It needs root and the images `make dev` builds; about 6
minutes. Both clusters are removed at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "plugins" / "postgres"))

from flynn_host.dev import postgres as pg  # noqa: E402
from flynn_host.dev.cluster import Cluster, ClusterError  # noqa: E402
from flynn_host.dev.cluster_hosts import cgroup_pids  # noqa: E402
from flynn_host.dev.postgres import Writer, healthy, wait_for  # noqa: E402

PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def new_cluster(prefix: str) -> Cluster:
    for i in range(50):
        c = Cluster(f"{prefix}{i}")
        try:
            c._check_subnet_free()
        except ClusterError:
            continue
        if not c.exists():
            return c
    raise SystemExit(f"no free cluster name {prefix}N")


def app_database(c: Cluster) -> dict[str, str]:
    """A database from the provider API, with the tables the writers use."""
    _, body = wait_for(lambda: (a := pg.api_request(c, 1, "POST", "/databases"))[0] == 200 and a,
                       120, every=1)  # fmt: skip
    env = {k: str(v) for k, v in body["env"].items()}
    status, out = pg.run_job(c, 1, "psql -qtA -c 'CREATE TABLE acked (id int PRIMARY KEY)' "
                             "-c 'CREATE TABLE bench (v int)'", env)  # fmt: skip
    if status != 0:
        raise SystemExit(f"creating the tables failed: {out}")
    return env


def memory(c: Cluster, typ: str) -> dict[str, float]:
    """MiB of all the processes of the app's `typ` jobs: RSS summed (shared pages counted in
    every process that maps them) and PSS summed (shared pages split among them: what the
    jobs really take together)."""
    rss = pss = 0
    for host, job_id, _ in pg.app_jobs(c, typ):
        rel = f"flynn/{c.host(host).id}/system/{job_id}"
        for pid in cgroup_pids(rel):
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            except OSError:
                continue  # gone meanwhile
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024}


def writes_per_second(c: Cluster, env: dict[str, str], seconds: int) -> float:
    script = (
        "echo 'INSERT INTO bench (v) VALUES (1);' > /tmp/insert.sql && "
        f"{PGBENCH} -n -c 4 -j 2 -T {seconds} -f /tmp/insert.sql"
    )
    status, out = pg.run_job(c, 1, script, env, timeout=seconds + 60)
    for line in out.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise SystemExit(f"pgbench failed ({status}): {out[-800:]}")


def failovers(c: Cluster, env: dict[str, str], kills: int) -> dict[str, Any]:
    rto, leader_moved = [], []
    for n in range(kills):
        wait_for(lambda: healthy(c), 120, every=0.5)
        old = pg.primary(c)
        writer = Writer(c, host=next(h for h in (1, 2, 3) if h != old.host)).start(env)
        try:
            writer.wait_acks(10, 60)
            killed_at = time.time()
            pg.kill_job(c, old)
            wait_for(lambda o=old: pg.primary(c).job_id != o.job_id, 120, every=0.05)
            leader_moved.append(time.time() - killed_at)

            # the first insert begun after the kill (one begun before may be acknowledged
            # just after it, by the primary that is being killed)
            def first_after(w: Writer = writer, k: float = killed_at) -> float | None:
                return min((t for _, t, began in w.acks_begun() if began > k), default=None)

            first = wait_for(first_after, 120)
            rto.append(first - killed_at)
        finally:
            writer.stop()
        pg.restart_node(c, old)
        say(f"  kill {n + 1}/{kills}: RTO {rto[-1]:.1f} s, leader moved after "
            f"{leader_moved[-1]:.1f} s")  # fmt: skip
    wait_for(lambda: healthy(c), 120, every=0.5)
    return {"rto_s": rto, "leader_moved_s": leader_moved}


def run(kills: int, seconds: int) -> dict[str, Any]:
    three, one = new_cluster("pgb"), new_cluster("pgs")
    try:
        say("booting a 3-host cluster (strict mode)")
        three.up(3, bootstrap=True, host_id_prefix=f"{three.name}h")
        env3 = app_database(three)
        wait_for(lambda: healthy(three), 120, every=0.5)
        config = pg.patroni(three, pg.primary(three), "/config")
        say("idle memory (10 s after the cluster is healthy)")
        time.sleep(10)
        idle = {typ: memory(three, typ) for typ in ("postgres", "web")}
        say(f"writes/s on 3 nodes, strict ({seconds} s)")
        tps3 = writes_per_second(three, env3, seconds)
        say(f"{kills} kills of the primary's job")
        result = failovers(three, env3, kills)
        three.down()
        say("booting a 1-host cluster (singleton)")
        one.up(1, bootstrap=True, host_id_prefix=f"{one.name}h")
        env1 = app_database(one)
        say(f"writes/s on the singleton ({seconds} s)")
        tps1 = writes_per_second(one, env1, seconds)
    finally:
        three.down()
        one.down()
    return {
        "kills": kills,
        "patroni": {k: config[k] for k in ("ttl", "loop_wait", "retry_timeout")},
        **result,
        "writes_per_s": {"strict_3_nodes": tps3, "singleton": tps1},
        "idle_memory": idle,
    }


def print_table(r: dict[str, Any]) -> None:
    ttl = r["patroni"]["ttl"]
    print(f"PostgreSQL appliance fail-over, 3 hosts, strict mode, {r['kills']} kills of the "
          f"primary's job (Patroni ttl {ttl} s, loop_wait {r['patroni']['loop_wait']} s, "
          f"retry_timeout {r['patroni']['retry_timeout']} s)")  # fmt: skip
    print(f"{'':44}{'median':>8}{'max':>8}{'med/ttl':>9}{'max/ttl':>9}")
    for label, key in (("kill -> first acknowledged write (RTO)", "rto_s"),
                       ("kill -> leader.postgres.discoverd moved", "leader_moved_s")):  # fmt: skip
        med, top = statistics.median(r[key]), max(r[key])
        print(f"{label:44}{med:7.1f}s{top:7.1f}s{med / ttl:8.2f}×{top / ttl:8.2f}×")
    w = r["writes_per_s"]
    ratio = w["strict_3_nodes"] / w["singleton"]
    print(f"writes/s (pgbench, 4 clients, 1 INSERT per transaction): strict 3 nodes "
          f"{w['strict_3_nodes']:.0f}, singleton {w['singleton']:.0f}: {ratio:.2f}× the "
          "singleton")  # fmt: skip
    m = r["idle_memory"]
    print(f"idle memory, 3 nodes (Patroni + PostgreSQL): RSS {m['postgres']['rss_mib']:.0f} MiB, "
          f"PSS {m['postgres']['pss_mib']:.0f} MiB; 2 API processes: RSS "
          f"{m['web']['rss_mib']:.0f} MiB, PSS {m['web']['pss_mib']:.0f} MiB")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--time", type=int, default=10, help="seconds of pgbench per cluster")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the clusters are removed
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = run(args.kills, args.time)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
