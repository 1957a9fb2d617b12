"""Helpers for the postgres tests: temporary volumes, a singleton node run as a subprocess,
stopping what a test started (a module of its own: test modules import it by a name no other
test directory uses, unlike `conftest`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flynn_host.dev.host import free_ports, require_programs, wait_for

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER_PASSWORD = "test-superuser-secret"


@contextlib.contextmanager
def temporary_volume_root() -> Iterator[Path]:
    """A fresh directory for node volumes, traversable by the `postgres` user (tempfile makes
    0700 directories, and PostgreSQL runs as postgres, not root)."""
    root = Path(tempfile.mkdtemp(prefix="flynn-postgres-test-"))
    try:
        os.chmod(root, 0o755)
        yield root
    finally:
        kill_processes_naming(root)
        shutil.rmtree(root, ignore_errors=True)


def kill_processes_naming(path: Path) -> None:
    """SIGKILL every process whose command line names `path`: what a failed test left."""
    out = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True)
    for pid in out.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def http_status(url: str) -> int:
    """The status `url` answers with; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@dataclass(frozen=True)
class Node:
    """A running singleton: PostgreSQL on 127.0.0.1:`port` as superuser `postgres`."""

    port: int
    api_port: int
    data: Path
    log: Path
    etcd_port: int
    superuser_password: str = SUPERUSER_PASSWORD


@contextlib.contextmanager
def running_singleton(etcd_port: int, root: Path, scope: str, mode: str) -> Iterator[Node]:
    """A singleton node of `scope` (the component as a subprocess, its volume in `root`) that
    leads; stopped with SIGTERM afterwards, killed if that does not work."""
    require_programs("patroni", "pgrep", str(PG_BIN / "postgres"))
    port, api_port = free_ports(2)
    node = Node(port, api_port, root / scope, root / f"{scope}.log", etcd_port)
    args = [
        "--name", f"{scope}-1", "--scope", scope, "--data-dir", str(node.data),
        "--listen", "127.0.0.1", "--port", str(port), "--api-port", str(api_port),
        "--etcd", f"127.0.0.1:{etcd_port}", "--network", "127.0.0.0/8", "--mode", mode,
    ]  # fmt: skip
    env = {
        **os.environ,
        "POSTGRES_SUPERUSER_PASSWORD": SUPERUSER_PASSWORD,
        "POSTGRES_REPLICATION_PASSWORD": "test-replication-secret",
    }
    with open(node.log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flynn_host.cli.main", "component", "postgres", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0,
        )  # fmt: skip
    try:

        def leading() -> bool:
            assert proc.poll() is None, f"node exited {proc.returncode}: {tail(node.log)}"
            return http_status(f"http://127.0.0.1:{api_port}/primary") == 200

        wait_for(leading, timeout=90, what=f"the {scope} singleton to lead", every=0.3)
        yield node
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM a process started in its own group; SIGKILL the group if it lingers."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"
