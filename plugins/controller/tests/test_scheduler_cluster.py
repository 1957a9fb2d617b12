"""The scheduler on a real three-host cluster booted with `flynn-host bootstrap` (slow; one
cluster shared by the module, the tests that take a host down last).

Everything goes through what a user or a client has: the installed `flynn` command and the
controller's API, run in host 1's network namespace (where job addresses are reached),
discoverd's HTTP API, the hosts' APIs. Checked: `flynn scale` up and down with its events,
jobs spread over the hosts, a killed job replaced; a job that crashes at once restarted with
Flynn's backoff (read from the controller's job events); deploys with one-by-one (a client
polling the app's discoverd instances sees no failed request), a crashing release rolled back,
all-at-once and in-batches; the scheduler's leader stopped and a scale right after carried out
by the standby; nothing of a deleted app left on any host; a host whose daemon dies (its jobs
running on) and a host lost whole: their jobs started elsewhere within 30 s of the loss being
detected, and no duplicate once the host is back.

`make test-slow` runs it (about 2.5 minutes on 2 cores).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flynn_host.dev.cluster import Cluster
from flynn_host.dev.host import wait_for
from tests.dev.test_cluster import booted_cluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)"),
]

BUSYBOX = "file:///var/lib/flynn/images/busybox/manifest.json"
FLYNN = os.path.join(os.path.dirname(sys.executable), "flynn")
ENDED = ("done", "crashed", "failed")
# the bound: a lost host's jobs run elsewhere this long after the loss is detected
REPLACED_WITHIN = 30.0


def web_process(cmd: str = "echo $FLYNN_JOB_ID > /tmp/index.html; exec httpd -f -p 8080 -h /tmp",
                app: str = "sched") -> dict[str, Any]:  # fmt: skip
    """busybox httpd answering with its job id, as service `<app>-web`."""
    return {"cmd": ["sh", "-c", cmd],
            "ports": [{"port": 8080, "proto": "tcp",
                       "service": {"name": f"{app}-web", "create": True}}]}  # fmt: skip


# a process with a volume, so that "nothing left" covers volumes too
STORE = {"cmd": ["sh", "-c", "date > /data/started; exec sleep 3600"],
         "volumes": [{"path": "/data"}]}  # fmt: skip

API = """
import json, sys
from flynn_controller.client import Client
url, key, method, path, body = sys.argv[1:6]
headers = {"Accept": "application/json"} if path.startswith("/events") else None
print(json.dumps(Client(url, key).request(method, path, json.loads(body) if body else None,
                                          headers=headers)))
"""

GET = """
import json, sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(r.read().decode())
except (OSError, urllib.error.URLError) as e:
    print("null")
"""

# Polls the app's instances through discoverd, and one of them (in turn) every ~50 ms, until
# the stop file appears; prints what it saw. Each request resolves the instances again, as a
# client following discoverd does.
POLLER = """
import json, os, sys, time, urllib.request
disc, service, stop = sys.argv[1:4]
ok, failed, seen, n = 0, [], {}, 0
while not os.path.exists(stop):
    try:
        with urllib.request.urlopen(f"{disc}/services/{service}/instances", timeout=2) as r:
            instances = json.load(r)
        if not instances:
            raise RuntimeError("no instances")
        addr = instances[n % len(instances)]["addr"]
        n += 1
        with urllib.request.urlopen(f"http://{addr}/", timeout=2) as r:
            body = r.read().decode().strip()
        ok += 1
        seen[body] = seen.get(body, 0) + 1
    except Exception as e:
        failed.append(f"{time.time():.3f} {e!r}")
    time.sleep(0.05)
