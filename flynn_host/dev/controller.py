"""A controller outside any cluster, for its tests, the CLI's tests and `bench/controller.py`:
a throwaway PostgreSQL 15 server (initdb in a temporary directory, run as the `postgres` user,
listening on a loopback port) and `flynn-host component controller` processes on loopback
ports that share its database.

Both are context managers that wait until the thing answers and always clean up: the
PostgreSQL data directory is removed, every process is stopped (killed if it does not stop).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flynn_host.dev import procs
from flynn_host.dev.host import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
KEY = "test-controller-key"


@dataclass
class PGServer:
    """A running throwaway PostgreSQL server."""

    port: int
    datadir: Path
    password: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    def env(self, database: str = "postgres") -> dict[str, str]:
        """The `PG*` variables a controller job gets from its postgres resource."""
        return {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": "postgres",
            "PGPASSWORD": self.password,
            "PGDATABASE": database,
        }

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run(
            [str(PG_BIN / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql],
            env={**os.environ, **self.env(database)},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`pg_ctl stop -m mode`); `start()` brings it back on the same port."""
        _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"])
        if self.proc is not None:
            self.proc.wait(timeout=30)
            self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            _postgres_cmd(
                [
                    str(PG_BIN / "postgres"),
                    "-D",
                    str(self.datadir),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self.datadir}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=300",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=open(self.datadir.parent / "postgres.log", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 30
        while True:
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
            )
            if ready.returncode == 0:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.datadir.parent / "postgres.log").read_text(errors="replace")
                raise RuntimeError(f"PostgreSQL did not start:\n{log[-2000:]}")
            time.sleep(0.1)


def _postgres_cmd(argv: list[str]) -> list[str]:
    """Run as the `postgres` user when we are root (PostgreSQL refuses to run as root)."""
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]
    return argv


def _as_postgres(argv: list[str]) -> None:
    subprocess.run(_postgres_cmd(argv), check=True, capture_output=True)


@contextlib.contextmanager
def pg_server() -> Iterator[PGServer]:
    """A fresh PostgreSQL 15 server on a free loopback port; removed afterwards."""
    top = Path(tempfile.mkdtemp(prefix="flynn-pg-"))
    server = PGServer(port=free_port(), datadir=top / "data", password="pg-test-password")
    try:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(top, pw.pw_uid, pw.pw_gid)
        pwfile = top / "pw"
        pwfile.write_text(server.password)
        if os.geteuid() == 0:
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        _as_postgres(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(server.datadir),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        server.start()
        yield server
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGINT)
            try:
                server.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        shutil.rmtree(top, ignore_errors=True)


@dataclass
class ControllerProcess:
    """One `flynn-host component controller` process on a loopback port."""

    url: str
    key: str
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def controller_process(
    pg: PGServer,
    key: str = KEY,
    database: str = "postgres",
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Iterator[ControllerProcess]:
    """A controller serving from `pg`'s database `database` on a free loopback port, or on
    `env["PORT"]` when given."""
    port = int((env or {}).get("PORT") or free_port())
    full_env = {
        **os.environ,
        **pg.env(database),
        "PORT": str(port),
        "LISTEN_IP": "127.0.0.1",
        "AUTH_KEY": key,
        "DEFAULT_ROUTE_DOMAIN": "dev.localflynn.test",
        "CA_CERT": "-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n",
        "NAME_SEED": "test-seed",
        "DISCOVERD": "none",
        **(env or {}),
    }
    argv = [str(Path(sys.executable).parent / "flynn-host"), "component", "controller"]
    url = f"http://127.0.0.1:{port}"
    with procs.started("controller", argv, full_env, url + "/ping", timeout) as (proc, log):
        yield ControllerProcess(url, key, proc, log, full_env)


# --- the controller a bootstrapped development cluster runs ------------------------------------
def cluster_controller(c: Any) -> tuple[str, str, str]:
    """(URL, key, job id) of the controller's `web` job on a cluster booted with
    `flynn-host bootstrap` (a `flynn_host.dev.cluster.Cluster`). The URL is the job's
    address, reached from a host's namespace (`Cluster.exec`), not from the root namespace."""
    for i in range(1, len(c.hosts) + 1):
        for job in c.client(i).list_jobs(active=True).values():
            meta = job["job"].get("metadata") or {}
            if (
                meta.get("flynn-controller.app_name") == "controller"
                and meta.get("flynn-controller.type") == "web"
                and job.get("status") == "running"
                and job.get("internal_ip")
            ):
                key = job["job"]["config"]["env"]["AUTH_KEY"].split(",")[0]
                return f"http://{job['internal_ip']}:80", key, job["job"]["id"]
    raise RuntimeError("no running controller job in the cluster")
