"""Flynn's attach protocol: the binary frames that carry a job's stdio over one connection.

After `POST /attach` is upgraded (`Upgrade: flynn-attach/0`), the host sends a status byte
(success, waiting for the job to start, or error) and then frames in both directions: output
and input data per stream, signals, resizes, and finally the exit status. The shim speaks the
same frames on its attach socket, so the daemon can pass them through. This module holds the
encoders, an incremental decoder over an `asyncio.StreamReader`, and the client used by the CLI
and the daemon's tests. It needs nothing but asyncio, so the shim can import it cheaply.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# status byte sent after the upgrade (waiting may come first, then success or error)
STATUS_SUCCESS = 0
STATUS_WAITING = 1
STATUS_ERROR = 2  # followed by the message as in an error frame, then the connection closes

# frame types
FRAME_ERROR = 2
FRAME_DATA = 3
FRAME_SIGNAL = 4
FRAME_EXIT = 5
FRAME_RESIZE = 6

# streams of a data frame
STDIN = 0
STDOUT = 1
STDERR = 2
INIT_LOG = 3

# attach request flags
ATTACH_STDOUT = 1
ATTACH_STDERR = 2
ATTACH_STDIN = 4
ATTACH_LOGS = 8
ATTACH_STREAM = 16
ATTACH_INIT_LOG = 32
ALL_FLAGS = 63  # every flag above; the host refuses other bits

_U32 = struct.Struct(">I")
_DATA = struct.Struct(">BBI")
_RESIZE = struct.Struct(">BHH")


class AttachError(Exception):
    """The host refused the attach, or reported an error in place of the success status."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


@dataclass
class Frame:
    """One decoded frame; which fields are set depends on `kind`."""

    kind: str  # "data", "signal", "exit", "resize" or "error"
    stream: int | None = None
    data: bytes = b""
    status: int | None = None
    signal: int | None = None
    height: int | None = None
    width: int | None = None
    message: str | None = None


def data_frame(stream: int, payload: bytes) -> bytes:
    """Output or input bytes of one stream; an empty payload means that stream reached EOF."""
    return _DATA.pack(FRAME_DATA, stream, len(payload)) + payload


def signal_frame(sig: int) -> bytes:
    return bytes([FRAME_SIGNAL]) + _U32.pack(sig)


def exit_frame(status: int) -> bytes:
    return bytes([FRAME_EXIT]) + _U32.pack(status)


def resize_frame(height: int, width: int) -> bytes:
    return _RESIZE.pack(FRAME_RESIZE, height, width)


def error_frame(message: str) -> bytes:
    payload = message.encode()
    return bytes([FRAME_ERROR]) + _U32.pack(len(payload)) + payload


def encode_frame(frame: Frame) -> bytes:
    """The bytes of a decoded frame (what `read_frame` read), for forwarding it."""
    if frame.kind == "data":
        return data_frame(frame.stream or 0, frame.data)
    if frame.kind == "signal":
        return signal_frame(frame.signal or 0)
    if frame.kind == "exit":
        return exit_frame(frame.status or 0)
    if frame.kind == "resize":
        return resize_frame(frame.height or 0, frame.width or 0)
    if frame.kind == "error":
        return error_frame(frame.message or "")
    raise ValueError(f"unknown frame kind {frame.kind!r}")


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None if the connection ended cleanly between frames.

    Raises ValueError for an unknown frame type and `asyncio.IncompleteReadError` if the
    connection ends in the middle of a frame.
    """
    head = await reader.read(1)
    if not head:
        return None
    kind = head[0]
    if kind == FRAME_DATA:
        stream, length = struct.unpack(">BI", await reader.readexactly(5))
        return Frame("data", stream=stream, data=await reader.readexactly(length))
    if kind == FRAME_SIGNAL:
        (sig,) = _U32.unpack(await reader.readexactly(4))
        return Frame("signal", signal=sig)
    if kind == FRAME_EXIT:
        (status,) = _U32.unpack(await reader.readexactly(4))
        return Frame("exit", status=status)
    if kind == FRAME_RESIZE:
        height, width = struct.unpack(">HH", await reader.readexactly(4))
        return Frame("resize", height=height, width=width)
    if kind == FRAME_ERROR:
        (length,) = _U32.unpack(await reader.readexactly(4))
        message = (await reader.readexactly(length)).decode("utf-8", errors="replace")
        return Frame("error", message=message)
    raise ValueError(f"unknown attach frame type {kind}")


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return bytes(body)
            body += await reader.readexactly(size)
            await reader.readline()
    return await reader.read()


def _error_message(body: bytes, status: int, reason: str) -> tuple[str, str | None]:
    """The message (and Flynn error code) of a refused attach, from Flynn's error JSON if any."""
    try:
        err = json.loads(body)
    except ValueError:
        err = None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return err["message"], err.get("code")
    text = body.decode("utf-8", errors="replace").strip()
    return text or f"attach failed: HTTP {status} {reason}", None


async def attach_host(
    host_url: str, request: dict[str, Any], key: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Attach to a job through a host's API (`http://ip:port`) and return the raw streams.

    `request` is the attach request JSON (`job_id`, `flags`, `height`, `width`, `lines`);
    `key` the cluster's host key (None: the one `client.local_host_key` finds).
    Returns once the host has sent the success status (waiting statuses are skipped); the
    caller then reads and writes frames. Raises AttachError if the host refuses.
    """
    url = urlsplit(host_url)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"host URL must be http://host:port, not {host_url!r}")
    port = url.port or 80
    reader, writer = await asyncio.open_connection(url.hostname, port)
    try:
        await _upgrade(reader, writer, url.netloc, request, key)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _upgrade(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    netloc: str,
    request: dict[str, Any],
    key: str | None,
) -> None:
    from flynn_host import client  # not at the top: the shim imports this module cheaply

    body = json.dumps(request).encode()
    auth = client.auth_headers(key if key is not None else client.local_host_key())
    head = (
        "POST /attach HTTP/1.1\r\n"
        f"Host: {netloc}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in auth.items())
        + "Upgrade: flynn-attach/0\r\n"
        "Connection: Upgrade\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()

    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise AttachError("attach failed: connection closed before the response") from e
    status_line, *header_lines = raw.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise AttachError(f"attach failed: bad HTTP response {status_line!r}")
    status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
    headers = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if status != 101:
        message, code = _error_message(await _read_body(reader, headers), status, reason)
        raise AttachError(message, code=code, status=status)

    while True:
        byte = await reader.read(1)
        if not byte:
            raise AttachError("attach failed: connection closed before the job's status")
        if byte[0] == STATUS_SUCCESS:
            return
        if byte[0] == STATUS_WAITING:
            continue
        if byte[0] == STATUS_ERROR:
            raise AttachError(_status_error(await reader.read(MAX_ERROR)))
        raise AttachError(f"attach failed: unexpected status byte {byte[0]}")


MAX_ERROR = 1 << 20


def _status_error(rest: bytes) -> str:
    """The message after an error status: the host closes the connection after it.

    Flynn's host lets the status byte double as the error frame's type byte (uint32 length and
    message follow); a host that sends the status and then a whole error frame is accepted too.
    """
    for body in (rest, rest[1:] if rest[:1] == bytes([FRAME_ERROR]) else b""):
        if len(body) >= 4 and _U32.unpack(body[:4])[0] == len(body) - 4:
            return body[4:].decode("utf-8", errors="replace")
    return rest.decode("utf-8", errors="replace") or "attach failed"
