"""The deployer's logic against a real controller on a real PostgreSQL, with a stand-in for the
scheduler (`flynn_host.dev.scheduler_standin`: it reports jobs for the active formations
through the controller's API and runs nothing): each strategy's events, job order and
formations at the end, rollbacks when new jobs crash or never come up, in-batches with its
meta, one deployment per app, and a `worker` process killed mid-deployment. Clients wait the
2015 CLI's way: the SSE stream of the deployment's events with `past=true`.

The scheduler itself, and deployments of real jobs on hosts, are tested with the scheduler.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from controller_http import Api
from sse_client import SSEStream

from flynn_host.dev.controller import ControllerProcess, PGServer, controller_process
from flynn_host.dev.host import free_port, missing_programs
from flynn_host.dev.scheduler_standin import SchedulerStandIn, scheduler_standin

pytestmark = pytest.mark.skipif(
    bool(missing_programs("/usr/lib/postgresql/15/bin/postgres")), reason="needs PostgreSQL 15"
)

IN_PROGRESS = "Cannot create deploy, there is already one in progress for this app."


@pytest.fixture(scope="module")
def scheduler(controller: ControllerProcess) -> Iterator[SchedulerStandIn]:
    with scheduler_standin(controller.url, controller.key) as s:
        yield s


# --- helpers ----------------------------------------------------------------------------------
def new_release(
    api: Api, types: tuple[str, ...] = ("web",), env: dict[str, str] | None = None
) -> dict[str, Any]:
    art = api.ok("POST", "/artifacts", {"type": "docker", "uri": "https://r.test?name=a&id=1"})
    procs = {t: {"cmd": ["run", t]} for t in types}
    body = {"artifact": art["id"], "processes": procs, "env": env or {}}
    return dict(api.ok("POST", "/releases", body))


def wait_for(what: str, check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (out := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return out


def up_jobs(api: Api, app: str, release: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for job in api.ok("GET", f"/apps/{app}/jobs"):
        if job["release"] == release and job["state"] == "up":
            out[job["type"]] = out.get(job["type"], 0) + 1
    return out


def running_app(
    api: Api, name: str, counts: dict[str, int], **app: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """An app running its first release at `counts` (the stand-in reports the jobs up)."""
    created = api.ok("POST", "/apps", {"name": name, **app})
    first = new_release(api, tuple(counts))
    assert api.ok("POST", f"/apps/{name}/deploy", {"id": first["id"]})["status"] == "complete"
    api.ok("PUT", f"/apps/{name}/formations/{first['id']}", {"processes": counts})
    wait_for("the first jobs", lambda: up_jobs(api, name, first["id"]) == counts)
    return created, first


def deploy(api: Api, app: str, release: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """Deploy as the 2015 CLI does (§5.2): POST, then the deployment's SSE events with
    `past=true` until `complete` or `failed`. Returns the deployment and its events' data."""
    d = api.ok("POST", f"/apps/{app}/deploy", {"id": release["id"]})
    assert d["status"] == "pending" and "finished_at" not in d
    path = f"/events?app_id={d['app']}&object_id={d['id']}&object_types=deployment&past=true"
    events: list[Any] = []
    with SSEStream(api.url, path, key=api.key).open() as stream:
        assert stream.status == 200
        deadline = time.monotonic() + 60
        while not events or events[-1]["status"] not in ("complete", "failed"):
            assert time.monotonic() < deadline, f"no end of deployment: {events}"
            events += [i.data["data"] for i in stream.read_items(1, timeout=1)]
    return d, events


def job_events(api: Api, app_id: str) -> list[dict[str, Any]]:
    """The app's job events, oldest first."""
    listed = api.ok(
        "GET",
        f"/events?app_id={app_id}&object_types=job",
        headers={"Accept": "application/json"},
    )
    return [e["data"] for e in reversed(listed)]


