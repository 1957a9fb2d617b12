"""The `sirenia` strategy (also called `postgres`): a database appliance of a primary, a
synchronous standby and asynchronous standbys (the postgres appliance: Patroni nodes, each
registered in discoverd) replaced node by node without losing an acknowledged write and with
never more than one node down.

The state comes from Patroni's REST API (`GET /cluster` of any node, found through the
appliance's discoverd service): each member's role (`leader`, `sync_standby`, `replica` =
asynchronous), state and lag, and its name, which is its job's id. The jobs table says which
release each job runs. Then, one step at a time (`next_step`, a pure function of that
picture), each only when every member runs, every standby replicates within `MAX_LAG` and
every running job of the type is a member:

1. a new-release node starts (its formation one more) and is waited for until it has joined
   and replicates;
2. an old node is stopped: the asynchronous standbys first, then the synchronous one (the
   old formation one fewer and, in the same write, its `hosts` no longer naming the node's
   host: the scheduler stops exactly that job);
3. while new nodes are missing, 1 and 2 alternate; the old primary goes last: a Patroni
   switchover to the synchronous standby, which is a new node by then, and, once discoverd's
   leader is the new primary, the old node is stopped as in 2.

Other process types of the app (the provider API) then go one by one.

Refused at the start, with the reason, before anything changes: a singleton (`SINGLETON`), a
count under 3, an appliance whose members do not match the formation (one leader, one
synchronous standby, at least one asynchronous, as many members as the count), or old nodes
sharing a host (a node is stopped by taking its host away from the old formation).

A failure before the primary moved replaces the new nodes by old ones the same way (node by
node, the roles swapped), then fails the deployment (its rollback restores whatever that could
not). Once the primary is a new node, nothing is rolled back: the deployment fails and says
so, and a new deployment (or the same one resumed) finishes the move. Every step starts from
the appliance and formations as they are, so a deployment whose worker was lost (the
switchover cuts the controller's own database connections) resumes where it stood.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from flynn_discoverd.client import Client, DiscoverdError, UnreachableError
from flynn_postgres.types import DEFAULT_API_PORT, REST_USER

from flynn_controller.deployer import (
    ALIVE_STATES,
    Deployer,
    DeployFailed,
    replace_types,
)

log = logging.getLogger("flynn_controller.deployer")

# a standby further behind than this (bytes of WAL) is not caught up: Patroni's own default
# `maximum_lag_on_failover`, the most it would accept for a switchover
MAX_LAG = 1024 * 1024
STANDBY_STATES = ("running", "streaming")  # Patroni 3.0.2 says running, later streaming
LEADER_ROLES = ("leader", "standby_leader")
MIN_NODES = 3
# a new node copies the primary's data before it replicates, and a switchover takes Patroni
# several loops: these waits get at least this long, whatever the deploy timeout
JOIN_TIMEOUT = 120.0
HTTP = aiohttp.ClientTimeout(total=5)
SWITCHOVER_HTTP = aiohttp.ClientTimeout(total=60)
# the order old nodes are stopped in: asynchronous standbys, the synchronous one, the primary
STOP_ORDER = {"replica": 0, "sync_standby": 1}


@dataclass(frozen=True)
class Member:
    """A Patroni member, with its job's release and host (None: no running job known)."""

    name: str
    job_id: str
    role: str
    state: str
    lag: int | None
    api_url: str
    release: str | None = None
    host_id: str | None = None

    @property
    def leader(self) -> bool:
        return self.role in LEADER_ROLES

    @property
    def healthy(self) -> bool:
        if self.leader:
            return self.state == "running"
        return self.state in STANDBY_STATES and self.lag is not None and self.lag <= MAX_LAG

    def describe(self) -> str:
        lag = "" if self.leader else f", lag {self.lag if self.lag is not None else 'unknown'}"
        return f"{self.name} ({self.role}, {self.state}{lag})"


@dataclass(frozen=True)
class Job:
    job_id: str
    host_id: str
    release: str
    state: str


@dataclass(frozen=True)
class Step:
    """What to do next: `start` a node of `into`, `stop` member, `drop` a node being replaced
    that has no running job, `switchover` from member to candidate, `done`, or `wait` (for
    `reason`)."""

    kind: str
    reason: str = ""
    member: Member | None = None
    candidate: Member | None = None


