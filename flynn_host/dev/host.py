"""A throwaway flynn-host daemon with all its paths under one temporary directory, for tests,
the demo and benchmarks: started as a real `flynn-host daemon` process and, whatever happened,
removed completely (jobs stopped, shims killed, runc state deleted, mounts, loop devices and
cgroups removed). Beside it, what every test directory shares: free loopback ports, waiting for
a condition instead of sleeping, and the rule for programs `make dev` installs (a run as root
fails without them, any other run skips)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from flynn_host.atomicfile import write_atomic
from flynn_host.client import HostAPIError, HostClient, auth_headers
from flynn_host.runtime import images
from flynn_host.runtime.cgroups import remove_cgroups
from flynn_host.types import job_key

ROOT = Path(__file__).resolve().parents[2]
IMAGES = images.images_dir()


T = TypeVar("T")


def free_ports(n: int, offsets: tuple[int, ...] = ()) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held open together, so none repeats). With
    `offsets`, every `port + offset` is free too, e.g. `offsets=(1268, 1269)` for discoverd API
    ports, whose etcd member listens on the API port + 1268 (clients) and + 1269 (peers)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(100 * n):
            if len(ports) == n:
                break
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            port = s.getsockname()[1]
            try:
                for offset in offsets:
                    extra = socket.socket()
                    socks.append(extra)
                    extra.bind(("127.0.0.1", port + offset))
            except OSError:  # taken (or past 65535): try another port
                continue
            ports.append(port)
        if len(ports) < n:
            raise RuntimeError(f"no {n} free ports on 127.0.0.1 with offsets {offsets}")
        return ports
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    check: Callable[[], T],
    timeout: float = 30.0,
    what: str = "",
    every: float = 0.05,
    ignoring: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `check` until it returns something true and return that: how tests wait for an
    event (a log line, a state, a process) instead of sleeping a fixed time. Exceptions of the
    `ignoring` types count as "not yet". After `timeout` seconds it raises AssertionError
    naming `what` it waited for and the last result."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last: Any = check()
            if last:
                return last
        except ignoring as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what or 'condition'} not met after {timeout}s: {last!r}")
        time.sleep(every)


async def wait_for_async(
    check: Callable[[], T | Awaitable[T]],
    within: float = 30.0,
    what: str = "",
    every: float = 0.05,
    ignoring: tuple[type[BaseException], ...] = (),
) -> T:
    """`wait_for` inside an event loop, for up to `within` seconds: `check` may be a coroutine
    function, and the loop runs on between checks."""
    deadline = time.monotonic() + within
    while True:
        try:
            last: Any = check()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last
        except ignoring as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what or 'condition'} not met after {within}s: {last!r}")
        await asyncio.sleep(every)


def missing_programs(*programs: str) -> list[str]:
    """Those of `programs` (names on PATH, or absolute paths) that are not there."""
    return [
        p for p in programs if not (os.access(p, os.X_OK) if os.path.isabs(p) else shutil.which(p))
    ]


def require_programs(*programs: str) -> None:
    """In a test or fixture: go on only if every program is installed. `make dev` installs
    them all, and a run as root is the full run, so there a missing one fails the test with what
    to do; a run as another user (which skips the root tests anyway) skips the test."""
    import pytest  # a development dependency, as the tests are: not needed by the demo

    missing = missing_programs(*programs)
    if not missing:
        return
    what = f"needs {', '.join(missing)}, which `make dev` installs"
    if os.geteuid() == 0:
        pytest.fail(f"{what}: missing in a run as root (run `make dev`)", pytrace=False)
    pytest.skip(what)


@contextlib.contextmanager
def etcd_member(prefix: str) -> Iterator[Any]:
    """In a test: one real etcd member (discoverd's `EtcdProcess`) on free loopback ports in a
    temporary directory, stopped and removed afterwards, whatever happened."""
    from flynn_discoverd.etcd import EtcdProcess  # a plugin's: only its tests' fixtures use this

    require_programs("etcd")
    client_port, peer_port = free_ports(2)
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as tmp,
        EtcdProcess("m1", Path(tmp) / "m1", client_port=client_port, peer_port=peer_port) as p,
    ):
        yield p


def busybox_job(job_id: str, args: list[str], **config: Any) -> dict[str, Any]:
    manifest, _ = images.load_manifest(str(IMAGES / "busybox" / "manifest.json"), IMAGES)
    resources = config.pop("resources", {})
    partition = config.pop("partition", None)
    return {
        **({"partition": partition} if partition else {}),
        "id": job_id,
        "mountspecs": images.mountspecs_for(manifest, images.local_layer_template(IMAGES)),
        "config": {"args": args, **config},
        "resources": resources,
    }


@dataclass
class Daemon:
    """One running `flynn-host daemon` with everything under `base`."""

    host_id: str
    port: int
    base: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    # the cluster's host key the daemon requires (None: a daemon that requires none)
    key: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client(self) -> HostClient:
        return HostClient(f"127.0.0.1:{self.port}", key=self.key)

    @property
    def auth_headers(self) -> dict[str, str]:
        """Headers to add to a hand-made HTTP request to this daemon's API."""
        return auth_headers(self.key)

    @property
    def cli_env(self) -> dict[str, str]:
        """The environment of a `flynn-host` command run on this host: it finds the daemon,
        the images and the host key as an operator's command finds them."""
        return {**os.environ, "FLYNN_HOST_ADDR": f"127.0.0.1:{self.port}",
                "FLYNN_IMAGES": str(IMAGES),
                "FLYNN_HOST_CONFIG": str(self.base / "host.json")}  # fmt: skip

    def args(self) -> list[str]:
        b = self.base
        return [
            sys.executable, "-m", "flynn_host.cli.main", "daemon",
            "--id", self.host_id, "--http-port", str(self.port), "--listen-ip", "127.0.0.1",
            "--state", str(b / "state.json"), "--volpath", str(b / "vol"),
            "--work-dir", str(b / "work"), "--run-dir", str(b / "run"),
            "--log-dir", str(b / "log"), "--log-file", str(b / "daemon.log"),
            "--stop-timeout", "3", *self.extra_args,
        ]  # fmt: skip

    def write_host_config(self, data: dict[str, Any] | None = None) -> Path:
        """Write the daemon's host.json: `data` and a new host key (root-only, as `flynn-host
        init` writes it)."""
        self.key = self.key or secrets.token_hex(32)
        path = self.base / "host.json"
        write_atomic(path, json.dumps({"host_key": self.key, **(data or {})}), fsync=False,
                     mode=0o600)  # fmt: skip
        return path

    def start(self, timeout: float = 20.0) -> None:
        env = {**os.environ, "FLYNN_HOST_CONFIG": str(self.base / "host.json"), **self.env}
        if not (self.base / "host.json").exists():
            self.write_host_config()
        self.proc = subprocess.Popen(self.args(), env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError, ConnectionError):
                self.client.status()
                return
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not answer in {timeout}s: {self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "daemon.log").read_text()[-3000:]
        return ""

    def run_cli(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flynn_host.cli.main", *args],
            env=kw.pop("env", self.cli_env), capture_output=True, text=True,
            timeout=kw.pop("timeout", 60), cwd=ROOT, **kw,
        )  # fmt: skip

    def wait_job(self, job_id: str, states: tuple[str, ...] = ("done", "crashed", "failed"),
                 timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(HostAPIError):
                job = self.client.get_job(job_id)
                if job["status"] in states:
                    return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {job}")

    def job_output(self, job_id: str) -> list[str]:
        """The lines the job has logged so far, stdout and stderr (read from its log file, so
        a test can poll it cheaply)."""
        from flynn_host.runtime.logs import read_entries

        return [e["m"] for e in read_entries(str(self.base / "log" / f"{job_id}.log"))]

    def wait_output(self, job_id: str, line: str, timeout: float = 30.0) -> None:
        """Wait until the job has logged `line` (a whole line)."""
        wait_for(lambda: line in self.job_output(job_id), timeout, f"{job_id} logging {line!r}")

    def wait_cleaned(self, job_id: str, timeout: float = 30.0) -> None:
        """Wait until the daemon has removed the job's container (its state says how the job
        ended a moment before the clean-up is done)."""
        dirs = [self.base / "work" / "jobs" / job_key(job_id),
                self.base / "run" / self.host_id / "jobs" / job_key(job_id)]  # fmt: skip
        deadline = time.monotonic() + timeout
        while any(d.exists() for d in dirs):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not cleaned up after {timeout}s")
            time.sleep(0.05)

    def new_job_id(self) -> str:
        return f"{self.host_id}-{uuid.uuid4().hex}"

    def remove_containers(self) -> None:
        """Kill this host's shims and delete its runc containers (what a daemon that did not
        stop cleanly leaves)."""
        run_dir = self.base / "run"
        runc_root = run_dir / self.host_id / "runc"
        # `python -m flynn_host.runtime.shim <run>/...` from source, `flynn-host shim <run>/...`
        # frozen
        out = subprocess.run(["pgrep", "-f", f"shim {run_dir}/"],
                             capture_output=True, text=True).stdout  # fmt: skip
        for pid in out.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        delete_runc_containers(runc_root)

    def cleanup(self) -> None:
        """Whatever happened: no process, container, mount, loop device or cgroup left."""
        self.stop()
        self.remove_containers()
        for mnt in sorted(mounts_under(self.base), key=len, reverse=True):
            subprocess.run(["umount", "-d", "-l", mnt], capture_output=True)
        remove_cgroups(f"flynn/{self.host_id}")
        shutil.rmtree(self.base, ignore_errors=True)


def delete_runc_containers(runc_root: Path) -> None:
    """Force-delete every container a runc root knows (killing what still runs)."""
    if not runc_root.exists():
        return
    ids = subprocess.run(["runc", "--root", str(runc_root), "list", "-q"],
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    for cid in ids:
        subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", cid],
                       capture_output=True)  # fmt: skip


def mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [ln.split()[1] for ln in f if ln.split()[1].startswith(str(base))]


def make_daemon(host_id: str | None = None, start: bool = True, **kw: Any) -> Daemon:
    """A daemon under a fresh short directory in /tmp (unix socket paths must stay short)."""
    base = Path(tempfile.mkdtemp(prefix="fh-", dir="/tmp"))
    d = Daemon(host_id or f"h{uuid.uuid4().hex[:8]}", free_port(), base, **kw)
    if start:
        try:
            d.start()
        except BaseException:
            d.cleanup()
            raise
    return d
