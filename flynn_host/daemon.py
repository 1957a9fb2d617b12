"""The flynn-host daemon: builds the host from its plugins' components, adopts the jobs a
previous daemon left running, serves the host API, and shuts down in reverse order.

Signals: SIGTERM and SIGINT stop every job (SIGTERM, then SIGKILL after `--stop-timeout`) and
leave nothing behind; SIGQUIT exits at once and leaves jobs running under their shims for the
next daemon to adopt (a restart in place; a crashed daemon's jobs are adopted the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import urllib.parse
from contextlib import AsyncExitStack
from typing import Any

import pluggy
from aiohttp import web

from flynn_host import __version__
from flynn_host.api import make_app
from flynn_host.config import HostConfig
from flynn_host.imagestore import ImageStore
from flynn_host.jobnet import JobNetwork
from flynn_host.jobs import JobManager
from flynn_host.layers import LayerStore
from flynn_host.plugins.manager import choose_components

log = logging.getLogger("flynn_host")


class Host:
    """Everything one daemon owns; what plugin hooks receive as `host`."""

    def __init__(self, config: HostConfig, pm: pluggy.PluginManager) -> None:
        self.config = config
        self.pm = pm
        self.layers = LayerStore(config.layer_cache, config.layer_mounts, config.image_dirs)
        self.images = ImageStore(config.volpath, self.layers)
        self.network = JobNetwork(config)
        self.components = choose_components(pm, config, config.components)
        for kind in ("container_backend", "volumes"):
            if kind not in self.components:
                raise RuntimeError(f"no plugin provides a {kind} component")
        self.backend = self.components["container_backend"].factory(self)
        self.volumes = self.components["volumes"].factory(self)
        has_log_hook = bool(pm.hook.flynn_host_job_log.get_hookimpls())
        self.jobs = JobManager(
            config.id,
            config.state,
            self.backend,
            self.volumes,
            max_concurrency=config.max_job_concurrency,
            stop_timeout=config.stop_timeout,
            on_event=self._on_event,
            on_log=self._on_log if has_log_hook else None,
        )
        self.keep_jobs = False
        # set by discoverd's job through POST /host/discoverd; kept across restarts
        self.discoverd_file = config.state.with_name(config.state.name + ".discoverd")
        self.discoverd: dict[str, Any] | None = None
        self._registration: asyncio.Task[None] | None = None
        if self.discoverd_file.exists():
            self.set_discoverd(json.loads(self.discoverd_file.read_text()), save=False)

    def set_discoverd(self, info: dict[str, Any], save: bool = True) -> None:
        """Connect this host to discoverd: new jobs get `DISCOVERD`, status shows it."""
        self.discoverd = {k: info.get(k) for k in ("job_id", "url", "dns")}
        if info.get("url"):
            self.config.env["DISCOVERD"] = str(info["url"])
        if save:
            self.discoverd_file.write_text(json.dumps(self.discoverd))

    # --- this host in discoverd -------------------------------------------------------------
    def register_in_discoverd(self) -> None:
        """(Re)start registering this host as an instance of service `flynn-host`."""
        if not (self.discoverd and self.discoverd.get("url")):
            return
        if self._registration is not None:
            self._registration.cancel()
        self._registration = asyncio.get_running_loop().create_task(self._register())

    def discoverd_urls(self) -> list[str]:
        """The local discoverd first, then the peers' (`--peer-ips`, same port), so a host
        whose own discoverd is not back yet still joins the cluster through the others."""
        assert self.discoverd is not None
        local = str(self.discoverd["url"]).rstrip("/")
        port = urllib.parse.urlsplit(local).port or 1111
        peers = [f"http://{ip}:{port}" for ip in self.config.peer_ips]
        return [local] + [u for u in peers if u != local]

    async def _register(self) -> None:
        from flynn_discoverd.client import Client

        assert self.discoverd is not None
        addr = f"{self.config.external_ip or self.config.listen_ip or '127.0.0.1'}:"
        addr += str(self.config.http_port)
        meta = {"id": self.config.id, **{f"tag:{k}": v for k, v in self.config.tags.items()}}
        client = Client(self.discoverd_urls())
        heartbeater = None
        try:
            while heartbeater is None:
                try:
                    heartbeater = await client.add_service_and_register("flynn-host", addr,
                                                                        meta=meta)  # fmt: skip
                except Exception as exc:  # discoverd not up yet: keep trying
                    log.warning("registering in discoverd failed, retrying: %s", exc)
                    await asyncio.sleep(2)
            log.info("registered in discoverd as %s", addr)
            await asyncio.Event().wait()  # heartbeats run in the heartbeater until cancelled
        finally:
            if heartbeater is not None:
                with contextlib.suppress(Exception):
                    # Flynn marks a host that is going away before it disappears
                    await asyncio.wait_for(heartbeater.set_meta({**meta, "shutdown": "true"}), 5)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(heartbeater.close(), 5)
            await client.close()

    async def _deregister(self) -> None:
        if self._registration is not None:
            self._registration.cancel()
            with contextlib.suppress(BaseException):
                await self._registration

    def _on_event(self, event: dict[str, Any]) -> None:
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
            "discoverd": self.discoverd,
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
    async def running(self) -> Any:
        """Start everything; on exit, tear down in reverse order (collecting errors)."""
        async with AsyncExitStack() as stack:
            await self.backend.setup()
            stack.push_async_callback(self.backend.teardown)
            if self.config.force:
                log.info("--force: killing containers left by an earlier daemon")
                await self.backend.kill_all()

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
            await self.backend.cleanup_orphans(set(self.jobs.jobs))
            await self.network.cleanup_orphans(set(self.jobs.jobs))
            await self.layers.cleanup_stale(self.backend.layers_in_use())

            @stack.push_async_callback
            async def _jobs_down() -> None:
                if not self.keep_jobs:
                    await self.jobs.stop_all(self.config.stop_timeout + 10)
                await self.jobs.shutdown()

            runner = web.AppRunner(make_app(self), access_log=None, handle_signals=False)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, self.config.listen_ip or None, self.config.http_port,
                               reuse_address=True)  # fmt: skip
            await site.start()
            log.info("flynn-host %s listening on port %d", self.config.id, self.config.http_port)
            self.register_in_discoverd()
            stack.push_async_callback(self._deregister)
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
