"""`flynn-host component logaggregator` as a real process on loopback: the API, following,
replication by snapshot, resuming across a restart, and memory."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from flynn_logaggregator.client import Client, Emitter, format_message
from logagg_proc import LogAggregator, logaggregator_process, message, send


@pytest.fixture(scope="module")
def agg() -> Iterator[LogAggregator]:
    with logaggregator_process() as a:
        yield a


def wait_cursor(a: LogAggregator, host: str, seq: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while a.get_json("/cursors").get(host, {}).get("seq", 0) < seq:
        assert time.monotonic() < deadline, f"{host} never reached seq {seq}"
        time.sleep(0.02)


def test_log_api_filters_and_errors(agg: LogAggregator) -> None:
    msgs = [
        message(1, app="api", job_id="j1", process_type="web", stream="stdout"),
        message(2, app="api", job_id="j2", process_type="worker", stream="stderr"),
        message(3, app="api", job_id="j1", process_type="web", stream="init"),
    ]
    with agg.connect() as s:
        send(s, msgs)
    agg.wait_accepted("api", 3)
    got = agg.lines("/log/api")
    assert got[0] == {"host_id": "host1", "job_id": "j1", "msg": "line 1", "process_type": "web",
                      "source": "app", "stream": "stdout",
                      "timestamp": "2015-12-13T09:46:40.000001Z"}  # fmt: skip
    seqs = lambda q: [int(m["msg"].split()[1]) for m in agg.lines("/log/api" + q)]  # noqa: E731
    assert seqs("?lines=2") == [2, 3]
    assert seqs("?job_id=j1") == [1, 3]
    assert seqs("?process_type=worker") == [2]
    assert seqs("?stream_types=stdout,init") == [1, 3]
    assert agg.lines("/log/nothing") == []
    for q in ("?lines=x", "?lines=10001", "?stream_types=bogus"):
        with pytest.raises(urllib.error.HTTPError) as e:
            agg.lines("/log/api" + q)
        assert e.value.code == 400
    assert agg.get_json("/.well-known/status") == {"data": {"status": "healthy"}}
    assert agg.get_json("/cursors")["host1"]["seq"] >= 3


def test_bad_frame_closes_only_that_connection(agg: LogAggregator) -> None:
    with agg.connect() as s:
        s.sendall(format_message(message(1, app="bad", host="hbad")) + b"not a frame at all")
        s.settimeout(10)
        assert s.recv(100) == b""  # closed by the aggregator
    with agg.connect() as s:
        s.sendall(b"99999999 ")  # over the limit: refused before a byte of it is buffered
        assert s.recv(100) == b""
    assert [m["msg"] for m in agg.wait_accepted("bad", 1)] == ["line 1"]
    assert "closing connection" in agg.log_text()


async def test_follow_streams_new_messages(agg: LogAggregator) -> None:
    with agg.connect() as s:
        send(s, [message(i, app="follow", host="hf") for i in range(1, 6)])
        await asyncio.to_thread(agg.wait_accepted, "follow", 5)
        async with Client(agg.url) as c:
            stream = c.log("follow", follow=True, lines=2, stream_types=("stdout",))
            first = [await anext(stream), await anext(stream)]
            assert [m.seq for m in first] == [0, 0] and [m.msg for m in first] == [
                "line 4",
                "line 5",
            ]
            send(s, [message(6, app="follow", host="hf", stream="stderr"),
                     message(7, app="follow", host="hf")])  # fmt: skip
            # it arrives (flushed as soon as it is ingested), and the filter skipped seq 6
            m = await asyncio.wait_for(anext(stream), 10)
            assert m.msg == "line 7"
            await stream.aclose()  # type: ignore[attr-defined]
        async with Client(agg.url) as c:
            only_new = c.log("follow", follow=True)
            task = asyncio.ensure_future(anext(only_new))
            await asyncio.sleep(0.2)
            send(s, [message(8, app="follow", host="hf")])
            assert (await asyncio.wait_for(task, 10)).msg == "line 8"
            await only_new.aclose()  # type: ignore[attr-defined]


def test_duplicates_dropped_by_cursor(agg: LogAggregator) -> None:
    with agg.connect() as s:
        send(s, [message(i, app="dup", host="hd") for i in range(1, 11)])
    wait_cursor(agg, "hd", 10)
    with agg.connect() as s:  # a host that resends from before its cursor
        send(s, [message(i, app="dup", host="hd") for i in range(5, 16)])
    wait_cursor(agg, "hd", 15)
    assert [m["msg"] for m in agg.lines("/log/dup")] == [f"line {i}" for i in range(1, 16)]


def test_snapshot_round_trip_into_a_second_process() -> None:
    with logaggregator_process(LOGAGGREGATOR_BUFFER_SIZE="50") as leader:
        with leader.connect() as s:
            for h in ("ha", "hb"):
                send(s, [message(i, app=f"app{i % 3}", host=h, msg=f"{h} ü {i}")
                         for i in range(1, 101)])  # fmt: skip
        wait_cursor(leader, "hb", 100)
        with logaggregator_process(LOGAGGREGATOR_LEADER_URL=leader.url) as follower:
            assert follower.get_json("/cursors") == leader.get_json("/cursors")
            for app in ("app0", "app1", "app2"):
                got = follower.lines(f"/log/{app}")
                assert got == leader.lines(f"/log/{app}") and len(got) == 50
            assert "loaded 150 messages of 2 hosts" in follower.log_text()
            with follower.connect() as s:  # what the leader had is a duplicate here
                send(s, [message(100, app="app1", host="hb"), message(101, app="app2", host="hb")])
            wait_cursor(follower, "hb", 101)
            assert len(follower.lines("/log/app2?lines=2")) == 2
            assert follower.lines("/log/app1?lines=1") == leader.lines("/log/app1?lines=1")


class Shipper:
    """A host's log mux in miniature: messages 1..n kept locally; on each connection it asks the
    aggregator's cursor and sends what comes after it."""

    def __init__(self, host: str, n: int, apps: int) -> None:
        self.msgs = [
            message(i, app=f"app{i % apps}", host=host, msg=f"m{i}") for i in range(1, n + 1)
        ]
        self.host = host

    def resume_from(self, a: LogAggregator) -> int:
        cur = a.get_json("/cursors").get(self.host)
        return int(cur["seq"]) if cur else 0

    def ship(self, a: LogAggregator, until: int, abort_mid_frame: bool = False) -> int:
        start = self.resume_from(a)
        with a.connect() as s:
            send(s, self.msgs[start:until])
            if abort_mid_frame:
                s.sendall(format_message(self.msgs[until])[:20])  # then gone
        return start


