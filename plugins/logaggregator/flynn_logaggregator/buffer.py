"""The aggregator's state: a ring buffer of the newest messages of each app, each host's cursor
(what the aggregator has accepted from it, so duplicates are dropped and a host knows where to
resume), and the followers of each app, fed as messages are added."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from flynn_logaggregator.types import BUFFER_BYTES, BUFFER_MESSAGES, Cursor, Message

log = logging.getLogger(__name__)

# messages queued for one follower before it is judged too slow and dropped
FOLLOWER_QUEUE = 10_000


@dataclass(frozen=True)
class Filter:
    """Which of an app's messages a reader wants: empty fields match everything."""

    job_id: str = ""
    process_type: str = ""
    streams: frozenset[str] = frozenset()

    def __call__(self, m: Message) -> bool:
        return (
            (not self.job_id or m.job_id == self.job_id)
            and (not self.process_type or m.process_type == self.process_type)
            and (not self.streams or m.stream in self.streams)
        )


class AppBuffer:
    """The newest messages of one app: at most `max_messages`, and at most `max_bytes` of text
    (the oldest go first)."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.messages: collections.deque[Message] = collections.deque()
        self.bytes = 0

    def add(self, m: Message) -> None:
        msgs = self.messages
        msgs.append(m)
        self.bytes += len(m.msg)
        while len(msgs) > self.max_messages or (self.bytes > self.max_bytes and len(msgs) > 1):
            self.bytes -= len(msgs.popleft().msg)

    def last(self, n: int, match: Filter) -> list[Message]:
        """The newest `n` matching messages, oldest first (all of them when n is 0)."""
        out: list[Message] = []
        for m in reversed(self.messages):
            if match(m):
                out.append(m)
                if n and len(out) == n:
                    break
        out.reverse()
        return out


class Follower:
    """A reader following an app: new matching messages are queued for it. When the queue is
    full the follower is closed (`dropped`) instead of holding up ingest."""

    def __init__(self, match: Filter, limit: int = FOLLOWER_QUEUE) -> None:
        self.match = match
        self.limit = limit
        self.queue: collections.deque[Message] = collections.deque()
        self.ready = asyncio.Event()
        self.closed = False
        self.dropped = False

    def offer(self, m: Message) -> None:
        if self.closed or not self.match(m):
            return
        if len(self.queue) >= self.limit:
            self.dropped = self.closed = True
            self.queue.clear()
        else:
            self.queue.append(m)
        self.ready.set()

    async def next_batch(self) -> list[Message]:
        """The queued messages, waiting for one if there are none; [] once closed."""
        while not self.queue and not self.closed:
            self.ready.clear()
            await self.ready.wait()
        batch = list(self.queue)
        self.queue.clear()
        return batch


class Aggregator:
    def __init__(self, max_messages: int = BUFFER_MESSAGES, max_bytes: int = BUFFER_BYTES) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.apps: dict[str, AppBuffer] = {}
        self.cursors: dict[str, Cursor] = {}
        self.followers: dict[str, set[Follower]] = {}
        self.accepted = 0
        self.duplicates = 0

    def add(self, m: Message) -> bool:
        """Keep `m` unless it is at or before its host's cursor; False for a duplicate. A
        message without a seq (0) is always kept and does not move the cursor."""
        if m.seq:
            pos = Cursor(m.time, m.seq)
            cur = self.cursors.get(m.host_id)
            if cur is not None and pos <= cur:
                self.duplicates += 1
                return False
            self.cursors[m.host_id] = pos
        self._store(m)
        followers = self.followers.get(m.app_id)
        if followers:
            for f in followers:
                f.offer(m)
        return True

    def _store(self, m: Message) -> None:
        buf = self.apps.get(m.app_id)
        if buf is None:
            buf = self.apps[m.app_id] = AppBuffer(self.max_messages, self.max_bytes)
        buf.add(m)
        self.accepted += 1

    def read(self, app_id: str, lines: int, match: Filter) -> list[Message]:
        buf = self.apps.get(app_id)
        return buf.last(lines, match) if buf else []

    def follow(self, app_id: str, match: Filter) -> Follower:
        """A follower of the messages added from now on (no await between a `read` and this,
        so the backlog and the stream neither overlap nor leave a gap)."""
        f = Follower(match)
        self.followers.setdefault(app_id, set()).add(f)
        return f

    def unfollow(self, app_id: str, f: Follower) -> None:
        f.closed = True
        f.ready.set()
        fs = self.followers.get(app_id)
        if fs is not None:
            fs.discard(f)
            if not fs:
                del self.followers[app_id]

    def close_followers(self) -> None:
        for app_id, fs in list(self.followers.items()):
            for f in list(fs):
                self.unfollow(app_id, f)

    # ---- snapshots ----

    def snapshot(self) -> Iterator[Message]:
        for buf in list(self.apps.values()):
            yield from list(buf.messages)

    def restore(self, cursors: dict[str, Cursor], messages: Iterable[Message]) -> int:
        """Load a snapshot (before serving): the messages in order, then the cursors."""
        n = 0
        for m in messages:
            self._store(m)
            n += 1
        for host, cur in cursors.items():
            if host not in self.cursors or self.cursors[host] < cur:
                self.cursors[host] = cur
        return n
