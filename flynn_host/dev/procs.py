"""A platform component as a plain process on loopback, for tests and benchmarks: started in
its own session with its output in a log file of a scratch directory, waited for until it
answers, and always stopped (SIGTERM, then SIGKILL to its whole session) with the directory
removed. `flynn_host.dev.controller`, `flynn_host.dev.blobstore` and gitreceive's tests start
their components through it."""

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
from pathlib import Path

STOP_TIMEOUT = 10.0


def import_path() -> str:
    """This interpreter's import path for a child, so it runs the same code as the caller (a
    worktree's, not the one the virtualenv was installed from)."""
    return os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())


def component_command(name: str, *args: str) -> list[str]:
    """`flynn-host component <name> [args]` with this interpreter."""
    return [sys.executable, "-m", "flynn_host.cli.main", "component", name, *args]


def answers(url: str) -> bool:
    """`url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


@contextlib.contextmanager
def started(
    what: str, argv: list[str], env: dict[str, str], ready_url: str, timeout: float = 30.0
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run `argv` until the block ends, once `ready_url` answers 200; yields the process and
    its log file. Raises RuntimeError with the log's tail if it exits or does not answer
    within `timeout` seconds."""
    logdir = Path(tempfile.mkdtemp(prefix=f"flynn-{what}-"))
    log = logdir / f"{what}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not answers(ready_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{what} did not start:\n{tail}")
            time.sleep(0.1)
        yield proc, log
    finally:
        stop(proc)
        shutil.rmtree(logdir, ignore_errors=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then after STOP_TIMEOUT seconds SIGKILL to the process's session."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