def test_100k_messages_across_a_restart_none_lost_or_duplicated() -> None:
    n, apps = 100_000, 10
    shipper = Shipper("hr", n, apps)
    env = {"LOGAGGREGATOR_BUFFER_SIZE": str(n)}
    with logaggregator_process(**env) as first:
        t = time.monotonic()
        assert shipper.ship(first, 60_000, abort_mid_frame=True) == 0
        wait_cursor(first, "hr", 60_000)
        rate = 60_000 / (time.monotonic() - t)
        # the aggregator moves to a new process, which copies the old one's state
        second_ctx = logaggregator_process(LOGAGGREGATOR_LEADER_URL=first.url, **env)
        second = second_ctx.__enter__()
    try:  # the first is gone now; the shipper resumes on the second
        assert shipper.ship(second, n) == 60_000
        wait_cursor(second, "hr", n)
        seen = [int(m["msg"][1:]) for app in range(apps) for m in second.lines(f"/log/app{app}")]
        assert len(seen) == n and sorted(seen) == list(range(1, n + 1))
        print(f"\ningest: {rate:,.0f} msgs/s over loopback from one sender")
    finally:
        second_ctx.__exit__(None, None, None)


def test_memory_bounded_after_200k_messages_to_one_app() -> None:
    n = 200_000
    with logaggregator_process() as a:
        t = time.monotonic()
        with a.connect() as s:
            for start in range(1, n + 1, 10_000):
                send(s, [message(i, app="big", host="hm", msg="x" * 200)
                         for i in range(start, start + 10_000)])  # fmt: skip
        wait_cursor(a, "hm", n)
        rate = n / (time.monotonic() - t)
        rss = a.rss()
        assert len(a.lines("/log/big")) == 10_000
        print(f"\n200k messages: {rate:,.0f} msgs/s, RSS {rss / 2**20:.1f} MiB")
        assert rss < 150 * 2**20


def test_an_emitter_delivers_to_every_instance_and_never_waits() -> None:
    """A component's lines (source `controller`) reach each aggregator it is given; with the
    aggregators gone, `send` still returns at once and the lines are dropped, not queued up."""
    with logaggregator_process() as a, logaggregator_process() as b:
        addrs = [f"127.0.0.1:{a.syslog_port}", f"127.0.0.1:{b.syslog_port}"]

        async def instances() -> list[str]:
            return addrs

        async def main() -> tuple[float, int]:
            out = Emitter(instances)
            for i in range(3):
                out.send(message(0, app="deployed", msg=f"step {i}", source="controller",
                                 process_type="deploy"))  # fmt: skip
            await out.close()
            for agg in (a, b):
                held = agg.wait_accepted("deployed", 3)
                assert [m["msg"] for m in held] == ["step 0", "step 1", "step 2"]
                assert {m["source"] for m in held} == {"controller"}
            addrs[:] = ["127.0.0.1:1"]  # nothing listens there
            out = Emitter(instances)
            out.ADDRS_TTL = 0
            started = time.monotonic()
            for i in range(5000):
                out.send(message(0, app="deployed", msg=f"lost {i}", source="controller"))
            took = time.monotonic() - started
            await out.close()
            return took, out.dropped + len(out.queue)

        took, unsent = asyncio.run(main())
        assert unsent == 5000, unsent
        print(f"5000 sends with no aggregator: {took * 1000:.1f} ms in all")
