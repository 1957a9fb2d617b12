"""`flynn run` and `flynn pg` end to end on one booted one-host cluster (shared by the module):
the installed `flynn` command, run in the host's network namespace (where the controller's
job address is reached), against the controller `flynn-host bootstrap` started.

The app `runner` runs the busybox image (a `flynn` artifact of its manifest file). Checked:
a detached job's id, env and trust on its host; an attached job's output, stderr and exit
status; stdin through a pipe; a terminal (a real pty: prompt, size, resize); signals passed
on; a client that goes away taking its job with it; `pg psql`, and `pg dump` into another
app's `pg restore`. Every test stops what it starts, and the module ends by checking that no
job of its apps is left running."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flynn_host.dev.cluster import Cluster
from tests.dev.test_cluster import booted_cluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")

BUSYBOX = "file:///var/lib/flynn/images/busybox/manifest.json"
APPS = ("runner", "restored")
FLYNN = os.path.join(os.path.dirname(sys.executable), "flynn")
ENDED = ("done", "crashed", "failed")

API = """
import json, sys
from flynn_controller.client import Client
url, key, method, path, body = sys.argv[1:6]
print(json.dumps(Client(url, key).request(method, path, json.loads(body) if body else None)))
"""


@dataclass
class Env:
    cluster: Cluster
    url: str
    key: str
    home: Path
    app_id: str = ""
    release_id: str = ""

    @property
    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "FLYNNRC": str(self.home / ".flynnrc"), "TERM": "xterm"}

    def argv(self, *args: str) -> list[str]:
        netns = self.cluster.host(1).netns_path
        return ["nsenter", f"--net={netns}", "--", FLYNN, *args]

    def full_env(self) -> dict[str, str]:
        return {**self.cluster.host_env(self.cluster.host(1)), **self.env}

    def flynn(self, *args: str, input: bytes | None = None, timeout: float = 120) -> Any:
        return subprocess.run(self.argv(*args), env=self.full_env(), input=input,
                              capture_output=True, timeout=timeout, cwd=str(self.home))  # fmt: skip

    def ok(self, *args: str, **kw: Any) -> str:
        out = self.flynn(*args, **kw)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return str(out.stdout.decode() + out.stderr.decode())

    def api(self, method: str, path: str, body: Any = None) -> Any:
        argv = [sys.executable, "-c", API, self.url, self.key, method, path,
                json.dumps(body) if body is not None else ""]  # fmt: skip
        out = self.cluster.exec(1, argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def host_jobs(self, app: str) -> list[dict[str, Any]]:
        """The host's jobs of `app` that have not ended."""
        jobs = self.cluster.client(1).list_jobs().values()
        return [j for j in jobs if j["status"] not in ENDED
                and j["job"]["metadata"].get("flynn-controller.app_name") == app]  # fmt: skip

    def wait_for_job(self, app: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            running = [j for j in self.host_jobs(app) if j["status"] == "running"]
            if running:
                return running[0]
            assert time.monotonic() < deadline, f"no running job of {app}"
            time.sleep(0.2)

    def wait_ended(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (job := self.cluster.client(1).get_job(job_id))["status"] not in ENDED:
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        return job


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from flynn_host.dev.controller import cluster_controller

    with booted_cluster(1) as c:
        url, key, _ = cluster_controller(c)
        e = Env(c, url, key, tmp_path_factory.mktemp("home"))
        e.ok("cluster", "add", "--no-git", "default", url, key)
        e.ok("create", "runner")
        artifact = e.api("POST", "/artifacts", {"type": "flynn", "uri": BUSYBOX})
        release = e.api("POST", "/releases", {"artifact": artifact["id"],
                                              "env": {"GREETING": "hello"}})  # fmt: skip
        e.api("PUT", "/apps/runner/release", {"id": release["id"]})
        e.app_id, e.release_id = e.api("GET", "/apps/runner")["id"], release["id"]
        yield e
        # a job whose client went away is being stopped: give it the time that takes
        deadline = time.monotonic() + 30
        while (left := [j["job"]["id"] for app in APPS for j in e.host_jobs(app)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
        assert left == [], "jobs left running"


def test_a_detached_job_runs_on_its_host_as_the_app(env: Env) -> None:
    out = env.flynn("-a", "runner", "run", "-d", "--", "sh", "-c", "sleep 600")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b""
    job_id = out.stderr.decode().strip()
    host_id = env.cluster.host(1).id
    assert re.fullmatch(rf"{host_id}-[0-9a-f]{{8}}(-[0-9a-f]{{4}}){{3}}-[0-9a-f]{{12}}", job_id)
    try:
        job = env.cluster.client(1).get_job(job_id)["job"]
        cfg = job["config"]
        assert cfg["args"] == ["sh", "-c", "sleep 600"]
        assert {
            k: cfg["env"].get(k)
            for k in (
                "FLYNN_APP_ID",
                "FLYNN_RELEASE_ID",
                "FLYNN_PROCESS_TYPE",
                "FLYNN_JOB_ID",
                "GREETING",
            )
        } == {  # fmt: skip
            "FLYNN_APP_ID": env.app_id,
            "FLYNN_RELEASE_ID": env.release_id,
            "FLYNN_PROCESS_TYPE": "",
            "FLYNN_JOB_ID": job_id,
            "GREETING": "hello",
        }
        assert job["metadata"]["flynn-controller.app"] == env.app_id
        assert job["metadata"]["flynn-controller.app_name"] == "runner"
        assert job["metadata"]["flynn-controller.release"] == env.release_id
        assert job["partition"] == "user" and not cfg.get("host_network")
        assert not cfg.get("stdin") and not cfg.get("tty")
        assert job["resources"]["memory"]["limit"] == 1024**3
    finally:
        env.api("DELETE", f"/apps/runner/jobs/{job_id}")
    env.wait_ended(job_id)


def test_an_attached_job_gives_its_output_and_exit_status(env: Env) -> None:
    out = env.flynn("-a", "runner", "run", "--", "sh", "-c", "echo hi; echo err >&2; exit 3")
    assert (out.returncode, out.stdout, out.stderr) == (3, b"hi\n", b"err\n")
    out = env.flynn("-a", "runner", "run", "--", "env")
    assert out.returncode == 0, out.stderr
    assert b"GREETING=hello\n" in out.stdout and b"FLYNN_PROCESS_TYPE=\n" in out.stdout
    out = env.flynn("-a", "runner", "run", "-r", env.release_id, "-e", "echo", "--", "a", "b")
    assert (out.returncode, out.stdout) == (0, b"a b\n"), out.stderr
    out = env.flynn("-a", "runner", "run", "-r", "7d3ab6e2-1e4b-4c8f-9d61-0a9f4e0c2b11", "true")
    assert out.returncode == 1
    assert out.stderr.startswith(b"validation_error: release could not find release")


def test_stdin_is_piped_to_the_job(env: Env) -> None:
    data = b"data\n" + bytes(range(256)) * 1000
    out = env.flynn("-a", "runner", "run", "--", "cat", input=data)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data


def test_interrupt_is_passed_on_and_a_vanished_client_stops_its_job(env: Env) -> None:
    proc = subprocess.Popen(env.argv("-a", "runner", "run", "--", "sleep", "600"),
                            env=env.full_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        env.wait_for_job("runner")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130  # sleep's death by SIGINT, from the job's exit frame
    finally:
        proc.kill()
        proc.wait()

    proc = subprocess.Popen(env.argv("-a", "runner", "run", "--", "sleep", "600"),
                            env=env.full_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        job = env.wait_for_job("runner")
    finally:
        proc.kill()  # the client vanishes without a word
        proc.wait()
    env.wait_ended(job["job"]["id"])


def _read_until(fd: int, pattern: bytes, timeout: float = 30) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while pattern not in out:
        left = deadline - time.monotonic()
        assert left > 0, f"{pattern!r} not in {out!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"EOF before {pattern!r}: {out!r}"
            out += chunk
    return out


def _set_size(fd: int, lines: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))


@contextlib.contextmanager
def _on_a_pty(env: Env, *args: str) -> Iterator[tuple[int, int]]:
    """`flynn args...` on a new pty of 30 lines × 100 columns: (its pid, the pty's master).
    The caller reaps it (`os.waitpid`); otherwise it is killed."""
    argv, full_env = env.argv(*args), env.full_env()
    pid, master = pty.fork()
    if pid == 0:  # the child: flynn on the pty's slave
        try:
            _set_size(0, 30, 100)
            os.execvpe(argv[0], argv, full_env)
        finally:
            os._exit(127)
    try:
        yield pid, master
    finally:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        os.close(master)


def _exit_status(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_terminal_gets_a_tty_with_its_size(env: Env) -> None:
    with _on_a_pty(env, "-a", "runner", "run", "sh") as (pid, master):
        _read_until(master, b"# ")
        os.write(master, b"echo $TERM-$COLUMNS-$LINES; tty\r")
        out = _read_until(master, b"/dev/pts/")
        assert b"xterm-100-30" in out, out
        # busybox's stty prefers $COLUMNS and $LINES to the terminal's size: drop them
        size = b"env -u COLUMNS -u LINES stty size\r"
        os.write(master, size)
        assert b"30 100" in _read_until(master, b"30 100")
        _set_size(master, 40, 120)  # the kernel sends flynn SIGWINCH
        time.sleep(0.5)
        os.write(master, size)
        assert b"40 120" in _read_until(master, b"40 120")
        os.write(master, b"exit 5\r")
        assert _exit_status(pid) == 5


def _counts(env: Env, app: str) -> str:
    return env.ok("-a", app, "pg", "psql", "--", "-tAc", "select count(*), sum(i) from t")


def test_pg_psql_dump_and_restore_into_another_app(env: Env) -> None:
    out = env.flynn("-a", "runner", "pg", "psql", "--", "-c", "select 1")
    assert out.returncode == 1
    assert out.stderr == (
        b"No postgres database found. Provision one with `flynn resource add postgres`\n"
    )
    env.ok("-a", "runner", "resource", "add", "postgres")
    out = env.ok("-a", "runner", "pg", "psql", "--", "-tAc", "select 1")
    assert out.strip() == "1"
    with _on_a_pty(env, "-a", "runner", "pg", "psql") as (pid, master):
        _read_until(master, b"=> ")
        os.write(master, b"select 6 * 7 as answer;\r")
        assert b"42" in _read_until(master, b"(1 row)")
        os.write(master, b"\\q\r")
        assert _exit_status(pid) == 0
    env.ok("-a", "runner", "pg", "psql", "--", "-c",
           "create table t (i int, s text); insert into t select g, md5(g::text)"
           " from generate_series(1, 5000) g")  # fmt: skip
    before = _counts(env, "runner")
    assert before.strip() == "5000|12502500"

    dump = env.home / "x.dump"
    out = env.flynn("-a", "runner", "pg", "dump", "-f", str(dump))
    assert out.returncode == 0, out.stderr
    assert dump.read_bytes().startswith(b"PGDMP") and dump.stat().st_size > 10000

    env.ok("create", "restored")
    env.ok("-a", "restored", "resource", "add", "postgres")
    out = env.flynn("-a", "restored", "pg", "restore", "-f", str(dump))
    assert out.returncode == 0, out.stderr
    assert _counts(env, "restored") == before
    # a second restore over the first: --clean drops what is there
    env.ok("-a", "restored", "pg", "restore", "-q", "-f", str(dump))
    assert _counts(env, "restored") == before


def _database(env: Env, app: str) -> None:
    """`app` with a postgres database of its own (made if missing)."""
    if app not in env.ok("apps").split():
        env.ok("create", app)
    # `flynn env` prints nothing for an app without a release yet
    if b"PGDATABASE=" not in env.flynn("-a", app, "env").stdout:
        env.ok("-a", app, "resource", "add", "postgres")


@pytest.mark.slow
def test_pg_dump_and_restore_of_100_mb(env: Env) -> None:
    _database(env, "runner")
    _database(env, "restored")
    # four different md5s a row: about as incompressible as text gets, ~100 MB dumped
    env.ok("-a", "runner", "pg", "psql", "--", "-c",
           "create table big as select g as i, md5(g::text) || md5((-g)::text)"
           " || md5((g * 3)::text) || md5((g * 7)::text) as s"
           " from generate_series(1, 1600000) g", timeout=600)  # fmt: skip
    dump = env.home / "big.dump"
    started = time.monotonic()
    out = env.flynn("-a", "runner", "pg", "dump", "-f", str(dump), timeout=900)
    assert out.returncode == 0, out.stderr
    dumped = time.monotonic() - started
    count = "select count(*), sum(length(s)) from big"
    before = env.ok("-a", "runner", "pg", "psql", "--", "-tAc", count)
    out = env.flynn("-a", "restored", "pg", "restore", "-f", str(dump), timeout=900)
    assert out.returncode == 0, out.stderr
    assert env.ok("-a", "restored", "pg", "psql", "--", "-tAc", count) == before
    print(f"dump {dump.stat().st_size / 1e6:.0f} MB in {dumped:.1f}s")
