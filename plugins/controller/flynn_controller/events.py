"""Events: every change the controller makes writes a row in `events`, in the same transaction
as the change, and every `web` process fans the rows out to its SSE subscribers.

Delivery across processes uses PostgreSQL `LISTEN/NOTIFY`: `emit` notifies channel
`flynn_controller_events` and each process's `EventHub` listens on a dedicated connection.
A notification only says "there is something new": the hub then reads every row above the
last id it delivered, in id order, so a lost notification (the listener reconnecting after a
fail-over) delays events but never loses one.

No gap, ever: `emit` takes a transaction-scoped advisory lock before taking the next id, so
event ids become visible in the order they were given out. Without it a transaction holding
id 10 could commit after one holding id 11, and a subscriber that had seen 11 would resume
past 10 with `Last-Event-Id` and never see it. The price is that event-writing transactions
commit one at a time from the moment they write their event, which handlers do last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from flynn_controller import db
from flynn_controller.types import fmt_time

log = logging.getLogger("flynn_controller.events")

CHANNEL = "flynn_controller_events"
BUFFER = 1000  # events a subscriber may fall behind by before its stream is ended
OVERFLOW = "event stream buffer overflow"
# how often the hub looks for new rows even without a notification (a safety net)
POLL_INTERVAL = 5.0
FETCH_BATCH = 500

EVENT_COLUMNS = "event_id, app_id, object_type, object_id, data, created_at"


async def emit(
    conn: asyncpg.Connection,
    object_type: str,
    object_id: str,
    data: Any,
    app_id: str | None = None,
    unique_id: str | None = None,
) -> int | None:
    """Write an event inside the caller's transaction; returns its id, or None when an event
    with the same `unique_id` exists already (Flynn's one event per job and state)."""
    event_id: int | None = await conn.fetchval(
        "SELECT flynn_emit_event($1, $2, $3, $4, $5, $6)",  # migrations/0002_emit_function.sql
        db.EVENT_LOCK,
        app_id,
        object_type,
        object_id,
        unique_id,
        data,
    )
    return event_id


def event_json(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {"id": row["event_id"]}
    if row["app_id"] is not None:
        out["app"] = str(row["app_id"])
    out["object_type"] = row["object_type"]
    out["object_id"] = row["object_id"]
    if row["data"] is not None:
        out["data"] = row["data"]
    out["created_at"] = fmt_time(row["created_at"])
    return out


@dataclass
class EventFilter:
    app_id: str | None = None
    object_types: frozenset[str] = frozenset()
    object_id: str | None = None

    def matches(self, event: dict[str, Any]) -> bool:
        if self.app_id is not None and event.get("app") != self.app_id:
            return False
        if self.object_types and event["object_type"] not in self.object_types:
            return False
        return self.object_id is None or event["object_id"] == self.object_id

    def sql(self, first_param: int) -> tuple[str, list[Any]]:
        """A WHERE fragment (`AND ...`) and its arguments, numbered from `first_param`."""
        clauses, args = [], []
        if self.app_id is not None:
            args.append(self.app_id)
            clauses.append(f"app_id = ${first_param + len(args) - 1}")
        if self.object_types:
            args.append(list(self.object_types))
            clauses.append(f"object_type = ANY(${first_param + len(args) - 1})")
        if self.object_id is not None:
            args.append(self.object_id)
            clauses.append(f"object_id = ${first_param + len(args) - 1}")
        return "".join(f" AND {c}" for c in clauses), args


@dataclass(eq=False)
class Subscription:
    """One subscriber's queue of events. `None` in the queue ends the stream, with `error` set
    when it overflowed or the hub closed."""

    filter: EventFilter
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    error: str | None = None

    def deliver(self, event: dict[str, Any]) -> None:
        if self.error is not None or not self.filter.matches(event):
            return
        if self.queue.qsize() >= BUFFER:
            self.error = OVERFLOW
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(event)


class EventHub:
    """This process's listener and fan-out of events."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.subscriptions: set[Subscription] = set()
        self.last_id = 0
        self.listening = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.last_id = await self.pool.fetchval("SELECT coalesce(max(event_id), 0) FROM events")
        self._tasks = [
            asyncio.create_task(self._listen(), name="events-listen"),
            asyncio.create_task(self._deliver_loop(), name="events-deliver"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sub in list(self.subscriptions):
            sub.error = sub.error or "controller shutting down"
            sub.queue.put_nowait(None)
        self.subscriptions.clear()

    def subscribe(self, flt: EventFilter) -> Subscription:
        sub = Subscription(flt)
        self.subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)

    async def _listen(self) -> None:
        """Hold a LISTEN connection; reconnect (and look for missed rows) when it breaks."""
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await db.connect(timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, lambda *_a: self._wake.set())
                self.listening = True
                self._wake.set()  # rows written while we were not listening
                while not lost.is_set():
                    # a half-open connection after a fail-over is found by this query's timeout
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 10)
                    if not lost.is_set():
                        await conn.fetchval("SELECT 1", timeout=5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect
                log.warning("event listener: %s; reconnecting", exc)
            finally:
                self.listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            await asyncio.sleep(1)

    async def _deliver_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL)
            self._wake.clear()
            try:
                await self._deliver_new()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database is away; try again later
                log.warning("event delivery: %s", exc)
                await asyncio.sleep(1)
                self._wake.set()

    async def _deliver_new(self) -> None:
        while True:
            rows = await self.pool.fetch(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE event_id > $1"
                " ORDER BY event_id LIMIT $2",
                self.last_id,
                FETCH_BATCH,
            )
            for row in rows:
                event = event_json(row)
                for sub in list(self.subscriptions):
                    sub.deliver(event)
                self.last_id = row["event_id"]
            if len(rows) < FETCH_BATCH:
                return


async def newest_id(pool: asyncpg.Pool) -> int:
    """The id of the newest stored event: a new subscriber's floor, so that events committed
    before it subscribed (which the hub may not have passed on yet) are not sent as live."""
    return int(await pool.fetchval("SELECT coalesce(max(event_id), 0) FROM events"))


async def past_events(
    pool: asyncpg.Pool, flt: EventFilter, after_id: int, count: int | None = None
) -> list[dict[str, Any]]:
    """Stored events above `after_id` matching `flt`, oldest first (the newest `count` of
    them when given)."""
    where, args = flt.sql(2)
    query = f"SELECT {EVENT_COLUMNS} FROM events WHERE event_id > $1{where}"
    if count:
        query = f"SELECT * FROM ({query} ORDER BY event_id DESC LIMIT {int(count)}) e"
    rows = await pool.fetch(query + " ORDER BY event_id", after_id, *args)
    return [event_json(r) for r in rows]


def types_filter(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v for v in values if v)
