"""Jobs end to end through a real daemon: real runc containers from the busybox squashfs image."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flynn_host.client import HostAPIError
from flynn_host.dev.host import wait_for
from flynn_host.types import job_key

from .conftest import busybox_job, cgroups_of, mounts_under, needs_root

pytestmark = needs_root


def test_job_from_curl_runs_logs_and_ends_done(daemon):
    job_id = daemon.new_job_id()
    job = busybox_job(job_id, ["sh", "-c", "echo hello from $HOSTNAME; echo oops >&2"])
    out = subprocess.run(
        ["curl", "-sS", "-X", "PUT", "-H", "Content-Type: application/json",
         "-u", f":{daemon.key}",  # the host key, as curl sends a Basic password
         "--data-binary", json.dumps(job), f"{daemon.url}/host/jobs/{job_id}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout) == {}
    final = daemon.wait_job(job_id)
    assert final["status"] == "done"
    assert final["exit_status"] == 0
    assert final["error"] is None
    hostname = job_id.split("-", 1)[1]
    log = daemon.run_cli("log", job_id)
    assert log.returncode == 0, log.stderr
    assert log.stdout == f"hello from {hostname}\noops\n"
    split = daemon.run_cli("log", "--split-stderr", job_id)
    assert split.stdout == f"hello from {hostname}\n"
    assert split.stderr == "oops\n"


def test_exit_status_3_is_crashed(daemon):
    job_id = daemon.new_job_id()
    daemon.client.add_job(busybox_job(job_id, ["sh", "-c", "exit 3"]))
    final = daemon.wait_job(job_id)
    assert (final["status"], final["exit_status"]) == ("crashed", 3)


def test_memory_limit_kills_with_oom_error(daemon):
    job_id = daemon.new_job_id()
    job = busybox_job(
        job_id,
        ["dd", "if=/dev/zero", "of=/dev/null", "bs=100M", "count=1"],
        resources={"memory": {"limit": 32 * 1024 * 1024}},
    )
    daemon.client.add_job(job)
    final = daemon.wait_job(job_id)
    assert final["status"] == "crashed"
    assert "out of memory" in final["error"]


def test_max_fd_shows_in_ulimit_and_env_is_flynns(daemon):
    job_id = daemon.new_job_id()
    job = busybox_job(
        job_id,
        ["sh", "-c", "ulimit -n; echo $PORT $PORT_0 $PORT_1 $HOSTNAME $HOME $FOO"],
        resources={"max_fd": {"limit": 321}},
        env={"FOO": "bar"},
        ports=[{"port": 0, "proto": "tcp"}, {"port": 8080, "proto": "tcp"}],
    )
    daemon.client.add_job(job)
    assert daemon.wait_job(job_id)["status"] == "done"
    lines = daemon.run_cli("log", job_id).stdout.splitlines()
    assert lines[0] == "321"
    assert lines[1] == f"5000 5000 8080 {job_id.split('-', 1)[1]} / bar"


def test_sigterm_ignored_then_sigkill(daemon):
    job_id = daemon.new_job_id()
    script = "trap 'echo got TERM' TERM; echo ready; while true; do sleep 0.2; done"
    daemon.client.add_job(busybox_job(job_id, ["sh", "-c", script]))
    daemon.wait_output(job_id, "ready")  # its trap is set
    assert daemon.run_cli("stop", job_id).returncode == 0
    final = daemon.wait_job(job_id, timeout=20)
    # SIGTERM came first and was caught and ignored; SIGKILL ended it after --stop-timeout
    # (stderr has sh's "Terminated": the SIGTERM reached its `sleep` too)
    assert daemon.run_cli("log", "--split-stderr", job_id).stdout == "ready\ngot TERM\n"
    assert final["status"] == "crashed"
    assert final["error"] == "killed by signal SIGKILL"
    assert final["exit_status"] == 128 + 9


def test_sigterm_stops_a_plain_sleep(daemon):
    job_id = daemon.new_job_id()
    daemon.client.add_job(busybox_job(job_id, ["sleep", "100"]))
    daemon.wait_job(job_id, ("running",))
    daemon.client.stop_job(job_id)
    final = daemon.wait_job(job_id)
    # tini (PID 1) passed SIGTERM on to sleep, which died of it: no SIGKILL was needed
    assert final["status"] == "crashed"
    assert final["exit_status"] == 128 + 15
    assert final["error"] is None


def test_signal_endpoint_and_cli(daemon):
    job_id = daemon.new_job_id()
    script = "trap 'exit 7' USR1; echo ready; while true; do sleep 0.1; done"
    daemon.client.add_job(busybox_job(job_id, ["sh", "-c", script]))
    daemon.wait_output(job_id, "ready")  # its trap is set
    bad = daemon.run_cli("signal", job_id, "NOPE")
    assert bad.returncode != 0 and "invalid signal" in bad.stderr
    assert daemon.run_cli("signal", job_id, "USR1").returncode == 0
    assert daemon.wait_job(job_id)["exit_status"] == 7


def test_signals_reach_the_jobs_children(daemon):
    job_id = daemon.new_job_id()
    script = "trap 'echo trapped' USR1; sleep 100; echo sleep ended $?"
    daemon.client.add_job(busybox_job(job_id, ["sh", "-c", script]))
    # once `sleep` runs, sh has set its trap
    wait_for(lambda: runs(daemon, job_id, [b"sleep", b"100"]), what="the job's sleep 100")
    assert daemon.run_cli("signal", job_id, "USR1").returncode == 0
    # tini passed USR1 to the whole process group: `sleep` died of it at once, then sh ran
    # its trap (sh alone would have waited the 100 s for sleep to end)
    assert daemon.wait_job(job_id, timeout=10)["status"] == "done"
    log = daemon.run_cli("log", "--split-stderr", job_id)
    assert log.stdout == "trapped\nsleep ended 138\n"  # 138: 128 + SIGUSR1


def job_processes(d, job_id: str) -> dict[int, tuple[str, bytes]]:
    """Every process of a running job (from its cgroup): pid → (state letter, command line)."""
    for procs in Path("/sys/fs/cgroup").glob(f"*/flynn/{d.host_id}/user/{job_id}/cgroup.procs"):
        out = {}
        for pid in map(int, procs.read_text().split()):
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                out[pid] = (
                    stat.rsplit(")", 1)[1].split()[0],
                    Path(f"/proc/{pid}/cmdline").read_bytes(),
                )
        if out:
            return out
    raise AssertionError(f"no processes found for job {job_id}")


def runs(d, job_id: str, args: list[bytes]) -> bool:
    """Whether a process of the job runs with these arguments."""
    try:
        return any(cmd.split(b"\0")[:-1] == args for _, cmd in job_processes(d, job_id).values())
    except AssertionError:  # no process yet
        return False


def ticks(d, job_id: str) -> int:
    return (d.base / "log" / f"{job_id}.log").read_text().count('"tick"')


def test_signal_stop_and_cont_reach_every_process_of_the_job(daemon):
    job_id = daemon.new_job_id()
    # the worker runs in a session of its own, out of reach of process-group signals
    script = "setsid sh -c 'while true; do echo tick; sleep 0.1; done' & wait"
    daemon.client.add_job(busybox_job(job_id, ["sh", "-c", script]))
    daemon.wait_job(job_id, ("running",))
    wait_for(lambda: ticks(daemon, job_id) >= 3, what="three ticks")

    def worker_states() -> list[str]:
        procs = job_processes(daemon, job_id).values()
        return [st for st, cmd in procs if cmd.startswith(b"sh\0-c\0while")]

    assert daemon.run_cli("signal", job_id, "STOP").returncode == 0
    # every process is stopped (T), tini and the worker included; zombies (Z) may wait for
    # their stopped parent
    states = job_processes(daemon, job_id)
    assert len(states) >= 3 and {st for st, _ in states.values()} <= {"T", "Z"}, states
    assert worker_states() == ["T"]
    stopped_at = ticks(daemon, job_id)
    time.sleep(1)  # not a wait for an event: ten ticks' time in which none may come
    assert ticks(daemon, job_id) == stopped_at  # nothing ran

    assert daemon.run_cli("signal", job_id, "CONT").returncode == 0
    wait_for(lambda: ticks(daemon, job_id) >= stopped_at + 3, what="ticks after CONT")
    assert "T" not in {st for st, _ in job_processes(daemon, job_id).values()}
    daemon.client.stop_job(job_id)
    daemon.wait_job(job_id)


def test_corrupt_layer_is_refused_and_nothing_starts(make_daemon, tmp_path):
    daemon = make_daemon(extra_args=["--image-dir", str(tmp_path)])
    job_id = daemon.new_job_id()
    job = busybox_job(job_id, ["true"])
    spec = job["mountspecs"][0]
    bad = tmp_path / "bad.squashfs"
    data = bytearray(Path(spec["url"].removeprefix("file://")).read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    spec["url"] = f"file://{bad}"
    spec["id"] = spec["hashes"]["sha512_256"] = "0" * 64  # a different id: not cached yet
    daemon.client.add_job(job)
    final = daemon.wait_job(job_id)
    assert final["status"] == "failed"
    assert "sha512_256" in final["error"] and "0" * 16 in final["error"]
    assert final["exit_status"] is None
    assert not list((daemon.base / "vol" / "layers").glob("0000*"))
    assert not mounts_under(daemon.base)


def test_validation_conflict_and_not_found_errors(daemon):
    c = daemon.client
    with pytest.raises(HostAPIError) as err:
        c.request("PUT", f"/host/jobs/{daemon.new_job_id()}", {"config": {"args": ["true"]}})
    assert err.value.status == 400
    assert err.value.body["code"] == "validation_error"
    assert err.value.body["detail"] == {"field": "mountspecs"}
    job_id = daemon.new_job_id()
    job = busybox_job(job_id, ["sh", "-c", "sleep 100"])
    job["resources"] = {"memory": {"limit": -5}}
    with pytest.raises(HostAPIError) as err:
        c.add_job(job)
    assert err.value.body["detail"]["field"] == "resources.memory.limit"
    with pytest.raises(HostAPIError) as err:
        c.request("PUT", f"/host/jobs/{job_id}", "not an object")
    assert err.value.status == 400
    job["resources"] = {}
    c.add_job(job)
    with pytest.raises(HostAPIError) as err:
        c.add_job(job)
    assert (err.value.status, err.value.code) == (409, "conflict")
    with pytest.raises(HostAPIError) as err:
        c.get_job("nope-123")
    assert (err.value.status, err.value.code) == (404, "not_found")
    with pytest.raises(HostAPIError) as err:
        c.request("GET", "/no/such/path")
    assert err.value.code == "not_found"
    c.stop_job(job_id)
    daemon.wait_job(job_id)


class StalledServer:
    """An HTTP server on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/layer.squashfs"
        self.conns: list[socket.socket] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)

    def wait_connected(self, timeout: float = 20.0) -> socket.socket:
        return wait_for(lambda: self.conns, timeout, "a connection to the stalled server")[0]

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def stalled_server() -> Iterator[StalledServer]:
    server = StalledServer()
    yield server
    server.close()


