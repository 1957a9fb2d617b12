"""`flynn-host component postgres`: one PostgreSQL 15 node managed by Patroni, on the cluster's
etcd. It checks the data volume, writes Patroni's config (0600), runs one `patroni` process as
the `postgres` user with its output in the job's log, and supervises it as a unit.

- **etcd**: `--etcd`/POSTGRES_ETCD, or else discoverd's members: `GET /raft/peers` of
  `--discoverd`/DISCOVERD, each node's etcd on its API port + 1268 (`discovery.find_etcd`).
- **discoverd**: with `--discoverd`, the node looks at its Patroni a few times a second and
  keeps its instance in service `<scope>` (`discovery.Registration`): the running primary
  registers and makes itself the service's leader; a node that stops being the primary
  deregisters at once, so `leader.<scope>.discoverd` is never a non-primary.
- **mode**: once primary, it patches the cluster's dynamic config if its mode differs
  (`patroni.apply_mode`): `bootstrap.dcs` only counts for a new cluster.
- **stop**: SIGTERM (a job stop) makes a primary switch over to a healthy sync standby first
  (`patroni.hand_over`), leaves discoverd, then becomes Patroni's own clean shutdown, which
  stops PostgreSQL; `--stop-timeout` after the SIGTERM the process group and the postmaster are
  killed. The component exits with Patroni's status.

The volume (`--data-dir`, default /data) holds `pgdata/` (PostgreSQL's data directory) and
`patroni/` (config, pgpass and the server's socket, rewritten on every start); a volume holding
anything else is refused, so a stray or foreign volume is never initialised over.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pwd
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from flynn_discoverd.client import Client

from flynn_postgres.discovery import DiscoveryError, Registration, find_etcd
from flynn_postgres.patroni import PatroniAPI, apply_mode, hand_over
from flynn_postgres.types import (
    DEFAULT_API_PORT,
    DEFAULT_PORT,
    DEFAULT_SCOPE,
    MODES,
    REST_USER,
    NodeSettings,
    SettingsError,
    etcd_hosts_from,
    patroni_config,
)

log = logging.getLogger("postgres")

# the Python the image's Patroni is installed for, and the launcher it runs Patroni with
SYSTEM_PYTHON = "/usr/bin/python3"
LAUNCHER = Path(__file__).with_name("patroni_launch.py")


def patroni_command(run_dir: Path) -> list[str]:
    """Patroni, run by `patroni_launch.py` (written to `run_dir`, where the `postgres` user can
    read it, whatever flynn-host's own files are) on the system's Python, which has the image's
    Patroni: the launcher backports the fix that keeps a rejoining old primary from taking the
    leader key back (its docstring tells the story)."""
    launcher = run_dir / "patroni_launch.py"
    launcher.write_text(LAUNCHER.read_text())
    launcher.chmod(0o644)
    return [SYSTEM_PYTHON, str(launcher)]


# how often the node looks at its Patroni: a promotion reaches discoverd's leader within this
# plus a few milliseconds
POLL_EVERY = 0.25
# a discoverd request (registration, leader) must not hold up the next look for long
DISCOVERD_TIMEOUT = 2.0
# what a node's volume may hold besides nothing (lost+found: an ext4 volume's root)
VOLUME_ENTRIES = {"pgdata", "patroni", "lost+found"}


class VolumeError(Exception):
    pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="flynn-host component postgres")
    p.add_argument("--scope", default=env.get("FLYNN_POSTGRES_SERVICE", DEFAULT_SCOPE),
                   help="discoverd service name = Patroni scope (default postgres)")  # fmt: skip
    p.add_argument("--name", default=env.get("POSTGRES_ID") or env.get("FLYNN_JOB_ID")
                   or socket.gethostname().lower(), help="this node's unique name")  # fmt: skip
    p.add_argument("--data-dir", default=env.get("POSTGRES_DATA_DIR", "/data"))
    p.add_argument("--listen", default=env.get("EXTERNAL_IP", "127.0.0.1"),
                   help="the address PostgreSQL and Patroni's API listen on")  # fmt: skip
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-port", type=int, default=DEFAULT_API_PORT)
    p.add_argument("--etcd", default=env.get("POSTGRES_ETCD", ""),
                   help="etcd client endpoints, host:port,... (default: discoverd's)")  # fmt: skip
    p.add_argument("--discoverd", default=env.get("DISCOVERD", ""),
                   help="discoverd URL(s), comma separated: where to register and, without "
                        "--etcd, where to find etcd")  # fmt: skip
    p.add_argument("--mode", choices=MODES, default=env.get("POSTGRES_MODE", "strict"))
    p.add_argument("--network", action="append", default=None,
                   help="CIDR clients connect from (repeatable; default: job network)")  # fmt: skip
    p.add_argument("--user", default="postgres",
                   help="the OS user PostgreSQL runs as, when started as root")  # fmt: skip
    p.add_argument("--stop-timeout", type=float, default=25.0,
                   help="seconds from SIGTERM until Patroni and PostgreSQL are killed")  # fmt: skip
    p.add_argument("--handover-timeout", type=float, default=10.0,
                   help="seconds a stopping primary waits for a switchover")  # fmt: skip
    p.add_argument("--discovery-timeout", type=float, default=120.0,
                   help="seconds to wait for discoverd to list etcd")  # fmt: skip
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace, etcd_hosts: list[str]) -> NodeSettings:
    extra: dict[str, Any] = {"networks": args.network} if args.network else {}
    settings = NodeSettings(
        name=args.name,
        scope=args.scope,
        data_dir=Path(args.data_dir),
        etcd_hosts=etcd_hosts,
        superuser_password=os.environ.get("POSTGRES_SUPERUSER_PASSWORD", ""),
        replication_password=os.environ.get("POSTGRES_REPLICATION_PASSWORD", ""),
        listen_ip=args.listen,
        port=args.port,
        api_port=args.api_port,
        mode=args.mode,
        **extra,
    )
    settings.validate()
    return settings


def check_volume(settings: NodeSettings) -> None:
    """Refuse a volume that is neither empty, nor this node's layout with a PostgreSQL data
    directory (or none yet) in `pgdata/`."""
    data_dir = settings.data_dir
    if not data_dir.exists():
        return
    if not data_dir.is_dir():
        raise VolumeError(f"data dir {data_dir} is not a directory")
    foreign = sorted(set(os.listdir(data_dir)) - VOLUME_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise VolumeError(
            f"data dir {data_dir} is not empty and holds no postgres node (found {shown}): "
            "refusing to initialise over it; give an empty volume"
        )
    pgdata = settings.pgdata
    if pgdata.is_dir() and os.listdir(pgdata) and not (pgdata / "PG_VERSION").is_file():
        raise VolumeError(
            f"{pgdata} is not empty and is not a PostgreSQL data directory (no PG_VERSION): "
            "refusing to initialise over it"
        )


def prepare(settings: NodeSettings, uid: int, gid: int) -> Path:
    """Make the volume's directories owned by the server's user, mode 0700 (PostgreSQL
    insists on it), and write Patroni's config there 0600; return the config's path."""
    for d in (settings.data_dir, settings.run_dir, settings.pgdata):
        d.mkdir(mode=0o700, exist_ok=True)
        os.chown(d, uid, gid)
        os.chmod(d, 0o700)
    path = settings.run_dir / "patroni.yml"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchown(f.fileno(), uid, gid)
        # JSON is YAML, and needs no YAML library here
        json.dump(patroni_config(settings), f, indent=2)
    os.replace(tmp, path)
    return path


def server_user(name: str) -> tuple[int, int]:
    """The uid and gid PostgreSQL runs as: `name`'s when started as root (PostgreSQL refuses
    to run as root), else our own."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise VolumeError(f"no user {name!r} to run PostgreSQL as (it refuses root)") from None
    return pw.pw_uid, pw.pw_gid


