"""The log mux's parts in one process: the sequence (positions, ring, index, duplicates,
where a shipper starts, a saved sequence), and reading log files back by job seq across
rotation (`flynn_host.runtime.logs.LogReader`, `tail_entries`, `read_entries` with `since`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flynn_logaggregator.client import Cursor, FrameParser, Message, parse_message

from flynn_host.logmux.sequencer import BLOCK_RUNS, Index, JobInfo, Ring, Sequencer
from flynn_host.logmux.service import Settings
from flynn_host.runtime.logs import LogReader, LogWriter, read_entries, tail_entries


def entry(n: int, t: str = "2015-12-14T10:00:00.000001Z", s: str = "stdout") -> dict[str, Any]:
    return {"n": n, "t": t, "s": s, "m": f"line {n}"}


def make_sequencer(**kw: Any) -> tuple[Sequencer, dict[str, JobInfo]]:
    jobs = {
        "h1-a": JobInfo("h1-a", "app1", "web", "/nonexistent/a.log"),
        "h1-b": JobInfo("h1-b", "app2", "worker", "/nonexistent/b.log"),
    }
    return Sequencer("h1", jobs.get, first_seq=1000, **kw), jobs


def ring_messages(sq: Sequencer) -> list[Message]:
    times, frames = sq.ring.take(sq.ring.oldest or 0, 10**9)
    return [parse_message(f) for f in FrameParser().feed(b"".join(frames))]


def test_positions_strictly_increase_and_time_never_goes_back() -> None:
    sq, _ = make_sequencer()
    sq.offer("h1-a", entry(1, "2015-12-14T10:00:00.000005Z"))
    sq.offer("h1-b", entry(1, "2015-12-14T10:00:00.000003Z"))  # an older line of another job
    sq.offer("h1-a", entry(2, "2015-12-14T10:00:00.000007Z", "stderr"))
    sq.offer("h1-x", entry(1))  # a job that is not shipped
    msgs = ring_messages(sq)
    assert [(m.job_id, m.seq) for m in msgs] == [("h1-a", 1000), ("h1-b", 1001), ("h1-a", 1002)]
    positions = [(m.time, m.seq) for m in msgs]
    assert positions == sorted(positions) and len(set(positions)) == 3
    # the second line's time is clamped up to the first's
    assert msgs[1].time == msgs[0].time == 1_450_087_200_000_005_000
    assert (msgs[2].app_id, msgs[2].process_type, msgs[2].stream, msgs[2].host_id) == (
        "app1", "web", "stderr", "h1")  # fmt: skip
    assert msgs[1].app_id == "app2" and msgs[1].msg == "line 1"


def test_lines_offered_again_are_dropped_and_a_jump_is_indexed() -> None:
    sq, jobs = make_sequencer()
    for n in (1, 2, 3, 2, 3):
        sq.offer("h1-a", entry(n))
    assert len(sq.ring) == 3 and sq.duplicates == 2
    sq.offer("h1-a", entry(7))  # lines 4-6 were never offered: indexed, not in the ring
    assert sq.unread == 3 and len(sq.ring) == 4
    assert list(sq.ring.seqs[sq.ring.head :]) == [1000, 1001, 1002, 1006]
    run = sq.index.run_at(1003)
    assert run is not None and (run.first_seq, run.first_n, run.count) == (1000, 1, 7)
    # the ring gives a gapless stretch only: the shipper reads 1003-1005 from the file
    assert len(sq.ring.take(1001, 10)[1]) == 2
    assert sq.ring.take(1003, 10) == ((), [])
    assert len(sq.ring.take(1006, 10)[1]) == 1


def test_ring_is_bounded_by_messages_and_bytes() -> None:
    ring = Ring(max_messages=100, max_bytes=10_000)
    for seq in range(1, 1001):
        ring.append(seq, seq, b"x" * 50)
    assert len(ring) == 100 and ring.oldest == 901
    for seq in range(1001, 1011):
        ring.append(seq, seq, b"y" * 2000)
    assert ring.bytes <= 10_000 and ring.oldest == 1006
    ring.append(2000, 2000, b"z" * 50_000)  # one line over the byte bound is still kept
    assert len(ring) == 1 and ring.oldest == 2000


def test_ring_compacts_its_lists() -> None:
    ring = Ring(max_messages=10, max_bytes=10**9)
    for seq in range(200_000):
        ring.append(seq, seq, b"x")
    assert len(ring.seqs) < 140_000 and len(ring) == 10
    assert list(ring.take(199_990, 100)[0]) == list(range(199_990, 200_000))


def test_index_runs_and_bound() -> None:
    a, b = JobInfo("a", "app", "", "a.log"), JobInfo("b", "app", "", "b.log")
    index = Index(max_runs=3 * BLOCK_RUNS)
    index.add(100, a, 1, 1, 0)
    index.add(101, a, 2, 1, 0)  # continues the run
    index.add(102, b, 1, 1, 5)
    index.add(110, a, 3, 1, 7)  # a seq jump (another daemon's sequence): a new run
    assert index.runs == 3
    r = index.run_at(101)
    assert r is not None and (r.job, r.first_seq, r.first_n, r.count) == (a, 100, 1, 2)
    r = index.run_at(105)  # between runs: the next one
    assert r is not None and r.first_seq == 110
    assert index.run_at(111) is None
    r = index.run_at(50)
    assert r is not None and r.first_seq == 100
    assert index.first_seq_at(6) == 102 and index.first_seq_at(0) == 100
    # alternate jobs so every line is a run: whole blocks go, the newest stay
    seq = 200
    for i in range(5 * BLOCK_RUNS):
        index.add(seq, (a, b)[i % 2], 100 + i, 1, seq)
        seq += 1
    assert index.runs <= 3 * BLOCK_RUNS and index.runs >= 2 * BLOCK_RUNS
    first = index.first_seq
    assert first is not None and first > 200
    r = index.run_at(seq - 1)
    assert r is not None and r.first_seq == seq - 1


def test_where_a_shipper_starts() -> None:
    sq, _ = make_sequencer()
    assert sq.start_after(None) == (1000, 0)  # nothing yet: from the next line
    for n in range(1, 6):
        sq.offer("h1-a", entry(n, f"2015-12-14T10:00:0{n}Z"))
    assert sq.start_after(None) == (1000, 0)  # a new aggregator: the oldest in the ring
    assert sq.start_after(Cursor(0, 1002)) == (1003, 0)  # a cursor of this sequence
    # a cursor of an earlier daemon (a smaller seq): by time, from early enough
    t3 = 1_450_087_203_000_000_000
    start, min_time = sq.start_after(Cursor(t3, 17))
    assert min_time == t3 and start <= 1002


def test_saved_sequence_resumes_exactly() -> None:
    sq, jobs = make_sequencer()
    for n in range(1, 4):
        sq.offer("h1-a", entry(n))
    sq.offer("h1-b", entry(1))
    state = sq.to_state()
    fresh = {k: JobInfo(v.job_id, v.app_id, v.process_type, v.log_path) for k, v in jobs.items()}
    again = Sequencer("h1", fresh.get)
    again.restore(state)
    assert again.next_seq >= 1004 and again.prev_time == sq.prev_time
    again.offer("h1-a", entry(3))  # offered again after the restart: dropped
    again.offer("h1-a", entry(4))
    assert again.duplicates == 1 and len(again.ring) == 1
    assert again.start_after(Cursor(0, 1001)) == (1002, 0)  # a cursor of the saved sequence
    r = again.index.run_at(1000)
    assert r is not None and (r.job.job_id, r.first_n, r.count) == ("h1-a", 1, 3)


# --- reading log files back ---------------------------------------------------------------------


def write_lines(path: Path, first: int, last: int, max_bytes: int) -> None:
    w = LogWriter(str(path), max_bytes)
    w.write("stdout", b"".join(b"%d\n" % i for i in range(first, last + 1)))
    w.close()


def test_reader_finds_lines_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    write_lines(path, 1, 5000, max_bytes=200_000)  # rotated: .1 holds the older lines
    assert (tmp_path / "job.log.1").exists()
    reader = LogReader(str(path))
    got = reader.read(2500, 10)
    first_kept = read_entries(str(path))[0]["n"]
    assert [e["n"] for e in got] == list(range(2500, 2510)) or first_kept > 2500
    # the newest entries are always there: read up to the end, forward, in chunks
    start = read_entries(str(path))[0]["n"]
    reader = LogReader(str(path))
    seen = []
    n = start
    while chunk := reader.read(n, 777):
        seen += [e["n"] for e in chunk]
        n = chunk[-1]["n"] + 1
    assert seen == list(range(start, 5001))
    # more lines, rotating while the reader is open: it goes on from where it was
    write_lines(path, 5001, 9000, max_bytes=200_000)
    more = []
    while chunk := reader.read(n, 1000):
        more += [e["n"] for e in chunk]
        n = chunk[-1]["n"] + 1
    assert more[-1] == 9000 and more == list(range(more[0], 9001))
    reader.close()


def test_reader_skips_what_was_rotated_out(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    write_lines(path, 1, 20_000, max_bytes=100_000)
    oldest = read_entries(str(path))[0]["n"]
    assert oldest > 1000
    got = LogReader(str(path)).read(5, 3)
    assert [e["n"] for e in got] == [oldest, oldest + 1, oldest + 2]
    assert LogReader(str(tmp_path / "none.log")).read(1, 10) == []


def test_reader_keeps_a_torn_line_for_later(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    write_lines(path, 1, 3, max_bytes=10**6)
    with open(path, "ab") as f:
        f.write(b'{"n":4,"t":"2015-12-14T10:00:00Z","s":"stdout","m":"fo')
    reader = LogReader(str(path))
    assert [e["n"] for e in reader.read(1, 10)] == [1, 2, 3]
    with open(path, "ab") as f:
        f.write(b'ur"}\n')
    assert [e["m"] for e in reader.read(4, 10)] == ["four"]


@pytest.mark.parametrize("since", [0, 1, 4000, 7999, 8000])
def test_read_entries_since_seeks(tmp_path: Path, since: int) -> None:
    path = tmp_path / "job.log"
    write_lines(path, 1, 8000, max_bytes=10**7)
    assert [e["n"] for e in read_entries(str(path), since=since)] == list(range(since + 1, 8001))


def test_tail_entries(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    write_lines(path, 1, 6000, max_bytes=100_000)
    assert [e["n"] for e in tail_entries(str(path), 100, 10**6)] == list(range(5901, 6001))
    kept = [e["n"] for e in read_entries(str(path))]
    assert [e["n"] for e in tail_entries(str(path), 10**6, 10**7)] == kept
    assert len(tail_entries(str(path), 10**6, 1000)) < 100  # the byte bound


def test_settings() -> None:
    s = Settings.from_env({
        "FLYNN_LOGMUX_AGGREGATORS": "10.0.0.5:514, 10.0.0.6:3000=http://10.0.0.6:5000",
        "FLYNN_LOGMUX_API_PORT": "8080",
        "FLYNN_LOGMUX_RING_MESSAGES": "500",
    })  # fmt: skip
    assert s.aggregators == {"10.0.0.5:514": "http://10.0.0.5:8080",
                             "10.0.0.6:3000": "http://10.0.0.6:5000"}  # fmt: skip
    assert (s.ring_messages, s.ring_bytes) == (500, 32 * 1024 * 1024)
    assert Settings.from_env({}).aggregators == {} and Settings.from_env({}).api_port == 80
    for bad in ({"FLYNN_LOGMUX_AGGREGATORS": "nohostport"}, {"FLYNN_LOGMUX_RING_BYTES": "-1"},
                {"FLYNN_LOGMUX_API_PORT": "eighty"}):  # fmt: skip
        with pytest.raises(ValueError, match="FLYNN_LOGMUX_"):
            Settings.from_env(bad)


# --- the service's start and stop, with a stand-in for the daemon's Host ------------------------


def fake_host(tmp_path: Path, jobs: list[str]) -> Any:
    from types import SimpleNamespace as NS

    active = {
        jid: NS(ended=False, job=NS(metadata={"flynn-controller.app": "app1"}, config={}))
        for jid in jobs
    }
    return NS(
        config=NS(id="h1", state=tmp_path / "state.json"),
        jobs=NS(jobs=active),
        backend=NS(log_path=lambda jid: tmp_path / f"{jid}.log"),
        discoverd_urls=lambda: None,
    )


async def test_a_restart_without_a_saved_sequence_takes_up_the_newest_lines(tmp_path: Path):
    from flynn_host.logmux.service import LogMux

    host = fake_host(tmp_path, ["h1-old", "h1-new"])
    write_lines(tmp_path / "h1-old.log", 1, 50, max_bytes=10**6)  # older lines...
    write_lines(tmp_path / "h1-new.log", 1, 50, max_bytes=10**6)  # ...than these
    mux = LogMux(host, Settings(ring_messages=20))
    await mux.start()
    try:
        msgs = ring_messages(mux.sequencer)
        assert [(m.job_id, m.msg) for m in msgs] == [("h1-new", str(i)) for i in range(31, 51)]
        # what the hook offers again, of either job, is not sequenced twice
        mux.sequencer.offer("h1-old", entry(50))
        mux.sequencer.offer("h1-new", entry(50))
        mux.sequencer.offer("h1-old", entry(51))
        assert mux.sequencer.duplicates == 2 and len(mux.sequencer.ring) == 20
    finally:
        await mux.stop()
    saved = json.loads((tmp_path / "state.json.logmux").read_text())
    assert saved["jobs"]["h1-old"]["last_n"] == 51
    # the next start resumes the saved sequence (and the file goes)
    again = LogMux(host, Settings(ring_messages=20))
    await again.start()
    try:
        assert not (tmp_path / "state.json.logmux").exists()
        assert again.sequencer.next_seq >= saved["next_seq"]
        again.sequencer.offer("h1-old", entry(51))
        assert again.sequencer.duplicates == 1
    finally:
        await again.stop()


async def test_a_bad_saved_sequence_is_ignored(tmp_path: Path):
    from flynn_host.logmux.service import LogMux

    host = fake_host(tmp_path, ["h1-a"])
    write_lines(tmp_path / "h1-a.log", 1, 5, max_bytes=10**6)
    for bad in ("{not json", '{"version": 1, "host_id": "h1", "jobs": {}}'):
        (tmp_path / "state.json.logmux").write_text(bad)
        mux = LogMux(host, Settings())
        await mux.start()  # starts, from the log files
        try:
            assert len(mux.sequencer.ring) == 5
        finally:
            await mux.stop()
