"""The container-backend contract (`flynn_host.backend.ContainerBackend`) and the job manager's
own logic, without runc.

`RecordingBackend` is a second, minimal backend: no containers, only a record of what the job
manager asked and futures the tests resolve to end a "container". `make lint` runs mypy on this
file too, so it is checked against the Protocol as the runc backend is (`JobManager` takes a
`ContainerBackend`, and `CONFORMS` below says so outright). With it the tests drive the state
machine, events, stop → SIGKILL after the stop timeout, start-failure clean-up, stopping a
starting job, recovery after a restart and the job network's attach/detach, in milliseconds.
The table of members in `docs/plugin_hooks.md` is checked against the Protocol here as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from flynn_host.backend import ContainerBackend, ExitInfo, NetworkIsolation, StartError
from flynn_host.config import HostConfig
from flynn_host.errors import FlynnError
from flynn_host.jobs import STOPPED_WHILE_STARTING, JobManager
from flynn_host.networking.jobnet import JobNetwork
from flynn_host.runtime.volumes import VolumeManager
from flynn_host.types import ActiveJob, Job

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugin_hooks.md"
LAYER = {"url": "file:///nowhere/layer.squashfs", "size": 1, "hashes": {"sha512_256": "0" * 64}}


class RecordingBackend:
    """A `ContainerBackend` that runs nothing. Each call is appended to `calls`; a started
    job's "container" runs until the test calls `exit`, or a signal ends it (SIGTERM unless
    the job id is in `ignores_sigterm`). `fetch` and `start` wait while their gate is clear,
    and `start` raises `start_error` when set."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.calls: list[tuple[Any, ...]] = []
        self.progress = asyncio.Event()  # set on every call (and, by the harness, event)
        self.fetch_gate = asyncio.Event()
        self.start_gate = asyncio.Event()
        self.fetch_gate.set()
        self.start_gate.set()
        self.start_error: Exception | None = None
        self.ignores_sigterm: set[str] = set()
        self.alive: set[str] = set()  # recovered jobs whose "container" still runs
        self.log_lines: dict[str, list[dict[str, Any]]] = {}
        self._exits: dict[str, asyncio.Future[ExitInfo]] = {}
        self._held: dict[str, set[str]] = {}
        self._pids = iter(range(1000, 2000))

    # --- the Protocol -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(self, known_job_ids: set[str]) -> AsyncIterator[None]:
        self._record("running", sorted(known_job_ids))
        try:
            yield
        finally:
            self._record("stopped")

    @property
    def layers_in_use(self) -> set[str]:
        return {layer for layers in self._held.values() for layer in layers}

    def log_path(self, job_id: str) -> Path:
        return self.log_dir / f"{job_id}.log"

    async def fetch(self, job: Job) -> None:
        self._record("fetch", job.id)
        await self.fetch_gate.wait()

    async def start(self, job: Job, volume_paths: dict[str, str], network: NetworkIsolation) -> int:
        self._record("start", job.id, dict(volume_paths), network)
        await self.start_gate.wait()
        if self.start_error is not None:
            raise self.start_error
        self._held[job.id] = {m.id for m in job.mountspecs}
        self._exits[job.id] = asyncio.get_running_loop().create_future()
        return next(self._pids)

    async def wait(self, job_id: str) -> ExitInfo:
        self._record("wait", job_id)
        return await self._exits[job_id]

    async def signal(self, job_id: str, sig: int) -> None:
        self._record("signal", job_id, signal.Signals(sig).name)
        if job_id not in self._exits:
            raise RuntimeError(f"job {job_id} has no container")
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and job_id not in self.ignores_sigterm):
            self.exit(job_id, 128 + sig, f"killed by signal {signal.Signals(sig).name}")

    async def attach(
        self, job_id: str, request: dict[str, Any]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise OSError(f"job {job_id}: the recording backend has no attach socket")

    async def follow_logs(self, job_id: str, since: int) -> AsyncIterator[dict[str, Any]]:
        for entry in self.log_lines.get(job_id, []):
            if entry["n"] > since:
                yield entry

    async def destroy(self, job_id: str) -> None:
        self._record("destroy", job_id)
        self._held.pop(job_id, None)
        future = self._exits.pop(job_id, None)
        if future is not None and not future.done():
            future.set_result(ExitInfo(-1, "destroyed"))

    async def recover(self, job: Job) -> bool:
        self._record("recover", job.id)
        self._held[job.id] = {m.id for m in job.mountspecs}
        self._exits[job.id] = asyncio.get_running_loop().create_future()
        if job.id not in self.alive:
            self.exit(job.id, 0)
        return job.id in self.alive

    # --- for the tests ------------------------------------------------------------------------
    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        self.progress.set()

    def exit(self, job_id: str, status: int, error: str | None = None) -> None:
        """The job's "container" ends."""
        future = self._exits[job_id]
        if not future.done():
            future.set_result(ExitInfo(status, error))

    def names(self, job_id: str) -> list[str]:
        """What was asked about `job_id`, in order: `start`, `signal SIGTERM`, ..."""
        return [" ".join([c[0], *c[2:3]] if c[0] == "signal" else [c[0]])
                for c in self.calls if len(c) > 1 and c[1] == job_id]  # fmt: skip


# checked by mypy: the recording backend is a ContainerBackend, as RuncBackend is
CONFORMS: type[ContainerBackend] = RecordingBackend


class RecordingNetwork(JobNetwork):
    """The host's job network with the namespaces and veths left out: attach hands out the
    next address and records the call, detach records it."""

    def __init__(self, config: HostConfig) -> None:
        super().__init__(config)
        self.calls: list[tuple[str, str, bool | None]] = []
        self._next = 2

    async def attach(self, job_id: str, sandboxed: bool = True) -> tuple[str, str] | None:
        self.calls.append(("attach", job_id, sandboxed))
        self._next += 1
        return f"/var/run/netns/test-{job_id}", f"100.100.0.{self._next}"

    async def detach(self, job_id: str) -> None:
        self.calls.append(("detach", job_id, None))


def make_job(job_id: str, **config: Any) -> Job:
    partition = config.pop("partition", "user")
    config = {"args": ["sleep", "600"], **config}
    raw = {"id": job_id, "mountspecs": [LAYER], "config": config, "partition": partition}
    return Job.from_json(raw)


class Harness:
    """A JobManager over the recording backend, with its events collected."""

    def __init__(self, tmp_path: Path, network: JobNetwork | None = None, **kw: Any) -> None:
        self.backend = RecordingBackend(tmp_path / "logs")
        self.backend.log_dir.mkdir()
        self.volumes = VolumeManager(tmp_path / "volumes")
        self.events: list[tuple[str, str, str]] = []
        self.tmp_path = tmp_path
        self.network = network
        self.kw = kw
        self.jobs = self.manager()

    def manager(self) -> JobManager:
        def on_event(event: dict[str, Any]) -> None:
            self.events.append((event["event"], event["job_id"], event["job"]["status"]))
            self.backend.progress.set()

        return JobManager("host1", self.tmp_path / "state.json", self.backend, self.volumes,
                          self.network, on_event=on_event, **self.kw)  # fmt: skip

    def event_names(self, job_id: str) -> list[str]:
        return [name for name, jid, _ in self.events if jid == job_id]

    async def until(self, check: Callable[[], bool]) -> None:
        """Wait (5 s at most) until `check()` holds, checking after each call or event."""

        async def progress() -> None:
            while not check():
                self.backend.progress.clear()
                await self.backend.progress.wait()

        await asyncio.wait_for(progress(), 5)

    async def ended(self, job_id: str) -> ActiveJob:
        await self.until(lambda: "cleanup" in self.event_names(job_id))
        return self.jobs.get(job_id)

    async def running(self, job_id: str) -> ActiveJob:
        await asyncio.wait_for(self.jobs.wait_started(job_id), 5)
        return self.jobs.get(job_id)


# --- the contract and its documentation ------------------------------------------------------


def protocol_members() -> dict[str, Any]:
    return {n: v for n, v in vars(ContainerBackend).items() if not n.startswith("_")}


def documented_members() -> dict[str, tuple[bool, list[str] | None]]:
    """The backend table in plugin_hooks.md: member -> (async?, argument names or None for a
    property), from first cells such as `` `async start(job, volume_paths, network) -> int` ``."""
    text = DOCS.read_text()
    section = text.split("### `container_backend`", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    out: dict[str, tuple[bool, list[str] | None]] = {}
    for row in rows:
        cell = row.split("|")[1].strip().strip("`")
        m = re.fullmatch(r"(async )?(\w+)(?:\(([^)]*)\))?( -> .*)?", cell)
        assert m, f"{DOCS.name}: backend member {cell!r}: expected '[async ]name[(args)][ -> T]'"
        plain = None if m[3] is None else re.sub(r"\[[^]]*\]", "", m[3])  # dict[str, str]
        args = None if plain is None else [a.split(":")[0].strip() for a in plain.split(",") if a]
        out[m[2]] = (bool(m[1]), args)
    return out


def test_docs_table_lists_every_backend_member_and_nothing_else() -> None:
    members, documented = protocol_members(), documented_members()
    assert members, "no members found on ContainerBackend"
    missing = sorted(set(members) - set(documented))
    unknown = sorted(set(documented) - set(members))
    assert not missing, f"ContainerBackend members missing from {DOCS.name}'s table: {missing}"
    assert not unknown, f"{DOCS.name} documents backend members that do not exist: {unknown}"
    for name, member in members.items():
        is_async, args = documented[name]
        if isinstance(member, property):
            assert args is None and not is_async, f"{name} is a property"
            continue
        params = [p for p in inspect.signature(member).parameters if p != "self"]
        assert args == params, f"{name}: documented as {args}, is {params}"
        assert is_async == inspect.iscoroutinefunction(member), f"{name}: async or not?"
        assert member.__doc__, f"ContainerBackend.{name} has no docstring (its contract)"


def test_recording_backend_has_every_member_with_the_same_arguments() -> None:
    for name, member in protocol_members().items():
        impl = getattr(RecordingBackend, name)
        if isinstance(member, property):
            assert isinstance(impl, property), name
            continue
        assert inspect.signature(impl).parameters.keys() == (
            inspect.signature(member).parameters.keys()
        ), name


# --- the job manager's logic ------------------------------------------------------------------


async def test_a_job_runs_and_ends_done_with_its_events(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.jobs.add(make_job("j1", args=["true"]))
    job = await h.running("j1")
    assert (job.status, job.pid) == ("running", 1000)
    h.backend.exit("j1", 0)
    job = await h.ended("j1")
    assert (job.status, job.exit_status, job.error, job.pid) == ("done", 0, None, None)
    assert h.events == [("create", "j1", "starting"), ("start", "j1", "running"),
                        ("stop", "j1", "done"), ("cleanup", "j1", "done")]  # fmt: skip
    assert h.backend.names("j1") == ["fetch", "start", "wait", "destroy"]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["jobs"]["j1"]["status"] == "done"


@pytest.mark.parametrize(
    ("status", "error", "ends"),
    [(3, None, "crashed"), (0, "out of memory", "crashed"), (0, None, "done")],
)
async def test_how_a_container_ended_decides_done_or_crashed(
    tmp_path: Path, status: int, error: str | None, ends: str
) -> None:
    h = Harness(tmp_path)
    h.jobs.add(make_job("j1"))
    await h.running("j1")
    h.backend.exit("j1", status, error)
    job = await h.ended("j1")
    assert (job.status, job.exit_status, job.error) == (ends, status, error)


async def test_stop_sends_sigterm_then_sigkill_after_the_stop_timeout(tmp_path: Path) -> None:
    h = Harness(tmp_path, stop_timeout=0.05)
    h.backend.ignores_sigterm.add("stubborn")
    for jid in ("stubborn", "polite"):
        h.jobs.add(make_job(jid))
        await h.running(jid)
        h.jobs.stop(jid)
    stubborn, polite = await h.ended("stubborn"), await h.ended("polite")
    assert h.backend.names("stubborn") == ["fetch", "start", "wait", "signal SIGTERM",
                                            "signal SIGKILL", "destroy"]  # fmt: skip
    assert (stubborn.status, stubborn.error) == ("crashed", "killed by signal SIGKILL")
    assert h.backend.names("polite") == ["fetch", "start", "wait", "signal SIGTERM", "destroy"]
    assert polite.force_stop and polite.status == "crashed"


async def test_a_start_error_fails_the_job_and_cleans_up(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    vol = h.volumes.create()["id"]
    vol_path = str(h.volumes.path(vol))
    h.backend.start_error = StartError("no such layer")
    volumes = [{"volume": vol, "target": "/data", "delete_on_stop": True}]
    h.jobs.add(make_job("j1", volumes=volumes))
    job = await h.ended("j1")
    assert (job.status, job.error, job.pid) == ("failed", "no such layer", None)
    assert h.event_names("j1") == ["create", "error", "cleanup"]
    assert h.backend.names("j1") == ["fetch", "start", "destroy"]
    start = h.backend.calls[1]
    assert start[2] == {vol: vol_path}
    with pytest.raises(FlynnError):
        h.volumes.get(vol)  # delete_on_stop


async def test_any_other_start_exception_is_start_failed(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.backend.start_error = RuntimeError("mkfs.ext2: disk full")
    h.jobs.add(make_job("j1"))
    job = await h.ended("j1")
    assert (job.status, job.error) == ("failed", "start failed: mkfs.ext2: disk full")


async def test_stop_while_fetching_cancels_at_once(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.backend.fetch_gate.clear()  # a stalled download
    h.jobs.add(make_job("j1"))
    await h.until(lambda: h.backend.names("j1") == ["fetch"])
    h.jobs.stop("j1")
    job = await h.ended("j1")
    assert (job.status, job.error) == ("failed", STOPPED_WHILE_STARTING)
    assert h.backend.names("j1") == ["fetch", "destroy"]  # never started
    assert h.event_names("j1") == ["create", "error", "cleanup"]


async def test_stop_during_local_start_work_undoes_the_container_after_it(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    h.backend.start_gate.clear()  # mounts and runc take a while
    h.jobs.add(make_job("j1"))
    await h.until(lambda: h.backend.names("j1") == ["fetch", "start"])
    h.jobs.stop("j1")
    h.jobs.stop("j1")  # however many DELETEs
    await asyncio.sleep(0.01)
    assert h.jobs.get("j1").status == "starting"  # the local work is not cut off midway
    h.backend.start_gate.set()
    job = await h.ended("j1")
    assert (job.status, job.error) == ("failed", STOPPED_WHILE_STARTING)
    assert h.backend.names("j1") == ["fetch", "start", "destroy"]
    assert "start" not in h.event_names("j1")


async def test_start_slots_bound_local_work_and_429_when_full(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_concurrency=1)
    h.backend.start_gate.clear()
    h.jobs.add(make_job("j1"))
    await h.until(lambda: h.backend.names("j1") == ["fetch", "start"])
    with pytest.raises(FlynnError) as e:
        h.jobs.add(make_job("j2"))
    assert (e.value.code, e.value.retry) == ("ratelimited", True)
    h.backend.start_gate.set()
    await h.running("j1")
    h.jobs.add(make_job("j2"))
    await h.running("j2")


async def test_signal_only_reaches_a_running_job(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.backend.start_gate.clear()
    h.jobs.add(make_job("j1"))
    await h.until(lambda: h.backend.names("j1") == ["fetch", "start"])
    with pytest.raises(FlynnError, match="is starting, not running"):
        await h.jobs.signal("j1", signal.SIGUSR1)
    h.backend.start_gate.set()
    await h.running("j1")
    await h.jobs.signal("j1", signal.SIGUSR1)
    assert h.backend.names("j1")[-1] == "signal SIGUSR1"


async def test_log_lines_reach_the_log_hook_once(tmp_path: Path) -> None:
    lines: list[tuple[str, str]] = []
    h = Harness(tmp_path, on_log=lambda jid, entry: lines.append((jid, entry["m"])))
    h.backend.log_lines["j1"] = [{"n": 1, "m": "one"}, {"n": 2, "m": "two"}]
    h.jobs.add(make_job("j1"))
    await h.running("j1")
    await h.until(lambda: len(lines) == 2)
    h.backend.exit("j1", 0)
    await h.ended("j1")
    assert lines == [("j1", "one"), ("j1", "two")]


# --- the job network, made by the manager -----------------------------------------------------


@pytest.fixture
def network(tmp_path: Path) -> RecordingNetwork:
    return RecordingNetwork(HostConfig(state=tmp_path / "state.json"))


async def test_user_jobs_get_a_sandboxed_namespace_and_its_address(
    tmp_path: Path, network: RecordingNetwork
) -> None:
    h = Harness(tmp_path, network)
    h.jobs.add(make_job("user"))
    h.jobs.add(make_job("system", partition="system"))
    h.jobs.add(make_job("host", partition="system", host_network=True))
    for jid in ("user", "system", "host"):
        await h.running(jid)
    starts = {c[1]: c[3] for c in h.backend.calls if c[0] == "start"}
    resolv = str(network.resolv_conf)
    assert starts == {
        "user": NetworkIsolation("/var/run/netns/test-user", "100.100.0.3", resolv),
        "system": NetworkIsolation("/var/run/netns/test-system", "100.100.0.4", resolv),
        "host": NetworkIsolation(),
    }
    assert network.calls == [("attach", "user", True), ("attach", "system", False)]
    assert [h.jobs.get(j).internal_ip for j in ("user", "system", "host")] == [
        "100.100.0.3", "100.100.0.4", ""
    ]  # fmt: skip
    for jid in ("user", "system", "host"):
        h.backend.exit(jid, 0)
        await h.ended(jid)
    assert network.calls[2:] == [("detach", "user", None), ("detach", "system", None)]


async def test_a_failed_start_detaches_the_network(
    tmp_path: Path, network: RecordingNetwork
) -> None:
    h = Harness(tmp_path, network)
    h.backend.start_error = StartError("runc: no")
    h.jobs.add(make_job("j1"))
    await h.ended("j1")
    assert network.calls[0] == ("attach", "j1", True)
    # at once when the start fails, and again (a no-op) when the job is cleaned up
    assert network.calls[1:] == [("detach", "j1", None)] * 2


async def test_a_job_without_a_host_network_gets_an_empty_isolation(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.jobs.add(make_job("j1"))
    await h.running("j1")
    assert h.backend.calls[1][3] == NetworkIsolation()


# --- recovery after a daemon restart ---------------------------------------------------------


async def test_restart_adopts_running_jobs_and_fails_starting_ones(
    tmp_path: Path, network: RecordingNetwork
) -> None:
    h = Harness(tmp_path, network)
    h.backend.start_gate.clear()
    for jid in ("alive", "ended"):
        h.jobs.add(make_job(jid))
    h.backend.start_gate.set()
    await h.running("alive")
    await h.running("ended")
    h.backend.start_gate.clear()
    h.jobs.add(make_job("half"))
    await h.until(lambda: h.backend.names("half") == ["fetch", "start"])
    await h.jobs.shutdown()  # SIGQUIT: jobs keep running, the state file says so

    h.backend = RecordingBackend(tmp_path / "logs")  # a new daemon
    h.backend.alive.add("alive")
    h.events.clear()
    network.calls.clear()
    h.jobs = h.manager()
    loaded = h.jobs.load()
    assert sorted(j.job.id for j in loaded) == ["alive", "ended", "half"]
    async with h.backend.running(set(h.jobs.jobs)):
        await h.jobs.recover()
        assert h.jobs.get("half").status == "failed"
        assert h.jobs.get("half").error == "host restarted while the job was starting"
        assert h.backend.names("half") == ["destroy"]
        assert ("detach", "half", None) in network.calls
        assert (await h.ended("ended")).status == "done"
        assert h.jobs.get("alive").status == "running"
        assert h.backend.layers_in_use == {"0" * 64}
        h.backend.exit("alive", 0)
        assert (await h.ended("alive")).status == "done"
    assert h.backend.calls[0] == ("running", ["alive", "ended", "half"])
    assert h.backend.calls[-1] == ("stopped",)
    assert h.backend.names("alive") == ["recover", "wait", "destroy"]


async def test_stop_all_stops_every_active_job(tmp_path: Path) -> None:
    h = Harness(tmp_path, stop_timeout=0.05)
    for jid in ("a", "b"):
        h.jobs.add(make_job(jid))
        await h.running(jid)
    await h.jobs.stop_all(grace=5)
    assert [h.jobs.get(j).status for j in ("a", "b")] == ["crashed", "crashed"]
