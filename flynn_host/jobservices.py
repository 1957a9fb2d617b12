"""Jobs' services in discoverd: a running job whose config ports name a `service` is an
instance of that service (`<job ip>:<port>`, meta `FLYNN_APP_ID`, `FLYNN_RELEASE_ID`,
`FLYNN_PROCESS_TYPE`, `FLYNN_JOB_ID`) for as long as it runs and passes its check, as Flynn's
hosts register app jobs (the router finds an app's backends this way).

The check is the port's `service.check` (`{"type": "tcp"|"http", "path", "interval",
"threshold"}`), by default a TCP connect: an instance appears once the job accepts connections
and goes after `threshold` failed checks in a row, so clients never get an instance that does
not answer yet. Leaving (the job ends, `PUT /host/jobs/:id/discoverd-deregister`, or the host
stopping the job) removes it first, before the job gets its signal.

Jobs of the `system` partition register themselves (discoverd, postgres, the controller: their
services have leaders or meta only they know), so their ports are not registered here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from flynn_host.types import SYSTEM_PARTITION

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # default seconds between checks of a registered instance
FIRST_CHECKS = 0.1  # seconds between checks until the instance is registered
CHECK_TIMEOUT = 2.0
CHECK_THRESHOLD = 3  # failed checks in a row that take a registered instance out
LEAVE_TIMEOUT = 2.0
RUNNING = "running"


def services_of(job: dict[str, Any], host_ip: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(service, addr, check) of each port of a running job (`ActiveJob.to_json()`) that names
    a service the host registers."""
    spec = job.get("job") or {}
    if spec.get("partition") == SYSTEM_PARTITION:
        return []
    config = spec.get("config") or {}
    ip = job.get("internal_ip") or (host_ip if config.get("host_network") else "")
    if not ip:
        return []
    out = []
    for port in config.get("ports") or []:
        service = port.get("service")
        if isinstance(service, str):
            service = {"name": service}
        if not isinstance(service, dict) or not service.get("name") or not port.get("port"):
            continue
        if (port.get("proto") or "tcp") != "tcp":
            continue
        check = service.get("check") or {"type": "tcp"}
        out.append((str(service["name"]), f"{ip}:{port['port']}", check))
    return out


class JobServices:
    """The registrations of this host's jobs. `urls()` gives discoverd's URLs (None until the
    host knows where discoverd answers)."""

    def __init__(
        self,
        urls: Callable[[], list[str] | None],
        host_ip: str,
        on_registered: Callable[[str], None] = lambda job_id: None,
    ) -> None:
        self.urls = urls
        self.host_ip = host_ip
        # called once a job's services are all registered (the first time)
        self.on_registered = on_registered
        self._waiting: dict[str, set[str]] = {}
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._client: Any = None
        self._client_urls: list[str] | None = None

    def on_event(self, event: dict[str, Any]) -> None:
        job = event.get("job") or {}
        job_id = event.get("job_id") or ""
        if job.get("status") == RUNNING and job_id not in self._tasks:
            services = services_of(job, self.host_ip)
            if services:
                env = ((job.get("job") or {}).get("config") or {}).get("env") or {}
                meta = {k: str(env[k]) for k in ("FLYNN_APP_ID", "FLYNN_RELEASE_ID",
                        "FLYNN_PROCESS_TYPE") if k in env} | {"FLYNN_JOB_ID": job_id}  # fmt: skip
                self._waiting[job_id] = {f"{name} {addr}" for name, addr, _ in services}
                self._tasks[job_id] = [
                    asyncio.get_running_loop().create_task(
                        self._register(job_id, name, addr, check, meta)
                    )
                    for name, addr, check in services
                ]
        elif job.get("status") not in (RUNNING, "starting") and job_id in self._tasks:
            asyncio.get_running_loop().create_task(self.deregister(job_id))

    async def deregister(self, job_id: str) -> bool:
        """Take the job's instances out of discoverd now (the job goes on running); True when
        it had any."""
        tasks = self._tasks.pop(job_id, [])
        self._waiting.pop(job_id, None)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=LEAVE_TIMEOUT + 1)
        return bool(tasks)

    async def close(self) -> None:
        for job_id in list(self._tasks):
            await self.deregister(job_id)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()

    def _registered(self, job_id: str, service: str) -> None:
        waiting = self._waiting.get(job_id)
        if waiting is None:
            return
        waiting.discard(service)
        if not waiting:
            del self._waiting[job_id]
            self.on_registered(job_id)

    def _discoverd(self) -> Any:
        from flynn_discoverd.client import Client  # discoverd's client, as any component uses

        urls = self.urls()
        if not urls:
            return None
        if self._client is None or urls != self._client_urls:
            self._client, self._client_urls = Client(urls), urls
        return self._client

    async def _register(self, job_id: str, name: str, addr: str, check: dict[str, Any],
                        meta: dict[str, str]) -> None:  # fmt: skip
        interval = float(check.get("interval") or CHECK_INTERVAL)
        threshold = int(check.get("threshold") or CHECK_THRESHOLD)
        heartbeater = None
        failures = 0
        try:
            while True:
                ok = await _check(addr, check)
                failures = 0 if ok else failures + 1
                if ok and heartbeater is None:
                    client = self._discoverd()
                    if client is not None:
                        try:
                            heartbeater = await client.add_service_and_register(
                                name, addr, meta=meta
                            )
                            log.info("job service %s: registered %s", name, addr)
                            self._registered(job_id, f"{name} {addr}")
                        except Exception as exc:  # noqa: BLE001 - discoverd away: next round
                            log.warning("job service %s: registering %s: %s", name, addr, exc)
                elif heartbeater is not None and failures >= threshold:
                    log.warning("job service %s: %s failed %d checks: deregistered", name, addr,
                                failures)  # fmt: skip
                    await _leave(heartbeater)
                    heartbeater = None
                # until the first check passes the job is waited for: check it often
                await asyncio.sleep(interval if heartbeater is not None else FIRST_CHECKS)
        finally:
            if heartbeater is not None:
                await _leave(heartbeater)


async def _leave(heartbeater: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(heartbeater.close(), LEAVE_TIMEOUT)


async def _check(addr: str, check: dict[str, Any]) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        if check.get("type") == "http":
            url = f"http://{addr}{check.get('path') or '/'}"
            timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT)
            async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url) as resp:
                return 200 <= resp.status < 400
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)),
                                           CHECK_TIMEOUT)  # fmt: skip
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True
    except (OSError, TimeoutError, aiohttp.ClientError, ValueError):
        return False
