"""The runc container backend: one OCI bundle per job, run under a per-job shim.

For each job the backend mounts the job's squashfs layers (shared, reference-counted, through
the `LayerStore`), makes a writable layer on an ext2 image bounded by `temp_disk`, joins them
with overlayfs as the bundle's root filesystem, writes `config.json` and starts the shim
(`flynn_host.runtime.shim`), which runs `runc run --detach`, owns the container's stdio and
writes its log. Shims outlive the daemon, so a restarted daemon adopts running jobs through
their sockets.

Where things live, per job (`<key>` is a short hash of the job id, to keep unix socket paths
under the kernel's 108-byte limit):
  <work-dir>/jobs/<key>/disk.img, disk/{upper,work}, bundle/{config.json,rootfs}
  <run-dir>/<host id>/jobs/<key>/shim.json, shim.pid, container.pid, attach.sock, exit.json
  <log-dir>/<job id>.log
  cgroup /flynn/<host id>/<partition>/<job id> in every hierarchy
A job's environment (its secrets) is in config.json, the state file and often its log, and its
writable layer holds whatever it writes: these directories are 0700 and the files in them
0600, made so when they are created.

`RuncBackend` implements `flynn_host.backend.ContainerBackend`; the job's network namespace is
made by the job manager and given to `start`, so this module knows nothing of networking.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from flynn_host.backend import ExitInfo, NetworkIsolation, StartError
from flynn_host.client import HOST_KEY_ENV
from flynn_host.config import HostConfig
from flynn_host.runtime import bundle, cgroups
from flynn_host.runtime.hostbundle import host_bundle_mounts
from flynn_host.runtime.layers import LayerError, LayerStore
from flynn_host.runtime.shim.client import ShimPool, connect_shim, shim_request
from flynn_host.runtime.shim.startup import ShimConfig
from flynn_host.types import SYSTEM_PARTITION, Job, job_key

log = logging.getLogger(__name__)

SHIM_START_TIMEOUT = 60.0
MAX_SOCKET_PATH = 100


def private_dir(path: Path) -> None:
    """Make `path` a directory only root can enter (missing parents are made as usual); an
    existing one, made by an older version, is tightened too."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def write_private(path: Path, text: str) -> None:
    """Create `path` readable only by root (created with that mode: never readable by others,
    not even for a moment) and write `text` to it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as f:
        f.write(text)


def find_init() -> str:
    """tini-static from Debian's `tini` package: static, so it runs in any image."""
    for candidate in ("/usr/bin/tini-static", "/usr/local/bin/tini-static"):
        if os.path.exists(candidate):
            return candidate
    raise RuntimeError("tini-static not found: install Debian's 'tini' package")


