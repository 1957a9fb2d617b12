"""The PostgreSQL appliance on three hosts booted with `flynn-host bootstrap`: three nodes on
three hosts (primary, sync standby, async standby) with discoverd's leader on Patroni's
primary; a killed primary loses no acknowledged write and rejoins as a standby; strict mode
holds writes while no standby is left, `available` goes on; a partitioned primary takes no
acknowledged write (no split brain) and rejoins once healed.

The tests share one cluster and run in order; each leaves three healthy nodes behind."""

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

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with booted_cluster(3, scheduler=False) as c:
        yield c


@pytest.fixture(scope="module")
def app(cluster: Cluster) -> dict[str, str]:
    """A database from the provider API, with the writer's table."""
    _, body = wait_for(lambda: (a := pg.api_request(cluster, 1, "POST", "/databases"))[0]
                       == 200 and a, 60, every=1)  # fmt: skip
    env = {k: str(v) for k, v in body["env"].items()}
    status, out = pg.run_job(cluster, 1, "psql -qtA -c 'CREATE TABLE acked (id int PRIMARY KEY)'",
                             env)  # fmt: skip
    assert status == 0, out
    return env


def test_three_nodes_on_three_hosts_and_the_leader_is_the_primary(cluster: Cluster) -> None:
    wait_for(lambda: healthy(cluster), FAILOVER)
    nodes = pg.nodes(cluster)
    assert sorted(n.host for n in nodes) == [1, 2, 3]
    assert len(pg.app_jobs(cluster, "web")) == 2
    assert {n.env["POSTGRES_MODE"] for n in nodes} == {"strict"}
    primary = pg.primary(cluster)
    assert pg.patroni(cluster, primary)["role"] in pg.PRIMARY
    config = pg.patroni(cluster, primary, "/config")
    assert config["synchronous_mode"] is True and config["synchronous_mode_strict"] is True
    instances = pg.discoverd(cluster, "/services/postgres/instances")
    by_addr = {i["addr"]: i["meta"] for i in instances}
    assert by_addr[f"{primary.ip}:5432"]["role"] in ("master", "primary")
    assert len({m["POSTGRES_ID"] for m in by_addr.values()}) == 3


def test_a_killed_primary_loses_no_acknowledged_write(
    cluster: Cluster, app: dict[str, str]
) -> None:
    wait_for(lambda: healthy(cluster), FAILOVER)
    old = pg.primary(cluster)
    writer = Writer(cluster, host=next(h for h in (1, 2, 3) if h != old.host)).start(app)
    try:
        writer.wait_acks(20, 30)
        killed_at = time.time()
        pg.kill_job(cluster, old)
        new = wait_for(lambda: (p := pg.primary(cluster)).job_id != old.job_id and p, FAILOVER)
        writer.wait_acks(1, FAILOVER, after=killed_at)
        back = pg.restart_node(cluster, old)
        wait_for(lambda: healthy(cluster), FAILOVER)
        assert pg.patroni(cluster, back)["role"] == "replica"
    finally:
        writer.stop()
    acked = [i for i, _ in writer.acks()]
    assert missing_acks(cluster, new, app, acked) == []
    # every node holds the same rows
    sums = {count_and_sum(cluster, n, app) for n in pg.nodes(cluster)}
    assert len(wait_for(lambda: len(s := {count_and_sum(cluster, n, app) for n in
                        pg.nodes(cluster)}) == 1 and s, 30)) == 1, sums  # fmt: skip


def test_strict_mode_holds_writes_while_no_standby_is_left(
    cluster: Cluster, app: dict[str, str]
) -> None:
    wait_for(lambda: healthy(cluster), FAILOVER)
    primary = pg.primary(cluster)
    standbys = [n for n in pg.nodes(cluster) if n.job_id != primary.job_id]
    for n in standbys:
        pg.kill_job(cluster, n)
    # a commit now waits for a standby: not acknowledged (the client gives up), not lost
    status, out = pg.run_job(cluster, primary.host, "timeout 8 psql -qtA -c "
                             "'INSERT INTO acked VALUES (-1)'; echo exit=$?", app)  # fmt: skip
    assert "exit=124" in out, out
    restarted = [pg.restart_node(cluster, n) for n in standbys]
    wait_for(lambda: healthy(cluster), FAILOVER)
    status, out = pg.run_job(cluster, primary.host, "psql -qtA -c 'INSERT INTO acked VALUES "
                             "(-2)' && echo committed", app)  # fmt: skip
    assert "committed" in out, out
    # the held commit was on the primary already: the standbys got it when they came back
    for n in restarted:
        assert wait_for(lambda n=n: count_and_sum(cluster, n, app) ==
                        count_and_sum(cluster, primary, app), 30)  # fmt: skip


