"""Shipping job logs as Flynn runs it: a real `flynn-host daemon` running busybox jobs that print
numbered lines, and real `flynn-host component logaggregator` processes (and, once, a real
discoverd) on loopback, killed, restarted, stopped and continued while the jobs print.

What is checked each time is what a user of `flynn log` relies on: every line arrives, once,
in order, with its app, job, process type, stream and time. The figures (latency, throughput,
a job's pace with and without the aggregator) are printed (`-s`)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flynn_logaggregator.types import parse_time

from flynn_host.dev import procs
from flynn_host.dev.host import (
    Daemon,
    busybox_job,
    free_ports,
    mounts_under,
    require_programs,
    wait_for,
)
from flynn_host.dev.logaggregator import aggregator_env
from flynn_host.runtime.logs import read_entries

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc)")

APP = "app1"
# a job printing 1, 2, 3, ... five times a second
TICKS = ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i; sleep 0.2; done"]


# --- real aggregators, on fixed ports so a restarted one is found at the same address ----------


@dataclass
class Aggregator:
    name: str
    api_port: int
    syslog_port: int
    base: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.syslog_port}"

    @property
    def setting(self) -> str:
        """This aggregator in `FLYNN_LOGMUX_AGGREGATORS`."""
        return f"{self.addr}={self.url}"

    def start(self, **extra_env: str) -> None:
        self.starts += 1
        env = aggregator_env(self.api_port, self.syslog_port, **extra_env)
        log = open(self.base / f"{self.name}-{self.starts}.log", "ab")  # noqa: SIM115
        with log:
            self.proc = subprocess.Popen(procs.component_command("logaggregator"), env=env,
                                         stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        wait_for(lambda: procs.answers(self.url + "/.well-known/status") or self.proc.poll(),
                 120, f"{self.name} answering")  # fmt: skip
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return (self.base / f"{self.name}-{self.starts}.log").read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            procs.stop(self.proc)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.load(r)

    def messages(self, app: str = APP) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/log/{app}", timeout=120) as r:
            return [json.loads(x) for x in r.read().splitlines() if x.strip()]

    def cursor_seq(self, host_id: str) -> int:
        return int(self.get("/cursors").get(host_id, {}).get("seq", 0))


@pytest.fixture
def aggregators(tmp_path: Path) -> Iterator[Callable[..., Aggregator]]:
    made: list[Aggregator] = []

    def factory(name: str = "agg", start: bool = True, **env: str) -> Aggregator:
        api, syslog = free_ports(2)
        a = Aggregator(name, api, syslog, tmp_path)
        made.append(a)
        if start:
            a.start(**{"LOGAGGREGATOR_BUFFER_SIZE": "100000", **env})
        return a

    yield factory
    for a in made:
        a.stop()


@dataclass
class Follower:
    """`GET /log/<app>?follow=true&lines=N` streamed by curl into a file: it keeps up with any
    ingest rate, so the aggregator never drops it as too slow."""

    url: str
    out: Path
    proc: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen(["curl", "-sN", self.url], stdout=f)

    def lines(self) -> int:
        with open(self.out, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    def stop(self) -> list[int]:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait()
        return numbers(json.loads(x) for x in self.out.read_bytes().splitlines() if x.strip())


def numbers(msgs: Any) -> list[int]:
    return [int(m["msg"]) for m in msgs]


def contiguous(nums: list[int]) -> bool:
    return nums == list(range(nums[0], nums[0] + len(nums))) if nums else True


def app_job(d: Daemon, args: list[str], app: str = APP, ptype: str = "web", **config: Any) -> str:
    job_id = d.new_job_id()
    job = busybox_job(job_id, args, **config)
    if app:
        job["metadata"] = {"flynn-controller.app": app, "flynn-controller.type": ptype}
    d.client.add_job(job)
    return job_id


def paced(count: int, per_chunk: int, pause: float) -> list[str]:
    """A job printing 1..count, `per_chunk` lines at a time with a pause between chunks."""
    chunks = count // per_chunk
    script = (f"for b in $(seq 0 {chunks - 1}); do seq $((b*{per_chunk}+1)) "
              f"$((b*{per_chunk}+{per_chunk})); sleep {pause}; done")  # fmt: skip
    return ["sh", "-c", script]


def logmux_status(d: Daemon) -> dict[str, Any]:
    req = urllib.request.Request(d.url + "/logmux/status", headers=d.auth_headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(json.load(r))


def job_pace(d: Daemon, job_id: str) -> float:
    """Lines a second the job printed, from its log file's times (when the shim read them)."""
    entries = read_entries(str(d.base / "log" / f"{job_id}.log"))
    span = (parse_time(entries[-1]["t"]) - parse_time(entries[0]["t"])) / 1e9
    return len(entries) / max(span, 1e-3)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def daemon_with(make_daemon: Any, *aggs: Aggregator, **env: str) -> Daemon:
    setting = ",".join(a.setting for a in aggs)
    d: Daemon = make_daemon(env={"FLYNN_LOGMUX_AGGREGATORS": setting, **env},
                            extra_args=["--log-max-bytes", str(64 * 2**20)])  # fmt: skip
    return d


