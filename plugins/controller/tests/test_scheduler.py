"""The scheduler on a one-host cluster booted by `flynn-host bootstrap`: the hand-over from
bootstrap, `flynn scale`/`ps`/`kill` on real jobs and their discoverd instances, the restart
backoff read from the controller's job records, deploys through the worker's deployer, and an
app deleted leaving nothing. The three-host behaviour (spread, host loss, leader take-over)
is in test_scheduler_cluster.py (slow)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from flynn_host.dev.cluster import Cluster
from flynn_host.dev.host import wait_for
from tests.dev.test_cluster import booted_cluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")

BUSYBOX = "file:///var/lib/flynn/images/busybox/manifest.json"
CALL = """
import base64, json, sys, urllib.request, urllib.error
method, url, key, body = sys.argv[1:5]
req = urllib.request.Request(url, method=method, data=body.encode() or None)
if key:
    req.add_header("Authorization", "Basic " + base64.b64encode((":" + key).encode()).decode())
req.add_header("Content-Type", "application/json")
try:
    with urllib.request.urlopen(req, timeout=20) as resp:
        print(json.dumps([resp.status, resp.read().decode()]))
except urllib.error.HTTPError as exc:
    print(json.dumps([exc.code, exc.read().decode()]))
except OSError as exc:  # not answering (yet)
    print(json.dumps([0, str(exc)]))