def left_of_job(d, job_id: str) -> list[str]:
    """What a job left on its host: mounts, loop devices, cgroups, directories, layer files."""
    d.wait_cleaned(job_id)
    left = mounts_under(d.base)
    left += [str(p) for p in cgroups_of(f"flynn/{d.host_id}") if p.name == job_id]
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    left += [line for line in losetup.splitlines() if str(d.base) in line]
    left += [str(p) for p in (d.base / "vol" / "layers").glob(".*")]  # partial downloads
    return left


def test_stalled_layer_download_holds_no_start_slot_and_delete_ends_it(make_daemon, stalled_server):
    d = make_daemon(extra_args=["--max-job-concurrency", "1"])
    stalled = d.new_job_id()
    job = busybox_job(stalled, ["true"])
    job["mountspecs"][0].update(url=stalled_server.url, id="1" * 64,
                                hashes={"sha512_256": "1" * 64})  # fmt: skip
    d.client.add_job(job)
    conn = stalled_server.wait_connected()
    # while its download hangs, jobs start one after another in the one start slot
    others = [d.new_job_id() for _ in range(3)]
    for job_id in others:
        d.client.add_job(busybox_job(job_id, ["true"]))
        assert d.wait_job(job_id)["status"] == "done"
    assert d.client.get_job(stalled)["status"] == "starting"
    # a DELETE cancels the download at once: the job failed, the host hung up (not after the
    # download's 60 s read timeout; the bound leaves a busy machine room)
    asked = time.monotonic()
    d.client.stop_job(stalled)
    final = d.wait_job(stalled, timeout=15)
    assert time.monotonic() - asked < 15
    assert (final["status"], final["error"]) == ("failed", "stopped while starting")
    conn.settimeout(5)
    assert conn.recv(65536).startswith(b"GET /layer.squashfs")
    assert conn.recv(65536) == b""
    for job_id in others:
        d.wait_cleaned(job_id)
    assert left_of_job(d, stalled) == []
    assert not (d.base / "vol" / "layers" / f"{'1' * 64}.squashfs").exists()