# --- the tests ------------------------------------------------------------------------------------


def test_lines_arrive_with_app_job_type_stream_and_time(make_daemon, aggregators):
    agg = aggregators()
    d = daemon_with(make_daemon, agg)
    web = app_job(d, ["sh", "-c", "echo out 1; echo err 1 >&2; echo out 2"])
    worker = app_job(d, ["sh", "-c", "echo work"], app="app2", ptype="worker")
    plain = app_job(d, ["sh", "-c", "echo not an app job"], app="")
    quiet = app_job(d, ["sh", "-c", "echo not logged"], disable_log=True)
    for job_id in (web, worker, plain, quiet):
        assert d.wait_job(job_id)["status"] == "done"
    got = wait_for(lambda: len(m := agg.messages()) >= 3 and m, 30, "the web job's lines")
    entries = read_entries(str(d.base / "log" / f"{web}.log"))
    # in the order of the job's log (stdout and stderr are two pipes: their lines interleave
    # as the shim reads them)
    assert [(m["msg"], m["stream"]) for m in got] == [(e["m"], e["s"]) for e in entries]
    assert sorted((m["msg"], m["stream"]) for m in got) == [
        ("err 1", "stderr"), ("out 1", "stdout"), ("out 2", "stdout")]  # fmt: skip
    for m, e in zip(got, entries, strict=True):
        assert (m["host_id"], m["job_id"], m["process_type"], m["source"]) == (
            d.host_id, web, "web", "app")  # fmt: skip
        assert parse_time(m["timestamp"]) == parse_time(e["t"])  # the time the line was read
    assert [(m["msg"], m["process_type"], m["job_id"]) for m in agg.messages("app2")] == [
        ("work", "worker", worker)]  # fmt: skip
    # the job without an app and the one with disable_log were not shipped: 4 lines in all
    status = logmux_status(d)
    assert [s["sent"] for s in status["shippers"]] == [4]
    assert status["sequence"]["ring_messages"] == 4


def test_lines_arrive_as_they_are_printed_and_the_latency_is_printed(make_daemon, aggregators):
    agg = aggregators()
    d = daemon_with(make_daemon, agg)
    arrivals: list[tuple[float, dict[str, Any]]] = []
    stream = urllib.request.urlopen(f"{agg.url}/log/{APP}?follow=true", timeout=30)

    def listen() -> None:
        with stream:
            for raw in stream:
                arrivals.append((time.time(), json.loads(raw)))
                if len(arrivals) == 30:
                    return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    job_id = app_job(d, TICKS)
    listener.join(60)
    d.client.stop_job(job_id)
    assert len(arrivals) == 30
    assert numbers(m for _, m in arrivals) == list(range(1, 31))
    latencies = sorted(at - parse_time(m["timestamp"]) / 1e9 for at, m in arrivals)
    print(f"\nlatency (line read by the shim -> follower of the aggregator): median "
          f"{latencies[15] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")  # fmt: skip


