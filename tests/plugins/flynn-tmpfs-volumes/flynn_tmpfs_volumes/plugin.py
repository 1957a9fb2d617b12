"""The hooks of flynn-tmpfs-volumes (entry point `tmpfs-volumes` in the `flynn.plugins` group).

- `flynn_host_components`: the `volumes` implementation `tmpfs`, chosen with
  `flynn-host daemon --component volumes=tmpfs` (not the default: installing the plugin alone
  changes nothing).
- `flynn_host_services`: mounts the recorded volumes at start and unmounts them all at stop,
  and leaves a marker file `<volpath>/tmpfs-service.started` while the daemon runs.
- `flynn_host_http_apps`: `GET /tmpfs-volumes/` answers `{"volumes": <count>}`.
- `flynn_host_job_log`: appends each job line, as JSON, to the file named by
  `FLYNN_TEST_LOG_HOOK_FILE` when that is set (the tests read it).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from flynn_host.plugins.hookspecs import Component, hookimpl
from flynn_tmpfs_volumes.volumes import TmpfsVolumes

if TYPE_CHECKING:
    from flynn_host.config import HostConfig
    from flynn_host.daemon import Host

LOG_HOOK_ENV = "FLYNN_TEST_LOG_HOOK_FILE"
MARKER = "tmpfs-service.started"


def _make_volumes(host: Host) -> TmpfsVolumes:
    return TmpfsVolumes(host.config.volpath)


def _provider(host: Host) -> TmpfsVolumes | None:
    """Our provider when the host chose it, else None (the plugin is merely installed)."""
    return host.volumes if isinstance(host.volumes, TmpfsVolumes) else None


@hookimpl
def flynn_host_components(config: HostConfig) -> list[Component]:
    return [
        Component(
            kind="volumes",
            name="tmpfs",
            factory=_make_volumes,
            default=False,
            description="data volumes as 64 MiB tmpfs mounts under --volpath/tmpfs",
        )
    ]


@contextlib.asynccontextmanager
async def _service(host: Host) -> AsyncIterator[None]:
    provider = _provider(host)
    if provider is not None:
        provider.open()
    marker = host.config.volpath / MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)
        if provider is not None:
            # after SIGQUIT the jobs keep running, and with them their volumes
            provider.close(keep_mounts=host.keep_jobs)


@hookimpl
def flynn_host_services(host: Host) -> list[contextlib.AbstractAsyncContextManager[None]]:
    return [_service(host)]


@hookimpl
def flynn_host_http_apps(host: Host) -> list[tuple[str, web.Application]]:
    async def index(request: web.Request) -> web.Response:
        provider = _provider(host)
        return web.json_response({"volumes": len(provider.list()) if provider else 0})

    app = web.Application()
    app.router.add_get("/", index)
    return [("/tmpfs-volumes", app)]


@hookimpl
def flynn_host_job_log(host: Host, job_id: str, entry: dict[str, Any]) -> None:
    target = os.environ.get(LOG_HOOK_ENV)
    if target:
        with open(target, "a") as f:
            f.write(json.dumps({"job_id": job_id, **entry}) + "\n")
