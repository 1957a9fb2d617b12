"""What the node asks of its own Patroni, over Patroni 3.0.2's REST API on the node's address:
is this node the primary (`NodeState`, from `GET /primary`), the cluster's members
(`GET /cluster`), a switchover to a healthy sync standby before a primary stops (`hand_over`),
and the cluster's mode brought in line with the node's (`apply_mode`, a `PATCH /config`). The
decisions are pure functions (`healthy_sync_standby`, `mode_patch`) so they are tested alone.

The REST API has no authentication configured, as Patroni's default: only the cluster's own
network reaches a node's address (docs/postgres.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger("postgres")

# Patroni calls a primary `master` in 3.0.2 (`primary` in later versions)
PRIMARY_ROLES = ("master", "primary")
# a standby further behind than this is no switchover candidate: Patroni's own default for
# `maximum_lag_on_failover` (1 MB of WAL), so our choice never differs from what it accepts
MAX_SWITCHOVER_LAG = 1024 * 1024
# the states in which a standby replays WAL from the primary (3.0.2 says `running`, later
# versions `streaming`)
STANDBY_STATES = ("running", "streaming")


class PatroniError(Exception):
    """Patroni answered a request with an error."""


# what a request to Patroni raises when it is away, slow, or answers with an error
PATRONI_ERRORS = (aiohttp.ClientError, TimeoutError, ValueError, PatroniError)


@dataclass(frozen=True)
class NodeState:
    """What this node's Patroni says about it: PostgreSQL's `role` (`master`/`replica`) and
    `state` (`running`, `starting`, `stopping`, ...), and whether Patroni holds the cluster's
    leader key now (`leader`: `GET /primary` answered 200)."""

    role: str
    state: str
    leader: bool = False

    @property
    def is_primary(self) -> bool:
        """The running primary: PostgreSQL out of recovery *and* Patroni holding the leader
        key. PostgreSQL alone still says `master` for a moment after Patroni lost the key (it
        demotes next), which must not count."""
        return self.leader and self.role in PRIMARY_ROLES and self.state == "running"


def healthy_sync_standby(
    cluster: dict[str, Any], me: str, max_lag: int = MAX_SWITCHOVER_LAG
) -> str | None:
    """The member of `GET /cluster` to hand over to: the sync standby, replaying WAL, less
    than `max_lag` bytes behind and not tagged `nofailover`; None if there is none."""
    for member in cluster.get("members") or []:
        lag = member.get("lag")
        if (
            member.get("name") != me
            and member.get("role") == "sync_standby"
            and member.get("state") in STANDBY_STATES
            and isinstance(lag, int)
            and lag <= max_lag
            and not (member.get("tags") or {}).get("nofailover")
        ):
            return str(member["name"])
    return None


def mode_patch(mode: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """The `PATCH /config` body that gives the cluster's dynamic config this node's mode, or
    None when it already has it. `bootstrap.dcs` only counts when a cluster is created, so a
    mode changed later (a new release's env) reaches a running cluster only this way."""
    strict = mode == "strict"
    if config.get("synchronous_mode") is True and config.get("synchronous_mode_strict") is strict:
        return None
    return {"synchronous_mode": True, "synchronous_mode_strict": strict}


class PatroniAPI:
    """Patroni's REST API at `url` (`http://<listen>:<api-port>`), with short timeouts: the
    node polls it several times a second and must notice at once when it does not answer."""

    def __init__(self, url: str, timeout: float = 1.0, auth: tuple[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        # (user, password) for the requests that change the cluster
        self.auth = aiohttp.BasicAuth(*auth) if auth else None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self, method: str, path: str, body: Any = None, within: float | None = None
    ) -> tuple[int, str]:
        t = self.timeout if within is None else aiohttp.ClientTimeout(total=within)
        auth = self.auth if method != "GET" else None
        async with self._http().request(
            method, self.url + path, json=body, timeout=t, auth=auth
        ) as resp:
            return resp.status, await resp.text()

    async def node_state(self) -> NodeState | None:
        """This node as Patroni sees it; None when Patroni does not answer (or not in JSON)."""
        try:
            status, text = await self._call("GET", "/primary")
            raw = json.loads(text)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        if not isinstance(raw, dict):
            return None
        return NodeState(str(raw.get("role", "")), str(raw.get("state", "")), status == 200)

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        status, text = await self._call(method, path, body)
        if status != 200:
            raise PatroniError(f"{method} {path}: {status} {text.strip()[:200]}")
        return json.loads(text)

    async def cluster(self) -> dict[str, Any]:
        raw = await self._json("GET", "/cluster")
        return raw if isinstance(raw, dict) else {}

    async def config(self) -> dict[str, Any]:
        raw = await self._json("GET", "/config")
        return raw if isinstance(raw, dict) else {}

    async def patch_config(self, patch: dict[str, Any]) -> None:
        await self._json("PATCH", "/config", patch)

    async def switchover(self, leader: str, candidate: str, within: float) -> tuple[int, str]:
        """Ask for a switchover now. Patroni answers once it has seen the new leader (or gave
        up), which can take up to 20 s: `within` bounds the wait for that answer."""
        body = {"leader": leader, "candidate": candidate}
        status, text = await self._call("POST", "/switchover", body, within=within)
        return status, text.strip()


def cluster_leader(cluster: dict[str, Any]) -> str | None:
    """The name of the member holding the cluster's leader key in `GET /cluster`."""
    for member in cluster.get("members") or []:
        if member.get("role") in ("leader", "standby_leader"):
            return str(member.get("name"))
    return None


async def hand_over(api: PatroniAPI, me: str, within: float, every: float = 0.2) -> bool:
    """Before a primary stops: switch over to a healthy sync standby and wait (at most
    `within` s) until another member holds the leader key. Patroni 3.0.2's own shutdown of a
    primary only releases the key, leaving the standbys to notice and race. Returns whether
    this node handed over; with no healthy sync standby it does nothing (whether commits may
    then go on alone is the mode's business, i.e. Patroni's).

    It waits for the new leader, not only for this node to stop being the primary: Patroni
    stops PostgreSQL before it releases the key, and a node stopped in between could come back
    as a standby just long enough to become the new primary's sync standby, which (strict
    mode) holds every commit until Patroni picks another."""
    state = await api.node_state()
    if state is None or not state.is_primary:
        return False
    try:
        candidate = healthy_sync_standby(await api.cluster(), me)
    except PATRONI_ERRORS as exc:
        log.warning("no switchover: cannot read the cluster from Patroni: %s", exc)
        return False
    if candidate is None:
        log.info("no switchover: no healthy sync standby; stopping as primary")
        return False
    log.info("switching over to %s before stopping", candidate)
    deadline = time.monotonic() + within
    request = asyncio.create_task(api.switchover(me, candidate, within))
    try:
        while time.monotonic() < deadline:
            if request.done() and request.exception() is None:
                status, text = request.result()
                if status != 200:  # refused (412) or failed (503): no use waiting
                    log.warning("switchover to %s refused: %s %s", candidate, status, text)
                    return False
            with contextlib.suppress(*PATRONI_ERRORS):
                leader = cluster_leader(await api.cluster())
                if leader is not None and leader != me:
                    log.info("switched over to %s", leader)
                    return True
            await asyncio.sleep(every)
        log.warning("switchover to %s did not finish within %ss", candidate, within)
        return False
    finally:
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await request


async def apply_mode(api: PatroniAPI, mode: str, settle: float = 1.5) -> bool:
    """Give the cluster this node's mode if its dynamic config differs (called once this node
    is the primary, so one node decides); True once the config has it.

    Leaving strict mode without a sync standby takes two more patches: Patroni 3.0.2 leaves a
    primary's `synchronous_standby_names = '*'` (what strict mode holds commits with) in place
    until the set of sync standbys changes, which with none it never does. Synchronous mode
    off for one HA loop (`settle` s; the PATCH wakes the loop) clears it, then on again. With
    no sync standby, no commit was waiting on one, so nothing is weakened meanwhile."""
    try:
        patch = mode_patch(mode, await api.config())
        if patch is None:
            return True
        await api.patch_config(patch)
        log.info("cluster config patched to %s mode: %s", mode, patch)
        if not patch["synchronous_mode_strict"] and not has_sync_standby(await api.cluster()):
            await api.patch_config({"synchronous_mode": False})
            await asyncio.sleep(settle)
            await api.patch_config({"synchronous_mode": True})
            log.info("no sync standby: synchronous mode turned off and on to release commits")
    except PATRONI_ERRORS as exc:
        log.warning("cannot apply %s mode to the cluster config yet: %s", mode, exc)
        return False
    return True


def has_sync_standby(cluster: dict[str, Any]) -> bool:
    return any(m.get("role") == "sync_standby" for m in cluster.get("members") or [])
