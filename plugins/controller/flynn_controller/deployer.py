"""The deployer: the `deployment` task, which moves a running app from its old release to the
new one with the app's strategy, watching the jobs the scheduler starts and stops.

A strategy only ever writes formations (the scheduler turns them into jobs) and waits for
what the scheduler reports, as `job` events and rows of `jobs`:

- `all-at-once` (the default): the new release gets the old counts; once every new job is up
  the release becomes current and the old release is scaled to 0 (not waited for);
- `one-by-one`: per process type (sorted), one new job (wait until up), then one old job
  fewer (wait until down), until the new release has the counts and the old none;
- `one-down-one-up`: the same, stopping an old job before starting a new one;
- `in-batches`: one-by-one, a batch at a time: app meta `flynn-deploy-batch-size`, or the
  number of hosts;
- `discoverd-meta` (`deploy_discoverd.py`): each omni type host by host, the old job on a
  host stopped and the new one started there in one formation change, the next host once
  the new discoverd node serves and its etcd member is healthy;
- `sirenia`, also called `postgres` (`deploy_sirenia.py`): a database appliance node by
  node from its Patroni state, standbys first, the primary handed over by a switchover.

Waiting reads the app's `job` events from the events table after a cursor (this process's
EventHub only says when to look), so a lost notification delays a step but never loses a
job; the counts that end a wait come from `jobs`. Each job the deployer sees becomes a
`running` deployment event with `job_type` and `job_state`. A new job that goes down more
than MAX_NEW_JOB_CRASHES times fails the deployment; so does a step with no progress for the
deployment's `deploy_timeout` seconds. A failure rolls back: the old release gets its counts
back, the new one 0, the app's release stays, and the deployment is `failed` with the reason.
The last step of every strategy (release current, old scaled to 0, `complete`) is one
transaction, so the app's release changes only with a complete deployment.

Every step starts from the formations as stored, so a deployment whose worker died is
resumed where it stood by the worker that takes its task next (`tasks.py`); after
MAX_ATTEMPTS lost workers it is rolled back and failed as interrupted instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from flynn_controller import deploylog, hosts, tasks
from flynn_controller.api import APP_COLUMNS, HUB
from flynn_controller.events import EventFilter, EventHub, Subscription, emit, newest_id
from flynn_controller.formations import KEEP, put_formation_row
from flynn_controller.releases import RELEASE_COLUMNS, set_app_release
from flynn_controller.types import DEFAULT_DEPLOY_TIMEOUT, DEPLOYMENT_TRANSITIONS

log = logging.getLogger("flynn_controller.deployer")

DEPLOYMENT_COLUMNS = (
    "deployment_id, app_id, old_release_id, new_release_id, strategy, status, processes,"
    " deploy_timeout, created_at, finished_at"
)
MAX_NEW_JOB_CRASHES = 5  # a new job may go down this often in one deployment, not more
BATCH_SIZE_META = "flynn-deploy-batch-size"
RECHECK = 2.0  # seconds between looks at the jobs without a notification
POLL = 0.5  # seconds between looks at what has no notification (a database's state)
# what a look at another component raises while that component is away: not done yet
UNREACHABLE = (OSError, aiohttp.ClientError, TimeoutError, hosts.HostUnknown,
               hosts.HostsUnreachable)  # fmt: skip
EVENT_BATCH = 1000
ALIVE_STATES = ("pending", "blocked", "starting", "up", "stopping")
DOWN_STATES = ("down", "crashed", "failed")
# the job states a deployment event names (the 2015 clients know these four)
DEPLOY_JOB_STATE = {"starting": "starting", "up": "up", "stopping": "stopping",
                    "down": "down", "crashed": "down", "failed": "down"}  # fmt: skip


class DeployFailed(Exception):
    """The deployment cannot go on: roll back (unless `rollback` is False) and fail it."""

    def __init__(self, reason: str, rollback: bool = True) -> None:
        super().__init__(reason)
        self.rollback = rollback


# --- deployment rows and events ------------------------------------------------------------
async def advance(
    conn: asyncpg.Connection, row: asyncpg.Record, status: str, error: str | None = None
) -> asyncpg.Record:
    """Move a deployment to `status` along DEPLOYMENT_TRANSITIONS, with its event."""
    if status not in DEPLOYMENT_TRANSITIONS[row["status"]]:
        raise ValueError(f"deployment {row['deployment_id']}: {row['status']} -> {status}")
    row = await conn.fetchrow(
        "UPDATE deployments SET status = $2,"
        " finished_at = CASE WHEN $2 IN ('complete', 'failed') THEN now() END"
        f" WHERE deployment_id = $1 RETURNING {DEPLOYMENT_COLUMNS}",
        row["deployment_id"],
        status,
    )
    await deployment_event(conn, row, status, error)
    return row


async def deployment_event(
    conn: asyncpg.Connection,
    row: asyncpg.Record,
    status: str,
    error: str | None = None,
    job: dict[str, Any] | None = None,
) -> None:
    """A `deployment` event: a change of status (once per status), or with `job` a job the
    deployment saw change state (once per job and state)."""
    data: dict[str, Any] = {
        "app": str(row["app_id"]),
        "deployment": str(row["deployment_id"]),
        "release": str(row["new_release_id"]),
        "status": status,
    }
    unique_id = f"{row['deployment_id']}|{status}"
    if job is not None:
        data["job_type"] = job["type"]
        data["job_state"] = DEPLOY_JOB_STATE[job["state"]]
        unique_id = f"{row['deployment_id']}|{job['id']}|{data['job_state']}"
    if error:
        data["error"] = error
    emitted = await emit(
        conn,
        "deployment",
        str(row["deployment_id"]),
        data,
        app_id=str(row["app_id"]),
        unique_id=unique_id,
    )
    if emitted:
        deploylog.note(row, status, job, error)


async def _locked(conn: asyncpg.Connection, deployment_id: Any) -> asyncpg.Record | None:
    """The deployment, locked, if it is not finished."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE deployment_id = $1"
        " AND finished_at IS NULL FOR UPDATE",
        deployment_id,
    )
    return row


