"""The scheduler's rules a deployment moves stateful and host-bound apps with, on its
in-memory picture (no hosts: starting and stopping jobs is recorded, not done): a formation's
`hosts` restricts a type (jobs elsewhere stop, omni types run only there), a host-network
omni type starts on a host only once the app's job of another release there has ended, and a
job with a volume takes a free one only on a host among those with the fewest of its jobs.
The scheduler driving real hosts is tested on clusters (`test_deploy_system_apps.py`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from flynn_controller.scheduler import Scheduler
from flynn_controller.scheduler_state import Formation, Host, Job

APP = {"id": "app-1", "name": "discoverd"}


def release(rid: str, **proc: Any) -> dict[str, Any]:
    return {"id": rid, "processes": {"app": proc}}


def formation(rid: str, count: int, hosts: list[str] | None = None, **proc: Any) -> Formation:
    return Formation(APP, release(rid, **proc), {"id": "art"}, {"app": count},
                     hosts={"app": hosts} if hosts is not None else {})  # fmt: skip


def job(
    jid: str, host: str, rid: str, state: str = "running", vols: list[str] | None = None
) -> Job:
    return Job(jid, host, APP["id"], APP["name"], rid, "app", state=state,
               volume_ids=vols or [])  # fmt: skip


def with_scheduler(test: Callable[[Scheduler, list[tuple[str, str]]], Awaitable[None]]) -> None:
    """Run `test` with a scheduler of three healthy hosts whose starts and stops are only
    recorded in the list it gets: ("start", host) and ("stop", job id)."""

    async def main() -> None:
        sched = Scheduler(controller=None)  # type: ignore[arg-type]  # it never asks
        done: list[tuple[str, str]] = []

        async def start_job(f: Formation, j: Job, host: Host) -> None:
            done.append(("start", host.id))

        async def stop_job(j: Job, host: Host) -> None:
            done.append(("stop", j.id))

        setattr(sched, "_start_job", start_job)  # noqa: B010 - recorded, not done
        setattr(sched, "_stop_job", stop_job)  # noqa: B010
        sched.hosts = {h: Host(h, f"http://{h}") for h in ("h1", "h2", "h3")}
        sched.formations_synced = sched.hosts_synced = True
        try:
            await test(sched, done)
        finally:
            await sched.session.close()

    asyncio.run(main())


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_an_omni_type_moves_host_by_host() -> None:
    async def test(sched: Scheduler, done: list[tuple[str, str]]) -> None:
        old = formation("old", 1, ["h2", "h3"], omni=True, host_network=True)
        new = formation("new", 1, ["h1"], omni=True, host_network=True)
        sched.formations = {old.key: old, new.key: new}
        for h in ("h1", "h2", "h3"):
            sched.jobs[f"{h}-old"] = job(f"{h}-old", h, "old")
        sched.rectify()
        await settle()
        # the old job on h1 stops; the new one waits for it (its ports are the host's)
        assert done == [("stop", "h1-old")]
        sched.rectify()
        await settle()
        assert done == [("stop", "h1-old")]
        sched._job_ended(sched.jobs["h1-old"], "done")
        sched.rectify()
        await settle()
        assert done == [("stop", "h1-old"), ("start", "h1")]

    with_scheduler(test)


def test_a_host_restriction_stops_exactly_the_job_on_the_host_taken_away() -> None:
    async def test(sched: Scheduler, done: list[tuple[str, str]]) -> None:
        # the newest job is the one a plain scale-down would pick: h3's
        sched.jobs = {"a": job("a", "h1", "old"), "b": job("b", "h2", "old"),
                      "c": job("c", "h3", "old")}  # fmt: skip
        sched.jobs["c"].started_at = 10.0
        old = formation("old", 2, ["h1", "h3"])
        sched.formations = {old.key: old}
        sched.rectify()
        await settle()
        assert done == [("stop", "b")]

    with_scheduler(test)


def test_a_new_job_takes_a_free_volume_only_where_its_jobs_are_fewest() -> None:
    async def test(sched: Scheduler, done: list[tuple[str, str]]) -> None:
        vol = {"id": "v-h2", "meta": {"flynn-controller.app": APP["id"],
                                      "flynn-controller.type": "app"}}  # fmt: skip
        sched.hosts["h2"].volumes = [vol]
        new = formation("new", 2, volumes=[{"path": "/data"}])
        sched.formations = {new.key: new}
        # a new job already runs on h2: the free volume there would pile two on one host
        sched.jobs = {"n1": job("n1", "h2", "new", vols=["v-n1"])}
        assert sched._place(new, "app").id in ("h1", "h3")  # type: ignore[union-attr]
        # on a host with the fewest, the free volume is taken (a job back to its data)
        sched.jobs = {"n1": job("n1", "h1", "new", vols=["v-n1"]),
                      "n3": job("n3", "h3", "new", vols=["v-n3"])}  # fmt: skip
        assert sched._place(new, "app").id == "h2"  # type: ignore[union-attr]

    with_scheduler(test)
