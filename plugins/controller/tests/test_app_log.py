"""`GET /apps/:app/log` end to end: a real `flynn-host component logaggregator` fed RFC 5424
frames over its syslog port (what a host's log mux sends), and a real controller process whose
`LOGAGGREGATOR_URL` points at it — plain NDJSON, `lines`, `follow`, the filters, SSE, the
errors, and a client that goes away (the controller must drop its request to the aggregator).
Figures are printed (`-s` shows them)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from controller_http import Api
from flynn2015 import examples
from flynn_logaggregator.client import Message
from sse_client import SSEStream

from flynn_host.dev.controller import ControllerProcess, PGServer, controller_process
from flynn_host.dev.host import free_port
from flynn_host.dev.logaggregator import LogAggregator, logaggregator_process

T0 = 1_450_000_000_123_456_789  # 2015-12-13T09:46:40.123456789Z


# --- a log aggregator, and a host's messages to it ---------------------------------------------
@pytest.fixture(scope="module")
def agg() -> Iterator[LogAggregator]:
    with logaggregator_process() as a:
        yield a


@pytest.fixture(scope="module")
def controller(pg: PGServer, agg: LogAggregator) -> Iterator[ControllerProcess]:
    env = {"LOGAGGREGATOR_URL": agg.url, "LOGAGGREGATOR_SYSLOG": f"127.0.0.1:{agg.syslog_port}"}
    with controller_process(pg, env=env) as ctl:
        yield ctl


@dataclass
class App:
    name: str
    id: str
    host: str  # each app's messages come from a host of its own: its cursor starts afresh

    def msg(self, seq: int, text: str, **kw: Any) -> Message:
        fields: dict[str, Any] = {
            "app_id": self.id, "host_id": self.host, "job_id": f"{self.host}-job1",
            "process_type": "web", "stream": "stdout", "time": T0 + seq * 1000, "seq": seq,
            "msg": text,
        }  # fmt: skip
        fields.update(kw)
        return Message(**fields)


def new_app(api: Api) -> App:
    name = f"log-{uuid.uuid4().hex[:8]}"
    app = api.ok("POST", "/apps", {"name": name})
    return App(name, app["id"], "h" + uuid.uuid4().hex[:8])


def ndjson(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def texts(msgs: list[dict[str, Any]]) -> list[str]:
    return [m["msg"] for m in msgs]


@pytest.fixture(scope="module")
def filled(api: Api, agg: LogAggregator) -> App:
    """An app with five messages of two jobs, two types and both streams."""
    app = new_app(api)
    agg.send(
        app.msg(1, "web one"),
        app.msg(2, "worker one", process_type="worker", job_id=f"{app.host}-job2"),
        app.msg(3, "web oops", stream="stderr"),
        app.msg(4, "worker two", process_type="worker", job_id=f"{app.host}-job2"),
        app.msg(5, "web two"),
    )
    agg.wait_held(app.id, 5)
    return app


class Reader:
    """One `GET` of a log without `Accept: text/event-stream`, on a connection of its own (the
    raw socket of `SSEStream`), read as it arrives."""

    def __init__(self, api: Api, path: str) -> None:
        self.stream = SSEStream(api.url, path, key=api.key, accept="*/*").open()
        self.status = self.stream.status
        self.headers = self.stream.headers
        self.buf = b""

    def lines(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The next `n` messages; AssertionError if they do not come within `timeout`."""
        deadline = time.monotonic() + timeout
        while self.buf.count(b"\n") < n:
            left = deadline - time.monotonic()
            assert left > 0, f"fewer than {n} lines came: {self.buf!r}"
            assert not self.stream.eof, f"the body ended after {self.buf!r}"
            self.buf += self.stream.read_some(left)
        *got, self.buf = self.buf.split(b"\n", n)
        return [json.loads(line) for line in got]

    def quiet(self, seconds: float) -> bool:
        """Nothing arrives for `seconds`."""
        got = self.stream.read_some(seconds)
        self.buf += got
        return not got and not self.stream.eof

    def close(self) -> None:
        self.stream.close()


@contextlib.contextmanager
def reading(api: Api, path: str) -> Iterator[Reader]:
    r = Reader(api, path)
    try:
        yield r
    finally:
        r.close()


def upstream_connections(ctl: ControllerProcess, port: int) -> int:
    """The controller process's established TCP connections to `port` on loopback."""
    fd_dir = Path(f"/proc/{ctl.proc.pid}/fd")
    sockets = set()
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            sockets.add(os.readlink(fd))
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[2].split(":")[1], 16) == port and f[3] == "01" and f"socket:[{f[9]}]" in sockets:
            n += 1
    return n


