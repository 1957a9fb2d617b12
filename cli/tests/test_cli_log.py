"""`flynn log` end to end: the installed `flynn` command against a real controller process
whose `LOGAGGREGATOR_URL` points at a real `flynn-host component logaggregator`, fed RFC 5424
frames over its syslog port as a host's log mux would. The line format, `-r`, `-s`, `-n`,
`-t`, `-j` and the positional job id, `-f` (with the delay from the aggregator to the
terminal printed, `-s` shows it), and the usage errors."""

from __future__ import annotations

import os
import select
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cli_home import FLYNN, Home
from flynn_cli.logs import log_time
from flynn_controller.client import Client
from flynn_logaggregator.client import Message

from flynn_host.dev.controller import ControllerProcess, controller_process, pg_server
from flynn_host.dev.host import missing_programs
from flynn_host.dev.logaggregator import LogAggregator, logaggregator_process

pytestmark = pytest.mark.skipif(
    bool(missing_programs("/usr/lib/postgresql/15/bin/postgres")), reason="needs PostgreSQL 15"
)

T0 = 1_450_000_000_123_456_789  # 2015-12-13T09:46:40.123456789Z
STAMP = "2015-12-13T09:46:40"


@pytest.fixture(scope="module")
def agg() -> Iterator[LogAggregator]:
    with logaggregator_process() as a:
        yield a


@pytest.fixture(scope="module")
def controller(agg: LogAggregator) -> Iterator[ControllerProcess]:
    with pg_server() as pg, controller_process(pg, env={"LOGAGGREGATOR_URL": agg.url}) as ctl:
        yield ctl


@pytest.fixture
def cli(home: Home, controller: ControllerProcess) -> Home:
    home.ok("cluster", "add", "--no-git", "test", controller.url, controller.key)
    return home


@dataclass
class App:
    name: str
    id: str
    host: str

    def msg(self, seq: int, text: str, **kw: Any) -> Message:
        fields: dict[str, Any] = {
            "app_id": self.id, "host_id": self.host, "job_id": "host1-job1",
            "process_type": "web", "stream": "stdout", "time": T0 + seq * 1_000_000,
            "seq": seq, "msg": text,
        }  # fmt: skip
        fields.update(kw)
        return Message(**fields)


def new_app(controller: ControllerProcess) -> App:
    name = f"log-{uuid.uuid4().hex[:8]}"
    app = Client(controller.url, controller.key).create_app({"name": name})
    return App(name, app["id"], "h" + uuid.uuid4().hex[:8])


@pytest.fixture(scope="module")
def app(controller: ControllerProcess, agg: LogAggregator) -> App:
    """An app with a web job's stdout, a worker's stderr and a one-off job's output."""
    a = new_app(controller)
    agg.send(
        a.msg(0, "hello ✓"),
        a.msg(1, "oops", process_type="worker", job_id="host1-job2", stream="stderr"),
        a.msg(2, "run output", process_type="", job_id="host1-job3"),
    )
    agg.wait_held(a.id, 3)
    return a


HELLO = f"{STAMP}.123456Z app[web.host1-job1]: hello ✓"
OOPS = f"{STAMP}.124456Z app[worker.host1-job2]: oops"
RUN = f"{STAMP}.125456Z app[.host1-job3]: run output"


def test_each_message_is_a_line_with_time_source_type_and_job(cli: Home, app: App):
    out = cli.ok("-a", app.name, "log")
    assert out.stdout.splitlines() == [HELLO, OOPS, RUN]
    assert out.stderr == ""
    assert cli.ok("-a", app.id, "log").stdout == out.stdout


def test_raw_output_is_the_text_alone(cli: Home, app: App):
    out = cli.ok("-a", app.name, "log", "-r")
    assert out.stdout == "hello ✓\noops\nrun output\n" and out.stderr == ""


def test_split_stderr_sends_stderr_messages_to_stderr(cli: Home, app: App):
    out = cli.ok("-a", app.name, "log", "-s")
    assert out.stdout.splitlines() == [HELLO, RUN]
    assert out.stderr.splitlines() == [OOPS]
    out = cli.ok("-a", app.name, "log", "--split-stderr", "--raw-output")
    assert (out.stdout, out.stderr) == ("hello ✓\nrun output\n", "oops\n")


def test_number_of_lines(cli: Home, app: App):
    assert cli.ok("-a", app.name, "log", "-n", "1").stdout.splitlines() == [RUN]
    assert cli.ok("-a", app.name, "log", "--number=2").stdout.splitlines() == [OOPS, RUN]
    assert cli.ok("-a", app.name, "log", "-n", "0").stdout.splitlines() == [HELLO, OOPS, RUN]


