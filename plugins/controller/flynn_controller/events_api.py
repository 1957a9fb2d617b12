"""`GET /events`: a JSON list (when the client asks for exactly `Accept: application/json`, as
the 2015 client's ListEvents does) or a Server-Sent Events stream, and `GET /events/:id`.

A stream subscribes first, then replays stored events above `Last-Event-Id` (or, with
`past=true`, from the start; the newest `count` of them when given), then passes on live
events, skipping any id it has already sent: a client that reconnects with the id of the last
event it got misses nothing and sees nothing twice.
"""

from __future__ import annotations

from aiohttp import web

from flynn_controller.api import HUB, Query, fetch_one, find_app, json_response, operation, pool
from flynn_controller.errors import APIError, NotFound
from flynn_controller.events import (
    EVENT_COLUMNS,
    EventFilter,
    event_json,
    newest_id,
    past_events,
)
from flynn_controller.sse import EventStream
from flynn_controller.types import OBJECT_TYPES

MAX_COUNT = 10000


async def _filter(request: web.Request) -> EventFilter:
    app_id = None
    if request.query.get("app_id"):
        app = await find_app(pool(request), request.query["app_id"])
        app_id = str(app["app_id"])
    asked = {t for t in request.query.get("object_types", "").split(",") if t}
    types = frozenset(asked & set(OBJECT_TYPES))
    if asked and not types:
        # only unknown types asked for: nothing can ever match (no object type has a space)
        types = frozenset({"no such type"})
    return EventFilter(app_id, types, request.query.get("object_id") or None)


@operation(
    "GET",
    "/events",
    "List events (Accept: application/json) or stream them (SSE)",
    response="event_list",
    stream=True,
    params=("app_id", "object_types", "object_id", "past", "count", "before_id", "since_id"),
)
async def events(request: web.Request) -> web.StreamResponse:
    q = Query(request)
    flt = await _filter(request)
    count = q.int("count", 0, MAX_COUNT)
    if request.headers.get("Accept") == "application/json":
        where, args = flt.sql(1)
        before, since = q.int("before_id"), q.int("since_id")
        if before is not None:
            args.append(before)
            where += f" AND event_id < ${len(args)}"
        if since is not None:
            args.append(since)
            where += f" AND event_id > ${len(args)}"
        limit = f" LIMIT {count}" if count else ""
        rows = await pool(request).fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE true{where} ORDER BY event_id DESC{limit}",
            *args,
        )
        return json_response([event_json(r) for r in rows])
    try:
        last_id = int(request.headers.get("Last-Event-Id") or 0)
    except ValueError:
        last_id = 0
    if not 0 <= last_id < 2**63:
        raise APIError(
            "validation_error", "Last-Event-Id must be an event id", {"field": "Last-Event-Id"}
        )
    hub = request.app[HUB]
    sub = hub.subscribe(flt)
    try:
        replay = q.bool("past") or last_id > 0
        sent = last_id if replay else await newest_id(pool(request))
        async with EventStream(request) as stream:
            if replay:
                for event in await past_events(pool(request), flt, last_id, count):
                    await stream.send(event)
                    sent = max(sent, event["id"])
            while True:
                event = await sub.queue.get()
                if event is None:
                    await stream.error(sub.error or "stream closed")
                    break
                if event["id"] <= sent:
                    continue
                await stream.send(event)
                sent = event["id"]
    finally:
        hub.unsubscribe(sub)
    return stream.response


@operation("GET", "/events/{id}", "Get an event", response="event")
async def get_event(request: web.Request) -> web.Response:
    try:
        event_id = int(request.match_info["id"])
    except ValueError:
        raise NotFound() from None
    if not 0 < event_id < 2**63:
        raise NotFound()
    row = await fetch_one(
        pool(request), f"SELECT {EVENT_COLUMNS} FROM events WHERE event_id = $1", event_id
    )
    return json_response(event_json(row))
