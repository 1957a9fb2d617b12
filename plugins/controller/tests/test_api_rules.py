"""The controller's rules beyond the wire format, against a real controller on a real
PostgreSQL: migrations raced by two processes, route rules (path routes, dependent routes, TCP
ports, TLS pairs), the default route, deployments of a running formation through the task
queue, resources provisioned from and returned to a real HTTP provider, app deletion, and a
database outage answered with `retry: true` and survived without a restart."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from flynn_host.dev.certs import self_signed
from flynn_host.dev.controller import (
    ControllerProcess,
    PGServer,
    controller_process,
    pg_server,
)
from flynn_host.dev.host import free_port, missing_programs
from flynn_host.dev.scheduler_standin import scheduler_standin

pytestmark = pytest.mark.skipif(
    bool(missing_programs("/usr/lib/postgresql/15/bin/postgres")), reason="needs PostgreSQL 15"
)


class API:
    def __init__(self, ctl: ControllerProcess) -> None:
        self.ctl = ctl
        u = urllib.parse.urlsplit(ctl.url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.auth = "Basic " + base64.b64encode(b":" + ctl.key.encode()).decode()

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=20)
        h = {"Authorization": self.auth, "Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, None if body is None else json.dumps(body), h)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        ctype = resp.getheader("Content-Type") or ""
        return resp.status, json.loads(raw) if "json" in ctype and raw else raw

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, out = self.call(method, path, body)
        assert status == 200, (method, path, status, out)
        return out

    def events(self, query: str) -> list[dict[str, Any]]:
        status, out = self.call("GET", "/events?" + query, headers={"Accept": "application/json"})
        assert status == 200
        return list(out)

    def wait_event(self, query: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(query)
            if found:
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"no event for {query}")


@contextlib.contextmanager
def sse(api: API, path: str) -> Iterator[Any]:
    """An open SSE response whose `.next()` gives the next message's JSON."""
    conn = http.client.HTTPConnection(api.host, api.port, timeout=20)
    conn.request("GET", path, headers={"Authorization": api.auth, "Accept": "text/event-stream"})
    resp = conn.getresponse()
    assert resp.status == 200

    class Reader:
        def next(self) -> Any:
            while True:
                line = resp.fp.readline()
                if not line:
                    raise EOFError
                if line.startswith(b"data: "):
                    assert resp.fp.readline() == b"\n"
                    return json.loads(line[6:])

    try:
        yield Reader()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def pg() -> Iterator[PGServer]:
    with pg_server() as server:
        yield server


@pytest.fixture(scope="module")
def api(pg: PGServer) -> Iterator[API]:
    with controller_process(pg) as ctl:
        yield API(ctl)


# --- a real HTTP resource provider (an external service to the controller) --------------------
class Provider:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/databases"
        self.made: dict[str, dict[str, str]] = {}
        self.deleted: list[str] = []
        self.fail_delete = False
        self._loop: Any = None

    def app(self) -> web.Application:
        async def create(request: web.Request) -> web.Response:
            n = len(self.made) + 1
            ext = f"/databases/db{n}"
            self.made[ext] = {"DATABASE_URL": f"postgres://u{n}:p@db/db{n}", "PGUSER": f"u{n}"}
            return web.json_response({"id": ext, "env": self.made[ext]})

        async def delete(request: web.Request) -> web.Response:
            if self.fail_delete:
                return web.json_response(
                    {"code": "unknown_error", "message": "disk on fire", "retry": False},
                    status=500,
                )
            self.deleted.append(request.query["id"])
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/databases", create)
        app.router.add_delete("/databases", delete)
        return app

    @contextlib.contextmanager
    def running(self) -> Iterator[Provider]:
        import asyncio

        started = threading.Event()
        runner_box: dict[str, Any] = {}

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(self.app())
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
            runner_box["runner"] = runner
            started.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        assert started.wait(10)
        try:
            yield self
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            thread.join(10)


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    with Provider().running() as p:
        yield p


# --- helpers ----------------------------------------------------------------------------------
def new_app(api: API, name: str, **extra: Any) -> dict[str, Any]:
    return dict(api.ok("POST", "/apps", {"name": name, **extra}))


