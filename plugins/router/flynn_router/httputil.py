"""What the two sides of the HTTP proxy share: how each header is treated, status lines and
the router's own error answers, request ids and X-Request-Start, dropping hop-by-hop headers
from a head being built, the constants both sides use, and `_Timer`, a connection's cheap
timeout."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from http import HTTPStatus

_random_bits = random.Random().getrandbits  # seeded from os.urandom


# --- what happens to each header --------------------------------------------------------

# request headers the proxy looks at; every other header is passed on as it came
(
    _HOST,
    _XFF,
    _REQUEST_ID,
    _CONNECTION,
    _TRANSFER_ENCODING,
    _CONTENT_LENGTH,
    _UPGRADE,
    _EXPECT,
    _COOKIE,
    _DROP,
) = range(10)

_REQUEST_HEADERS = {
    b"host": _HOST,
    b"x-forwarded-for": _XFF,
    b"x-request-id": _REQUEST_ID,
    b"connection": _CONNECTION,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"content-length": _CONTENT_LENGTH,
    b"upgrade": _UPGRADE,
    b"expect": _EXPECT,
    b"cookie": _COOKIE,
    # hop-by-hop, or set by the router itself
    b"keep-alive": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-port": _DROP,
    b"x-request-start": _DROP,
}

_RESPONSE_HEADERS = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"keep-alive": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
}

_PLAIN = -1  # a header passed on as it came

# the kinds of the header names met so far, by their exact bytes: a header name costs one
# dict lookup rather than a lower() and a lookup (bounded: names are the client's choice)
_request_kinds: dict[bytes, int] = {}
_response_kinds: dict[bytes, int] = {}
_KIND_CACHE_SIZE = 4096


def _classify(name: bytes, table: dict[bytes, int], cache: dict[bytes, int]) -> int:
    lname = name.lower()
    kind = table.get(lname)
    if kind is None:
        kind = _DROP if lname.startswith(b"proxy-") else _PLAIN
    if len(cache) >= _KIND_CACHE_SIZE:
        cache.clear()
    cache[name] = kind
    return kind


# tokens of a Connection header that name no other header
_CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b"upgrade", b""))
# Connection header values that certainly name no other header, as they are usually spelt
_PLAIN_CONNECTION = frozenset(
    (b"close", b"Close", b"keep-alive", b"Keep-Alive", b"upgrade", b"Upgrade")
)

# a client's own request id is kept only if it looks like one (Flynn's rule)
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9+/=-]{20,200}")

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}

# response body framing towards the client
_NO_BODY, _LENGTH, _RECHUNK, _UNTIL_CLOSE = range(4)

# why a client connection's reading is paused (bits)
_P_UPSTREAM_FULL = 1  # the backend connection's write buffer is full
_P_BUFFER = 2  # body held while the backend connection opens
_P_PIPELINE = 4  # a pipelined request waits for the one before it

_WRITE_HIGH = 256 * 1024  # transports' write-buffer high-water mark
_LAST_CHUNK = b"0\r\n\r\n"
_CRLF = b"\r\n"
_SEP = b": "


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


def _error_response(
    status: int, body: bytes | None, close: bool, keep_alive_header: bool, head: bool
) -> bytes:
    if body is None:
        body = HTTPStatus(status).phrase.encode() + b"\n"
        ctype = b"text/plain; charset=utf-8"
    else:
        ctype = b"text/html; charset=utf-8"
    out = [_status_line(status), b"Content-Type: ", ctype]
    out.append(b"\r\nContent-Length: %d\r\n" % len(body))
    if close:
        out.append(b"Connection: close\r\n")
    elif keep_alive_header:
        out.append(b"Connection: keep-alive\r\n")
    out.append(_CRLF)
    if not head:
        out.append(body)
    return b"".join(out)


_IDS_AT_ONCE = 256
# a version 4 UUID's fixed bits (version 4, variant 10), for a batch of 128-bit numbers
_UUID4_BITS = (0x4 << 76) | (0x2 << 62)
_UUID4_KEEP = (1 << 128) - 1 - ((0xF << 76) | (0x3 << 62))
_UUID4_CLEAR = sum(_UUID4_KEEP << (128 * i) for i in range(_IDS_AT_ONCE))
_UUID4_SET = sum(_UUID4_BITS << (128 * i) for i in range(_IDS_AT_ONCE))
_UUID_TEMPLATE = b"00000000-0000-0000-0000-000000000000 " * _IDS_AT_ONCE
# (index in the template, index in the 32 hex digits) of each hex digit of a UUID
_UUID_DIGITS = [(i + (i >= 8) + (i >= 12) + (i >= 16) + (i >= 20), i) for i in range(32)]
_request_ids: list[bytes] = []


def _new_request_id() -> bytes:
    """A random (version 4) UUID, as Flynn's router made one. Request ids only need to be
    unique, not secret: the process's PRNG (seeded from the OS) costs no system call. They
    are made _IDS_AT_ONCE at a time, a digit position of all of them per slice assignment."""
    if not _request_ids:
        bits = (_random_bits(128 * _IDS_AT_ONCE) & _UUID4_CLEAR) | _UUID4_SET
        digits = bits.to_bytes(16 * _IDS_AT_ONCE, "big").hex().encode()
        ids = bytearray(_UUID_TEMPLATE)
        for at, i in _UUID_DIGITS:
            ids[at::37] = digits[i::32]
        _request_ids.extend(bytes(ids).split())
    return _request_ids.pop()


_start_ms = 0
_start_line = b""


def _request_start() -> bytes:
    """The X-Request-Start header line, made once per millisecond."""
    global _start_ms, _start_line
    ms = time.time_ns() // 1_000_000
    if ms != _start_ms:
        _start_ms = ms
        _start_line = b"X-Request-Start: %d\r\n" % ms
    return _start_line


def _strip_listed(out: list[bytes], connection: bytes) -> None:
    """Drop from `out` the headers a Connection header lists: they were for this hop only."""
    if connection in _PLAIN_CONNECTION:
        return
    names = {t.strip().lower() for t in connection.split(b",")} - _CONNECTION_OPTIONS
    if names:
        _strip_names(out, names)


def _strip_names(out: list[bytes], names: set[bytes]) -> None:
    """Drop headers by (lower-case) name from `out`, the head being built: a first line,
    then groups of name, ": ", value, CRLF."""
    kept = out[:1]
    for i in range(1, len(out) - 3, 4):
        if out[i].lower() not in names:
            kept += out[i : i + 4]
    out[:] = kept


class _Timer:
    """A connection's timeout, cheap to push back: setting it stores a number, and the loop's
    timer fires at the earliest deadline ever set, re-arming itself for a later one. Requests
    move deadlines thousands of times a second; the loop sees one timer per connection."""

    __slots__ = ("loop", "callback", "when", "handle", "armed_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self.loop = loop
        self.callback = callback
        self.when = 0.0  # 0: no deadline
        self.handle: asyncio.TimerHandle | None = None
        self.armed_at = 0.0

    def set(self, delay: float) -> None:
        when = self.loop.time() + delay
        self.when = when
        if self.handle is None or when < self.armed_at:
            if self.handle is not None:
                self.handle.cancel()
            self.handle = self.loop.call_at(when, self._fire)
            self.armed_at = when

    def clear(self) -> None:
        self.when = 0.0

    def cancel(self) -> None:
        self.when = 0.0
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _fire(self) -> None:
        self.handle = None
        when = self.when
        if not when:
            return
        if self.loop.time() + 0.001 >= when:
            self.when = 0.0
            self.callback()
        else:
            self.handle = self.loop.call_at(when, self._fire)
            self.armed_at = when