def formation(api: Api, app: str, release: dict[str, Any]) -> dict[str, int]:
    return dict(api.ok("GET", f"/apps/{app}/formations/{release['id']}")["processes"])


def up_counts_over_time(jobs: list[dict[str, Any]], releases: set[str]) -> list[int]:
    """How many jobs of these releases were up after each job event."""
    up: set[str] = set()
    out = []
    for job in jobs:
        if job["release"] not in releases:
            continue
        if job["state"] == "up":
            up.add(job["id"])
        elif job["state"] in ("down", "crashed", "failed"):
            up.discard(job["id"])
        out.append(len(up))
    return out


def statuses(events: list[Any]) -> list[str]:
    """The status changes, without the per-job `running` events."""
    return [e["status"] for e in events if "job_type" not in e]


# --- strategies ------------------------------------------------------------------------------
def test_all_at_once(api: Api, scheduler: SchedulerStandIn) -> None:
    app, old = running_app(api, "aao", {"web": 2, "worker": 1})
    new = new_release(api, ("web", "worker"))
    d, events = deploy(api, "aao", new)
    assert statuses(events) == ["pending", "running", "complete"]
    assert d["strategy"] == "all-at-once" and d["processes"] == {"web": 2, "worker": 1}
    per_job = [(e["job_type"], e["job_state"]) for e in events if "job_type" in e]
    assert sorted(s for s in per_job if s[1] == "up") == [("web", "up")] * 2 + [("worker", "up")]
    assert all(e["release"] == new["id"] and e["status"] == "running" for e in events[2:-1])
    assert formation(api, "aao", new) == {"web": 2, "worker": 1}
    assert formation(api, "aao", old) == {"web": 0, "worker": 0}
    assert api.ok("GET", "/apps/aao/release")["id"] == new["id"]
    assert api.ok("GET", f"/deployments/{d['id']}")["status"] == "complete"
    # every new job was up before the old ones were told to stop (which is not waited for)
    wait_for("the old jobs to stop", lambda: up_jobs(api, "aao", old["id"]) == {})
    jobs = job_events(api, app["id"])
    first_old_down = next(
        i for i, j in enumerate(jobs) if j["release"] == old["id"] and j["state"] == "down"
    )
    new_up = [i for i, j in enumerate(jobs) if j["release"] == new["id"] and j["state"] == "up"]
    assert len(new_up) == 3 and max(new_up) < first_old_down


def test_one_by_one_keeps_the_count_up(api: Api, scheduler: SchedulerStandIn) -> None:
    app, old = running_app(api, "obo", {"web": 3, "worker": 1}, strategy="one-by-one")
    new = new_release(api, ("web", "worker"))
    _, events = deploy(api, "obo", new)
    assert statuses(events) == ["pending", "running", "complete"]
    assert formation(api, "obo", new) == {"web": 3, "worker": 1}
    assert formation(api, "obo", old) == {"web": 0, "worker": 0}
    jobs = job_events(api, app["id"])
    web = [j for j in jobs if j["type"] == "web"]
    over_time = up_counts_over_time(web, {old["id"], new["id"]})
    start = over_time.index(3)  # the first release fully up
    assert min(over_time[start:]) >= 3 and max(over_time) <= 4, over_time
    # +1 new, -1 old, in turn: new up, old down, new up, ...
    steps = [(j["release"] == new["id"], j["state"]) for j in web[start + 1 :]]
    steps = [s for s in steps if s[1] in ("up", "down")]
    assert steps == [(True, "up"), (False, "down")] * 3
    # types in sorted order: the worker's turn comes after every old web job stopped
    last_old_web_down = max(
        i for i, j in enumerate(jobs)
        if j["type"] == "web" and j["release"] == old["id"] and j["state"] == "down"
    )  # fmt: skip
    first_new_worker = min(
        i for i, j in enumerate(jobs) if j["type"] == "worker" and j["release"] == new["id"]
    )
    assert first_new_worker > last_old_web_down
    states = {(e["job_type"], e["job_state"]) for e in events if "job_type" in e}
    assert {("web", "starting"), ("web", "up"), ("web", "down"), ("worker", "up")} <= states


