"""The controller booted by `flynn-host bootstrap` (the packaged manifest, on a one-host
cluster): it answers with the key bootstrap gave it, knows every app bootstrap started (with
its release, artifact and formation) and the postgres provider, its own database is recorded as
its resource, and a rerun of bootstrap changes nothing and prints the closing lines again.

The controller's job address (100.100.0.0/16) is reached from the host's namespace
(`Cluster.exec`): the root namespace has no route to the job network."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from flynn_host.dev.cluster import Cluster
from tests.dev.test_cluster import booted_cluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")

APPS = {"controller", "postgres", "flannel", "discoverd", "router", "blobstore", "gitreceive",
        "logaggregator"}  # fmt: skip

CALL = """
import base64, json, sys, urllib.request, urllib.error
url, key = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url)
if key:
    req.add_header("Authorization", "Basic " + base64.b64encode((":" + key).encode()).decode())
try:
    with urllib.request.urlopen(req, timeout=10) as resp:
        print(json.dumps([resp.status, resp.read().decode()]))
except urllib.error.HTTPError as exc:
    print(json.dumps([exc.code, exc.read().decode()]))
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with booted_cluster(1) as c:
        yield c


def controller_job(c: Cluster) -> dict[str, Any]:
    """The controller's (only, on one host) `web` job."""
    jobs = c.client(1).list_jobs(active=True)
    (job,) = [
        j for j in jobs.values()
        if j["job"]["metadata"].get("flynn-controller.app_name") == "controller"
        and j["job"]["metadata"].get("flynn-controller.type") == "web"
    ]  # fmt: skip
    return job


