"""Tests for flynn_host.runtime.shim with real runc: busybox containers started the way the
daemon does.

Each test builds a job directory (an OCI bundle over a shared busybox rootfs, and shim.json),
runs `python -m flynn_host.runtime.shim JOBDIR` in a new session, and talks to it over its
socket. The `make_job` fixture always kills the shims it started, force-deletes leftover
containers and removes the test cgroups, also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flynn_host.dev.host import wait_for_async
from flynn_host.runtime import attach
from flynn_host.runtime.attach import Frame, read_frame
from flynn_host.runtime.logs import read_entries
from flynn_host.runtime.shim.client import connect_shim, shim_request
from flynn_host.runtime.shim.startup import ShimConfig

RUNC = shutil.which("runc") or "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"
CGROUP_PARENT = "flynn-shimtest"
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 10

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc)"),
    pytest.mark.needs("runc", BUSYBOX),  # busybox-static: copied into the containers' rootfs
]

OUT_FLAGS = attach.ATTACH_STDOUT | attach.ATTACH_STDERR


def remove_test_cgroups() -> None:
    for controller in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}"):
        for path, _, _ in sorted(os.walk(controller), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(path)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rootfs")
    for name in ("bin", "dev", "proc", "sys", "tmp", "etc"):
        (root / name).mkdir()
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    return root


@pytest.fixture(scope="module")
def base_spec(tmp_path_factory, rootfs) -> dict:
    spec_dir = tmp_path_factory.mktemp("spec")
    subprocess.run([RUNC, "spec", "--bundle", str(spec_dir)], check=True)
    spec = json.loads((spec_dir / "config.json").read_text())
    spec["root"] = {"path": str(rootfs), "readonly": False}
    yield spec
    remove_test_cgroups()


class Job:
    """One job directory and the shim running it."""

    def __init__(self, base: Path, spec: dict, args: list[str], **options) -> None:
        self.id = f"shimtest-{uuid.uuid4().hex[:8]}"
        self.dir = base / self.id
        self.runc_root = str(base / "runc")  # one per test: `runc list` shows only ours
        self.log_file = str(self.dir / "log")
        self.proc: subprocess.Popen | None = None
        bundle = self.dir / "bundle"
        bundle.mkdir(parents=True)
        spec = json.loads(json.dumps(spec))
        spec["process"]["args"] = args
        spec["process"]["terminal"] = options.get("tty", False)
        spec["linux"]["cgroupsPath"] = f"/{CGROUP_PARENT}/{self.id}"
        (bundle / "config.json").write_text(json.dumps(spec))
        config = ShimConfig(
            job_id=self.id,
            runc=RUNC,
            runc_root=self.runc_root,
            bundle=str(bundle),
            log_file=self.log_file,
            log_max_bytes=options.pop("log_max_bytes", 1 << 20),
            **options,
        )
        config.save(str(self.dir / "shim.json"))

    def start(self) -> dict:
        """Start the shim as the daemon does and return its report line."""
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flynn_host.runtime.shim", str(self.dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        assert ready, "the shim did not report within 10s"
        return json.loads(self.proc.stdout.readline())

    def wait(self) -> dict:
        """Wait for the shim to exit; return exit.json."""
        assert self.proc is not None
        assert self.proc.wait(TIMEOUT) == 0, self.shim_err()
        return json.loads((self.dir / "exit.json").read_text())

    def shim_err(self) -> str:
        path = self.dir / "shim.err"
        return path.read_text() if path.exists() else ""

    def entries(self) -> list[dict]:
        return read_entries(self.log_file)

    def containers(self) -> list[dict]:
        out = subprocess.run(
            [RUNC, "--root", self.runc_root, "list", "--format", "json"],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout or "null") or []

    def cleanup(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
        with contextlib.suppress(subprocess.CalledProcessError, ValueError):
            for container in self.containers():
                subprocess.run(
                    [RUNC, "--root", self.runc_root, "delete", "--force", container["id"]],
                    capture_output=True,
                )


@pytest.fixture
def make_job(tmp_path, base_spec):
    jobs: list[Job] = []

    def make(args: list[str], base: Path | None = None, **options) -> Job:
        job = Job(base or tmp_path, base_spec, args, **options)
        jobs.append(job)
        return job

    yield make
    for job in jobs:
        job.cleanup()
    remove_test_cgroups()


async def open_attach(job: Job, **request) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    request.setdefault("height", 0)
    request.setdefault("width", 0)
    request.setdefault("lines", None)
    reader, writer = await connect_shim(str(job.dir))
    writer.write(json.dumps({"attach": request}).encode() + b"\n")
    await writer.drain()
    return reader, writer


async def read_until_closed(reader: asyncio.StreamReader) -> list[Frame]:
    frames = []
    while (frame := await asyncio.wait_for(read_frame(reader), TIMEOUT)) is not None:
        frames.append(frame)
    return frames


async def read_until(reader: asyncio.StreamReader, text: bytes) -> bytes:
    """Read data frames until their bytes contain `text`."""
    seen = b""
    while text not in seen:
        frame = await asyncio.wait_for(read_frame(reader), TIMEOUT)
        assert frame is not None, f"closed before {text!r}; got {seen!r}"
        seen += frame.data
    return seen


def output(frames: list[Frame], stream: int) -> bytes:
    return b"".join(f.data for f in frames if f.kind == "data" and f.stream == stream)


async def wait_for_log(job: Job, text: str) -> None:
    await wait_for_async(
        lambda: any(e["m"] == text for e in job.entries()), TIMEOUT, f"{text!r} logged", 0.02
    )


# --- tests --------------------------------------------------------------------------------


def test_output_is_logged_and_exit_status_recorded(make_job):
    job = make_job(["sh", "-c", "echo out; echo err >&2; exit 3"])
    report = job.start()  # how fast: bench/job_start.py (its "shim" and "runc" steps)
    assert isinstance(report["pid"], int), report
    assert job.wait() == {"status": 3, "signal": None}
    assert int((job.dir / "shim.pid").read_text()) == job.proc.pid
    entries = job.entries()
    assert sorted((e["s"], e["m"]) for e in entries) == [("stderr", "err"), ("stdout", "out")]
    assert [e["n"] for e in entries] == [1, 2]
    # the daemon deletes the container (after reading its cgroup), not the shim
    assert [c["status"] for c in job.containers()] == ["stopped"]
    assert not (job.dir / "attach.sock").exists()


async def test_follow_logs_sends_entries_then_exit(make_job):
    job = make_job(["sh", "-c", "echo one; sleep 0.3; echo two"])
    job.start()
    feeds, writers = [], []
    for since in (0, 1):
        reader, writer = await connect_shim(str(job.dir))
        writer.write(json.dumps({"follow_logs": {"since": since}}).encode() + b"\n")
        feeds.append(reader)
        writers.append(writer)  # a StreamWriter no longer referenced closes its connection
    results = []
    for reader in feeds:
        lines = []
        while line := await asyncio.wait_for(reader.readline(), TIMEOUT):
            lines.append(json.loads(line))
        results.append(lines)
    everything, after_first = results
    assert [e["m"] for e in everything[:-1]] == ["one", "two"]
    assert [e["m"] for e in after_first[:-1]] == ["two"]
    assert everything[-1] == after_first[-1] == {"exit": {"status": 0, "signal": None}}
    assert everything[:-1] == job.entries()
    job.wait()


async def test_attach_replays_logs_then_streams_until_exit(make_job):
    job = make_job(
        ["sh", "-c", 'echo first; read x; echo "got $x"; echo err >&2; exit 5'], stdin=True
    )
    job.start()
    await wait_for_log(job, "first")

    # logs without stream: the replay (here only the last line asked for), then close
    reader, _ = await open_attach(job, flags=attach.ATTACH_LOGS | OUT_FLAGS, lines=1)
    assert await read_until_closed(reader) == [Frame("data", stream=1, data=b"first\n")]

    flags = attach.ATTACH_LOGS | attach.ATTACH_STREAM | attach.ATTACH_STDIN | OUT_FLAGS
    reader, writer = await open_attach(job, flags=flags)
    writer.write(attach.data_frame(attach.STDIN, b"hi\n"))
    frames = await read_until_closed(reader)
    assert output(frames, attach.STDOUT) == b"first\ngot hi\n"
    assert output(frames, attach.STDERR) == b"err\n"
    assert frames[-3:] == [
        Frame("data", stream=1, data=b""),
        Frame("data", stream=2, data=b""),
        Frame("exit", status=5),
    ]
    assert job.wait() == {"status": 5, "signal": None}


async def test_attach_replays_a_pending_partial_line_once(make_job):
    job = make_job(["sh", "-c", 'read go; printf abc; read x; echo "def"'], stdin=True)
    job.start()
    # a live stream (no logs) starts the job and sees "abc": the shim has read it, and holds
    # it back from the log (no newline yet); leaving does not close the job's stdin
    live = attach.ATTACH_STREAM | attach.ATTACH_STDIN | OUT_FLAGS
    reader, writer = await open_attach(job, flags=live)
    writer.write(attach.data_frame(attach.STDIN, b"go\n"))
    assert await read_until(reader, b"abc") == b"abc"
    writer.close()
    assert job.entries() == []
    flags = attach.ATTACH_LOGS | attach.ATTACH_STREAM | attach.ATTACH_STDIN | OUT_FLAGS
    reader, writer = await open_attach(job, flags=flags)
    writer.write(attach.data_frame(attach.STDIN, b"\n"))
    frames = await read_until_closed(reader)
    assert output(frames, attach.STDOUT) == b"abcdef\n"
    job.wait()
    assert [(e["m"], e.get("p", False)) for e in job.entries()] == [("abc", True), ("def", False)]


async def test_stdin_is_written_and_closed(make_job):
    job = make_job(["cat"], stdin=True)
    job.start()
    flags = attach.ATTACH_STREAM | attach.ATTACH_STDIN | OUT_FLAGS
    reader, writer = await open_attach(job, flags=flags)
    writer.write(attach.data_frame(attach.STDIN, b"hello\n"))
    assert await read_until(reader, b"hello\n") == b"hello\n"
    writer.write(attach.data_frame(attach.STDIN, b""))
    frames = await read_until_closed(reader)
    assert frames[-1] == Frame("exit", status=0)
    assert job.wait() == {"status": 0, "signal": None}


async def test_tty_size_resize_and_eof(make_job):
    script = "read x; stty size; read y; stty size; tty; cat; echo done"
    job = make_job(["sh", "-c", script], tty=True, stdin=True)
    job.start()
    flags = attach.ATTACH_STREAM | attach.ATTACH_STDIN | attach.ATTACH_STDOUT
    reader, writer = await open_attach(job, flags=flags, height=40, width=120)
    writer.write(attach.data_frame(attach.STDIN, b"a\n"))
    assert b"40 120" in await read_until(reader, b"40 120")
    writer.write(attach.resize_frame(30, 100))
    writer.write(attach.data_frame(attach.STDIN, b"b\n"))
    resized = await read_until(reader, b"30 100")
    assert b"30 100" in resized
    writer.write(attach.data_frame(attach.STDIN, b""))  # ^D ends cat
    frames = await read_until_closed(reader)
    # `tty`'s answer may have come in the same chunk as `stty size`'s
    text = resized + output(frames, attach.STDOUT)
    assert b"/dev/pts/0" in text and b"done" in text
    assert frames[-1] == Frame("exit", status=0)
    job.wait()
    assert all(e["s"] == "stdout" for e in job.entries())


async def test_signal_request_reaches_the_container(make_job):
    script = 'trap "exit 7" TERM; echo ready; while true; do sleep 0.1; done'
    job = make_job(["sh", "-c", script])
    pid = job.start()["pid"]
    await wait_for_log(job, "ready")
    assert await shim_request(str(job.dir), {"status": True}) == {"pid": pid, "running": True}
    waiter = asyncio.create_task(shim_request(str(job.dir), {"wait": True}))
    assert await shim_request(str(job.dir), {"signal": signal.SIGTERM}) == {"ok": True}
    assert await asyncio.wait_for(waiter, TIMEOUT) == {"exit": {"status": 7, "signal": None}}
    assert job.wait() == {"status": 7, "signal": None}


async def test_signal_frame_kills_the_container(make_job):
    job = make_job(["sleep", "100"])
    job.start()
    reader, writer = await open_attach(job, flags=attach.ATTACH_STREAM | OUT_FLAGS)
    writer.write(attach.signal_frame(signal.SIGKILL))
    frames = await read_until_closed(reader)
    assert frames[-1] == Frame("exit", status=137)
    assert job.wait() == {"status": 137, "signal": 9}


def test_log_rotation_keeps_two_files(make_job):
    script = 'i=0; while [ $i -lt 300 ]; do echo "line $i"; i=$((i+1)); done'
    job = make_job(["sh", "-c", script], log_max_bytes=2000)
    job.start()
    job.wait()
    assert sorted(p.name for p in job.dir.glob("log*")) == ["log", "log.1"]
    assert all(p.stat().st_size < 2000 + 200 for p in job.dir.glob("log*"))
    seqs = [e["n"] for e in job.entries()]
    assert seqs == list(range(seqs[0], 301)) and seqs[0] > 1
    assert job.entries()[-1]["m"] == "line 299"


def test_runc_failure_is_reported_and_leaves_nothing(make_job):
    job = make_job(["/nonexistent"])
    report = job.start()
    assert "/nonexistent" in report.get("error", ""), report
    assert job.proc.wait(TIMEOUT) != 0
    assert not (job.dir / "exit.json").exists()
    assert not (job.dir / "attach.sock").exists()
    assert job.containers() == []


async def test_bad_clients_do_not_disturb_the_shim(make_job):
    job = make_job(["sh", "-c", "read x"], stdin=True)
    job.start()
    for line in (b"not json\n", b'{"bogus": 1}\n', b'{"signal": "TERM"}\n', b"[1]\n"):
        reader, writer = await connect_shim(str(job.dir))
        writer.write(line)
        reply = json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT))
        assert "error" in reply, (line, reply)
        writer.close()
    # clients that vanish: before the request, mid-request, and mid-attach
    for data in (b"", b'{"wai', b'{"attach": {"flags": 31}}\n' + b"\x03\x00\x00"):
        _, writer = await connect_shim(str(job.dir))
        writer.write(data)
        await writer.drain()
        writer.close()
    # whenever the shim gets to them, it must stay up: it answers and exits cleanly below
    status = await shim_request(str(job.dir), {"status": True})
    assert status["running"] is True
    assert await shim_request(str(job.dir), {"signal": signal.SIGKILL}) == {"ok": True}
    assert job.wait() == {"status": 137, "signal": 9}
    assert "Traceback" not in job.shim_err()


async def test_deep_job_directory_and_default_tty_size(make_job, tmp_path):
    # unix socket names are limited to 107 bytes; job directories can be longer
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    job = make_job(["sh", "-c", "read x; stty size"], base=deep, tty=True, stdin=True)
    assert len(str(job.dir / "attach.sock")) > 107
    job.start()
    flags = attach.ATTACH_STREAM | attach.ATTACH_STDIN | attach.ATTACH_STDOUT
    reader, writer = await open_attach(job, flags=flags)
    writer.write(attach.data_frame(attach.STDIN, b"go\n"))
    frames = await read_until_closed(reader)
    assert b"24 80" in output(frames, attach.STDOUT)
    assert job.wait() == {"status": 0, "signal": None}