def test_an_aggregator_restarted_empty_gets_every_line_once(make_daemon, aggregators):
    agg = aggregators()
    d = daemon_with(make_daemon, agg)
    total = 40_000
    job_id = app_job(d, paced(total, 1000, 0.1))
    wait_for(lambda: agg.cursor_seq(d.host_id), 30, "the first lines")
    agg.kill()
    time.sleep(1)  # the job goes on printing meanwhile
    agg.start(LOGAGGREGATOR_BUFFER_SIZE="100000")  # empty, no leader: no cursor for the host
    after = Follower(f"{agg.url}/log/{APP}?follow=true&lines=10000", agg.base / "after.ndjson")
    assert d.wait_job(job_id, timeout=120)["status"] == "done"
    got = wait_for(lambda: len(m := agg.messages()) >= total and m, 60, "every line")
    wait_for(lambda: after.lines() >= min(total, 10_000), 30, "the follower")
    followed = after.stop()
    # the host sent everything its ring holds to the aggregator that knew nothing of it
    assert numbers(got) == list(range(1, total + 1))
    assert followed[-1] == total and contiguous(followed)
    assert [s["connections"] >= 2 for s in logmux_status(d)["shippers"]] == [True]


def test_a_stopped_aggregator_slows_no_job_and_misses_nothing(make_daemon, aggregators):
    agg = aggregators(LOGAGGREGATOR_BUFFER_SIZE="500000")
    # a small ring: what piles up while the aggregator is stopped is read from the log files
    d = daemon_with(make_daemon, agg, FLYNN_LOGMUX_RING_MESSAGES="2000")
    n = 200_000
    first = app_job(d, ["seq", "1", str(n)])
    assert d.wait_job(first, timeout=120)["status"] == "done"
    wait_for(lambda: len(agg.messages()) >= n, 120, "the first job's lines")
    agg.signal(signal.SIGSTOP)  # as good as a network gone quiet: connected, not reading
    try:
        second = app_job(d, ["seq", "1", str(n)])
        assert d.wait_job(second, timeout=120)["status"] == "done"
        time.sleep(2)
        shipper = logmux_status(d)["shippers"][0]
        assert shipper["connected"] and shipper["next_seq"] < logmux_status(d)["sequence"][
            "next_seq"]  # fmt: skip
    finally:
        agg.signal(signal.SIGCONT)
    got = wait_for(lambda: len(m := agg.messages()) >= 2 * n and m, 120, "the second job's lines")
    assert [m["job_id"] for m in got] == [first] * n + [second] * n
    assert numbers(got) == list(range(1, n + 1)) * 2
    shipper = logmux_status(d)["shippers"][0]
    assert shipper["sent_from_files"] > 0 and shipper["lost"] == 0
    with_agg, without = job_pace(d, first), job_pace(d, second)
    print(f"\njob pace: {with_agg:,.0f} lines/s with the aggregator taking lines, "
          f"{without:,.0f} lines/s with it stopped; {shipper['sent_from_files']:,} lines "
          "sent from the log files")  # fmt: skip
    # (the second job ran to its end while the aggregator was stopped: nothing blocked it;
    # how fast each ran is printed, a figure rather than an assertion)


