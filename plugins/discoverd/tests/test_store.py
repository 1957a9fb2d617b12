"""The registry on a real etcd member: services, instance index and TTL, leaders, the meta
compare-and-swap, the event stream, and writes whose reply is lost."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from flynn_discoverd.etcd import EtcdClient, EtcdProcess, EtcdUnavailable
from flynn_discoverd.store import Store
from flynn_discoverd.types import (
    DEFAULT_TTL,
    LEADER_MANUAL,
    Event,
    Instance,
    ServiceConfig,
    ServiceMeta,
    check_service_name,
)

from flynn_host.dev.host import wait_for_async
from flynn_host.errors import FlynnError, ValidationError


def inst(port: int, **meta: str) -> Instance:
    return Instance(addr=f"10.0.0.1:{port}", meta=dict(meta))


class Collector:
    """Runs a subscription in the background and keeps what it yields."""

    def __init__(self, events: AsyncIterator[Event]) -> None:
        self.events: list[Event] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(events))

    async def _run(self, events: AsyncIterator[Event]) -> None:
        async for ev in events:
            self.events.append(ev)
            self.changed.set()

    async def wait_for(self, n: int, within: float = 30.0) -> list[Event]:
        """The events so far, once there are `n` of them or `within` seconds have passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while len(self.events) < n:
                    self.changed.clear()
                    await self.changed.wait()
        return self.events

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def kinds(events: list[Event]) -> list[tuple[str, str | None]]:
    return [(e.kind, e.instance.addr if e.instance else None) for e in events]


async def test_services(store: Store) -> None:
    await store.add_service("web", ServiceConfig())
    with pytest.raises(FlynnError) as err:
        await store.add_service("web", ServiceConfig())
    assert (err.value.code, err.value.status) == ("object_exists", 409)
    await store.remove_service("web")
    for call in (store.remove_service("web"), store.instances("web")):
        with pytest.raises(FlynnError) as err:
            await call
        assert err.value.status == 404
    with pytest.raises(ValidationError):
        await store.add_service("Bad_Name", ServiceConfig())
    with pytest.raises(ValidationError):
        check_service_name("")


async def test_register_list_and_index(store: Store) -> None:
    await store.add_service("web", ServiceConfig())
    with pytest.raises(FlynnError) as err:
        await store.register("nope", inst(1))
    assert err.value.status == 404
    a = await store.register("web", inst(1))
    b = await store.register("web", inst(2))
    assert 0 < a.index < b.index
    # heartbeats keep the index; a changed meta is stored under the same index
    for _ in range(3):
        assert (await store.register("web", inst(1))).index == a.index
    assert (await store.register("web", inst(1, role="x"))).index == a.index
    listed = await store.instances("web")
    assert [(i.id, i.index, i.meta) for i in listed] == [
        (a.id, a.index, {"role": "x"}),
        (b.id, b.index, {}),
    ]
    await store.deregister("web", a.id)
    assert [i.id for i in await store.instances("web")] == [b.id]
    with pytest.raises(FlynnError) as err:
        await store.deregister("web", a.id)
    assert err.value.status == 404


async def test_default_ttl_is_ten_seconds(make_store) -> None:  # type: ignore[no-untyped-def]
    store = make_store()
    assert store.ttl == DEFAULT_TTL == 10
    await store.add_service("web", ServiceConfig())
    i = await store.register("web", inst(1))
    kv = await store.etcd.get(store._inst("web", i.id))
    assert kv is not None and kv.lease
    remaining, granted = await store.etcd.lease_ttl(kv.lease)
    assert granted == 10 and 8 <= remaining <= 10


async def test_heartbeats_keep_instance_and_silence_expires_it(store: Store) -> None:
    assert store.ttl == 2
    await store.add_service("web", ServiceConfig())
    kept = await store.register("web", inst(1))
    await store.register("web", inst(2))
    state, rev = await store.state("web")
    events = Collector(store.events(state, rev))

    async def heartbeat() -> list[Event]:
        assert (await store.register("web", inst(1))).index == kept.index
        return events.events

    try:
        # heartbeat one instance and leave the other silent until etcd expires that one: by
        # then the first, registered earlier with the same TTL, lives on its heartbeats alone
        # (how long after its TTL etcd takes: bench/discoverd_failover.py)
        got = await wait_for_async(heartbeat, 30, "the silent instance's `down`", every=0.5)
        assert kinds(got) == [("down", "10.0.0.1:2")]
        assert [i.index for i in await store.instances("web")] == [kept.index]
    finally:
        await events.stop()


async def test_oldest_leader_moves(store: Store) -> None:
    await store.add_service("web", ServiceConfig())
    assert await store.leader("web") is None
    a = await store.register("web", inst(1))
    b = await store.register("web", inst(2))
    c = await store.register("web", inst(3))
    assert (await store.leader("web")).id == a.id  # type: ignore[union-attr]
    await store.deregister("web", b.id)
    assert (await store.leader("web")).id == a.id  # type: ignore[union-attr]
    await store.deregister("web", a.id)
    assert (await store.leader("web")).id == c.id  # type: ignore[union-attr]


async def test_manual_leader(store: Store) -> None:
    await store.add_service("db", ServiceConfig(leader_type=LEADER_MANUAL))
    await store.add_service("web", ServiceConfig())
    a = await store.register("db", inst(1))
    b = await store.register("db", inst(2))
    assert await store.leader("db") is None
    await store.set_leader("db", b.id)
    assert (await store.leader("db")).id == b.id  # type: ignore[union-attr]
    with pytest.raises(ValidationError):
        await store.set_leader("web", a.id)
    # leader_id in a meta CAS sets the leader in the same transaction
    meta = await store.set_meta("db", ServiceMeta(data={"primary": a.addr}, leader_id=a.id))
    assert (await store.leader("db")).id == a.id  # type: ignore[union-attr]
    assert (await store.get_meta("db")).index == meta.index


