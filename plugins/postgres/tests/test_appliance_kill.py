"""The kill test (slow): on three hosts, a writer records every acknowledged insert while the
primary is killed again and again — its whole job five times, then its whole host (daemon,
jobs, namespace) five times. After each kill writes resume through `leader.postgres.discoverd`
and every acknowledged id is on the new primary; the killed node, started again on its
volume, rejoins as a standby with no database step; at the end every node holds the same rows.

`make test-slow` runs it (about 10 minutes)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from flynn_host.dev import postgres as pg
from flynn_host.dev.cluster import Cluster
from flynn_host.dev.postgres import (
    FAILOVER,
    Writer,
    count_and_sum,
    healthy,
    missing_acks,
    wait_for,
)
from tests.dev.test_cluster import booted_cluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)"),
]
ROUNDS = 5


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with booted_cluster(3, scheduler=False) as c:
        yield c


def rebootstrap(c: Cluster) -> None:
    """A host that came back has no discoverd or flannel job: bootstrap's steps start them."""
    out = c.exec(1, ["flynn-host", "bootstrap", "--min-hosts", "3", "--peer-ips",
                     ",".join(c.ips()), "--steps", "discoverd,flannel,wait-hosts"],
                 env={"CLUSTER_DOMAIN": c.domain}, capture_output=True, text=True,
                 timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("what", ["job", "host"])
def test_no_acknowledged_write_is_lost_across_kills(cluster: Cluster, what: str) -> None:
    _, body = wait_for(lambda: (a := pg.api_request(cluster, 1, "POST", "/databases"))[0]
                       == 200 and a, 120, every=1)  # fmt: skip
    app = {k: str(v) for k, v in body["env"].items()}
    status, out = pg.run_job(cluster, 1, "psql -qtA -c 'CREATE TABLE acked (id int PRIMARY "
                             "KEY)'", app)  # fmt: skip
    assert status == 0, out
    acked: list[int] = []
    for n in range(ROUNDS):
        wait_for(lambda: healthy(cluster), 120)
        old = pg.primary(cluster)
        writer = Writer(cluster, next(h for h in (1, 2, 3) if h != old.host), n * 1_000_000)
        writer.start(app)
        try:
            writer.wait_acks(20, 60)
            killed_at = time.time()
            if what == "job":
                pg.kill_job(cluster, old)
            else:
                cluster.stop_host(old.host, kill=True, remove_namespace=True)
            new = wait_for(lambda o=old: (p := pg.primary(cluster)).job_id != o.job_id and p,
                           FAILOVER)  # fmt: skip
            writer.wait_acks(1, FAILOVER, after=killed_at)
        finally:
            writer.stop()
        acked += [i for i, _ in writer.acks()]
        assert missing_acks(cluster, new, app, acked) == [], f"round {n + 1}"
        if what == "host":
            cluster.start_host(old.host)
            rebootstrap(cluster)
        back = pg.restart_node(cluster, old)
        wait_for(lambda: healthy(cluster), 120)
        assert pg.patroni(cluster, back)["role"] == "replica"
    nodes = pg.nodes(cluster)
    assert len(nodes) == 3
    sums = wait_for(lambda: len(s := {count_and_sum(cluster, x, app) for x in nodes}) == 1
                    and s, 60)  # fmt: skip
    assert sums == {count_and_sum(cluster, pg.primary(cluster), app)}
    assert len(acked) >= ROUNDS * 20