# --- plain NDJSON ------------------------------------------------------------------------------
def test_the_log_is_the_aggregators_ndjson_as_text_plain(api: Api, agg: LogAggregator, filled: App):
    r = api("GET", f"/apps/{filled.name}/log")
    assert r.status == 200 and r.content_type == "text/plain", r
    got = ndjson(r.body)
    assert got == agg.held(filled.id)
    assert got[0] == {
        "host_id": filled.host, "job_id": f"{filled.host}-job1", "msg": "web one",
        "process_type": "web", "source": "app", "stream": "stdout",
        "timestamp": "2015-12-13T09:46:40.123457789Z",
    }  # fmt: skip
    assert [m["stream"] for m in got] == ["stdout", "stdout", "stderr", "stdout", "stdout"]
    # by id as well as by name
    assert api("GET", f"/apps/{filled.id}/log").body == r.body


def test_the_recorded_2015_request_gets_the_recorded_content_type(api: Api, filled: App):
    recorded = examples()["app_log"]
    req = recorded["request"]
    path = "/apps/" + filled.id + "/log"
    assert req["url"].endswith("/log") and req["method"] == "GET"
    r = api("GET", path, headers={k: v for k, v in req["headers"].items() if k != "Authorization"})
    assert r.status == 200
    assert r.content_type == recorded["response"]["headers"]["Content-Type"] == "text/plain"


def test_lines_gives_the_last_n(api: Api, filled: App):
    def log(query: str) -> list[str]:
        r = api("GET", f"/apps/{filled.name}/log{query}")
        assert r.status == 200, r
        return texts(ndjson(r.body))

    assert log("?lines=2") == ["worker two", "web two"]
    assert log("?lines=1") == ["web two"]
    assert log("?lines=0") == log("") == log("?lines=10000")
    assert len(log("")) == 5


def test_filters(api: Api, filled: App):
    def log(query: str) -> list[str]:
        r = api("GET", f"/apps/{filled.name}/log?{query}")
        assert r.status == 200, r
        return texts(ndjson(r.body))

    job2 = f"{filled.host}-job2"
    assert log(f"job_id={job2}") == ["worker one", "worker two"]
    assert log("process_type=web") == ["web one", "web oops", "web two"]
    assert log("process_type=web&process_type=worker") == ["worker one", "worker two"]  # last
    assert log(f"process_type=web&job_id={job2}") == []
    assert log("process_type=worker&lines=1") == ["worker two"]
    assert log("stream_types=stderr") == ["web oops"]