def test_process_type_and_job_filters(cli: Home, app: App):
    assert cli.ok("-a", app.name, "log", "-t", "worker").stdout.splitlines() == [OOPS]
    assert cli.ok("-a", app.name, "log", "--process-type=web").stdout.splitlines() == [HELLO]
    assert cli.ok("-a", app.name, "log", "-j", "host1-job3").stdout.splitlines() == [RUN]
    assert cli.ok("-a", app.name, "log", "--job=host1-job2").stdout.splitlines() == [OOPS]
    # the older CLI's form: the job id as the argument
    assert cli.ok("-a", app.name, "log", "host1-job3").stdout.splitlines() == [RUN]
    assert cli.ok("-a", app.name, "log", "-r", "host1-job1").stdout == "hello ✓\n"
    assert cli.ok("-a", app.name, "log", "-t", "web", "host1-job2").stdout == ""


def test_follow_prints_a_message_as_it_arrives(cli: Home, agg: LogAggregator, controller):
    a = new_app(controller)
    agg.send(a.msg(0, "first"))
    agg.wait_held(a.id, 1)
    proc = subprocess.Popen(
        [FLYNN, "-a", a.name, "log", "-f", "-n", "1"],
        cwd=cli.path,
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    buf = b""

    def next_line(timeout: float = 10.0) -> str:
        nonlocal buf
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, (buf, proc.poll())
            if select.select([proc.stdout], [], [], left)[0]:
                buf += os.read(proc.stdout.fileno(), 65536)
        line, buf = buf.split(b"\n", 1)
        return line.decode()

    try:
        # the backlog line is printed once the follow is in place: nothing after it is missed
        assert next_line() == f"{STAMP}.123456Z app[web.host1-job1]: first"
        latencies = []
        for i in range(1, 11):
            sent = agg.send(a.msg(i, f"later {i}", stream="stderr"))
            assert next_line().endswith(f"app[web.host1-job1]: later {i}")
            latencies.append(time.monotonic() - sent)
        assert proc.poll() is None, "flynn log -f must keep following"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    latencies.sort()
    print(f"\nflynn log -f: a message printed {latencies[len(latencies) // 2] * 1000:.1f} ms"
          f" (median of 10), {latencies[-1] * 1000:.1f} ms at most, after it reached the"
          " aggregator")  # fmt: skip
    assert latencies[len(latencies) // 2] < 1.0


def test_usage_errors(cli: Home, app: App):
    for args in (["--bogus"], ["-j", "host1-job1", "host1-job2"], ["a", "b"], ["-n"]):
        err = cli.fail("-a", app.name, "log", *args)  # ("-n requires argument" first for -n)
        assert "usage: flynn log [-f] [-j <id>] [-n <lines>] [-r] [-s] [-t <type>]\n" in err
    assert cli.fail("-a", app.name, "log", "-n", "abc") == '-n: "abc" is not a number of lines\n'
    err = cli.fail("-a", app.name, "log", "-n", "10001")
    assert err == "validation_error: lines must be between 0 and 10000\n"
    assert cli.fail("-a", "no-such-app", "log") == "controller: resource not found\n"


def test_help_is_the_2015_usage(home: Home):
    out = home.ok("help", "log").stdout
    assert out.startswith(
        "usage: flynn log [-f] [-j <id>] [-n <lines>] [-r] [-s] [-t <type>]\n"
        "       flynn log [-f] [-n <lines>] [-r] [-s] [-t <type>] <job>\n\n"
        "Stream log for an app.\n"
    )
    assert "\t-t, --process-type=<type>  filter logs to a specific process type\n" in out


@pytest.mark.parametrize(
    ("timestamp", "printed"),
    [
        ("2015-12-13T09:46:40.123456789Z", "2015-12-13T09:46:40.123456Z"),
        ("2015-12-13T09:46:40.9999999Z", "2015-12-13T09:46:40.999999Z"),  # cut, not rounded
        ("2015-12-13T09:46:40Z", "2015-12-13T09:46:40.000000Z"),
        ("2015-12-13T09:46:40.5+01:00", "2015-12-13T09:46:40.500000+01:00"),
        ("2015-12-13T09:46:40.5-05:30", "2015-12-13T09:46:40.500000-05:30"),
        ("2015-12-13T09:46:40.5+00:00", "2015-12-13T09:46:40.500000Z"),
        (None, "0001-01-01T00:00:00.000000Z"),
    ],
)
def test_times_print_as_go_formats_them(timestamp: str | None, printed: str):
    assert log_time(timestamp) == printed
