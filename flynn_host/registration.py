"""This host in discoverd: where discoverd answers (told by discoverd's own job through
`POST /host/discoverd`, kept beside the state file across restarts), and the host's instance
in service `flynn-host`, registered with heartbeats for as long as the daemon runs.

A service of the daemon, entered on its exit stack: entering loads what an earlier daemon was
told and starts registering; leaving marks the instance `shutdown` (as Flynn's hosts do before
they go) and unregisters it.

A discoverd job that starts again on this host (restarted, or replaced by a deployment) tells
the host again, usually the same URL: the registration then goes on as it is. Restarting it
would deregister the host for a moment, and marking it `shutdown` meanwhile made the
scheduler stop every omni job on the host (flannel, discoverd itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from typing import Any

from flynn_host.atomicfile import write_atomic
from flynn_host.config import HostConfig

log = logging.getLogger(__name__)

SERVICE = "flynn-host"
RETRY_INTERVAL = 2.0
# how long leaving waits for discoverd (it may be gone already): shutdown must not hang on it
LEAVE_TIMEOUT = 2.0


class DiscoverdRegistration:
    """What the host knows of discoverd, and its own registration there."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.file = config.state.with_name(config.state.name + ".discoverd")
        # `{"job_id", "url", "dns"}` once discoverd has told this host where it answers
        self.info: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._leaving = False

    async def __aenter__(self) -> DiscoverdRegistration:
        if self.file.exists():
            self._apply(json.loads(self.file.read_text()))
        self._restart()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._leaving = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    def set(self, info: dict[str, Any]) -> None:
        """discoverd's job says where it answers: remember it and register there (the
        registration goes on as it is if the URLs are the ones it already uses)."""
        before = self.urls() if self.info and self.info.get("url") else None
        self._apply(info)
        write_atomic(self.file, json.dumps(self.info), fsync=False, mode=0o600)
        running = self._task is not None and not self._task.done()
        if not running or before != self.urls():
            self._restart()

    def _apply(self, info: dict[str, Any]) -> None:
        self.info = {k: info.get(k) for k in ("job_id", "url", "dns")}
        if info.get("url"):
            # jobs started from now on find discoverd through $DISCOVERD
            self.config.env["DISCOVERD"] = str(info["url"])

    def urls(self) -> list[str]:
        """The local discoverd first, then the peers' (`--peer-ips`, same port), so a host
        whose own discoverd is not back yet still joins the cluster through the others."""
        assert self.info is not None
        local = str(self.info["url"]).rstrip("/")
        port = urllib.parse.urlsplit(local).port or 1111
        peers = [f"http://{ip}:{port}" for ip in self.config.peer_ips]
        return [local] + [u for u in peers if u != local]

    def _restart(self) -> None:
        if not (self.info and self.info.get("url")):
            return
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.get_running_loop().create_task(self._register())

    async def _register(self) -> None:
        from flynn_discoverd.client import Client  # discoverd's client, as any component uses

        c = self.config
        addr = f"{c.external_ip or c.listen_ip or '127.0.0.1'}:{c.http_port}"
        meta = {"id": c.id, **{f"tag:{k}": v for k, v in c.tags.items()}}
        client = Client(self.urls())
        heartbeater = None
        try:
            while heartbeater is None:
                try:
                    heartbeater = await client.add_service_and_register(SERVICE, addr, meta=meta)
                except Exception as exc:  # discoverd not up yet: keep trying
                    log.warning("registering in discoverd failed, retrying: %s", exc)
                    await asyncio.sleep(RETRY_INTERVAL)
            log.info("registered in discoverd as %s", addr)
            await asyncio.Event().wait()  # heartbeats run in the heartbeater until cancelled
        finally:
            if heartbeater is not None and self._leaving:
                with contextlib.suppress(Exception):
                    # Flynn marks a host that is going away before it disappears
                    shutdown = heartbeater.set_meta({**meta, "shutdown": "true"})
                    await asyncio.wait_for(shutdown, LEAVE_TIMEOUT)
            if heartbeater is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(heartbeater.close(), LEAVE_TIMEOUT)
            await client.close()
