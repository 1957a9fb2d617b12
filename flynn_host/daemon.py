"""The flynn-host daemon: builds the host from its plugins' components, adopts the jobs a
previous daemon left running, serves the host API, and shuts down in reverse order.

Signals: SIGTERM and SIGINT stop every job (SIGTERM, then SIGKILL after `--stop-timeout`) and
leave nothing behind; SIGQUIT exits at once and leaves jobs running under their shims for the
next daemon to adopt (a restart in place; a crashed daemon's jobs are adopted the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pluggy
from aiohttp import web

from flynn_host import __version__
from flynn_host.api import STREAMS, make_app
from flynn_host.backend import ContainerBackend
from flynn_host.config import HostConfig
from flynn_host.discoverd_resolver import DiscoverdResolver
from flynn_host.jobs import JobManager
from flynn_host.jobservices import JobServices
from flynn_host.networking.jobnet import JobNetwork
from flynn_host.plugins.manager import choose_components
from flynn_host.registration import DiscoverdRegistration
from flynn_host.runtime.imagestore import ImageStore
from flynn_host.runtime.layers import LayerStore

log = logging.getLogger("flynn_host")

# how long the API waits for a request still being answered when the daemon stops (streams
# and attach sessions are ended at once, not waited for)
API_SHUTDOWN_TIMEOUT = 3.0
LOCK_NAME = "flynn-host.lock"


def lock_files(config: HostConfig) -> list[Path]:
    """One lock per place a daemon owns: its state, its work directory (job bundles, layer
    mounts) and its runc state."""
    return [
        config.state.with_name(config.state.name + ".lock"),
        config.work_dir / LOCK_NAME,
        config.run_dir / config.id / LOCK_NAME,
    ]


@contextlib.contextmanager
def exclusive_state(config: HostConfig) -> Iterator[None]:
    """Hold an exclusive `flock` on each of the daemon's places for as long as it runs, so a
    second daemon started on the same state, work or run directory exits at once instead of
    adopting (and later killing) the first one's jobs. The lock files hold the holder's pid;
    the locks go with the process, also when it is killed."""
    fds: list[int] = []
    try:
        for path in lock_files(config):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise RuntimeError(
                    f"another flynn-host daemon (pid {holder}) is using {path.parent} "
                    f"(it holds {path}): stop it first, or give this one its own --state, "
                    "--work-dir and --run-dir"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        for fd in fds:
            os.close(fd)


class Host:
    """Everything one daemon owns; what plugin hooks receive as `host`."""

    def __init__(self, config: HostConfig, pm: pluggy.PluginManager) -> None:
        self.config = config
        self.pm = pm
        self.layers = LayerStore(config.layer_cache, config.layer_mounts, config.image_dirs)
        self.layers.resolver = DiscoverdResolver(lambda: self.discoverd_urls())
        self.images = ImageStore(config.volpath, self.layers)
        self.network = JobNetwork(config)
        self.components = choose_components(pm, config, config.components)
        for kind in ("container_backend", "volumes"):
            if kind not in self.components:
                raise RuntimeError(f"no plugin provides a {kind} component")
        self.backend: ContainerBackend = self.components["container_backend"].factory(self)
        self.volumes = self.components["volumes"].factory(self)
        has_log_hook = bool(pm.hook.flynn_host_job_log.get_hookimpls())
        self.jobs = JobManager(
            config.id,
            config.state,
            self.backend,
            self.volumes,
            self.network,
            max_concurrency=config.max_job_concurrency,
            stop_timeout=config.stop_timeout,
            on_event=self._on_event,
            on_log=self._on_log if has_log_hook else None,
        )
        self.keep_jobs = False
        self.discoverd = DiscoverdRegistration(config)
        self.services = JobServices(self.discoverd_urls, config.external_ip,
                                    self._services_registered)  # fmt: skip

    def _services_registered(self, job_id: str) -> None:
        job = self.jobs.jobs.get(job_id)
        if job is not None:
            job.services_registered = True
            self.jobs.publish("registered", job_id)

    def discoverd_urls(self) -> list[str] | None:
        """Where discoverd answers, this host's own first; None until discoverd's job has told
        the host (`POST /host/discoverd`)."""
        info = self.discoverd.info
        return self.discoverd.urls() if info and info.get("url") else None

    def _on_event(self, event: dict[str, Any]) -> None:
        self.services.on_event(event)
        self.pm.hook.flynn_host_job_event(host=self, event=event)

    def _on_log(self, job_id: str, entry: dict[str, Any]) -> None:
        self.pm.hook.flynn_host_job_log(host=self, job_id=job_id, entry=entry)

    def plugin_apps(self) -> list[tuple[str, web.Application]]:
        return [pair for batch in self.pm.hook.flynn_host_http_apps(host=self) for pair in batch]

    def status(self) -> dict[str, Any]:
        return {
            "id": self.config.id,
            "tags": self.config.tags,
            "pid": os.getpid(),
            "url": self.config.url,
            "discoverd": self.discoverd.info,
            "network": self.network.status(),
            "version": __version__,
            "flags": {
                "http_port": self.config.http_port,
                "external_ip": self.config.external_ip,
                "listen_ip": self.config.listen_ip,
                "state": str(self.config.state),
                "volpath": str(self.config.volpath),
                "log_dir": str(self.config.log_dir),
                "bridge_name": self.config.bridge_name,
                "peer_ips": self.config.peer_ips,
                "max_job_concurrency": self.config.max_job_concurrency,
                "image_dirs": [str(d) for d in self.config.image_dirs],
            },
            "components": {k: c.name for k, c in self.components.items()},
        }

    # --- lifecycle ----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Host]:
        """Start everything; on exit, tear down in reverse order (collecting errors)."""
        async with AsyncExitStack() as stack:
            # the state file's jobs first: the backend removes what belongs to none of them
            self.jobs.load()
            await stack.enter_async_context(self.backend.running(set(self.jobs.jobs)))

            @stack.push_async_callback
            async def _layers_down() -> None:
                if not self.keep_jobs:
                    await self.layers.close()

            await self.network.restore()

            @stack.push_async_callback
            async def _network_down() -> None:
                if not self.keep_jobs:
                    await self.network.teardown()

            # plugin services start before jobs are adopted and stop after jobs have stopped:
            # a service may provide what jobs use (a volume provider's mounts, say)
            for batch in self.pm.hook.flynn_host_services(host=self):
                for service in batch or []:
                    await stack.enter_async_context(service)

            await self.jobs.recover()
            await self.network.cleanup_orphans(set(self.jobs.jobs))
            await self.layers.cleanup_stale(self.backend.layers_in_use)

            @stack.push_async_callback
            async def _jobs_down() -> None:
                if not self.keep_jobs:
                    await self.jobs.stop_all(self.config.stop_timeout + 10)
                await self.jobs.shutdown()

            app = make_app(self)
            runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                   shutdown_timeout=API_SHUTDOWN_TIMEOUT)  # fmt: skip
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            # before the API takes jobs (they get $DISCOVERD from it); left before jobs stop,
            # so the host is marked as going away while discoverd (maybe a job here) still runs
            await stack.enter_async_context(self.discoverd)
            # the jobs' instances leave discoverd before the host does
            stack.push_async_callback(self.services.close)
            site = web.TCPSite(runner, self.config.listen_ip or None, self.config.http_port,
                               reuse_address=True)  # fmt: skip
            await site.start()
            log.info("flynn-host %s listening on port %d", self.config.id, self.config.http_port)
            # first of all at shutdown: end every event stream and attach session, whatever
            # their clients do, so none holds up stopping the jobs
            stack.push_async_callback(app[STREAMS].close)
            yield self

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def on_signal(sig: signal.Signals) -> None:
            action = "leaving jobs running" if sig == signal.SIGQUIT else "stopping jobs"
            log.info("received %s: %s", sig.name, action)
            self.keep_jobs = sig == signal.SIGQUIT
            done.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(sig, on_signal, sig)
        async with self.running():
            await done.wait()
        return 0