print(json.dumps({"ok": ok, "failed": failed, "seen": seen}))
"""


@dataclass
class Env:
    cluster: Cluster
    url: str
    key: str
    home: Path
    controller_job: str = ""

    @property
    def discoverd(self) -> str:
        return f"http://{self.cluster.ips()[0]}:1111"

    def flynn(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {"HOME": str(self.home), "FLYNNRC": str(self.home / ".flynnrc")}
        return self.cluster.exec(1, [FLYNN, *args], env=env, capture_output=True, text=True,
                                 timeout=timeout, cwd=str(self.home))  # fmt: skip

    def ok(self, *args: str, **kw: Any) -> str:
        out = self.flynn(*args, **kw)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return str(out.stdout + out.stderr)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        argv = [sys.executable, "-c", API, self.url, self.key, method, path,
                json.dumps(body) if body is not None else ""]  # fmt: skip
        out = self.cluster.exec(1, argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def get(self, url: str) -> Any:
        """GET `url` from host 1's namespace: its JSON, None when it does not answer 200."""
        out = self.cluster.exec(1, [sys.executable, "-c", GET, url], capture_output=True,
                                text=True, timeout=30)  # fmt: skip
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else None

    def ps(self, app: str) -> list[tuple[str, str, str]]:
        """(id, type, release) of each job `flynn ps` lists."""
        lines = self.ok("-a", app, "ps").splitlines()
        assert lines[0].split() == ["ID", "TYPE", "RELEASE"], lines
        return [tuple(line.split()) for line in lines[1:]]  # type: ignore[misc]

    def job_events(self, app: str, since: int = 0) -> list[dict[str, Any]]:
        events = self.api("GET", f"/events?app_id={app}&object_types=job&since_id={since}")
        return sorted(events, key=lambda e: e["id"])

    def last_event_id(self, app: str) -> int:
        return max((e["id"] for e in self.job_events(app)), default=0)

    def new_app(self, name: str, processes: dict[str, Any]) -> str:
        """An app running the busybox image with `processes`; its release id."""
        self.ok("create", name)
        return self.add_release(name, processes)

    def add_release(self, app: str, processes: dict[str, Any], ok: bool = True) -> Any:
        path = self.home / f"{app}-release.json"
        path.write_text(json.dumps({"processes": processes}))
        out = self.flynn("-a", app, "release", "add", "-t", "flynn", "-f", str(path), BUSYBOX)
        if not ok:
            return out
        assert out.returncode == 0, (out.stdout, out.stderr)
        return re.search(r"Created release (\S+)\.", out.stderr).group(1)  # type: ignore[union-attr]

    def instances(self, service: str) -> list[dict[str, Any]]:
        return self.get(f"{self.discoverd}/services/{service}/instances") or []

    def scheduler_leader(self) -> dict[str, Any] | None:
        return self.get(f"{self.discoverd}/services/controller-scheduler/leader")

    def scheduler_state(self) -> dict[str, Any] | None:
        leader = self.scheduler_leader()
        return self.get(f"http://{leader['addr']}/debug/state") if leader else None

    def host_jobs(self, app: str, active: bool = True) -> list[dict[str, Any]]:
        """Every host's jobs of `app` (those that have not ended, with `active`)."""
        out = []
        for h in self.cluster.hosts:
            if not h.pid:
                continue
            for job in self.cluster.client(h.index).list_jobs().values():
                meta = job["job"].get("metadata") or {}
                if meta.get("flynn-controller.app_name") == app and (
                    not active or job["status"] not in ENDED
                ):
                    out.append(job)
        return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from flynn_host.dev.controller import cluster_controller

    with booted_cluster(3) as c:
        url, key, job_id = cluster_controller(c)
        e = Env(c, url, key, tmp_path_factory.mktemp("home"), job_id)
        e.ok("cluster", "add", "--no-git", "default", url, key)
        e.new_app("sched", {"web": web_process(), "store": STORE})
        yield e


def host_of(job_id: str) -> str:
    return job_id.split("-", 1)[0]


def up_lines(out: str, typ: str = "web") -> list[str]:
    return re.findall(rf"^\d\d:\d\d:\d\d\.\d{{3}} ==> {typ} (\S+) up$", out, re.M)


