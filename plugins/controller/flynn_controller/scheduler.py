"""The scheduler: makes the hosts run what the controller's formations ask for, and keeps it
running (Flynn's `controller/scheduler`; docs/controller.md, "The scheduler").

It follows three sources and keeps what it learns in memory (`GET /debug/state` shows it):
the controller's formations (`GET /formations` stream), the hosts (discoverd service
`flynn-host`) and each host's jobs (its job event stream, re-listed every `JOB_SYNC`). After any
change it **rectifies**: per formation and process type it compares the wanted count (times
the active hosts for an omni type) with the jobs it knows and starts the missing ones or stops
the surplus. Jobs of a process type no formation wants any more are stopped.

Placement: the hosts whose tags match the formation's tags for the type, shutdown or unhealthy
ones skipped, the one with the fewest jobs of that formation and type first (ties broken at
random). A job that had a volume goes back to a host holding an unused volume of its type,
if that host is among those with the fewest (so a new release taking over the old one's
volumes does not pile up on one host). No host → the job is `blocked` until one appears.

Two things a deployment uses to move an app host by host: a formation's `hosts` restricts
types to those hosts (jobs elsewhere are stopped, and an omni type runs only there), and a
host-network omni type (its ports are the host's) starts on a host only once the app's jobs
of that type of other releases there have ended.

A job that stops while still wanted is restarted after Flynn's backoff (`restart_delay`). A
host that leaves discoverd is checked every second; after `MAX_HOST_CHECKS` failures its jobs
are taken as stopped and replaced elsewhere. A host that comes back has its jobs counted again,
so what the formations no longer want is stopped.

Each job's state is reported to the controller (`PUT /apps/:app/jobs/:id`): the host's
`starting` → `starting`, `running` → `up` (for a job whose port services the host registers
in discoverd, once they are registered), `done`/`crashed`/`failed` → `down`.

Only the leader of discoverd service `controller-scheduler` runs this; see `scheduler_service`.
Its data is in `scheduler_state`, its controller client in `scheduler_io`.

Size: one event loop's worth of decisions (follow, rectify, place, start, stop, report) on one
shared picture; split further, each part would mutate the others' state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from typing import Any

import aiohttp

from flynn_controller import hosts as hostapi
from flynn_controller.jobconfig import build_job
from flynn_controller.scheduler_io import HTTP_TIMEOUT, STREAM_TIMEOUT, Controller, sse_data
from flynn_controller.scheduler_state import (
    ACTIVE,
    ENDED,
    HOST_STATE,
    Formation,
    FormationKey,
    Host,
    Job,
    Restarts,
    restart_delay,
)

log = logging.getLogger("flynn_controller.scheduler")

MAX_HOST_CHECKS = 10  # failed status checks before a host that left discoverd is given up
HOST_CHECK_INTERVAL = 1.0
JOB_SYNC = 30.0  # seconds between full listings of each host's jobs
RECTIFY_INTERVAL = 10.0  # a rectify at least this often, whatever happens
START_RETRY_CAP = 30.0
HOST_BUSY_RETRY = 0.1  # seconds before a job a busy host refused (429) is put again
RESET_RESTARTS_AFTER = 300.0  # a job up this long starts its type's restart count again
REPORT_RETRY = 1.0
RECONCILE_INTERVAL = 10.0  # seconds between checks of the controller's running jobs
DRAIN_TIMEOUT = 10.0  # seconds a stopping job waits for the routers to drain it


class Scheduler:
    def __init__(self, controller: Controller, discoverd: Any = None) -> None:
        self.controller = controller
        self.discoverd = discoverd
        self.formations: dict[FormationKey, Formation] = {}
        self.formations_synced = False
        # formations deleted (or of deleted apps): their jobs are stopped; a job of a
        # formation the controller never mentioned is left alone (bootstrap may not have
        # handed its app over yet)
        self.deleted: set[FormationKey] = set()
        self.hosts: dict[str, Host] = {}
        self.hosts_synced = False
        self.jobs: dict[str, Job] = {}
        self.restarts: dict[tuple[FormationKey, str], Restarts] = {}
        self.changed = asyncio.Event()
        self.reports: asyncio.Queue[Job] = asyncio.Queue()
        self.session = aiohttp.ClientSession(headers=hostapi.headers(), timeout=HTTP_TIMEOUT)
        self.tasks: list[asyncio.Task[Any]] = []
        self.blocked: set[tuple[FormationKey, str]] = set()
        self.started = time.monotonic()
        self.rectifications = 0

    # --- running --------------------------------------------------------------------------
    async def run(self) -> None:
        self.tasks = [
            asyncio.create_task(self._follow_formations(), name="formations"),
            asyncio.create_task(self._follow_hosts(), name="hosts"),
            asyncio.create_task(self._reporter(), name="reporter"),
            asyncio.create_task(self._reconcile_loop(), name="reconcile"),
        ]
        try:
            await self._rectify_loop()
        finally:
            for task in self.tasks + [t for h in self.hosts.values() for t in h.tasks]:
                task.cancel()
            for task in self.tasks:
                with contextlib.suppress(BaseException):
                    await task
            await self.session.close()

    def poke(self) -> None:
        self.changed.set()

    async def _rectify_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), RECTIFY_INTERVAL)
            self.changed.clear()
            await asyncio.sleep(0.05)  # gather a burst of changes into one pass
            try:
                self.rectify()
            except Exception:
                log.exception("rectify failed")

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the controller is away: next round
                log.info("reconciling the controller's jobs: %s", exc)

    async def reconcile(self) -> None:
        """Jobs the controller has as running on a host this scheduler does not follow (lost
        before this leader could list it, say) are reported `down`: nothing runs them."""
        if not (self.formations_synced and self.hosts_synced):
            return
        for app_id in {k[0] for k in self.formations}:
            for raw in await self.controller.jobs(app_id):
                host_id = str(raw.get("id", "")).partition("-")[0]
                if (raw.get("state") not in ("starting", "up") or raw["id"] in self.jobs
                        or host_id in self.hosts):  # fmt: skip
                    continue
                log.info("job %s: its host %s is not in the cluster: down", raw["id"], host_id)
                lost = Job(id=raw["id"], host_id=host_id, app_id=app_id, app_name="",
                           release_id=str(raw.get("release") or ""), type=raw.get("type") or "",
                           state="failed", error="host lost")  # fmt: skip
                self._report(lost)

    # --- formations -----------------------------------------------------------------------
    async def _follow_formations(self) -> None:
        delay = 0.5
        while True:
            batch: dict[FormationKey, Formation] | None = {}
            deleted: set[FormationKey] = set()
            try:
                async for data in self.controller.formations():
                    delay = 0.5
                    if not data:  # the end of the first batch: the whole picture
                        assert batch is not None
                        self.formations = batch
                        self.deleted = deleted
                        batch = None
                        self.formations_synced = True
                        self.poke()
                        continue
                    f = self._formation(data)
                    key = (str(data["app"]["id"]), str(data["release"]["id"]))
                    if batch is not None:
                        if f is not None:
                            batch[f.key] = f
                        else:
                            deleted.add(key)
                        continue
                    if f is None:
                        self.formations.pop(key, None)
                        self.deleted.add(key)
                        self._formation_gone(key)
                    else:
                        self.formations[f.key] = f
                        self.deleted.discard(key)
                    self.poke()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the controller is away: reconnect
                log.info("formations stream: %s; reconnecting", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    @staticmethod
    def _formation(data: dict[str, Any]) -> Formation | None:
        if data.get("deleted") or data.get("processes") is None:
            return None
        return Formation(
            app=data["app"],
            release=data["release"],
            artifact=data.get("artifact"),
            processes={k: int(v) for k, v in (data.get("processes") or {}).items()},
            tags=data.get("tags") or {},
            hosts=data.get("hosts") or {},
        )

    def _formation_gone(self, key: FormationKey) -> None:
        """A deleted formation (or app): its volumes go once no job holds them."""
        asyncio.create_task(self._delete_volumes(key[0]))

    # --- hosts ----------------------------------------------------------------------------
    async def _follow_hosts(self) -> None:
        async for event in self.discoverd.watch(hostapi.HOST_SERVICE):
            inst = event.instance
            if event.kind == "current":
                self.hosts_synced = True
                self.poke()
                continue
            if inst is None or not inst.meta.get("id"):
                continue
            host_id = inst.meta["id"]
            if event.kind in ("up", "update"):
                self._host_up(host_id, f"http://{inst.addr}", inst.meta)
            elif event.kind == "down":
                host = self.hosts.get(host_id)
                if host is not None and host.healthy:
                    log.info("host %s left discoverd: checking it", host_id)
                    host.healthy = False
                    host.tasks.append(asyncio.create_task(self._check_host(host)))
            self.poke()

    def _host_up(self, host_id: str, url: str, meta: dict[str, str]) -> None:
        tags = {k[4:]: v for k, v in meta.items() if k.startswith("tag:")}
        host = self.hosts.get(host_id)
        if host is None or host.url != url:
            if host is not None:
                self._unfollow(host, "it came back at another address")
            host = Host(host_id, url)
            self.hosts[host_id] = host
            host.tasks.append(asyncio.create_task(self._follow_jobs(host)))
            log.info("following host %s at %s", host_id, url)
        host.tags = tags
        host.shutdown = meta.get("shutdown") == "true"
        host.healthy = True
        host.checks = 0

    async def _check_host(self, host: Host) -> None:
        # one check per HOST_CHECK_INTERVAL, each given no longer than that: a host whose
        # address went with it (connects hang until a timeout) is given up after
        # MAX_HOST_CHECKS intervals, not MAX_HOST_CHECKS connect timeouts
        timeout = aiohttp.ClientTimeout(total=HOST_CHECK_INTERVAL)
        while not host.healthy and self.hosts.get(host.id) is host:
            started = time.monotonic()
            try:
                async with self.session.get(host.url + "/host/status", timeout=timeout) as resp:
                    ok = resp.status == 200
            except (aiohttp.ClientError, OSError, TimeoutError):
                ok = False
            if ok:
                host.checks = 0
            else:
                host.checks += 1
                if host.checks >= MAX_HOST_CHECKS:
                    self._unfollow(host, f"{host.checks} failed checks")
                    return
            await asyncio.sleep(max(0.0, HOST_CHECK_INTERVAL - (time.monotonic() - started)))

    def _unfollow(self, host: Host, why: str) -> None:
        log.warning("host %s given up (%s): its jobs are taken as stopped", host.id, why)
        self.hosts.pop(host.id, None)
        current = asyncio.current_task()
        for task in host.tasks:
            if task is not current:
                task.cancel()
        for job in list(self.jobs.values()):
            if job.host_id == host.id:
                # lost with its host, not crashed: replaced at once, whatever the number
                self._job_ended(job, "done" if not job.wanted else "failed", error="host lost",
                                backoff=False)  # fmt: skip
        self.poke()

    # --- a host's jobs --------------------------------------------------------------------
    async def _follow_jobs(self, host: Host) -> None:
        delay = 0.5
        while True:
            try:
                await self._sync_jobs(host)
                async with self.session.get(
                    host.url + "/host/jobs",
                    headers={"Accept": "text/event-stream"},
                    timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=JOB_SYNC),
                ) as resp:
                    if resp.status != 200:
                        raise ConnectionError(f"job events: {resp.status}")
                    delay = 0.5
                    async for event in sse_data(resp):
                        if isinstance(event.get("job"), dict):
                            self._host_job(host, event["job"])
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                delay = 0.0  # no event for JOB_SYNC seconds: list the jobs again
            except Exception as exc:  # noqa: BLE001 - the host is away: its checker decides
                log.info("host %s job events: %s", host.id, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _sync_jobs(self, host: Host) -> None:
        async with self.session.get(host.url + "/host/jobs") as resp:
            listed = await resp.json(content_type=None) if resp.status == 200 else None
        if not isinstance(listed, dict):
            raise ConnectionError(f"listing jobs: {resp.status}")
        for raw in listed.values():
            self._host_job(host, raw)
        for job in list(self.jobs.values()):
            # a job the host no longer knows at all (its state was lost) has ended
            if job.host_id == host.id and job.state != "pending" and job.id not in listed:
                self._job_ended(job, "failed", error="unknown to its host")
        async with self.session.get(host.url + "/storage/volumes") as resp:
            volumes = await resp.json(content_type=None) if resp.status == 200 else None
        if isinstance(volumes, list):
            host.volumes = volumes
        self.poke()

    def _host_job(self, host: Host, raw: dict[str, Any]) -> None:
        """A host's view of one of its jobs (listed, or from its event stream)."""
        spec = raw.get("job") or {}
        job_id = spec.get("id")
        meta = spec.get("metadata") or {}
        app_id = meta.get("flynn-controller.app")
        if not job_id or not app_id or not meta.get("flynn-controller.release"):
            return  # not a job of the controller's apps
        status = raw.get("status") or "starting"
        job = self.jobs.get(job_id)
        if job is None:
            if status in ENDED:
                return  # a job that ended before this scheduler knew it
            job = Job(
                id=job_id,
                host_id=host.id,
                app_id=app_id,
                app_name=meta.get("flynn-controller.app_name", ""),
                release_id=meta["flynn-controller.release"],
                type=meta.get("flynn-controller.type", ""),
                volume_ids=[
                    v.get("volume")
                    for v in (spec.get("config") or {}).get("volumes") or []
                    if v.get("volume")
                ],  # fmt: skip
            )
            self.jobs[job_id] = job
            if status == "running":
                job.started_at = time.monotonic()
        if status in ENDED:
            if job.state not in ENDED:
                self._job_ended(job, status, raw.get("exit_status"), raw.get("error"))
            return
        registered = raw.get("discoverd_registered") is not False
        if job.state != status or job.registered != registered:
            if status == "running" and job.state != status:
                job.started_at = time.monotonic()
            job.state, job.registered = status, registered
            self._report(job)
            self.poke()

    def _job_ended(
        self,
        job: Job,
        status: str,
        exit_status: int | None = None,
        error: str | None = None,
        backoff: bool = True,
    ) -> None:
        ran = time.monotonic() - job.started_at if job.started_at else 0.0
        job.state, job.exit_status, job.error = status, exit_status, error
        self.jobs.pop(job.id, None)
        self._report(job)
        f = self.formations.get(job.key)
        if (backoff and job.wanted and job.type and f is not None
                and f.processes.get(job.type, 0) > 0):  # fmt: skip
            # it stopped on its own while still wanted: its replacement waits its turn
            r = self.restarts.setdefault((job.key, job.type), Restarts())
            if ran >= RESET_RESTARTS_AFTER:
                r.count = 0
            delay = restart_delay(r.count)
            r.not_before = time.monotonic() + delay
            r.count += 1
            log.info("job %s (%s %s) stopped unexpectedly (%s); restart %d in %.0fs",
                     job.id, job.app_name, job.type, status, r.count, delay)  # fmt: skip
        self.poke()

    # --- reports --------------------------------------------------------------------------
    def _report(self, job: Job) -> None:
        state = HOST_STATE.get(job.state)
        if state == "up" and not job.registered:
            state = "starting"
        if state and state != job.reported:
            job.reported = state
            self.reports.put_nowait(Job(**{**job.__dict__, "volume_ids": list(job.volume_ids)}))

    async def _reporter(self) -> None:
        while True:
            job = await self.reports.get()
            while True:
                try:
                    await self.controller.put_job(job)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the controller is away: retry
                    log.info("reporting job %s: %s; retrying", job.id, exc)
                    await asyncio.sleep(REPORT_RETRY)

    # --- rectifying -----------------------------------------------------------------------
    def active_hosts(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.healthy and not h.shutdown]

    def rectify(self) -> None:
        """Start what the formations miss, stop what they have too much of."""
        if not (self.formations_synced and self.hosts_synced):
            return  # knowing half the picture, rectifying would stop jobs still wanted
        self.rectifications += 1
        now = time.monotonic()
        by_type: dict[tuple[FormationKey, str], list[Job]] = {}
        for job in self.jobs.values():
            if job.type and job.active:
                by_type.setdefault((job.key, job.type), []).append(job)
        for f in self.formations.values():
            for typ, count in f.processes.items():
                if count == 0:
                    # nothing of the type wanted: its restart history ends, and a later
                    # scale-up starts afresh (as Flynn's new jobs carry no restarts)
                    self.restarts.pop((f.key, typ), None)
                jobs = by_type.pop((f.key, typ), [])
                if typ in f.hosts:
                    # a deployment took hosts away from the type: its jobs there stop
                    for job in [j for j in jobs if not f.allows(typ, j.host_id)]:
                        self._stop(job)
                        jobs.remove(job)
                if f.omni(typ):
                    self._rectify_omni(f, typ, count, jobs, now)
                    continue
                diff = count - len(jobs)
                if diff > 0:
                    self._start(f, typ, diff, now)
                elif diff < 0:
                    for job in self._pick_to_stop(jobs, -diff):
                        self._stop(job)
        # jobs of types (or formations) nothing wants any more
        for (key, _), jobs in by_type.items():
            if key in self.formations or key in self.deleted:
                for job in jobs:
                    self._stop(job)

    def _rectify_omni(
        self, f: Formation, typ: str, count: int, jobs: list[Job], now: float
    ) -> None:
        tags = f.tags.get(typ) or {}
        hosts = [h for h in self.active_hosts() if h.matches(tags) and f.allows(typ, h.id)]
        for host in hosts:
            on_host = [j for j in jobs if j.host_id == host.id]
            if len(on_host) < count and not self._host_ports_busy(f, typ, host):
                self._start(f, typ, count - len(on_host), now, only=host)
            for job in self._pick_to_stop(on_host, len(on_host) - count):
                self._stop(job)
        # a host being checked keeps its jobs until it is given up
        away = {h.id for h in self.hosts.values() if not h.healthy and f.allows(typ, h.id)}
        wanted_hosts = {h.id for h in hosts} | away
        for job in jobs:
            if job.host_id not in wanted_hosts:
                self._stop(job)

    def _host_ports_busy(self, f: Formation, typ: str, host: Host) -> bool:
        """A host-network type (its ports are the host's) starts on a host only once the
        app's other jobs of that type there, of any release, are gone: a deployment that
        replaces discoverd on a host stops the old job and starts the new one in one
        formation change, and the new one then also finds the old one's volume free."""
        if not f.host_network(typ):
            return False
        return any(j.app_id == f.key[0] and j.type == typ and j.host_id == host.id
                   and j.key != f.key for j in self.jobs.values())  # fmt: skip

    @staticmethod
    def _pick_to_stop(jobs: list[Job], n: int) -> list[Job]:
        """Flynn's choice: pending jobs first, then the most recently started."""
        if n <= 0:
            return []
        order = sorted(jobs, key=lambda j: (j.state != "pending", -j.started_at))
        return order[:n]

    def _start(self, f: Formation, typ: str, n: int, now: float, only: Host | None = None) -> None:
        r = self.restarts.get((f.key, typ))
        if r is not None and r.not_before > now:
            asyncio.get_running_loop().call_later(r.not_before - now + 0.01, self.poke)
            return
        for _ in range(n):
            host = only or self._place(f, typ)
            if host is None:
                self._blocked(f, typ)
                return
            job = Job(
                id=f"{host.id}-{uuid.uuid4()}",
                host_id=host.id,
                app_id=f.key[0],
                app_name=str(f.app.get("name", "")),
                release_id=f.key[1],
                type=typ,
            )
            self.jobs[job.id] = job
            self.blocked.discard((f.key, typ))
            asyncio.create_task(self._start_job(f, job, host))

    def _blocked(self, f: Formation, typ: str) -> None:
        if (f.key, typ) not in self.blocked:
            log.warning("%s %s: no host can run it: blocked until one can", f.app.get("name"), typ)
        self.blocked.add((f.key, typ))

    def _place(self, f: Formation, typ: str) -> Host | None:
        tags = f.tags.get(typ) or {}
        hosts = [h for h in self.active_hosts() if h.matches(tags) and f.allows(typ, h.id)]
        counts = {h.id: 0 for h in hosts}
        for job in self.jobs.values():
            if job.key == f.key and job.type == typ and job.active and job.host_id in counts:
                counts[job.host_id] += 1
        if f.volumes(typ):
            # a job that had a volume goes back to where its volume is (waiting for that
            # host if it is away), unless that host already runs more of the formation's
            # jobs of the type than another: a new release's jobs take the volumes of the
            # old one's as they stop, and must not pile up on one host doing so
            fewest = min(counts.values(), default=0)
            held = [h for h in self._volume_hosts(f, typ) if f.allows(typ, h.id)]
            for host in held:
                if host.id in counts and counts[host.id] == fewest:
                    return host
            if any(not (h.healthy and not h.shutdown and h.matches(tags)) for h in held):
                return None
        if not hosts:
            return None
        random.shuffle(hosts)
        return min(hosts, key=lambda h: counts[h.id])

    def _volume_hosts(self, f: Formation, typ: str) -> list[Host]:
        """The hosts holding a volume of the app's type that no job uses."""
        in_use = {v for j in self.jobs.values() if j.state in ACTIVE for v in j.volume_ids}
        return [
            host for host in self.hosts.values()
            if any((vol.get("meta") or {}).get("flynn-controller.app") == f.key[0]
                   and (vol.get("meta") or {}).get("flynn-controller.type") == typ
                   and vol.get("id") not in in_use for vol in host.volumes)
        ]  # fmt: skip

    async def _start_job(self, f: Formation, job: Job, host: Host) -> None:
        try:
            if f.artifact is None:
                raise hostapi.ImageError(f"release {f.key[1]} has no artifact")
            image = await hostapi.job_image(host.id, f.artifact, url=host.url)
            volumes = await self._volumes(f, job, host)
            spec = build_job(job_id=job.id, app=f.app, release=f.release, process_type=job.type,
                             image=image, volumes=volumes)  # fmt: skip
            while True:
                status, body = await hostapi.host_request(host.id, "PUT", f"/host/jobs/{job.id}",
                                                          spec, url=host.url)  # fmt: skip
                # a host already starting all it can at once answers 429 "retry shortly": the
                # job waits its turn there, not a failed start's growing delay for its type
                if status != 429 or not job.wanted or self.hosts.get(host.id) is not host:
                    break
                await asyncio.sleep(HOST_BUSY_RETRY)
            if status != 200:
                message = body.get("message") if isinstance(body, dict) else body
                raise hostapi.ImageError(f"host {host.id} refused job {job.id}: {message}")
            if job.state == "pending":
                job.state = "starting"
                self._report(job)
            if r := self.restarts.get((f.key, job.type)):
                r.failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - placed again after a delay
            log.warning("starting %s %s on %s: %s", f.app.get("name"), job.type, host.id, exc)
            if self.jobs.get(job.id) is job and job.state == "pending":
                del self.jobs[job.id]
                r = self.restarts.setdefault((f.key, job.type), Restarts())
                r.failures += 1
                delay = min(0.5 * r.failures, START_RETRY_CAP)
                r.not_before = time.monotonic() + delay
                asyncio.get_running_loop().call_later(delay, self.poke)

    async def _volumes(self, f: Formation, job: Job, host: Host) -> list[dict[str, Any]]:
        out = []
        in_use = {v for j in self.jobs.values() if j.state in ACTIVE for v in j.volume_ids}
        for vol in f.volumes(job.type):
            found = next((v for v in host.volumes
                          if v.get("id") not in in_use
                          and (v.get("meta") or {}).get("flynn-controller.app") == f.key[0]
                          and (v.get("meta") or {}).get("flynn-controller.type") == job.type
                          and (v.get("meta") or {}).get("flynn-controller.path") == vol["path"]),
                         None)  # fmt: skip
            if found is None:
                meta = {"flynn-controller.app": f.key[0],
                        "flynn-controller.app_name": str(f.app.get("name", "")),
                        "flynn-controller.type": job.type,
                        "flynn-controller.path": vol["path"]}  # fmt: skip
                status, found = await hostapi.host_request(
                    host.id, "POST", "/storage/providers/default/volumes", {"meta": meta},
                    url=host.url,
                )  # fmt: skip
                if status != 200:
                    raise hostapi.ImageError(f"host {host.id}: creating a volume: {found}")
                host.volumes.append(found)
            job.volume_ids.append(found["id"])
            out.append({"target": vol["path"], "volume": found["id"], "writeable": True,
                        "delete_on_stop": bool(vol.get("delete_on_stop"))})  # fmt: skip
        return out

    def _stop(self, job: Job) -> None:
        if not job.wanted:
            return
        job.wanted = False
        host = self.hosts.get(job.host_id)
        log.info("stopping job %s (%s %s) on %s", job.id, job.app_name, job.type, job.host_id)
        if host is not None:
            asyncio.create_task(self._stop_job(job, host))

    async def _stop_job(self, job: Job, host: Host) -> None:
        with contextlib.suppress(Exception):
            if await self._drained_routes(job):
                await self._drain(job, host)
        for attempt in range(1, 6):
            try:
                status, _ = await hostapi.host_request(host.id, "DELETE", f"/host/jobs/{job.id}",
                                                       url=host.url)  # fmt: skip
                if status in (200, 404):
                    if status == 404 and self.jobs.get(job.id) is job:
                        self._job_ended(job, "done")
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried; a lost host ends it anyway
                log.info("stopping job %s: %s", job.id, exc)
            await asyncio.sleep(min(0.5 * attempt, 5))

    async def _drained_routes(self, job: Job) -> bool:
        """Whether a route of the job's app with `drain_backends` leads to its service."""
        f = self.formations.get(job.key)
        if f is None:
            return False
        proc = (f.release.get("processes") or {}).get(job.type) or {}
        services = set()
        for port in proc.get("ports") or []:
            svc = port.get("service")
            services.add(svc.get("name") if isinstance(svc, dict) else svc)
        if not services - {None, ""}:
            return False
        routes = await self.controller.routes(job.app_id)
        return any(r.get("drain_backends") and r.get("service") in services for r in routes)

    async def _drain(self, job: Job, host: Host) -> None:
        """Take the job out of discoverd, then wait until every router says its backend
        drained (`backend-drained` on its `router-api` event stream: its requests in flight
        are done), at most DRAIN_TIMEOUT; no router, no wait. The streams are opened before
        the deregistration, so that a router with nothing in flight, which says so at once,
        is heard."""
        routers = await self.discoverd.instances("router-api") if self.discoverd else []
        async with contextlib.AsyncExitStack() as stack:
            streams = []
            for r in routers:
                try:
                    stream = self.session.get(
                        f"http://{r.addr}/events?types=backend-drained",
                        headers={"Accept": "text/event-stream"},
                        timeout=STREAM_TIMEOUT,
                    )
                    resp = await stack.enter_async_context(stream)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.info("router %s: %s; not waiting for it to drain %s", r.addr, exc, job.id)
                    continue
                if resp.status == 200:
                    streams.append(resp)
            await hostapi.host_request(host.id, "PUT",
                                       f"/host/jobs/{job.id}/discoverd-deregister",
                                       url=host.url)  # fmt: skip

            async def drained(resp: aiohttp.ClientResponse) -> None:
                async for event in sse_data(resp):
                    if event.get("event") == "backend-drained" and job.id in (
                        event.get("job_id"),
                        (event.get("backend") or {}).get("job_id"),
                    ):
                        return

            if streams:
                waits = [asyncio.create_task(drained(r)) for r in streams]
                done, _ = await asyncio.wait(waits, timeout=DRAIN_TIMEOUT)
                for w in waits:
                    w.cancel()
                log.info("job %s drained by %d of %d routers", job.id, len(done), len(streams))

    async def _delete_volumes(self, app_id: str) -> None:
        if any(k[0] == app_id for k in self.formations):
            return  # another release of the app still runs
        await asyncio.sleep(2)  # its jobs stop first
        for host in list(self.hosts.values()):
            for vol in list(host.volumes):
                if (vol.get("meta") or {}).get("flynn-controller.app") != app_id:
                    continue
                with contextlib.suppress(Exception):
                    status, _ = await hostapi.host_request(
                        host.id, "DELETE", f"/storage/volumes/{vol['id']}", url=host.url
                    )
                    if status in (200, 404):
                        host.volumes.remove(vol)

    # --- what it believes -----------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "formations_synced": self.formations_synced,
            "hosts_synced": self.hosts_synced,
            "rectifications": self.rectifications,
            "hosts": {
                h.id: {
                    "url": h.url,
                    "tags": h.tags,
                    "shutdown": h.shutdown,
                    "healthy": h.healthy,
                    "failed_checks": h.checks,
                    "volumes": len(h.volumes),
                }
                for h in self.hosts.values()
            },  # fmt: skip
            "formations": [
                {
                    "app": f.app.get("name"),
                    "app_id": f.key[0],
                    "release": f.key[1],
                    "processes": f.processes,
                    "tags": f.tags,
                }
                for f in self.formations.values()
            ],  # fmt: skip
            "jobs": [j.to_json() for j in self.jobs.values()],
            "blocked": [{"app": k[0], "release": k[1], "type": t} for k, t in self.blocked],
            "restarts": [
                {"app": k[0], "release": k[1], "type": t, "count": r.count}
                for (k, t), r in self.restarts.items()
            ],  # fmt: skip
        }
