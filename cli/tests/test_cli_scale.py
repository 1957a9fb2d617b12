"""`flynn ps`, `kill`, `scale` and `release rollback` end to end: the installed `flynn` command
against a real controller process on a real PostgreSQL (one of each for the module).

There is no scheduler here. Where one would start and stop jobs, `SchedulerStandIn` — a
stand-in for the scheduler, and nothing more — waits for the formation change (the app's next
`scale` event) and reports job states with `PUT /apps/:app/jobs/:id` as the scheduler does.
`flynn kill` reaches a job's host through discoverd; `FakeHosts` stands in for both (the
`flynn-host` service's instances, and one host's `GET`/`DELETE /host/jobs/:id`).
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cli_home import Home
from flynn_cli.scale import go_duration, go_map
from flynn_controller.client import Client

from flynn_host.dev.controller import ControllerProcess, controller_process, pg_server
from flynn_host.dev.host import missing_programs
from flynn_host.dev.scheduler_standin import scheduler_standin

pytestmark = pytest.mark.skipif(
    bool(missing_programs("/usr/lib/postgresql/15/bin/postgres")), reason="needs PostgreSQL 15"
)

IMAGE = "https://registry.hub.docker.com?name=flynn/slugbuilder&id=15d72b7f573b"
HOST = "host1"
STAMP = r"\d\d:\d\d:\d\d\.\d{3}"
FAST = {"FLYNN_SCALE_TIMEOUT": "1"}  # scale's 20 s wait, made short for the failing cases


class FakeHosts(http.server.ThreadingHTTPServer):
    """discoverd's answer for service `flynn-host` (one instance: this server, host `fakehost`)
    and that host's job API: `jobs` maps a job id to the app (uuid) it belongs to."""

    host_id = "fakehost"

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHostsHandler)
        self.jobs: dict[str, str] = {}
        self.deleted: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FakeHostsHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHosts

    def _answer(self, status: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/services/flynn-host/instances":
            addr = self.server.url.removeprefix("http://")
            self._answer(200, [{"addr": addr, "proto": "tcp", "meta": {"id": FakeHosts.host_id}}])
            return
        job_id = self.path.removeprefix("/host/jobs/")
        if job_id in self.server.jobs:
            meta = {"flynn-controller.app": self.server.jobs[job_id]}
            self._answer(200, {"job": {"id": job_id, "metadata": meta}})
            return
        self._answer(404, {"code": "not_found", "message": "no such job"})

    def do_DELETE(self) -> None:
        job_id = self.path.removeprefix("/host/jobs/")
        self.server.deleted.append(job_id)
        self._answer(200, None)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def fake_hosts() -> Iterator[FakeHosts]:
    server = FakeHosts()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def controller(fake_hosts: FakeHosts) -> Iterator[ControllerProcess]:
    with pg_server() as pg, controller_process(pg, env={"DISCOVERD": fake_hosts.url}) as ctl:
        yield ctl


@pytest.fixture(scope="module")
def api(controller: ControllerProcess) -> Client:
    return Client(controller.url, controller.key)


@pytest.fixture
def cli(home: Home, controller: ControllerProcess) -> Home:
    home.ok("cluster", "add", "--no-git", "test", controller.url, controller.key)
    return home


def new_app(api: Client, types: tuple[str, ...] = ("web", "worker")) -> tuple[str, str]:
    """(name, release id) of a new app whose current release has process `types`."""
    name = f"app-{uuid.uuid4().hex[:8]}"
    api.create_app({"name": name, "meta": None})
    return name, new_release(api, name, types)


def new_release(api: Client, app: str, types: tuple[str, ...] = ("web", "worker")) -> str:
    """A new release with process `types`, made the app's current one (no deployment)."""
    artifact = api.create_artifact({"type": "docker", "uri": IMAGE})
    processes = {t: {"cmd": ["start", t]} for t in types}
    release = api.create_release({"artifact": artifact["id"], "processes": processes})
    api.set_app_release(app, release["id"])
    return str(release["id"])


def job_id(host: str = HOST) -> str:
    return f"{host}-{uuid.uuid4()}"


def report(api: Client, app: str, job: str, state: str, release: str, typ: str | None) -> None:
    """What the scheduler sends when a job changes state."""
    body: dict[str, Any] = {"state": state, "release": release}
    if typ is not None:
        body["type"] = typ
    api.put(f"/apps/{app}/jobs/{job}", body)


class SchedulerStandIn:
    """A stand-in for the scheduler (not a scheduler): once the app's formation changes, it
    reports `reports` — (job id, type, release, state) — in order, `every` seconds apart.

    The `scale` event stream is opened here, before the CLI runs, so the change is not missed.
    """

    def __init__(
        self, api: Client, app: str, reports: list[tuple[str, str, str, str]], every: float = 0
    ) -> None:
        self.api = Client(api.url, api.key)
        self.app = app
        self.reports = reports
        self.every = every
        self.error: BaseException | None = None
        self.stream = self.api.events(app_id=app, object_types=["scale"])
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.stream:
                self.stream.next(timeout=30)
            for job, typ, release, state in self.reports:
                report(self.api, self.app, job, state, release, typ)
                time.sleep(self.every)
        except BaseException as e:  # surfaced by join()
            self.error = e

    def join(self) -> None:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


# --------------------------------------------------------------------------------------------
# ps and kill


def test_ps_lists_the_up_jobs_by_type(cli: Home, api: Client) -> None:
    name, rid = new_app(api)
    web1, web2, worker, run, gone, starting = (job_id() for _ in range(6))
    report(api, name, worker, "up", rid, "worker")
    report(api, name, web1, "up", rid, "web")
    report(api, name, run, "up", rid, None)  # a one-off job: no type
    report(api, name, web2, "up", rid, "web")
    report(api, name, gone, "up", rid, "web")
    report(api, name, gone, "down", rid, "web")
    report(api, name, starting, "starting", rid, "web")

    lines = cli.ok("-a", name, "ps").stdout.splitlines()
    width = len(web1) + 2
    assert lines[0] == "ID".ljust(width) + "TYPE    RELEASE"
    rows = [line.split() for line in lines[1:]]
    # by type; jobs of a type as the server lists them (newest first)
    assert rows == [
        [run, "run", rid],
        [web2, "web", rid],
        [web1, "web", rid],
        [worker, "worker", rid],
    ]
    assert lines[1] == f"{run}  run     {rid}"

    other, _ = new_app(api)
    assert cli.ok("-a", other, "ps").stdout == "ID  TYPE  RELEASE\n"


def test_kill(cli: Home, api: Client, fake_hosts: FakeHosts) -> None:
    name, rid = new_app(api)
    job = job_id(FakeHosts.host_id)
    fake_hosts.jobs[job] = api.get_app(name)["id"]
    report(api, name, job, "up", rid, "web")

    out = cli.ok("-a", name, "kill", job)
    assert (out.stdout, out.stderr) == ("", f"Job {job} killed.\n")
    assert fake_hosts.deleted == [job]

    # a job the host does not have, one of another app, one on no known host
    theirs = job_id(FakeHosts.host_id)
    fake_hosts.jobs[theirs] = str(uuid.uuid4())
    for missing in (job_id(FakeHosts.host_id), theirs, job_id("nosuchhost")):
        err = cli.fail("-a", name, "kill", missing)
        assert err == f"could not kill job {missing}: no such job of app {name}\n"
    assert fake_hosts.deleted == [job]
    assert cli.fail("-a", name, "kill").startswith("usage: flynn kill <job>")


# --------------------------------------------------------------------------------------------
# scale: listing and validation


def test_scale_shows_the_formation(cli: Home, api: Client) -> None:
    name, first = new_app(api)
    assert cli.ok("-a", name, "scale").stdout == "web=0 worker=0\n"  # no formation yet
    api.put_formation({"app": name, "release": first, "processes": {"web": 2}})
    assert cli.ok("-a", name, "scale").stdout == "web=2 worker=0\n"

    second = new_release(api, name, ("web",))
    api.put_formation({"app": name, "release": second, "processes": {"web": 1}})
    assert cli.ok("-a", name, "scale").stdout == "web=1\n"
    assert cli.ok("-a", name, "scale", "-r", first).stdout == "web=2 worker=0\n"
    out = cli.ok("-a", name, "scale", "--all").stdout
    assert out == f"{second} (current)\nweb=1\n\n{first}\nweb=2 worker=0\n"

    # a release scaled to nothing is left out; the current one is always shown
    api.put_formation({"app": name, "release": first, "processes": {"web": 0}})
    api.put_formation({"app": name, "release": second, "processes": {"web": 0}})
    assert cli.ok("-a", name, "scale", "-a").stdout == f"{second} (current)\nweb=0\n"

    err = cli.fail("-a", name, "scale", "--all", "web=1")
    assert err == "ERROR: Can't use --all when scaling\n"
    err = cli.fail("-a", name, "scale", "--all", "-r", first)
    assert err == "ERROR: Can't use --all in combination with --release\n"
    unknown = str(uuid.uuid4())
    assert cli.fail("-a", name, "scale", "-r", unknown) == f"release {unknown} not found\n"

    bare = f"app-{uuid.uuid4().hex[:8]}"
    api.create_app({"name": bare, "meta": None})
    err = cli.fail("-a", bare, "scale")
    assert err == "No app release, specify a release with --release\n"
    assert cli.fail("-a", bare, "scale", "web=1") == err
    assert cli.ok("-a", bare, "scale", "--all").stdout == ""


def test_scale_refuses_what_it_cannot_do(cli: Home, api: Client) -> None:
    name, rid = new_app(api)
    err = cli.fail("-a", name, "scale", "web=1", "db=2", "cache=1")
    assert err == 'ERROR: unknown process types: "db", "cache"\n'
    err = cli.fail("-a", name, "scale", "web=-1")
    assert err == 'ERROR: process quantities cannot be negative in "web=-1"\n'
    assert cli.fail("-a", name, "scale", "web=two") == (
        'ERROR: could not parse quantity in "web=two"\n'
    )
    assert cli.fail("-a", name, "scale", "web") == (
        "ERROR: scale args must be of the form <typ>=<qty>\n"
    )
    # nothing changes: said on stdout, and the formation is not written
    out = cli.ok("-a", name, "scale", "web=0")
    assert out.stdout == "requested scale equals current scale, nothing to do!\n"
    api.put_formation({"app": name, "release": rid, "processes": {"web": 2, "worker": 1}})
    out = cli.ok("-a", name, "scale", "web=2")
    assert out.stdout == "requested scale equals current scale, nothing to do!\n"


def test_scale_no_wait_returns_after_the_formation_is_written(cli: Home, api: Client) -> None:
    name, rid = new_app(api)
    out = cli.ok("-a", name, "scale", "-n", "web=3")
    assert (out.stdout, out.stderr) == ("scaling web: 0=>3\n\n", "")
    assert api.get_formation(name, rid)["processes"] == {"web": 3}
    out = cli.ok("-a", name, "scale", "--no-wait", "worker=1")
    assert out.stdout == "scaling worker: 0=>1\n\n"
    assert api.get_formation(name, rid)["processes"] == {"web": 3, "worker": 1}


# --------------------------------------------------------------------------------------------
# scale: waiting for the jobs


def test_scale_up_waits_for_the_jobs_of_its_release(cli: Home, api: Client) -> None:
    name, old = new_app(api)
    rid = new_release(api, name)
    a, b, stray = job_id(), job_id(), job_id()
    scheduler = SchedulerStandIn(
        api,
        name,
        [
            (stray, "web", old, "up"),  # another release's job: neither shown nor counted
            (a, "web", rid, "starting"),
            (a, "web", rid, "up"),
            (b, "web", rid, "starting"),
            (b, "web", rid, "up"),
        ],
    )
    out = cli.ok("-a", name, "scale", "web=2")
    scheduler.join()
    lines = out.stdout.split("\n")
    assert lines[:2] == ["scaling web: 0=>2", ""]
    events = [f"web {a} starting", f"web {a} up", f"web {b} starting", f"web {b} up"]
    assert len(lines) == 2 + len(events) + 3, out.stdout
    for line, event in zip(lines[2:6], events, strict=True):
        assert re.fullmatch(rf"{STAMP} ==> {event}", line), line
    assert lines[6] == ""
    assert re.fullmatch(r"scale completed in [0-9.]+(µs|ms|s)", lines[7]), lines[7]
    assert lines[8] == "" and out.stderr == ""
    assert api.get_formation(name, rid)["processes"] == {"web": 2}
    # the formation written was the new one, with the release's app
    assert api.get_formation(name, rid)["app"] == api.get_app(name)["id"]


def test_scale_down_counts_crashed_as_down(cli: Home, api: Client) -> None:
    name, rid = new_app(api)
    w1, w2, worker = job_id(), job_id(), job_id()
    for job in (w1, w2):
        report(api, name, job, "up", rid, "web")
    api.put_formation({"app": name, "release": rid, "processes": {"web": 2}})
    scheduler = SchedulerStandIn(
        api, name, [(worker, "worker", rid, "up"), (w1, "web", rid, "crashed")]
    )
    out = cli.ok("-a", name, "scale", "web=1", "worker=1")
    scheduler.join()
    lines = out.stdout.splitlines()
    assert lines[:2] == ["scaling web: 2=>1, worker: 0=>1", ""]
    assert re.fullmatch(rf"{STAMP} ==> worker {worker} up", lines[2])
    assert re.fullmatch(rf"{STAMP} ==> web {w1} down", lines[3])
    assert lines[4] == "" and lines[5].startswith("scale completed in ")
    assert api.get_formation(name, rid)["processes"] == {"web": 1, "worker": 1}


def test_scale_times_out_without_events_of_its_release(cli: Home, api: Client) -> None:
    """One of the two jobs comes up; then only another release's jobs report, which do not
    keep the wait alive."""
    name, old = new_app(api)
    rid = new_release(api, name)
    a = job_id()
    strays = [(job_id(), "web", old, "up") for _ in range(8)]
    scheduler = SchedulerStandIn(api, name, [(a, "web", rid, "up"), *strays], every=0.3)
    started = time.monotonic()
    out = cli.run("-a", name, "scale", "web=2", env=FAST)
    took = time.monotonic() - started
    assert out.returncode == 1, out
    assert out.stderr == "timed out waiting for job events: map[web:map[up:2]]\n"
    lines = out.stdout.splitlines()
    assert lines[:2] == ["scaling web: 0=>2", ""]
    assert len(lines) == 3 and re.fullmatch(rf"{STAMP} ==> web {a} up", lines[2])
    assert took < 2.5, took  # strays came for 2.4 s more: they did not restart the timer
    scheduler.join()


def test_an_extra_up_never_matches(cli: Home, api: Client) -> None:
    name, rid = new_app(api)
    a, b, c = job_id(), job_id(), job_id()
    scheduler = SchedulerStandIn(
        api, name, [(a, "web", rid, "up"), (b, "web", rid, "up"), (c, "worker", rid, "up")]
    )
    out = cli.run("-a", name, "scale", "web=1", "worker=1", env=FAST)
    scheduler.join()
    assert out.returncode == 1, out
    assert out.stderr == ("timed out waiting for job events: map[web:map[up:1] worker:map[up:1]]\n")
    assert len(out.stdout.splitlines()) == 2 + 3


def test_go_formats() -> None:
    assert go_duration(0) == "0s"
    assert go_duration(3_944_629_056) == "3.944629056s"
    assert go_duration(1_500_000_000) == "1.5s"
    assert go_duration(2_000_000_000) == "2s"
    assert go_duration(512_300_000) == "512.3ms"
    assert go_duration(1_234) == "1.234µs"
    assert go_duration(999) == "999ns"
    assert go_duration(62_500_000_000) == "1m2.5s"
    assert go_duration(3_600_000_000_000) == "1h0m0s"
    assert go_map({"worker": {"down": 2}, "web": {"up": 3}}) == (
        "map[web:map[up:3] worker:map[down:2]]"
    )


# --------------------------------------------------------------------------------------------
# release rollback


def test_release_rollback(cli: Home, api: Client, controller: ControllerProcess) -> None:
    # the deployer waits for the jobs of the release it deploys: a stand-in reports them
    with scheduler_standin(controller.url, controller.key):
        _release_rollback(cli, api)


def _release_rollback(cli: Home, api: Client) -> None:
    name, first = new_app(api, ("web",))
    second = new_release(api, name, ("web",))
    # jobs run: the deployment is not finished at once, the CLI waits for it
    api.put_formation({"app": name, "release": second, "processes": {"web": 1}})

    out = cli.ok("-a", name, "release", "rollback")
    assert (out.stdout, out.stderr) == ("", f"Rolled back to release {first}.\n")
    assert api.app_release(name)["id"] == first
    (deployment,) = [d for d in api.deployment_list(name) if d["new_release"] == first]
    assert deployment["status"] == "complete" and deployment["old_release"] == second
    assert api.get_formation(name, first)["processes"] == {"web": 1}

    # the first release has none before it; the second can be named
    err = cli.fail("-a", name, "release", "rollback")
    assert err == f"no release before the current one ({first}) to roll back to\n"
    out = cli.ok("-a", name, "release", "rollback", second)
    assert out.stderr == f"Rolled back to release {second}.\n"
    assert api.app_release(name)["id"] == second

    err = cli.fail("-a", name, "release", "rollback", second)
    assert err == f"release {second} is already the current release of {name}\n"
    _, foreign = new_app(api, ("web",))
    for unknown in (foreign, str(uuid.uuid4()), "not-a-uuid"):
        err = cli.fail("-a", name, "release", "rollback", unknown)
        assert err == f"release {unknown} is not a release of app {name}\n"
    assert api.app_release(name)["id"] == second

    bare = f"app-{uuid.uuid4().hex[:8]}"
    api.create_app({"name": bare, "meta": None})
    err = cli.fail("-a", bare, "release", "rollback")
    assert err == f"app {bare} has no current release to roll back from\n"
    assert "flynn release rollback [<id>]" in cli.ok("help", "release").stdout