def slow_runc(directory: Path, seconds: int) -> dict[str, str]:
    """A daemon environment whose `runc` takes `seconds` longer to `run` a container, which
    keeps a job in its local start work that long."""
    real = shutil.which("runc") or "/usr/sbin/runc"
    wrapper = directory / "runc"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'for arg in "$@"; do if [ "$arg" = run ]; then sleep {seconds}; break; fi; done\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


def test_429_counts_jobs_in_local_start_work_and_delete_undoes_one(make_daemon, tmp_path):
    d = make_daemon(extra_args=["--max-job-concurrency", "1"], env=slow_runc(tmp_path, 3))
    first = d.new_job_id()
    d.client.add_job(busybox_job(first, ["sleep", "60"]))
    work = d.base / "work" / "jobs" / job_key(first)
    # its layers are here: it holds the slot, in its local work
    wait_for(work.exists, 20, "the job's work directory", every=0.02)
    with pytest.raises(HostAPIError) as err:
        d.client.add_job(busybox_job(d.new_job_id(), ["true"]))
    assert err.value.status == 429
    assert err.value.body == {
        "code": "ratelimited",
        "message": "too many jobs starting (limit 1), retry shortly",
        "retry": True,
    }
    # stopped in the middle of its local work: undone once that ends, never `running`
    d.client.stop_job(first)
    final = d.wait_job(first, timeout=20)
    assert (final["status"], final["error"]) == ("failed", "stopped while starting")
    assert final["started_at"].startswith("0001-")
    assert left_of_job(d, first) == []
    runc_root = d.base / "run" / d.host_id / "runc"
    assert not runc_root.exists() or list(runc_root.iterdir()) == []
    # the slot is free again: the retried PUT is accepted
    second = d.new_job_id()
    d.client.add_job(busybox_job(second, ["true"]))
    assert d.wait_job(second, timeout=20)["status"] == "done"


