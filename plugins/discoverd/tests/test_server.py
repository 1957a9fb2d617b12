"""discoverd's HTTP API on real etcd: Flynn's paths, JSON, status codes and SSE, and a
3-member cluster that loses its etcd leader. How long a fail-over takes is a figure of
`bench/discoverd_failover.py`; here only that it happens, within generous deadlines."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from dnslib import DNSRecord
from flynn_discoverd.dns import DNSServer
from flynn_discoverd.etcd import EtcdClient, EtcdProcess
from flynn_discoverd.server import SHUTDOWN, make_app
from flynn_discoverd.store import Store
from flynn_discoverd.types import instance_id

from flynn_host.dev.host import free_ports, wait_for_async

SSE = {"Accept": "text/event-stream"}
Api = Any  # conftest.Api: url, http (a ClientSession), store


def instance(port: int, host: str = "10.0.0.1", **meta: str) -> dict[str, Any]:
    addr = f"{host}:{port}"
    return {"id": instance_id("tcp", addr), "addr": addr, "proto": "tcp", "meta": meta}


async def call(
    api: Api, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with api.http.request(method, api.url + path, data=data) as resp:
        assert resp.content_type == "application/json"
        assert int(resp.headers["Discoverd-Index"]) >= 0
        return resp.status, await resp.json()


async def register(api: Api, service: str, inst: dict[str, Any]) -> dict[str, Any]:
    status, body = await call(api, "PUT", f"/services/{service}/instances/{inst['id']}", inst)
    assert status == 200, body
    return body


class Stream:
    """An SSE response read event by event."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, within: float = 30.0) -> dict[str, Any]:
        async with asyncio.timeout(within):
            while True:
                line = await self.resp.content.readline()
                assert line, "stream ended"
                if line.startswith(b"data: "):
                    assert await self.resp.content.readline() == b"\n"
                    return json.loads(line[6:])

    async def kinds(self, n: int) -> list[tuple[str, str | None]]:
        out = []
        for _ in range(n):
            ev = await self.next()
            out.append((ev["kind"], (ev.get("instance") or {}).get("addr")))
        return out


async def open_stream(api: Api, path: str) -> Stream:
    resp = await api.http.get(api.url + path, headers=SSE)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    return Stream(resp)


async def test_services_api(api: Api) -> None:
    assert await call(api, "PUT", "/services/web") == (200, {"leader_type": "oldest"})
    status, body = await call(api, "PUT", "/services/web", {})
    assert (status, body["code"]) == (409, "object_exists")
    status, body = await call(api, "PUT", "/services/Bad_Name", {})
    assert (status, body["code"]) == (400, "validation_error")
    status, body = await call(api, "PUT", "/services/web%0A", {})  # `$` let a newline through
    assert (status, body["code"]) == (400, "validation_error")
    status, body = await call(api, "PUT", "/services/db", raw=b"{not json")
    assert (status, body["code"]) == (400, "syntax_error")
    status, body = await call(api, "PUT", "/services/db", {"leader_type": "random"})
    assert (status, body["detail"]) == (400, {"field": "leader_type"})
    status, body = await call(api, "GET", "/services/nope")
    assert (status, body["code"]) == (404, "not_found")
    assert (await call(api, "DELETE", "/services/web"))[0] == 200
    assert (await call(api, "DELETE", "/services/web"))[0] == 404
    status, body = await call(api, "GET", "/no/such/route")
    assert status == 404


async def test_instances_api(api: Api) -> None:
    await call(api, "PUT", "/services/web")
    a, b = instance(1), instance(2, role="r")
    status, body = await call(api, "GET", "/services/nope/instances")
    assert (status, body["code"]) == (404, "not_found")
    status, body = await call(api, "PUT", f"/services/nope/instances/{a['id']}", a)
    assert status == 404
    status, body = await call(api, "PUT", f"/services/web/instances/{b['id']}", a)
    assert (status, body["detail"]) == (400, {"field": "id"})
    status, body = await call(api, "PUT", f"/services/web/instances/{a['id']}", raw=b"[")
    assert (status, body["code"]) == (400, "syntax_error")
    bad = dict(a, proto="TCP!")
    status, body = await call(api, "PUT", f"/services/web/instances/{a['id']}", bad)
    assert (status, body["code"]) == (400, "validation_error")

    ra = await register(api, "web", a)
    rb = await register(api, "web", b)
    assert 0 < ra["index"] < rb["index"]
    assert (await register(api, "web", a))["index"] == ra["index"]  # heartbeat
    status, listed = await call(api, "GET", "/services/web/instances")
    assert status == 200
    assert listed == [ra, rb]
    assert api.store.ttl == 2  # tests shorten the TTL; the default is checked in test_store
    assert (await call(api, "DELETE", f"/services/web/instances/{a['id']}"))[0] == 200
    assert (await call(api, "DELETE", f"/services/web/instances/{a['id']}"))[0] == 404
    assert (await call(api, "GET", "/services/web/instances"))[1] == [rb]