def postmaster_pid(pgdata: Path) -> int | None:
    """The running postmaster's pid from its pid file (a stale file's pid may be another
    program's by now: only a live `postgres` counts)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"postgres" in cmdline.split(b"\0", 1)[0] else None


def kill_all(patroni_pid: int, pgdata: Path) -> None:
    """SIGKILL Patroni's process group and the postmaster, which Patroni starts in a session
    of its own; the postmaster's children exit when it does."""
    pid = postmaster_pid(pgdata)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(patroni_pid, signal.SIGKILL)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


T = TypeVar("T")


async def unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None (and `work` cancelled) if `stop` is set first."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        return await task
    return None


async def watch_node(
    api: PatroniAPI, registration: Registration | None, mode: str, done: asyncio.Event
) -> None:
    """Look at Patroni every POLL_EVERY s until `done`: discoverd follows what it says, and a
    new primary brings the cluster's config to this node's mode once per term (beside the
    looks, which must not wait for it)."""
    applied = False
    applying: asyncio.Task[bool] | None = None
    try:
        while not done.is_set():
            state = await api.node_state()
            if registration is not None:
                await registration.step(state)
            if applying is not None and applying.done():
                applied, applying = applying.result(), None
            if state is None or not state.is_primary:
                applied = False
            elif not applied and applying is None:
                applying = asyncio.create_task(apply_mode(api, mode))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), POLL_EVERY)
    finally:
        if applying is not None:
            applying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await applying


