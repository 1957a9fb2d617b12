"""The whole platform on three hosts, booted by `flynn-host bootstrap` with the default
manifest, used with the `flynn` CLI from this machine: every system app runs, an app's logs
from all hosts reach `flynn log` (following, filtering as Flynn's CLI), and — with a cluster of
its own (slow) — the loss of a whole host (daemon, jobs and namespace) while the controller API,
git push, app routes and PostgreSQL keep serving, then the host brought back and rejoining."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from flynn_host.dev import etchosts
from flynn_host.dev import postgres as pg
from flynn_host.dev.cluster import Cluster
from flynn_host.dev.host import IMAGES
from flynn_host.dev.host import wait_for as host_wait_for
from tests.dev.test_cluster import SYSTEM_APPS, booted_cluster
from tests.test_gitpush_cluster import EXAMPLES, FLYNN, Env
from tests.test_router_cluster import system_job_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")

# a process type that prints to stdout and stderr, then serves HTTP: no build needed
CHATTY = (
    "echo web $FLYNN_JOB_ID starting; echo web $FLYNN_JOB_ID warning >&2; "
    "mkdir -p /www/cgi-bin && echo hello from $FLYNN_JOB_ID > /www/index.html && "
    # a CGI script that answers `marked` and writes `mark <query>` to the job's stderr (its
    # header lines end in CRLF: the router refuses a response head with bare LFs)
    'printf \'#!/bin/sh\\nprintf "Content-Type: text/plain\\\\r\\\\n\\\\r\\\\nmarked\\\\n"\\n'
    "echo mark $QUERY_STRING >&2\\n' > /www/cgi-bin/mark && chmod +x /www/cgi-bin/mark && "
    "exec httpd -f -p 8080 -h /www"
)
WORKER = "i=0; while true; do i=$((i+1)); echo worker tick $i; sleep 1; done"


class Platform(Env):
    """`Env` (the CLI's home, git, HTTP through a router) with the router chosen by host."""

    router_host: int = 1

    def http(self, app: str, path: str = "/") -> tuple[int, str]:
        out = subprocess.run(
            ["curl", "-s", "--max-time", "5", "-w", "\n%{http_code}", "-H",
             f"Host: {app}.{self.domain}", f"http://{self.cluster.host(self.router_host).ip}{path}"],
            capture_output=True, text=True,
        )  # fmt: skip
        body, _, code = out.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def busybox_app(self, name: str, processes: dict[str, int]) -> None:
        """An app of the busybox image with a `web` (stdout, stderr, HTTP) and a `worker`."""
        self.flynn("create", "-y", name)
        release = self.home / f"{name}-release.json"
        release.write_text(json.dumps({"processes": {
            "web": {"cmd": ["sh", "-c", CHATTY], "ports": [{"port": 8080, "proto": "tcp",
                    "service": {"name": f"{name}-web", "create": True}}]},
            "worker": {"cmd": ["sh", "-c", WORKER]},
        }}))  # fmt: skip
        manifest = (IMAGES / "busybox" / "manifest.json").as_uri()
        self.flynn("-a", name, "release", "add", "-t", "flynn", "-f", str(release), manifest)
        self.flynn("-a", name, "scale", *(f"{t}={n}" for t, n in processes.items()))

    def log(self, app: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(FLYNN, "-a", app, "log", *args, cwd=self.home, timeout=60)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 120) -> float:
    """Seconds until `check()` is true (the shared `flynn_host.dev.host.wait_for`, polling
    every half second and taking any exception as "not yet")."""
    started = time.monotonic()
    host_wait_for(check, timeout, what, every=0.5, ignoring=(Exception,))
    return time.monotonic() - started


def platform_env(c: Cluster, home: Path) -> Platform:
    router = system_job_env(c, "router")
    der = x509.load_pem_x509_certificate(router["TLSCERT"].encode()).public_bytes(Encoding.DER)
    pin = base64.b64encode(hashlib.sha256(der).digest()).decode()
    p = Platform(c, home, router["CONTROLLER_KEY"])
    p.flynn("cluster", "add", "-p", pin, "default", c.domain, p.key)
    return p


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with booted_cluster(3) as c:
        yield platform_env(c, tmp_path_factory.mktemp("platform-home"))


LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (?P<source>\w+)\[(?P<type>[\w-]+)\."
    r"(?P<job>[\w-]+)\]: (?P<msg>.*)$"
)


def test_every_system_app_runs_across_the_three_hosts(platform: Platform) -> None:
    apps = {a["name"]: a for a in platform.api("GET", "/apps")}
    assert set(apps) >= SYSTEM_APPS
    running: dict[str, set[int]] = {}
    for i in (1, 2, 3):
        for job in platform.cluster.client(i).list_jobs(active=True).values():
            name = (job["job"].get("metadata") or {}).get("flynn-controller.app_name")
            running.setdefault(str(name), set()).add(i)
    # omni apps on every host; the others spread over more than one host
    for app in ("discoverd", "flannel", "router"):
        assert running[app] == {1, 2, 3}, (app, running)
    for app in ("postgres", "controller", "blobstore", "gitreceive", "logaggregator"):
        assert len(running[app]) >= 2, (app, running)


def test_flynn_log_follows_a_web_job_and_filters_as_flynn(platform: Platform) -> None:
    platform.busybox_app("chatty", {"web": 2, "worker": 1})
    wait_for(lambda: platform.http("chatty")[0] == 200, "chatty through the router")
    jobs = {j["id"]: j["type"] for j in platform.api("GET", "/apps/chatty/jobs")
            if j["state"] == "up"}  # fmt: skip
    assert sorted(jobs.values()) == ["web", "web", "worker"]

    # -f: a line a web job prints (its CGI script, on a request) shows up while following; the
    # time from the request to the line is printed (bench/deploy.py measures it too)
    follow = subprocess.Popen(
        [FLYNN, "-a", "chatty", "log", "-f", "-t", "web"], cwd=platform.home,
        env=platform.environ(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(x) for x in follow.stdout or ()], daemon=True
    ).start()
    try:
        time.sleep(1)  # the follower is connected; only new lines from here
        marker = f"m{time.time_ns()}"
        sent = time.monotonic()
        assert platform.http("chatty", f"/cgi-bin/mark?{marker}") == (200, "marked\n")
        line = ""
        while marker not in line:
            line = lines.get(timeout=30)  # queue.Empty fails the test
        latency = time.monotonic() - sent
    finally:
        follow.kill()
        follow.wait()
    m = LINE.match(line.rstrip("\n"))
    assert m and m["source"] == "app" and m["type"] == "web" and m["job"] in jobs, line
    assert m["msg"] == f"mark {marker}", line
    print(f"flynn log -f: a web job's line {latency * 1000:.0f} ms after the request")

    # the backlog: both web jobs' start lines and the worker's ticks, with Flynn's format
    out = platform.log("chatty")
    assert out.returncode == 0, out.stderr
    parsed = [LINE.match(line) for line in out.stdout.splitlines()]
    assert all(parsed), out.stdout
    msgs = {(p["type"], p["msg"].split(" ", 2)[-1]) for p in parsed if p["type"] == "web"}
    assert ("web", "starting") in msgs and ("web", "warning") in msgs
    assert any(p["type"] == "worker" and p["msg"].startswith("worker tick") for p in parsed)

    # -n 5 -t web -s: at most five web lines, the stderr ones on stderr
    wait_for(lambda: len(platform.log("chatty", "-t", "worker").stdout.splitlines()) >= 3, "ticks")
    out = platform.log("chatty", "-n", "5", "-t", "web", "-s")
    assert out.returncode == 0
    lines = out.stdout.splitlines() + out.stderr.splitlines()
    assert 1 <= len(lines) <= 5
    assert all(LINE.match(line)["type"] == "web" for line in lines)  # type: ignore[index]
    # stdout has the start lines, stderr the warnings and the CGI script's marks
    assert "warning" not in out.stdout and " mark " not in out.stdout
    assert "starting" not in out.stderr and f"mark {marker}" in out.stderr  # the newest
    # without -s every line is on stdout
    assert f"mark {marker}" in platform.log("chatty", "-n", "5", "-t", "web").stdout

    # -j: one job's lines; -r: the messages alone
    job = next(j for j, t in jobs.items() if t == "worker")
    out = platform.log("chatty", "-j", job, "-r", "-n", "2")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 2
    assert all(re.fullmatch(r"worker tick \d+", line) for line in out.stdout.splitlines())
    platform.flynn("-a", "chatty", "delete", "-y")


def test_bad_log_flags_are_refused(platform: Platform) -> None:
    out = platform.run(FLYNN, "-a", "chatty", "log", "-n", "lots", cwd=platform.home)
    assert out.returncode != 0 and '"lots" is not a number of lines' in out.stderr
    out = platform.run(FLYNN, "-a", "chatty", "log", "--nope", cwd=platform.home)
    assert out.returncode != 0 and "usage: flynn log" in (out.stdout + out.stderr)


@pytest.mark.slow
def test_a_lost_host_leaves_the_platform_serving_and_rejoins(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Kill the host running the PostgreSQL primary (its daemon, jobs and namespace, as a
    machine that dies), then check each service users touch, and bring it back."""
    with booted_cluster(3) as c:
        p = platform_env(c, tmp_path_factory.mktemp("lost-host-home"))
        p.busybox_app("steady", {"web": 3})
        wait_for(lambda: p.http("steady")[0] == 200, "steady through the router")
        p.flynn("-a", "steady", "resource", "add", "postgres")
        p.flynn("-a", "steady", "pg", "psql", "--", "-c",
                "CREATE TABLE kept (n int); INSERT INTO kept VALUES (1)")  # fmt: skip
        static = p.new_app("site", EXAMPLES / "static")
        rc, out = p.push(static)
        assert rc == 0, out

        lost = pg.primary(c).host
        alive = next(i for i in (1, 2, 3) if i != lost)
        print(f"losing host {lost} (the PostgreSQL primary's); routing through host {alive}")
        lost_at = time.monotonic()
        c.stop_host(lost, kill=True, remove_namespace=True)
        # the operator's DNS now points the cluster's names at a host that is alive
        etchosts.add(c.name, c.host(alive).ip, etchosts.cluster_names(c.domain))
        p.router_host = alive

        took = {
            "controller API": wait_for(lambda: p.api("GET", "/apps") is not None, "the API", 120),
            "app route": wait_for(lambda: p.http("steady")[0] == 200, "the app's route", 120),
        }
        sql = "INSERT INTO kept VALUES (2); SELECT count(*) FROM kept"
        took["postgres"] = wait_for(
            lambda: "2" in p.flynn("-a", "steady", "pg", "psql", "--", "-tA", "-c", sql),
            "a write to the app's database", 180,
        )  # fmt: skip
        (static / "index.html").write_text("<h1>Static, pushed after a host was lost</h1>\n")
        p.commit(static, "after the loss")
        took["git push"] = wait_for(lambda: p.push(static)[0] == 0, "a git push", 300)
        p.wait_serving("site", "after a host was lost", 120)
        for what, seconds in took.items():
            print(f"  {what}: serving {seconds:.1f}s after the check began")
        print(f"  all served {time.monotonic() - lost_at:.1f}s after the loss")
        # the row written before the loss is there, and the one written after it
        rows = p.flynn("-a", "steady", "pg", "psql", "--", "-tA", "-c",
                       "SELECT n, count(*) FROM kept GROUP BY n ORDER BY n")  # fmt: skip
        assert rows.split()[0] == "1|1" and rows.split()[1].startswith("2|"), rows

        # back: the host runs its omni jobs again and takes new jobs
        c.start_host(lost)
        back = time.monotonic()

        def rejoined() -> bool:
            apps = {(j["job"].get("metadata") or {}).get("flynn-controller.app_name")
                    for j in c.client(lost).list_jobs(active=True).values()}  # fmt: skip
            return {"discoverd", "flannel", "router"} <= apps

        wait_for(rejoined, f"host {lost}'s omni jobs", 180)
        p.flynn("-a", "steady", "scale", "web=6")
        wait_for(lambda: any((j["job"].get("metadata") or {}).get("flynn-controller.app_name")
                             == "steady" for j in c.client(lost).list_jobs(active=True).values()),
                 f"a steady job on host {lost}", 120)  # fmt: skip
        p.router_host = lost
        wait_for(lambda: p.http("steady")[0] == 200, f"the app through host {lost}'s router", 60)
        print(f"  host {lost} rejoined and serves {time.monotonic() - back:.1f}s after its start")
