"""The scheduler's decisions without hosts: what `rectify` starts and stops, where it places
jobs, and the restart backoff. The starts and stops it decides are recorded instead of sent
to hosts (the real ones are exercised on clusters in test_scheduler.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from flynn_controller.scheduler import Formation, Host, Job, Scheduler, restart_delay


class Recording(Scheduler):
    """A scheduler whose host calls are recorded: (host id, type) per start, job ids stopped."""

    def __init__(self) -> None:
        super().__init__(controller=None, discoverd=None)  # type: ignore[arg-type]
        self.started: list[tuple[str, str]] = []
        self.stopped: list[str] = []
        self.formations_synced = self.hosts_synced = True

    async def _start_job(self, f: Formation, job: Job, host: Host) -> None:
        self.started.append((host.id, job.type))

    def _stop(self, job: Job) -> None:
        job.wanted = False
        self.stopped.append(job.id)


def formation(processes: dict[str, int], procs: dict[str, Any] | None = None,
              tags: dict[str, dict[str, str]] | None = None, app: str = "a1",
              release: str = "r1") -> Formation:  # fmt: skip
    procs = procs or {t: {} for t in processes}
    return Formation(app={"id": app, "name": "app"}, release={"id": release, "processes": procs},
                     artifact={"id": "x", "type": "flynn", "uri": "file:///x"},
                     processes=processes, tags=tags or {})  # fmt: skip


def job(sched: Scheduler, host: str, typ: str, state: str = "running", started: float = 0.0,
        app: str = "a1", release: str = "r1") -> Job:  # fmt: skip
    j = Job(id=f"{host}-{len(sched.jobs)}", host_id=host, app_id=app, app_name="app",
            release_id=release, type=typ, state=state, started_at=started)  # fmt: skip
    sched.jobs[j.id] = j
    return j


async def rectify(sched: Scheduler) -> None:
    sched.rectify()
    await asyncio.sleep(0)  # the starts it decided run as tasks


@pytest.fixture
async def sched() -> Any:
    s = Recording()
    for i in (1, 2, 3):
        s.hosts[f"h{i}"] = Host(f"h{i}", f"http://h{i}")
    yield s
    await s.session.close()


def test_restart_backoff_is_flynn_s() -> None:
    assert [restart_delay(n) for n in (0, 4, 5, 14, 15, 100)] == [0, 0, 10, 10, 30, 30]


async def test_jobs_spread_over_the_hosts(sched: Recording) -> None:
    sched.formations[("a1", "r1")] = formation({"web": 6})
    await rectify(sched)
    hosts = sorted(h for h, _ in sched.started)
    assert hosts == ["h1", "h1", "h2", "h2", "h3", "h3"]


async def test_a_host_with_fewer_jobs_of_the_formation_comes_first(sched: Recording) -> None:
    job(sched, "h1", "web")
    job(sched, "h2", "web")
    sched.formations[("a1", "r1")] = formation({"web": 3})
    await rectify(sched)
    assert sched.started == [("h3", "web")]


async def test_omni_types_run_count_jobs_on_every_active_host(sched: Recording) -> None:
    sched.hosts["h3"].shutdown = True
    sched.formations[("a1", "r1")] = formation({"app": 1}, {"app": {"omni": True}})
    await rectify(sched)
    assert sorted(sched.started) == [("h1", "app"), ("h2", "app")]


async def test_tags_choose_the_hosts_and_no_match_blocks(sched: Recording) -> None:
    sched.hosts["h2"].tags = {"disk": "ssd"}
    sched.formations[("a1", "r1")] = formation({"db": 2}, tags={"db": {"disk": "ssd"}})
    await rectify(sched)
    assert sched.started == [("h2", "db"), ("h2", "db")]
    sched.formations[("a1", "r1")] = formation({"db": 3}, tags={"db": {"disk": "nvme"}})
    await rectify(sched)
    assert len(sched.started) == 2 and sched.blocked == {(("a1", "r1"), "db")}
    assert sched.state()["blocked"] == [{"app": "a1", "release": "r1", "type": "db"}]


async def test_surplus_stops_pending_jobs_then_the_newest(sched: Recording) -> None:
    old = job(sched, "h1", "web", started=1.0)
    new = job(sched, "h2", "web", started=5.0)
    pending = job(sched, "h3", "web", state="pending")
    sched.formations[("a1", "r1")] = formation({"web": 2})
    await rectify(sched)
    assert sched.stopped == [pending.id]
    sched.formations[("a1", "r1")] = formation({"web": 1})
    await rectify(sched)
    assert sched.stopped == [pending.id, new.id] and old.wanted


async def test_jobs_of_unknown_formations_are_left_and_deleted_ones_stopped(
    sched: Recording,
) -> None:
    unknown = job(sched, "h1", "web", app="other")
    gone = job(sched, "h2", "web", app="deleted")
    dropped = job(sched, "h3", "worker")
    sched.formations[("a1", "r1")] = formation({"web": 0})
    sched.deleted = {("deleted", "r1")}
    await rectify(sched)
    assert sorted(sched.stopped) == sorted([gone.id, dropped.id]) and unknown.wanted


async def test_nothing_is_decided_before_formations_and_hosts_are_known(
    sched: Recording,
) -> None:
    sched.formations_synced = False
    job(sched, "h1", "web", app="deleted")
    sched.deleted = {("deleted", "r1")}
    sched.formations[("a1", "r1")] = formation({"web": 3})
    await rectify(sched)
    assert sched.started == [] and sched.stopped == []


async def test_a_job_that_stops_while_wanted_waits_its_backoff(sched: Recording) -> None:
    sched.formations[("a1", "r1")] = formation({"web": 1})
    for n in range(7):
        crashed = job(sched, "h1", "web", started=time.monotonic())
        sched._job_ended(crashed, "crashed", 1)
        delay = sched.restarts[(("a1", "r1"), "web")].not_before - time.monotonic()
        assert (delay <= 0) if n < 5 else (9 < delay <= 10), (n, delay)
    sched.started.clear()
    sched.rectify()  # within the backoff: nothing starts yet
    assert sched.started == []
    # a job that had run for over 5 minutes starts the count again
    long_run = job(sched, "h1", "web", started=time.monotonic() - 301)
    sched._job_ended(long_run, "crashed", 1)
    assert sched.restarts[(("a1", "r1"), "web")].count == 1


async def test_jobs_on_hosts_not_followed_are_reported_down(sched: Recording) -> None:
    """A job the controller has as up on a host no longer in the cluster (lost before this
    leader could list it) is reported down; one on a followed host, or known, is left."""

    class Records:
        async def jobs(self, app_id: str) -> list[dict[str, Any]]:
            return [
                {"id": "gone-1", "state": "up", "release": "r1", "type": "web"},
                {"id": "h1-2", "state": "up", "release": "r1", "type": "web"},
                {"id": "gone-3", "state": "down", "release": "r1", "type": "web"},
            ]

    sched.controller = Records()  # type: ignore[assignment]
    sched.formations[("a1", "r1")] = formation({"web": 1})
    await sched.reconcile()
    reported = []
    while not sched.reports.empty():
        reported.append(sched.reports.get_nowait())
    assert [(j.id, j.reported, j.error) for j in reported] == [("gone-1", "down", "host lost")]