def stop_if_failed(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the look at Patroni failed: stopping the node", exc_info=task.exception())
        stop.set()


async def stop_patroni(
    proc: asyncio.subprocess.Process, settings: NodeSettings, api: PatroniAPI,
    leave: Callable[[], Awaitable[None]], args: argparse.Namespace,
) -> None:  # fmt: skip
    """A job stop: a primary hands over first, the node leaves discoverd (`leave`), then
    Patroni gets SIGTERM, its clean shutdown of PostgreSQL; `--stop-timeout` after the job's
    SIGTERM (under the host's 30 s before its SIGKILL) it is killed with PostgreSQL."""
    deadline = time.monotonic() + args.stop_timeout
    log.info("stopping (%ss before a kill)", args.stop_timeout)
    await hand_over(api, settings.name, min(args.handover_timeout, args.stop_timeout / 2))
    await leave()
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        log.warning("Patroni did not stop in time: killing it and PostgreSQL")
        kill_all(proc.pid, settings.pgdata)
        await proc.wait()


async def supervise(
    proc: asyncio.subprocess.Process, settings: NodeSettings,
    registration: Registration | None, args: argparse.Namespace, stop: asyncio.Event,
) -> int:  # fmt: skip
    """Run the node until Patroni exits, or until SIGTERM/SIGINT (`stop`) stops it."""
    api = PatroniAPI(
        f"http://{host_port(settings.listen_ip, settings.api_port)}",
        auth=(REST_USER, settings.superuser_password),
    )
    done = asyncio.Event()
    watcher = asyncio.create_task(watch_node(api, registration, settings.mode, done))
    # a node that stopped following Patroni (a bug) could stay discoverd's leader after a
    # demotion: it stops instead, and its job is restarted
    watcher.add_done_callback(lambda task: stop_if_failed(task, stop))

    async def leave() -> None:
        """Stop following Patroni, then deregister: nothing registers the node again. A bug
        here is logged, not raised: Patroni must still get its clean shutdown."""
        done.set()
        with contextlib.suppress(Exception):  # a failed look is logged by stop_if_failed
            await watcher
        if registration is not None:
            try:
                await registration.close()
            except Exception:
                log.exception("leaving discoverd")

    try:
        if await unless_stopped(proc.wait(), stop) is None:
            if registration is not None:
                registration.stopping = True  # it may still leave, but never registers again
            await stop_patroni(proc, settings, api, leave, args)
        else:
            log.warning("Patroni exited with status %s", proc.returncode)
    finally:
        if not done.is_set():
            await leave()
        await api.close()
        if proc.returncode is None:
            kill_all(proc.pid, settings.pgdata)
            await proc.wait()
    # a postmaster Patroni left behind (Patroni died) must not outlive the unit
    pid = postmaster_pid(settings.pgdata)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGQUIT)
    status = proc.returncode
    assert status is not None
    return status if status >= 0 else 128 - status


def host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def etcd_hosts(args: argparse.Namespace, stop: asyncio.Event) -> list[str] | None:
    """`--etcd`, or else the members discoverd lists (None: stopped while waiting)."""
    hosts = etcd_hosts_from(args.etcd)
    if hosts:
        return hosts
    if not args.discoverd:
        raise SettingsError(
            "no etcd endpoints: give --etcd or POSTGRES_ETCD (host:port,...), or --discoverd "
            "or DISCOVERD to find discoverd's"
        )
    async with Client(args.discoverd.split(","), timeout=DISCOVERD_TIMEOUT) as client:
        return await unless_stopped(find_etcd(client, within=args.discovery_timeout), stop)


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        hosts = await etcd_hosts(args, stop)
        if hosts is None:
            return 0
        settings = settings_from(args, hosts)
        check_volume(settings)
        uid, gid = server_user(args.user)
        config = prepare(settings, uid, gid)
    except (SettingsError, VolumeError) as exc:
        print(f"postgres: {exc}", file=sys.stderr, flush=True)
        return 2
    except DiscoveryError as exc:
        print(f"postgres: {exc}", file=sys.stderr, flush=True)
        return 1
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(settings.run_dir),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }
    as_user: dict[str, Any] = {}
    if os.geteuid() == 0:
        as_user = {"user": uid, "group": gid, "extra_groups": []}
    log.info(
        "node %s of %s (%s mode) on %s:%d, etcd %s",
        settings.name, settings.scope, settings.mode, settings.listen_ip, settings.port,
        ",".join(settings.etcd_hosts),
    )  # fmt: skip
    registration = None
    if args.discoverd:
        client = Client(args.discoverd.split(","), timeout=DISCOVERD_TIMEOUT)
        addr = host_port(settings.listen_ip, settings.port)
        registration = Registration(client, settings.scope, addr, settings.name)
    else:
        log.info("no discoverd (--discoverd, DISCOVERD): not registering in discoverd")
    # its own process group, so a kill reaches Patroni's helpers too; stdout and stderr are
    # ours, which is the job's log
    proc = await asyncio.create_subprocess_exec(
        *patroni_command(settings.run_dir),
        str(config),
        env=env,
        cwd=settings.run_dir,
        process_group=0,
        **as_user,
    )
    status = await supervise(proc, settings, registration, args, stop)
    print(f"postgres: patroni exited with status {status}", flush=True)
    return status


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(run(parse_args(argv)))
