"""Jobs end to end through a real daemon: real runc containers from the busybox squashfs image."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from flynn_host.client import HostAPIError

from .conftest import busybox_job, cgroups_of, mounts_under, needs_root

pytestmark = needs_root


def test_job_from_curl_runs_logs_and_ends_done(daemon):
    job_id = daemon.new_job_id()
    job = busybox_job(job_id, ["sh", "-c", "echo hello from $HOSTNAME; echo oops >&2"])
    out = subprocess.run(
        ["curl", "-sS", "-X", "PUT", "-H", "Content-Type: application/json",
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
    daemon.wait_job(job_id, ("running",))
    time.sleep(0.3)  # let sh install its trap
    assert daemon.run_cli("stop", job_id).returncode == 0
    final = daemon.wait_job(job_id, timeout=20)
    # SIGTERM came first and was caught and ignored; SIGKILL ended it after --stop-timeout
    assert daemon.run_cli("log", job_id).stdout == "ready\ngot TERM\n"
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
    job = busybox_job(job_id, ["sh", "-c", "trap 'exit 7' USR1; while true; do sleep 0.1; done"])
    daemon.client.add_job(job)
    daemon.wait_job(job_id, ("running",))
    time.sleep(0.3)  # let sh install its trap
    bad = daemon.run_cli("signal", job_id, "NOPE")
    assert bad.returncode != 0 and "invalid signal" in bad.stderr
    assert daemon.run_cli("signal", job_id, "USR1").returncode == 0
    assert daemon.wait_job(job_id)["exit_status"] == 7


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


def test_concurrency_limit_gives_429_with_retry(make_daemon):
    d = make_daemon(extra_args=["--max-job-concurrency", "1"])
    first = d.new_job_id()
    # a layer from a URL that never answers keeps the first job in `starting`
    import socket

    hold = socket.socket()
    hold.bind(("127.0.0.1", 0))
    hold.listen(1)
    job = busybox_job(first, ["true"])
    job["mountspecs"][0].update(url=f"http://127.0.0.1:{hold.getsockname()[1]}/x",
                                id="1" * 64, hashes={"sha512_256": "1" * 64})  # fmt: skip
    try:
        d.client.add_job(job)
        assert d.client.get_job(first)["status"] == "starting"
        with pytest.raises(HostAPIError) as err:
            d.client.add_job(busybox_job(d.new_job_id(), ["true"]))
        assert err.value.status == 429
        assert err.value.body == {
            "code": "ratelimited",
            "message": "too many jobs starting (limit 1), retry shortly",
            "retry": True,
        }
    finally:
        hold.close()
    assert d.wait_job(first)["status"] == "failed"


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

    def listen() -> None:
        for event in daemon.client.stream_events():
            if event["job_id"] == job_id:
                events.append(event["event"])
                if event["event"] == "cleanup":
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    time.sleep(0.3)
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
