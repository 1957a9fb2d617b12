"""`flynn-host component postgres`: one PostgreSQL 15 node managed by Patroni, on the cluster's
etcd. It checks the data volume, writes Patroni's config (0600), runs one `patroni` process as
the `postgres` user with its output in the job's log, and supervises it as a unit: SIGTERM (a
job stop) becomes Patroni's own clean shutdown, which stops PostgreSQL; after `--stop-timeout`
the process group and the postmaster are killed. The component exits with Patroni's status.

The volume (`--data-dir`, default /data) holds `pgdata/` (PostgreSQL's data directory) and
`patroni/` (config, pgpass and the server's socket, rewritten on every start); a volume holding
anything else is refused, so a stray or foreign volume is never initialised over.

What this node does not do yet: it takes the etcd endpoints from `--etcd`/POSTGRES_ETCD rather
than finding discoverd's members itself, does not register in discoverd or follow the primary
there, and does not hand over to a sync standby before stopping (Patroni 3.0.2's SIGTERM stops
PostgreSQL without a switchover). docs/postgres.md lists the steps that follow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flynn_postgres.types import (
    DEFAULT_API_PORT,
    DEFAULT_PORT,
    DEFAULT_SCOPE,
    MODES,
    NodeSettings,
    SettingsError,
    etcd_hosts_from,
    patroni_config,
)

log = logging.getLogger("postgres")

PATRONI = "patroni"
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
                   help="etcd client endpoints, host:port,...")  # fmt: skip
    p.add_argument("--mode", choices=MODES, default=env.get("POSTGRES_MODE", "strict"))
    p.add_argument("--network", action="append", default=None,
                   help="CIDR clients connect from (repeatable; default: job network)")  # fmt: skip
    p.add_argument("--user", default="postgres",
                   help="the OS user PostgreSQL runs as, when started as root")  # fmt: skip
    p.add_argument("--stop-timeout", type=float, default=25.0,
                   help="seconds Patroni has to stop before it is killed")  # fmt: skip
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> NodeSettings:
    extra: dict[str, Any] = {"networks": args.network} if args.network else {}
    settings = NodeSettings(
        name=args.name,
        scope=args.scope,
        data_dir=Path(args.data_dir),
        etcd_hosts=etcd_hosts_from(args.etcd),
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


def kill_all(proc: subprocess.Popen[bytes], pgdata: Path) -> None:
    """SIGKILL Patroni's process group and the postmaster, which Patroni starts in a session
    of its own; the postmaster's children exit when it does."""
    pid = postmaster_pid(pgdata)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def supervise(proc: subprocess.Popen[bytes], pgdata: Path, stop_timeout: float) -> int:
    """Wait for Patroni; on SIGTERM/SIGINT pass SIGTERM on and give it `stop_timeout`."""
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    deadline: float | None = None
    while True:
        try:
            status = proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if stopping and deadline is None:
            log.info("stopping: Patroni shuts PostgreSQL down (%ss before a kill)", stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + stop_timeout
        if deadline is not None and time.monotonic() > deadline:
            log.warning("Patroni did not stop within %ss: killing it and PostgreSQL", stop_timeout)
            kill_all(proc, pgdata)
            status = proc.wait()
            break
    # a postmaster Patroni left behind (Patroni died) must not outlive the unit
    pid = postmaster_pid(pgdata)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGQUIT)
    return status if status >= 0 else 128 - status


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
        check_volume(settings)
        uid, gid = server_user(args.user)
        config = prepare(settings, uid, gid)
    except (SettingsError, VolumeError) as exc:
        print(f"postgres: {exc}", file=sys.stderr, flush=True)
        return 2
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
    # its own process group, so a kill reaches Patroni's helpers too; stdout and stderr are
    # ours, which is the job's log
    proc = subprocess.Popen(
        [PATRONI, str(config)], env=env, cwd=settings.run_dir, process_group=0, **as_user
    )
    try:
        status = supervise(proc, settings.pgdata, args.stop_timeout)
    finally:
        if proc.returncode is None:
            kill_all(proc, settings.pgdata)
            proc.wait()
    print(f"postgres: patroni exited with status {status}", flush=True)
    return status


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run(parse_args(argv))