def get(c: Cluster, url: str, key: str | None) -> tuple[int, Any]:
    """GET `url` from host1's namespace; (status, parsed JSON or text)."""
    out = c.exec(1, [sys.executable, "-c", CALL, url, key or ""], capture_output=True, text=True,
                 timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    status, body = json.loads(out.stdout)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def test_the_controller_knows_what_bootstrap_started(cluster: Cluster) -> None:
    job = controller_job(cluster)
    env = job["job"]["config"]["env"]
    key = env["AUTH_KEY"]
    base = f"http://{job['internal_ip']}:80"
    assert env["DEFAULT_ROUTE_DOMAIN"] == cluster.domain
    assert env["CA_CERT"].startswith("-----BEGIN CERTIFICATE-----")
    assert len(env["NAME_SEED"]) == 20 and env["PGHOST"] == "leader.postgres.discoverd"

    assert get(cluster, f"{base}/ping", None)[0] == 200
    assert get(cluster, f"{base}/apps", None) == (401, "")
    assert get(cluster, f"{base}/apps", "wrong")[0] == 401

    status, apps = get(cluster, f"{base}/apps", key)
    assert status == 200, apps
    by_name = {a["name"]: a for a in apps}
    assert set(by_name) == APPS
    strategies = {n: (a.get("strategy"), a.get("deploy_timeout")) for n, a in by_name.items()}
    assert strategies["controller"] == ("one-by-one", 120)
    assert strategies["postgres"] == ("sirenia", 120)
    assert strategies["flannel"][0] == "one-by-one"
    assert strategies["discoverd"] == ("discoverd-meta", 300)
    for name, app in by_name.items():
        assert app["meta"]["flynn-system-app"] == "true", name
        assert app["release"], name
        status, release = get(cluster, f"{base}/releases/{app['release']}", key)
        assert status == 200, release
        status, artifact = get(cluster, f"{base}/artifacts/{release['artifact']}", key)
        assert status == 200 and artifact["type"] == "flynn", artifact
        image = "postgres" if name == "postgres" else "components"
        assert artifact["uri"].endswith(f"/{image}/manifest.json"), artifact
        status, formation = get(cluster, f"{base}/apps/{name}/formations/{app['release']}", key)
        assert status == 200, formation
        # the controller's after the scheduler step (one of each in a singleton)
        expected = {"postgres": {"postgres": 1, "web": 1},
                    "controller": {"web": 1, "worker": 1, "scheduler": 1},
                    "flannel": {"app": 1}, "discoverd": {"app": 1},
                    "router": {"app": 1}, "blobstore": {"web": 1},
                    "gitreceive": {"app": 1}, "logaggregator": {"app": 1}}[name]  # fmt: skip
        assert formation["processes"] == expected, name
    # the controller's release is the env it runs with, its database included
    status, release = get(cluster, f"{base}/releases/{by_name['controller']['release']}", key)
    assert release["env"]["PGPASSWORD"] == env["PGPASSWORD"]
    assert release["env"]["AUTH_KEY"] == key

    status, providers = get(cluster, f"{base}/providers", key)
    assert status == 200
    assert [(p["name"], p["url"]) for p in providers] == [
        ("postgres", "http://postgres-api.discoverd/databases")
    ]
    status, resources = get(cluster, f"{base}/apps/controller/resources", key)
    assert status == 200 and len(resources) == 1, resources
    assert resources[0]["env"]["PGDATABASE"] == env["PGDATABASE"]


def test_a_rerun_changes_nothing_and_prints_the_closing_lines(cluster: Cluster) -> None:
    job = controller_job(cluster)
    key = job["job"]["config"]["env"]["AUTH_KEY"]
    base = f"http://{job['internal_ip']}:80"
    before = get(cluster, f"{base}/apps", key)[1]
    out = cluster.exec(
        1,
        ["flynn-host", "bootstrap", "--min-hosts", "1", "--peer-ips", cluster.ips()[0]],
        env={"CLUSTER_DOMAIN": cluster.domain},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert controller_job(cluster)["job"]["id"] == job["job"]["id"]  # the same job runs on
    after = get(cluster, f"{base}/apps", key)[1]
    assert sorted((a["id"], a["release"]) for a in after) == sorted(
        (a["id"], a["release"]) for a in before
    )
    assert len(get(cluster, f"{base}/providers", key)[1]) == 1

    # the closing line: the key the controller runs with (not a new one) and the pin of the
    # certificate the router serves (kept, not a new one)
    m = re.search(r"flynn cluster add -p (\S+) default (\S+) (\S+)\n", out.stderr)
    assert m, out.stderr[-2000:]
    pin, domain, printed_key = m.groups()
    assert domain == cluster.domain and printed_key == key
    router = next(j for j in cluster.client(1).list_jobs(active=True).values()
                  if j["job"]["metadata"].get("flynn-controller.app_name") == "router")  # fmt: skip
    served = x509.load_pem_x509_certificate(router["job"]["config"]["env"]["TLSCERT"].encode())
    assert (
        pin == base64.b64encode(hashlib.sha256(served.public_bytes(Encoding.DER)).digest()).decode()
    )
    assert "keeping the certificate the running router serves" in out.stderr
    # the key shows nowhere else
    assert out.stderr.count(key) == 1
    assert get(cluster, f"{base}/apps", printed_key)[0] == 200


def test_the_flynn_cli_against_the_controller_bootstrap_started(
    cluster: Cluster, tmp_path: Any
) -> None:
    """The `flynn` commands of this issue from a host of the cluster, each checked by its
    output and by the API's state after it; the postgres resource's env reaches a job's psql."""
    from flynn_host.dev import postgres as pg
    from flynn_host.dev.controller import cluster_controller

    url, key, _ = cluster_controller(cluster)
    env = {"HOME": str(tmp_path), "FLYNNRC": str(tmp_path / ".flynnrc")}
    flynn = os.path.join(os.path.dirname(sys.executable), "flynn")

    def run(*args: str) -> str:
        out = cluster.exec(1, [flynn, *args], env=env, capture_output=True, text=True,
                           timeout=120, cwd=str(tmp_path))  # fmt: skip
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out.stdout + out.stderr

    def api(path: str) -> Any:
        status, body = get(cluster, url + path, key)
        assert status == 200, (path, status, body)
        return body

    out = run("cluster", "add", "--no-git", "default", url, key)
    assert 'Cluster "default" added and set as default.' in out
    assert run("create", "clitest").strip() == "Created clitest"
    app = api("/apps/clitest")
    assert [r["domain"] for r in api("/apps/clitest/routes")] == [f"clitest.{cluster.domain}"]
    assert "clitest" in run("apps") and "=== clitest" in run("-a", "clitest", "info")

    release_file = tmp_path / "release.json"
    release_file.write_text(json.dumps({"processes": {"web": {"cmd": ["serve"]}}}))
    uri = "https://registry.hub.docker.com?name=library/busybox&tag=latest"
    out = run("-a", "clitest", "release", "add", "-f", str(release_file), uri)
    release_id = re.search(r"Created release (\S+)\.", out).group(1)  # type: ignore[union-attr]
    assert api("/apps/clitest/release")["id"] == release_id
    artifact = api(f"/artifacts/{api('/apps/clitest/release')['artifact']}")
    assert (artifact["type"], artifact["uri"]) == ("docker", uri)

    run("-a", "clitest", "env", "set", "GREETING=hi", "OTHER=x")
    assert api("/apps/clitest/release")["env"] == {"GREETING": "hi", "OTHER": "x"}
    assert run("-a", "clitest", "env", "get", "GREETING").strip() == "hi"
    run("-a", "clitest", "env", "unset", "OTHER")
    assert api("/apps/clitest/release")["env"] == {"GREETING": "hi"}
    run("-a", "clitest", "meta", "set", "owner=tests")
    assert api(f"/apps/{app['id']}")["meta"] == {"owner": "tests"}
    run("-a", "clitest", "limit", "set", "web", "memory=256MB")
    resources = api("/apps/clitest/release")["processes"]["web"]["resources"]
    assert resources["memory"]["limit"] == 256 * 1024 * 1024
    assert "memory=256MB" in run("-a", "clitest", "limit")

    assert "http://postgres-api.discoverd/databases" in run("provider")
    out = run("-a", "clitest", "resource", "add", "postgres")
    resource_id = re.search(r"Created resource (\S+) and release", out).group(1)  # type: ignore[union-attr]
    release_env = api("/apps/clitest/release")["env"]
    assert release_env["GREETING"] == "hi" and release_env["PGHOST"] == "leader.postgres.discoverd"
    assert [r["id"] for r in api("/apps/clitest/resources")] == [resource_id]
    db_env = {k: v for k, v in release_env.items() if k.startswith("PG")}
    status, psql = pg.run_job(cluster, 1, "psql -Atc 'SELECT current_user'", db_env)
    assert status == 0 and psql.strip().splitlines()[-1] == release_env["PGUSER"], psql
    out = run("-a", "clitest", "resource", "remove", "postgres", resource_id)
    assert f"Deleted resource {resource_id}" in out
    assert api("/apps/clitest/resources") == []
    assert "PGHOST" not in api("/apps/clitest/release")["env"]

    http_id = run("-a", "clitest", "route", "add", "http", "clitest.example.test").strip()
    out = run("-a", "clitest", "route", "add", "tcp")
    tcp_id, port = re.search(r"(tcp/\S+) listening on port (\d+)", out).groups()  # type: ignore[union-attr]
    listing = run("-a", "clitest", "route")
    assert "http:clitest.example.test" in listing and f"tcp:{port}" in listing
    assert f"updated {http_id}" in run("-a", "clitest", "route", "update", http_id, "--sticky")
    assert api(f"/apps/clitest/routes/{http_id}")["sticky"] is True
    assert "removed" in run("-a", "clitest", "route", "remove", tcp_id)
    assert get(cluster, f"{url}/apps/clitest/routes/{tcp_id}", key)[0] == 404
    assert "complete" in run("-a", "clitest", "deployment")

    out = run("-a", "clitest", "delete", "-y")
    assert "Deleted clitest (removed 2 routes, deprovisioned 0 resources)" in out
    assert get(cluster, f"{url}/apps/clitest", key)[0] == 404


def test_deleting_a_job_stops_it_on_its_host(cluster: Cluster) -> None:
    """`DELETE /apps/:app/jobs/:id` finds the host from the job id (discoverd's `flynn-host`
    instances) and stops the job there with the host key; a job of another app, or on a host
    that does not exist, is a bare 404 and keeps running."""
    import time
    import uuid

    from flynn_host.dev.controller import cluster_controller
    from flynn_host.dev.host import busybox_job

    url, key, _ = cluster_controller(cluster)
    script = (
        "import base64, json, sys, urllib.request, urllib.error\n"
        "method, url, key, body = sys.argv[1:5]\n"
        "req = urllib.request.Request(url, method=method, data=body.encode() or None)\n"
        "req.add_header('Authorization', 'Basic ' + base64.b64encode((':' + key).encode())"
        ".decode())\n"
        "try:\n"
        "    with urllib.request.urlopen(req, timeout=30) as r:\n"
        "        print(r.status, r.read().decode())\n"
        "except urllib.error.HTTPError as e: print(e.code, e.read().decode())\n"
    )

    def call(method: str, path: str, body: Any = None) -> tuple[int, str]:
        out = cluster.exec(1, [sys.executable, "-c", script, method, url + path, key,
                               json.dumps(body) if body is not None else ""],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        status, _, text = out.stdout.partition(" ")
        return int(status), text.strip()

    status, text = call("POST", "/apps", {"name": "jobowner"})
    assert status == 200, text
    app_id = json.loads(text)["id"]
    host = cluster.client(1)
    host_id = cluster.host(1).id
    mine = f"{host_id}-{uuid.uuid4()}"
    theirs = f"{host_id}-{uuid.uuid4()}"
    for job_id, owner in ((mine, app_id), (theirs, str(uuid.uuid4()))):
        job = busybox_job(job_id, ["sleep", "600"])
        job["metadata"] = {"flynn-controller.app": owner}
        host.add_job(job)
    try:
        assert call("DELETE", f"/apps/jobowner/jobs/{theirs}") == (404, "")
        assert call("DELETE", f"/apps/jobowner/jobs/nosuchhost-{uuid.uuid4()}") == (404, "")
        assert call("DELETE", f"/apps/jobowner/jobs/{mine}") == (200, "")
        deadline = time.monotonic() + 30
        while host.get_job(mine)["status"] not in ("done", "crashed", "failed"):
            assert time.monotonic() < deadline, host.get_job(mine)
            time.sleep(0.2)
        assert host.get_job(theirs)["status"] in ("starting", "running")
    finally:
        for job_id in (mine, theirs):
            with contextlib.suppress(Exception):
                host.stop_job(job_id)
