"""One aggregator instance's shipper: a TCP connection to its syslog port carrying every line
of the host's sequence after the aggregator's cursor for this host, in order.

Each connection starts by asking the aggregator's API for `GET /cursors` and resuming after
this host's cursor (`Sequencer.start_after`); from then on the lines go out as they come,
taken from the ring while it holds them, else read back from the job log files through the
index (then from the ring again once the shipper has caught up). A shipper that is behind
holds only its place in the sequence, a few open files and one write buffer: it never makes
the ring, or anything else, grow. Writes wait for the socket (`drain`, with the transport's
buffer at most WRITE_BUFFER), so a slow aggregator slows only its own shipper. On any error the
connection is closed and, after a back-off (BACKOFF_MIN doubling up to BACKOFF_MAX), made
again, and the cursor asked again: nothing is lost (the aggregator has what it has) and
nothing is accepted twice (what it has is at or before its cursor).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from flynn_logaggregator.client import Client, Message, format_message
from flynn_logaggregator.types import parse_time

from flynn_host.logmux.sequencer import JobInfo, Run, Sequencer
from flynn_host.runtime.logs import LogReader

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
CURSOR_TIMEOUT = 10.0
BACKOFF_MIN = 0.5
BACKOFF_MAX = 5.0
# a connection that lasted this long starts its next back-off from BACKOFF_MIN again
STEADY = 10.0
WRITE_BUFFER = 256 * 1024
# a write that makes no progress for this long: the aggregator is stuck, connect again
STALL_TIMEOUT = 60.0
BATCH = 2000  # lines per write at most
FILE_BATCH = 2000  # lines per read from a log file
READERS = 32  # job log files a shipper keeps open


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class Shipper:
    """Ships the host's sequence to the aggregator at `syslog_addr` (API at `api_url`).
    `start()` runs it in the background; `stop()` ends it."""

    def __init__(self, sequencer: Sequencer, syslog_addr: str, api_url: str) -> None:
        self.sequencer = sequencer
        self.addr = syslog_addr
        self.api_url = api_url
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._readers: collections.OrderedDict[str, LogReader] = collections.OrderedDict()
        self.next_seq = 0  # the next seq to send
        self.min_time = 0  # while resuming by time: lines before this are skipped
        self.last_time = 0  # the time of the last line sent
        # what `GET /logmux/status` shows
        self.connected = False
        self.connections = 0
        self.sent = 0
        self.sent_from_files = 0
        self.lost = 0
        self.last_error = ""

    def start(self) -> None:
        self.sequencer.listeners.append(self._wake.set)
        self._task = asyncio.create_task(self._run(), name=f"logmux shipper {self.addr}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._wake.set in self.sequencer.listeners:
            self.sequencer.listeners.remove(self._wake.set)
        self._close_readers()

    def status(self) -> dict[str, Any]:
        return {
            "addr": self.addr,
            "api": self.api_url,
            "connected": self.connected,
            "connections": self.connections,
            "next_seq": self.next_seq,
            "sent": self.sent,
            "sent_from_files": self.sent_from_files,
            "lost": self.lost,
            "last_error": self.last_error,
        }

    # --- the connection -----------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_MIN
        while True:
            began = loop.time()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever it was: connect again
                error = f"{type(exc).__name__}: {exc}".rstrip(": ")
                if self.connected or error != self.last_error:
                    log.info("logmux: %s: %s; reconnecting", self.addr, error)
                self.last_error = error
            finally:
                self.connected = False
                self._close_readers()
            if loop.time() - began > STEADY:
                delay = BACKOFF_MIN
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _session(self) -> None:
        host, port = split_addr(self.addr)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                CONNECT_TIMEOUT)  # fmt: skip
        closed: asyncio.Future[bytes] | None = None
        try:
            writer.transport.set_write_buffer_limits(high=WRITE_BUFFER)
            # asked after connecting: what this connection sends comes after it
            async with Client(self.api_url) as api:
                cursors = await asyncio.wait_for(api.cursors(), CURSOR_TIMEOUT)
            cursor = cursors.get(self.sequencer.host_id)
            self.next_seq, self.min_time = self.sequencer.start_after(cursor)
            self.last_time = 0
            self.connected = True
            self.connections += 1
            log.info("logmux: shipping to %s from seq %d (its cursor: %s)", self.addr,
                     self.next_seq, cursor)  # fmt: skip
            # the aggregator never writes: a read that ends means the connection did
            closed = asyncio.ensure_future(reader.read(1))
            while True:
                frames = await self._next_frames()
                if frames:
                    writer.write(b"".join(frames))
                    self.sent += len(frames)
                    await asyncio.wait_for(writer.drain(), STALL_TIMEOUT)
                    continue
                if closed.done():
                    raise ConnectionError("the aggregator closed the connection")
                if self.next_seq < self.sequencer.next_seq:
                    continue  # progress without a line to send (skipped ones): go on
                self._wake.clear()
                wake = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({wake, closed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
        finally:
            if closed is not None:
                closed.cancel()
            writer.transport.abort()

    # --- what to send next --------------------------------------------------------------------

    async def _next_frames(self) -> list[bytes]:
        """The next lines to send, as frames (from the ring, else the files); [] when there
        is nothing after `next_seq` yet, or the lines skipped were all before `min_time`."""
        sq = self.sequencer
        start = self.next_seq
        if start >= sq.next_seq:
            return []
        times, frames = sq.ring.take(start, BATCH)
        if frames:
            self.next_seq = start + len(frames)
            if self.min_time:
                keep = next((i for i, t in enumerate(times) if t >= self.min_time), len(times))
                times, frames = times[keep:], frames[keep:]
                if frames:
                    self.min_time = 0
            if frames:
                self.last_time = times[-1]
            return frames
        if start < sq.index.dropped_before:
            self._lose(sq.index.dropped_before - start, "no longer in the index")
            start = sq.index.dropped_before
        run = sq.index.run_at(start)
        if run is None:  # no line after `start`: the seqs up to next_seq were never used
            self.next_seq = sq.next_seq
            return []
        # (a run after `start`: the seqs between were never used, as a restarted sequence's)
        self.next_seq = max(start, run.first_seq)
        return await self._read_run(run)

    async def _read_run(self, run: Run) -> list[bytes]:
        """The next lines of `run` from `next_seq` on, read from the job's log file."""
        first_n = run.first_n + (self.next_seq - run.first_seq)
        last_n = run.first_n + run.count - 1
        reader = self._reader(run.job)
        entries = await asyncio.to_thread(reader.read, first_n, min(last_n - first_n + 1,
                                                                    FILE_BATCH))  # fmt: skip
        entries = [e for e in entries if e["n"] <= last_n]
        if not entries:
            self._lose(run.end_seq - self.next_seq, f"gone from {run.job.log_path}")
            self.next_seq = run.end_seq
            return []
        if entries[0]["n"] > first_n:
            self._lose(entries[0]["n"] - first_n, f"rotated out of {run.job.log_path}")
        frames = []
        job, host_id = run.job, self.sequencer.host_id
        t_text, t_ns = "", 0
        for e in entries:
            if e["t"] != t_text:
                t_text, t_ns = e["t"], parse_time(e["t"])
            time = max(t_ns, run.floor, self.last_time)
            if self.min_time:
                if time < self.min_time:
                    continue
                self.min_time = 0
            seq = run.first_seq + (e["n"] - run.first_n)
            msg = Message(job.app_id, host_id, job.job_id, job.process_type, e.get("s", "stdout"),
                          time, seq, e.get("m", ""))  # fmt: skip
            frames.append(format_message(msg))
            self.last_time = time
        self.next_seq = run.first_seq + (entries[-1]["n"] - run.first_n) + 1
        self.sent_from_files += len(frames)
        return frames

    def _reader(self, job: JobInfo) -> LogReader:
        reader = self._readers.get(job.job_id)
        if reader is None:
            reader = self._readers[job.job_id] = LogReader(job.log_path)
            while len(self._readers) > READERS:
                self._readers.popitem(last=False)[1].close()
        self._readers.move_to_end(job.job_id)
        return reader

    def _close_readers(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def _lose(self, count: int, why: str) -> None:
        if count > 0:
            self.lost += count
            log.warning("logmux: %s: %d lines cannot be sent (%s)", self.addr, count, why)