def members_of(cluster: dict[str, Any], jobs: list[Job], names: dict[str, str]) -> list[Member]:
    """`GET /cluster`'s members with their jobs; `names` maps a member name to its job id
    where they differ (POSTGRES_ID set), from discoverd's instances."""
    by_id = {j.job_id: j for j in jobs}
    out = []
    for raw in cluster.get("members") or []:
        name = str(raw.get("name", ""))
        job = by_id.get(names.get(name, name))
        lag = raw.get("lag")
        out.append(
            Member(
                name=name,
                job_id=names.get(name, name),
                role=str(raw.get("role", "")),
                state=str(raw.get("state", "")),
                lag=lag if isinstance(lag, int) else None,
                api_url=str(raw.get("api_url", "")),
                release=job.release if job else None,
                host_id=job.host_id if job else None,
            )
        )
    return out


def refusal(members: list[Member], count: int, singleton: bool) -> str | None:
    """Why the appliance cannot be deployed node by node (None: it can)."""
    if singleton:
        return "the appliance is a singleton (SINGLETON=true): one node cannot be replaced safely"
    if count < MIN_NODES:
        return (
            f"the appliance runs {count} node(s): a deployment needs at least {MIN_NODES}"
            " (a primary, a synchronous and an asynchronous standby)"
        )
    leaders = [m for m in members if m.leader]
    syncs = [m for m in members if m.role == "sync_standby"]
    asyncs = [m for m in members if m.role == "replica"]
    if len(leaders) != 1:
        return f"the appliance has {len(leaders)} primaries, not 1: {_names(members)}"
    if len(syncs) != 1:
        return f"the appliance has {len(syncs)} synchronous standbys, not 1: {_names(members)}"
    if not asyncs:
        return f"the appliance has no asynchronous standby: {_names(members)}"
    if 2 + len(asyncs) != count or len(members) != count:
        return (
            f"the appliance has {len(members)} members ({_names(members)}) but its formation"
            f" asks for {count}"
        )
    unhealthy = [m for m in members if not m.healthy]
    if unhealthy:
        return "not every node is healthy: " + ", ".join(m.describe() for m in unhealthy)
    return None


def _names(members: list[Member]) -> str:
    return ", ".join(m.describe() for m in members) or "none"


def next_step(
    members: list[Member],
    jobs: list[Job],
    into: str,
    counts: dict[str, int],
    target: int,
) -> Step:
    """The next step toward `target` nodes of release `into` and none of the other one.
    `jobs`: the type's running jobs (any release); `counts`: both formations' counts of
    the type, by release."""
    # a member whose job is down has stopped: Patroni keeps its key until its lease lapses
    # (10 s), which is no reason to wait
    members = [m for m in members if m.release is not None]
    leaders = [m for m in members if m.leader]
    if len(leaders) != 1 or leaders[0].state != "running":
        return Step("wait", f"no running primary: {_names(members)}")
    for m in members:
        if not m.healthy:
            return Step("wait", f"{m.describe()} is not replicating yet")
    joined = {m.job_id for m in members}
    for job in jobs:
        if job.job_id in joined:
            continue
        if job.release == into:
            return Step("wait", f"job {job.job_id} ({job.state}) has not joined the appliance")
        # a node being replaced that is not in the appliance (crashing, or not caught up):
        # nothing to hand over, it goes first
        node = Member(job.job_id, job.job_id, "", job.state, None, "", job.release, job.host_id)
        return Step("stop", member=node)
    into_count = counts.get(into, 0)
    out_count = sum(n for r, n in counts.items() if r != into)
    if out_count > len([j for j in jobs if j.release != into]) and into_count + out_count > target:
        # a node being replaced has no running job (it crashed and waits for its restart)
        return Step("drop")
    joined_into = len([m for m in members if m.release == into])
    if joined_into < into_count:
        # a node started for `into` has not joined (still copying, or crashed): nothing is
        # stopped until it has, or the appliance would shrink
        return Step("wait", f"{into_count - joined_into} new node(s) have not joined yet")
    out = sorted(
        (m for m in members if m.release != into),
        key=lambda m: STOP_ORDER.get(m.role, len(STOP_ORDER)),
    )
    if not out and out_count == 0 and into_count >= target:
        return Step("done")
    if into_count < target and into_count + out_count <= target:
        return Step("start")
    if not out:
        return Step("wait", "the old nodes' jobs have not stopped yet")
    victim = out[0]
    if not victim.leader:
        return Step("stop", member=victim)
    syncs = [m for m in members if m.role == "sync_standby" and m.release == into]
    if not syncs:
        return Step("wait", f"no synchronous standby of the new release: {_names(members)}")
    return Step("switchover", member=victim, candidate=syncs[0])