def test_available_mode_goes_on_alone(cluster: Cluster, app: dict[str, str]) -> None:
    """`available` (what a release with POSTGRES_MODE=available gives: the primary patches
    the cluster's config) lets the primary acknowledge writes with no standby."""
    wait_for(lambda: healthy(cluster), FAILOVER)
    primary = pg.primary(cluster)
    url = f"http://{primary.ip}:8008/config"
    creds = f"patroni:{primary.env['POSTGRES_SUPERUSER_PASSWORD']}"

    def patch(body: str, *auth: str) -> str:
        out = cluster.exec(primary.host, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                          *auth, "-X", "PATCH", "-d", body, url],
                           capture_output=True, text=True)  # fmt: skip
        return out.stdout

    # what any job on the network could try: refused without the credentials
    assert patch('{"synchronous_mode": false}') == "401"
    assert pg.patroni(cluster, primary, "/config")["synchronous_mode"] is True
    assert patch('{"synchronous_mode_strict": false}', "-u", creds) == "200"
    standbys = [n for n in pg.nodes(cluster) if n.job_id != primary.job_id]
    try:
        for n in standbys:
            pg.kill_job(cluster, n)
        status, out = pg.run_job(
            cluster,
            primary.host,
            "timeout 20 psql -qtA -c 'INSERT INTO acked VALUES (-3)' && echo committed",
            app,
        )
        assert "committed" in out, out
    finally:
        patch('{"synchronous_mode_strict": true}', "-u", creds)
        for n in standbys:
            pg.restart_node(cluster, n)
    wait_for(lambda: healthy(cluster), FAILOVER)


def test_a_partitioned_primary_takes_no_write_and_rejoins(
    cluster: Cluster, app: dict[str, str]
) -> None:
    wait_for(lambda: healthy(cluster), FAILOVER)
    old = pg.primary(cluster)
    other = next(h for h in (1, 2, 3) if h != old.host)
    writer = Writer(cluster, host=other).start(app)
    cut = ["ip", "link", "set", "eth0", "down"]
    try:
        writer.wait_acks(10, 30)
        cluster.exec(old.host, cut, check=True)
        cut_at = time.time()
        # on the cut-off side a commit is never acknowledged: the old primary's sync standby
        # is unreachable, then Patroni demotes it when its leader key cannot be renewed
        # (from the host's own namespace: its API is cut off from here too)
        insert = cluster.exec(old.host, ["timeout", "25", "psql", "-qtA", "-h", old.ip, "-c",
                                         "INSERT INTO acked VALUES (-4)"],
                              env={**app, "PGCONNECT_TIMEOUT": "3"}, capture_output=True,
                              text=True)  # fmt: skip
        assert insert.returncode != 0, insert.stdout
        wait_for(lambda: pg.patroni(cluster, old)["role"] not in pg.PRIMARY, FAILOVER)
        # the majority side elects a new primary and the writer goes on there
        new = wait_for(lambda: (p := pg.primary(cluster)).job_id != old.job_id and p, FAILOVER)
        assert new.host != old.host
        writer.wait_acks(1, FAILOVER, after=cut_at)
    finally:
        cluster.exec(old.host, ["ip", "link", "set", "eth0", "up"])
        cluster.exec(old.host, ["ip", "route", "replace", "default", "via",
                                cluster.gateway])  # fmt: skip
    try:
        # rejoined (rewound if need be: it stops and starts PostgreSQL again meanwhile), a
        # member of the healthy cluster again
        assert old.job_id in {n.job_id for n in pg.nodes(cluster)}
        wait_for(lambda: pg.patroni(cluster, old)["state"] in ("running", "streaming")
                 and healthy(cluster), 120)  # fmt: skip
    finally:
        writer.stop()
    acked = [i for i, _ in writer.acks()]
    new = pg.primary(cluster)
    assert missing_acks(cluster, new, app, acked) == []
    assert wait_for(lambda: len({count_and_sum(cluster, n, app) for n in pg.nodes(cluster)})
                    == 1, 30)  # fmt: skip
