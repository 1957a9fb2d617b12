"""What a job's container gets: resources as cgroups, a bounded writable layer, volumes,
host networking, /dev/shm, stdin and a TTY through `flynn-host run`, and bounded logs."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flynn_host.client import HostAPIError

from ..conftest import ROOT, busybox_job, needs_root, read_until

pytestmark = needs_root

MIB = 1024 * 1024


def job_cgroup(daemon, job_id: str, controller: str) -> Path:
    return Path("/sys/fs/cgroup") / controller / "flynn" / daemon.host_id / "user" / job_id


def test_resources_become_cgroup_limits(daemon):
    job_id = daemon.new_job_id()
    job = busybox_job(
        job_id,
        ["sleep", "30"],
        resources={
            "memory": {"limit": 64 * MIB},
            "cpu": {"limit": 500},
            "max_procs": {"limit": 7},
        },
    )
    daemon.client.add_job(job)
    daemon.wait_job(job_id, ("running",))
    assert (job_cgroup(daemon, job_id, "memory") / "memory.limit_in_bytes").read_text() == (
        f"{64 * MIB}\n"
    )
    assert (job_cgroup(daemon, job_id, "cpu") / "cpu.shares").read_text() == "512\n"
    assert (job_cgroup(daemon, job_id, "pids") / "pids.max").read_text() == "7\n"
    # partitions carry Flynn's CPU shares
    part = Path("/sys/fs/cgroup/cpu/flynn") / daemon.host_id
    assert (part / "user" / "cpu.shares").read_text() == "8192\n"
    assert (part / "system" / "cpu.shares").read_text() == "4096\n"
    daemon.client.stop_job(job_id)
    daemon.wait_job(job_id)
    daemon.wait_cleaned(job_id)
    assert not job_cgroup(daemon, job_id, "memory").exists()


def test_max_procs_stops_a_fork_bomb(daemon):
    job_id = daemon.new_job_id()
    script = "echo start; for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done; wait; echo finished"
    job = busybox_job(job_id, ["sh", "-c", script], resources={"max_procs": {"limit": 4}})
    daemon.client.add_job(job)
    final = daemon.wait_job(job_id, timeout=30)
    # tini, sh and two sleeps fill the pids cgroup; the next fork fails and busybox sh gives up
    out = daemon.run_cli("log", job_id).stdout
    assert out.startswith("start\n")
    assert "can't fork: Resource temporarily unavailable" in out
    assert "finished" not in out
    assert (final["status"], final["exit_status"]) == ("crashed", 2)
    assert not job_cgroup(daemon, job_id, "pids").exists()


def test_temp_disk_bounds_the_writable_layer(daemon):
    job_id = daemon.new_job_id()
    job = busybox_job(
        job_id,
        ["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=80 2>&1; df -k / | tail -1"],
        resources={"temp_disk": {"limit": 32 * MIB}},
    )
    daemon.client.add_job(job)
    final = daemon.wait_job(job_id)
    out = daemon.run_cli("log", job_id).stdout
    assert "No space left on device" in out
    assert final["status"] == "done"  # the shell's last command (df) succeeded


def test_dev_shm_and_writable_root(daemon):
    job_id = daemon.new_job_id()
    job = busybox_job(
        job_id, ["sh", "-c", "df -k /dev/shm | tail -1; echo x > /etc/newfile && cat /etc/newfile"]
    )
    daemon.client.add_job(job)
    assert daemon.wait_job(job_id)["status"] == "done"
    lines = daemon.run_cli("log", job_id).stdout.splitlines()
    assert lines[0].split()[1] == str(64 * 1024)  # 64 MB, in 1K blocks
    assert lines[1] == "x"


def test_host_network_versus_own_namespace(daemon):
    own, hostnet = daemon.new_job_id(), daemon.new_job_id()
    daemon.client.add_job(busybox_job(own, ["cat", "/proc/net/dev"]))
    daemon.client.add_job(
        busybox_job(hostnet, ["cat", "/proc/net/dev"], host_network=True, partition="system")
    )
    daemon.wait_job(own)
    daemon.wait_job(hostnet)
    own_ifs = re.findall(r"^\s*(\S+):", daemon.run_cli("log", own).stdout, re.M)
    host_ifs = re.findall(r"^\s*(\S+):", daemon.run_cli("log", hostnet).stdout, re.M)
    assert own_ifs == ["lo"]
    assert set(host_ifs) == set(re.findall(r"^\s*(\S+):", Path("/proc/net/dev").read_text(),
                                           re.M))  # fmt: skip


def test_volume_persists_across_jobs_and_delete_on_stop(daemon):
    c = daemon.client
    vol = c.request("POST", "/storage/providers/default/volumes", {"meta": {"app": "t"}})
    assert vol["type"] == "data" and vol["meta"] == {"app": "t"}
    assert c.request("GET", f"/storage/volumes/{vol['id']}")["id"] == vol["id"]
    assert [v["id"] for v in c.request("GET", "/storage/volumes")] == [vol["id"]]
    mount = [{"target": "/data", "volume": vol["id"], "writeable": True}]
    writer, reader = daemon.new_job_id(), daemon.new_job_id()
    c.add_job(busybox_job(writer, ["sh", "-c", "echo kept > /data/f"], volumes=mount))
    daemon.wait_job(writer)
    c.add_job(busybox_job(reader, ["cat", "/data/f"], volumes=mount))
    daemon.wait_job(reader)
    assert daemon.run_cli("log", reader).stdout == "kept\n"
    # a volume in use cannot be deleted; delete_on_stop removes it when its job ends
    holder = daemon.new_job_id()
    c.add_job(busybox_job(holder, ["sleep", "30"], volumes=[{**mount[0], "delete_on_stop": True}]))
    daemon.wait_job(holder, ("running",))
    with pytest.raises(HostAPIError) as err:
        c.request("DELETE", f"/storage/volumes/{vol['id']}")
    assert err.value.status == 409
    c.stop_job(holder)
    daemon.wait_job(holder)
    daemon.wait_cleaned(holder)
    deadline = time.monotonic() + 10  # removed in the job's clean-up, just after it ended
    while any(v["id"] == vol["id"] for v in c.request("GET", "/storage/volumes")):
        assert time.monotonic() < deadline, "delete_on_stop volume still there"
        time.sleep(0.05)
    with pytest.raises(HostAPIError) as err:
        c.request("GET", f"/storage/volumes/{vol['id']}")
    assert err.value.status == 404
    # a job naming a volume that does not exist is refused before anything starts
    with pytest.raises(HostAPIError) as err:
        c.add_job(busybox_job(daemon.new_job_id(), ["true"], volumes=mount))
    assert err.value.body["detail"] == {"field": "config.volumes[0].volume"}


def test_run_pipes_stdin_and_returns_exit_status(daemon):
    out = subprocess.run(
        [sys.executable, "-m", "flynn_host.cli.main", "run", "busybox", "sh", "-c",
         "cat; echo err >&2; exit 5"],
        input="piped input\n", env=daemon.cli_env, capture_output=True, text=True, timeout=60,
        cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 5, out.stderr
    assert out.stdout == "piped input\n"
    assert out.stderr == "err\n"
    # the job it ran is gone from the running list and left nothing behind
    assert daemon.run_cli("ps", "-q").stdout == ""


def test_run_with_bind_workdir_and_limits(daemon, tmp_path):
    (tmp_path / "hello.txt").write_text("from the host\n")
    out = daemon.run_cli(
        "run", f"--bind={tmp_path}:/mnt", "--workdir=/mnt", "--limits=max_fd=77",
        "busybox", "sh", "-c", "cat hello.txt; ulimit -n; touch x 2>/dev/null || echo ro",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == "from the host\n77\nro\n"
    bad = daemon.run_cli("run", "--limits=memory=lots", "busybox", "true")
    assert bad.returncode == 1 and "invalid size" in bad.stderr
    missing = daemon.run_cli("run", "nosuchimage", "true")
    assert missing.returncode == 1 and "nosuchimage" in missing.stderr


def test_run_with_a_tty_is_interactive(daemon):
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI, with the pty as its terminal
        os.environ.update(daemon.cli_env)
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "flynn_host.cli.main", "run",
                                  "busybox", "sh"])  # fmt: skip
    try:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        assert b"# " in read_until(fd, b"# ")  # the shell's prompt: it is interactive
        os.write(fd, b"tty; stty size\n")
        out = read_until(fd, b"33 101")
        assert b"/dev/pts/0" in out and b"33 101" in out
        os.write(fd, b"exit 4\n")
        read_until(fd, b"never", timeout=3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 4
    finally:
        with_suppress_kill(pid)
        os.close(fd)


def with_suppress_kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_log_rotation_lines_and_follow(make_daemon):
    d = make_daemon(extra_args=["--log-max-bytes", "20000"])
    job_id = d.new_job_id()
    script = "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done"
    d.client.add_job(busybox_job(job_id, ["sh", "-c", script]))
    d.wait_job(job_id)
    files = sorted(p.name for p in (d.base / "log").iterdir())
    assert files == [f"{job_id}.log", f"{job_id}.log.1"]  # rotated, never more than two
    total = sum((d.base / "log" / f).stat().st_size for f in files)
    assert total <= 2 * 20000 + 200
    last = d.run_cli("log", "--lines=3", job_id).stdout
    assert last == "line 1997\nline 1998\nline 1999\n"
    # -f follows a running job until it ends
    follower = d.new_job_id()
    d.client.add_job(busybox_job(follower, ["sh", "-c", "echo a; sleep 1; echo b"]))
    d.wait_job(follower, ("running",))
    out = d.run_cli("log", "-f", follower, timeout=20)
    assert out.stdout == "a\nb\n"