async def test_leader_and_meta_api(api: Api) -> None:
    await call(api, "PUT", "/services/web")
    await call(api, "PUT", "/services/db", {"leader_type": "manual"})
    status, body = await call(api, "GET", "/services/web/leader")
    assert (status, body["message"]) == (404, "no leader found")
    a = await register(api, "web", instance(1))
    await register(api, "web", instance(2))
    assert (await call(api, "GET", "/services/web/leader")) == (200, a)
    status, body = await call(api, "PUT", "/services/web/leader", {"id": a["id"]})
    assert status == 400  # only manual services take a leader
    d1 = await register(api, "db", instance(5432))
    d2 = await register(api, "db", instance(5432, host="10.0.0.2"))
    assert (await call(api, "PUT", "/services/db/leader", {"id": d2["id"]}))[0] == 200
    assert (await call(api, "GET", "/services/db/leader")) == (200, d2)

    status, body = await call(api, "GET", "/services/db/meta")
    assert status == 404
    status, meta = await call(
        api, "PUT", "/services/db/meta", {"data": {"p": 1}, "index": 0, "leader_id": d1["id"]}
    )
    assert status == 200 and meta["data"] == {"p": 1} and meta["index"] > 0
    assert (await call(api, "GET", "/services/db/leader")) == (200, d1)
    assert (await call(api, "GET", "/services/db/meta")) == (200, meta)
    status, body = await call(api, "PUT", "/services/db/meta", {"data": 2, "index": 0})
    assert (status, body["code"]) == (409, "object_exists")
    status, body = await call(
        api, "PUT", "/services/db/meta", {"data": 2, "index": meta["index"] + 1}
    )
    assert (status, body["code"]) == (412, "precondition_failed")
    status, new = await call(api, "PUT", "/services/db/meta", {"data": 2, "index": meta["index"]})
    assert status == 200 and new["index"] > meta["index"]
    status, body = await call(api, "PUT", "/services/db/meta", {"data": 2, "index": -1})
    assert status == 400


async def test_event_streams(api: Api) -> None:
    await call(api, "PUT", "/services/web")
    a = await register(api, "web", instance(1))
    await call(api, "PUT", "/services/web/meta", {"data": "m", "index": 0})
    everything = await open_stream(api, "/services/web")
    insts = await open_stream(api, "/services/web/instances")
    leaders = await open_stream(api, "/services/web/leader")
    try:
        assert await everything.kinds(4) == [
            ("up", a["addr"]),
            ("leader", a["addr"]),
            ("service_meta", None),
            ("current", None),
        ]
        assert await insts.kinds(1) == [("up", a["addr"])]
        assert await leaders.kinds(1) == [("leader", a["addr"])]

        b = await register(api, "web", instance(2))
        await register(api, "web", instance(2, v="2"))
        await call(api, "DELETE", f"/services/web/instances/{a['id']}")
        for port in range(10, 20):
            await register(api, "web", instance(port))
        ups = [("up", f"10.0.0.1:{p}") for p in range(10, 20)]
        assert await everything.kinds(14) == [
            ("up", b["addr"]),
            ("update", b["addr"]),
            ("down", a["addr"]),
            ("leader", b["addr"]),
            *ups,
        ]
        assert await insts.kinds(13) == [
            ("up", b["addr"]),
            ("update", b["addr"]),
            ("down", a["addr"]),
            *ups,
        ]
        assert await leaders.kinds(1) == [("leader", b["addr"])]
    finally:
        for s in (everything, insts, leaders):
            s.resp.close()