class SireniaRun:
    """The database type moved to release `into` (the new one, or the old one when rolling
    back), one node at a time."""

    def __init__(self, d: Deployer, typ: str, service: str, reverse: bool = False) -> None:
        assert d.old is not None
        self.d = d
        self.typ = typ
        self.service = service
        self.into, self.out = (d.old, d.new) if reverse else (d.new, d.old)
        self.target = d.processes[typ]
        self.step: Step = Step("wait", "not looked yet")

    @property
    def into_id(self) -> str:
        return str(self.into["release_id"])

    async def run(self) -> None:
        while True:
            counts = await self._counts()
            await self.d.wait_up(self.into, {self.typ: counts[self.into_id]})
            await self.d.wait_down(self.out, {self.typ: counts[str(self.out["release_id"])]})
            await self.d.wait_until(
                f"the {self.service} appliance to be healthy", self._plan, within=self._long
            )
            step = self.step
            log.info("deployment %s: %s: %s %s", self.d.id, self.service, step.kind,
                     step.member.describe() if step.member else "")  # fmt: skip
            if step.kind == "done":
                return
            if step.kind == "start":
                await self.d.scale(self.into, {self.typ: counts[self.into_id] + 1})
            elif step.kind == "stop":
                await self._stop(step.member, counts)
            elif step.kind == "drop":
                out_id = str(self.out["release_id"])
                await self.d.scale(self.out, {self.typ: counts[out_id] - 1})
            elif step.kind == "switchover":
                await self._switchover(step.member, step.candidate)

    @property
    def _long(self) -> float:
        return max(self.d.timeout, JOIN_TIMEOUT)

    async def _counts(self) -> dict[str, int]:
        return {
            str(r["release_id"]): (await self.d.counts(r)).get(self.typ, 0)
            for r in (self.into, self.out)
        }

    async def jobs(self) -> list[Job]:
        """The type's running jobs, of any release of the app."""
        rows = await self.d.pool.fetch(
            "SELECT job_id, host_id, release_id, state FROM jobs WHERE app_id = $1"
            " AND process_type = $2 AND state = ANY($3) ORDER BY created_at",
            self.d.row["app_id"],
            self.typ,
            list(ALIVE_STATES),
        )
        return [Job(r["job_id"], r["host_id"], str(r["release_id"]), r["state"]) for r in rows]

    async def members(self) -> list[Member]:
        cluster, names = await read_cluster(self.service)
        return members_of(cluster, await self.jobs(), names)

    async def _plan(self) -> str | None:
        self.step = next_step(
            await self.members(), await self.jobs(), self.into_id, await self._counts(),
            self.target,
        )  # fmt: skip
        return self.step.reason if self.step.kind == "wait" else None

    async def _stop(self, member: Member | None, counts: dict[str, int]) -> None:
        """Stop exactly this node: the other old nodes' hosts stay in the old formation."""
        assert member is not None and member.host_id is not None
        out_id = str(self.out["release_id"])
        others = [j for j in await self.jobs() if j.release == out_id and j.job_id != member.job_id]
        if any(j.host_id == member.host_id for j in others):
            raise DeployFailed(
                f"cannot stop only node {member.name}: another node of its release runs on"
                f" its host {member.host_id}"
            )
        await self.d.scale(
            self.out,
            {self.typ: counts[out_id] - 1},
            {self.typ: sorted({j.host_id for j in others})},
        )

    async def _switchover(self, leader: Member | None, candidate: Member | None) -> None:
        assert leader is not None and candidate is not None
        password = (self.out["env"] or {}).get("POSTGRES_SUPERUSER_PASSWORD", "")
        body = {"leader": leader.name, "candidate": candidate.name}
        url = leader.api_url.rsplit("/", 1)[0] + "/switchover"
        log.info("deployment %s: switchover %s -> %s", self.d.id, leader.name, candidate.name)
        try:
            async with (
                aiohttp.ClientSession(timeout=SWITCHOVER_HTTP) as s,
                s.post(url, json=body, auth=aiohttp.BasicAuth(REST_USER, password)) as r,
            ):
                text = (await r.text()).strip()
        except (OSError, aiohttp.ClientError, TimeoutError) as exc:
            text, status = f"{type(exc).__name__}: {exc}", 0
        else:
            status = r.status
        if status not in (0, 200):
            raise DeployFailed(
                f"Patroni refused the switchover to {candidate.name}: {status} {text}"
            )

        async def moved() -> str | None:
            members = await self.members()
            leaders = [m for m in members if m.leader and m.state == "running"]
            if not leaders or leaders[0].name != candidate.name:
                return f"the primary is {leaders[0].name if leaders else 'none'}"
            found = await discoverd_leader(self.service)
            if found != candidate.job_id:
                return f"discoverd's leader of {self.service} is {found or 'none'}"
            return None

        await self.d.wait_until(f"the switchover to {candidate.name}", moved, within=self._long)