"""


@dataclass
class Platform:
    """The cluster, the controller's URL and key, and the `flynn` CLI in host1's namespace."""

    c: Cluster
    url: str
    key: str
    home: Path

    def call(self, method: str, url: str, body: Any = None, key: str | None = None) -> Any:
        data = "" if body is None else json.dumps(body)
        out = self.c.exec(1, [sys.executable, "-c", CALL, method, url, key or "", data],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        status, text = json.loads(out.stdout)
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def api(self, method: str, path: str, body: Any = None) -> Any:
        status, out = self.call(method, self.url + path, body, self.key)
        assert status == 200, (method, path, status, out)
        return out

    def flynn(self, *args: str, ok: bool = True) -> tuple[int, str]:
        env = {"HOME": str(self.home), "FLYNNRC": str(self.home / ".flynnrc")}
        flynn = os.path.join(os.path.dirname(sys.executable), "flynn")
        out = self.c.exec(1, [flynn, *args], env=env, capture_output=True, text=True,
                          timeout=180, cwd=str(self.home))  # fmt: skip
        if ok:
            assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out.returncode, out.stdout + out.stderr

    def instances(self, service: str) -> list[dict[str, Any]]:
        host_ip = self.c.host(1).ip
        status, out = self.call("GET", f"http://{host_ip}:1111/services/{service}/instances")
        return out if status == 200 else []

    def up_jobs(self, app: str) -> list[dict[str, Any]]:
        return [j for j in self.api("GET", f"/apps/{app}/jobs") if j["state"] == "up"]

    def new_app(self, name: str, processes: dict[str, Any], env: dict[str, str] | None = None
                ) -> str:  # fmt: skip
        """An app whose release runs busybox `processes`; its release id."""
        self.flynn("create", name)
        release = self.home / f"{name}.json"
        release.write_text(json.dumps({"env": env or {}, "processes": processes}))
        _, out = self.flynn("-a", name, "release", "add", "-t", "flynn", "-f", str(release),
                            BUSYBOX)  # fmt: skip
        return re.search(r"Created release (\S+)\.", out).group(1)  # type: ignore[union-attr]


def web(app: str, text: str = "$FLYNN_JOB_ID") -> dict[str, Any]:
    """A busybox httpd serving `text` on port 8080, in service `<app>-web`."""
    return {
        "cmd": ["sh", "-c", f"echo {text} > /tmp/index.html; exec httpd -f -p 8080 -h /tmp"],
        "ports": [
            {"port": 8080, "proto": "tcp", "service": {"name": f"{app}-web", "create": True}}
        ],  # fmt: skip
    }


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    from flynn_host.dev.controller import cluster_controller

    with booted_cluster(1) as c:
        url, key, _ = cluster_controller(c)
        p = Platform(c, url, key, tmp_path_factory.mktemp("home"))
        p.flynn("cluster", "add", "--no-git", "default", url, key)
        yield p


def host_jobs(c: Cluster, app_name: str) -> list[dict[str, Any]]:
    return [j for j in c.client(1).list_jobs(active=True).values()
            if j["job"]["metadata"].get("flynn-controller.app_name") == app_name]  # fmt: skip


def test_bootstrap_hands_the_system_apps_over_to_the_scheduler(platform: Platform) -> None:
    p = platform
    release = p.api("GET", "/apps/controller/release")
    formation = p.api("GET", f"/apps/controller/formations/{release['id']}")
    assert formation["processes"] == {"web": 1, "scheduler": 1, "worker": 1}  # singleton
    # every system app runs what its formation says, once: nothing was started twice
    for app in ("controller", "postgres", "discoverd", "flannel"):
        rel = p.api("GET", f"/apps/{app}/release")
        wanted = p.api("GET", f"/apps/{app}/formations/{rel['id']}")["processes"]
        running: dict[str, int] = {}
        for j in host_jobs(p.c, app):
            typ = j["job"]["metadata"]["flynn-controller.type"]
            running[typ] = running.get(typ, 0) + 1
        assert running == {t: n for t, n in wanted.items() if n}, app
    (sched,) = [j for j in host_jobs(p.c, "controller")
                if j["job"]["metadata"]["flynn-controller.type"] == "scheduler"]  # fmt: skip
    status, state = p.call("GET", f"http://{sched['internal_ip']}:80/debug/state")
    assert status == 200 and state["leader"] and state["formations_synced"], state
    assert {f["app"] for f in state["formations"]} >= {"controller", "postgres", "discoverd"}

    # the scheduler owns the system jobs now: the controller's web job killed comes back
    (old,) = [j for j in host_jobs(p.c, "controller")
              if j["job"]["metadata"]["flynn-controller.type"] == "web"]  # fmt: skip
    p.c.client(1).stop_job(old["job"]["id"])

    def replaced() -> bool:
        webs = [j for j in host_jobs(p.c, "controller") if j["status"] == "running"
                and j["job"]["metadata"]["flynn-controller.type"] == "web"]  # fmt: skip
        return len(webs) == 1 and webs[0]["job"]["id"] != old["job"]["id"]

    wait_for(replaced, timeout=60, what="a new controller web job")
    from flynn_host.dev.controller import cluster_controller

    p.url, _, _ = cluster_controller(p.c)
    p.flynn("cluster", "remove", "default")
    p.flynn("cluster", "add", "--no-git", "default", p.url, p.key)
    wait_for(lambda: p.call("GET", p.url + "/ping")[0] == 200, timeout=60, what="the controller")


def test_scale_ps_and_kill_on_real_jobs(platform: Platform) -> None:
    p = platform
    rid = p.new_app("sched-web", {"web": web("sched-web")})
    _, out = p.flynn("-a", "sched-web", "scale", "web=3")
    assert "scaling web: 0=>3" in out and "scale completed in" in out
    assert len(re.findall(r"==> web \S+ up", out)) == 3, out
    ps = p.flynn("-a", "sched-web", "ps")[1].splitlines()
    assert ps[0].split() == ["ID", "TYPE", "RELEASE"] and len(ps) == 4, ps
    ids = {line.split()[0] for line in ps[1:]}
    assert all(line.split()[1:] == ["web", rid] for line in ps[1:])
    # each job is an instance of the app's service in discoverd, and answers with its id
    wait_for(lambda: len(p.instances("sched-web-web")) == 3, timeout=30, what="3 instances")
    for inst in p.instances("sched-web-web"):
        assert inst["meta"]["FLYNN_JOB_ID"] in ids
        status, body = p.call("GET", f"http://{inst['addr']}/")
        assert status == 200 and body.strip() == inst["meta"]["FLYNN_JOB_ID"]

    killed = sorted(ids)[0]
    assert p.flynn("-a", "sched-web", "kill", killed)[1].strip() == f"Job {killed} killed."

    def replaced() -> set[str] | None:
        now = {j["id"] for j in p.up_jobs("sched-web")}
        return now if len(now) == 3 and killed not in now else None

    now = wait_for(replaced, timeout=30, what="a replacement for the killed job")
    assert len(now - ids) == 1
    assert p.api("GET", f"/apps/sched-web/jobs/{killed}")["state"] == "down"

    _, out = p.flynn("-a", "sched-web", "scale", "web=0")
    assert len(re.findall(r"==> web \S+ down", out)) == 3, out
    assert p.up_jobs("sched-web") == [] and host_jobs(p.c, "sched-web") == []
    assert p.instances("sched-web-web") == []


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_a_crashing_job_is_restarted_with_flynn_s_backoff(platform: Platform) -> None:
    """The restart times come from the controller's job records (created when the scheduler
    started each job): five restarts at once, then 10 s apart."""
    p = platform
    rid = p.new_app("sched-crash", {"crash": {"cmd": ["sh", "-c", "echo bye; exit 1"]}})
    p.api("PUT", f"/apps/sched-crash/formations/{rid}", {"processes": {"crash": 1}})

    def jobs() -> list[dict[str, Any]] | None:
        found = sorted(p.api("GET", "/apps/sched-crash/jobs"), key=lambda j: j["created_at"])
        return found if len(found) >= 8 else None

    found = wait_for(jobs, timeout=60, what="8 runs of the crashing job")
    p.api("PUT", f"/apps/sched-crash/formations/{rid}", {"processes": {"crash": 0}})
    starts = [_ts(j["created_at"]) for j in found]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(g < 3 for g in gaps[:5]), gaps  # the first start and five restarts at once
    assert all(9 <= g < 13 for g in gaps[5:7]), gaps  # then every 10 s
    assert all(j["state"] == "down" and j["exit_status"] == 1 for j in found[:7])
    wait_for(lambda: host_jobs(p.c, "sched-crash") == [], timeout=30, what="no crash job")


def test_deploys_wait_for_real_jobs_and_roll_back_a_crashing_release(platform: Platform) -> None:
    p = platform
    old = p.new_app("sched-dep", {"web": web("sched-dep", "v1")})
    app = p.api("GET", "/apps/sched-dep")
    p.api("POST", f"/apps/{app['id']}", {"strategy": "one-by-one"})
    p.flynn("-a", "sched-dep", "scale", "web=3")

    p.flynn("-a", "sched-dep", "env", "set", "V=2")
    new = p.api("GET", "/apps/sched-dep/release")["id"]
    assert new != old
    up = p.up_jobs("sched-dep")
    assert len(up) == 3 and {j["release"] for j in up} == {new}
    deployment = p.api("GET", "/apps/sched-dep/deployments")[0]
    assert (deployment["strategy"], deployment["status"]) == ("one-by-one", "complete")

    bad = p.home / "bad.json"
    bad.write_text(json.dumps({"processes": {"web": {**web("sched-dep"),
                                                     "cmd": ["sh", "-c", "exit 7"]}}}))  # fmt: skip
    code, out = p.flynn("-a", "sched-dep", "release", "add", "-t", "flynn", "-f", str(bad),
                        BUSYBOX, ok=False)  # fmt: skip
    assert code != 0 and "crashed" in out, out
    failed = p.api("GET", "/apps/sched-dep/deployments")[0]
    assert failed["status"] == "failed"
    assert p.api("GET", "/apps/sched-dep/release")["id"] == new  # rolled back
    wait_for(lambda: len(p.up_jobs("sched-dep")) == 3
             and {j["release"] for j in p.up_jobs("sched-dep")} == {new},
             timeout=60, what="the old release's 3 jobs")  # fmt: skip
    p.flynn("-a", "sched-dep", "scale", "web=0")


def test_an_app_deleted_leaves_nothing_on_the_host(platform: Platform) -> None:
    p = platform
    p.new_app("sched-gone", {"web": {**web("sched-gone"), "volumes": [{"path": "/data"}]}})
    p.flynn("-a", "sched-gone", "scale", "web=2")
    app_id = p.api("GET", "/apps/sched-gone")["id"]
    wait_for(lambda: len(p.instances("sched-gone-web")) == 2, timeout=30, what="2 instances")

    def volumes() -> list[dict[str, Any]]:
        return [v for v in p.c.client(1).request("GET", "/storage/volumes")
                if (v.get("meta") or {}).get("flynn-controller.app") == app_id]  # fmt: skip

    assert len(volumes()) == 2
    p.flynn("-a", "sched-gone", "delete", "-y")
    wait_for(lambda: host_jobs(p.c, "sched-gone") == [] and volumes() == []
             and p.instances("sched-gone-web") == [], timeout=30,
             what="no job, volume or instance of the deleted app")  # fmt: skip
    time.sleep(2)  # and nothing comes back
    assert host_jobs(p.c, "sched-gone") == [] and volumes() == []
