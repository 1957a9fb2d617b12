"""What other components import to use the aggregator: `Client` for its API (the controller's
`/apps/:app/log`, a follower loading a snapshot) and, for the host's log shipper, the wire
encoder `format_message` with the `Message` and `Cursor` it takes (the same codec the aggregator
decodes with, flynn_logaggregator.syslog); `Emitter` for a component that writes lines into
apps' logs itself (the controller's deploy progress).

    async with Client("http://logaggregator.discoverd") as c:
        async for m in c.log(app_id, follow=True, lines=10):
            print(m.to_json())

A proxy that passes the messages on unchanged (the controller) opens the body itself with
`log_body`, so it neither decodes nor re-encodes them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

from flynn_host.errors import FlynnError
from flynn_logaggregator.syslog import FrameParser, format_message, parse_message
from flynn_logaggregator.types import Cursor, Message

__all__ = [
    "Client", "Cursor", "Emitter", "FrameParser", "Message", "format_message", "parse_message"
]  # fmt: skip

log = logging.getLogger("flynn_logaggregator.client")

DEFAULT_URL = "http://logaggregator.discoverd"
READ_LIMIT = 1024 * 1024  # one NDJSON line at most (a 64 KiB message escaped)


class Client:
    def __init__(self, url: str = DEFAULT_URL, session: aiohttp.ClientSession | None = None):
        self.url = url.rstrip("/")
        self._own = session is None
        self._session = session

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()
        self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                read_bufsize=READ_LIMIT,
            )
        return self._session

    @contextlib.asynccontextmanager
    async def _body(self, path: str, params: dict[str, str]) -> AsyncIterator[aiohttp.StreamReader]:
        """The body of a 200 answer, open until the block ends; FlynnError for any other."""
        async with self.session.get(self.url + path, params=params) as resp:
            if resp.status != 200:
                body = await resp.read()
                try:
                    err = json.loads(body)
                    raise FlynnError(err["code"], err["message"], err.get("detail"))
                except (ValueError, KeyError, TypeError):
                    raise FlynnError("unknown_error", body.decode(errors="replace")) from None
            yield resp.content

    async def _lines(self, path: str, params: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        async with self._body(path, params) as body:
            while line := await body.readline():
                if line.strip():
                    yield json.loads(line)

    def log_body(
        self,
        app_id: str,
        *,
        follow: bool = False,
        lines: int | None = None,
        job_id: str = "",
        process_type: str = "",
        stream_types: tuple[str, ...] = (),
    ) -> contextlib.AbstractAsyncContextManager[aiohttp.StreamReader]:
        """`GET /log/:app_id` undecoded: `async with c.log_body(app_id) as body:` gives the
        NDJSON body as it arrives (one message per line), open until the block ends. Raises
        FlynnError when the aggregator answers an error (a bad `lines`), and aiohttp's
        ClientError (an OSError when it cannot connect) when it cannot be reached."""
        params: dict[str, str] = {}
        if follow:
            params["follow"] = "true"
        if lines is not None:
            params["lines"] = str(lines)
        if job_id:
            params["job_id"] = job_id
        if process_type:
            params["process_type"] = process_type
        if stream_types:
            params["stream_types"] = ",".join(stream_types)
        return self._body(f"/log/{app_id}", params)

    async def log(
        self,
        app_id: str,
        *,
        follow: bool = False,
        lines: int | None = None,
        job_id: str = "",
        process_type: str = "",
        stream_types: tuple[str, ...] = (),
    ) -> AsyncIterator[Message]:
        """`GET /log/:app_id`: an app's messages (see server.py for what the options mean)."""
        async with self.log_body(
            app_id,
            follow=follow,
            lines=lines,
            job_id=job_id,
            process_type=process_type,
            stream_types=stream_types,
        ) as body:
            while line := await body.readline():
                if line.strip():
                    yield Message.from_json(json.loads(line), app_id)

    async def cursors(self) -> dict[str, Cursor]:
        """Each host's cursor: a host resumes shipping after it."""
        async with self.session.get(self.url + "/cursors") as resp:
            resp.raise_for_status()
            return {h: Cursor.from_json(c) for h, c in (await resp.json()).items()}

    async def snapshot(self) -> tuple[dict[str, Cursor], list[Message]]:
        """`GET /snapshot`: the cursors and every buffered message, each app's oldest first."""
        cursors: dict[str, Cursor] = {}
        msgs: list[Message] = []
        async for d in self._lines("/snapshot", {}):
            if "cursors" in d:
                cursors = {h: Cursor.from_json(c) for h, c in d["cursors"].items()}
            else:
                msgs.append(Message.from_json(d))
        return cursors, msgs


class Emitter:
    """Lines a platform component writes into apps' logs (the controller's deploy progress):
    `send(message)` never waits; a background task delivers each message to every aggregator
    instance that `addrs()` returns (the syslog `ip:port`s, e.g. discoverd's instances of
    `logaggregator`), over one connection per instance.

    Best effort, unlike a host's shipping: such messages carry no sequence number (no cursor
    to resume from), so a message that finds no aggregator or a broken connection is dropped
    (logged), and at most `max_queue` wait to be sent (the oldest go first). It never slows
    the component down.
    """

    ADDRS_TTL = 5.0  # seconds the instance list is reused
    CONNECT_TIMEOUT = 2.0
    WRITE_TIMEOUT = 5.0

    def __init__(self, addrs: Callable[[], Awaitable[list[str]]], max_queue: int = 1000) -> None:
        self.addrs = addrs
        self.queue: collections.deque[Message] = collections.deque(maxlen=max_queue)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing queued or being written
        self._idle.set()
        self._conns: dict[str, asyncio.StreamWriter] = {}
        self._known: list[str] = []
        self._known_at = -self.ADDRS_TTL
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0  # (message, instance) deliveries given up

    def send(self, message: Message) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="log-emitter")
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1  # the oldest makes room
        self.queue.append(message)
        self._idle.clear()
        self._wake.set()

    async def close(self) -> None:
        """Deliver what is queued (for at most a few seconds), then close the connections."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.WRITE_TIMEOUT)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for writer in self._conns.values():
            writer.close()
        self._conns.clear()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.queue:
                batch = [self.queue.popleft() for _ in range(len(self.queue))]
                data = b"".join(format_message(m) for m in batch)
                addrs = await self._instances()
                if not addrs:
                    self.dropped += len(batch)
                    log.info("no log aggregator: %d line(s) dropped", len(batch))
                for addr in addrs:
                    if not await self._write(addr, data):
                        self.dropped += len(batch)
            self._idle.set()

    async def _instances(self) -> list[str]:
        loop = asyncio.get_running_loop()
        if loop.time() - self._known_at >= self.ADDRS_TTL:
            try:
                self._known = list(await self.addrs())
                self._known_at = loop.time()
            except Exception as exc:  # noqa: BLE001 - discoverd away: keep the last list
                log.info("log aggregators: %s", exc)
        for gone in set(self._conns) - set(self._known):
            self._conns.pop(gone).close()
        return self._known

    async def _write(self, addr: str, data: bytes) -> bool:
        try:
            known = self._conns.get(addr)
            if known is None or known.is_closing():
                host, _, port = addr.rpartition(":")
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, int(port)), self.CONNECT_TIMEOUT
                )
                self._conns[addr] = writer
            else:
                writer = known
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self.WRITE_TIMEOUT)
            return True
        except (OSError, TimeoutError, ValueError) as exc:
            log.info("log aggregator %s: %s; line(s) dropped", addr, exc)
            if (broken := self._conns.pop(addr, None)) is not None:
                broken.close()
            return False