async def run(*args: str, check: bool = True) -> tuple[int, str]:
    """Run a command (argument list, no shell); return its status and combined output."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace").strip()
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {text or f'exit status {proc.returncode}'}")
    return proc.returncode or 0, text


def mounted_paths() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1].replace("\\040", " ") for line in f}


async def unmount(path: Path, detach_loop: bool = False) -> None:
    if str(path) in mounted_paths():
        await run("umount", *(["-d"] if detach_loop else []), str(path))


def _pid_alive(pid: int, needle: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return needle.encode() in cmdline


class RuncBackend:
    """Runs jobs as runc containers (a `ContainerBackend`). Constructed once by the daemon
    from its config; `--force` (`config.force`) makes `running` kill what an earlier daemon
    left."""

    name = "runc"

    def __init__(self, config: HostConfig, layers: LayerStore) -> None:
        self.config = config
        self.layers = layers
        self.init_path = find_init()
        self.max_fd_ceiling = bundle.max_fd_ceiling()
        self.runc = shutil.which("runc") or "/usr/sbin/runc"
        self.shim_command = (
            [sys.executable, "shim"] if getattr(sys, "frozen", False)
            else [sys.executable, "-m", "flynn_host.runtime.shim"]
        )  # fmt: skip
        self.run_jobs = config.run_dir / config.id / "jobs"
        self.pool = ShimPool(self.shim_command, self.run_jobs, config.shim_pool)
        self.host_bundle: list[dict[str, Any]] = []
        # layers each job holds a reference to, so destroy releases exactly those
        self._held: dict[str, list[str]] = {}
        longest = self.run_jobs / ("x" * 16) / "console.sock"
        if len(str(longest)) > MAX_SOCKET_PATH:
            raise ValueError(f"--run-dir {config.run_dir} is too long for unix socket paths")

    # --- paths --------------------------------------------------------------------------------
    def _work_dir(self, job_id: str) -> Path:
        return self.config.jobs_dir / job_key(job_id)

    def _run_dir(self, job_id: str) -> Path:
        return self.run_jobs / job_key(job_id)

    def log_path(self, job_id: str) -> Path:
        return self.config.log_dir / f"{job_id}.log"

    def _cgroup_dirs(self, job_id: str) -> list[Path]:
        return cgroups.job_dirs(self.config.cgroup_parent, job_id)

    @property
    def layers_in_use(self) -> set[str]:
        return {layer_id for ids in self._held.values() for layer_id in ids}

    # --- the backend's life on the host -------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(self, known_job_ids: set[str]) -> AsyncIterator[None]:
        for path in (self.config.jobs_dir, self.run_jobs, self.config.log_dir):
            private_dir(path)
        cgroups.setup_partitions(self.config)
        self.host_bundle = host_bundle_mounts(self.config.work_dir / "host-bundle")
        self.pool.refill()
        try:
            if self.config.force:
                log.info("--force: killing containers left by an earlier daemon")
                await self._kill_all()
            await self._cleanup_orphans(known_job_ids)
            yield
        finally:
            await self.pool.close()
            cgroups.remove_empty_cgroups(self.config)

    async def _kill_all(self) -> None:
        """`--force`: kill every container this host's runc root knows, before starting."""
        _, out = await run(self.runc, "--root", str(self.config.runc_root), "list", "-q",
                           check=False)  # fmt: skip
        for cid in out.split():
            await run(self.runc, "--root", str(self.config.runc_root), "kill", cid, "KILL",
                      check=False)  # fmt: skip

    async def _cleanup_orphans(self, known: set[str]) -> None:
        """Remove containers and job directories that belong to no job in the state file
        (left by a daemon that died in the middle of starting or cleaning up a job)."""
        _, out = await run(self.runc, "--root", str(self.config.runc_root), "list", "-q",
                           check=False)  # fmt: skip
        for cid in out.split():
            if cid not in known:
                log.info("removing orphaned container %s", cid)
                await run(self.runc, "--root", str(self.config.runc_root), "delete", "--force",
                          cid, check=False)  # fmt: skip
        keys = {job_key(j) for j in known}
        for base in (self.config.jobs_dir, self.run_jobs):
            if not base.exists():
                continue
            for d in base.iterdir():
                if d.name in keys:
                    continue
                log.info("removing orphaned job directory %s", d)
                await unmount(d / "bundle" / "rootfs")
                await unmount(d / "disk", detach_loop=True)
                shutil.rmtree(d, ignore_errors=True)

    # --- jobs ---------------------------------------------------------------------------------
    async def fetch(self, job: Job) -> None:
        for spec in job.mountspecs:
            try:
                await self.layers.fetch(spec)
            except LayerError as exc:
                raise StartError(str(exc)) from exc

    async def start(self, job: Job, volume_paths: dict[str, str], network: NetworkIsolation) -> int:
        work, rund = self._work_dir(job.id), self._run_dir(job.id)
        try:
            work.mkdir(mode=0o700)
            rund.mkdir(mode=0o700)
        except FileExistsError as exc:
            raise StartError(f"job {job.id} already has a container directory") from exc
        try:
            return await self._start(job, work, rund, volume_paths, network)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.destroy(job.id)
            raise

    async def _start(
        self,
        job: Job,
        work: Path,
        rund: Path,
        volume_paths: dict[str, str],
        network: NetworkIsolation,
    ) -> int:
        held = self._held.setdefault(job.id, [])
        lowers = []
        for layer in job.mountspecs:
            lowers.append(await self.layers.acquire(layer))
            held.append(layer.id)
        disk_img, disk = work / "disk.img", work / "disk"
        disk.mkdir()
        size = job.limit("temp_disk") or bundle_default_disk()
        # the job's writable layer: whatever it writes, its secrets too, so root's alone
        os.close(os.open(disk_img, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        os.truncate(disk_img, size)  # sparse: the disk only takes what the job writes
        await run("mkfs.ext2", "-q", "-F", "-m", "0", str(disk_img))
        await run("mount", "-o", "loop", str(disk_img), str(disk))
        (disk / "upper").mkdir()
        (disk / "work").mkdir()
        rootfs = work / "bundle" / "rootfs"
        rootfs.mkdir(parents=True)
        # overlayfs lists the top layer first; mountspecs are given bottom first
        lowerdir = ":".join(str(p) for p in reversed(lowers))
        opts = f"lowerdir={lowerdir},upperdir={disk / 'upper'},workdir={disk / 'work'}"
        await run("mount", "-t", "overlay", "overlay", "-o", opts, str(rootfs))

        settings = bundle.HostSettings(
            host_id=self.config.id,
            cgroup_parent=self.config.cgroup_parent,
            init_path=self.init_path,
            external_ip=self.config.external_ip,
            listen_ip=self.config.listen_ip,
            job_ip=network.address,
            netns=network.netns,
            env=self._job_host_env(job),
            max_fd_ceiling=self.max_fd_ceiling,
        )
        extra = list(self.host_bundle) if job.config.get("host_bundle") else []
        if network.resolv_conf:
            extra.append(bundle.ro_bind(network.resolv_conf, "/etc/resolv.conf"))
        spec = bundle.oci_spec(job, settings, str(rootfs), volume_paths, extra)
        write_private(work / "bundle" / "config.json", json.dumps(spec))  # the job's env
        ShimConfig(
            job_id=job.id,
            runc=self.runc,
            runc_root=str(self.config.runc_root),
            bundle=str(work / "bundle"),
            log_file=str(self.log_path(job.id)),
            log_max_bytes=self.config.log_max_bytes,
            tty=bool(job.config.get("tty")),
            stdin=bool(job.config.get("stdin")),
        ).save(str(rund / "shim.json"))
        return await self._spawn_shim(rund)

    def _job_host_env(self, job: Job) -> dict[str, str]:
        """The host's environment for a job; system jobs (platform components, which drive
        the host APIs of the cluster) also get the cluster's host key."""
        env = dict(self.config.env)
        if job.partition == SYSTEM_PARTITION and self.config.host_key:
            env[HOST_KEY_ENV] = self.config.host_key
        return env

    async def _spawn_shim(self, rund: Path) -> int:
        proc = self.pool.take()
        if proc is not None and proc.stdin is not None:
            proc.stdin.write(f"{rund}\n".encode())
            proc.stdin.close()
        else:
            err = os.open(rund / "shim.err", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.shim_command,
                    str(rund),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                    start_new_session=True,  # the shim must outlive a daemon restart
                )
            finally:
                os.close(err)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), SHIM_START_TIMEOUT)
        except TimeoutError as exc:
            proc.kill()
            raise StartError("timed out starting the container") from exc
        # the shim is not the daemon's child to wait for: reap it in the background so it
        # leaves no zombie, without tying its life to ours
        asyncio.get_running_loop().create_task(proc.wait())
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            detail = (rund / "shim.err").read_text(errors="replace").strip()[-500:]
            raise StartError(f"container shim failed: {detail or 'no output'}") from None
        if "error" in reply:
            raise StartError(str(reply["error"]))
        return int(reply["pid"])

    async def _request(self, job_id: str, request: dict[str, Any]) -> dict[str, Any]:
        return await shim_request(str(self._run_dir(job_id)), request)

    async def wait(self, job_id: str) -> ExitInfo:
        exit_file = self._run_dir(job_id) / "exit.json"
        info: dict[str, Any] | None = None
        while info is None:
            try:
                reply = await self._request(job_id, {"wait": True})
                info = reply.get("exit")
            except (OSError, ConnectionError, json.JSONDecodeError):
                pass
            if info is None:
                if exit_file.exists():
                    info = json.loads(exit_file.read_text())
                elif not self._shim_alive(job_id):
                    # a shim that vanished without an exit record: its container is lost
                    return ExitInfo(status=-1, error="container shim died unexpectedly")
                else:
                    await asyncio.sleep(0.2)
        status = int(info["status"])
        error = None
        if self._oom_killed(job_id):
            error = "out of memory: the job exceeded its memory limit and was killed"
        elif info.get("signal"):
            error = f"killed by signal {signal.Signals(info['signal']).name}"
        return ExitInfo(status=status, error=error)

    def _shim_alive(self, job_id: str) -> bool:
        try:
            pid = int((self._run_dir(job_id) / "shim.pid").read_text())
        except (OSError, ValueError):
            return False
        return _pid_alive(pid, "shim")

    def _oom_killed(self, job_id: str) -> bool:
        return cgroups.oom_killed(self._cgroup_dirs(job_id))

    async def signal(self, job_id: str, sig: int) -> None:
        reply = await self._request(job_id, {"signal": sig})
        if "error" in reply:
            raise RuntimeError(reply["error"])

    async def attach(
        self, job_id: str, request: dict[str, Any]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await connect_shim(str(self._run_dir(job_id)))
        writer.write(json.dumps({"attach": request}).encode() + b"\n")
        await writer.drain()
        return reader, writer

    async def follow_logs(self, job_id: str, since: int) -> AsyncIterator[dict[str, Any]]:
        reader, writer = await connect_shim(str(self._run_dir(job_id)))
        try:
            writer.write(json.dumps({"follow_logs": {"since": since}}).encode() + b"\n")
            await writer.drain()
            while line := await reader.readline():
                item = json.loads(line)
                if "exit" in item or "error" in item:
                    return
                yield item
        finally:
            writer.close()

    async def destroy(self, job_id: str) -> None:
        """Kill the shim, then remove runc's state, the mounts and loop device, the layer
        references, the directories and the cgroups."""
        work, rund = self._work_dir(job_id), self._run_dir(job_id)
        with contextlib.suppress(Exception):
            pid = int((rund / "shim.pid").read_text())
            if _pid_alive(pid, "shim"):
                os.kill(pid, signal.SIGKILL)
        await run(self.runc, "--root", str(self.config.runc_root), "delete", "--force", job_id,
                  check=False)  # fmt: skip
        await unmount(work / "bundle" / "rootfs")
        await unmount(work / "disk", detach_loop=True)
        for layer_id in self._held.pop(job_id, []):
            with contextlib.suppress(Exception):
                await self.layers.release(layer_id)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(rund, ignore_errors=True)
        for d in self._cgroup_dirs(job_id):  # runc removes them; an interrupted start may not
            with contextlib.suppress(OSError):
                d.rmdir()

    async def recover(self, job: Job) -> bool:
        ids = [s.id for s in job.mountspecs]
        await self.layers.adopt(ids)
        self._held[job.id] = ids
        return self._shim_alive(job.id)


def bundle_default_disk() -> int:
    from flynn_host.types import RESOURCE_DEFAULTS

    return RESOURCE_DEFAULTS["temp_disk"]