# --- the task --------------------------------------------------------------------------------
@tasks.handler("deployment")
async def run_deployment(
    db: asyncpg.Pool, args: dict[str, Any], attempt: int, app_: web.Application
) -> None:
    try:
        deployer = await Deployer.load(db, app_.get(HUB), args["id"])
        if deployer is not None:
            await deployer.run(attempt)
    except Exception as exc:
        if attempt < tasks.MAX_ATTEMPTS:
            raise
        log.exception("deployment %s", args["id"])
        await fail(db, args["id"], f"deployment error: {exc or type(exc).__name__}")


async def fail(db: asyncpg.Pool, deployment_id: Any, reason: str, rollback: bool = True) -> None:
    """Roll back (the old release's counts restored, the new release's types at 0; the
    app's release untouched) and mark the deployment `failed` with `reason`, in one
    transaction."""
    async with db.acquire() as conn, conn.transaction():
        row = await _locked(conn, deployment_id)
        if row is None:
            return
        app = await conn.fetchrow(
            f"SELECT {APP_COLUMNS}, deleted_at FROM apps WHERE app_id = $1 FOR UPDATE",
            row["app_id"],
        )
        old_id, new_id = row["old_release_id"], row["new_release_id"]
        if rollback and app["deleted_at"] is None and old_id is not None and old_id != new_id:
            processes = row["processes"] or {}
            old, new = await _release(conn, old_id), await _release(conn, new_id)
            await _write_counts(conn, app, old, processes, hosts=None)
            if await _formation(conn, row["app_id"], new_id) is not None:
                await _write_counts(conn, app, new, {t: 0 for t in processes}, hosts=None)
        log.info("deployment %s failed: %s", deployment_id, reason)
        await advance(conn, row, "failed", reason)


async def _release(conn: asyncpg.Connection | asyncpg.Pool, release_id: Any) -> asyncpg.Record:
    row: asyncpg.Record = await conn.fetchrow(
        f"SELECT {RELEASE_COLUMNS} FROM releases WHERE release_id = $1", release_id
    )
    return row