def test_one_down_one_up(api: Api, scheduler: SchedulerStandIn) -> None:
    app, old = running_app(api, "odou", {"web": 3}, strategy="one-down-one-up")
    new = new_release(api)
    _, events = deploy(api, "odou", new)
    assert statuses(events) == ["pending", "running", "complete"]
    assert (formation(api, "odou", new), formation(api, "odou", old)) == ({"web": 3}, {"web": 0})
    over_time = up_counts_over_time(job_events(api, app["id"]), {old["id"], new["id"]})
    start = over_time.index(3)
    assert min(over_time[start:]) == 2 and max(over_time) == 3, over_time


def test_in_batches_uses_the_batch_size_meta(api: Api, scheduler: SchedulerStandIn) -> None:
    meta = {"flynn-deploy-batch-size": "2"}
    app, old = running_app(api, "batches", {"web": 4}, strategy="in-batches", meta=meta)
    new = new_release(api)
    _, events = deploy(api, "batches", new)
    assert statuses(events) == ["pending", "running", "complete"]
    scales = api.ok(
        "GET",
        f"/events?app_id={app['id']}&object_types=scale",
        headers={"Accept": "application/json"},
    )
    steps = [
        (e["data"]["release"] == new["id"], e["data"]["processes"]["web"])
        for e in reversed(scales)
        if e["data"]["release"] in (old["id"], new["id"]) and e["data"]["processes"]
    ]
    assert steps == [(False, 4), (True, 2), (False, 2), (True, 4), (False, 0)]
    over_time = up_counts_over_time(job_events(api, app["id"]), {old["id"], new["id"]})
    start = over_time.index(4)
    assert min(over_time[start:]) >= 4 and max(over_time) <= 6, over_time


# --- failures and rollback ------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["all-at-once", "one-by-one"])
def test_crashing_new_jobs_roll_back(api: Api, scheduler: SchedulerStandIn, strategy: str) -> None:
    name = f"crash-{strategy}"
    _, old = running_app(api, name, {"web": 2}, strategy=strategy)
    new = new_release(api, env={"CRASH": "1"})
    d, events = deploy(api, name, new)
    assert statuses(events) == ["pending", "running", "failed"]
    assert events[-1]["error"].startswith("New job of type web crashed: 6 new web jobs went down")
    assert api.ok("GET", f"/deployments/{d['id']}")["status"] == "failed"
    assert formation(api, name, old) == {"web": 2}
    assert formation(api, name, new) == {"web": 0}
    assert api.ok("GET", f"/apps/{name}/release")["id"] == old["id"]
    assert up_jobs(api, name, old["id"]) == {"web": 2}
    # the app deploys again afterwards
    _, events = deploy(api, name, new_release(api))
    assert statuses(events)[-1] == "complete"


def test_new_jobs_that_never_come_up_time_out(api: Api, scheduler: SchedulerStandIn) -> None:
    _, old = running_app(api, "hang", {"web": 2}, strategy="one-by-one", deploy_timeout=1)
    new = new_release(api, env={"HANG": "1"})
    started = time.monotonic()
    d, events = deploy(api, "hang", new)
    assert time.monotonic() - started < 10
    assert statuses(events) == ["pending", "running", "failed"]
    assert events[-1]["error"] == (
        f"timed out after 1s waiting for new jobs to come up (release {new['id']}: web: 0 up,"
        " want 1)"
    )
    assert d["deploy_timeout"] == 1
    assert (formation(api, "hang", old), formation(api, "hang", new)) == ({"web": 2}, {"web": 0})
    assert api.ok("GET", "/apps/hang/release")["id"] == old["id"]


