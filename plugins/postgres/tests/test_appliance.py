"""The PostgreSQL appliance on a one-host cluster booted with `flynn-host bootstrap` (the
packaged manifest, as `script/cluster up -n 1` runs it): a singleton node in `available`
mode, the provider API found through discoverd, a database made for an app and used from
another job with `psql`, extensions created by the app's role, the client tools, bad input,
and the API while no primary exists."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from flynn_host.dev import postgres as pg
from flynn_host.dev.cluster import Cluster
from flynn_host.dev.postgres import Node, wait_for
from tests.dev.test_cluster import booted_cluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with booted_cluster(1, scheduler=False) as c:
        yield c


@pytest.fixture(scope="module")
def node(cluster: Cluster) -> Node:
    (only,) = pg.nodes(cluster)
    return only


def app_env(body: dict[str, object]) -> dict[str, str]:
    env = body["env"]
    assert isinstance(env, dict)
    return {k: str(v) for k, v in env.items()}


def test_a_singleton_leads_in_available_mode(cluster: Cluster, node: Node) -> None:
    assert len(pg.app_jobs(cluster, "web")) == 1  # the API: one, as a singleton clamps 2
    state = wait_for(lambda: (s := pg.patroni(cluster, node)).get("role") in pg.PRIMARY and s)
    assert state["state"] == "running"
    assert node.env["POSTGRES_MODE"] == "available"
    config = pg.patroni(cluster, node, "/config")
    assert config["synchronous_mode"] is True and config["synchronous_mode_strict"] is False
    # discoverd's leader is the primary, and its instance says what it is
    assert wait_for(lambda: pg.leader_addr(cluster) == f"{node.ip}:5432")
    (inst,) = pg.discoverd(cluster, "/services/postgres/instances")
    assert inst["meta"]["POSTGRES_ID"] and inst["meta"]["role"] in ("master", "primary")
    assert pg.psql(cluster, node, "SHOW data_checksums") == "on"


def test_a_database_for_an_app(cluster: Cluster, node: Node) -> None:
    status, body = pg.api_request(cluster, 1, "POST", "/databases")
    assert status == 200, body
    env = app_env(body)
    assert set(env) == {"FLYNN_POSTGRES", "PGHOST", "PGUSER", "PGPASSWORD", "PGDATABASE",
                        "DATABASE_URL"}  # fmt: skip
    assert env["PGHOST"] == "leader.postgres.discoverd" and env["FLYNN_POSTGRES"] == "postgres"
    assert body["id"] == f"/databases/{env['PGUSER']}:{env['PGDATABASE']}"
    assert env["DATABASE_URL"] == (
        f"postgres://{env['PGUSER']}:{env['PGPASSWORD']}@leader.postgres.discoverd:5432/"
        f"{env['PGDATABASE']}"
    )
    # another job, with only that env, uses it through leader.postgres.discoverd
    script = (
        "psql -v ON_ERROR_STOP=1 -qtA -c 'CREATE TABLE notes (id int, body text)' "
        "-c \"INSERT INTO notes VALUES (1, 'first'), (2, 'second')\" "
        "-c 'SELECT body FROM notes ORDER BY id' "
        "-c 'CREATE EXTENSION hstore' -c 'CREATE EXTENSION postgis' "
        "-c \"SELECT 'a=>1'::hstore -> 'a'\" -c 'SELECT postgis_version()' "
        "-c 'SELECT rolsuper FROM pg_roles WHERE rolname = current_user'"
    )
    status, out = pg.run_job(cluster, 1, script, env)
    assert status == 0, out
    lines = out.strip().splitlines()
    assert lines[:3] == ["first", "second", "1"]
    assert lines[3].startswith("3.") and lines[4] == "f"  # PostGIS 3; not a superuser

    # the client tools work the same way: a dump, the table dropped, restored from the dump
    script = (
        "set -e; pg_dump -Fc -f /tmp/app.dump; psql -qtA -c 'DROP TABLE notes'; "
        'pg_restore --no-owner -d "$PGDATABASE" -t notes /tmp/app.dump; '
        "psql -qtA -c 'SELECT count(*) FROM notes'"
    )
    status, out = pg.run_job(cluster, 1, script, env)
    assert (status, out.strip().splitlines()[-1]) == (0, "2"), out

    status, body = pg.api_request(cluster, 1, "DELETE", f"/databases?id={body['id']}")
    assert status == 200, body
    assert pg.psql(cluster, node, f"SELECT count(*) FROM pg_roles WHERE rolname = "
                                  f"'{env['PGUSER']}'") == "0"  # fmt: skip
    assert pg.psql(cluster, node, f"SELECT count(*) FROM pg_database WHERE datname = "
                                  f"'{env['PGDATABASE']}'") == "0"  # fmt: skip
    status, again = pg.api_request(cluster, 1, "DELETE", f"/databases?id=/databases/"
                                   f"{env['PGUSER']}:{env['PGDATABASE']}")  # fmt: skip
    assert status == 404 and again["code"] == "not_found", again


@pytest.mark.parametrize(
    "query",
    ["", "?id=", "?id=/databases/postgres:postgres", "?id=/databases/x", "?id=nonsense",
     "?id=/databases/a;DROP%20ROLE%20postgres:b"],
)  # fmt: skip
def test_bad_delete_ids_are_refused(cluster: Cluster, node: Node, query: str) -> None:
    status, body = pg.api_request(cluster, 1, "DELETE", f"/databases{query}")
    assert status == 400 and body["code"] == "validation_error", body
    assert pg.psql(cluster, node, "SELECT count(*) FROM pg_roles WHERE rolname = 'postgres'") == "1"


def test_no_primary_means_503_with_retry(cluster: Cluster, node: Node) -> None:
    """The node's job stopped: the API says so and asks to retry; the node started again on
    its volume leads again and nothing was lost."""
    status, body = pg.api_request(cluster, 1, "POST", "/databases")
    assert status == 200
    env = app_env(body)
    status, out = pg.run_job(cluster, 1, "psql -qtA -c 'CREATE TABLE kept (v int)' "
                                         "-c 'INSERT INTO kept VALUES (42)'", env)  # fmt: skip
    assert status == 0, out
    client = cluster.client(node.host)
    client.stop_job(node.job_id)
    wait_for(lambda: client.get_job(node.job_id)["status"] in ("done", "crashed"), 40)
    for method, path in (("GET", "/ping"), ("POST", "/databases"), ("DELETE", body_path(body))):
        status, answer = pg.api_request(cluster, 1, method, path)
        assert status == 503 and answer["retry"] is True, (method, path, answer)
        assert re.search(r"primary|unavailable", answer["message"], re.I), answer
    back = pg.restart_node(cluster, node)
    wait_for(lambda: pg.api_request(cluster, 1, "GET", "/ping")[0] == 200, 90, every=1)
    assert pg.run_job(cluster, 1, "psql -qtA -c 'SELECT v FROM kept'", env) == (0, "42\n")
    assert wait_for(lambda: pg.leader_addr(cluster) == f"{back.ip}:5432")


def body_path(body: dict[str, object]) -> str:
    return f"/databases?id={body['id']}"