async def _formation(
    conn: asyncpg.Connection | asyncpg.Pool, app_id: Any, release_id: Any
) -> asyncpg.Record | None:
    """A live formation's (processes, tags, hosts), or None."""
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT processes, tags, hosts FROM formations WHERE app_id = $1 AND release_id = $2"
        " AND deleted_at IS NULL",
        app_id,
        release_id,
    )
    return row


async def _write_counts(
    conn: asyncpg.Connection,
    app: asyncpg.Record,
    release: asyncpg.Record,
    counts: dict[str, int],
    tags: Any = None,
    hosts: dict[str, list[str] | None] | None = KEEP,
) -> None:
    """Set these types' counts in a release's formation (others kept); no write when
    nothing changes. `hosts`: these types' host restrictions (a type's None lifts its
    own), None lifts them all, KEEP leaves them."""
    current = await _formation(conn, app["app_id"], release["release_id"])
    processes = dict((current["processes"] or {}) if current is not None else {})
    merged = {**processes, **counts}
    old_hosts = dict((current["hosts"] or {}) if current is not None else {})
    new_hosts: dict[str, Any] = old_hosts
    if hosts is None:
        new_hosts = {}
    elif hosts is not KEEP:
        new_hosts = {**old_hosts, **hosts}
        new_hosts = {t: h for t, h in new_hosts.items() if h is not None}
    if current is not None and merged == processes and new_hosts == old_hosts:
        return
    if current is not None:
        tags = current["tags"]
    await put_formation_row(conn, app, release, merged, tags, new_hosts)


