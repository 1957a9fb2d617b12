"""A blobstore outside any cluster, for its tests and for the tests of what stores blobs:
`flynn-host component blobstore` on a free loopback port, on a database of a throwaway
PostgreSQL server (`flynn_host.dev.controller.pg_server`) or on a directory. A context manager
that waits until the process answers and always stops it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + STATUS_PATH, timeout=2) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _pythonpath() -> str:
    """This interpreter's import path for the child, so it runs the same code as the caller
    (a worktree's, not the one the virtualenv was installed from)."""
    return os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())


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
    logdir = Path(tempfile.mkdtemp(prefix="flynn-blobstore-"))
    log = logdir / "blobstore.log"
    env = {**os.environ, "PORT": str(port), "LISTEN_IP": "127.0.0.1", "DISCOVERD": "none",
           "PYTHONPATH": _pythonpath()}  # fmt: skip
    args = [sys.executable, "-m", "flynn_host.cli.main", "component", "blobstore"]
    if pg is not None:
        env.update(pg.env(database))
    else:
        args += ["--dir", str(directory)]
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=open(log, "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    bs = BlobstoreProcess(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(bs.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"blobstore did not start:\n{bs.log_text()[-3000:]}")
            time.sleep(0.1)
        yield bs
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(logdir, ignore_errors=True)