def deployable_release(api: API, types: tuple[str, ...] = ("web",)) -> dict[str, Any]:
    art = api.ok("POST", "/artifacts", {"type": "docker", "uri": "https://r.test?name=a&id=1"})
    procs = {t: {"cmd": ["run", t]} for t in types}
    return dict(api.ok("POST", "/releases", {"artifact": art["id"], "processes": procs}))


def tls_pair(name: str) -> tuple[str, str]:
    return self_signed(name, days=1)


# --- migrations -------------------------------------------------------------------------------
def test_two_processes_racing_to_migrate_one_database(pg: PGServer) -> None:
    pg.psql("CREATE DATABASE race")
    with contextlib.ExitStack() as stack:
        threads = []
        started: list[ControllerProcess] = []
        for _ in range(2):

            def start() -> None:
                started.append(stack.enter_context(controller_process(pg, database="race")))

            t = threading.Thread(target=start)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(60)
        assert len(started) == 2
        rows = pg.psql("SELECT id, count(*) FROM schema_migrations GROUP BY id", "race")
        from flynn_controller.db import migrations

        assert sorted(rows.strip().splitlines()) == sorted(f"{n}|1" for n, _, _ in migrations())
        a, b = API(started[0]), API(started[1])
        made = new_app(a, "raced")
        assert b.ok("GET", "/apps/raced")["id"] == made["id"]


# --- apps -------------------------------------------------------------------------------------
def test_default_route_for_apps_but_not_system_apps(api: API) -> None:
    app = new_app(api, "routed")
    routes = api.ok("GET", "/apps/routed/routes")
    assert [(r["type"], r["domain"], r["service"]) for r in routes] == [
        ("http", "routed.dev.localflynn.test", "routed-web")
    ]
    assert routes[0]["parent_ref"] == f"controller/apps/{app['id']}"
    new_app(api, "sysapp", meta={"flynn-system-app": "true"})
    assert api.ok("GET", "/apps/sysapp/routes") == []


def test_app_update_applies_meta_strategy_and_timeout_only(api: API) -> None:
    app = new_app(api, "updated")
    body = {**app, "name": "renamed", "meta": {"k": "v"}, "strategy": "one-by-one"}
    body["deploy_timeout"] = 90
    out = api.ok("POST", f"/apps/{app['id']}/meta", body)
    assert (out["name"], out["meta"], out["strategy"], out["deploy_timeout"]) == (
        "updated",
        {"k": "v"},
        "one-by-one",
        90,
    )
    status, err = api.call("POST", "/apps/updated", {"strategy": "sideways"})
    assert (status, err["code"], err["detail"]) == (400, "validation_error", {"field": "strategy"})


def test_bad_app_names_are_validation_errors(api: API) -> None:
    for name in ("Upper", "-dash", "a_b", "x" * 101, "with space"):
        status, err = api.call("POST", "/apps", {"name": name})
        assert status == 400 and err["detail"] == {"field": "name"}, (name, err)


# --- routes -----------------------------------------------------------------------------------
def test_path_routes_need_the_domains_root_route(api: API) -> None:
    new_app(api, "paths")
    status, err = api.call(
        "POST",
        "/apps/paths/routes",
        {"type": "http", "service": "s", "domain": "p.test", "path": "/api"},
    )
    assert (status, err["detail"]) == (400, {"field": "path"})
    root = api.ok(
        "POST", "/apps/paths/routes", {"type": "http", "service": "s", "domain": "p.test"}
    )
    sub = api.ok(
        "POST",
        "/apps/paths/routes",
        {"type": "http", "service": "s", "domain": "p.test", "path": "/api"},
    )
    assert (root["path"], sub["path"]) == ("/", "/api/")
    status, err = api.call("DELETE", f"/apps/paths/routes/http/{root['id']}")
    assert (status, err["message"]) == (400, "Route has dependent routes")
    api.ok("DELETE", f"/apps/paths/routes/http/{sub['id']}")
    api.ok("DELETE", f"/apps/paths/routes/http/{root['id']}")
    assert api.call("GET", f"/apps/paths/routes/http/{root['id']}")[0] == 404