async def test_process_endpoints(make_store, make_api, etcd_member: EtcdProcess) -> None:  # type: ignore[no-untyped-def]
    store = make_store(node_name=etcd_member.name, advertise="127.0.0.1:1111")
    await store.start()
    api = await make_api(store)
    assert (await call(api, "GET", "/ping"))[0] == 200
    status, body = await call(api, "GET", "/.well-known/status")
    assert (status, body["data"]["status"]) == (200, "healthy")
    assert await call(api, "GET", "/raft/leader") == (200, {"host": "127.0.0.1:1111"})
    assert await call(api, "GET", "/raft/peers") == (200, ["127.0.0.1:1111"])
    status, body = await call(api, "DELETE", "/raft/peers/10.9.9.9:1111")
    assert status == 404
    status, body = await call(api, "POST", "/shutdown")
    assert status == 200 and body["last_index"] > 0


def test_make_app_is_constructible() -> None:
    app = make_app(Store(EtcdClient(["http://127.0.0.1:1"])))
    assert not app[SHUTDOWN].is_set()


# --- a 3-member cluster -----------------------------------------------------------------------


async def retry(api: Api, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Calls until it succeeds (or 30 s pass): the last status and body."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        status, got = await call(api, method, path, body)
        if status == 200 or loop.time() > deadline:
            return status, got
        await asyncio.sleep(0.05)


async def test_cluster_survives_losing_etcd_leader(
    etcd_cluster: list[EtcdProcess],
    make_api,  # type: ignore[no-untyped-def]
) -> None:
    urls = [m.client_url for m in etcd_cluster]
    apis = []
    dns_servers: list[DNSServer] = []
    for i, member in enumerate(etcd_cluster):
        # each node prefers its own member and falls back to the others
        client = EtcdClient(urls[i:] + urls[:i])
        store = Store(client, ttl=10, node_name=member.name, advertise=f"127.0.0.{i + 1}:1111")
        await store.start()
        apis.append(await make_api(store))
        dns = DNSServer(store, recursors=[])
        await dns.start("127.0.0.1", 0)
        dns_servers.append(dns)
    try:
        await call(apis[0], "PUT", "/services/web")
        a = await register(apis[0], "web", instance(1))
        status, listed = await call(apis[2], "GET", "/services/web/instances")
        assert (status, listed) == (200, [a])  # written through node 1, read through node 3
        peers = (await call(apis[1], "GET", "/raft/peers"))[1]
        assert sorted(peers) == ["127.0.0.1:1111", "127.0.0.2:1111", "127.0.0.3:1111"]

        # acknowledged writes, then SIGKILL the etcd leader
        acked = [a] + [await register(apis[i % 3], "web", instance(100 + i)) for i in range(9)]
        meta = (await call(apis[1], "PUT", "/services/web/meta", {"data": 1, "index": 0}))[1]
        status, leader = await call(apis[0], "GET", "/raft/leader")
        assert status == 200
        dead = int(leader["host"].split(":")[0].rsplit(".", 1)[1]) - 1
        streams = [await open_stream(node, "/services/web/instances") for node in apis]
        for st in streams:
            assert len(await st.kinds(len(acked))) == len(acked)
        etcd_cluster[dead].kill()
        alive = [apis[i] for i in range(3) if i != dead]

        # writes and reads resume (a CAS on the acknowledged meta: nothing was lost)
        status, body = await retry(alive[0], "PUT", "/services/web/meta", {
            "data": 2, "index": meta["index"]
        })  # fmt: skip
        assert status == 200, body
        status, _ = await retry(alive[1], "GET", "/services/web/instances")
        assert status == 200
        late = await register(alive[1], "web", instance(999, host="10.9.9.9"))
        # DNS on the surviving nodes answers too, the new instance included
        ip = late["addr"].rsplit(":", 1)[0]
        for i in range(3):
            if i != dead:

                async def answers(port: int = dns_servers[i].port) -> bool:
                    return ip in await dns_ips(port)

                await wait_for_async(answers, 30, f"node {i + 1}'s DNS answering {ip}")
        # every watcher, the one on the dead member's node too, sees the next event: no gap
        for st in streams:
            assert await st.kinds(1) == [("up", late["addr"])]
            st.resp.close()
        for node in alive:
            listed = (await call(node, "GET", "/services/web/instances"))[1]
            assert listed == sorted(acked + [late], key=lambda i: i["index"])
            assert (await call(node, "GET", "/services/web/meta"))[1]["data"] == 2
            status, body = await call(node, "GET", "/raft/leader")
            assert status == 200 and body["host"] != leader["host"]
        # the node whose member died answers through the others
        assert (await call(apis[dead], "GET", "/services/web/meta"))[1]["data"] == 2

        # the killed member restarts from its data dir and catches up
        etcd_cluster[dead].start()
        await etcd_cluster[dead].wait_healthy_async()
        async with EtcdClient([etcd_cluster[dead].client_url]) as own:

            async def caught_up() -> bool:
                kvs, _ = await own.range("/discoverd/services/web/instances/", prefix=True)
                return len(kvs) == len(acked) + 1

            await wait_for_async(caught_up, 30, "the restarted member catching up", every=0.1)
            assert len(await own.member_list()) == 3
    finally:
        for dns in dns_servers:
            await dns.stop()
        for api in apis:
            await api.store.close()


async def dns_ips(port: int) -> set[str]:
    """The A records of web.discoverd, asked over TCP (all of them, not 3)."""

    def ask() -> set[str]:
        try:
            reply = DNSRecord.question("web.discoverd").send("127.0.0.1", port, tcp=True,
                                                             timeout=1)  # fmt: skip
        except OSError:
            return set()
        return {str(rr.rdata) for rr in DNSRecord.parse(reply).rr}

    return await asyncio.to_thread(ask)


def test_etcd_process_args() -> None:
    p = EtcdProcess("n1", "/nonexistent/x", client_port=1, peer_port=2)
    args = p.args()
    assert args[args.index("--initial-cluster") + 1] == "n1=http://127.0.0.1:2"
    assert args[args.index("--election-timeout") + 1] == "500"


async def test_raft_peers_add_and_remove(
    etcd_cluster: list[EtcdProcess],
    make_api,  # type: ignore[no-untyped-def]
) -> None:
    urls = [m.client_url for m in etcd_cluster]
    store = Store(EtcdClient(urls), node_name="n1", advertise="127.0.0.1:1111")
    await store.start()
    for i in (2, 3):  # what nodes 2 and 3 publish when they start
        await store.etcd.put(f"/discoverd/nodes/n{i}", f"127.0.0.{i}:1111")
    api = await make_api(store)
    client_port, peer_port = free_ports(2)
    base = etcd_cluster[0].data_dir.parent
    new = EtcdProcess(
        "n4",
        base / "n4",
        client_port=client_port,
        peer_port=peer_port,
        cluster_state="existing",
        cluster_token=etcd_cluster[0].cluster_token,
    )
    try:
        # etcd refuses to reconfigure a cluster that has not been up for 5 s: 503, retry
        body = {"peer_url": new.peer_url}
        status, body = await retry(api, "PUT", "/raft/peers/127.0.0.4:1111", body)
        assert status == 200 and body["last_index"] >= 0, body
        listed = await store.etcd.member_list()
        members = {m["name"]: m["peerURLs"][0] for m in listed if m.get("name")}
        new.initial_cluster = {**members, "n4": new.peer_url}
        new.start()
        await new.wait_healthy_async()
        node4 = Store(EtcdClient([new.client_url]), node_name="n4", advertise="127.0.0.4:1111")
        await node4.start()  # the new node publishes its address through its own member
        await node4.close()
        peers = (await call(api, "GET", "/raft/peers"))[1]
        assert sorted(peers) == [f"127.0.0.{i}:1111" for i in range(1, 5)]
        assert (await call(api, "DELETE", "/raft/peers/127.0.0.4:1111"))[0] == 200
        assert len(await store.etcd.member_list()) == 3
        assert (await call(api, "DELETE", "/raft/peers/127.0.0.4:1111"))[0] == 404
    finally:
        new.stop()
        await store.close()


async def test_more_watches_than_a_connection_pool_holds(api: Api) -> None:
    """A router watches every routed service: 150 watches through one client (each holding a
    connection to discoverd, and discoverd one to etcd) leave requests and new events flowing."""
    from flynn_discoverd.client import Client

    n = 150
    async with Client([api.url]) as client:
        for i in range(n):
            await client.add_service(f"many-{i}")
        seen: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

        async def follow(i: int) -> None:
            async for event in client.watch(f"many-{i}", kinds=("up",)):
                await seen.put((i, event.instance.addr if event.instance else ""))

        tasks = [asyncio.create_task(follow(i)) for i in range(n)]
        try:
            await asyncio.sleep(1)  # every watch open
            async with asyncio.timeout(15):
                await client.register(f"many-{n - 1}", "10.0.0.9:80")
                assert await seen.get() == (n - 1, "10.0.0.9:80")
                assert await client.instances("many-0") == []
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