@pytest.mark.parametrize(
    ("name", "env", "count", "reason"),
    [
        ("pg-singleton", {"SINGLETON": "true"}, 1, "the appliance is a singleton (SINGLETON=true)"),
        ("pg-two", {}, 2, "the appliance runs 2 node(s): a deployment needs at least 3"),
        # no discoverd here, so no Patroni to ask: refused too, not guessed
        ("pg-unseen", {}, 3, "sirenia: cannot read the appliance's state: discoverd"),
    ],
)
def test_sirenia_refuses_what_it_cannot_replace_safely(
    api: Api, scheduler: SchedulerStandIn, name: str, env: dict[str, str], count: int,
    reason: str,
) -> None:  # fmt: skip
    _, old = running_app(api, name, {"postgres": count, "web": 1}, strategy="postgres")
    new = new_release(api, ("postgres", "web"), env=env)
    d, events = deploy(api, name, new)
    assert statuses(events) == ["pending", "running", "failed"]
    assert reason in events[-1]["error"], events[-1]["error"]
    # refused before anything changed
    assert not [e for e in events if "job_type" in e]
    assert formation(api, name, old) == {"postgres": count, "web": 1}
    assert api.ok("GET", f"/apps/{name}/release")["id"] == old["id"]


def test_one_deployment_at_a_time(api: Api, scheduler: SchedulerStandIn) -> None:
    _, old = running_app(api, "busy", {"web": 1}, deploy_timeout=2)
    hanging = new_release(api, env={"HANG": "1"})
    d = api.ok("POST", "/apps/busy/deploy", {"id": hanging["id"]})
    r = api("POST", "/apps/busy/deploy", {"id": new_release(api)["id"]})
    assert r.status == 400, r
    assert r.json()["code"] == "validation_error" and r.json()["message"] == IN_PROGRESS
    wait_for(
        "the deployment to fail",
        lambda: api.ok("GET", f"/deployments/{d['id']}")["status"] == "failed",
    )
    _, events = deploy(api, "busy", new_release(api))
    assert statuses(events)[-1] == "complete"


def test_per_job_events_are_once_per_job_and_state(api: Api, scheduler: SchedulerStandIn) -> None:
    app, _ = running_app(api, "once", {"web": 2}, strategy="one-by-one")
    new = new_release(api)
    d, events = deploy(api, "once", new)
    listed = api.ok(
        "GET",
        f"/events?object_id={d['id']}&object_types=deployment",
        headers={"Accept": "application/json"},
    )
    assert len(listed) == len(events)
    seen = [(e["data"].get("job_type"), e["data"].get("job_state"), e["data"]["status"])
            for e in listed]  # fmt: skip
    assert seen.count(("web", "up", "running")) == 2  # the new jobs (the old were up before)
    assert seen.count(("web", "down", "running")) == 2  # the old jobs
    assert len({e["id"] for e in listed}) == len(listed)


