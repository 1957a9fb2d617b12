"""The host's log sequence: every line of every shipped job gets a place in one host-wide order,
its cursor position `(time, seq)`, the moment the `flynn_host_job_log` hook delivers it.

- `seq` is a host counter, +1 per line. A new sequence (no saved state) starts at the wall
  clock in microseconds, so it is above every seq an earlier daemon on this host gave out
  (a host ships far fewer than a million lines a second) and an aggregator's cursor from an
  earlier daemon is never mistaken for a position of this one.
- `time` is the line's own time (ns), clamped so it never goes backwards:
  `max(line time, previous time)`. So `(time, seq)` strictly increases in shipping order, which
  is what the aggregator's duplicate rule needs (docs/logaggregator.md#cursors-and-duplicates).

Two bounded structures remember the lines, and only the hook makes them grow:

- the **ring** keeps the newest lines encoded as RFC 6587 frames (at most `RING_MESSAGES`
  lines and `RING_BYTES` bytes), so a shipper that keeps up never touches the disk;
- the **index** maps host seq ranges to runs of one job's lines, `(first seq, job, first job
  seq n, count, floor)`, so any position can be read back from the job's log file
  (`floor` is the clamped time before the run: a line's time is `max(its time, floor)`).
  Consecutive lines of one job make one run, so one busy job costs a few runs; the worst case
  (every line from another job) is one run per line. At most `INDEX_RUNS` runs are kept,
  about 40 bytes each (10 MiB); the oldest go first.

The hook is at least once (a restarted daemon re-offers lines): a line whose job seq `n` is
not above the last one sequenced for its job is dropped here. A jump in `n` (lines the hook
never offered) is indexed as a run without text, read back from the file when shipped.
"""

from __future__ import annotations

import bisect
import logging
import time as _time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from flynn_logaggregator.client import Cursor, Message, format_message
from flynn_logaggregator.types import parse_time

log = logging.getLogger(__name__)

RING_MESSAGES = 100_000
RING_BYTES = 32 * 1024 * 1024
INDEX_RUNS = 262_144
BLOCK_RUNS = 4096  # runs per index block: the index drops its oldest block at a time

Entry = dict[str, Any]


@dataclass(eq=False)
class JobInfo:
    """A shipped job: what its messages carry and where its lines are kept."""

    job_id: str
    app_id: str
    process_type: str
    log_path: str
    # the job seq `n` of the newest line sequenced; 0 while none is (the first line offered
    # then starts the job's sequence, whatever its n)
    last_n: int = 0


@dataclass(frozen=True)
class Run:
    """Lines `first_n ..` of one job at host seqs `first_seq ..` (`count` of each)."""

    first_seq: int
    job: JobInfo
    first_n: int
    count: int
    floor: int  # no line of the run has a time before this (ns)

    @property
    def end_seq(self) -> int:
        return self.first_seq + self.count


