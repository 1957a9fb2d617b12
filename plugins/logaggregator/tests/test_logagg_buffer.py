"""The aggregator's state: ring buffers, filters, cursors and followers, in-process."""

from __future__ import annotations

import asyncio

from flynn_logaggregator.buffer import Aggregator, Filter, Follower
from flynn_logaggregator.types import Cursor
from logagg_proc import message


def test_ring_keeps_the_newest_per_app() -> None:
    agg = Aggregator(max_messages=100)
    for i in range(1, 251):
        agg.add(message(i, app="a"))
    agg.add(message(251, app="b"))
    got = agg.read("a", 0, Filter())
    assert [m.seq for m in got] == list(range(151, 251))
    assert [m.seq for m in agg.read("a", 5, Filter())] == list(range(246, 251))
    assert len(agg.read("b", 0, Filter())) == 1
    assert agg.read("nope", 0, Filter()) == []


def test_ring_bounded_by_bytes() -> None:
    agg = Aggregator(max_messages=1000, max_bytes=10_000)
    for i in range(1, 101):
        agg.add(message(i, msg="x" * 1000))
    buf = agg.apps["app1"]
    assert len(buf.messages) == 10 and buf.bytes == 10_000
    agg.add(message(101, msg="y" * 50_000))  # one bigger than the limit is still kept
    assert [m.seq for m in buf.messages] == [101]


def test_filters() -> None:
    agg = Aggregator()
    agg.add(message(1, job_id="j1", process_type="web", stream="stdout"))
    agg.add(message(2, job_id="j2", process_type="worker", stream="stderr"))
    agg.add(message(3, job_id="j1", process_type="web", stream="init"))
    seqs = lambda f: [m.seq for m in agg.read("app1", 0, f)]  # noqa: E731
    assert seqs(Filter(job_id="j1")) == [1, 3]
    assert seqs(Filter(process_type="worker")) == [2]
    assert seqs(Filter(streams=frozenset({"stdout", "init"}))) == [1, 3]
    assert seqs(Filter(job_id="j1", streams=frozenset({"stderr"}))) == []
    assert [m.seq for m in agg.read("app1", 1, Filter(job_id="j1"))] == [3]


def test_duplicates_at_or_before_the_cursor_are_dropped() -> None:
    agg = Aggregator()
    assert all(agg.add(message(i)) for i in range(1, 11))
    assert agg.cursors["host1"] == Cursor(message(10).time, 10)
    assert not agg.add(message(10)) and not agg.add(message(3))
    assert agg.add(message(11)) and agg.add(message(1, host="host2"))
    assert agg.duplicates == 2 and len(agg.read("app1", 0, Filter())) == 12
    # same time, higher seq: newer; no seq: always kept, cursor unchanged
    assert agg.add(message(12, time=message(11).time))
    assert agg.add(message(0, msg="no seq", time=0))
    assert agg.cursors["host1"].seq == 12


async def test_followers_get_new_messages_and_slow_ones_are_dropped() -> None:
    agg = Aggregator()
    f = agg.follow("app1", Filter(streams=frozenset({"stdout"})))
    agg.add(message(1))
    agg.add(message(2, stream="stderr"))
    assert [m.seq for m in await asyncio.wait_for(f.next_batch(), 1)] == [1]
    slow = Follower(Filter(), limit=3)
    agg.followers["app1"].add(slow)
    for i in range(3, 8):
        agg.add(message(i))
    assert slow.dropped and await slow.next_batch() == []
    assert [m.seq for m in await f.next_batch()] == [3, 4, 5, 6, 7]
    agg.unfollow("app1", f)
    agg.unfollow("app1", slow)
    assert "app1" not in agg.followers


def test_snapshot_restore() -> None:
    a = Aggregator()
    for i in range(1, 21):
        a.add(message(i, app=f"app{i % 3}"))
    b = Aggregator()
    assert b.restore(dict(a.cursors), list(a.snapshot())) == 20
    assert b.cursors == a.cursors
    for app in a.apps:
        assert b.read(app, 0, Filter()) == a.read(app, 0, Filter())
    assert not b.add(message(20, app="app2"))