# --- the worker process ------------------------------------------------------------------------
@contextlib.contextmanager
def worker_process(pg: PGServer, database: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`flynn-host component controller-worker` on `database`, its status on a loopback port."""
    port = free_port()
    logdir = Path(tempfile.mkdtemp(prefix="flynn-worker-"))
    env = {**os.environ, **pg.env(database), "PORT": str(port), "LISTEN_IP": "127.0.0.1",
           "DISCOVERD": "none"}  # fmt: skip
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "flynn-host"), "component", "controller-worker"],
        env=env,
        stdout=open(logdir / "log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def answers() -> bool:
            assert proc.poll() is None, (logdir / "log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for("the worker", answers, timeout=30)
        yield proc, logdir / "log"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(logdir, ignore_errors=True)


@pytest.mark.parametrize("how", ["killed", "stopped", "lost-too-often"])
def test_a_worker_lost_mid_deploy(pg: PGServer, how: str) -> None:
    """Web processes that run no tasks, and `worker` processes. The deployment's worker is
    lost after the first new job is up: killed (the attempt counts) or stopped with SIGTERM
    (it hands the task back uncounted); another worker resumes from the formations and
    completes. After MAX_ATTEMPTS lost workers, the next one rolls back and fails cleanly."""
    database = "workers_" + how.replace("-", "_")
    pg.psql(f"CREATE DATABASE {database}")
    with (
        controller_process(pg, database=database, env={"RUN_TASKS": "false"}) as web,
        scheduler_standin(web.url, web.key, interval=0.3) as standin,
    ):
        api = Api(web)
        app, old = running_app(api, "handover", {"web": 3}, strategy="one-by-one")
        new = new_release(api)
        with worker_process(pg, database) as (first, first_log):
            d = api.ok("POST", "/apps/handover/deploy", {"id": new["id"]})
            wait_for("the first new job", lambda: up_jobs(api, "handover", new["id"]), timeout=15)
            if how == "stopped":
                first.terminate()
            else:
                first.kill()
            first.wait()
            assert "resuming" not in first_log.read_text()
        assert api.ok("GET", f"/deployments/{d['id']}")["status"] == "running"
        attempts = f"SELECT attempts FROM tasks WHERE args->>'id' = '{d['id']}'"
        assert pg.psql(attempts, database).strip() == ("0" if how == "stopped" else "1")
        if how == "lost-too-often":
            pg.psql(f"UPDATE tasks SET attempts = 3 WHERE args->>'id' = '{d['id']}'", database)
        with worker_process(pg, database) as (_, second_log):
            wait_for(
                "the deployment to end",
                lambda: api.ok("GET", f"/deployments/{d['id']}").get("finished_at"),
                timeout=30,
            )
            log = second_log.read_text()
        status = api.ok("GET", f"/deployments/{d['id']}")["status"]
        if how == "lost-too-often":
            assert status == "failed", log
            assert (formation(api, "handover", new), formation(api, "handover", old)) == (
                {"web": 0},
                {"web": 3},
            )
            assert api.ok("GET", "/apps/handover/release")["id"] == old["id"]
            wait_for("the old jobs", lambda: up_jobs(api, "handover", old["id"]) == {"web": 3})
            wait_for("the new jobs to stop", lambda: up_jobs(api, "handover", new["id"]) == {})
            listed = api.ok(
                "GET",
                f"/events?object_id={d['id']}&object_types=deployment",
                headers={"Accept": "application/json"},
            )
            assert listed[0]["data"]["error"] == (
                "deployment interrupted: the worker running it was lost 3 times"
            )
            return
        assert status == "complete", log
        assert re.search(rf"deployment {d['id']}: resuming", log), log
        assert (formation(api, "handover", new), formation(api, "handover", old)) == (
            {"web": 3},
            {"web": 0},
        )
        assert api.ok("GET", "/apps/handover/release")["id"] == new["id"]
        over_time = up_counts_over_time(job_events(api, app["id"]), {old["id"], new["id"]})
        start = over_time.index(3)
        assert min(over_time[start:]) >= 3 and max(over_time) <= 4, over_time
        assert up_jobs(api, "handover", new["id"]) == {"web": 3}
        assert not standin.errors, standin.errors


# --- counting -----------------------------------------------------------------------------------
def test_omni_counts_and_batch_sizes_follow_the_hosts() -> None:
    from flynn_controller.deployer import Deployer

    release = {"release_id": "r", "processes": {"web": {}, "agent": {"omni": True}}}
    d = Deployer(None, None, {}, None, release, {}, hosts=3)
    assert (d.expected(release, "agent", 2), d.expected(release, "web", 2)) == (6, 2)
    assert d.batch_size() == 3  # no meta: one per host
    for meta, size in (("2", 2), ("0", 3), ("many", 3), ("", 3)):
        d.meta = {"flynn-deploy-batch-size": meta}
        assert d.batch_size() == size
