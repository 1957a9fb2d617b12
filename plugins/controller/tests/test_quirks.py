"""The 2015 controller's quirks the CLI depends on (§1, §7 and §10 of the compatibility map),
one test each, on real controller processes sharing one PostgreSQL database.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from controller_http import Api, FakeProvider, Response, request
from sse_client import SSEStream

from flynn_host.dev.controller import ControllerProcess, PGServer, controller_process

KEEPALIVE = 0.5  # seconds, given as SSE_KEEPALIVE to the keep-alive test's controller
RELEASE = {"env": {"A": "1"}, "processes": {"web": {"cmd": ["start", "web"]}}}


def new_app(api: Api, **fields: Any) -> dict[str, Any]:
    app: dict[str, Any] = api.ok("POST", "/apps", {"name": f"q-{uuid.uuid4().hex[:10]}", **fields})
    return app


def new_release(api: Api, **fields: Any) -> dict[str, Any]:
    artifact = api.ok("POST", "/artifacts", {"type": "docker", "uri": "https://r.test?name=x"})
    release: dict[str, Any] = api.ok(
        "POST", "/releases", {"artifact": artifact["id"], **RELEASE, **fields}
    )
    return release


def new_provider(api: Api, provider: FakeProvider) -> dict[str, Any]:
    body = {"name": f"p-{uuid.uuid4().hex[:8]}", "url": provider.new_url()}
    created: dict[str, Any] = api.ok("POST", "/providers", body)
    return created


def assert_bare(r: Response, status: int, what: str) -> None:
    """A bare error: the status, no body, no JSON content type (the CLI's ErrNotFound test)."""
    assert r.status == status, f"{what}: {r}"
    assert r.body == b"", f"{what}: a bare {status} has no body: {r}"
    assert "json" not in (r.content_type or ""), f"{what}: a bare {status} is not JSON: {r}"


def assert_error(r: Response, status: int, code: str, what: str) -> dict[str, Any]:
    """Flynn's error JSON: `{"code","message","retry"[,"detail"]}`, JSON content type."""
    assert r.status == status, f"{what}: {r}"
    assert (r.content_type or "").startswith("application/json"), f"{what}: {r}"
    err: dict[str, Any] = r.json()
    assert set(err) - {"detail"} == {"code", "message", "retry"}, f"{what}: {err}"
    assert err["code"] == code and isinstance(err["message"], str), f"{what}: {err}"
    assert err["retry"] is False, f"{what}: {err}"
    return err


def max_event_id(api: Api) -> int:
    events = api.ok("GET", "/events?count=1", headers={"Accept": "application/json"})
    return int(events[0]["id"]) if events else 0


@pytest.fixture(scope="module")
def second(pg: PGServer, controller: ControllerProcess) -> Iterator[Api]:
    """Another controller process on the same database."""
    with controller_process(pg) as ctl:
        yield Api(ctl)


# --- success is exactly 200 --------------------------------------------------------------


def test_success_is_always_200_including_deletes(api: Api, provider: FakeProvider) -> None:
    app = new_app(api)
    release = new_release(api)
    api.ok("PUT", f"/apps/{app['id']}/release", {"id": release["id"]})
    api.ok("PUT", f"/apps/{app['id']}/formations/{release['id']}", {"processes": {"web": 1}})
    route = api.ok(
        "POST",
        f"/apps/{app['id']}/routes",
        {"type": "http", "service": "x-web", "domain": f"{app['name']}.example.test"},
    )
    p = new_provider(api, provider)
    res = api.ok("POST", f"/providers/{p['id']}/resources", {"apps": [app["id"]], "config": {}})
    for method, path in [
        ("DELETE", f"/apps/{app['id']}/routes/http/{route['id']}"),
        ("DELETE", f"/apps/{app['id']}/formations/{release['id']}"),
        ("DELETE", f"/providers/{p['id']}/resources/{res['id']}"),
        ("DELETE", f"/apps/{app['id']}"),
    ]:
        r = api(method, path)
        assert r.status == 200, f"{method} {path}: {r}"


# --- not found is a bare 404 ---------------------------------------------------------------


def test_not_found_is_a_bare_404(api: Api) -> None:
    app = new_app(api)
    missing = str(uuid.uuid4())
    for path in [
        f"/apps/{missing}",
        "/apps/no-such-app",
        f"/releases/{missing}",
        f"/apps/{app['id']}/release",  # no current release yet
        f"/apps/{app['id']}/formations/{missing}",
        f"/artifacts/{missing}",
        f"/providers/{missing}",
        "/providers/no-such-provider",
    ]:
        assert_bare(api("GET", path), 404, f"GET {path}")


# --- empty lists -------------------------------------------------------------------------


def test_empty_lists_are_empty_arrays(api: Api, provider: FakeProvider) -> None:
    app = new_app(api, meta={"flynn-system-app": "true"})  # a system app gets no default route
    p = new_provider(api, provider)
    for path in [
        f"/apps/{app['id']}/resources",
        f"/apps/{app['id']}/formations",
        f"/apps/{app['id']}/releases",
        f"/apps/{app['id']}/deployments",
        f"/apps/{app['id']}/routes",
        f"/providers/{p['id']}/resources",
    ]:
        r = api("GET", path)
        assert r.status == 200 and r.body.strip() == b"[]", f"GET {path}: {r}"


# --- app meta ----------------------------------------------------------------------------


def test_app_meta_is_an_empty_object(api: Api) -> None:
    plain = new_app(api)
    nulled = new_app(api, meta=None)
    for app in (plain, nulled):
        assert app["meta"] == {}, app
        assert api.ok("GET", f"/apps/{app['id']}")["meta"] == {}
        # an update with "meta": null leaves meta alone (and still shows {})
        assert api.ok("POST", f"/apps/{app['id']}", {"meta": None})["meta"] == {}
    listed = {a["id"]: a for a in api.ok("GET", "/apps")}
    assert listed[plain["id"]]["meta"] == {} and listed[nulled["id"]]["meta"] == {}
    meta = {"bread": "with hemp"}
    assert api.ok("POST", f"/apps/{plain['id']}", {"meta": meta})["meta"] == meta
    assert api.ok("POST", f"/apps/{plain['id']}", {"meta": None})["meta"] == meta


# --- server-sent events ------------------------------------------------------------------


def test_sse_framing(api: Api) -> None:
    start = max_event_id(api)
    with SSEStream(api.url, "/events", key=api.key, last_event_id=start) as s:
        # the status line and headers come before any event exists
        s.open(timeout=3)
        assert s.status == 200, s.headers
        assert s.headers.get("content-type") == "text/event-stream; charset=utf-8", s.headers
        assert s.read_items(timeout=0.5) == [], "an event nobody made"
        made = [new_app(api) for _ in range(3)]
        events = []  # strict parse: read_items raises on bad framing
        deadline = time.monotonic() + 5
        while len([e for e in events if e.data["object_type"] == "app"]) < 3:
            assert time.monotonic() < deadline, f"3 app events expected: {s.raw_body!r}"
            events += s.read_items(count=1, timeout=deadline - time.monotonic())
        events += s.read_items(timeout=0.3)
    app_events = [e.data for e in events if e.data.get("object_type") == "app"]
    assert [e["object_id"] for e in app_events] == [a["id"] for a in made]
    assert b"\r" not in s.raw_body
    # exactly `data: <json>\n\n` per event, nothing else (no id:/event: lines, no blank lines)
    expected = b"".join(b"data: " + e.raw + b"\n\n" for e in events)
    assert s.raw_body.replace(b":\n", b"") == expected, s.raw_body[:1000]
    for e in app_events:
        assert set(e) <= {"id", "app", "object_type", "object_id", "data", "created_at"}, e
        assert e["data"]["id"] == e["object_id"], e


def test_sse_keepalive_is_a_lone_comment_line(pg: PGServer, controller: ControllerProcess) -> None:
    with (
        controller_process(pg, env={"SSE_KEEPALIVE": str(KEEPALIVE)}) as ctl,
        SSEStream(ctl.url, "/events", key=ctl.key, last_event_id=max_event_id(Api(ctl))) as s,
    ):
        s.open(timeout=3)
        assert s.status == 200
        comments = s.read_items(count=2, timeout=KEEPALIVE * 3 + 2, kinds=("comment",))
    assert len(comments) == 2, (
        f"no keep-alives within {KEEPALIVE * 3 + 2} s with SSE_KEEPALIVE={KEEPALIVE}: "
        f"{s.raw_body!r}"
    )
    # `:\n` and nothing else: a blank line after it would be an empty message to the CLI
    assert s.raw_body == b":\n" * (s.raw_body.count(b":\n")), s.raw_body


def test_last_event_id_resumes_without_gap_or_duplicate(api: Api) -> None:
    new_app(api)  # so that `start` > 0: Last-Event-Id 0 means "no replay"
    start = max_event_id(api)
    path = "/events?object_types=app"
    first_apps = [new_app(api) for _ in range(6)]
    with SSEStream(api.url, path, key=api.key, last_event_id=start) as s:
        s.open()
        assert s.status == 200
        first = s.read_items(count=3, timeout=5)
    assert len(first) >= 3
    last = first[-1].data["id"]
    later_apps = [new_app(api) for _ in range(4)]
    with SSEStream(api.url, path, key=api.key, last_event_id=last) as s:
        s.open()
        assert s.status == 200
        rest = s.read_items(count=10 - len(first), timeout=5)
        rest += s.read_items(timeout=0.5)  # nothing more may come
    got = [e.data["id"] for e in first + rest]
    listed = api.ok(
        "GET", f"/events?object_types=app&since_id={start}", headers={"Accept": "application/json"}
    )
    expected = sorted(e["id"] for e in listed if e["id"] > start)
    assert got == expected, f"first {[e.data['id'] for e in first]}, then {got[len(first) :]}"
    assert [e.data["object_id"] for e in first + rest] == [a["id"] for a in first_apps + later_apps]


def test_event_reaches_subscriber_of_another_process(api: Api, second: Api) -> None:
    with SSEStream(
        second.url, "/events?object_types=app", key=second.key, last_event_id=max_event_id(api)
    ) as s:
        s.open()
        assert s.status == 200
        app = new_app(api)  # through the first process
        events = s.read_items(count=1, timeout=5)
    assert [e.data["object_id"] for e in events] == [app["id"]], events


def test_events_unknown_app_is_a_bare_404(api: Api) -> None:
    for app_id in ["no-such-app", str(uuid.uuid4())]:
        with SSEStream(api.url, f"/events?app_id={app_id}", key=api.key, last_event_id=0) as s:
            s.open()
            body = s.read_body(timeout=0.3)
        assert s.status == 404, (s.status, s.headers)
        assert body == b"" and "json" not in s.headers.get("content-type", ""), (s.headers, body)


# --- artifacts and releases ----------------------------------------------------------------


def test_artifact_dedup_by_type_and_uri(api: Api) -> None:
    uri = f"https://registry.test?name=flynn/x&id={uuid.uuid4().hex}"
    a = api.ok("POST", "/artifacts", {"type": "docker", "uri": uri})
    b = api.ok("POST", "/artifacts", {"type": "docker", "uri": uri})
    assert a["id"] == b["id"], (a, b)
    c = api.ok("POST", "/artifacts", {"type": "docker", "uri": uri + "0"})
    assert c["id"] != a["id"]
    assert [x["id"] for x in api.ok("GET", "/artifacts")].count(a["id"]) == 1


def test_client_supplied_release_id_is_kept(api: Api) -> None:
    rid = str(uuid.uuid4())
    release = new_release(api, id=rid)
    assert release["id"] == rid
    assert api.ok("GET", f"/releases/{rid}")["id"] == rid


# --- auth -------------------------------------------------------------------------------


def _concrete(path: str) -> str:
    """An OpenAPI path template with its `{params}` filled in."""
    out = []
    for part in path.split("/"):
        if part.startswith("{") and part.endswith("}"):
            part = "http" if "type" in part else str(uuid.uuid4())
        out.append(part)
    return "/".join(out)


def test_every_route_but_ping_needs_the_key(api: Api) -> None:
    spec = api.ok("GET", "/openapi.json")
    assert request(api.url, "GET", "/ping", key=None).status == 200
    operations = [
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch", "head")
    ]
    assert len(operations) > 20, operations
    operations.append(("GET", "/openapi.json"))
    for method, path in operations:
        if (method, path) == ("GET", "/ping"):
            continue
        url = _concrete(path)
        for key, what in [(None, "no key"), ("wrong-key", "a wrong key"), ("", "an empty key")]:
            r = request(api.url, method, url, {} if method in ("POST", "PUT") else None, key=key)
            assert_bare(r, 401, f"{method} {url} with {what}")


def test_key_in_query_only_for_event_streams(api: Api) -> None:
    q = f"key={api.key}"
    with SSEStream(api.url, f"/events?{q}", key=None, last_event_id=max_event_id(api)) as s:
        s.open()
        assert s.status == 200, s.headers
    assert_bare(request(api.url, "GET", f"/apps?{q}", key=None), 401, "GET /apps?key=")
    assert_bare(
        request(api.url, "GET", f"/events?{q}", key=None, headers={"Accept": "application/json"}),
        401,
        "GET /events?key= listing",
    )
    with SSEStream(api.url, "/events?key=wrong", key=None, last_event_id=0) as s:
        s.open()
        assert s.status == 401, s.headers


# --- errors ------------------------------------------------------------------------------


def test_bad_json_is_a_syntax_error(api: Api) -> None:
    app = new_app(api)
    for method, path in [
        ("POST", "/apps"),
        ("POST", "/releases"),
        ("POST", "/artifacts"),
        ("POST", "/providers"),
        ("POST", f"/apps/{app['id']}"),
        ("PUT", f"/apps/{app['id']}/release"),
        ("POST", f"/apps/{app['id']}/routes"),
    ]:
        err = assert_error(api(method, path, b'{"name": '), 400, "syntax_error", f"{method} {path}")
        assert err["message"] == "The provided JSON input is invalid", err


def test_validation_error_names_the_field(api: Api) -> None:
    for path, body, field in [
        ("/apps", {"name": "Not Valid"}, "name"),
        ("/apps", {"strategy": "sideways"}, "strategy"),
        ("/artifacts", {"type": "tarball", "uri": "https://x.test/a"}, "type"),
        ("/releases", {"env": {"A": 1}}, "env"),
    ]:
        err = assert_error(api("POST", path, body), 400, "validation_error", f"POST {path} {body}")
        assert err.get("detail", {}).get("field", "").split(".")[0] == field, err
        assert field in err["message"], err


def test_duplicate_app_name_is_object_exists(api: Api) -> None:
    app = new_app(api)
    r = api("POST", "/apps", {"name": app["name"]})
    assert_error(r, 409, "object_exists", "a second app of one name")


# --- found by the fuzz: kept as plain reproductions -------------------------------------------


def test_unknown_object_types_match_nothing(api: Api) -> None:
    new_app(api)
    r = api("GET", "/events?object_types=no-such-type", headers={"Accept": "application/json"})
    assert r.status == 200 and r.json() == [], str(r)


def test_nul_characters_are_a_client_error(api: Api) -> None:
    """PostgreSQL cannot store U+0000 in text or jsonb: a request carrying one is the client's
    error (400 validation_error, or a bare 404 for a lookup), never a 500."""
    for path, body, field in [
        ("/apps", {"meta": {"k": "a\u0000b"}}, "meta"),
        ("/releases", {"env": {"A": "a\u0000b"}}, "env"),
        ("/providers", {"name": "p\u0000", "url": "http://127.0.0.1:1/databases"}, "name"),
    ]:
        err = assert_error(api("POST", path, body), 400, "validation_error", f"POST {path} {body}")
        assert err.get("detail", {}).get("field", "").split(".")[0] == field, err
    assert_bare(api("GET", "/apps/%00"), 404, "GET /apps/%00")
    r = api("GET", "/events?app_id=%00", headers={"Accept": "application/json"})
    assert_bare(r, 404, "GET /events?app_id=%00")


def test_a_stream_that_fails_after_its_headers_ends_with_an_sse_error(api: Api) -> None:
    """Once the 200 and its headers are out, a failure can only end the stream with
    `event: error` (which the CLI surfaces, then resumes); a second HTTP response inside the
    chunked body is garbage to every client. A Last-Event-Id beyond bigint is one such failure
    (a JSON 400 before the stream starts is fine too)."""
    with SSEStream(api.url, "/events", key=api.key, last_event_id=10**20) as s:
        s.open()
        if s.status != 200:
            assert s.status == 400 and "json" in s.headers.get("content-type", ""), s.headers
            return
        items = s.read_items(timeout=1, kinds=("event", "error", "comment"))
    assert [i.kind for i in items] in ([], ["error"]), items
