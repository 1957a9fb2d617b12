"""Jobs on this host: the state machine `starting → running → done | crashed`,
`starting → failed`, persisted in the state file so a restarted daemon adopts running jobs
instead of losing or duplicating them.

The manager owns each job's life: it fetches the job's layers, gives the job its network
(`JobNetwork`), starts the container through the backend (any `ContainerBackend`, keyed by job
id), waits for it, records how it ended, cleans up (container, network, `delete_on_stop`
volumes) and publishes Flynn's job events (`create`, `start`, `stop`, `error`, `cleanup`) to API
streams and plugins.

Starting is two phases. First the job's layers are fetched: that waits on the network and
holds nothing, so a slow or stalled download delays only its own job. Then the job takes one of
`--max-job-concurrency` start slots for the local work (mounts, bundle, runc); `PUT` answers 429
while every slot is taken or queued for. A `DELETE` cancels a job still fetching or queued; one
already in its local work is undone as soon as that ends. Either way it ends `failed`.

Size: one state machine and the bookkeeping its transitions share (start slots,
cancellations, stoppers, events); split, each part would reach into the others' state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flynn_host.atomicfile import write_json_atomic
from flynn_host.backend import ContainerBackend, NetworkIsolation, StartError
from flynn_host.errors import FlynnError, ValidationError, conflict, not_found
from flynn_host.runtime import logs
from flynn_host.types import (
    CRASHED,
    DONE,
    FAILED,
    RUNNING,
    STARTING,
    SYSTEM_PARTITION,
    ActiveJob,
    Job,
)

if TYPE_CHECKING:
    from flynn_host.networking.jobnet import JobNetwork

log = logging.getLogger(__name__)

# Ended jobs stay listed (`flynn-host ps -a`) with their logs until this many newer ones ended.
KEEP_ENDED_JOBS = 500
STOPPED_WHILE_STARTING = "stopped while starting"
# seconds before following a job's log again when the shim ended the feed before the job ended
FOLLOW_AGAIN = 0.05
# log lines read from the file at a time, catching up
CATCH_UP_LINES = 5000


class StartSlots:
    """At most `limit` jobs doing their local start work at once (0: no limit).

    `busy` counts the jobs holding a slot or queued for one, which is what the API's 429 is
    about: a host that already has that many jobs to set up locally is overloaded. A job takes
    a slot only once its layers are here, so waiting on the network never holds one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0
        self._free = asyncio.Semaphore(limit) if limit else None

    @property
    def full(self) -> bool:
        return bool(self.limit) and self.busy >= self.limit

    async def acquire(self) -> None:
        self.busy += 1
        if self._free is None:
            return
        try:
            await self._free.acquire()
        except BaseException:
            self.busy -= 1
            raise

    def release(self) -> None:
        self.busy -= 1
        if self._free is not None:
            self._free.release()


