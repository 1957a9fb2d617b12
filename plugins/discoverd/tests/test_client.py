"""The discoverd client against `FakeDiscoverd`, a test double of discoverd's HTTP API written
here (the few paths the client uses, with Flynn's JSON and error format:
docs/discoverd.md#http-api), served by aiohttp on loopback. The real server has its own tests,
and `test_client_reconnect.py` watches it through cuts and restarts. Heartbeats are checked
against the delays the heartbeater chose (`RecordedTiming`), not against the wall clock of a
possibly busy machine."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import pytest
from aiohttp import web
from flynn_discoverd.client import (
    DEFAULT_URL,
    Client,
    DiscoverdError,
    Heartbeater,
    HeartbeatTiming,
    NotFoundError,
    ObjectExistsError,
    PreconditionFailedError,
    UnreachableError,
)
from flynn_discoverd.types import Event, Instance, ServiceMeta, instance_id

from flynn_host.dev.host import wait_for_async
from flynn_host.errors import ValidationError

FAST = HeartbeatTiming(
    interval=0.2, jitter=0.1, failing_min=0.02, failing_max=0.04, register_timeout=2.0
)


@dataclass(frozen=True)
class RecordedTiming(HeartbeatTiming):
    """FAST's timing, keeping each delay the heartbeater chose: (failing?, seconds)."""

    interval: float = 0.2
    jitter: float = 0.1
    failing_min: float = 0.02
    failing_max: float = 0.04
    register_timeout: float = 2.0
    delays: list[tuple[bool, float]] = field(default_factory=list)

    def next_delay(self, failing: bool) -> float:
        delay = super().next_delay(failing)
        self.delays.append((failing, delay))
        return delay


def early(puts: list[float], delays: list[tuple[bool, float]]) -> list[float]:
    """The gaps between PUTs shorter than the delay chosen before them: none, as a sleep is
    never shorter (a busy machine only makes it longer, which no test here minds)."""
    gaps = [b - a for a, b in pairwise(puts)]
    return [gap for gap, (_, d) in zip(gaps, delays, strict=False) if gap < d - 0.005]


def error(status: int, code: str, message: str) -> web.Response:
    body = {"code": code, "message": message, "retry": False}
    return web.json_response(body, status=status)


