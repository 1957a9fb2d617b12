"""The log mux of one daemon: its sequence, its shippers and where they ship to.

It ships to every instance of the discoverd service `logaggregator` (once the host knows
where discoverd answers: an instance that comes up gets a shipper, one that goes down loses
it), and to the addresses of `FLYNN_LOGMUX_AGGREGATORS`. An instance registers its syslog
address; its API is at the same IP, on the port of its meta `api_port`, else on
`FLYNN_LOGMUX_API_PORT` (80, the port Flynn's bootstrap manifest gives the app).

Settings, from the daemon's environment (or the host config's `env`):

| variable | meaning |
| --- | --- |
| `FLYNN_LOGMUX_AGGREGATORS` | `SYSLOG_ADDR[=API_URL],...`: shipped to besides discoverd's |
| `FLYNN_LOGMUX_API_PORT` | the API port of an instance without `api_port` meta (80) |
| `FLYNN_LOGMUX_RING_MESSAGES` | lines the ring keeps (100,000) |
| `FLYNN_LOGMUX_RING_BYTES` | bytes of encoded lines the ring keeps (32 MiB) |

Across a restart: stopping (SIGTERM or SIGQUIT) saves the sequence's index and counters in
`<state>.logmux`; the next daemon takes them up, so it resumes exactly. Without that file (a
crash) it rebuilds the ring from the newest lines of the running jobs' log files, merged by
time, and an aggregator's cursor from before is resumed by time (docs/logmux.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from flynn_logaggregator.types import SERVICE, parse_time

from flynn_host.atomicfile import write_json_atomic
from flynn_host.logmux.sequencer import RING_BYTES, RING_MESSAGES, JobInfo, Sequencer
from flynn_host.logmux.shipper import Shipper
from flynn_host.plugins.hookspecs import Host
from flynn_host.runtime.logs import tail_entries

log = logging.getLogger(__name__)

APP_META = "flynn-controller.app"
TYPE_META = "flynn-controller.type"
DEFAULT_API_PORT = 80
DISCOVERD_RETRY = 2.0  # seconds between looks for discoverd (and its service)
# read at most this much of the running jobs' logs (an equal share of each) when rebuilding
# the ring after a crash
RECOVER_BYTES = 32 * 1024 * 1024


@dataclass
class Settings:
    aggregators: dict[str, str] = field(default_factory=dict)  # syslog addr -> API URL
    api_port: int = DEFAULT_API_PORT
    ring_messages: int = RING_MESSAGES
    ring_bytes: int = RING_BYTES

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """The settings in `env` (the daemon's environment); ValueError naming a bad one (the
        daemon then refuses to start, saying so)."""
        env = dict(os.environ if env is None else env)

        def number(name: str, default: int) -> int:
            raw = env.get(name) or str(default)
            if not raw.isdigit() or int(raw) < 1:
                raise ValueError(f"{name}: {raw!r} is not a positive number")
            return int(raw)

        api_port = number("FLYNN_LOGMUX_API_PORT", DEFAULT_API_PORT)
        aggregators = {}
        for item in (env.get("FLYNN_LOGMUX_AGGREGATORS") or "").split(","):
            addr, _, api = item.strip().partition("=")
            if not addr:
                continue
            if not addr.rpartition(":")[2].isdigit():
                raise ValueError(f"FLYNN_LOGMUX_AGGREGATORS: {addr!r} is not HOST:PORT")
            aggregators[addr] = api or api_url(addr.rpartition(":")[0], api_port)
        return cls(
            aggregators=aggregators,
            api_port=api_port,
            ring_messages=number("FLYNN_LOGMUX_RING_MESSAGES", RING_MESSAGES),
            ring_bytes=number("FLYNN_LOGMUX_RING_BYTES", RING_BYTES),
        )


def api_url(ip: str, port: int) -> str:
    ip = ip.strip("[]")
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


class LogMux:
    def __init__(self, host: Host, settings: Settings) -> None:
        self.host = host
        self.settings = settings
        self.sequencer = self._new_sequencer()
        self.state_file = host.config.state.with_name(host.config.state.name + ".logmux")
        self.shippers: dict[str, Shipper] = {}
        self._discovered: set[str] = set()
        self._follower: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # shippers being stopped

    def _new_sequencer(self) -> Sequencer:
        s = self.settings
        return Sequencer(self.host.config.id, self.resolve, s.ring_messages, s.ring_bytes)

    def resolve(self, job_id: str) -> JobInfo | None:
        """A job's lines are shipped when it belongs to an app and does not disable its log."""
        active = self.host.jobs.jobs.get(job_id)
        if active is None:
            return None
        app = active.job.metadata.get(APP_META)
        if not app or active.job.config.get("disable_log"):
            return None
        return JobInfo(job_id, app, active.job.metadata.get(TYPE_META, ""),
                       str(self.host.backend.log_path(job_id)))  # fmt: skip

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        state = self._load_state()
        if state is not None:
            try:
                self.sequencer.restore(state)
                log.info("logmux: resumed the saved sequence at seq %d", self.sequencer.next_seq)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("logmux: ignoring the saved sequence in %s: %s", self.state_file, exc)
                self.sequencer = self._new_sequencer()
                state = None
        if state is None:
            await self._rebuild_from_files()
        for addr, url in self.settings.aggregators.items():
            self._add(addr, url)
        self._follower = asyncio.create_task(self._follow_discoverd(), name="logmux discoverd")

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in self.shippers.values()), *self._stopping)
        self.shippers.clear()
        try:
            write_json_atomic(self.state_file, self.sequencer.to_state(), fsync=False, mode=0o600)
        except OSError as exc:
            log.warning("logmux: cannot save the sequence in %s: %s", self.state_file, exc)

    def _load_state(self) -> dict[str, Any] | None:
        """The sequence a cleanly stopped daemon saved, once: the file goes at once, so that a
        daemon that crashes later does not take up a sequence it has moved past."""
        try:
            raw = self.state_file.read_text()
        except FileNotFoundError:
            return None
        finally:
            with contextlib.suppress(OSError):
                self.state_file.unlink()
        try:
            state = json.loads(raw)
            if state.get("version") != 1 or state.get("host_id") != self.host.config.id:
                raise ValueError("another version or host")
            return dict(state)
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("logmux: ignoring the saved sequence in %s: %s", self.state_file, exc)
            return None

    async def _rebuild_from_files(self) -> None:
        """No saved sequence (a crash, or a first start): fill the ring with the newest lines of
        the running jobs, merged by time, so an aggregator that was away can be resumed by time.
        Their `last_n` makes the lines the hook offers again duplicates."""
        jobs = [info for jid, job in self.host.jobs.jobs.items()
                if not job.ended and (info := self.sequencer.job(jid)) is not None]  # fmt: skip
        if not jobs:
            return
        limit = self.settings.ring_messages
        share = max(RECOVER_BYTES // len(jobs), 256 * 1024)

        newest: dict[str, int] = {}  # each job's newest line

        def read() -> list[tuple[int, int, JobInfo, dict[str, Any]]]:
            per_job = []
            for k, info in enumerate(jobs):
                entries = tail_entries(info.log_path, limit, share)
                if entries:
                    newest[info.job_id] = entries[-1]["n"]
                per_job.append([(parse_time(e["t"]), k, info, e) for e in entries])
            merged = list(heapq.merge(*per_job, key=lambda x: (x[0], x[1])))
            return merged[-limit:]

        merged = await asyncio.to_thread(read)
        for _, _, info, entry in merged:
            self.sequencer.offer(info.job_id, entry)
        # a job whose lines were all older than the newest `limit`: what the hook offers
        # again of it is old too
        for info in jobs:
            info.last_n = max(info.last_n, newest.get(info.job_id, 0))
        log.info("logmux: no saved sequence: took up the newest %d lines of %d running jobs",
                 len(merged), len(jobs))  # fmt: skip

    # --- shippers -----------------------------------------------------------------------------

    def _add(self, addr: str, url: str) -> None:
        old = self.shippers.get(addr)
        if old is not None:
            if old.api_url == url:
                return
            self._stop_later(old)
        shipper = self.shippers[addr] = Shipper(self.sequencer, addr, url)
        shipper.start()
        log.info("logmux: shipping to %s (API %s)", addr, url)

    def _remove(self, addr: str) -> None:
        self._discovered.discard(addr)
        if addr in self.settings.aggregators:
            return  # configured: it stays
        shipper = self.shippers.pop(addr, None)
        if shipper is not None:
            log.info("logmux: %s went away: no longer shipping to it", addr)
            self._stop_later(shipper)

    def _stop_later(self, shipper: Shipper) -> None:
        task = asyncio.create_task(shipper.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _follow_discoverd(self) -> None:
        """Follow the aggregator's instances in discoverd, from whichever URLs the host has
        (none until discoverd's job tells it: then look again later)."""
        while True:
            urls = self.host.discoverd_urls()
            if urls:
                try:
                    await self._watch(urls)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - no service yet, discoverd away: retry
                    log.debug("logmux: watching %s in discoverd: %s", SERVICE, exc)
            await asyncio.sleep(DISCOVERD_RETRY)

    async def _watch(self, urls: list[str]) -> None:
        """Apply the service's events until the watch fails or the host's discoverd URLs
        change."""
        from flynn_discoverd.client import Client

        async def urls_changed() -> None:
            # the host tells no one when discoverd moves: look now and then
            while self.host.discoverd_urls() == urls:  # noqa: ASYNC110
                await asyncio.sleep(DISCOVERD_RETRY)

        async with Client(urls) as client:
            tasks = {asyncio.create_task(self._apply_events(client)),
                     asyncio.create_task(urls_changed())}  # fmt: skip
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # the watch's error, if that is what ended it
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _apply_events(self, client: Any) -> None:
        from flynn_discoverd.types import CURRENT, DOWN, UP, UPDATE

        stale = set(self._discovered)  # what an earlier watch found: checked at `current`
        async for ev in client.watch(SERVICE, (UP, UPDATE, DOWN, CURRENT)):
            inst = ev.instance
            if ev.kind in (UP, UPDATE) and inst is not None:
                stale.discard(inst.addr)
                self._discovered.add(inst.addr)
                if inst.addr not in self.settings.aggregators:  # a configured API URL wins
                    port = inst.meta.get("api_port") or self.settings.api_port
                    self._add(inst.addr, api_url(inst.host, int(port)))
            elif ev.kind == DOWN and inst is not None:
                self._remove(inst.addr)
            elif ev.kind == CURRENT:
                for addr in stale:
                    self._remove(addr)
                stale = set()

    def status(self) -> dict[str, Any]:
        return {
            "sequence": self.sequencer.stats(),
            "shippers": [s.status() for s in self.shippers.values()],
        }
