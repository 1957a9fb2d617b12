"""A blobstore outside any cluster, for its tests and for the tests of what stores blobs:
`flynn-host component blobstore` on a free loopback port, on a database of a throwaway
PostgreSQL server (`flynn_host.dev.controller.pg_server`) or on a directory. A context manager
that waits until the process answers and always stops it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flynn_host.dev import procs
from flynn_host.dev.controller import PGServer
from flynn_host.dev.host import free_port

STATUS_PATH = "/.well-known/status"


@dataclass
class BlobstoreProcess:
    """One `flynn-host component blobstore` process on a loopback port."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss(self) -> int:
        """The process's resident set size, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")


@contextlib.contextmanager
def blobstore_process(
    pg: PGServer | None = None,
    database: str = "postgres",
    directory: str | os.PathLike[str] | None = None,
    timeout: float = 30.0,
) -> Iterator[BlobstoreProcess]:
    """A blobstore on `pg`'s database `database`, or on `directory`."""
    if (pg is None) == (directory is None):
        raise ValueError("give either a PostgreSQL server or a directory")
    port = free_port()
    env = {**os.environ, "PORT": str(port), "LISTEN_IP": "127.0.0.1", "DISCOVERD": "none",
           "PYTHONPATH": procs.import_path()}  # fmt: skip
    args = procs.component_command("blobstore")
    if pg is not None:
        env.update(pg.env(database))
    else:
        args += ["--dir", str(directory)]
    url = f"http://127.0.0.1:{port}"
    with procs.started("blobstore", args, env, url + STATUS_PATH, timeout) as (proc, log):
        yield BlobstoreProcess(url, proc, log)