# --- scale, ps, kill ------------------------------------------------------------------------
def test_scale_spreads_jobs_and_a_killed_job_is_replaced(env: Env) -> None:
    out = env.ok("-a", "sched", "scale", "web=3")
    assert out.startswith("scaling web: 0=>3\n\n"), out
    assert len(set(up_lines(out))) == 3, out
    assert re.search(r"\nscale completed in \S+\n", out), out
    jobs = env.ps("sched")
    assert len(jobs) == 3 and {t for _, t, _ in jobs} == {"web"}, jobs
    # one job per host: the scheduler places on the host with the fewest of the type
    assert sorted(host_of(j) for j, _, _ in jobs) == sorted(h.id for h in env.cluster.hosts)

    since = env.last_event_id("sched")
    victim = jobs[0][0]
    assert f"Job {victim} killed." in env.ok("-a", "sched", "kill", victim)

    def replaced() -> Any:
        ups = {e["object_id"] for e in env.job_events("sched", since)
               if e["data"].get("state") == "up" and e["data"].get("type") == "web"}  # fmt: skip
        ids = {j for j, _, _ in env.ps("sched")}
        return ups - {j for j, _, _ in jobs} and len(ids) == 3 and victim not in ids and ups

    ups = wait_for(replaced, 60, "a replacement of the killed job up, and ps showing 3 again")
    assert len(ups) == 1, ups
    downs = [e for e in env.job_events("sched", since) if e["object_id"] == victim]
    assert [e["data"]["state"] for e in downs][-1] == "down", downs

    out = env.ok("-a", "sched", "scale", "web=0")
    assert out.startswith("scaling web: 3=>0\n\n"), out
    assert len(set(re.findall(r"==> web (\S+) down$", out, re.M))) == 3, out
    assert env.ps("sched") == []
    wait_for(lambda: env.host_jobs("sched") == [], 30, "every web job ended on its host")


# --- restarts ----------------------------------------------------------------------------------
def starts_and_downs(env: Env, app: str, since: int, n: int) -> list[tuple[float, float]]:
    """(start, down) times of the first `n` jobs of `app` after event `since`, in start
    order, from the controller's job events (when the scheduler reported `starting` and
    `down`; inf for a job not down yet). Waits until there are `n`."""

    def rows() -> list[tuple[float, float]]:
        times: dict[str, list[float]] = {}
        for e in env.job_events(app, since):
            at = dt.datetime.fromisoformat(e["created_at"]).timestamp()
            state = e["data"].get("state")
            slot = times.setdefault(e["object_id"], [math.inf, math.inf])
            if state == "starting":
                slot[0] = min(slot[0], at)
            elif state in ("down", "crashed", "failed"):
                slot[1] = at
        found = sorted((s, d) for s, d in times.values() if s < math.inf)
        return found[:n] if len(found) >= n else []

    return wait_for(rows, 30 + 12 * n, f"{n} starts of {app}'s job", every=1)


def test_a_crashing_job_is_restarted_with_the_backoff(env: Env) -> None:
    """Flynn's backoff: the first five restarts at once, the next ones 10 s apart; scaled to
    0 and up again, a crash is restarted at once again."""
    env.new_app("crasher", {"crash": {"cmd": ["sh", "-c", "sleep 0.2; exit 3"]}})
    since = env.last_event_id("crasher")
    env.ok("-a", "crasher", "scale", "-n", "crash=1")
    # the first job, five immediate restarts, two after 10 s each
    rows = starts_and_downs(env, "crasher", since, 8)
    env.ok("-a", "crasher", "scale", "-n", "crash=0")
    gaps = [rows[i][0] - rows[i - 1][1] for i in range(1, 8)]
    assert all(g < 5 for g in gaps[:5]), gaps
    assert all(9.5 <= g < 16 for g in gaps[5:7]), gaps

    # scaled up again after 0: its restarts begin afresh
    wait_for(lambda: env.host_jobs("crasher") == [], 30, "the crashing job ended")
    since = env.last_event_id("crasher")
    env.ok("-a", "crasher", "scale", "-n", "crash=1")
    rows = starts_and_downs(env, "crasher", since, 2)
    env.ok("-a", "crasher", "scale", "-n", "crash=0")
    assert rows[1][0] - rows[0][1] < 5, rows