@pytest.mark.slow
def test_a_million_lines_while_an_aggregator_restarts_from_its_leader(make_daemon, aggregators):
    """Issue 16's done-when: 1,000,000 lines of one job reach two aggregators, none lost or
    duplicated, while one of them is killed and restarted (copying the other's buffers)."""
    n = 1_000_000
    size = {"LOGAGGREGATOR_BUFFER_SIZE": str(n)}
    a = aggregators("a", **size)
    b = aggregators("b", **size)
    # the job's log files hold the whole burst: the job prints faster than the aggregators
    # take lines in, and what they have not taken yet is read back from the files
    d = daemon_with(make_daemon, a, b)
    follow = f"/log/{APP}?follow=true&lines=10000"
    fa = Follower(a.url + follow, a.base / "a.ndjson")
    fb1 = Follower(b.url + follow, b.base / "b1.ndjson")
    time.sleep(0.5)
    started = time.monotonic()
    job_id = app_job(d, ["seq", "1", str(n)])
    wait_for(lambda: fb1.lines() >= n // 3, 300, "a third of the lines at b", every=0.01)
    b.kill()
    before = fb1.stop()
    b.start(LOGAGGREGATOR_LEADER_URL=a.url, **size)  # loads a's snapshot
    fb2 = Follower(b.url + follow, b.base / "b2.ndjson")
    snapshot = numbers(b.messages())  # what b had at once after its restart
    assert d.wait_job(job_id, timeout=600)["status"] == "done"
    wait_for(lambda: fa.lines() >= n and b.cursor_seq(d.host_id) == a.cursor_seq(d.host_id),
             600, "every line at both")  # fmt: skip
    elapsed = time.monotonic() - started
    wait_for(lambda: fb2.lines() and json.loads(fb2.out.read_bytes().splitlines()[-1])["msg"]
             == str(n), 60, "b's follower at the end")  # fmt: skip
    at_a, after = fa.stop(), fb2.stop()
    assert at_a == list(range(1, n + 1))  # a's follower: each line once, in order
    assert before[0] == 1 and contiguous(before)  # b before its restart: no gap, no duplicate
    assert contiguous(after) and after[-1] == n  # b after it: no gap, no duplicate
    # together (b's buffer at once after the restart bridges the follower's 10,000-line
    # backlog), b's streams cover every line
    assert set(before) | set(snapshot) | set(after) == set(range(1, n + 1))
    assert numbers(b.messages()) == list(range(1, n + 1))  # b's buffer: each line once
    assert d.proc is not None
    rss = rss_mib(d.proc.pid)
    shippers = {s["addr"]: s for s in logmux_status(d)["shippers"]}
    assert shippers[b.addr]["connections"] >= 2
    assert shippers[a.addr]["lost"] == shippers[b.addr]["lost"] == 0
    print(
        f"\n{n:,} lines at both aggregators in {elapsed:.1f}s: {n / elapsed:,.0f} lines/s "
        f"(the job printed {job_pace(d, job_id):,.0f} lines/s; b was restarted after "
        f"{len(before):,} lines and loaded {len(snapshot):,} from a; "
        f"{shippers[b.addr]['sent_from_files']:,} lines to b came from the log file; the "
        f"daemon's RSS afterwards {rss:.0f} MiB)"
    )


def test_a_daemon_restart_resumes_the_sequence(make_daemon, aggregators):
    agg = aggregators()
    d = daemon_with(make_daemon, agg)
    total = 30_000
    job_id = app_job(d, paced(total, 500, 0.05))
    wait_for(lambda: agg.cursor_seq(d.host_id), 30, "the first lines")
    # SIGQUIT: the daemon leaves the job running and saves its sequence; the next one
    # resumes it exactly
    assert d.stop(signal.SIGQUIT) == 0
    assert (d.base / "state.json.logmux").exists()
    d.start()
    assert d.wait_job(job_id, timeout=120)["status"] == "done"
    got = wait_for(lambda: len(m := agg.messages()) >= total and m, 60, "every line")
    assert numbers(got) == list(range(1, total + 1))
    assert "resumed the saved sequence" in (d.base / "daemon.log").read_text()


def test_a_crashed_daemon_resumes_by_time(make_daemon, aggregators):
    agg = aggregators()
    d = daemon_with(make_daemon, agg)
    total = 30_000
    job_id = app_job(d, paced(total, 500, 0.05))
    wait_for(lambda: agg.cursor_seq(d.host_id), 30, "the first lines")
    assert d.proc is not None
    d.proc.kill()  # no saved sequence: the next daemon resumes the aggregator's cursor by time
    d.proc.wait()
    d.start()
    assert d.wait_job(job_id, timeout=120)["status"] == "done"
    got = numbers(wait_for(lambda: len(m := agg.messages()) >= total and m, 60, "every line"))
    assert sorted(set(got)) == list(range(1, total + 1))  # none lost
    # some sent twice: those of exactly the cursor's time (the lines of one output chunk)
    twice = [n for n, times in collections.Counter(got).items() if times > 1]
    time_of = {int(e["m"]): e["t"] for e in read_entries(str(d.base / "log" / f"{job_id}.log"))}
    assert len({time_of[n] for n in twice}) <= 1
    print(f"\nafter a crash: {len(twice)} lines sent twice (those of the cursor's timestamp)")
    assert "took up the newest" in (d.base / "daemon.log").read_text()


def test_ships_to_the_instances_discoverd_lists(make_daemon, aggregators, tmp_path):
    d = make_daemon()
    port = free_ports(1, offsets=(1268, 1269))[0]
    discoverd_env = {**os.environ, "PYTHONPATH": procs.import_path(), "FLYNN_HOST_KEY": d.key}
    argv = procs.component_command(
        "discoverd", "--data-dir", str(tmp_path / "discoverd"), "--host", "127.0.0.1",
        "--addr", f"127.0.0.1:{port}", "--notify", f"{d.url}/host/discoverd")  # fmt: skip
    with procs.started("discoverd", argv, discoverd_env, f"http://127.0.0.1:{port}/ping", 60):
        wait_for(lambda: d.client.status().get("discoverd", {}).get("url"), 30, "discoverd")
        cluster = {"DISCOVERD": f"http://127.0.0.1:{port}", "EXTERNAL_IP": "127.0.0.1"}
        agg = aggregators(**cluster)
        shipping = wait_for(lambda: logmux_status(d)["shippers"], 30, "a shipper")
        assert [(s["addr"], s["api"]) for s in shipping] == [(agg.addr, agg.url)]
        job_id = app_job(d, ["sh", "-c", "echo found through discoverd"])
        assert d.wait_job(job_id)["status"] == "done"
        got = wait_for(lambda: agg.messages(), 30, "the line")
        assert [m["msg"] for m in got] == ["found through discoverd"]
        agg.stop()  # it leaves discoverd: the host stops shipping to it
        wait_for(lambda: logmux_status(d)["shippers"] == [], 30, "the shipper gone")


def test_stopping_the_daemon_leaves_nothing(make_daemon, aggregators):
    agg = aggregators()
    d = daemon_with(make_daemon, agg)
    job_id = app_job(d, ["sh", "-c", "echo one; exec sleep 60"])
    wait_for(lambda: agg.messages(), 30, "the line")
    assert d.stop() == 0  # SIGTERM: the job is stopped, the shippers closed
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( dport = :{agg.syslog_port} )"],
                         capture_output=True, text=True).stdout  # fmt: skip
    assert out.strip() == ""
    assert mounts_under(d.base) == []
    jobs_dir = d.base / "work" / "jobs"
    assert not jobs_dir.exists() or list(jobs_dir.iterdir()) == []
    assert job_id in (d.base / "state.json").read_text()


