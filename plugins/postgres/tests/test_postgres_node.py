"""`flynn-host component postgres` for real: the component as a subprocess, a real etcd, real
Patroni and PostgreSQL 15 on loopback. A singleton bootstraps, leads, takes a write, and
stops cleanly on SIGTERM leaving no process behind; restarted in another mode, it patches the
running cluster's config; a foreign volume is refused. Three nodes with discoverd:
test_postgres_cluster.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from flynn_discoverd.etcd import EtcdProcess
from postgres_nodes import http_status

from flynn_host.dev.host import free_ports, require_programs, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runs postgres as postgres)")

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PASSWORD = "test-superuser-secret"


def component(*args: str) -> list[str]:
    return [sys.executable, "-m", "flynn_host.cli.main", "component", "postgres", *args]


def component_env() -> dict[str, str]:
    return {
        **os.environ,
        "POSTGRES_SUPERUSER_PASSWORD": PASSWORD,
        "POSTGRES_REPLICATION_PASSWORD": "test-replication-secret",
    }


def processes_under(path: Path) -> list[str]:
    """Every process whose command line names `path` (Patroni's config, postgres's -D)."""
    out = subprocess.run(["pgrep", "-af", str(path)], capture_output=True, text=True)
    return out.stdout.splitlines()


def psql(port: int, sql: str) -> str:
    out = subprocess.run(
        [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
         "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
        env={**os.environ, "PGPASSWORD": PASSWORD, "PGCONNECT_TIMEOUT": "5"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, f"psql {sql!r}: {out.stderr}"
    return out.stdout.strip()


@contextlib.contextmanager
def running_node(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The component as a subprocess in its own process group; killed with everything it
    started if the test leaves it running."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            component(*args), env=component_env(), stdout=out, stderr=subprocess.STDOUT,
            process_group=0,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_singleton_bootstraps_leads_takes_writes_and_stops_cleanly(
    etcd_member: EtcdProcess, volume_root: Path
) -> None:
    require_programs("patroni", "pgrep", str(PG_BIN / "postgres"))
    port, api_port = free_ports(2)
    data = volume_root / "node"
    log = volume_root / "node.log"
    args = [
        "--name", "node-1", "--scope", "pgtest", "--data-dir", str(data),
        "--listen", "127.0.0.1", "--port", str(port), "--api-port", str(api_port),
        "--etcd", f"127.0.0.1:{etcd_member.client_port}", "--network", "127.0.0.1/32",
        # a singleton acknowledges alone: strict mode would hold every commit until a
        # sync standby exists
        "--mode", "available",
    ]  # fmt: skip
    try:
        with running_node(args, log) as proc:

            def leading() -> bool:
                assert proc.poll() is None, f"component exited {proc.returncode}"
                return http_status(f"http://127.0.0.1:{api_port}/primary") == 200

            wait_for(leading, timeout=90, what="Patroni to bootstrap and lead", every=0.5)
            psql(port, "CREATE TABLE acks (id int PRIMARY KEY)")
            psql(port, "INSERT INTO acks SELECT generate_series(1, 100)")
            assert psql(port, "SELECT count(*), sum(id) FROM acks") == "100|5050"
            assert psql(port, "SHOW data_checksums") == "on"
            assert psql(port, "SHOW wal_keep_size") == "1GB"
            assert processes_under(data), "no postgres process names the data dir"

            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=30)
            took = time.monotonic() - started
            assert status == 0, log.read_text()[-3000:]
            print(f"stopped in {took:.1f}s")
            assert not processes_under(data)
            assert not (data / "pgdata" / "postmaster.pid").exists()
    except BaseException:
        print(log.read_text()[-5000:] if log.exists() else "(no log)")
        raise
    finally:
        for line in processes_under(volume_root):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split()[0]), signal.SIGKILL)


def test_a_foreign_volume_is_refused_before_anything_starts(
    etcd_member: EtcdProcess, volume_root: Path
) -> None:
    data = volume_root / "foreign"
    data.mkdir()
    (data / "important.db").write_text("someone's data")
    out = subprocess.run(
        component("--data-dir", str(data), "--etcd", f"127.0.0.1:{etcd_member.client_port}"),
        env=component_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "is not empty and holds no postgres node (found important.db)" in out.stderr
    assert sorted(os.listdir(data)) == ["important.db"]
    assert not processes_under(data)


def test_a_new_mode_reaches_the_running_cluster(
    etcd_member: EtcdProcess, volume_root: Path
) -> None:
    """`bootstrap.dcs` counts only for a new cluster: a node restarted with another mode
    patches the cluster's config once it is the primary (strict → available here, so the
    singleton takes writes again)."""
    require_programs("patroni", "pgrep", str(PG_BIN / "postgres"))
    port, api_port = free_ports(2)
    data = volume_root / "node"
    log = volume_root / "node.log"
    base = [
        "--name", "node-1", "--scope", "pgmode", "--data-dir", str(data),
        "--listen", "127.0.0.1", "--port", str(port), "--api-port", str(api_port),
        "--etcd", f"127.0.0.1:{etcd_member.client_port}", "--network", "127.0.0.1/32",
    ]  # fmt: skip

    def strict_in_config() -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/config", timeout=2) as resp:
            return json.load(resp).get("synchronous_mode_strict")

    try:
        for mode in ("strict", "available"):
            with running_node([*base, "--mode", mode], log) as proc:
                wait_for(
                    lambda: http_status(f"http://127.0.0.1:{api_port}/primary") == 200,
                    timeout=90, what=f"the {mode} node to lead", every=0.5,
                )  # fmt: skip
                want = mode == "strict"
                wait_for(
                    lambda: strict_in_config() is want,  # noqa: B023 (called in this loop)
                    timeout=10, what=f"the cluster config in {mode} mode", every=0.2,
                    ignoring=(OSError,),
                )  # fmt: skip
                if mode == "available":  # a singleton takes writes again
                    psql(port, "CREATE TABLE acks (id int PRIMARY KEY)")
                    psql(port, "INSERT INTO acks VALUES (1)")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
        assert "cluster config patched to available mode" in log.read_text()
    except BaseException:
        print(log.read_text()[-5000:] if log.exists() else "(no log)")
        raise
    finally:
        for line in processes_under(volume_root):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