class FakeDiscoverd:
    """Test double of discoverd's HTTP API: in-memory services, instances (leader = lowest
    index), CAS meta and the SSE event stream. `fail_puts` makes the next N instance PUTs
    answer 500; `drop_streams()` cuts every open event stream."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[float, str, str, Any]] = []
        self.fail_puts = 0
        self.unavailable = 0  # answer the next N requests with 503
        self.streams: list[asyncio.Queue[str | None]] = []
        self.stream_errors = 0  # the next N streams send `event: error` and close
        self.stream_count = 0
        self.next_index = 1
        self.url = ""
        self._runner: web.AppRunner | None = None
        app = web.Application(middlewares=[self._record])
        r = app.router
        r.add_put("/services/{s}", self.put_service)
        r.add_delete("/services/{s}", self.delete_service)
        r.add_get("/services/{s}", self.stream)
        r.add_get("/services/{s}/instances", self.get_instances)
        r.add_put("/services/{s}/instances/{id}", self.put_instance)
        r.add_delete("/services/{s}/instances/{id}", self.delete_instance)
        r.add_get("/services/{s}/leader", self.get_leader)
        r.add_put("/services/{s}/leader", self.put_leader)
        r.add_get("/services/{s}/meta", self.get_meta)
        r.add_put("/services/{s}/meta", self.put_meta)
        self.app = app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.drop_streams()
        if self._runner:
            await self._runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append((time.monotonic(), request.method, request.path, body))
        if self.unavailable > 0:
            self.unavailable -= 1
            return error(503, "service_unavailable", "no raft leader")
        return await handler(request)

    def calls(self, method: str, path: str) -> list[tuple[float, Any]]:
        return [(t, b) for t, m, p, b in self.requests if m == method and p == path]

    # ---- state and events ----

    def service(self, request: web.Request) -> dict[str, Any] | None:
        return self.services.get(request.match_info["s"])

    def leader_of(self, svc: dict[str, Any]) -> Instance | None:
        if svc["leader_type"] == "manual":
            return svc["instances"].get(svc["leader"])
        return min(svc["instances"].values(), key=lambda i: i.index, default=None)

    def publish(self, event: Event) -> None:
        for q in self.streams:
            q.put_nowait(json.dumps(event.to_json(), indent=1))  # multi-line `data:`

    def drop_streams(self) -> None:
        for q in self.streams:
            q.put_nowait(None)

    def add(self, service: str, addr: str) -> Instance:
        """Register directly (not through the API), publishing `up` as discoverd would."""
        inst = Instance(addr=addr, index=self.next_index)
        self.next_index += 1
        self.services[service]["instances"][inst.id] = inst
        self.publish(Event(service, "up", inst))
        return inst

    # ---- handlers ----

    async def put_service(self, request: web.Request) -> web.Response:
        name = request.match_info["s"]
        if name in self.services:
            return error(409, "object_exists", f"service {name} already exists")
        cfg = await request.json()
        self.services[name] = {
            "leader_type": cfg.get("leader_type", "oldest"),
            "instances": {},
            "meta": None,
            "leader": None,
        }
        return web.Response()

    async def delete_service(self, request: web.Request) -> web.Response:
        if self.services.pop(request.match_info["s"], None) is None:
            return error(404, "not_found", "service not found")
        return web.Response()

    async def get_instances(self, request: web.Request) -> web.Response:
        svc = self.service(request)
        if svc is None:
            return error(404, "not_found", "service not found")
        return web.json_response([i.to_json() for i in svc["instances"].values()])

    async def put_instance(self, request: web.Request) -> web.Response:
        if self.fail_puts > 0:
            self.fail_puts -= 1
            return error(500, "unknown_error", "boom")
        svc = self.service(request)
        if svc is None:
            return error(404, "not_found", "service not found")
        try:
            inst = Instance.from_json(await request.json(), request.match_info["id"])
        except ValidationError as e:
            return web.json_response(e.to_json(), status=400)
        old = svc["instances"].get(inst.id)
        inst.index = old.index if old else self.next_index
        self.next_index += old is None
        svc["instances"][inst.id] = inst
        return web.Response()

    async def delete_instance(self, request: web.Request) -> web.Response:
        svc = self.service(request)
        if svc is None or svc["instances"].pop(request.match_info["id"], None) is None:
            return error(404, "not_found", "instance not found")
        return web.Response()

    async def get_leader(self, request: web.Request) -> web.Response:
        svc = self.service(request)
        leader = self.leader_of(svc) if svc else None
        if leader is None:
            return error(404, "not_found", "no leader found")
        return web.json_response(leader.to_json())

    async def put_leader(self, request: web.Request) -> web.Response:
        svc = self.service(request)
        if svc is None:
            return error(404, "not_found", "service not found")
        svc["leader"] = (await request.json())["id"]
        return web.Response()

    async def get_meta(self, request: web.Request) -> web.Response:
        svc = self.service(request)
        if svc is None or svc["meta"] is None:
            return error(404, "not_found", "service meta not found")
        return web.json_response(svc["meta"].to_json())

    async def put_meta(self, request: web.Request) -> web.Response:
        svc = self.service(request)
        if svc is None:
            return error(404, "not_found", "service not found")
        meta = ServiceMeta.from_json(await request.json())
        cur = svc["meta"]
        if meta.index == 0 and cur is not None:
            return error(409, "object_exists", "service metadata already exists")
        if meta.index != 0 and (cur is None or cur.index != meta.index):
            return error(412, "precondition_failed", "service metadata index mismatch")
        stored = ServiceMeta(data=meta.data, index=self.next_index)
        self.next_index += 1
        svc["meta"] = stored
        if meta.leader_id:
            svc["leader"] = meta.leader_id
        return web.json_response(stored.to_json())

    async def stream(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["s"]
        svc = self.services.get(name)
        if svc is None:
            return error(404, "not_found", "service not found")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        self.stream_count += 1
        if self.stream_errors > 0:
            self.stream_errors -= 1
            await resp.write(b"event: error\ndata: raft leader lost\n\n")
            return resp
        await resp.write(b"data: {not json\n\n")  # a malformed event is skipped
        q: asyncio.Queue[str | None] = asyncio.Queue()
        for inst in svc["instances"].values():
            q.put_nowait(json.dumps(Event(name, "up", inst).to_json()))
        leader = self.leader_of(svc)
        q.put_nowait(json.dumps(Event(name, "leader", leader).to_json()))
        if svc["meta"] is not None:
            q.put_nowait(
                json.dumps(Event(name, "service_meta", service_meta=svc["meta"]).to_json())
            )
        q.put_nowait(json.dumps({"service": name, "kind": "current"}))
        self.streams.append(q)
        try:
            await resp.write(b":\n")  # a keep-alive comment first
            while (item := await q.get()) is not None:
                lines = "".join(f"data: {line}\n" for line in item.splitlines())
                await resp.write((lines + "\n").encode())
        finally:
            self.streams.remove(q)
        return resp


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscoverd]:
    f = FakeDiscoverd()
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def client(fake: FakeDiscoverd) -> AsyncIterator[Client]:
    c = Client([fake.url], reconnect_delay=0.05)
    yield c
    await c.close()


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connection refused


# ---- configuration ---------------------------------------------------------------------------


def test_urls_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISCOVERD", raising=False)
    assert Client().urls == [DEFAULT_URL] == ["http://127.0.0.1:1111"]
    monkeypatch.setenv("DISCOVERD", "http://10.0.0.1:1111, 10.0.0.2:1111/")
    assert Client().urls == ["http://10.0.0.1:1111", "http://10.0.0.2:1111"]
    assert Client(["http://x:1"]).urls == ["http://x:1"]


def test_heartbeat_timing_defaults() -> None:
    t = HeartbeatTiming()
    assert (t.interval, t.jitter, t.failing_min, t.failing_max) == (5.0, 2.0, 0.2, 0.4)
    assert t.register_timeout == 60.0
    ok = [t.next_delay(failing=False) for _ in range(2000)]
    failing = [t.next_delay(failing=True) for _ in range(2000)]
    assert 3.0 <= min(ok) < 3.2 and 4.8 < max(ok) <= 5.0
    assert 0.2 <= min(failing) < 0.22 and 0.38 < max(failing) <= 0.4


# ---- requests and errors ---------------------------------------------------------------------


async def test_services_meta_and_error_mapping(client: Client, fake: FakeDiscoverd) -> None:
    await client.add_service("web")
    with pytest.raises(ObjectExistsError) as exc:
        await client.add_service("web")
    assert exc.value.code == "object_exists" and exc.value.status == 409
    assert "already exists" in exc.value.message

    assert await client.get_meta("web") is None
    m = await client.set_meta("web", ServiceMeta(data={"a": 1}))
    assert m.index > 0 and m.data == {"a": 1}
    with pytest.raises(ObjectExistsError):
        await client.set_meta("web", ServiceMeta(data={"a": 2}, index=0))
    with pytest.raises(PreconditionFailedError) as pre:
        await client.set_meta("web", ServiceMeta(data={"a": 2}, index=m.index + 100))
    assert pre.value.code == "precondition_failed" and pre.value.status == 412
    m2 = await client.set_meta("web", ServiceMeta(data={"a": 2}, index=m.index))
    assert (await client.get_meta("web")) == m2

    assert await client.instances("web") == []
    assert await client.leader("web") is None
    await client.remove_service("web")
    with pytest.raises(NotFoundError):
        await client.remove_service("web")
    with pytest.raises(NotFoundError):
        await client.instances("web")


async def test_manual_leader(client: Client, fake: FakeDiscoverd) -> None:
    await client.add_service("pg", leader_type="manual")
    assert fake.services["pg"]["leader_type"] == "manual"
    a = await client.register("pg", "10.0.0.1:5432", timing=FAST)
    b = await client.register("pg", "10.0.0.2:5432", timing=FAST)
    assert await client.leader("pg") is None
    await client.set_leader("pg", b.instance)
    assert (await client.leader("pg")).addr == "10.0.0.2:5432"
    await client.set_meta("pg", ServiceMeta(data={}, leader_id=a.instance.id))
    assert fake.calls("PUT", "/services/pg/meta")[-1][1]["leader_id"] == a.instance.id
    assert (await client.leader("pg")).id == a.instance.id


async def test_validation_error_from_server(client: Client, fake: FakeDiscoverd) -> None:
    await client.add_service("web")
    bad = Instance(addr="10.0.0.1:80").to_json() | {"proto": "udp"}  # id no longer matches
    with pytest.raises(DiscoverdError) as exc:
        await client._request("PUT", f"/services/web/instances/{instance_id('tcp', '1')}", bad)
    assert exc.value.status == 400 and exc.value.code == "validation_error"


async def test_next_url_when_one_is_down(fake: FakeDiscoverd) -> None:
    fake.services["web"] = {"leader_type": "oldest", "instances": {}, "meta": None, "leader": 0}
    async with Client([dead_url(), fake.url]) as c:
        assert await c.instances("web") == []
        assert c._current == 1  # sticks to the one that answered
        fake.unavailable = 1  # a 503 from the only live server is passed on
        with pytest.raises(DiscoverdError) as exc:
            await c.instances("web")
        assert exc.value.status == 503
    async with Client([dead_url()]) as c:
        with pytest.raises(UnreachableError):
            await c.instances("web")


# ---- registration and heartbeats -------------------------------------------------------------


async def test_heartbeats_then_delete_on_close(client: Client, fake: FakeDiscoverd) -> None:
    await client.add_service("web")
    timing = RecordedTiming()
    hb = await client.register("web", "10.0.0.1:80", timing=timing)
    assert isinstance(hb, Heartbeater) and hb.addr == "10.0.0.1:80"
    path = f"/services/web/instances/{instance_id('tcp', '10.0.0.1:80')}"

    def puts() -> list[float]:
        return [t for t, _ in fake.calls("PUT", path)]

    await wait_for_async(lambda: len(puts()) >= 5, 10, "four heartbeats")
    # the registration, then a heartbeat after each delay chosen: 0.1–0.2 s while all is well
    assert timing.delays and all(not f and 0.1 <= d <= 0.2 for f, d in timing.delays)
    assert early(puts(), timing.delays) == []
    assert [i.addr for i in await client.instances("web")] == ["10.0.0.1:80"]

    beating = hb._task
    await hb.close()
    assert fake.requests[-1][1:3] == ("DELETE", path)
    assert beating is not None and beating.done()  # no heartbeat after close
    assert await client.instances("web") == []
    await hb.close()  # idempotent


async def test_heartbeat_retries_fast_while_failing(client: Client, fake: FakeDiscoverd) -> None:
    await client.add_service("web")
    timing = RecordedTiming()
    hb = await client.register("web", "10.0.0.1:80", timing=timing)
    fake.fail_puts = 3

    def puts() -> list[float]:
        return [t for t, _ in fake.calls("PUT", f"/services/web/instances/{hb.instance.id}")]

    # the registration, three failing heartbeats, and one that succeeds again
    await wait_for_async(lambda: len(puts()) >= 5 and not hb.failing, 10, "a heartbeat back")
    # a normal delay; after each failure a short one (0.02–0.04 s); normal ones once it works
    assert [f for f, _ in timing.delays[:5]] == [False, True, True, True, False]
    assert all(0.02 <= d <= 0.04 if f else 0.1 <= d <= 0.2 for f, d in timing.delays)
    assert early(puts(), timing.delays) == []
    await hb.close()


async def test_register_retries_until_discoverd_answers(fake: FakeDiscoverd) -> None:
    fake.services["web"] = {"leader_type": "oldest", "instances": {}, "meta": None, "leader": 0}
    fake.unavailable = 3
    async with Client([fake.url]) as c:
        hb = await c.register("web", "10.0.0.1:80", timing=FAST)
        assert len(fake.calls("PUT", f"/services/web/instances/{hb.instance.id}")) == 4
    # close() of the client deregistered it
    assert fake.requests[-1][1] == "DELETE"


async def test_register_gives_up(fake: FakeDiscoverd) -> None:
    timing = HeartbeatTiming(failing_min=0.02, failing_max=0.04, register_timeout=0.2)
    async with Client([dead_url()]) as c:
        with pytest.raises(UnreachableError):
            await c.register("web", "10.0.0.1:80", timing=timing)
    async with Client([fake.url]) as c:  # a 404 (no such service) is not retried
        with pytest.raises(NotFoundError):
            await c.register("nope", "10.0.0.1:80", timing=FAST)
        assert len(fake.requests) == 1


async def test_addr_expansion_and_env_meta(
    client: Client, fake: FakeDiscoverd, monkeypatch: pytest.MonkeyPatch
) -> None:
    await client.add_service("web")
    monkeypatch.setenv("EXTERNAL_IP", "10.9.8.7")
    env = {
        "FLYNN_APP_ID": "app1",
        "FLYNN_APP_NAME": "myapp",
        "FLYNN_RELEASE_ID": "rel1",
        "FLYNN_PROCESS_TYPE": "web",
        "FLYNN_JOB_ID": "host1-job1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    hb = await client.register("web", ":8080", meta={"extra": "x"}, timing=FAST)
    assert hb.addr == "10.9.8.7:8080"
    assert hb.instance.id == instance_id("tcp", "10.9.8.7:8080")
    (_, body), *_ = fake.calls("PUT", f"/services/web/instances/{hb.instance.id}")
    assert body["meta"] == env | {"extra": "x"}
    assert body["proto"] == "tcp"
    await hb.set_meta({"k": "v"})
    assert fake.calls("PUT", f"/services/web/instances/{hb.instance.id}")[-1][1]["meta"] == {
        "k": "v"
    }
    await hb.close()

    monkeypatch.delenv("EXTERNAL_IP")
    with pytest.raises(ValidationError, match="EXTERNAL_IP"):
        await client.register("web", ":8080", timing=FAST)


async def test_add_service_and_register(client: Client, fake: FakeDiscoverd) -> None:
    await client.add_service("web")
    async with await client.add_service_and_register("web", "10.0.0.1:80") as hb:
        assert hb.instance.id in fake.services["web"]["instances"]
    assert fake.services["web"]["instances"] == {}


# ---- watching --------------------------------------------------------------------------------


async def next_event(it: AsyncIterator[Event]) -> Event:
    return await asyncio.wait_for(anext(it), 5)


async def test_watch_current_state_then_changes(client: Client, fake: FakeDiscoverd) -> None:
    await client.add_service("web")
    a = fake.add("web", "10.0.0.1:80")
    await client.set_meta("web", ServiceMeta(data={"v": 1}))
    it = client.watch("web")
    kinds = [(e.kind, e.instance.addr if e.instance else None) for e in [await next_event(it)]]
    while kinds[-1][0] != "current":
        e = await next_event(it)
        kinds.append((e.kind, e.instance.addr if e.instance else None))
    assert kinds == [
        ("up", "10.0.0.1:80"),
        ("leader", "10.0.0.1:80"),
        ("service_meta", None),
        ("current", None),
    ]
    b = fake.add("web", "10.0.0.2:80")
    e = await next_event(it)
    assert (e.kind, e.instance) == ("up", b)
    assert e.instance.index > a.index
    await it.aclose()


async def test_watch_reconnects_and_reports_what_was_missed(
    client: Client, fake: FakeDiscoverd
) -> None:
    await client.add_service("web")
    a = fake.add("web", "10.0.0.1:80")
    b = fake.add("web", "10.0.0.2:80")
    it = client.watch("web", kinds=("up", "down", "update", "current", "leader"))
    got = [await next_event(it) for _ in range(4)]
    assert [e.kind for e in got] == ["up", "up", "leader", "current"]
    assert got[2].instance == a

    # while the stream is down: a leaves (b becomes leader), c arrives, b's meta changes (all
    # before the loop runs again, so before the watcher can reconnect)
    fake.drop_streams()
    del fake.services["web"]["instances"][a.id]
    c = fake.add("web", "10.0.0.3:80")
    b.meta = {"changed": "yes"}
    events = [await next_event(it) for _ in range(4)]
    summary = sorted((e.kind, e.instance.addr) for e in events)
    assert summary == [
        ("down", a.addr),
        ("leader", b.addr),
        ("up", c.addr),
        ("update", b.addr),
    ]
    # no second `current`, and live events flow again
    d = fake.add("web", "10.0.0.4:80")
    e = await next_event(it)
    assert (e.kind, e.instance) == ("up", d)
    await it.aclose()


async def test_watch_kinds_filter(client: Client, fake: FakeDiscoverd) -> None:
    await client.add_service("web")
    fake.add("web", "10.0.0.1:80")
    it = client.watch("web", kinds=["current"])
    assert (await next_event(it)).kind == "current"
    await it.aclose()


async def test_watch_unknown_service(client: Client) -> None:
    it = client.watch("nope")
    with pytest.raises(NotFoundError):
        await next_event(it)
    await it.aclose()


async def test_watch_skips_to_a_live_url(fake: FakeDiscoverd) -> None:
    fake.services["web"] = {"leader_type": "oldest", "instances": {}, "meta": None, "leader": 0}
    async with Client([dead_url(), fake.url], reconnect_delay=0.05) as c:
        it = c.watch("web")
        assert [(await next_event(it)).kind for _ in range(2)] == ["leader", "current"]
        await it.aclose()


async def test_watch_large_event_and_stream_error(client: Client, fake: FakeDiscoverd) -> None:
    await client.add_service("web")
    big = {"blob": "x" * 200_000}  # one `data:` line far beyond aiohttp's readline limit
    fake.services["web"]["meta"] = ServiceMeta(data=big, index=7)
    fake.stream_errors = 2  # two `event: error` answers before a good stream
    it = client.watch("web", kinds=["service_meta", "current"])
    e = await next_event(it)
    assert e.kind == "service_meta" and e.service_meta.data == big
    assert (await next_event(it)).kind == "current"
    assert fake.stream_count == 3
    await it.aclose()