def test_flynn_log_f_shows_a_web_jobs_line_as_it_is_printed(make_daemon, aggregators, tmp_path):
    """The whole path a user sees: a web job's line, shipped by its host to the aggregator,
    read by the controller's `GET /apps/:app/log` and printed by `flynn log -f`."""
    require_programs("/usr/lib/postgresql/15/bin/postgres")
    from flynn_controller.client import Client as Controller

    from flynn_host.dev.controller import controller_process, pg_server

    agg = aggregators()
    with pg_server() as pg, controller_process(pg, env={"LOGAGGREGATOR_URL": agg.url}) as ctl:
        app = Controller(ctl.url, ctl.key).create_app({"name": "shipped"})
        d = daemon_with(make_daemon, agg)
        job_id = app_job(d, TICKS, app=app["id"])
        wait_for(lambda: agg.messages(app["id"]), 30, "the job's first line")
        home = tmp_path / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYNN", "GIT_"))}
        env.update(HOME=str(home), FLYNNRC=str(home / ".flynnrc"))
        flynn = str(Path(sys.executable).parent / "flynn")
        subprocess.run([flynn, "cluster", "add", "--no-git", "test", ctl.url, ctl.key], env=env,
                       check=True, capture_output=True)  # fmt: skip
        proc = subprocess.Popen([flynn, "-a", "shipped", "log", "-f", "-n", "1"], env=env,
                                stdout=subprocess.PIPE, cwd=home)  # fmt: skip
        assert proc.stdout is not None
        try:
            proc.stdout.readline()  # the backlog's line: printed once the follow is in place
            arrivals = []
            for _ in range(10):
                line = proc.stdout.readline().decode()
                arrivals.append((time.time(), line))
        finally:
            proc.terminate()
            proc.wait(10)
        d.client.stop_job(job_id)
    latencies = []
    for at, line in arrivals:
        stamp, _, rest = line.partition(" ")
        assert rest.startswith(f"app[web.{job_id}]: "), line
        latencies.append(at - parse_time(stamp) / 1e9)
    latencies.sort()
    print(f"\nflynn log -f: a web job's line printed {latencies[5] * 1000:.1f} ms (median of 10), "
          f"{latencies[-1] * 1000:.1f} ms at most, after the job printed it")  # fmt: skip
