"""The blobstore's HTTP API, against a real process on each backend: what Flynn's clients
(gitreceive, slugbuilder, slugrunner's curl) rely on."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from blobstore_store import Blobstore

DATA = bytes(range(256)) * 40  # 10240 bytes


async def put(http: aiohttp.ClientSession, url: str, data: bytes, **headers: str) -> None:
    async with http.put(url, data=data, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert await r.read() == b""


async def test_put_then_head_and_get(blobstore: Blobstore, http: aiohttp.ClientSession,
                                     name: str) -> None:  # fmt: skip
    url = blobstore.url + name
    await put(http, url, DATA, **{"Content-Type": "application/x-tar"})
    etag = f'"{hashlib.sha256(DATA).hexdigest()}"'
    for method in ("HEAD", "GET"):
        async with http.request(method, url) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == str(len(DATA))
            assert r.headers["Content-Type"] == "application/x-tar"
            assert r.headers["ETag"] == etag
            assert r.headers["Accept-Ranges"] == "bytes"
            assert await r.read() == (DATA if method == "GET" else b"")


async def test_content_type_defaults_to_octet_stream(blobstore: Blobstore, name: str) -> None:
    # a raw request: aiohttp's client would send a Content-Type of its own
    host, port = blobstore.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"PUT {name} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".encode())
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    async with aiohttp.ClientSession() as http, http.head(blobstore.url + name) as r:
        assert r.headers["Content-Type"] == "application/octet-stream"


async def test_paths_flynn_uses(blobstore: Blobstore, http: aiohttp.ClientSession) -> None:
    app, layer = uuid.uuid4(), hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    paths = [f"/repos/{app}.tar", f"/slugs/layers/{layer}.squashfs", f"/{app}-cache.tgz",
             f"/{app}.tgz"]  # fmt: skip
    for i, path in enumerate(paths):
        await put(http, blobstore.url + path, path.encode() * (i + 1))
    for i, path in enumerate(paths):
        async with http.get(blobstore.url + path) as r:
            assert r.status == 200 and await r.read() == path.encode() * (i + 1)


@pytest.mark.parametrize(
    ("header", "status", "content_range", "body"),
    [
        ("bytes=0-9", 206, "bytes 0-9/10240", DATA[:10]),
        ("bytes=100-", 206, "bytes 100-10239/10240", DATA[100:]),
        ("bytes=-5", 206, "bytes 10235-10239/10240", DATA[-5:]),
        ("bytes=10000-99999", 206, "bytes 10000-10239/10240", DATA[10000:]),
        ("bytes=-99999", 206, "bytes 0-10239/10240", DATA),
        ("bytes=10239-10239", 206, "bytes 10239-10239/10240", DATA[-1:]),
        ("bytes=10240-", 416, "bytes */10240", None),
        ("bytes=-0", 416, "bytes */10240", None),
        ("bytes=0-1,5-6", 200, None, DATA),  # several ranges: the whole blob
        ("bytes=9-3", 200, None, DATA),  # invalid: ignored
        ("lines=1-2", 200, None, DATA),
    ],
)
async def test_ranges(blobstore: Blobstore, http: aiohttp.ClientSession, name: str,
                      header: str, status: int, content_range: str | None,
                      body: bytes | None) -> None:  # fmt: skip
    url = blobstore.url + name
    await put(http, url, DATA)
    async with http.get(url, headers={"Range": header}) as r:
        assert r.status == status
        assert r.headers.get("Content-Range") == content_range
        if body is not None:
            assert await r.read() == body
            assert r.headers["Content-Length"] == str(len(body))


async def test_if_range_and_if_none_match(blobstore: Blobstore, http: aiohttp.ClientSession,
                                          name: str) -> None:  # fmt: skip
    url = blobstore.url + name
    await put(http, url, DATA)
    async with http.head(url) as r:
        etag = r.headers["ETag"]
    for inm in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        for method in ("GET", "HEAD"):
            async with http.request(method, url, headers={"If-None-Match": inm}) as r:
                assert r.status == 304 and r.headers["ETag"] == etag
                assert await r.read() == b""
    async with http.get(url, headers={"If-None-Match": '"other"'}) as r:
        assert r.status == 200 and await r.read() == DATA
    # a Range with an If-Range that no longer matches: the whole (new) blob
    async with http.get(url, headers={"Range": "bytes=0-0", "If-Range": '"old"'}) as r:
        assert r.status == 200 and await r.read() == DATA
    async with http.get(url, headers={"Range": "bytes=0-0", "If-Range": etag}) as r:
        assert r.status == 206 and await r.read() == DATA[:1]


async def test_put_replaces(blobstore: Blobstore, http: aiohttp.ClientSession, name: str) -> None:
    url = blobstore.url + name
    await put(http, url, b"first version", **{"Content-Type": "text/plain"})
    async with http.head(url) as r:
        first = r.headers["ETag"]
    await put(http, url, b"second", **{"Content-Type": "application/gzip"})
    async with http.get(url) as r:
        assert await r.read() == b"second"
        assert r.headers["ETag"] != first
        assert r.headers["Content-Type"] == "application/gzip"
    assert blobstore.leftovers() == []


async def test_empty_blob(blobstore: Blobstore, http: aiohttp.ClientSession, name: str) -> None:
    url = blobstore.url + name
    await put(http, url, b"")
    async with http.get(url) as r:
        assert r.status == 200 and r.headers["Content-Length"] == "0" and await r.read() == b""
    async with http.get(url, headers={"Range": "bytes=0-"}) as r:
        assert r.status == 416


async def test_chunked_put(blobstore: Blobstore, http: aiohttp.ClientSession, name: str) -> None:
    async def body() -> AsyncIterator[bytes]:
        for i in range(50):
            yield bytes([i]) * 3000

    url = blobstore.url + name
    async with http.put(url, data=body()) as r:
        assert r.status == 200
        assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
    async with http.get(url) as r:
        assert await r.read() == b"".join(bytes([i]) * 3000 for i in range(50))


async def test_delete(blobstore: Blobstore, http: aiohttp.ClientSession, name: str) -> None:
    url = blobstore.url + name
    await put(http, url, DATA)
    async with http.delete(url) as r:
        assert r.status == 200
    for method in ("GET", "DELETE"):
        async with http.request(method, url) as r:
            assert r.status == 404 and await r.text() == "NotFound"
    async with http.head(url) as r:
        assert r.status == 404
    assert blobstore.leftovers() == []


async def test_missing_and_root(blobstore: Blobstore, http: aiohttp.ClientSession) -> None:
    for path in ("/no/such/blob", "/", "/tests"):
        async with http.get(blobstore.url + path) as r:
            assert r.status == 404 and await r.text() == "NotFound", path


async def test_other_methods(blobstore: Blobstore, http: aiohttp.ClientSession, name: str) -> None:
    for method in ("POST", "PATCH", "OPTIONS", "PROPFIND"):
        async with http.request(method, blobstore.url + name) as r:
            assert r.status == 405, method
            assert r.headers["Allow"] == "GET, HEAD, PUT, DELETE"


@pytest.mark.parametrize("path", ["/a/../b", "/../etc/passwd", "/a/%2e%2e/b", "/..", "/x/.."])
def test_dot_dot_segments_are_refused(blobstore: Blobstore, path: str) -> None:
    # a raw request: clients (and yarl) would resolve the dots before sending
    host, port = blobstore.url.removeprefix("http://").split(":")
    for method in ("GET", "PUT"):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                      f"Connection: close\r\n\r\nx".encode())  # fmt: skip
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400"), (method, path, answer)


async def test_names_with_dots_are_fine(blobstore: Blobstore, http: aiohttp.ClientSession) -> None:
    url = f"{blobstore.url}/tests/{uuid.uuid4()}/..hidden/a..b/.x"
    await put(http, url, b"dots")
    async with http.get(url) as r:
        assert r.status == 200 and await r.read() == b"dots"


async def test_repeated_slashes_are_one(blobstore: Blobstore, http: aiohttp.ClientSession) -> None:
    base = f"/tests/{uuid.uuid4()}"
    await put(http, f"{blobstore.url}{base}//a///b", b"slashes")
    async with http.get(f"{blobstore.url}{base}/a/b") as r:
        assert r.status == 200 and await r.read() == b"slashes"


async def test_status(blobstore: Blobstore, http: aiohttp.ClientSession) -> None:
    async with http.get(blobstore.url + "/.well-known/status") as r:
        assert r.status == 200
        assert await r.json() == {"data": {"status": "healthy"}}