def test_tcp_routes_get_free_ports_and_never_80_or_443(api: API) -> None:
    new_app(api, "tcpapp")
    ports = [
        api.ok("POST", "/apps/tcpapp/routes", {"type": "tcp", "service": "tcpapp-web"})["port"]
        for _ in range(3)
    ]
    assert len(set(ports)) == 3 and all(3000 <= p <= 3500 for p in ports)
    for port in (80, 443):
        status, err = api.call(
            "POST", "/apps/tcpapp/routes", {"type": "tcp", "service": "x", "port": port}
        )
        assert (status, err["detail"]) == (400, {"field": "port"})
    status, err = api.call(
        "POST", "/apps/tcpapp/routes", {"type": "tcp", "service": "x", "port": ports[0]}
    )
    assert (status, err["code"], err["message"]) == (409, "conflict", "Duplicate route")
    assert err["detail"]["port"] == ports[0]


def test_tls_routes_need_a_matching_pair_and_update_can_clear_it(api: API) -> None:
    new_app(api, "tlsapp")
    cert, key = tls_pair("tls.test")
    _, other_key = tls_pair("other.test")
    base = {"type": "http", "service": "tlsapp-web", "domain": "tls.test"}
    status, err = api.call("POST", "/apps/tlsapp/routes", {**base, "tls_cert": cert})
    assert (status, err["code"]) == (400, "validation_error")
    status, err = api.call(
        "POST", "/apps/tlsapp/routes", {**base, "tls_cert": cert, "tls_key": other_key}
    )
    assert (status, err["detail"]) == (400, {"field": "tls_key"})
    route = api.ok("POST", "/apps/tlsapp/routes", {**base, "tls_cert": cert, "tls_key": key})
    assert route["tls_cert"] == cert
    updated = api.ok(
        "PUT",
        f"/apps/tlsapp/routes/http/{route['id']}",
        {**route, "tls_cert": "", "tls_key": "", "sticky": True, "service": "other-web"},
    )
    assert "tls_cert" not in updated and updated["sticky"] and updated["service"] == "other-web"
    # a route of another app, or asked for with the wrong type, is not found
    new_app(api, "stranger")
    assert api.call("GET", f"/apps/stranger/routes/http/{route['id']}")[0] == 404
    assert api.call("GET", f"/apps/tlsapp/routes/tcp/{route['id']}")[0] == 404


# --- formations and deployments ---------------------------------------------------------------
def test_formation_rules(api: API) -> None:
    new_app(api, "formed")
    release = deployable_release(api)
    status, err = api.call(
        "PUT", f"/apps/formed/formations/{release['id']}", {"processes": {"worker": 1}}
    )
    assert status == 400
    assert err["message"].endswith("Invalid process types: [worker]")
    bare = api.ok("POST", "/releases", {"processes": {"web": {"cmd": ["x"]}}})
    status, err = api.call(
        "PUT", f"/apps/formed/formations/{bare['id']}", {"processes": {"web": 1}}
    )
    assert (status, err["message"]) == (400, "release is not deployable")


def test_formation_stream_sends_a_batch_then_changes(api: API) -> None:
    new_app(api, "streamed")
    release = deployable_release(api)
    api.ok("PUT", f"/apps/streamed/formations/{release['id']}", {"processes": {"web": 1}})
    with sse(api, "/formations") as stream:
        batch = []
        while (msg := stream.next()) != {}:
            batch.append(msg)
        assert any(f["release"]["id"] == release["id"] for f in batch)
        api.ok("PUT", f"/apps/streamed/formations/{release['id']}", {"processes": {"web": 3}})
        msg = stream.next()
        assert (msg["app"]["name"], msg["processes"]) == ("streamed", {"web": 3})
        assert msg["artifact"]["id"] == release["artifact"]
    active = api.ok("GET", "/formations?active=true")
    assert any(f["app"]["name"] == "streamed" for f in active)


