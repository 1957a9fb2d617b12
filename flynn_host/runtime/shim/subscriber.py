"""Subscribers: the shim's clients that receive the container's output as it happens
(streaming `attach` and `follow_logs`), with the flow control that keeps a slow or vanished
client from holding the container back, and the stream helpers the two requests share.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from flynn_host.runtime.shim.startup import READ_SIZE

CLIENT_BUFFER_LIMIT = 8 * 1024 * 1024  # a client this far behind is dropped, not waited for


class Subscriber:
    """A client that receives output as it happens.

    While its replay (log entries from the files) is being written, live data is held back so
    it cannot overtake the replay. A client that falls too far behind is disconnected rather
    than slowing the container down or growing the shim without bound; one that closes its
    end is gone too (Flynn clients end their stdin with an empty frame, not by shutting down).
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.held: list[bytes] | None = []
        self.held_bytes = 0
        self.gone = asyncio.Event()

    def send(self, data: bytes) -> None:
        if self.gone.is_set():
            return
        if self.writer.is_closing():
            self.gone.set()
            return
        if self.held is not None:
            self.held.append(data)
            self.held_bytes += len(data)
            behind = self.held_bytes
        else:
            self.writer.write(data)
            behind = self.writer.transport.get_write_buffer_size()
        if behind > CLIENT_BUFFER_LIMIT:
            self.writer.transport.abort()
            self.gone.set()

    async def release(self) -> None:
        """The replay is written: send what was held and from now on write directly."""
        held, self.held = self.held or [], None
        if not self.gone.is_set():
            for data in held:
                self.writer.write(data)
            await self.writer.drain()

    async def wait_for(self, finished: asyncio.Event) -> bool:
        """Wait until `finished` is set or the client is gone; True if it is still there."""
        waiters = [asyncio.ensure_future(finished.wait()), asyncio.ensure_future(self.gone.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return not self.gone.is_set()


async def write_all(writer: asyncio.StreamWriter, chunks: Iterator[bytes]) -> None:
    """Write `chunks`, waiting for the client now and then so a big replay is not all in memory."""
    pending = 0
    for chunk in chunks:
        writer.write(chunk)
        pending += len(chunk)
        if pending >= READ_SIZE:
            await writer.drain()
            pending = 0
    await writer.drain()


async def discard_until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(READ_SIZE):
        pass


async def watch_hangup(reader: asyncio.StreamReader, sub: Subscriber) -> None:
    """Notice when a client that only listens closes its connection."""
    with contextlib.suppress(OSError):
        while await reader.read(READ_SIZE):
            pass
    sub.gone.set()
