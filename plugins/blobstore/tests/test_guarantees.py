"""What the blobstore promises beyond the API, on each backend: a PUT that fails half-way
leaves nothing behind and the old blob intact, concurrent PUTs of one name end with one whole
blob, a download in progress keeps its version through a replace and a delete, and a large
blob streams through without the server holding it in memory."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from blobstore_store import Blobstore

from flynn_host.dev.host import wait_for

MB = 1 << 20


def leftovers_go(blobstore: Blobstore) -> None:
    """Wait until the server has cleaned up after a failed PUT (it notices the client has gone
    when it next reads)."""
    wait_for(lambda: blobstore.leftovers() == [], 10, "no large object or temporary file left")


def interrupted_put(blobstore: Blobstore, name: str, chunked: bool = False) -> None:
    """Send a PUT with a 10 MB body announced and 1 MB of it sent, then close."""
    host, port = blobstore.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        if chunked:
            s.sendall(f"PUT {name} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      .encode())  # fmt: skip
            for _ in range(16):
                s.sendall(b"10000\r\n" + b"c" * 0x10000 + b"\r\n")
        else:
            s.sendall(f"PUT {name} HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * MB}\r\n\r\n"
                      .encode())  # fmt: skip
            s.sendall(b"c" * MB)
        time.sleep(0.3)  # let the server start storing it


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_interrupted_put_leaves_the_old_blob(blobstore: Blobstore, name: str,
                                                      chunked: bool) -> None:  # fmt: skip
    url = blobstore.url + name
    async with aiohttp.ClientSession() as http:
        async with http.put(url, data=b"the old version") as r:
            assert r.status == 200
        objects = blobstore.large_objects() if blobstore.backend == "postgres" else 0
        await asyncio.to_thread(interrupted_put, blobstore, name, chunked)
        leftovers_go(blobstore)
        if blobstore.backend == "postgres":
            assert blobstore.large_objects() == objects
        async with http.get(url) as r:
            assert r.status == 200 and await r.read() == b"the old version"
        # and a new name stays missing
        await asyncio.to_thread(interrupted_put, blobstore, name + ".new", chunked)
        leftovers_go(blobstore)
        async with http.get(url + ".new") as r:
            assert r.status == 404
    assert "Traceback" not in blobstore.process.log_text()


async def slow_body(byte: bytes, n: int) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield byte * 256 * 1024
        await asyncio.sleep(0.01)


async def test_concurrent_puts_end_with_one_whole_blob(blobstore: Blobstore, name: str) -> None:
    url = blobstore.url + name
    bodies = [bytes([ord("a") + i]) for i in range(6)]
    async with aiohttp.ClientSession() as http:

        async def put(byte: bytes) -> int:
            async with http.put(url, data=slow_body(byte, 20)) as r:
                return r.status

        assert await asyncio.gather(*(put(b) for b in bodies)) == [200] * len(bodies)
        async with http.get(url) as r:
            data = await r.read()
    assert len(data) == 20 * 256 * 1024
    assert data in {b * len(data) for b in bodies}
    assert blobstore.leftovers() == []


async def test_a_download_keeps_its_version_through_replace_and_delete(
    blobstore: Blobstore, name: str
) -> None:
    url = blobstore.url + name
    old = os.urandom(MB) * 40
    async with aiohttp.ClientSession() as http:
        async with http.put(url, data=old) as r:
            assert r.status == 200
        async with http.get(url) as reader:
            first = await reader.content.readexactly(MB)
            # the reader is paused, its transaction (or file) open: replace, then delete
            if blobstore.backend == "postgres":
                open_reads = blobstore.sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                    " 'flynn-blobstore' AND xact_start IS NOT NULL"
                )
                assert open_reads == "1"
            async with http.put(url, data=b"new") as r:
                assert r.status == 200
            async with http.get(url) as r:
                assert await r.read() == b"new"
            async with http.delete(url) as r:
                assert r.status == 200
            rest = await reader.read()
        assert first + rest == old
        async with http.get(url) as r:
            assert r.status == 404
    # once the download finished, nothing of the old version is left
    assert blobstore.leftovers() == []
    if blobstore.backend == "postgres":
        assert blobstore.sql(f"SELECT count(*) FROM files WHERE name = '{name}'") == "0"


def test_a_client_leaving_a_download_ends_it(blobstore: Blobstore, name: str) -> None:
    host, port = blobstore.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"PUT {name} HTTP/1.1\r\nHost: x\r\nContent-Length: {30 * MB}\r\n\r\n".encode())
        s.sendall(b"d" * 30 * MB)
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET {name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    wait_for(lambda: "the client went away" in blobstore.process.log_text(), 10, "the GET ended")
    if blobstore.backend == "postgres":
        # its transaction is over, its connection back in the pool
        wait_for(lambda: blobstore.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flynn-blobstore'"
            " AND xact_start IS NOT NULL") == "0", 10, "the GET's transaction to end")  # fmt: skip
    assert "Traceback" not in blobstore.process.log_text()


BIG = 200 * MB


async def test_a_large_blob_streams_through(blobstore: Blobstore, name: str) -> None:
    url = blobstore.url + name
    block = os.urandom(MB)
    sent = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for i in range(BIG // MB):
            chunk = i.to_bytes(8, "big") + block[8:]
            sent.update(chunk)
            yield chunk

    rss_before = blobstore.process.rss()
    peak = rss_before
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        start = time.monotonic()
        async with http.put(url, data=body()) as r:
            assert r.status == 200
        put_s = time.monotonic() - start
        peak = max(peak, blobstore.process.rss())
        got = hashlib.sha256()
        size = 0
        start = time.monotonic()
        async with http.get(url) as r:
            assert r.status == 200 and r.headers["Content-Length"] == str(BIG)
            async for chunk in r.content.iter_chunked(MB):
                got.update(chunk)
                size += len(chunk)
                if size % (50 * MB) < len(chunk):
                    peak = max(peak, blobstore.process.rss())
        get_s = time.monotonic() - start
        assert size == BIG and got.hexdigest() == sent.hexdigest()
        assert r.headers["ETag"] == f'"{sent.hexdigest()}"'
        async with http.delete(url) as r:
            assert r.status == 200
    grew = max(peak, blobstore.process.rss()) - rss_before
    print(
        f"\n{blobstore.backend}: PUT {BIG / MB / put_s:.0f} MB/s, GET {BIG / MB / get_s:.0f} MB/s;"
        f" server RSS {rss_before / MB:.0f} MB before, grew {grew / MB:.1f} MB"
    )
    assert grew < 50 * MB