def test_deploying_over_a_running_formation_moves_it(api: API) -> None:
    app = new_app(api, "deployed")
    first = deployable_release(api, ("web", "worker"))
    d = api.ok("POST", "/apps/deployed/deploy", {"id": first["id"]})
    assert d["status"] == "complete" and d["finished_at"]
    api.ok(
        "PUT", f"/apps/deployed/formations/{first['id']}", {"processes": {"web": 2, "worker": 1}}
    )
    second = deployable_release(api, ("web", "worker"))
    query = "app_id=deployed&object_types=deployment&past=true"
    # the deployer waits for the new jobs: a stand-in for the scheduler reports them
    with scheduler_standin(api.ctl.url, api.ctl.key), sse(api, "/events?" + query) as stream:
        d = api.ok("POST", "/apps/deployed/deploy", {"id": second["id"]})
        assert d["status"] == "pending" and "finished_at" not in d
        assert d["processes"] == {"web": 2, "worker": 1}
        statuses = []
        while not statuses or statuses[-1] not in ("complete", "failed"):
            event = stream.next()
            if event["object_id"] == d["id"] and "job_type" not in event["data"]:
                statuses.append(event["data"]["status"])
    assert statuses == ["pending", "running", "complete"]
    assert api.ok("GET", "/apps/deployed/release")["id"] == second["id"]
    new_f = api.ok("GET", f"/apps/deployed/formations/{second['id']}")
    old_f = api.ok("GET", f"/apps/deployed/formations/{first['id']}")
    assert new_f["processes"] == {"web": 2, "worker": 1}
    assert old_f["processes"] == {"web": 0, "worker": 0}
    assert api.ok("GET", f"/deployments/{d['id']}")["status"] == "complete"
    listed = api.ok("GET", "/apps/deployed/releases")
    assert {r["id"] for r in listed} == {first["id"], second["id"]}
    assert app["id"] == api.ok("GET", "/apps/deployed")["id"]
    status, err = api.call(
        "POST", "/apps/deployed/deploy", {"id": "00000000-0000-0000-0000-000000000000"}
    )
    assert (status, err["code"]) == (400, "validation_error")


# --- resources and app deletion ------------------------------------------------------------------
def test_resources_and_app_deletion(api: API, provider: Provider) -> None:
    api.ok("POST", "/providers", {"name": "testdb", "url": provider.url})
    status, err = api.call("POST", "/providers", {"name": "testdb", "url": provider.url + "x"})
    assert (status, err["code"]) == (409, "object_exists")
    app = new_app(api, "doomed")
    other = new_app(api, "survivor")
    own = api.ok("POST", "/providers/testdb/resources", {"apps": ["doomed"], "config": None})
    shared = api.ok(
        "POST", "/providers/testdb/resources", {"apps": ["doomed", other["id"]], "config": {}}
    )
    assert own["env"] == provider.made[own["external_id"]]
    assert own["apps"] == [app["id"]] and shared["apps"] == [app["id"], other["id"]]
    listed = api.ok("GET", "/apps/doomed/resources")
    assert {r["id"] for r in listed} == {own["id"], shared["id"]}
    api.ok("POST", "/apps/doomed/routes", {"type": "tcp", "service": "doomed-web"})
    api.ok("DELETE", "/apps/doomed")
    event = api.wait_event(f"object_types=app_deletion&object_id={app['id']}")
    data = event["data"]
    assert data["error"] == ""
    assert len(data["app_deletion"]["deleted_routes"]) == 2  # the default and the tcp route
    assert [r["id"] for r in data["app_deletion"]["deleted_resources"]] == [own["id"]]
    assert provider.deleted == [own["external_id"]]
    assert api.call("GET", "/apps/doomed")[0] == 404
    assert api.ok("GET", "/apps/survivor/resources")[0]["apps"] == [other["id"]]
    # the name is free again
    assert new_app(api, "doomed")["id"] != app["id"]


def test_a_failing_provider_is_reported_by_the_deletion_event(api: API, provider: Provider) -> None:
    api.call("POST", "/providers", {"name": "testdb", "url": provider.url})
    app = new_app(api, "stuck")
    api.ok("POST", "/providers/testdb/resources", {"apps": ["stuck"]})
    provider.fail_delete = True
    try:
        api.ok("DELETE", "/apps/stuck")
        event = api.wait_event(f"object_types=app_deletion&object_id={app['id']}", timeout=40)
    finally:
        provider.fail_delete = False
    assert "disk on fire" in event["data"]["error"]
    assert api.ok("GET", "/apps/stuck")["id"] == app["id"]  # nothing half-done
    assert len(api.ok("GET", "/apps/stuck/resources")) == 1