def test_twenty_jobs_leave_nothing_behind(make_daemon):
    d = make_daemon(extra_args=["--max-job-concurrency", "20"])
    ids = [d.new_job_id() for _ in range(20)]
    for job_id in ids:
        d.client.add_job(busybox_job(job_id, ["sh", "-c", "echo $HOSTNAME; exec sleep 60"]))
    for job_id in ids:
        d.wait_job(job_id, ("running",))
    # all twenty run at once
    jobs = d.client.list_jobs(active=True)
    assert sorted(j for j, v in jobs.items() if v["status"] == "running") == sorted(ids)
    for job_id in ids:
        d.client.stop_job(job_id)
    for job_id in ids:
        assert d.wait_job(job_id)["status"] == "crashed"  # SIGTERM: exit status 143
        assert d.run_cli("log", job_id).stdout == job_id.split("-", 1)[1] + "\n"
    # nothing of theirs remains: mounts, cgroups, runc state, work and run directories
    for job_id in ids:
        d.wait_cleaned(job_id)
    assert mounts_under(d.base) == []
    job_cgroups = [p for p in cgroups_of(f"flynn/{d.host_id}") if p.name in ids]
    assert job_cgroups == []
    runc_root = d.base / "run" / d.host_id / "runc"
    assert [p.name for p in runc_root.iterdir()] == [] if runc_root.exists() else True
    assert list((d.base / "work" / "jobs").iterdir()) == []
    assert list((d.base / "run" / d.host_id / "jobs").iterdir()) == []
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(d.base) not in losetup
    # once the daemon has stopped, not even its partitions remain, in any hierarchy
    assert d.stop() == 0
    assert cgroups_of(f"flynn/{d.host_id}") == []


