"""The aggregator's two servers: the syslog listener (RFC 6587 frames of RFC 5424 messages from
the hosts, `SyslogProtocol`) and the HTTP API (`make_app`):

- `GET /log/:app_id` `?follow=true&lines=N&job_id=&process_type=&stream_types=stdout,stderr,init`:
  newline-delimited JSON messages; without `follow` the last `lines` (all when 0 or absent),
  with `follow` only new ones, or the last `lines` and then new ones; a follow ends when the
  client goes away, or when it falls FOLLOWER_QUEUE messages behind.
- `GET /cursors`: `{host_id: {"time","seq"}}`, where each host resumes.
- `GET /snapshot`: NDJSON, a `{"cursors": {...}}` line then one message per line (with its
  `app_id` and `seq`), each app's oldest first; what a new instance loads from the leader.
- `GET /.well-known/status`: `{"data": {"status": "healthy"}}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from flynn_host.errors import FlynnError, ValidationError
from flynn_logaggregator.buffer import Aggregator, Filter
from flynn_logaggregator.syslog import FrameError, FrameParser, MessageError, parse_message
from flynn_logaggregator.types import MAX_LINES, MAX_MESSAGE, STATUS_PATH, STREAMS, Message

log = logging.getLogger(__name__)

AGGREGATOR = web.AppKey("aggregator", Aggregator)
NDJSON = "application/json"
SNAPSHOT_CHUNK = 1000


class SyslogProtocol(asyncio.Protocol):
    """One host's connection: frames in, messages into the aggregator, nothing back. A bad
    frame closes the connection (the host reconnects and resumes from its cursor)."""

    def __init__(self, aggregator: Aggregator, max_message: int = MAX_MESSAGE) -> None:
        self.aggregator = aggregator
        self.parser = FrameParser(max_message)
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.bad_messages = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername")

    def data_received(self, data: bytes) -> None:
        try:
            self.ingest(self.parser.feed(data))
        except FrameError as exc:
            self.ingest(exc.frames)
            log.warning("syslog: closing connection from %s: %s", self.peer, exc)
            assert self.transport is not None
            self.transport.abort()

    def ingest(self, frames: list[bytes]) -> None:
        add = self.aggregator.add
        for frame in frames:
            try:
                m = parse_message(frame)
            except MessageError as exc:
                # a frame we cannot use is skipped: the framing itself is still in step
                self.bad_messages += 1
                if self.bad_messages <= 10:
                    log.warning("syslog: skipping a message from %s: %s", self.peer, exc)
                continue
            if m.app_id:
                add(m)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.parser.buffered:
            log.info("syslog: %s went away mid-frame", self.peer)


def error_response(exc: FlynnError) -> web.Response:
    return web.json_response(exc.to_json(), status=exc.status)


def log_query(request: web.Request) -> tuple[bool, int, Filter]:
    q = request.query
    follow = q.get("follow", "") in ("true", "1")
    raw = q.get("lines", "")
    try:
        lines = int(raw) if raw else 0
    except ValueError:
        raise ValidationError("lines", "must be an integer") from None
    if not 0 <= lines <= MAX_LINES:
        raise ValidationError("lines", f"must be between 0 and {MAX_LINES}")
    streams = frozenset(s for s in q.get("stream_types", "").split(",") if s)
    if streams - set(STREAMS):
        raise ValidationError("stream_types", f"must be among {','.join(STREAMS)}")
    return follow, lines, Filter(q.get("job_id", ""), q.get("process_type", ""), streams)


def _ndjson(msgs: list[Message]) -> bytes:
    return "".join(json.dumps(m.to_json()) + "\n" for m in msgs).encode()


async def get_log(request: web.Request) -> web.StreamResponse:
    agg = request.app[AGGREGATOR]
    app_id = request.match_info["app_id"]
    try:
        follow, lines, match = log_query(request)
    except FlynnError as exc:
        return error_response(exc)
    backlog = agg.read(app_id, lines, match) if (lines or not follow) else []
    follower = agg.follow(app_id, match) if follow else None  # no await since the read
    resp = web.StreamResponse(headers={"Content-Type": NDJSON})
    try:
        await resp.prepare(request)
        if backlog:
            await resp.write(_ndjson(backlog))
        while follower is not None:
            batch = await follower.next_batch()
            if not batch:
                if follower.dropped:
                    log.warning("log: dropped a follower of %s that fell behind", app_id)
                break
            await resp.write(_ndjson(batch))
    finally:
        if follower is not None:
            agg.unfollow(app_id, follower)
    await resp.write_eof()
    return resp


async def get_cursors(request: web.Request) -> web.Response:
    agg = request.app[AGGREGATOR]
    return web.json_response({h: c.to_json() for h, c in agg.cursors.items()})


def snapshot_line(m: Message) -> str:
    d = m.to_json()
    d["app_id"] = m.app_id
    d["seq"] = m.seq
    return json.dumps(d) + "\n"


async def get_snapshot(request: web.Request) -> web.StreamResponse:
    agg = request.app[AGGREGATOR]
    cursors = {h: c.to_json() for h, c in agg.cursors.items()}
    msgs = list(agg.snapshot())  # taken at once: the buffers change while we write
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    await resp.write((json.dumps({"cursors": cursors}) + "\n").encode())
    for i in range(0, len(msgs), SNAPSHOT_CHUNK):
        await resp.write("".join(map(snapshot_line, msgs[i : i + SNAPSHOT_CHUNK])).encode())
    await resp.write_eof()
    return resp


async def status(request: web.Request) -> web.Response:
    return web.json_response({"data": {"status": "healthy"}})


def make_app(aggregator: Aggregator) -> web.Application:
    app = web.Application()
    app[AGGREGATOR] = aggregator

    async def close_followers(app: web.Application) -> None:
        aggregator.close_followers()

    app.on_shutdown.append(close_followers)
    app.router.add_get("/log/{app_id}", get_log)
    app.router.add_get("/cursors", get_cursors)
    app.router.add_get("/snapshot", get_snapshot)
    app.router.add_get(STATUS_PATH, status)
    return app