def test_unreachable_provider_is_a_retryable_error(api: API) -> None:
    url = f"http://127.0.0.1:{free_port()}/databases"
    api.ok("POST", "/providers", {"name": "nowhere", "url": url})
    new_app(api, "hopeful")
    status, err = api.call("POST", "/providers/nowhere/resources", {"apps": ["hopeful"]})
    assert (status, err["code"], err["retry"]) == (500, "unknown_error", True)
    assert api.ok("GET", "/apps/hopeful/resources") == []


# --- the database going away -------------------------------------------------------------------
def test_database_outage_gives_retry_errors_then_service_resumes(pg: PGServer) -> None:
    pg.psql("CREATE DATABASE outage")
    with controller_process(pg, database="outage") as ctl:
        api = API(ctl)
        new_app(api, "before")
        with sse(api, "/events?object_types=app") as stream:
            pg.stop()
            try:
                status, err = api.call("POST", "/apps", {"name": "during"})
                assert (status, err["code"], err["retry"]) == (500, "unknown_error", True)
                status, err = api.call("GET", "/apps")
                assert (status, err["retry"]) == (500, True)
            finally:
                pg.start()
            deadline = time.monotonic() + 30
            while True:
                status, out = api.call("POST", "/apps", {"name": "after"})
                if status == 200:
                    break
                assert out["retry"] is True
                assert time.monotonic() < deadline, out
                time.sleep(0.5)
            # the same process serves, and its event listener came back by itself
            assert ctl.proc.poll() is None
            seen = []
            while not seen or seen[-1] != "after":
                seen.append(stream.next()["data"]["name"])
            assert "during" not in seen
        names = [a["name"] for a in api.ok("GET", "/apps")]
        assert "during" not in names and {"before", "after"} <= set(names)


# --- jobs as the scheduler reports them ---------------------------------------------------------
def test_job_reports_move_forward_with_one_event_per_state(api: API) -> None:
    app = new_app(api, "jobbed")
    release = deployable_release(api)
    job_id = "hostA-7d3ab6e2-1e4b-4c8f-9d61-0a9f4e0c2b11"
    path = f"/apps/jobbed/jobs/{job_id}"
    meta = {"flynn-controller.app": app["id"], "user-key": "v"}
    body = {"release": release["id"], "type": "web", "state": "starting", "meta": meta}
    job = api.ok("PUT", path, body)
    assert (job["id"], job["type"], job["state"], job["meta"]) == (
        job_id,
        "web",
        "starting",
        {"user-key": "v"},
    )
    api.ok("PUT", path, {"state": "up"})
    api.ok("PUT", path, {"state": "up"})  # a repeated report: no second event
    status, err = api.call("PUT", path, {"state": "starting"})
    assert (status, err["detail"]) == (400, {"field": "state"})
    done = api.ok("PUT", path, {"state": "down", "exit_status": 0})
    assert (done["state"], done["exit_status"], done["release"]) == ("down", 0, release["id"])
    events = api.events(f"app_id=jobbed&object_types=job&object_id={job_id}")
    assert [e["data"]["state"] for e in reversed(events)] == ["starting", "up", "down"]
    assert api.ok("GET", path)["state"] == "down"
    assert [j["id"] for j in api.ok("GET", "/apps/jobbed/jobs")] == [job_id]
    # ids carry their host; another app cannot take a job over; an unknown id is a bare 404
    status, err = api.call("PUT", "/apps/jobbed/jobs/nohost", {"state": "up"})
    assert (status, err["detail"]) == (400, {"field": "id"})
    new_app(api, "thief")
    status, err = api.call("PUT", f"/apps/thief/jobs/{job_id}", {"state": "down"})
    assert (status, err["detail"]) == (400, {"field": "id"})
    assert api.call("GET", "/apps/jobbed/jobs/hostA-unknown")[0] == 404