async def test_meta_compare_and_swap(store: Store) -> None:
    await store.add_service("web", ServiceConfig())
    with pytest.raises(FlynnError) as err:
        await store.get_meta("web")
    assert err.value.status == 404
    with pytest.raises(FlynnError) as err:
        await store.set_meta("web", ServiceMeta(data={"v": 0}, index=7))
    assert (err.value.code, err.value.status) == ("precondition_failed", 412)
    first = await store.set_meta("web", ServiceMeta(data={"v": 1}, index=0))
    assert first.index > 0
    with pytest.raises(FlynnError) as err:
        await store.set_meta("web", ServiceMeta(data={"v": 2}, index=0))
    assert (err.value.code, err.value.status) == ("object_exists", 409)
    with pytest.raises(FlynnError) as err:
        await store.set_meta("web", ServiceMeta(data={"v": 2}, index=first.index + 100))
    assert (err.value.code, err.value.status) == ("precondition_failed", 412)
    second = await store.set_meta("web", ServiceMeta(data={"v": 2}, index=first.index))
    assert second.index > first.index
    got = await store.get_meta("web")
    assert (got.data, got.index) == ({"v": 2}, second.index)
    with pytest.raises(FlynnError) as err:  # the old index is stale now
        await store.set_meta("web", ServiceMeta(data={"v": 3}, index=first.index))
    assert err.value.status == 412
    with pytest.raises(FlynnError) as err:
        await store.set_meta("nope", ServiceMeta(data={}, index=0))
    assert err.value.status == 404


async def test_events_in_order_without_gaps(store: Store) -> None:
    await store.add_service("web", ServiceConfig())
    a = await store.register("web", inst(1))
    state, rev = await store.state("web")
    assert kinds(state.current_events({"up", "leader", "service_meta"}, True)) == [
        ("up", a.addr),
        ("leader", a.addr),
        ("current", None),
    ]
    events = Collector(store.events(state, rev))
    try:
        b = await store.register("web", inst(2))
        await store.register("web", inst(2, role="y"))  # update
        await store.register("web", inst(2, role="y"))  # heartbeat: no event
        await store.set_meta("web", ServiceMeta(data=1, index=0))
        await store.deregister("web", a.id)  # down, then b leads
        for port in range(10, 30):
            await store.register("web", inst(port))
        await store.remove_service("web")  # everything goes down; the stream ends
        want = (
            [("up", b.addr), ("update", b.addr), ("service_meta", None)]
            + [("down", a.addr), ("leader", b.addr)]
            + [("up", f"10.0.0.1:{p}") for p in range(10, 30)]
        )
        got = await events.wait_for(len(want) + 21)
        assert kinds(got[: len(want)]) == want
        downs = got[len(want) :]
        assert sorted(e.instance.addr for e in downs) == sorted(  # type: ignore[union-attr]
            [b.addr] + [f"10.0.0.1:{p}" for p in range(10, 30)]
        )
        assert {e.kind for e in downs} == {"down"}
        await asyncio.wait_for(events.task, 2)  # ended with the service
    finally:
        await events.stop()


# --- a write whose reply is lost --------------------------------------------------------------


class LosesACommittedReply(EtcdClient):
    """An etcd client whose next committed transaction loses its reply once `armed`: etcd
    applied it, but the member failed before it answered. `call` then sends the same request to
    the next endpoint, as it does in an etcd member fail-over."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(endpoints)
        self.armed = False
        self.txns: list[bool] = []  # each txn that reached etcd: did it succeed?

    async def call_one(self, endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = await super().call_one(endpoint, path, body)
        if path == "/v3/kv/txn":
            self.txns.append(bool(data.get("succeeded")))
            if self.armed and data.get("succeeded"):
                self.armed = False
                raise EtcdUnavailable(f"{endpoint}: connection reset (reply lost)", 14)
        return data


@pytest.fixture
async def lossy(etcd_member: EtcdProcess) -> AsyncIterator[tuple[Store, LosesACommittedReply]]:
    # the one member twice: the retry reaches it again, as it would reach another member
    etcd = LosesACommittedReply([etcd_member.client_url] * 2)
    store = Store(etcd, prefix=f"/t-{uuid.uuid4().hex[:8]}", ttl=2)
    yield store, etcd
    await store.close()


async def test_a_retried_write_finds_its_own_write(
    lossy: tuple[Store, LosesACommittedReply],
) -> None:
    store, etcd = lossy
    etcd.armed = True
    await store.add_service("web", ServiceConfig())  # not "already exists"
    assert etcd.txns == [True, False]  # applied (reply lost), then the retry's compare failed

    etcd.armed, etcd.txns = True, []
    created = await store.set_meta("web", ServiceMeta(data={"v": 1}, index=0))
    assert etcd.txns == [True, False]
    got = await store.get_meta("web")  # not "metadata already exists": the index is etcd's
    assert (got.data, got.index) == ({"v": 1}, created.index)

    etcd.armed, etcd.txns = True, []
    swapped = await store.set_meta("web", ServiceMeta(data={"v": 2}, index=created.index))
    assert etcd.txns == [True, False]  # not "index is not ...": it is our own write's
    got = await store.get_meta("web")
    assert (got.data, got.index) == ({"v": 2}, swapped.index) and swapped.index > created.index

    # another writer's change is still a conflict, reply lost or not
    etcd.armed = True
    with pytest.raises(FlynnError) as err:
        await store.set_meta("web", ServiceMeta(data={"v": 3}, index=created.index))
    assert err.value.code == "precondition_failed"
    assert etcd.armed  # (that write never committed: nothing was lost)