def test_event_stream_reports_create_start_stop_cleanup(daemon):
    job_id = daemon.new_job_id()
    events: list[str] = []
    # the host subscribes a stream before it answers: once the headers are here, no event
    # can be missed
    headers = {**daemon.auth_headers, "Accept": "text/event-stream"}
    request = urllib.request.Request(f"{daemon.url}/host/jobs", headers=headers)
    stream = urllib.request.urlopen(request, timeout=30)

    def listen() -> None:
        with stream:
            for raw in stream:
                if raw.startswith(b"data: "):
                    event = json.loads(raw[6:])
                    if event["job_id"] == job_id:
                        events.append(event["event"])
                        if event["event"] == "cleanup":
                            return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    daemon.client.add_job(busybox_job(job_id, ["true"]))
    t.join(20)
    assert events == ["create", "start", "stop", "cleanup"]
    # one job's stream of an ended job says how it ended
    one = next(iter(daemon.client.stream_events(job_id)))
    assert one["event"] == "stop" and one["job"]["status"] == "done"


def test_two_daemons_see_only_their_own_jobs(make_daemon):
    a, b = make_daemon(), make_daemon()
    ja, jb = a.new_job_id(), b.new_job_id()
    a.client.add_job(busybox_job(ja, ["sleep", "30"]))
    b.client.add_job(busybox_job(jb, ["sleep", "30"]))
    a.wait_job(ja, ("running",))
    b.wait_job(jb, ("running",))
    assert set(a.client.list_jobs()) == {ja}
    assert set(b.client.list_jobs()) == {jb}
    assert a.run_cli("ps", "-q").stdout.split() == [ja]
    # stopping b's job leaves a's running
    b.client.stop_job(jb)
    b.wait_job(jb)
    assert a.client.get_job(ja)["status"] == "running"
    a.client.stop_job(ja)
    a.wait_job(ja)


@pytest.mark.parametrize("how", ["SIGQUIT", "SIGKILL"])
def test_restart_adopts_running_jobs(make_daemon, how):
    import signal

    d = make_daemon()
    ids = [d.new_job_id() for _ in range(3)]
    for job_id in ids:
        d.client.add_job(busybox_job(job_id, ["sh", "-c", "echo before; sleep 60"]))
    for job_id in ids:
        d.wait_job(job_id, ("running",))
    pids = {j: d.client.get_job(j)["pid"] for j in ids}
    d.stop(getattr(signal, how))
    d.start()
    jobs = d.client.list_jobs()
    assert sorted(jobs) == sorted(ids)
    assert all(jobs[j]["status"] == "running" and jobs[j]["pid"] == pids[j] for j in ids)
    assert d.run_cli("log", ids[0]).stdout == "before\n"
    d.client.stop_job(ids[0])
    assert d.wait_job(ids[0])["status"] == "crashed"
    # the others are still controllable, and stopping the daemon stops them
    assert d.client.get_job(ids[1])["status"] == "running"
    d.stop()
    assert mounts_under(d.base) == []
    out = subprocess.run(["pgrep", "-f", f"shim {d.base}/"], capture_output=True)
    assert out.stdout == b""