# --- one deployment's run ----------------------------------------------------------------------
@dataclass
class Deployer:
    pool: asyncpg.Pool
    hub: EventHub | None
    row: asyncpg.Record
    old: asyncpg.Record | None
    new: asyncpg.Record
    meta: dict[str, Any]
    hosts: int = 1
    cursor: int = 0  # the last job event looked at
    crashes: collections.Counter[str] = field(default_factory=collections.Counter)
    # set while a strategy moves back to the old release itself (new jobs crashing then are
    # what it is undoing, not a reason to fail again)
    rolling_back: bool = False

    @classmethod
    async def load(
        cls, db: asyncpg.Pool, hub: EventHub | None, deployment_id: Any
    ) -> Deployer | None:
        row = await db.fetchrow(
            f"SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE deployment_id = $1",
            deployment_id,
        )
        if row is None or row["finished_at"] is not None:
            return None
        old = await _release(db, row["old_release_id"]) if row["old_release_id"] else None
        meta = await db.fetchval("SELECT meta FROM apps WHERE app_id = $1", row["app_id"])
        return cls(db, hub, row, old, await _release(db, row["new_release_id"]), meta or {})

    @property
    def id(self) -> Any:
        return self.row["deployment_id"]

    @property
    def processes(self) -> dict[str, int]:
        return dict(self.row["processes"] or {})

    @property
    def timeout(self) -> float:
        return float(self.row["deploy_timeout"] or DEFAULT_DEPLOY_TIMEOUT)

    async def run(self, attempt: int) -> None:
        try:
            if attempt > tasks.MAX_ATTEMPTS:
                raise DeployFailed(
                    f"deployment interrupted: the worker running it was lost {attempt - 1} times"
                )
            run_strategy = strategy(self.row["strategy"])
            if run_strategy is None:
                raise DeployFailed(f"unknown strategy {self.row['strategy']!r}", rollback=False)
            self.cursor = await newest_id(self.pool)
            self.hosts = await count_hosts()
            async with self.pool.acquire() as conn, conn.transaction():
                row = await _locked(conn, self.id)
                if row is None:
                    return
                if row["status"] == "pending":
                    self.row = await advance(conn, row, "running")
                else:
                    log.info("deployment %s: resuming from the formations as they are", self.id)
            if self.old is None or self.old["release_id"] == self.new["release_id"]:
                return await self.finish()
            log.info("deployment %s: %s, %s", self.id, self.row["strategy"], self.processes)
            await run_strategy(self)
        except DeployFailed as exc:
            await fail(self.pool, self.id, str(exc), exc.rollback)

    # --- formations ---------------------------------------------------------------------------
    async def counts(self, release: asyncpg.Record) -> dict[str, int]:
        f = await _formation(self.pool, self.row["app_id"], release["release_id"])
        return dict((f["processes"] or {}) if f is not None else {})

    async def scale(
        self,
        release: asyncpg.Record,
        counts: dict[str, int],
        hosts: dict[str, list[str] | None] | None = KEEP,
    ) -> None:
        """Set these types' counts (and host restrictions: `_write_counts`) in a release's
        formation (a new formation takes the old one's tags)."""
        await self.scale_many([(release, counts, hosts)])

    async def scale_many(self, changes: list[tuple[asyncpg.Record, dict[str, int], Any]]) -> None:
        """Several `scale`s in one transaction: the scheduler sees them together."""
        async with self.pool.acquire() as conn, conn.transaction():
            app = await self._lock_app(conn)
            tags = None
            if self.old is not None:
                old_f = await _formation(conn, self.row["app_id"], self.old["release_id"])
                tags = old_f["tags"] if old_f is not None else None
            for release, counts, hosts in changes:
                await _write_counts(conn, app, release, counts, tags, hosts)

    async def _lock_app(self, conn: asyncpg.Connection) -> asyncpg.Record:
        if await _locked(conn, self.id) is None:
            raise DeployFailed("the deployment was finished elsewhere", rollback=False)
        app = await conn.fetchrow(
            f"SELECT {APP_COLUMNS}, deleted_at FROM apps WHERE app_id = $1 FOR UPDATE",
            self.row["app_id"],
        )
        if app["deleted_at"] is not None:
            raise DeployFailed("the app was deleted", rollback=False)
        return app

    async def finish(self) -> None:
        """New release at the deployment's counts and current, old at 0, `complete`: one
        transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            app = await self._lock_app(conn)
            if self.old is not None and self.old["release_id"] != self.new["release_id"]:
                await _write_counts(conn, app, self.new, self.processes, hosts=None)
                old = await _formation(conn, self.row["app_id"], self.old["release_id"])
                if old is not None:
                    zeros = dict.fromkeys(old["processes"] or {}, 0)
                    await _write_counts(conn, app, self.old, zeros, hosts=None)
            await set_app_release(conn, app, self.new)
            row = await _locked(conn, self.id)
            assert row is not None  # locked by _lock_app in this transaction
            await advance(conn, row, "complete")
        log.info("deployment %s complete", self.id)

    # --- waiting for jobs ---------------------------------------------------------------------
    def expected(self, release: asyncpg.Record, typ: str, count: int) -> int:
        """Jobs a count means: omni types run `count` on every host."""
        proc = (release["processes"] or {}).get(typ) or {}
        return count * self.hosts if proc.get("omni") else count

    async def wait_up(self, release: asyncpg.Record, counts: dict[str, int]) -> None:
        """Until each type has at least its count of jobs of `release` up."""
        await self._wait(release, counts, up=True)

    async def wait_down(self, release: asyncpg.Record, counts: dict[str, int]) -> None:
        """Until each type has at most its count of jobs of `release` not yet down."""
        await self._wait(release, counts, up=False)

    async def _wait(self, release: asyncpg.Record, counts: dict[str, int], up: bool) -> None:
        want = {t: self.expected(release, t, n) for t, n in counts.items()}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        best: int | None = None
        sub = self._subscribe()
        try:
            while True:
                await self.follow_jobs()
                have = await self.job_counts(release, up)
                if all((have.get(t, 0) >= n) if up else (have.get(t, 0) <= n)
                       for t, n in want.items()):  # fmt: skip
                    await self.follow_jobs()  # the events of the jobs just counted
                    return
                progress = sum(have.get(t, 0) for t in want) * (1 if up else -1)
                if best is None or progress > best:
                    best, deadline = progress, loop.time() + self.timeout
                if loop.time() >= deadline:
                    raise DeployFailed(self._timeout_reason(release, want, have, up))
                sub = await self._pause(sub, min(RECHECK, deadline - loop.time()))
        finally:
            if sub is not None and self.hub is not None:
                self.hub.unsubscribe(sub)

    async def wait_until(
        self, what: str, check: Callable[[], Awaitable[str | None]], within: float = 0.0
    ) -> None:
        """Until `check()` returns None; meanwhile it returns what is still missing (said
        when the wait times out, after `within` s, default the deploy timeout). A check
        that cannot reach what it asks (a connection refused, a timeout) is not done yet.
        Job events are passed on meanwhile."""
        timeout = within or self.timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sub = self._subscribe()
        try:
            while True:
                await self.follow_jobs()
                try:
                    missing = await check()
                except UNREACHABLE as exc:
                    missing = f"{type(exc).__name__}: {exc}"
                if missing is None:
                    return
                if loop.time() >= deadline:
                    raise DeployFailed(
                        f"timed out after {timeout:g}s waiting for {what}: {missing}"
                    )
                sub = await self._pause(sub, min(POLL, deadline - loop.time()))
        finally:
            if sub is not None and self.hub is not None:
                self.hub.unsubscribe(sub)

    async def jobs(self, release: asyncpg.Record, typ: str, states: tuple[str, ...]) -> list[Any]:
        """The release's jobs of `typ` in these states: (job id, host id, state) rows."""
        rows: list[Any] = await self.pool.fetch(
            "SELECT job_id, host_id, state FROM jobs WHERE app_id = $1 AND release_id = $2"
            " AND process_type = $3 AND state = ANY($4) ORDER BY created_at",
            self.row["app_id"],
            release["release_id"],
            typ,
            list(states),
        )
        return rows

    def _subscribe(self) -> Subscription | None:
        if self.hub is None:
            return None
        return self.hub.subscribe(
            EventFilter(app_id=str(self.row["app_id"]), object_types=frozenset({"job"}))
        )

    async def _pause(self, sub: Subscription | None, seconds: float) -> Subscription | None:
        """Until a job event of the app is announced, or `seconds` pass."""
        if sub is None:
            await asyncio.sleep(seconds)
            return self._subscribe()
        with contextlib.suppress(TimeoutError):
            item = await asyncio.wait_for(sub.queue.get(), max(seconds, 0.0))
            while item is not None and not sub.queue.empty():
                item = sub.queue.get_nowait()
            if item is None:  # the stream ended (overflow, hub closing): subscribe again
                assert self.hub is not None
                self.hub.unsubscribe(sub)
                return self._subscribe()
        return sub

    def _timeout_reason(
        self, release: asyncpg.Record, want: dict[str, int], have: dict[str, int], up: bool
    ) -> str:
        which = "new" if release["release_id"] == self.new["release_id"] else "old"
        parts = ", ".join(
            f"{t}: {have.get(t, 0)} {'up' if up else 'running'}, want {'' if up else 'at most '}{n}"
            for t, n in sorted(want.items())
        )
        goal = "come up" if up else "stop"
        return (
            f"timed out after {self.timeout:g}s waiting for {which} jobs to {goal}"
            f" (release {release['release_id']}: {parts})"
        )

    async def job_counts(self, release: asyncpg.Record, up: bool) -> dict[str, int]:
        """Per type, the release's jobs that are up (`up`), or not yet down."""
        states = ["up"] if up else list(ALIVE_STATES)
        rows = await self.pool.fetch(
            "SELECT process_type, count(*) AS n FROM jobs WHERE app_id = $1 AND release_id = $2"
            " AND state = ANY($3) GROUP BY process_type",
            self.row["app_id"],
            release["release_id"],
            states,
        )
        return {r["process_type"]: r["n"] for r in rows}

    async def follow_jobs(self) -> None:
        """Pass on the job events of both releases since the cursor as deployment events,
        and count the new release's jobs that went down."""
        releases = {str(self.new["release_id"])}
        if self.old is not None:
            releases.add(str(self.old["release_id"]))
        while True:
            rows = await self.pool.fetch(
                "SELECT event_id, data FROM events WHERE app_id = $1 AND object_type = 'job'"
                " AND event_id > $2 ORDER BY event_id LIMIT $3",
                self.row["app_id"],
                self.cursor,
                EVENT_BATCH,
            )
            if not rows:
                return
            seen = [r["data"] for r in rows if (r["data"] or {}).get("release") in releases]
            seen = [j for j in seen if j.get("state") in DEPLOY_JOB_STATE and j.get("type")]
            if seen:
                async with self.pool.acquire() as conn, conn.transaction():
                    for job in seen:
                        await deployment_event(conn, self.row, "running", job=job)
            self.cursor = rows[-1]["event_id"]
            for job in seen:
                if job["release"] == str(self.new["release_id"]) and job["state"] in DOWN_STATES:
                    self._crashed(job)
            if len(rows) < EVENT_BATCH:
                return

    def _crashed(self, job: dict[str, Any]) -> None:
        if self.rolling_back:
            return
        typ = job["type"]
        self.crashes[typ] += 1
        if self.crashes[typ] > MAX_NEW_JOB_CRASHES:
            detail = ""
            if job.get("exit_status") is not None:
                detail = f", the last with exit status {job['exit_status']}"
            if job.get("host_error"):
                detail = f", the last with: {job['host_error']}"
            raise DeployFailed(
                f"New job of type {typ} crashed: {self.crashes[typ]} new {typ} jobs went down"
                f" during the deployment{detail}"
            )

    def batch_size(self) -> int:
        raw = self.meta.get(BATCH_SIZE_META)
        try:
            size = int(raw) if raw not in (None, "") else 0
        except (TypeError, ValueError):
            size = 0
        return size if size > 0 else max(self.hosts, 1)


