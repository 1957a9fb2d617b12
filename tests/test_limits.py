"""Tests for flynn_host.limits and the shared JSON body reader (httphelper.read_json): JSON
nesting counted without recursion, request bodies capped in size and time (over real
connections to a real aiohttp server), and which local files a file:// URL may name."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from flynn_host import httphelper, limits


@pytest.mark.parametrize(
    ("text", "too_deep"),
    [
        (b"[" * 100_000, True),  # unclosed: json.loads would recurse before its syntax error
        (b"[" * 64 + b"]" * 64, False),
        (b"[" * 65 + b"]" * 65, True),
        (b'{"a": [{"b": [1, {"c": "[[[[[[[["}]}], "d": "\\"]]]]"}', False),
        (b'["' + b"[" * 1000 + b'"]', False),  # brackets in a string do not nest
        (b"[[]," * 100_000, True),
        (b"[" + b"[]," * 300_000 + b"[]]", False),
        (b"]]]]" + b"[" * 65, True),
    ],
)
def test_json_depth_is_counted_without_recursion(text: bytes, too_deep: bool) -> None:
    assert limits.json_depth_over(text, 64) is too_deep


def test_loads_json_refuses_what_python_would_choke_on() -> None:
    for text in (b"[" * 100_000, b"1" * 5000, b"NaN", b"[Infinity]", b'"\xff"'):
        with pytest.raises(ValueError):
            limits.loads_json(text)
    assert limits.loads_json(b'{"a": [1, "x"]}') == {"a": [1, "x"]}


@pytest.fixture
async def echo_server() -> AsyncIterator[TestServer]:
    """Echoes read_json's result with small caps: 1000 bytes, 0.5 seconds."""

    async def echo(request: web.Request) -> web.Response:
        body = await httphelper.read_json(request, max_bytes=1000, within=0.5)
        return web.json_response(body)

    app = web.Application(middlewares=[httphelper.errors_middleware()])
    app.router.add_post("/", echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def _exchange(server: TestServer, head: str, body: bytes, wait: float = 0) -> dict:
    """Send a request by hand (the body maybe cut short, then a pause) and read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        # the answer only: after an early one the server may wait for the rest of the body
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
        answer = await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()
    return {"status": int(head.split(b" ", 2)[1]), **json.loads(answer)}


async def test_read_json_caps_the_body_in_size_and_time(echo_server: TestServer) -> None:
    head = "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    ok = await _exchange(echo_server, head + "Content-Length: 7\r\n", b'{"a":1}')
    assert ok == {"status": 200, "a": 1}
    # a declared size over the cap is refused before the body is read
    big = await _exchange(echo_server, head + "Content-Length: 5000\r\n", b"")
    assert (big["status"], big["code"]) == (400, "request_body_too_big")
    # chunked, so no size is declared: refused once the cap is passed
    chunk = b"[" + b"1," * 400 + b"1]"
    chunked = b"%x\r\n%s\r\n" % (len(chunk), chunk) * 3 + b"0\r\n\r\n"
    big = await _exchange(echo_server, head + "Transfer-Encoding: chunked\r\n", chunked)
    assert (big["status"], big["code"]) == (400, "request_body_too_big")
    # a client that stops sending mid-body gets an answer, not a handler waiting forever
    started = time.monotonic()
    stalled = await _exchange(echo_server, head + "Content-Length: 100\r\n", b'{"a":')
    assert (stalled["status"], stalled["code"]) == (408, "request_timeout")
    assert time.monotonic() - started < 5
    deep = await _exchange(echo_server, head + "Content-Length: 900\r\n", b"[" * 900)
    assert (deep["status"], deep["code"]) == (400, "syntax_error")


def test_image_files_are_regular_files_under_the_image_dirs(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "layers").mkdir(parents=True)
    (images / "layers" / "a.squashfs").write_bytes(b"layer")
    (images / "link").symlink_to(images / "layers" / "a.squashfs")
    (images / "out").symlink_to("/etc/passwd")
    (images / "zero").symlink_to("/dev/zero")
    (images / "loop").symlink_to(images / "loop")
    os.mkfifo(images / "fifo")
    dirs = [images]
    assert limits.read_image_file(images / "link", dirs, 100, "x") == b"layer"
    with pytest.raises(limits.TooBig):
        limits.read_image_file(images / "layers" / "a.squashfs", dirs, 4, "layer")
    refused = {
        images / "out": "not under",
        images / "zero": "not under",
        images / "layers" / ".." / ".." / "x": "not under",
        Path("/etc/shadow"): "not under",
        Path("relative"): "not an absolute path",
        Path(f"{images}/a\0b"): "not an absolute path",
        images / "loop": "loop",
        images / "fifo": "not a regular file",
        images / "layers": "not a regular file",
    }
    for path, why in refused.items():
        with pytest.raises(limits.FileRefused, match=why):
            limits.read_image_file(path, dirs, 100, "x")
    with pytest.raises(FileNotFoundError):
        limits.read_image_file(images / "missing", dirs, 100, "x")
    assert limits.file_url_path("file:///a%20b") == Path("/a b")
    with pytest.raises(limits.FileRefused, match="local path"):
        limits.file_url_path("file://elsewhere/etc/passwd")
