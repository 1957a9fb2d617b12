"""A strict server-sent-events client on a raw socket, for the controller's tests.

It sends what the 2015 CLI sends (`pkg/httpclient/stream.go`: `Accept: text/event-stream`,
`Last-Event-Id`, Basic auth, `Content-Type: application/json`) over HTTP/1.1, reads the status
line and headers as soon as they arrive (the CLI blocks until they do), undoes chunked transfer
encoding, and parses the body with the framing rules of the CLI's reader (`pkg/sse`) made
strict: `\\n` line ends only, one `data: ` line per event, a blank line after each event and
nowhere else, comment lines (keep-alives) with no blank line after them.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from controller_http import auth_header


class FramingError(AssertionError):
    """The stream broke a rule the CLI's SSE reader depends on."""


@dataclass
class Item:
    kind: str  # "event" (data is the decoded JSON), "comment" (a keep-alive), "error"
    data: Any = None
    raw: bytes = b""


@dataclass
class SSEParser:
    """Incremental strict parser: `feed(bytes)` returns the complete items so far."""

    buf: bytes = b""
    pending: bytes | None = None
    pending_error: bool = False
    items: list[Item] = field(default_factory=list)

    def feed(self, data: bytes) -> list[Item]:
        self.buf += data
        out: list[Item] = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if b"\r" in line:
                raise FramingError(f"\\r in SSE line {line!r} (the CLI splits on \\n only)")
            if line.startswith(b"data: "):
                if self.pending is not None:
                    raise FramingError(f"second data line in one event: {line!r}")
                self.pending = line[len(b"data: ") :]
            elif line == b"":
                if self.pending is None:
                    raise FramingError(
                        "blank line without a data line before it (a stray blank line, or a"
                        " keep-alive followed by one: the CLI decodes an empty message)"
                    )
                raw, self.pending = self.pending, None
                if self.pending_error:
                    self.pending_error = False
                    out.append(Item("error", raw.decode(errors="replace"), raw))
                else:
                    try:
                        out.append(Item("event", json.loads(raw), raw))
                    except ValueError as e:
                        raise FramingError(f"event data is not one JSON value: {raw!r}") from e
            elif line.startswith(b":"):
                if self.pending is not None:
                    raise FramingError(f"comment line inside an event: {line!r}")
                out.append(Item("comment", line.decode(errors="replace"), line))
            elif line.startswith(b"event: error"):
                self.pending_error = True
            elif line.startswith(b"id:"):
                pass  # allowed by the CLI (ignored); the 2015 controller sends none
            else:
                raise FramingError(f"unexpected SSE line {line!r}")
        self.items.extend(out)
        return out


class SSEStream:
    """One SSE request. `open()` returns once the status line and headers are in (or raises
    `TimeoutError`); `read_items(...)` then parses the body as it comes."""

    def __init__(
        self,
        base_url: str,
        path: str,
        *,
        key: str | None,
        last_event_id: int | None = None,
        headers: dict[str, str] | None = None,
        accept: str = "text/event-stream",
    ) -> None:
        u = urllib.parse.urlsplit(base_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.path = path
        self.key = key
        self.last_event_id = last_event_id
        self.extra = headers or {}
        self.accept = accept
        self.sock: socket.socket | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.parser = SSEParser()
        self.raw_body = b""  # the body after de-chunking, exactly as the server framed it
        self._rest = b""  # bytes read from the socket not yet de-chunked
        self._chunked = False
        self._chunk_left = 0
        self.eof = False

    def __enter__(self) -> SSEStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, timeout: float = 5.0) -> SSEStream:
        self.sock = socket.create_connection((self.host, self.port), timeout=timeout)
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Accept: {self.accept}",
            "Content-Type: application/json",
        ]
        if self.key is not None:
            lines.append(f"Authorization: {auth_header(self.key)}")
        if self.last_event_id is not None:
            lines.append(f"Last-Event-Id: {self.last_event_id}")
        lines += [f"{k}: {v}" for k, v in self.extra.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self._recv(deadline)
        head, self._rest = buf.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for h in header_lines:
            k, _, v = h.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        return self

    def _recv(self, deadline: float) -> bytes:
        assert self.sock is not None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        data = self.sock.recv(65536)  # socket.timeout is TimeoutError
        if not data:
            self.eof = True
        return data

    def _body_bytes(self) -> bytes:
        """De-chunk what `_rest` holds (as far as it goes)."""
        if not self._chunked:
            data, self._rest = self._rest, b""
            return data
        out = b""
        while True:
            if self._chunk_left == 0:
                if b"\r\n" not in self._rest:
                    return out
                size_line, rest = self._rest.split(b"\r\n", 1)
                if size_line == b"":  # the CRLF after a chunk's data
                    self._rest = rest
                    continue
                try:
                    size = int(size_line.split(b";")[0], 16)
                except ValueError:
                    raise FramingError(
                        f"bad chunk size {size_line[:80]!r} (a second HTTP response inside the"
                        f" stream?): {self._rest[:300]!r}"
                    ) from None
                if size == 0:
                    self.eof = True
                    self._rest = b""
                    return out
                self._chunk_left, self._rest = size, rest
            take = self._rest[: self._chunk_left]
            if not take:
                return out
            out += take
            self._rest = self._rest[len(take) :]
            self._chunk_left -= len(take)

    def read_body(self, timeout: float) -> bytes:
        """Whatever body bytes arrive within `timeout` seconds (or until the stream ends)."""
        deadline = time.monotonic() + timeout
        got = self._body_bytes()
        while not self.eof:
            try:
                self._rest += self._recv(deadline)
            except TimeoutError:
                break
            got += self._body_bytes()
        self.raw_body += got
        return got

    def read_some(self, timeout: float) -> bytes:
        """The first body bytes to arrive within `timeout` seconds (b"" if none came, or the
        stream ended)."""
        deadline = time.monotonic() + timeout
        got = self._body_bytes()
        while not got and not self.eof:
            try:
                self._rest += self._recv(deadline)
            except TimeoutError:
                break
            got = self._body_bytes()
        self.raw_body += got
        return got

    def read_items(
        self, count: int | None = None, timeout: float = 5.0, kinds: tuple[str, ...] = ("event",)
    ) -> list[Item]:
        """Items (of `kinds`) until `count` of them came, the stream ended or `timeout`
        passed; framing errors raise `FramingError`."""
        deadline = time.monotonic() + timeout
        got: list[Item] = []
        pending = self._body_bytes()
        while True:
            if pending:
                self.raw_body += pending
                got += [i for i in self.parser.feed(pending) if i.kind in kinds]
            if (count is not None and len(got) >= count) or self.eof:
                return got
            try:
                self._rest += self._recv(deadline)
            except TimeoutError:
                return got
            pending = self._body_bytes()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