class JobManager:
    def __init__(
        self,
        host_id: str,
        state_file: Path,
        backend: ContainerBackend,
        volumes: Any,
        network: JobNetwork | None = None,
        max_concurrency: int = 4,
        stop_timeout: float = 30.0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_log: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.host_id = host_id
        self.state_file = state_file
        self.backend = backend
        self.volumes = volumes
        self.network = network
        self.max_concurrency = max_concurrency
        self.slots = StartSlots(max_concurrency)
        self.stop_timeout = stop_timeout
        self.on_event = on_event
        self.on_log = on_log
        self.jobs: dict[str, ActiveJob] = {}
        self.log_seq: dict[str, int] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stoppers: dict[str, asyncio.Task[None]] = {}
        self._subscribers: list[tuple[str | None, asyncio.Queue[dict[str, Any] | None]]] = []
        self._running_events: dict[str, asyncio.Event] = {}
        self._ended_events: dict[str, asyncio.Event] = {}
        # jobs fetching layers or queued for a start slot: a DELETE cancels their start task
        self._cancellable: set[str] = set()

    # --- persistence --------------------------------------------------------------------------
    def save(self) -> None:
        data = {
            "jobs": {
                jid: {**j.to_json(), "seq": j.seq, "log_seq": self.log_seq.get(jid, 0)}
                for jid, j in self.jobs.items()
            }
        }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        # no fsync: saved on every job change, on the path of every start and stop; 0600 as it
        # holds every job's environment, secrets included
        write_json_atomic(self.state_file, data, fsync=False, mode=0o600)

    def load(self) -> list[ActiveJob]:
        """Read the jobs of the state file (before the backend runs: it removes what belongs
        to no job in it); `recover` then adopts or settles them."""
        if not self.state_file.exists():
            return []
        data = json.loads(self.state_file.read_text())
        out = []
        for jid, raw in data.get("jobs", {}).items():
            try:
                job = ActiveJob.from_json(raw)
            except (FlynnError, KeyError) as exc:
                log.warning("dropping unreadable job %s from state: %s", jid, exc)
                continue
            self.jobs[jid] = job
            self.log_seq[jid] = raw.get("log_seq", 0)
            out.append(job)
        return out

    async def recover(self) -> None:
        """Adopt the jobs `load` read that were running when the daemon stopped; settle those
        that ended."""
        for job in list(self.jobs.values()):
            if job.ended:
                continue
            if job.status == STARTING:
                # the daemon died mid-start: whatever was half made goes, the job failed
                await self.backend.destroy(job.job.id)
                await self._detach_network(job)
                job.error = "host restarted while the job was starting"
                self._mark_ended(job, FAILED)
                self._publish("error", job)
                continue
            alive = await self.backend.recover(job.job)
            self._running_events[job.job.id] = ev = asyncio.Event()
            ev.set()
            log.info("job %s: %s", job.job.id, "adopted" if alive else "ended while host was down")
            self._tasks[job.job.id] = asyncio.create_task(self._supervise(job))
        self.save()

    # --- queries ------------------------------------------------------------------------------
    def get(self, job_id: str) -> ActiveJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise not_found(f"job {job_id} not found")
        return job

    def list(self, active_only: bool = False) -> list[ActiveJob]:
        jobs = sorted(self.jobs.values(), key=lambda j: j.seq)
        return [j for j in jobs if not (active_only and j.ended)]

    # --- events -------------------------------------------------------------------------------
    def publish(self, name: str, job_id: str) -> None:
        """An event about a job from outside the job's life cycle (its services registered)."""
        job = self.jobs.get(job_id)
        if job is not None and not job.ended:
            self._publish(name, job)

    def _publish(self, name: str, job: ActiveJob) -> None:
        event = {"event": name, "job_id": job.job.id, "job": job.to_json()}
        for job_filter, queue in list(self._subscribers):
            if job_filter in (None, job.job.id):
                queue.put_nowait(event)
        if self.on_event:
            try:
                self.on_event(event)
            except Exception:
                log.exception("job event hook failed")

    @contextlib.asynccontextmanager
    async def subscribe(
        self, job_id: str | None = None
    ) -> AsyncIterator[asyncio.Queue[dict[str, Any] | None]]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        entry = (job_id, queue)
        self._subscribers.append(entry)
        try:
            yield queue
        finally:
            self._subscribers.remove(entry)

    # --- commands -----------------------------------------------------------------------------
    def add(self, job: Job) -> ActiveJob:
        """Accept a job and start it in the background (Flynn's `PUT /host/jobs/:id`)."""
        if job.id in self.jobs:
            raise conflict(f"job {job.id} already exists")
        if self.slots.full:
            raise FlynnError(
                "ratelimited",
                f"too many jobs starting (limit {self.max_concurrency}), retry shortly",
                retry=True,
            )
        for i, vol in enumerate(job.config.get("volumes") or []):
            try:
                self.volumes.get(vol["volume"])
            except FlynnError as exc:
                raise ValidationError(f"config.volumes[{i}].volume", "does not exist") from exc
        active = ActiveJob(job=job, host_id=self.host_id)
        self.jobs[job.id] = active
        self._running_events[job.id] = asyncio.Event()
        self.save()
        self._publish("create", active)
        self._tasks[job.id] = asyncio.create_task(self._run(active))
        return active

    async def wait_started(self, job_id: str) -> None:
        ev = self._running_events.get(job_id)
        if ev is not None:
            await ev.wait()

    async def wait_ended(self, job_id: str) -> None:
        job = self.get(job_id)
        if job.ended:
            return
        await self._ended_events.setdefault(job_id, asyncio.Event()).wait()

    def _mark_ended(self, job: ActiveJob, state: str) -> None:
        job.set_state(state)
        job.pid = None  # as Flynn: an ended job has no process
        ev = self._ended_events.pop(job.job.id, None)
        if ev is not None:
            ev.set()

    async def _run(self, job: ActiveJob) -> None:
        jid = job.job.id
        try:
            job.pid = await self._start(job)
        except asyncio.CancelledError:
            if not job.force_stop:
                raise  # the daemon is going away: the next one settles the job
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # the cancellation was ours and is handled here
            await self._fail(job, STOPPED_WHILE_STARTING)
            return
        except StartError as exc:
            await self._fail(job, str(exc))
            return
        except Exception as exc:
            log.exception("job %s failed to start", jid)
            await self._fail(job, f"start failed: {exc}")
            return
        job.set_state(RUNNING)
        self._running_events[jid].set()
        self.save()
        self._publish("start", job)
        await self._supervise(job)

    async def _start(self, job: ActiveJob) -> int:
        """Fetch the job's layers, then, holding a start slot, start its container; its pid."""
        jid = job.job.id
        self._cancellable.add(jid)
        try:
            if job.force_stop:  # stopped before this task first ran
                raise StartError(STOPPED_WHILE_STARTING)
            await self.backend.fetch(job.job)
            await self.slots.acquire()
        finally:
            self._cancellable.discard(jid)
        try:
            if job.force_stop:
                raise StartError(STOPPED_WHILE_STARTING)
            volume_paths = {
                v["volume"]: str(self.volumes.path(v["volume"]))
                for v in job.job.config.get("volumes") or []
            }
            network = await self._attach_network(job)
            try:
                # not cancelled midway: the backend undoes a failed start itself, and a shim
                # cut off while it starts could leave a container no one knows about
                pid = await self.backend.start(job.job, volume_paths, network)
            except BaseException:
                await self._detach_network(job)
                raise
        finally:
            self.slots.release()
        if job.force_stop:
            # stopped during the local work: the container goes again (in _finish)
            raise StartError(STOPPED_WHILE_STARTING)
        return pid

    async def _attach_network(self, job: ActiveJob) -> NetworkIsolation:
        """The job's network namespace and address, made here for the backend to join: user
        jobs' namespaces are fenced off the host's protected ports; `host_network` jobs, and
        every job while the host has no network, get none."""
        if self.network is None or job.job.config.get("host_network"):
            return NetworkIsolation()
        sandboxed = job.job.partition != SYSTEM_PARTITION
        attached = await self.network.attach(job.job.id, sandboxed)
        if attached is None:
            return NetworkIsolation()
        netns, address = attached
        job.internal_ip = address
        return NetworkIsolation(netns, address, str(self.network.resolv_conf))

    async def _detach_network(self, job: ActiveJob) -> None:
        if self.network is None or job.job.config.get("host_network"):
            return
        try:
            await self.network.detach(job.job.id)
        except Exception as exc:  # the rest of the clean-up must still happen
            log.warning("removing job %s's network: %s", job.job.id, exc)

    async def _fail(self, job: ActiveJob, error: str) -> None:
        job.error = error
        self._mark_ended(job, FAILED)
        self._running_events[job.job.id].set()
        self._publish("error", job)
        await self._finish(job)

    async def _supervise(self, job: ActiveJob) -> None:
        """Wait for a running job to end, feeding its log to plugins meanwhile."""
        jid = job.job.id
        follower = None
        ended = asyncio.Event()
        if self.on_log is not None:
            follower = asyncio.create_task(self._follow_logs(jid, ended))
        info = await self.backend.wait(jid)
        ended.set()
        if follower is not None:
            # the shim ends the feed after the last line; give it a moment to get there
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(follower, 5)
            # what the feed missed (a job that ended before we connected to its shim, or while
            # the daemon was down; a feed far behind) comes from the log file
            await self._catch_up_log(jid)
        job.exit_status = info.status
        job.error = info.error
        self._mark_ended(job, DONE if info.status == 0 and not info.error else CRASHED)
        self._publish("stop", job)
        await self._finish(job)

    async def _follow_logs(self, jid: str, ended: asyncio.Event) -> None:
        """Feed the job's lines to plugins as the shim logs them, until the job has ended.

        The shim drops a follower that falls far behind rather than slow the job down (a job
        can print faster than the plugins take its lines): then the lines missed are read from
        the log file at the plugins' pace, and the feed followed again from the last one."""
        while not ended.is_set():
            with contextlib.suppress(OSError):
                async for entry in self.backend.follow_logs(jid, self.log_seq.get(jid, 0)):
                    self._deliver_log(jid, entry)
            if not ended.is_set():
                await self._catch_up_log(jid)
                await asyncio.sleep(FOLLOW_AGAIN)

    def _deliver_log(self, jid: str, entry: dict[str, Any]) -> None:
        assert self.on_log is not None
        self.log_seq[jid] = entry.get("n", 0)
        try:
            self.on_log(jid, entry)
        except Exception:
            log.exception("job log hook failed")

    async def _catch_up_log(self, jid: str) -> None:
        """Deliver the lines after the last one delivered from the log file, a chunk at a time
        (read in a thread), until the end of the file. Lines rotated out of the file before we
        got to them are gone: the feed goes on after the gap."""
        reader = logs.LogReader(str(self.backend.log_path(jid)))
        try:
            while True:
                since = self.log_seq.get(jid, 0)
                entries = await asyncio.to_thread(reader.read, since + 1, CATCH_UP_LINES)
                if entries and entries[0]["n"] > since + 1:
                    log.warning("job %s: log lines %d-%d were rotated out before they were "
                                "delivered", jid, since + 1, entries[0]["n"] - 1)  # fmt: skip
                for entry in entries:
                    self._deliver_log(jid, entry)
                if len(entries) < CATCH_UP_LINES:
                    return
        finally:
            reader.close()

    async def _finish(self, job: ActiveJob) -> None:
        jid = job.job.id
        stopper = self._stoppers.pop(jid, None)
        if stopper is not None and stopper is not asyncio.current_task():
            stopper.cancel()
        await self.backend.destroy(jid)
        await self._detach_network(job)
        for vol in job.job.config.get("volumes") or []:
            if vol.get("delete_on_stop"):
                with contextlib.suppress(FlynnError, OSError):
                    self.volumes.delete(vol["volume"])
        self._tasks.pop(jid, None)
        self._prune()
        self.save()
        self._publish("cleanup", job)

    def _prune(self) -> None:
        ended = [j for j in self.list() if j.ended]
        for job in ended[: max(0, len(ended) - KEEP_ENDED_JOBS)]:
            del self.jobs[job.job.id]
            self._running_events.pop(job.job.id, None)
            self.log_seq.pop(job.job.id, None)
            for path in (self.backend.log_path(job.job.id),):
                for p in (path, Path(f"{path}.1")):
                    with contextlib.suppress(OSError):
                        p.unlink()

    def stop(self, job_id: str) -> None:
        """Flynn's `DELETE /host/jobs/:id`: running → SIGTERM, then SIGKILL after the stop
        timeout; starting → the start is cancelled (at once while the job fetches layers or
        waits for a slot, else when its local start work ends) and the job ends `failed`."""
        job = self.get(job_id)
        if job.ended:
            return
        job.force_stop = True
        if job.status == STARTING:
            if job_id in self._cancellable:
                self._cancellable.discard(job_id)  # cancelled once, however many DELETEs
                self._tasks[job_id].cancel()
            return
        if job_id not in self._stoppers:
            self._stoppers[job_id] = asyncio.create_task(self._stop(job))

    async def _stop(self, job: ActiveJob) -> None:
        jid = job.job.id
        with contextlib.suppress(Exception):
            await self.backend.signal(jid, signal.SIGTERM)
        task = self._tasks.get(jid)
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=self.stop_timeout)
        if not done and not job.ended:
            log.info("job %s ignored SIGTERM for %ss: SIGKILL", jid, self.stop_timeout)
            with contextlib.suppress(Exception):
                await self.backend.signal(jid, signal.SIGKILL)

    async def signal(self, job_id: str, sig: int) -> None:
        job = self.get(job_id)
        if job.status != RUNNING:
            raise FlynnError("conflict", f"job {job_id} is {job.status}, not running")
        await self.backend.signal(job_id, sig)

    async def stop_all(self, grace: float) -> None:
        """Stop every active job and wait (up to `grace` seconds) until they have ended."""
        for job in self.list(active_only=True):
            self.stop(job.job.id)
        pending = list(self._tasks.values())
        if pending:
            log.info("stopping %d jobs", len(pending))
            await asyncio.wait(pending, timeout=grace)

    async def shutdown(self) -> None:
        """Stop supervising (jobs keep running under their shims and are adopted later)."""
        tasks = list(self._tasks.values()) + list(self._stoppers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.save()
