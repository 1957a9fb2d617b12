"""The boundary between the HTTP server and where blobs are kept: a `Store` is a handful of
async methods, and `pgstore` (PostgreSQL large objects, the default) and `dirstore` (a
directory) implement it.

A store's guarantees, which the server relies on: `put` makes the new blob visible whole or not
at all (an exception from the chunks it is fed leaves the previous blob, if any, as it was);
a reader that opened a blob keeps reading that version to the end, whatever PUT or DELETE
happens meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

from flynn_blobstore.types import BlobInfo

CHUNK = 1 << 20  # bytes per read from storage, and per write to it


class StoreError(Exception):
    """A request the store refuses (e.g. a name that is a directory in `dirstore`): 409."""


class Reader(Protocol):
    """An open blob: its metadata and its bytes, from one consistent version."""

    info: BlobInfo

    def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        """`length` bytes from `offset`, in chunks of at most `CHUNK` bytes."""
        ...


class Store(Protocol):
    def open(self, name: str) -> contextlib.AbstractAsyncContextManager[Reader | None]:
        """The blob `name` while inside (None if there is none)."""
        ...

    async def put(self, name: str, chunks: AsyncIterable[bytes], content_type: str) -> BlobInfo:
        """Store the bytes `chunks` yields under `name`, replacing what was there."""
        ...

    async def delete(self, name: str) -> bool:
        """Remove `name`; False if there was no such blob."""
        ...

    async def check(self) -> None:
        """Raise if the storage cannot be reached (the status endpoint)."""
        ...

    async def close(self) -> None: ...


async def rechunk(chunks: AsyncIterable[bytes], size: int = CHUNK) -> AsyncIterator[bytes]:
    """`chunks` regrouped into pieces of `size` bytes (the last may be shorter): fewer, larger
    writes to storage whatever sizes the network delivers."""
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)