async def count_hosts() -> int:
    """The cluster's hosts (1 outside a cluster, or when discoverd does not answer)."""
    try:
        return max(len(await hosts.list_hosts()), 1)
    except Exception as exc:  # noqa: BLE001 - a guess is better than no deployment
        log.warning("counting hosts: %s; assuming 1", exc)
        return 1


# --- strategies ----------------------------------------------------------------------------------
async def all_at_once(d: Deployer) -> None:
    await d.scale(d.new, d.processes)
    await d.wait_up(d.new, {t: n for t, n in d.processes.items() if n})
    await d.finish()  # from here on a failure rolls nothing back: the new jobs are up


async def one_by_one(d: Deployer, batch: int = 1, down_first: bool = False) -> None:
    await replace_types(d, sorted(d.processes), batch, down_first)
    await d.finish()


async def replace_types(
    d: Deployer, types: list[str], batch: int = 1, down_first: bool = False
) -> None:
    """Per type, in steps of `batch`: start new jobs, then stop as many old (or, with
    `down_first`, the other way round). Each round first waits for the formations as they
    stand, so a resumed deployment finishes the step its lost worker was in, then takes
    the next step from the counts: never more than count + batch jobs (count - batch
    with `down_first`)."""
    assert d.old is not None
    for typ in types:
        target = d.processes[typ]
        while True:
            new = (await d.counts(d.new)).get(typ, 0)
            old = (await d.counts(d.old)).get(typ, 0)
            await d.wait_up(d.new, {typ: new})
            await d.wait_down(d.old, {typ: old})
            if new >= target and old == 0:
                break
            surplus = new + old - target
            if old > 0 and (surplus > 0 or (down_first and surplus == 0)):
                fewer = min(batch, old, surplus) if surplus > 0 else min(batch, old)
                await d.scale(d.old, {typ: old - fewer})
            else:
                await d.scale(d.new, {typ: new + min(batch, target - new)})


async def one_down_one_up(d: Deployer) -> None:
    await one_by_one(d, down_first=True)


async def in_batches(d: Deployer) -> None:
    await one_by_one(d, batch=d.batch_size())


Strategy = Callable[[Deployer], Awaitable[None]]
STRATEGIES: dict[str, Strategy] = {
    "all-at-once": all_at_once,
    "one-by-one": one_by_one,
    "one-down-one-up": one_down_one_up,
    "in-batches": in_batches,
}


def strategy(name: str) -> Strategy | None:
    """The strategy of that name. `discoverd-meta` and `sirenia` (`postgres`) live in modules
    of their own that build on this one, so they are imported here, when first asked for:
    at the top they would make an import cycle."""
    from flynn_controller.deploy_discoverd import discoverd_meta
    from flynn_controller.deploy_sirenia import sirenia

    more: dict[str, Strategy] = {"discoverd-meta": discoverd_meta, "sirenia": sirenia,
                                 "postgres": sirenia}  # fmt: skip
    return {**STRATEGIES, **more}.get(name)
