"""Tests for flynn_host.runtime.attach: frame encoding and decoding, and the host attach client."""

from __future__ import annotations

import asyncio
import json

import pytest

from flynn_host.runtime import attach
from flynn_host.runtime.attach import AttachError, Frame, attach_host, read_frame


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_frame_bytes_are_flynns():
    assert attach.data_frame(attach.STDOUT, b"hi") == b"\x03\x01\x00\x00\x00\x02hi"
    assert attach.data_frame(attach.STDIN, b"") == b"\x03\x00\x00\x00\x00\x00"
    assert attach.signal_frame(15) == b"\x04\x00\x00\x00\x0f"
    assert attach.exit_frame(137) == b"\x05\x00\x00\x00\x89"
    assert attach.resize_frame(24, 80) == b"\x06\x00\x18\x00\x50"
    assert attach.error_frame("no") == b"\x02\x00\x00\x00\x02no"


async def test_frames_round_trip():
    stream = b"".join(
        [
            attach.data_frame(attach.STDERR, b"oops\n"),
            attach.data_frame(attach.STDOUT, b""),
            attach.signal_frame(2),
            attach.exit_frame(3),
            attach.resize_frame(30, 100),
            attach.error_frame("bad thing"),
        ]
    )
    reader = reader_of(stream)
    frames = []
    while (frame := await read_frame(reader)) is not None:
        frames.append(frame)
    assert frames == [
        Frame("data", stream=2, data=b"oops\n"),
        Frame("data", stream=1, data=b""),
        Frame("signal", signal=2),
        Frame("exit", status=3),
        Frame("resize", height=30, width=100),
        Frame("error", message="bad thing"),
    ]


async def test_unknown_and_truncated_frames():
    with pytest.raises(ValueError, match="unknown attach frame type 9"):
        await read_frame(reader_of(b"\x09\x00"))
    with pytest.raises(asyncio.IncompleteReadError):
        await read_frame(reader_of(b"\x03\x01\x00\x00\x00\x05hi"))
    assert await read_frame(reader_of(b"")) is None


class FakeHost:
    """A loopback server that records one attach request and answers with canned bytes."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.request_head = b""
        self.request_body = b""

    async def handle(self, reader, writer):
        self.request_head = await reader.readuntil(b"\r\n\r\n")
        length = int(self.request_head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        self.request_body = await reader.readexactly(length)
        writer.write(self.response)
        await writer.drain()
        if self.response.startswith(b"HTTP/1.1 101"):
            writer.close()  # after an error status the host hangs up; after success, either
        await reader.read()
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc):
        self.server.close()


REQUEST = {"job_id": "host-abc", "flags": 31, "height": 24, "width": 80, "lines": None}


async def test_attach_host_upgrades_and_skips_waiting():
    response = (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: flynn-attach/0\r\nConnection: Upgrade\r\n\r\n"
        + bytes([attach.STATUS_WAITING, attach.STATUS_SUCCESS])
        + attach.data_frame(attach.STDOUT, b"hello\n")
    )
    host = FakeHost(response)
    async with host as url:
        reader, writer = await asyncio.wait_for(attach_host(url, REQUEST), 5)
        frame = await asyncio.wait_for(read_frame(reader), 5)
        writer.close()
    assert frame == Frame("data", stream=1, data=b"hello\n")
    head = host.request_head.decode()
    assert head.startswith("POST /attach HTTP/1.1\r\n")
    for header in (
        "Upgrade: flynn-attach/0",
        "Connection: Upgrade",
        "Content-Type: application/json",
        f"Host: {url.removeprefix('http://')}",
    ):
        assert f"\r\n{header}\r\n" in head
    assert json.loads(host.request_body) == REQUEST


async def test_attach_host_raises_flynn_error_message():
    body = json.dumps({"code": "not_found", "message": "job host-abc not found"}).encode()
    response = (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    async with FakeHost(response) as url:
        with pytest.raises(AttachError) as info:
            await asyncio.wait_for(attach_host(url, REQUEST), 5)
    assert info.value.message == "job host-abc not found"
    assert info.value.code == "not_found" and info.value.status == 404


@pytest.mark.parametrize(
    "after_status",
    [
        attach.error_frame("job failed: boom")[1:],  # Flynn: the status is the frame's type
        attach.error_frame("job failed: boom"),  # a status byte, then a whole error frame
    ],
)
async def test_attach_host_raises_error_status(after_status):
    response = b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + bytes([attach.STATUS_ERROR])
    host = FakeHost(response + after_status)
    async with host as url:
        with pytest.raises(AttachError) as info:
            await asyncio.wait_for(attach_host(url, REQUEST), 5)
    assert info.value.message == "job failed: boom"


async def test_attach_host_rejects_non_http_urls():
    with pytest.raises(ValueError):
        await attach_host("https://example.com", REQUEST)