async def read_cluster(service: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Patroni's `GET /cluster` from a node of the appliance (the leader's first), and the
    member names that are not their job's id."""
    try:
        async with Client() as c:
            instances = await c.instances(service)
    except (DiscoverdError, UnreachableError) as exc:
        raise OSError(f"discoverd: {exc}") from None
    names = {i.meta["POSTGRES_ID"]: i.meta["FLYNN_JOB_ID"] for i in instances
             if i.meta.get("POSTGRES_ID") and i.meta.get("FLYNN_JOB_ID")}  # fmt: skip
    ordered = sorted(instances, key=lambda i: i.meta.get("role") != "master")
    last: Exception | None = None
    async with aiohttp.ClientSession(timeout=HTTP) as s:
        for inst in ordered:
            ip = inst.addr.rpartition(":")[0]
            try:
                async with s.get(f"http://{ip}:{DEFAULT_API_PORT}/cluster") as r:
                    if r.status == 200:
                        return json.loads(await r.text()), names
                    last = OSError(f"{ip}: {r.status}")
            except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                last = exc
    raise OSError(f"no node of {service} answers Patroni's API (last: {last})")


async def discoverd_leader(service: str) -> str | None:
    """The job id of discoverd's leader of the service (the primary clients reach)."""
    try:
        async with Client() as c:
            leader = await c.leader(service)
    except (DiscoverdError, UnreachableError) as exc:
        raise OSError(f"discoverd: {exc}") from None
    return leader.meta.get("FLYNN_JOB_ID") if leader is not None else None


def database_type(release: Any) -> str | None:
    """The appliance's database process type: `SIRENIA_PROCESS`, else `postgres`, else the
    first type with a volume."""
    procs = release["processes"] or {}
    named = (release["env"] or {}).get("SIRENIA_PROCESS")
    if named:
        return str(named) if named in procs else None
    if "postgres" in procs:
        return "postgres"
    return next((t for t in sorted(procs) if (procs[t] or {}).get("volumes")), None)


def service_of(release: Any, typ: str) -> str:
    proc = (release["processes"] or {}).get(typ) or {}
    for port in proc.get("ports") or []:
        service = port.get("service")
        if isinstance(service, dict):  # as stored: {"name", "create", "check"}
            service = service.get("name")
        if service:
            return str(service)
    return str((release["env"] or {}).get("FLYNN_POSTGRES") or typ)


async def sirenia(d: Deployer) -> None:
    assert d.old is not None
    typ = database_type(d.old)
    if typ is None or typ not in (d.new["processes"] or {}):
        raise DeployFailed("sirenia: the release has no database process type")
    service = service_of(d.old, typ)
    target = d.processes.get(typ, 0)
    run = SireniaRun(d, typ, service)
    counts = await run._counts()
    if counts[run.into_id] == 0:  # not started yet (a resumed deployment moved already)
        singleton = any((r["env"] or {}).get("SINGLETON") == "true" for r in (d.old, d.new))
        members: list[Member] = []
        if not singleton and target >= MIN_NODES:
            try:
                # a member without a running job has stopped (its key lapses within 10 s)
                members = [m for m in await run.members() if m.release is not None]
            except OSError as exc:
                raise DeployFailed(f"sirenia: cannot read the appliance's state: {exc}") from None
        why = refusal(members, target, singleton)
        old_hosts = [m.host_id for m in members]
        strays = [m for m in members if m.release != str(d.old["release_id"])]
        if why is None and strays:
            why = "nodes not of the current release: " + ", ".join(m.name for m in strays)
        if why is None and len(set(old_hosts)) != len(old_hosts):
            why = f"two nodes share a host ({', '.join(sorted(map(str, old_hosts)))})"
        if why is not None:
            raise DeployFailed(f"sirenia: cannot deploy {service}: {why}")
    try:
        await run.run()
    except DeployFailed as exc:
        if not exc.rollback:
            raise
        leader = await _leader_release(run)
        if leader == str(d.new["release_id"]):
            raise DeployFailed(
                f"{exc}; not rolled back: the primary already runs the new release", False
            ) from None
        log.warning("deployment %s: %s; moving back node by node", d.id, exc)
        d.rolling_back = True
        try:
            await SireniaRun(d, typ, service, reverse=True).run()
        except DeployFailed as back:
            log.warning("deployment %s: moving back failed: %s", d.id, back)
        raise
    await replace_types(d, [t for t in sorted(d.processes) if t != typ])
    await d.finish()


async def _leader_release(run: SireniaRun) -> str | None:
    try:
        members = await run.members()
    except OSError:
        return None
    return next((m.release for m in members if m.leader), None)