# --- deploys -------------------------------------------------------------------------------
class Poller:
    """POLLER in host 1's namespace for the duration of a `with` block."""

    def __init__(self, env: Env, service: str) -> None:
        self.env, self.service = env, service
        self.stop_file = env.home / f"stop-{service}"

    def __enter__(self) -> Poller:
        self.stop_file.unlink(missing_ok=True)
        argv = ["nsenter", f"--net={self.env.cluster.host(1).netns_path}", "--",
                sys.executable, "-c", POLLER, self.env.discoverd, self.service,
                str(self.stop_file)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def result(self) -> dict[str, Any]:
        time.sleep(1)  # a second more of requests after the change
        self.stop_file.touch()
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return dict(json.loads(out))


def hosts_register_job_services() -> bool:
    """Whether hosts register app jobs' ports in discoverd (their `service`), which the
    polling client needs; the lead's `flynn_host.jobservices` adds it."""
    return importlib.util.find_spec("flynn_host.jobservices") is not None


def release_instances(env: Env, service: str, release: str, n: int) -> Any:
    found = env.instances(service)
    mine = [i for i in found if i.get("meta", {}).get("FLYNN_RELEASE_ID") == release]
    return len(found) == n and len(mine) == n and found


def set_strategy(env: Env, app: str, strategy: str) -> None:
    app_id = env.api("GET", f"/apps/{app}")["id"]
    assert env.api("POST", f"/apps/{app_id}", {"strategy": strategy})["strategy"] == strategy


def ensure_serving(env: Env, strategy: str) -> str:
    """App `sched` on a release whose web process serves, 3 jobs up, and `strategy` set,
    whatever an earlier test left; the release's id."""
    release = env.api("GET", "/apps/sched/release")
    if release["processes"]["web"]["cmd"] != web_process()["cmd"]:
        set_strategy(env, "sched", "all-at-once")
        env.add_release("sched", {"web": web_process(), "store": STORE})
        release = env.api("GET", "/apps/sched/release")
    formation = env.api("GET", f"/apps/sched/formations/{release['id']}")
    if formation["processes"].get("web") != 3:
        env.ok("-a", "sched", "scale", "web=3")
    wait_for(lambda: [r for _, _, r in env.ps("sched")] == [release["id"]] * 3, 60,
             "3 jobs of the release up")  # fmt: skip
    set_strategy(env, "sched", strategy)
    return str(release["id"])


def test_one_by_one_deploys_without_a_failed_request(env: Env) -> None:
    old = ensure_serving(env, "one-by-one")
    if not hosts_register_job_services():
        pytest.skip("hosts do not register job services in discoverd yet (jobservices)")
    old_instances = wait_for(lambda: release_instances(env, "sched-web", old, 3), 60,
                             "3 instances of sched-web")  # fmt: skip
    with Poller(env, "sched-web") as poller:
        env.ok("-a", "sched", "env", "set", "DEPLOY=1")
        new = env.api("GET", "/apps/sched/release")["id"]
        assert new != old
        new_instances = wait_for(lambda: release_instances(env, "sched-web", new, 3), 60,
                                 "the new release's 3 instances")  # fmt: skip
        seen = poller.result()
    assert seen["failed"] == [], seen
    old_jobs = {i["meta"]["FLYNN_JOB_ID"] for i in old_instances}
    new_jobs = {i["meta"]["FLYNN_JOB_ID"] for i in new_instances}
    assert old_jobs & set(seen["seen"]) and new_jobs & set(seen["seen"]), seen
    (deployment, *_) = env.api("GET", "/apps/sched/deployments")
    assert (deployment["status"], deployment["strategy"]) == ("complete", "one-by-one")
    assert {r for _, _, r in env.ps("sched")} == {new}


def test_a_crashing_release_is_rolled_back(env: Env) -> None:
    """A release whose web process exits at once: the deployment fails with the reason, the
    old release keeps its jobs (and serves throughout), the new one is scaled to 0."""
    old = ensure_serving(env, "one-by-one")
    polling = hosts_register_job_services()
    if polling:
        wait_for(lambda: release_instances(env, "sched-web", old, 3), 60, "3 instances")
    with Poller(env, "sched-web") as poller:
        out = env.add_release("sched", {"web": web_process("exit 1"), "store": STORE},
                              ok=False)  # fmt: skip
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert "crashed" in out.stderr, out.stderr
        # the old release serves again with all its jobs
        wait_for(lambda: [r for _, _, r in env.ps("sched")] == [old] * 3, 60,
                 "3 jobs of the old release")  # fmt: skip
        seen = poller.result() if polling else None
    (deployment, *_) = env.api("GET", "/apps/sched/deployments")
    assert deployment["status"] == "failed" and deployment["old_release"] == old, deployment
    events = env.api("GET", f"/events?app_id=sched&object_types=deployment"
                            f"&object_id={deployment['id']}")  # fmt: skip
    failed = [e["data"] for e in events if e["data"].get("status") == "failed"]
    assert len(failed) == 1 and "crashed" in failed[0]["error"], failed
    assert env.api("GET", "/apps/sched/release")["id"] == old
    counts = {f["release"]: f["processes"] for f in env.api("GET", "/apps/sched/formations")}
    assert counts[old]["web"] == 3 and counts[deployment["new_release"]]["web"] == 0, counts
    if seen is not None:
        assert seen["failed"] == [], seen


@pytest.mark.parametrize("strategy", ["all-at-once", "in-batches"])
def test_other_strategies_reach_the_new_formation(env: Env, strategy: str) -> None:
    old = ensure_serving(env, strategy)
    env.ok("-a", "sched", "env", "set", f"STRATEGY={strategy}")
    new = env.api("GET", "/apps/sched/release")["id"]
    assert new != old
    (deployment, *_) = env.api("GET", "/apps/sched/deployments")
    assert (deployment["status"], deployment["strategy"]) == ("complete", strategy), deployment
    counts = {f["release"]: f["processes"] for f in env.api("GET", "/apps/sched/formations")}
    assert counts[new]["web"] == 3 and counts[old]["web"] == 0, counts

    # all-at-once does not wait for the old jobs to stop: they go shortly after
    def all_new() -> list[tuple[str, str, str]]:
        jobs = env.ps("sched")
        return jobs if [r for _, _, r in jobs] == [new] * 3 else []

    jobs = wait_for(all_new, 30, "3 jobs, all of the new release")
    assert len({host_of(j) for j, _, _ in jobs}) == 3, jobs


# --- the scheduler's leader --------------------------------------------------------------
def test_the_standby_takes_over_from_a_stopped_leader(env: Env) -> None:
    ensure_serving(env, "all-at-once")
    before = 3
    leader = env.scheduler_leader()
    assert leader is not None
    job_id = leader["meta"]["FLYNN_JOB_ID"]
    host = env.cluster.host(host_of(job_id))
    env.cluster.client(host.index).stop_job(job_id)  # `flynn-host stop`: SIGTERM
    out = env.ok("-a", "sched", "scale", f"web={before + 2}")
    assert len(set(up_lines(out))) == 2 and "scale completed in" in out, out
    assert len(env.ps("sched")) == before + 2
    new = env.scheduler_leader()
    assert new is not None and new["meta"]["FLYNN_JOB_ID"] != job_id
    # the stopped scheduler (an omni process) is replaced on its host
    wait_for(lambda: len([j for j in env.host_jobs("controller")
                          if j["job"]["metadata"].get("flynn-controller.type") == "scheduler"
                          and j["status"] == "running"]) == 3, 60,
             "a scheduler job running on every host again")  # fmt: skip
    env.ok("-a", "sched", "scale", f"web={before}")


# --- deleting an app -----------------------------------------------------------------------
def runc_containers(c: Cluster) -> set[str]:
    """Every runc container on the cluster's hosts (named by job id)."""
    names: set[str] = set()
    for h in c.hosts:
        for root in Path(h.dir, "run").glob("*/runc"):
            out = subprocess.run(["runc", "--root", str(root), "list", "-q"],
                                 capture_output=True, text=True)  # fmt: skip
            names |= set(out.stdout.split())
    return names


def test_nothing_of_a_deleted_app_is_left(env: Env) -> None:
    app_id = env.api("GET", "/apps/sched")["id"]
    env.ok("-a", "sched", "scale", "web=2", "store=1")
    volumes = wait_for(lambda: [v for h in env.cluster.hosts
                                for v in env.cluster.client(h.index).request("GET",
                                                                             "/storage/volumes")
                                if (v.get("meta") or {}).get("flynn-controller.app") == app_id],
                       30, "the store job's volume")  # fmt: skip
    assert len(volumes) == 1
    job_ids = {j["job"]["id"] for app in ("sched", "crasher") for j in env.host_jobs(app, False)}
    env.ok("-a", "sched", "scale", "web=0", "store=0")
    assert "Deleted sched" in env.ok("-a", "sched", "delete", "-y")
    assert "Deleted crasher" in env.ok("-a", "crasher", "delete", "-y")

    def left() -> list[str]:
        found = [f"job {j['job']['id']}" for app in ("sched", "crasher")
                 for j in env.host_jobs(app)]  # fmt: skip
        found += [f"container {n}" for n in runc_containers(env.cluster) & job_ids]
        found += [f"volume {v['id']} on {h.id}" for h in env.cluster.hosts
                  for v in env.cluster.client(h.index).request("GET", "/storage/volumes")
                  if (v.get("meta") or {}).get("flynn-controller.app") == app_id]  # fmt: skip
        found += [f"instance {i['addr']}" for i in env.instances("sched-web")]
        return found

    wait_for(lambda: left() == [], 30, "nothing of the deleted apps on any host", every=0.5)


# --- losing a host (last: the cluster is not the same afterwards) -------------------------
def victim_host(env: Env) -> int:
    """A host to lose: not host 1 (where the CLI runs), nor the PostgreSQL primary's (the
    controller would be away for a fail-over, which is not what is measured here)."""
    primary = env.get(f"{env.discoverd}/services/postgres/leader")
    assert primary is not None
    pg_host = host_of(primary["meta"]["FLYNN_JOB_ID"])
    return next(h.index for h in env.cluster.hosts[1:] if h.id != pg_host)


def use_a_controller_off(env: Env, host_id: str) -> None:
    """Point the CLI and the API calls at a controller web job that is not on `host_id`
    (about to be lost)."""
    if host_of(env.controller_job) != host_id:
        return
    for h in env.cluster.hosts:
        for job in env.cluster.client(h.index).list_jobs(active=True).values():
            meta = job["job"].get("metadata") or {}
            if (h.id != host_id and job["status"] == "running" and job.get("internal_ip")
                    and meta.get("flynn-controller.app_name") == "controller"
                    and meta.get("flynn-controller.type") == "web"):  # fmt: skip
                env.url, env.controller_job = f"http://{job['internal_ip']}:80", job["job"]["id"]
                env.ok("cluster", "add", "-f", "--no-git", "default", env.url, env.key)
                return
    raise AssertionError(f"no controller web job off {host_id}")


def wait_replaced(env: Env, app: str, lost: str, n: int) -> tuple[float, float]:
    """Wait until the scheduler has given the host `lost` up (it leaves the leader's state),
    then until `flynn ps` shows `n` jobs, none on it: (detected, replaced) monotonic times."""

    def given_up() -> bool:
        state = env.scheduler_state()
        return state is not None and lost not in state["hosts"]

    wait_for(given_up, 120, f"the scheduler giving {lost} up", every=0.5)
    detected = time.monotonic()
    seen: list[Any] = []

    def replaced() -> bool:
        jobs = env.ps(app)
        seen[:] = jobs
        return len(jobs) == n and not any(host_of(j) == lost for j, _, _ in jobs)

    try:
        wait_for(replaced, REPLACED_WITHIN, f"{n} jobs of {app} off {lost} within "
                 f"{REPLACED_WITHIN:.0f}s of the loss's detection", every=0.5)  # fmt: skip
    except AssertionError as exc:
        state = env.scheduler_state() or {}
        jobs = [j for j in state.get("jobs", []) if j.get("app_name") == app]
        raise AssertionError(f"{exc}; flynn ps: {seen}; the scheduler's jobs: {jobs}") from None
    return detected, time.monotonic()


def routed(ip: str, host: str) -> str | None:
    """GET / through the router on `ip` (from this machine) with `Host: host`: the body when
    it answers 200, else None."""
    req = urllib.request.Request(f"http://{ip}/", headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.read().decode().strip() if r.status == 200 else None
    except OSError:
        return None


def test_every_hosts_router_serves_a_new_route_within_a_second_and_a_new_router_too(
    env: Env,
) -> None:
    env.new_app("routed", {"web": web_process(app="routed")})
    env.ok("-a", "routed", "scale", "web=2")
    wait_for(lambda: len(env.instances("routed-web")) == 2, 60, "two routed-web instances")
    domain = "every-router.test"
    out = env.ok("-a", "routed", "route", "add", "http", domain)
    added = time.monotonic()
    route_id = out.split()[-1]
    ips = env.cluster.ips()
    took = {}
    for ip in ips:
        wait_for(lambda ip=ip: routed(ip, domain), 1.0, f"the router on {ip} serving {domain}",
                 every=0.01)  # fmt: skip
        took[ip] = time.monotonic() - added
    print(f"\nroute served by every router {max(took.values()):.2f}s after `route add`")
    # a router started after the route exists (its job killed: the scheduler starts another)
    h = env.cluster.host(3)
    (old,) = [j for j in env.host_jobs("router") if host_of(j["job"]["id"]) == h.id]
    env.cluster.client(3).stop_job(old["job"]["id"])
    wait_for(lambda: [j for j in env.host_jobs("router") if host_of(j["job"]["id"]) == h.id
                      and j["job"]["id"] != old["job"]["id"] and j["status"] == "running"],
             60, "a new router job on host 3")  # fmt: skip
    wait_for(lambda: routed(h.ip, domain), 15, "the new router serving the route")
    env.ok("-a", "routed", "route", "remove", route_id)
    removed = time.monotonic()
    for ip in ips:
        wait_for(lambda ip=ip: routed(ip, domain) is None, 1.0, f"{ip} dropping {domain}",
                 every=0.01)  # fmt: skip
    print(f"route gone from every router {time.monotonic() - removed:.2f}s after `route remove`")
    env.ok("-a", "routed", "delete", "-y")


def test_a_host_whose_daemon_dies_comes_back_without_duplicates(env: Env) -> None:
    """The daemon SIGKILLed, its jobs running on (as in a partition): the scheduler gives
    the host up and starts its jobs elsewhere; once the daemon is back, the host's stale jobs
    (still running) are stopped, and the app has its count, no more."""
    env.new_app("lossy", {"web": web_process(app="lossy")})
    env.ok("-a", "lossy", "scale", "web=3")
    i = victim_host(env)
    h = env.cluster.host(i)
    stale = [j["job"]["id"] for j in env.host_jobs("lossy") if host_of(j["job"]["id"]) == h.id]
    assert len(stale) == 1
    assert h.pid is not None
    os.kill(h.pid, signal.SIGKILL)
    wait_replaced(env, "lossy", h.id, 3)
    h.pid = None
    env.cluster.save()
    env.cluster.start_host(i)
    wait_for(lambda: (s := env.scheduler_state()) and s["hosts"].get(h.id, {}).get("healthy"),
             60, f"{h.id} followed again")  # fmt: skip
    wait_for(lambda: env.cluster.client(i).get_job(stale[0])["status"] in ENDED, 30,
             "the stale job stopped")  # fmt: skip
    jobs = env.ps("lossy")
    assert len(jobs) == 3 and stale[0] not in {j for j, _, _ in jobs}, jobs
    assert len(env.host_jobs("lossy")) == 3


def test_a_lost_host_s_jobs_run_elsewhere_and_it_comes_back_without_duplicates(
    env: Env,
) -> None:
    """The whole host killed (daemon, jobs, namespace, as a machine that dies): its jobs
    are replaced within 30 s of the scheduler giving it up (after 10 failed checks); started
    again, it gets no duplicate."""
    if not env.ps("lossy"):
        env.new_app("lossy", {"web": web_process(app="lossy")})
        env.ok("-a", "lossy", "scale", "web=3")
    i = victim_host(env)
    h = env.cluster.host(i)
    before = {j for j, _, _ in env.ps("lossy")}
    assert len(before) == 3
    if not any(host_of(j) == h.id for j in before):
        env.ok("-a", "lossy", "scale", "web=4")  # the fewest are on the victim: one goes there
        before = {j for j, _, _ in env.ps("lossy")}
    n = len(before)
    use_a_controller_off(env, h.id)
    killed = time.monotonic()
    env.cluster.stop_host(i, kill=True, remove_namespace=True)
    detected, replaced = wait_replaced(env, "lossy", h.id, n)
    print(f"\n{h.id} lost: given up after {detected - killed:.1f}s, its jobs running elsewhere "
          f"{replaced - detected:.1f}s later")  # fmt: skip

    env.cluster.start_host(i)
    wait_for(lambda: (s := env.scheduler_state()) and s["hosts"].get(h.id, {}).get("healthy"),
             90, f"{h.id} followed again")  # fmt: skip
    # the omni processes come back on it (the controller's scheduler among them) ...
    wait_for(lambda: any(j["status"] == "running" and host_of(j["job"]["id"]) == h.id
                         and j["job"]["metadata"].get("flynn-controller.type") == "scheduler"
                         for j in env.host_jobs("controller")), 60,
             "a scheduler job on the host again")  # fmt: skip
    # ... and the app keeps its count: nothing of its old jobs runs there
    jobs = env.ps("lossy")
    assert len(jobs) == n and not any(host_of(j) == h.id for j, _, _ in jobs), jobs
    assert len(env.host_jobs("lossy")) == n
    env.ok("-a", "lossy", "scale", "web=0")
    env.ok("-a", "lossy", "delete", "-y")