# --- follow ------------------------------------------------------------------------------------
def test_follow_with_lines_gives_the_backlog_then_new_messages(api: Api, agg: LogAggregator):
    app = new_app(api)
    agg.send(app.msg(1, "old 1"), app.msg(2, "old 2"), app.msg(3, "old 3"))
    agg.wait_held(app.id, 3)
    latencies = []
    with reading(api, f"/apps/{app.name}/log?follow=true&lines=2") as r:
        assert r.status == 200 and r.headers["content-type"] == "text/plain"
        assert texts(r.lines(2)) == ["old 2", "old 3"]
        assert r.quiet(0.3)
        for i in range(4, 24):
            sent = agg.send(app.msg(i, f"new {i}"))
            assert texts(r.lines(1)) == [f"new {i}"]
            latencies.append(time.monotonic() - sent)
    latencies.sort()
    print(f"\nfollow: a message sent to the aggregator reached the controller's client in"
          f" {latencies[len(latencies) // 2] * 1000:.1f} ms (median of 20),"
          f" {latencies[-1] * 1000:.1f} ms at most")  # fmt: skip
    assert latencies[len(latencies) // 2] < 0.5


def test_follow_without_lines_gives_only_new_messages(api: Api, agg: LogAggregator):
    app = new_app(api)
    agg.send(app.msg(1, "before"))
    agg.wait_held(app.id, 1)
    with reading(api, f"/apps/{app.id}/log?follow=true") as r:
        assert r.status == 200
        assert r.quiet(0.3)  # headers came at once, the old message does not
        agg.send(
            app.msg(2, "after web"),
            app.msg(3, "after worker", process_type="worker"),
            app.msg(4, "after web 2"),
        )
        assert texts(r.lines(3)) == ["after web", "after worker", "after web 2"]


def test_follow_applies_the_filters_to_new_messages(api: Api, agg: LogAggregator):
    app = new_app(api)
    with reading(api, f"/apps/{app.name}/log?follow=true&process_type=worker") as r:
        assert r.status == 200
        agg.send(app.msg(1, "web"), app.msg(2, "worker", process_type="worker"))
        assert texts(r.lines(1)) == ["worker"]
        assert r.quiet(0.3)


# --- SSE ---------------------------------------------------------------------------------------
def test_sse_frames_each_message_and_ends_with_eof(api: Api, agg: LogAggregator, filled: App):
    with SSEStream(api.url, f"/apps/{filled.name}/log?lines=2", key=api.key) as s:
        s.open()
        assert s.status == 200
        assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
        items = s.read_items(timeout=10)
        assert s.eof, "the stream must end after eof when not following"
    held = agg.held(filled.id)[-2:]
    assert [i.data for i in items] == [
        {"event": "message", "data": held[0]},
        {"event": "message", "data": held[1]},
        {"event": "eof"},
    ]
    # one `data: ` line of compact JSON and a blank line per message
    assert s.raw_body.endswith(b'data: {"event":"eof"}\n\n')
    assert s.raw_body.startswith(b'data: {"event":"message","data":{"host_id":')
    assert s.raw_body.count(b"\n\n") == 3


def test_sse_follow_streams_new_messages(api: Api, agg: LogAggregator):
    app = new_app(api)
    agg.send(app.msg(1, "old"))
    agg.wait_held(app.id, 1)
    with SSEStream(api.url, f"/apps/{app.name}/log?follow=true&lines=1", key=api.key) as s:
        s.open()
        assert s.status == 200
        assert [i.data["data"]["msg"] for i in s.read_items(1)] == ["old"]
        agg.send(app.msg(2, "new"))
        items = s.read_items(1)
        assert [(i.data["event"], i.data["data"]["msg"]) for i in items] == [("message", "new")]
        assert not s.eof


def test_sse_key_in_the_query(api: Api, filled: App):
    with SSEStream(api.url, f"/apps/{filled.name}/log?key={api.key}", key=None) as s:
        s.open()
        assert s.status == 200
        assert s.read_items(timeout=10)[-1].data == {"event": "eof"}


# --- errors ------------------------------------------------------------------------------------
def test_an_unknown_app_is_a_bare_404(api: Api):
    for path in ("/apps/no-such-app/log", f"/apps/{uuid.uuid4()}/log?follow=true"):
        r = api("GET", path)
        assert (r.status, r.body, r.content_type) == (404, b"", None), r


@pytest.mark.parametrize("lines", ["-1", "10001", "x", "1.5"])
def test_a_bad_lines_is_a_validation_error(api: Api, filled: App, lines: str):
    for accept in ("*/*", "text/event-stream"):
        r = api("GET", f"/apps/{filled.name}/log?lines={lines}", headers={"Accept": accept})
        assert r.status == 400 and r.content_type == "application/json", r
        err = r.json()
        assert err["code"] == "validation_error" and err["message"].startswith("lines ")
        assert err["detail"] == {"field": "lines"} and err["retry"] is False


def test_the_aggregators_own_error_is_passed_on(api: Api, filled: App):
    r = api("GET", f"/apps/{filled.name}/log?stream_types=bogus")
    assert r.status == 400 and r.json()["code"] == "validation_error", r
    assert r.json()["message"].startswith("stream_types ")


def test_an_unreachable_aggregator_is_a_clear_error(pg: PGServer, api: Api, filled: App):
    nowhere = f"http://127.0.0.1:{free_port()}"
    with controller_process(pg, env={"LOGAGGREGATOR_URL": nowhere}) as ctl:
        other = Api(ctl)
        for accept in ("*/*", "text/event-stream"):
            t = time.monotonic()
            r = other("GET", f"/apps/{filled.name}/log?follow=true", headers={"Accept": accept})
            took = time.monotonic() - t
            assert r.status == 500 and r.content_type == "application/json", r
            err = r.json()
            assert err["code"] == "unknown_error" and err["retry"] is False
            assert err["message"].startswith(f"the log aggregator ({nowhere}) cannot be reached")
            assert took < 2
        assert "Traceback" not in ctl.log_text()


# --- a client that goes away -------------------------------------------------------------------
@pytest.mark.parametrize("sse", [False, True], ids=["plain", "sse"])
def test_a_client_going_away_ends_the_request_to_the_aggregator(
    api: Api, agg: LogAggregator, controller: ControllerProcess, sse: bool
):
    app = new_app(api)
    agg_port = int(agg.url.rsplit(":", 1)[1])
    assert upstream_connections(controller, agg_port) == 0
    path = f"/apps/{app.name}/log?follow=true"
    stream: Any = SSEStream(api.url, path, key=api.key).open() if sse else Reader(api, path)
    try:
        deadline = time.monotonic() + 10
        while upstream_connections(controller, agg_port) != 1:
            assert time.monotonic() < deadline, "no request to the aggregator"
            time.sleep(0.02)
    finally:
        stream.close()
        gone = time.monotonic()
    while upstream_connections(controller, agg_port) != 0:
        assert time.monotonic() < gone + 10, "the request to the aggregator is still open"
        time.sleep(0.01)
    took = time.monotonic() - gone
    print(f"\n{'sse' if sse else 'plain'}: the controller closed its request to the aggregator"
          f" {took * 1000:.0f} ms after its client went away")  # fmt: skip
    # the aggregator still serves the app, and nothing was left behind in the controller
    agg.send(app.msg(1, "after"))
    assert texts(agg.wait_held(app.id, 1)) == ["after"]
    assert texts(ndjson(api("GET", f"/apps/{app.name}/log").body)) == ["after"]
    log_text = controller.log_text()
    for bad in ("Traceback", "Unclosed", "Task was destroyed", "Error handling request"):
        assert bad not in log_text, log_text[-3000:]


def test_deploy_progress_is_in_the_apps_log_from_the_controller(api: Api, agg: LogAggregator):
    """A deployment's steps reach the app's log (source `controller`, type `deploy`) beside
    the app's own lines; `flynn log` shows them as `controller[deploy.<id>]: ...`. No
    scheduler runs here, so the new job never comes up and the deployment times out."""
    app = new_app(api)
    api.ok("POST", f"/apps/{app.id}", {"deploy_timeout": 1})
    art = api.ok("POST", "/artifacts", {"type": "docker", "uri": "https://r.test?name=a&id=1"})
    body = {"artifact": art["id"], "processes": {"web": {"cmd": ["web"]}}}
    releases = [api.ok("POST", "/releases", body) for _ in range(2)]
    first = api.ok("POST", f"/apps/{app.name}/deploy", {"id": releases[0]["id"]})
    api.ok("PUT", f"/apps/{app.name}/formations/{releases[0]['id']}", {"processes": {"web": 1}})
    second = api.ok("POST", f"/apps/{app.name}/deploy", {"id": releases[1]["id"]})
    agg.send(app.msg(1, "the app's own line"))
    deadline = time.monotonic() + 30
    while not any(m["msg"].startswith("deployment failed") for m in agg.held(app.id)):
        assert time.monotonic() < deadline, agg.held(app.id)
        time.sleep(0.1)
    held = agg.held(app.id)
    ours = [m for m in held if m["source"] == "controller"]
    assert {m["process_type"] for m in ours} == {"deploy"}
    # the first release had nothing to replace: its deployment was complete at once
    assert [m["msg"] for m in ours if m["job_id"] == first["id"]] == ["deployment complete"]
    lines = [(m["stream"], m["msg"]) for m in ours if m["job_id"] == second["id"]]
    assert lines[0] == ("stdout", f"deploying release {releases[1]['id']} with all-at-once: web=1")
    assert lines[1] == ("stdout", "deployment running")
    assert lines[-1][0] == "stderr" and lines[-1][1].startswith("deployment failed: ")
    assert [m["source"] for m in held if m["msg"] == "the app's own line"] == ["app"]


def test_deploy_lines_without_an_aggregator_are_dropped_and_nothing_is_left_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a cluster the aggregators come from discoverd; none reachable: the line is dropped
    (a deploy never waits for it) and `close` closes what was opened, the discoverd client's
    session included."""
    import asyncio
    import gc
    import warnings

    from flynn_controller import deploylog

    monkeypatch.delenv("LOGAGGREGATOR_SYSLOG", raising=False)
    monkeypatch.setenv("DISCOVERD", f"http://127.0.0.1:{free_port()}")  # nothing listens
    row = {"app_id": uuid.uuid4(), "deployment_id": uuid.uuid4(), "new_release_id": "r1",
           "strategy": "all-at-once", "processes": {"web": 1}}  # fmt: skip

    async def deploy() -> tuple[int, int]:
        deploylog.note(row, "pending")
        emitter = deploylog.emitter()
        assert emitter is not None
        await deploylog.close()
        return emitter.dropped, len(emitter.queue)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dropped, queued = asyncio.run(deploy())
        gc.collect()  # what was left open says so when it is collected
    assert (dropped, queued) == (1, 0) and deploylog._emitter is None
    assert not [w for w in caught if "Unclosed" in str(w.message)], caught
