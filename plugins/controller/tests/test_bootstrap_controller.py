"""The controller booted by `flynn-host bootstrap` (the packaged manifest, on a one-host
cluster): it answers with the key bootstrap gave it, knows every app bootstrap started (with
its release, artifact and formation) and the postgres provider, its own database is recorded as
its resource, and a rerun of bootstrap changes nothing and prints the closing lines again.

The controller's job address (100.100.0.0/16) is reached from the host's namespace
(`Cluster.exec`): the root namespace has no route to the job network."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from flynn_host.dev.cluster import Cluster
from tests.dev.test_cluster import booted_cluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")

APPS = {"controller", "postgres", "flannel", "discoverd"}

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
    jobs = c.client(1).list_jobs(active=True)
    (job,) = [
        j for j in jobs.values()
        if j["job"]["metadata"].get("flynn-controller.app_name") == "controller"
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
        expected = {"postgres": {"postgres": 1, "web": 1}, "controller": {"web": 1},
                    "flannel": {"app": 1}, "discoverd": {"app": 1}}[name]  # fmt: skip
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

    # the closing lines: the key the controller runs with (not a new one), the pin of the
    # certificate this run made, and the URL that works now
    m = re.search(r"flynn cluster add -p (\S+) default (\S+) (\S+)\n", out.stderr)
    assert m, out.stderr[-2000:]
    pin, domain, printed_key = m.groups()
    assert domain == cluster.domain and printed_key == key
    assert len(base64.b64decode(pin)) == hashlib.sha256().digest_size
    assert f"flynn cluster add --no-git default {base} {key}\n" in out.stderr
    # the key shows nowhere else
    assert out.stderr.count(key) == 2
    assert get(cluster, f"{base}/apps", printed_key)[0] == 200
