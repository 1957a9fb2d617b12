"""The `discoverd-meta` strategy: discoverd replaced one host at a time.

discoverd is an omni process type on the host's network with fixed ports (1111, 53, and its
etcd member's 2379/2380) and a `/data` volume holding the member: an old and a new job cannot
run side by side on one host, and the new one should take over the old one's volume, so that
it rejoins etcd as the same member instead of replacing it. So each omni type of the app moves
host by host, in one formation change per host: the host leaves the old release's `hosts`
for the type and joins the new release's (`scheduler.py`: the old job there stops, and the
new one starts once it has ended, on its volume). The next host waits until

- the old job on the host is down and the new one up (the jobs the scheduler reports);
- if the old job was the host's discoverd (`GET /host/status`, `discoverd.job_id`): the host
  names the new job as its discoverd, with a DNS address if the old one had one (the node
  tells its host once it serves, and again once its DNS serves);
- that node answers `/.well-known/status` (its etcd has a leader), its etcd member answers
  `/health`, and `/raft/peers` lists as many members as before.

Flynn's strategy of this name waited for discoverd's deployment service meta; the signals
above are what this discoverd has. One host is never gone for more than its own step, so
etcd keeps its quorum (3 hosts: 2 of 3 members throughout) and every other host's discoverd
answers meanwhile. The host running this deployment goes last but one, the scheduler's last:
a new release that crashes on the first host is then seen (the scheduler reports through its
host's discoverd) and moved back before any host the deployment depends on has been touched.

A failure moves the replaced hosts back the same way, newest first, before the deployment is
failed (whatever that cannot move back, the rollback in `deployer.fail` restores at once).
Other process types of the app go one by one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import aiohttp
from flynn_discoverd.client import Client, DiscoverdError, UnreachableError
from flynn_discoverd.types import ETCD_CLIENT_PORT_OFFSET

from flynn_controller import hosts
from flynn_controller.deployer import (
    ALIVE_STATES,
    Deployer,
    DeployFailed,
    replace_types,
)
from flynn_controller.scheduler_service import SERVICE as SCHEDULER_SERVICE

log = logging.getLogger("flynn_controller.deployer")

HTTP = aiohttp.ClientTimeout(total=3)


async def discoverd_meta(d: Deployer) -> None:
    assert d.old is not None
    omni = [t for t in sorted(d.processes) if _omni(d.new, t) and d.processes[t] > 0]
    for typ in omni:
        await HostByHost(d, typ).run()
    await replace_types(d, [t for t in sorted(d.processes) if t not in omni])
    await d.finish()


def _omni(release: Any, typ: str) -> bool:
    return bool(((release["processes"] or {}).get(typ) or {}).get("omni"))


def own_host() -> str:
    """The host this process runs on (a job id starts with its host's id)."""
    return os.environ.get("FLYNN_JOB_ID", "").partition("-")[0]


async def scheduler_host() -> str:
    """The host of the scheduler that acts (the leader of `controller-scheduler`), or ""."""
    try:
        async with Client() as c:
            leader = await c.leader(SCHEDULER_SERVICE)
    except (DiscoverdError, UnreachableError, OSError, aiohttp.ClientError):
        return ""
    return (leader.meta.get("FLYNN_JOB_ID") or "").partition("-")[0] if leader else ""


class HostByHost:
    """One omni type of the app, moved host by host to the new release (or back)."""

    def __init__(self, d: Deployer, typ: str) -> None:
        self.d = d
        self.typ = typ
        self.count = d.processes[typ]  # per host
        self.urls: dict[str, str] = {}  # host id -> host API URL
        self.done: list[str] = []  # the hosts running the new release's job, in order

    async def run(self) -> None:
        await self.d.wait_until("the cluster's hosts", self._list_hosts)
        new_f = await self.d.counts(self.d.new)
        resumed = (await self._restriction(self.d.new)) or []
        if new_f.get(self.typ) and resumed:
            self.done = [h for h in resumed if h in self.urls]
        # last: this deployment's host, then the scheduler's (while a host has no discoverd,
        # its jobs find nothing, and a failure on the first host must reach the deployment)
        last = [h for h in (own_host(), await scheduler_host()) if h in self.urls]
        last = [h for i, h in enumerate(last) if h not in last[i + 1 :]]
        order = self.done + sorted(h for h in self.urls if h not in self.done and h not in last)
        order += [h for h in last if h not in self.done]
        log.info("deployment %s: %s %s host by host: %s", self.d.id, self.d.row["app_id"],
                 self.typ, order)  # fmt: skip
        try:
            for host in order:
                if host not in self.done:
                    self.done.append(host)
                await self._move(host, to_new=True)
        except DeployFailed as exc:
            if exc.rollback:
                await self._move_back()
            raise

    async def _list_hosts(self) -> str | None:
        self.urls = await hosts.list_hosts()
        return None if self.urls else "no hosts registered in discoverd"

    async def _restriction(self, release: Any) -> list[str] | None:
        row = await self.d.pool.fetchrow(
            "SELECT hosts FROM formations WHERE app_id = $1 AND release_id = $2"
            " AND deleted_at IS NULL",
            self.d.row["app_id"],
            release["release_id"],
        )
        if row is None or not row["hosts"]:
            return None
        only = row["hosts"].get(self.typ)
        return list(only) if only is not None else None

    async def _write(self) -> None:
        """Both formations from `done`: the new release on those hosts, the old elsewhere."""
        assert self.d.old is not None
        rest = [h for h in sorted(self.urls) if h not in self.done]
        await self.d.scale_many([
            (self.d.new, {self.typ: self.count if self.done else 0}, {self.typ: self.done}),
            (self.d.old, {self.typ: self.count}, {self.typ: rest}),
        ])  # fmt: skip

    async def _move(self, host: str, to_new: bool) -> None:
        """One host's step: the formations changed, then wait until it runs the other
        release's job and, if its discoverd was the job replaced, that node is healthy."""
        assert self.d.old is not None
        into, out = (self.d.new, self.d.old) if to_new else (self.d.old, self.d.new)
        before = await self._host_discoverd(host)
        # the type is the host's discoverd if the host names one of its jobs (of either
        # release, running or not: moving back, the new one may never have served)
        was_discoverd = before is not None and bool(
            await self.d.pool.fetchval(
                "SELECT 1 FROM jobs WHERE job_id = $1 AND app_id = $2 AND process_type = $3",
                before.get("job_id"),
                self.d.row["app_id"],
                self.typ,
            )
        )
        peers = await self._peers(before["url"]) if was_discoverd and before else 0
        await self._write()
        which = "new" if to_new else "old"
        log.info("deployment %s: %s on host %s: to the %s release", self.d.id, self.typ, host,
                 which)  # fmt: skip

        async def check() -> str | None:
            left = [j for j in await self.d.jobs(out, self.typ, ALIVE_STATES)
                    if j["host_id"] == host]  # fmt: skip
            if left:
                return f"job {left[0]['job_id']} still {left[0]['state']}"
            up = [j["job_id"] for j in await self.d.jobs(into, self.typ, ("up",))
                  if j["host_id"] == host]  # fmt: skip
            if len(up) < self.count:
                return f"{len(up)} of {self.count} {which} jobs up"
            if not was_discoverd:
                return None
            assert before is not None
            return await self._healthy(host, up, bool(before.get("dns")), peers)

        await self.d.wait_until(f"{self.typ} on host {host} ({which} release)", check)

    async def _move_back(self) -> None:
        """After a failure: the replaced hosts back to the old release, newest first. What
        cannot be moved back is left to the deployment's rollback."""
        self.d.rolling_back = True
        while self.done:
            host = self.done.pop()
            try:
                await self._move(host, to_new=False)
            except DeployFailed as exc:
                log.warning("deployment %s: moving %s on host %s back failed: %s", self.d.id,
                            self.typ, host, exc)  # fmt: skip
                return

    # --- the host's discoverd -------------------------------------------------------------
    async def _host_discoverd(self, host: str) -> dict[str, Any] | None:
        """What the host says of its discoverd (`job_id`, `url`, `dns`), or None."""
        try:
            status, body = await hosts.host_request(
                host, "GET", "/host/status", url=self.urls.get(host)
            )
        except (OSError, aiohttp.ClientError, TimeoutError):
            return None
        if status != 200 or not isinstance(body, dict):
            return None
        disc = body.get("discoverd")
        return disc if isinstance(disc, dict) and disc.get("url") else None

    async def _peers(self, url: str) -> int:
        try:
            async with aiohttp.ClientSession(timeout=HTTP) as s, s.get(url + "/raft/peers") as r:
                peers = await r.json(content_type=None) if r.status == 200 else []
        except (OSError, aiohttp.ClientError, TimeoutError, ValueError):
            return 0
        return len(peers) if isinstance(peers, list) else 0

    async def _healthy(self, host: str, new_jobs: list[str], dns: bool, peers: int) -> str | None:
        disc = await self._host_discoverd(host)
        if disc is None or disc.get("job_id") not in new_jobs:
            return f"host {host} does not name the new job as its discoverd yet"
        if dns and not disc.get("dns"):
            return f"the new discoverd on {host} does not serve DNS yet"
        url = str(disc["url"]).rstrip("/")
        ip, _, port = url.rpartition("://")[2].rpartition(":")
        etcd = f"http://{ip}:{int(port) + ETCD_CLIENT_PORT_OFFSET}/health"
        async with aiohttp.ClientSession(timeout=HTTP) as s:
            async with s.get(url + "/.well-known/status") as r:
                if r.status != 200:
                    return f"discoverd at {url}: status {r.status}"
            async with s.get(etcd) as r:
                health = await r.json(content_type=None) if r.status == 200 else {}
                if str((health or {}).get("health")) != "true":
                    return f"etcd member at {etcd}: {health or r.status}"
        have = await self._peers(url)
        if have < peers:
            return f"discoverd at {url} lists {have} of {peers} peers"
        return None
