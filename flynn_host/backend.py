"""The container-backend contract: what the job manager needs from whatever runs a job.

Like a Nomad task driver, a backend is a narrow boundary: a handful of async methods keyed by
job id, configured through its constructor (the `container_backend` component's factory gets
the `Host`), with one lifecycle (`running`) instead of set-up, tear-down and clean-up calls to
be made in the right order. The job manager owns everything around the container: the state
machine, start slots, events, stop timeouts, volumes, and the job's network, which it makes
before `start` and hands over as a `NetworkIsolation` (as Nomad gives a driver its network
isolation spec). A backend never imports networking.

The built-in backend is `flynn_host.runtime.runc.RuncBackend`; `tests/test_backend_protocol.py`
has a second one, which mypy checks against `ContainerBackend` and the tests use to exercise the
job manager without runc. `docs/plugin_hooks.md` documents each member; a test keeps the two in
step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flynn_host.types import Job


class StartError(Exception):
    """The container could not be started; the message is what the job's `error` says."""


@dataclass(frozen=True)
class ExitInfo:
    """How a container ended: its exit status and, when it did not end on its own (an OOM
    kill, a signal, a lost container), the error the job shows."""

    status: int
    error: str | None = None


@dataclass(frozen=True)
class NetworkIsolation:
    """The network the job manager made for a job, which `start` puts its container in.

    All empty (a `host_network` job, or any job while the host has no network): the backend
    gives the container the host's network for `host_network`, else a namespace of its own
    with loopback only.
    """

    # the network namespace to join (a path such as /var/run/netns/fj-<key>)
    netns: str = ""
    # the job's address in it, which the job sees as EXTERNAL_IP
    address: str = ""
    # a host file to bind read-only at the container's /etc/resolv.conf
    resolv_conf: str = ""


class ContainerBackend(Protocol):
    """Runs jobs' containers on this host. Every method but `start`, `fetch` and `recover`
    takes the job id; those three get the job's Flynn spec, since what they do depends on it.
    Methods other than `running` are called only while `running` is entered."""

    def running(self, known_job_ids: set[str]) -> AbstractAsyncContextManager[None]:
        """The backend's life on this host, entered once by the daemon before any job is
        recovered or started and left after the last job was stopped or left to run.

        Entering prepares host-wide state (directories, cgroup partitions), kills every
        container an earlier daemon left if the host was started with `--force`, and removes
        containers and files of jobs not in `known_job_ids` (the jobs of the state file,
        which are recovered or settled next). Leaving undoes the host-wide set-up but leaves
        containers running: the job manager stops them first unless the daemon leaves them
        for the next one (SIGQUIT)."""
        ...

    @property
    def layers_in_use(self) -> set[str]:
        """Ids of the layers the containers this backend holds use: at start-up the daemon
        unmounts the others, and image `gc` keeps them."""
        ...

    def log_path(self, job_id: str) -> Path:
        """The job's log file (`flynn_host.runtime.logs` format, rotated to `<path>.1`), which the
        API reads once the job has ended and the manager deletes when it forgets the job."""
        ...

    async def fetch(self, job: Job) -> None:
        """Bring what the job needs from the network (its layers) onto the host. Called
        before `start` and outside the start slots, so it may wait; cancelled when the job is
        stopped meanwhile, leaving nothing partial. Raises `StartError` for a bad or missing
        layer."""
        ...

    async def start(self, job: Job, volume_paths: dict[str, str], network: NetworkIsolation) -> int:
        """Start the job's container and return its pid. `volume_paths` maps each of the
        job's volume ids to its host directory; `network` is where the container's network
        goes. On failure everything the backend made is undone (nothing of `network`: that is
        the manager's) and `StartError` carries the message the job's `error` should show;
        any other exception is reported as `start failed: <it>`."""
        ...

    async def wait(self, job_id: str) -> ExitInfo:
        """Wait until the job's container exits (at once if it already has, also while the
        daemon was down) and say how it ended. Never raises for the container's own failure:
        a container that vanished is `ExitInfo(-1, error)`."""
        ...

    async def signal(self, job_id: str, sig: int) -> None:
        """Send signal `sig` to the job (its init passes it on to the job's processes);
        raises when the container is not there to receive it."""
        ...

    async def attach(
        self, job_id: str, request: dict[str, Any]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to the running container speaking Flynn's attach framing for `request`
        (the body of `POST /attach`), which the API proxies byte for byte. Raises `OSError`
        when the container is gone."""
        ...

    def follow_logs(self, job_id: str, since: int) -> AsyncIterator[dict[str, Any]]:
        """An async iterator of the job's log entries after number `since`, live, ending when
        the container exits. Raises `OSError` or `ConnectionError` when it cannot follow;
        the manager then reads what it missed from `log_path`."""
        ...

    async def destroy(self, job_id: str) -> None:
        """Remove every trace of the job's container (processes, mounts, directories,
        cgroups) and release what it held. Idempotent; also for a job whose start was cut
        short by a daemon that died."""
        ...

    async def recover(self, job: Job) -> bool:
        """After a daemon restart, for a job that was running: take back what `start` took
        for it (its layers) and say whether its container still runs. `wait` then reports
        how it ended either way."""
        ...