def test_ps_inspect_and_stop_cli(daemon):
    job_id = daemon.new_job_id()
    job = busybox_job(job_id, ["sleep", "60"], env={"SECRET": "x"})
    job["metadata"] = {"flynn-controller.app_name": "example", "flynn-controller.type": "web"}
    daemon.client.add_job(job)
    daemon.wait_job(job_id, ("running",))
    ps = daemon.run_cli("ps").stdout.splitlines()
    assert ps[0].split() == ["ID", "STATE", "STARTED", "CONTROLLER", "APP", "CONTROLLER", "TYPE"]
    row = [r for r in ps if r.startswith(job_id)][0]
    import re

    cols = re.split(r" {2,}", row)
    assert cols[0] == job_id and cols[1] == "running" and cols[3:] == ["example", "web"]
    assert cols[2].endswith("ago")
    inspect = daemon.run_cli("inspect", job_id).stdout
    assert re.search(r"^Status\s+running$", inspect, re.M)
    assert "ENV[SECRET]" in inspect
    assert "ENV[SECRET]" not in daemon.run_cli("inspect", "--omit-env", job_id).stdout
    assert daemon.run_cli("stop", job_id).returncode == 0
    daemon.wait_job(job_id)
    assert job_id not in daemon.run_cli("ps").stdout
    assert job_id in daemon.run_cli("ps", "-a").stdout
    missing = daemon.run_cli("inspect", "nope-1")
    assert missing.returncode == 1 and "not found" in missing.stderr
    usage = daemon.run_cli("stop")
    assert usage.returncode == 2 and "usage: flynn-host stop ID..." in usage.stderr


def files_containing(base: Path, text: bytes) -> list[Path]:
    """Regular files under `base` (not inside mounts: layers, root filesystems) holding `text`."""
    found = []
    for top, dirs, files in os.walk(base):
        dirs[:] = [n for n in dirs if not os.path.ismount(os.path.join(top, n))]
        for name in files:
            path = Path(top, name)
            if path.is_file() and not path.is_symlink() and text in path.read_bytes():
                found.append(path)
    return found


def test_files_holding_a_jobs_secrets_are_root_only(daemon):
    secret = f"s3cret-{uuid.uuid4().hex}"
    job_id = daemon.new_job_id()
    job = busybox_job(job_id, ["sh", "-c", 'echo "token $SECRET"; exec sleep 60'],
                      env={"SECRET": secret})  # fmt: skip
    daemon.client.add_job(job)
    daemon.wait_job(job_id, ("running",))
    log_file = daemon.base / "log" / f"{job_id}.log"
    wait_for(lambda: log_file.exists() and secret in log_file.read_text(), what="the secret")
    work = daemon.base / "work" / "jobs" / job_key(job_id)
    run = daemon.base / "run" / daemon.host_id / "jobs" / job_key(job_id)

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    found = files_containing(daemon.base, secret.encode())
    # the job's environment is in the state file and its bundle, its output in its log
    assert {daemon.base / "state.json", work / "bundle" / "config.json", log_file} <= set(found)
    assert {str(p): mode(p) for p in found if mode(p) & 0o077} == {}
    # the job's own files (its writable layer holds whatever it writes) and the directories
    for name in ("disk.img", "bundle/config.json"):
        assert mode(work / name) == 0o600, name
    for name in ("shim.json", "shim.pid", "shim.err", "runc.log", "attach.sock"):
        assert mode(run / name) == 0o600, name
    for d in (work.parent, work, run.parent, run, log_file.parent):
        assert mode(d) == 0o700, d

    daemon.client.stop_job(job_id)
    daemon.wait_job(job_id)
    daemon.wait_cleaned(job_id)
    found = files_containing(daemon.base, secret.encode())
    assert {daemon.base / "state.json", log_file} <= set(found)
    assert {str(p): mode(p) for p in found if mode(p) & 0o077} == {}