class Ring:
    """The newest sequenced lines, as encoded frames, oldest first, in seq order (seqs may skip:
    lines only in the index). Arrays and a list with a moving head, compacted now and then, so
    appending, dropping the oldest and slicing are all cheap (a line costs its frame, a list
    slot and 16 bytes of seq and time)."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.seqs = array("q")
        self.times = array("q")
        self.frames: list[bytes] = []
        self.head = 0
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.seqs) - self.head

    @property
    def oldest(self) -> int | None:
        return self.seqs[self.head] if len(self) else None

    def append(self, seq: int, time: int, frame: bytes) -> None:
        self.seqs.append(seq)
        self.times.append(time)
        self.frames.append(frame)
        self.bytes += len(frame)
        while len(self) > self.max_messages or (self.bytes > self.max_bytes and len(self) > 1):
            self.bytes -= len(self.frames[self.head])
            self.frames[self.head] = b""
            self.head += 1
        if self.head >= 65536 and self.head * 2 >= len(self.seqs):
            del self.seqs[: self.head], self.times[: self.head], self.frames[: self.head]
            self.head = 0

    def take(self, seq: int, limit: int) -> tuple[Sequence[int], list[bytes]]:
        """The times and frames of lines `seq, seq+1, ...` while the ring holds each of them
        (at most `limit`); empty when it does not hold `seq`."""
        seqs, i = self.seqs, bisect.bisect_left(self.seqs, seq, self.head)
        if i == len(seqs) or seqs[i] != seq:
            return (), []
        end = min(len(seqs), i + limit)
        # seqs strictly increase, so `seqs[j] - seq - (j - i)` is 0 up to the first gap and
        # positive from there on: the slice is gapless iff it is 0 at its end
        if seqs[end - 1] - seq != end - 1 - i:
            end = i + bisect.bisect_left(range(i, end), 1, key=lambda j: seqs[j] - seq - (j - i))
        return self.times[i:end], self.frames[i:end]


class _Block:
    """Up to BLOCK_RUNS runs in parallel arrays (a run costs ~40 bytes, not a Python object)."""

    __slots__ = ("seqs", "ns", "counts", "floors", "jobs")

    def __init__(self) -> None:
        self.seqs = array("q")
        self.ns = array("q")
        self.counts = array("q")
        self.floors = array("q")
        self.jobs: list[JobInfo] = []

    def run(self, i: int) -> Run:
        return Run(self.seqs[i], self.jobs[i], self.ns[i], self.counts[i], self.floors[i])


class Index:
    """Runs of lines in host seq order, the newest `max_runs` (whole blocks go)."""

    def __init__(self, max_runs: int = INDEX_RUNS) -> None:
        self.max_runs = max_runs
        self.blocks: list[_Block] = []
        self.runs = 0
        self.dropped_before = 0  # the lines before this seq were dropped from the index

    @property
    def first_seq(self) -> int | None:
        return self.blocks[0].seqs[0] if self.blocks else None

    def add(self, seq: int, job: JobInfo, n: int, count: int, floor: int) -> None:
        """Index lines `n .. n+count-1` of `job` at seqs `seq ..`: the newest run grows when
        they continue it, else a new run starts."""
        if self.blocks:
            b = self.blocks[-1]
            last = len(b.jobs) - 1
            if b.jobs[last] is job and b.ns[last] + b.counts[last] == n \
                    and b.seqs[last] + b.counts[last] == seq:  # fmt: skip
                b.counts[last] += count
                return
        if not self.blocks or len(self.blocks[-1].jobs) >= BLOCK_RUNS:
            self.blocks.append(_Block())
            if self.runs + BLOCK_RUNS > self.max_runs and len(self.blocks) > 1:
                dropped = self.blocks.pop(0)
                self.runs -= len(dropped.jobs)
                self.dropped_before = dropped.seqs[-1] + dropped.counts[-1]
        b = self.blocks[-1]
        b.seqs.append(seq)
        b.ns.append(n)
        b.counts.append(count)
        b.floors.append(floor)
        b.jobs.append(job)
        self.runs += 1

    def run_at(self, seq: int) -> Run | None:
        """The run holding `seq`, else the first run after it; None when there is none."""
        if not self.blocks:
            return None
        k = bisect.bisect_right(self.blocks, seq, key=lambda b: b.seqs[0]) - 1
        if k < 0:
            return self.blocks[0].run(0)
        b = self.blocks[k]
        i = bisect.bisect_right(b.seqs, seq) - 1
        if seq < b.seqs[i] + b.counts[i]:
            return b.run(i)
        if i + 1 < len(b.jobs):
            return b.run(i + 1)
        return self.blocks[k + 1].run(0) if k + 1 < len(self.blocks) else None

    def first_seq_at(self, time: int) -> int | None:
        """A seq no later than the first line whose time may be `time` or later: the first seq
        of the run before the first run whose floor is at least `time` (floors never go down,
        and a run's lines are at most the next run's floor)."""
        blocks = self.blocks
        k = bisect.bisect_left(blocks, time, key=lambda b: b.floors[0])
        if k == 0:
            return self.first_seq
        b = blocks[k - 1]  # its first floor is before `time`, so i >= 1
        i = bisect.bisect_left(b.floors, time)
        return b.seqs[i - 1]

    def iter_runs(self) -> Iterator[Run]:
        for b in self.blocks:
            for i in range(len(b.jobs)):
                yield b.run(i)


class Sequencer:
    """Gives each offered line its position, encodes it into the ring and indexes it.
    `resolve(job_id)` says whether (JobInfo) or not (None) a job is shipped; `listeners` are
    called after lines were added (a shipper's wake-up)."""

    def __init__(
        self,
        host_id: str,
        resolve: Callable[[str], JobInfo | None],
        ring_messages: int = RING_MESSAGES,
        ring_bytes: int = RING_BYTES,
        index_runs: int = INDEX_RUNS,
        first_seq: int | None = None,
    ) -> None:
        self.host_id = host_id
        self.resolve = resolve
        self.ring = Ring(ring_messages, ring_bytes)
        # the index covers at least what the ring holds, even with one run per line
        self.index = Index(max(index_runs, ring_messages + BLOCK_RUNS))
        self.next_seq = first_seq if first_seq is not None else _time.time_ns() // 1000
        self.prev_time = 0
        self.jobs: dict[str, JobInfo | None] = {}
        self.listeners: list[Callable[[], None]] = []
        self.duplicates = 0
        self.unread = 0  # lines the hook skipped, indexed without their text
        self._t_text = ""  # the last line's time as text and in ns: a chunk's lines share it
        self._t_ns = 0

    # --- lines in ---------------------------------------------------------------------------

    def job(self, job_id: str) -> JobInfo | None:
        if job_id in self.jobs:
            return self.jobs[job_id]
        info = self.jobs[job_id] = self.resolve(job_id)
        return info

    def forget(self, job_id: str) -> None:
        """The job is gone: drop it from the lookup (its runs keep their JobInfo)."""
        self.jobs.pop(job_id, None)

    def offer(self, job_id: str, entry: Entry) -> None:
        """One line from the hook. Never blocks: a few dict and list operations."""
        info = self.jobs[job_id] if job_id in self.jobs else self.job(job_id)
        if info is None:
            return
        n = entry["n"]
        if n <= info.last_n:
            self.duplicates += 1
            return
        if info.last_n and n > info.last_n + 1:
            self._skip(info, n)
        t = entry["t"]
        if t != self._t_text:
            self._t_text, self._t_ns = t, parse_time(t)
        floor = self.prev_time
        time = self._t_ns if self._t_ns > floor else floor
        self.prev_time = time
        seq = self.next_seq
        self.next_seq = seq + 1
        info.last_n = n
        self.index.add(seq, info, n, 1, floor)
        msg = Message(info.app_id, self.host_id, info.job_id, info.process_type,
                      entry["s"], time, seq, entry["m"])  # fmt: skip
        self.ring.append(seq, time, format_message(msg))
        for wake in self.listeners:
            wake()

    def _skip(self, info: JobInfo, n: int) -> None:
        """Lines `last_n+1 .. n-1` of a job were never offered (a daemon restart, a feed that
        dropped): index them so shippers read them from the file. They are older than line `n`,
        which follows them, so the floor keeps the order."""
        count = n - info.last_n - 1
        self.index.add(self.next_seq, info, info.last_n + 1, count, self.prev_time)
        self.next_seq += count
        self.unread += count
        log.info("logmux: job %s lines %d-%d indexed from its log file", info.job_id,
                 info.last_n + 1, n - 1)  # fmt: skip

    # --- where a shipper starts ---------------------------------------------------------------

    def start_after(self, cursor: Cursor | None) -> tuple[int, int]:
        """Where to resume for an aggregator whose cursor for this host is `cursor`: the first
        seq to send, and the time before which lines are skipped (0: none).

        - no cursor: from the oldest line in the ring (an aggregator new to this host);
        - a cursor this sequence gave out: right after it;
        - a cursor from an earlier daemon (or one the index no longer covers): by time, from the
          first line at or after the cursor's time. Lines of exactly that time may have been
          shipped already; they are sent again, and the aggregator keeps them (their seqs are
          above the cursor's): see docs/logmux.md#after-a-daemon-restart.
        """
        if cursor is None:
            oldest = self.ring.oldest
            return (oldest if oldest is not None else self.next_seq), 0
        first = self.index.first_seq
        if first is not None and first <= cursor.seq < self.next_seq:
            return cursor.seq + 1, 0
        start = self.index.first_seq_at(cursor.time)
        return (start if start is not None else self.next_seq), cursor.time

    # --- across a daemon restart --------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """What a daemon stopping cleanly saves, so the next one resumes exactly."""
        jobs: dict[str, JobInfo] = {}
        runs = []
        for r in self.index.iter_runs():
            jobs[r.job.job_id] = r.job
            runs.append([r.first_seq, r.job.job_id, r.first_n, r.count, r.floor])
        for info in self.jobs.values():
            if info is not None:
                jobs[info.job_id] = info
        return {
            "version": 1,
            "host_id": self.host_id,
            "next_seq": self.next_seq,
            "prev_time": self.prev_time,
            "jobs": {
                j.job_id: {
                    "app": j.app_id,
                    "type": j.process_type,
                    "log": j.log_path,
                    "last_n": j.last_n,
                }
                for j in jobs.values()
            },  # fmt: skip
            "runs": runs,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take up a saved sequence (before any line is offered). Jobs the saved state knows
        keep their `last_n`, so the lines the hook offers again are dropped."""
        jobs = {
            jid: JobInfo(jid, d["app"], d["type"], d["log"], int(d["last_n"]))
            for jid, d in state["jobs"].items()
        }
        for first_seq, jid, first_n, count, floor in state["runs"]:
            self.index.add(first_seq, jobs[jid], first_n, count, floor)
        self.next_seq = max(self.next_seq, int(state["next_seq"]))
        self.prev_time = int(state["prev_time"])
        for jid, info in jobs.items():
            current = self.resolve(jid)
            if current is not None:  # still known to the host: the lookup takes the saved one
                self.jobs[jid] = info

    def stats(self) -> dict[str, Any]:
        return {
            "next_seq": self.next_seq,
            "ring_messages": len(self.ring),
            "ring_bytes": self.ring.bytes,
            "ring_oldest_seq": self.ring.oldest,
            "index_runs": self.index.runs,
            "index_first_seq": self.index.first_seq,
            "duplicates_dropped": self.duplicates,
            "unread_lines_indexed": self.unread,
        }
