"""The HTTP/1.1 reverse proxy of a router worker: client connections in, backend connections
out, both raw `asyncio.Protocol`s parsed by httptools, so that a request costs a few callbacks
and one or two writes per side rather than a framework's objects.

A client connection parses requests (`ClientConnection`); each request becomes an `Exchange`
that picks a backend of its route, takes an idle connection to that backend from the `Pool`
or opens one (`Upstream`), and relays the request head and body to it and the response back.
Bodies are never held whole: each chunk is written on as it arrives, and a side whose write
buffer fills pauses reading on the other side until it drains. An `Upgrade` the backend
accepts (101) turns both connections into a byte pump.

What Flynn's router did and this keeps: routing by host and path; 404 without a route, 503
without a backend (with the operator's page); a backend that refuses a connection is passed
over for the next; `X-Forwarded-For/-Proto/-Port`, `X-Request-Start` and `X-Request-Id` are
set; hop-by-hop headers stop here; sticky routes follow the `_backend` cookie; a route may
turn off upstream keep-alive. What it adds for a Python process to stay up under abuse: a time
limit for the header block, a size limit for it, and PROXY protocol v1 for a load balancer
in front.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Any

import httptools

from flynn_router.inflight import InFlight
from flynn_router.sticky import StickyCookies
from flynn_router.table import RouteTable
from flynn_router.types import Backend, Route

log = logging.getLogger(__name__)
_random_bits = random.Random().getrandbits  # seeded from os.urandom


@dataclass(frozen=True)
class ProxyConfig:
    connect_timeout: float = 5.0  # to open a connection to a backend
    response_header_timeout: float = 60.0  # from the request's end to the response's head
    idle_timeout: float = 60.0  # a client's keep-alive connection between requests
    header_timeout: float = 10.0  # for a request's whole header block (slowloris)
    max_header_size: int = 16 * 1024  # request line + headers; beyond: 431
    max_response_header_size: int = 64 * 1024  # a backend's response head; beyond: 502
    error_503_page: bytes | None = None  # body of "no backend" answers (HTML)
    proxy_protocol: bool = False  # clients start with a PROXY v1 line
    pool_size: int = 64  # idle connections kept per backend
    pool_idle_timeout: float = 90.0  # an idle pooled connection is closed after this
    linger: float = 2.0  # reading (and dropping) a request body we answered early


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

# methods whose request may be sent again when a pooled connection turns out to be dead
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))

# a client's own request id is kept only if it looks like one (Flynn's rule)
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9+/=-]{20,200}")

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}

# response body framing towards the client
_NO_BODY, _LENGTH, _RECHUNK, _UNTIL_CLOSE = range(4)

# why a client connection's reading is paused (bits)
_P_UPSTREAM_FULL = 1  # the backend connection's write buffer is full
_P_BUFFER = 2  # body held while the backend connection opens
_P_PIPELINE = 4  # a pipelined request waits for the one before it

# what a client connection's bytes are
_HTTP, _PROXY_LINE, _RAW, _LINGER = range(4)

_BUFFER_LIMIT = 256 * 1024  # request body held while connecting before reading pauses
_WRITE_HIGH = 256 * 1024  # transports' write-buffer high-water mark
_JOIN_BELOW = 16 * 1024  # response pieces are written as one bytes below this size
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CRLF = b"\r\n"
_SEP = b": "


class _TooLarge(Exception):
    """The request head passed `max_header_size`."""


class _BadResponse(Exception):
    """The backend's response cannot be relayed."""


class _HeadResponse(Exception):
    """The head of a response to HEAD is in: stop the parser, which would wait for a body."""


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


class Pool:
    """Idle keep-alive connections to backends, at most `size` per address, newest used
    first (so that surplus ones age out), closed after `idle_timeout` unused."""

    def __init__(self, size: int, idle_timeout: float) -> None:
        self.size = size
        self.idle_timeout = idle_timeout
        self.idle: dict[str, list[Upstream]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def take(self, addr: str) -> Upstream | None:
        conns = self.idle.get(addr)
        while conns:
            conn = conns.pop()
            conn.pooled = False
            if not conn.transport.is_closing():
                return conn
        return None

    def put(self, conn: Upstream) -> None:
        conns = self.idle.get(conn.addr)
        if conns is None:
            conns = self.idle[conn.addr] = []
        if len(conns) >= self.size:
            conn.transport.close()
            return
        conn.pooled = True
        conn.idle_since = conn.loop.time()
        conns.append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(self.idle_timeout / 3, self._sweep)

    def discard(self, conn: Upstream) -> None:
        conn.pooled = False
        conns = self.idle.get(conn.addr)
        if conns is not None:
            try:
                conns.remove(conn)
            except ValueError:
                pass
            if not conns:
                del self.idle[conn.addr]

    def close_addr(self, addr: str) -> None:
        """Close the idle connections to a backend that is gone."""
        for conn in self.idle.pop(addr, ()):
            conn.pooled = False
            conn.transport.close()

    def close_all(self) -> None:
        for addr in list(self.idle):
            self.close_addr(addr)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        limit = loop.time() - self.idle_timeout
        for conns in list(self.idle.values()):
            # oldest first: the list is in the order connections were put back
            while conns and conns[0].idle_since <= limit:
                conn = conns.pop(0)
                conn.pooled = False
                conn.transport.close()
        for addr in [a for a, c in self.idle.items() if not c]:
            del self.idle[addr]
        if self.idle:
            self._sweeper = loop.call_later(self.idle_timeout / 3, self._sweep)


class Proxy:
    """What the HTTP and HTTPS listeners of a worker share: the routing table, the upstream
    pool, the open client connections (for a graceful stop) and the settings."""

    def __init__(
        self,
        table: RouteTable,
        config: ProxyConfig,
        cookies: StickyCookies | None,
        inflight: InFlight,
    ) -> None:
        self.table = table
        self.config = config
        self.cookies = cookies
        self.inflight = inflight
        self.pool = Pool(config.pool_size, config.pool_idle_timeout)
        self.clients: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # connections being opened
        self.closing = False
        self._all_closed: asyncio.Event | None = None
        self._errors: dict[tuple[int, bool, bool, bool], bytes] = {}

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` as a task held until it ends (the loop keeps only weak references)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def protocol_factory(self, scheme: str, port: int) -> Callable[[], asyncio.Protocol]:
        forwarded = b"X-Forwarded-Proto: %s\r\nX-Forwarded-Port: %d\r\n" % (scheme.encode(), port)
        tls = scheme == "https"

        def factory() -> asyncio.Protocol:
            return ClientConnection(self, forwarded, tls)

        return factory

    def error_response(
        self, status: int, close: bool, keep_alive_header: bool, head: bool
    ) -> bytes:
        key = (status, close, keep_alive_header, head)
        out = self._errors.get(key)
        if out is None:
            body = self.config.error_503_page if status == 503 else None
            out = self._errors[key] = _error_response(status, body, close, keep_alive_header, head)
        return out

    def shutdown(self) -> None:
        """Stop keeping connections alive: idle ones close now, busy ones after their
        response."""
        self.closing = True
        for client in list(self.clients):
            client.close_if_idle()

    async def wait_closed(self) -> None:
        """Wait until every client connection has closed (after `shutdown`)."""
        if self.clients:
            self._all_closed = asyncio.Event()
            await self._all_closed.wait()

    def client_closed(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        if not self.clients and self._all_closed is not None:
            self._all_closed.set()

    def abort(self) -> None:
        """Close everything at once (the end of a stop)."""
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        self.pool.close_all()


def http_protocol_factory(
    table: RouteTable,
    config: ProxyConfig,
    cookies: StickyCookies | None,
    inflight: InFlight,
    scheme: str,
    port: int,
    proxy: Proxy | None = None,
) -> Callable[[], asyncio.Protocol]:
    """The protocol factory of one listener (`scheme` "http" or "https", `port` its port, as
    the backend sees them in X-Forwarded-Proto/-Port). Listeners of one worker pass the same
    `proxy` so that they share one upstream pool."""
    if proxy is None:
        proxy = Proxy(table, config, cookies, inflight)
    return proxy.protocol_factory(scheme, port)


class Exchange:
    """One request and its response: where it goes, how its bodies are framed and how far
    each direction has got."""

    __slots__ = (
        "client",
        "route",
        "method",
        "head",
        "keep_alive",
        "http11",
        "upgrade",
        "chunked",
        "has_body",
        "expect_continue",
        "canned",
        "prefer",
        "backend",
        "addr",
        "tried",
        "upstream",
        "pending",
        "pending_size",
        "body_sent",
        "req_done",
        "resp_started",
        "head_sent",
        "status",
        "resp_mode",
        "close",
        "gone",
        "client_eof",
        "upstream_eof",
        "retried",
        "eof_ends",
    )

    def __init__(self, client: ClientConnection, method: bytes) -> None:
        self.client = client
        self.route: Route | None = None
        self.method = method
        self.head = b""
        self.keep_alive = False
        self.http11 = True
        self.upgrade = False
        self.chunked = False
        self.has_body = False
        self.expect_continue = False
        self.canned = 0  # status of an answer the router gives itself
        self.prefer: str | None = None  # the sticky cookie's backend
        self.backend: Backend | None = None
        self.addr: str | None = None  # counted in `inflight` while set
        self.tried: set[str] | None = None
        self.upstream: Upstream | None = None
        self.pending: list[bytes] | None = None  # to send once connected
        self.pending_size = 0
        self.body_sent = False
        self.req_done = False
        self.resp_started = False
        self.head_sent = False
        self.status = 0
        self.resp_mode = _NO_BODY
        self.close = False
        self.gone = False  # the client went away
        self.client_eof = False
        self.upstream_eof = False
        self.retried = False
        self.eof_ends = False  # the response ends when the backend closes


class ClientConnection(asyncio.Protocol):
    """One client's connection: parses its requests, answers the ones the router answers
    itself, and hands the others to backends one at a time (pipelined requests wait)."""

    __slots__ = (
        "proxy",
        "loop",
        "forwarded",
        "tls",
        "transport",
        "parser",
        "mode",
        "ip",
        "xff_line",
        "timer",
        "paused",
        "write_paused",
        "exchange",
        "parsing",
        "queue",
        "raw_exchange",
        "eof",
        "proxy_line",
        # the request being parsed
        "in_head",
        "head_timed",
        "head_size",
        "head_raw",
        "url",
        "out",
        "host",
        "xff",
        "request_id",
        "connection",
        "transfer_encoding",
        "content_length",
        "upgrade",
        "expect",
        "cookie",
    )

    def __init__(self, proxy: Proxy, forwarded: bytes, tls: bool) -> None:
        self.proxy = proxy
        self.loop = asyncio.get_running_loop()
        self.forwarded = forwarded
        self.tls = tls
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser: httptools.HttpRequestParser | None = None
        self.mode = _PROXY_LINE if proxy.config.proxy_protocol else _HTTP
        self.ip = b""
        self.xff_line = b""
        self.timer = _Timer(self.loop, self._timeout)
        self.paused = 0
        self.write_paused = False
        self.exchange: Exchange | None = None  # the one being answered
        self.parsing: Exchange | None = None  # the one whose body is being read
        self.queue: deque[Exchange] | None = None  # pipelined ones waiting
        self.raw_exchange: Exchange | None = None  # the upgrade, once bytes are raw
        self.eof = False
        self.proxy_line = b""
        self.in_head = False
        self.head_timed = False
        self._reset_head()

    def _reset_head(self) -> None:
        self.head_size = 0
        self.head_raw = 0
        self.url = b""
        self.out: list[bytes] = [b""]
        self.host: bytes | None = None
        self.xff: bytes | None = None
        self.request_id: bytes | None = None
        self.connection: bytes | None = None
        self.transfer_encoding: bytes | None = None
        self.content_length: bytes | None = None
        self.upgrade: bytes | None = None
        self.expect = False
        self.cookie: bytes | None = None

    # --- transport events ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH)
        peer = transport.get_extra_info("peername")
        self._set_ip(peer[0].encode() if peer else b"")
        self.parser = httptools.HttpRequestParser(self)
        self.proxy.clients.add(self)
        # a new connection that sends nothing is closed like an idle one
        self.timer.set(self.proxy.config.idle_timeout)
        if self.proxy.closing:
            self.transport.close()

    def _set_ip(self, ip: bytes) -> None:
        self.ip = ip
        self.xff_line = b"X-Forwarded-For: " + ip + _CRLF

    def data_received(self, data: bytes) -> None:
        mode = self.mode
        if mode == _HTTP:
            try:
                self.parser.feed_data(data)  # type: ignore[union-attr]
            except httptools.HttpParserUpgrade as e:
                self._upgraded(data[e.args[0] :])
                return
            except httptools.HttpParserError as e:
                self._parse_failed(e)
                return
            except Exception:
                log.debug("client %s: error", self.ip, exc_info=True)
                self._abort()
                return
            if self.in_head:
                self._head_pending(len(data))
        elif mode == _RAW:
            self._raw_in(data)
        elif mode == _PROXY_LINE:
            self._proxy_line(data)
        # _LINGER: the rest of a body nobody will read

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.mode == _RAW:
            ex = self.raw_exchange
            if ex is not None:
                ex.client_eof = True
                up = ex.upstream
                if up is not None:
                    if ex.upstream_eof:
                        self.transport.close()
                        return None
                    if up.transport.can_write_eof():
                        up.transport.write_eof()
                    else:
                        up.transport.close()
            # TLS cannot half-close: returning True would only earn a warning
            return not self.tls
        if self.exchange is not None and self.parsing is None and not self.tls:
            # a client may half-close after its request: answer it, then close (a request
            # cut short, though, can never be answered: closing drops it)
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.client_closed(self)
        self.timer.cancel()
        self.parser = None  # the parser holds this protocol's methods: break the cycle
        ex = self.exchange
        self.exchange = None
        if self.queue:
            self.queue.clear()
        for e in (ex, self.raw_exchange):
            if e is None or e.gone:
                continue
            e.gone = True
            self._release(e)
            up = e.upstream
            if up is not None:
                e.upstream = None
                up.exchange = None
                # a response cut short leaves the connection mid-message: it cannot be reused
                up.transport.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.exchange or self.raw_exchange
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.exchange or self.raw_exchange
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()

    def _pause(self, why: int) -> None:
        if not self.paused and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused |= why

    def _resume(self, why: int) -> None:
        if self.paused & why:
            self.paused &= ~why
            if not self.paused and not self.transport.is_closing():
                self.transport.resume_reading()

    # --- the parser's callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > self.proxy.config.max_header_size:
            raise _TooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.proxy.config.max_header_size:
            raise _TooLarge
        kind = _request_kinds.get(name)
        if kind is None:
            kind = _classify(name, _REQUEST_HEADERS, _request_kinds)
        if kind == _PLAIN:
            self.out += (name, _SEP, value, _CRLF)
        elif kind == _HOST:
            self.host = value
            self.out += (name, _SEP, value, _CRLF)
        elif kind == _CONTENT_LENGTH:
            self.content_length = value
            self.out += (name, _SEP, value, _CRLF)
        elif kind == _COOKIE:
            self.cookie = value if self.cookie is None else self.cookie + b"; " + value
            self.out += (name, _SEP, value, _CRLF)
        elif kind == _XFF:
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif kind == _REQUEST_ID:
            self.request_id = value
        elif kind == _CONNECTION:
            self.connection = value if self.connection is None else self.connection + b"," + value
        elif kind == _TRANSFER_ENCODING:
            self.transfer_encoding = value
        elif kind == _UPGRADE:
            self.upgrade = value
        elif kind == _EXPECT:
            self.expect = value.lower() == b"100-continue"
        # _DROP: nothing

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.head_timed:
            self.head_timed = False
            self.timer.clear()
        if self.mode != _HTTP:
            # the rest of a chunk after an answer that closes the connection
            self._reset_head()
            return
        parser = self.parser
        ex = Exchange(self, parser.get_method())  # type: ignore[union-attr]
        ex.http11 = parser.get_http_version() == "1.1"  # type: ignore[union-attr]
        ex.keep_alive = parser.should_keep_alive() and not self.proxy.closing  # type: ignore[union-attr]
        ex.upgrade = parser.should_upgrade()  # type: ignore[union-attr]
        self.parsing = ex
        if ex.upgrade:
            self.raw_exchange = ex
        try:
            self._prepare(ex)
        finally:
            self._reset_head()
        if self.exchange is None:
            self._begin(ex)
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)
            self._pause(_P_PIPELINE)

    def _prepare(self, ex: Exchange) -> None:
        """Find the route and build the head the backend gets (or note the answer the router
        gives itself in `ex.canned`)."""
        if self.transfer_encoding is not None:
            ex.chunked = ex.has_body = True
        elif self.content_length is not None:
            ex.has_body = self.content_length.strip(b" \t0") != b""
        if self.expect:
            ex.expect_continue = ex.http11
        if ex.method == b"CONNECT":
            ex.canned = 405
            ex.close = True
            return
        url = self.url
        host = self.host
        if not url.startswith(b"/"):
            # absolute form (the request line names the host, which then wins) or `*`
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                parsed = None
            if parsed is not None and parsed.host:
                host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
                url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        if host is None and ex.http11:
            ex.canned = 400
            ex.close = True
            return
        q = url.find(b"?")
        path = url if q < 0 else url[:q]
        route = self.proxy.table.lookup((host or b"").decode("latin-1"), path.decode("latin-1"))
        if route is None:
            ex.canned = 404
            return
        ex.route = route
        if route.sticky and self.cookie is not None and self.proxy.cookies is not None:
            value = _cookie_value(self.cookie, b"_backend")
            if value is not None:
                ex.prefer = self.proxy.cookies.decode(value.decode("latin-1"))

        out = self.out
        out[0] = ex.method + b" " + url + b" HTTP/1.1\r\n"
        if self.connection is not None:
            _strip_listed(out, self.connection)
        if host is None:
            out += (b"Host", _SEP, route.domain.encode(), _CRLF)
        elif host is not self.host:
            _strip_names(out, {b"host"})
            out += (b"Host", _SEP, host, _CRLF)
        out.append(self.forwarded)
        if self.xff is None:
            out.append(self.xff_line)
        else:
            out += (b"X-Forwarded-For: ", self.xff, b", ", self.ip, _CRLF)
        rid = self.request_id
        if rid is None or not _VALID_REQUEST_ID.fullmatch(rid):
            rid = _new_request_id()
        out += (_request_start(), b"X-Request-Id: ", rid, _CRLF)
        if ex.chunked:
            out += (b"Transfer-Encoding", _SEP, self.transfer_encoding, _CRLF)  # type: ignore[arg-type]
        if ex.upgrade:
            out += (b"Connection: Upgrade\r\nUpgrade: ", self.upgrade or b"", _CRLF)
        elif route.disable_keep_alives:
            out.append(b"Connection: close\r\n")
        out.append(_CRLF)
        ex.head = b"".join(out)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None or ex.canned:
            return  # the body of a request the router answered itself
        if ex.chunked:
            self._send(ex, (b"%x\r\n" % len(body), body, _CRLF), len(body))
        else:
            self._send(ex, (body,), len(body))

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        if ex is None:
            return
        ex.req_done = True
        if ex.canned or ex.upgrade:
            return
        if ex.chunked:
            self._send(ex, (_LAST_CHUNK,), 0)
        up = ex.upstream
        if up is not None:
            up.timer.set(self.proxy.config.response_header_timeout)

    def _send(self, ex: Exchange, parts: tuple[bytes, ...], size: int) -> None:
        """Body bytes for the backend: written if connected, else held (reading pauses
        once enough is held)."""
        up = ex.upstream
        if up is not None:
            ex.body_sent = True
            if len(parts) == 1:
                up.transport.write(parts[0])
            else:
                up.transport.writelines(parts)
            return
        if ex.pending is None:
            ex.pending = []
        ex.pending += parts
        ex.pending_size += size
        if ex.pending_size > _BUFFER_LIMIT:
            self._pause(_P_BUFFER)

    # --- parse problems and timeouts -------------------------------------------------------

    def _head_pending(self, size: int) -> None:
        """The header block is still incomplete after a read: start its clock, and count
        bytes the parser holds inside a header (callbacks only see whole ones)."""
        if not self.head_timed:
            self.head_timed = True
            self.timer.set(self.proxy.config.header_timeout)
        else:
            self.head_raw += size
            if self.head_raw > self.proxy.config.max_header_size:
                self._fatal(431)

    def _parse_failed(self, e: Exception) -> None:
        cause = e.__context__
        if isinstance(cause, _TooLarge):
            self._fatal(431)
        elif isinstance(e, httptools.HttpParserCallbackError) and cause is not None:
            log.debug("client %s: error", self.ip, exc_info=cause)
            self._abort()
        else:
            log.debug("client %s: bad request: %s", self.ip, e)
            self._fatal(400)

    def _fatal(self, status: int) -> None:
        """Answer `status` and close: the connection's bytes cannot be parsed any further."""
        self.in_head = False
        self.mode = _LINGER
        ex = self.exchange
        if ex is not None and self.parsing is ex and not ex.canned:
            # its own body is broken: the backend will never get the rest, so it goes
            self.parsing = None
            ex.gone = True  # a connection still opening for it is closed when it opens
            up = ex.upstream
            if up is not None:
                ex.upstream = None
                up.exchange = None
                up.transport.abort()
            if ex.head_sent:
                self._release(ex)
                self.exchange = None
                self.transport.close()
            else:
                self._answer(ex, status)
            return
        if ex is not None:
            # answers go out in order: the ones before finish, then this one and the close;
            # a pipelined request whose body was being read when the bytes went bad is lost
            if self.parsing is not None and self.queue and self.parsing in self.queue:
                self.queue.remove(self.parsing)
            self.parsing = None
            ex = Exchange(self, b"")
            ex.canned = status
            ex.close = True
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)
            return
        self.transport.write(self.proxy.error_response(status, True, False, False))
        self._linger(True)

    def _timeout(self) -> None:
        if self.in_head:
            log.debug("client %s: header timeout", self.ip)
            self._fatal(408)
        elif self.mode == _LINGER or (self.exchange is None and not self.queue):
            self.transport.close()

    def _abort(self) -> None:
        self.mode = _LINGER
        self.transport.abort()

    def _linger(self, still_sending: bool) -> None:
        """Close after the response; if the client may still be sending, first read (and
        drop) for a while what it sends: closing with unread bytes resets the connection,
        and the client would lose the response."""
        self.mode = _LINGER
        if self.transport.is_closing():
            return
        if self.eof or not still_sending:
            self.transport.close()
            return
        self.parsing = None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self.paused:
            self.paused = 0
            self.transport.resume_reading()
        self.timer.set(self.proxy.config.linger)

    def close_if_idle(self) -> None:
        if self.exchange is None and not self.queue and not self.in_head and self.mode == _HTTP:
            self.transport.close()

    # --- PROXY protocol --------------------------------------------------------------------

    def _proxy_line(self, data: bytes) -> None:
        buf = self.proxy_line + data
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > 107:  # the longest v1 line
                self._abort()
            else:
                self.proxy_line = buf
            return
        self.proxy_line = b""
        parts = buf[:end].split(b" ")
        if parts[0] != b"PROXY" or len(parts) < 2:
            log.debug("client %s: no PROXY line", self.ip)
            self._abort()
            return
        if parts[1] in (b"TCP4", b"TCP6") and len(parts) == 6:
            self._set_ip(parts[2])
        elif parts[1] != b"UNKNOWN":
            self._abort()
            return
        self.mode = _HTTP
        rest = buf[end + 2 :]
        if rest:
            self.data_received(rest)

    # --- exchanges -------------------------------------------------------------------------

    def _begin(self, ex: Exchange) -> None:
        self.exchange = ex
        if ex.canned:
            self._answer(ex, ex.canned)
            return
        proxy = self.proxy
        backend = proxy.table.pick(ex.route, ex.prefer)  # type: ignore[arg-type]
        if backend is None:
            self._answer(ex, 503)
            return
        # the common case of _use, inline: a pooled connection
        addr = ex.addr = backend.addr
        ex.backend = backend
        proxy.inflight.begin(addr)
        conn = None if ex.route.disable_keep_alives else proxy.pool.take(addr)  # type: ignore[union-attr]
        if conn is not None:
            self._attach(ex, conn, reused=True)
        else:
            self.proxy.spawn(self._connect(ex, backend))

    def _use(self, ex: Exchange, backend: Backend, fresh: bool = False) -> None:
        ex.backend = backend
        ex.addr = backend.addr
        self.proxy.inflight.begin(backend.addr)
        conn = None
        if not fresh and not ex.route.disable_keep_alives:  # type: ignore[union-attr]
            conn = self.proxy.pool.take(backend.addr)
        if conn is not None:
            self._attach(ex, conn, reused=True)
        else:
            self.proxy.spawn(self._connect(ex, backend))

    async def _connect(self, ex: Exchange, backend: Backend) -> None:
        proxy = self.proxy
        try:
            async with asyncio.timeout(proxy.config.connect_timeout):
                _, conn = await self.loop.create_connection(
                    partial(Upstream, proxy, backend.addr), backend.host, backend.port
                )
        except (OSError, TimeoutError) as e:
            log.debug("backend %s: cannot connect: %r", backend.addr, e)
            proxy.table.mark_refused(backend.addr)
            self._release(ex)
            if ex.gone:
                return
            if ex.tried is None:
                ex.tried = set()
            ex.tried.add(backend.addr)
            nxt = self._next_backend(ex)
            if nxt is not None:
                self._use(ex, nxt, fresh=True)
            else:
                self._answer(ex, 503)
            return
        except Exception:
            log.debug("backend %s: cannot connect", backend.addr, exc_info=True)
            self._release(ex)
            if not ex.gone:
                self._answer(ex, 502)
            return
        if ex.gone:
            conn.transport.close()
            return
        self._attach(ex, conn, reused=False)

    def _next_backend(self, ex: Exchange) -> Backend | None:
        """Another backend to try after a failed connection: one not tried yet."""
        table = self.proxy.table
        route = ex.route
        assert route is not None and ex.tried is not None
        for _ in range(len(table.backends(route))):
            b = table.pick(route)
            if b is None:
                return None
            if b.addr not in ex.tried:
                return b
        return None

    def _attach(self, ex: Exchange, conn: Upstream, reused: bool) -> None:
        ex.upstream = conn
        conn.exchange = ex
        conn.reused = reused
        if self.write_paused:
            conn.pause_reading()
        t = conn.transport
        if ex.pending:
            ex.body_sent = True
            t.writelines([ex.head, *ex.pending])
            ex.pending = None
            ex.pending_size = 0
            self._resume(_P_BUFFER)
        else:
            t.write(ex.head)
        if ex.expect_continue and not ex.req_done and not ex.body_sent:
            self.transport.write(_CONTINUE)
            ex.expect_continue = False
        if ex.upgrade and ex.client_eof and t.can_write_eof():
            t.write_eof()
        if ex.req_done or ex.upgrade:
            conn.timer.set(self.proxy.config.response_header_timeout)

    def _retry(self, ex: Exchange) -> None:
        """The pooled connection was dead: send the request once more, on a new one."""
        ex.retried = True
        assert ex.backend is not None
        self.proxy.spawn(self._connect(ex, ex.backend))

    def _answer(self, ex: Exchange, status: int) -> None:
        """Give the router's own answer to the active exchange and finish it."""
        self._release(ex)
        close = (
            ex.close
            or not ex.keep_alive
            or (ex.has_body and not ex.req_done)
            or ex.upgrade
            or self.proxy.closing
            or self.mode != _HTTP
        )
        head = ex.method == b"HEAD"
        self.transport.write(
            self.proxy.error_response(status, close, not ex.http11 and not close, head)
        )
        self._finished(ex, close)

    def upstream_failed(self, ex: Exchange, status: int) -> None:
        """The backend connection failed before a response could be relayed whole."""
        if ex.head_sent:
            self._release(ex)
            self.exchange = None
            self.transport.close()  # a truncated body: the client must see it cut
            self.mode = _LINGER
            return
        self._answer(ex, status)

    def finished(self, ex: Exchange) -> None:
        """The backend's response is relayed whole."""
        addr = ex.addr
        if addr is not None:
            ex.addr = None
            self.proxy.inflight.end(addr)
        self._finished(ex, ex.close or not ex.req_done or self.proxy.closing)

    def _finished(self, ex: Exchange, close: bool) -> None:
        self.exchange = None
        ex.upstream = None
        if self.paused:
            self._resume(_P_UPSTREAM_FULL)
        if not close and self.queue:
            # pipelined requests are answered even after the client's EOF
            nxt = self.queue.popleft()
            if not self.queue:
                self._resume(_P_PIPELINE)
            if nxt.canned and nxt.close:
                # the answer for bytes that could not be parsed
                self.transport.write(self.proxy.error_response(nxt.canned, True, False, False))
                self._linger(True)
                return
            self._begin(nxt)
            return
        if close or self.eof or self.mode != _HTTP:
            # a body still coming, or bytes that could not be parsed
            self._linger(self.parsing is not None or self.mode == _LINGER)
            return
        self.timer.set(self.proxy.config.idle_timeout)

    def _release(self, ex: Exchange) -> None:
        addr = ex.addr
        if addr is not None:
            ex.addr = None
            self.proxy.inflight.end(addr)

    # --- upgrades --------------------------------------------------------------------------

    def _upgraded(self, rest: bytes) -> None:
        """The parser met an upgrade (or CONNECT): what follows is not HTTP any more."""
        ex = self.raw_exchange
        self.parsing = None
        if self.mode != _HTTP or ex is None or ex.canned or ex.gone:
            # refused (no route, CONNECT): the answer is written or queued; then close
            self.raw_exchange = None
            self.mode = _LINGER
            if self.exchange is None:
                self.transport.close()
            return
        self.mode = _RAW
        if rest:
            self._raw_in(rest)

    def _raw_in(self, data: bytes) -> None:
        ex = self.raw_exchange
        if ex is None or ex.gone:
            return
        self._send(ex, (data,), len(data))

    def tunnel_closed(self, ex: Exchange) -> None:
        """The backend side of an upgraded connection is gone."""
        self._release(ex)
        self.exchange = None
        self.raw_exchange = None
        self.transport.close()


def _cookie_value(header: bytes, name: bytes) -> bytes | None:
    for part in header.split(b";"):
        k, sep, v = part.strip().partition(b"=")
        if sep and k == name:
            return v.strip().strip(b'"')
    return None


class Upstream(asyncio.Protocol):
    """A connection to a backend: carries one exchange at a time and parses its response;
    between exchanges it waits in the pool."""

    __slots__ = (
        "proxy",
        "addr",
        "loop",
        "transport",
        "parser",
        "exchange",
        "pooled",
        "reused",
        "idle_since",
        "timer",
        "raw",
        "read_paused",
        "write_paused",
        "skip",
        "out",
        # the response being parsed
        "head",
        "head_size",
        "content_length",
        "transfer_encoding",
        "connection",
        "upgrade",
    )

    def __init__(self, proxy: Proxy, addr: str) -> None:
        self.proxy = proxy
        self.addr = addr
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser: httptools.HttpResponseParser | None = None
        self.exchange: Exchange | None = None
        self.pooled = False
        self.reused = False
        self.idle_since = 0.0
        self.timer = _Timer(self.loop, self._timeout)
        self.raw = False
        self.read_paused = False
        self.write_paused = False
        self.skip = False
        self.out: list[bytes] = []  # for the client, written at the end of each read
        self._reset_head()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH)
        self.parser = httptools.HttpResponseParser(self)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # nothing was asked: a backend talking out of turn is not trusted again
            self.transport.close()
            return
        ex.resp_started = True
        if self.raw:
            ex.client.transport.write(data)
            return
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade as e:
            self._flush(ex)
            if ex.status != 101:
                self._bad(ex, "unexpected upgrade")
                return
            self.raw = True
            rest = data[e.args[0] :]
            if rest:
                ex.client.transport.write(rest)
            return
        except httptools.HttpParserError as e:
            self._flush(ex)
            if isinstance(e.__context__, _HeadResponse):
                # the parser stopped at the head's end; a fresh one for the next response,
                # and the connection only if nothing followed the head
                keep = self.parser.should_keep_alive()  # type: ignore[union-attr]
                self.parser = httptools.HttpResponseParser(self)
                self._done(ex, keep and data.endswith(b"\r\n\r\n"))
            elif isinstance(e, httptools.HttpParserCallbackError) and not isinstance(
                e.__context__, _BadResponse
            ):
                log.debug("backend %s: error", self.addr, exc_info=e.__context__)
                self._bad(ex, "error")
            else:
                self._bad(ex, str(e.__context__ or e))
            return
        except Exception:
            self._flush(ex)
            log.debug("backend %s: error", self.addr, exc_info=True)
            self._bad(ex, "error")
            return
        if self.out:
            self._flush(ex)
        elif not ex.head_sent:
            # the head is still coming: bound what the parser holds of it
            self.head_size += len(data)
            if self.head_size > self.proxy.config.max_response_header_size:
                self._bad(ex, "response head too large")

    def _flush(self, ex: Exchange) -> None:
        """Write what the parser's callbacks produced from one read in one go: a small
        response's head and body then cost the client one send (and over TLS one record),
        not two. Small pieces are joined (a copy is cheaper than a record or an iovec
        each); large ones are handed over as they are."""
        out = self.out
        if out:
            if len(out) == 1:
                ex.client.transport.write(out[0])
            elif sum(map(len, out)) < _JOIN_BELOW:
                ex.client.transport.write(b"".join(out))
            else:
                ex.client.transport.writelines(out)
            out.clear()

    def eof_received(self) -> bool | None:
        ex = self.exchange
        if self.raw and ex is not None:
            ex.upstream_eof = True
            client = ex.client.transport
            if ex.client_eof or not client.can_write_eof():
                return None  # connection_lost closes the client side
            client.write_eof()
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.parser = None
        if self.pooled:
            self.proxy.pool.discard(self)
            return
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
        ex.upstream = None
        client = ex.client
        if self.raw:
            client.tunnel_closed(ex)
        elif not ex.resp_started:
            if self.reused and not ex.retried and not ex.body_sent and ex.method in _IDEMPOTENT:
                client._retry(ex)
            else:
                log.debug("backend %s: closed before responding: %r", self.addr, exc)
                client.upstream_failed(ex, 502)
        elif ex.eof_ends:
            # a response that ends with the connection: this is its end
            if ex.resp_mode == _RECHUNK:
                client.transport.write(_LAST_CHUNK)
            client.finished(ex)
        else:
            log.debug("backend %s: closed mid-response: %r", self.addr, exc)
            client.upstream_failed(ex, 502)

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.exchange
        if ex is not None:
            ex.client._pause(_P_UPSTREAM_FULL)

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.exchange
        if ex is not None:
            ex.client._resume(_P_UPSTREAM_FULL)

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def _timeout(self) -> None:
        ex = self.exchange
        if ex is not None and not ex.head_sent and not self.raw:
            log.debug("backend %s: no response in time", self.addr)
            self.exchange = None
            ex.upstream = None
            self.transport.abort()
            ex.client.upstream_failed(ex, 504)

    def _bad(self, ex: Exchange, why: str) -> None:
        log.debug("backend %s: bad response: %s", self.addr, why)
        self.exchange = None
        ex.upstream = None
        self.transport.abort()
        ex.client.upstream_failed(ex, 502)

    # --- the parser's callbacks ------------------------------------------------------------

    def _reset_head(self) -> None:
        """Ready for the next response's head (the parser has no message-begin callback:
        one call less per response)."""
        self.head: list[bytes] = [b""]
        self.head_size = 0
        self.content_length: bytes | None = None
        self.transfer_encoding: bytes | None = None
        self.connection: bytes | None = None
        self.upgrade: bytes | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        kind = _response_kinds.get(name)
        if kind is None:
            kind = _classify(name, _RESPONSE_HEADERS, _response_kinds)
        if kind == _PLAIN:
            self.head += (name, _SEP, value, _CRLF)
        elif kind == _CONTENT_LENGTH:
            self.content_length = value
            self.head += (name, _SEP, value, _CRLF)
        elif kind == _TRANSFER_ENCODING:
            self.transfer_encoding = value
        elif kind == _CONNECTION:
            self.connection = value if self.connection is None else self.connection + b"," + value
        elif kind == _UPGRADE:
            self.upgrade = value

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is None:
            raise _BadResponse("response without a request")
        status = self.parser.get_status_code()  # type: ignore[union-attr]
        if status < 200 and status != 101:
            # 100 Continue (the router answered that itself), 102, 103: not relayed
            self.skip = True
            self._reset_head()
            return
        if status == 101 and not ex.upgrade:
            raise _BadResponse("101 to a request that asked for no upgrade")
        self.timer.clear()
        ex.status = status
        out = self.head
        out[0] = _STATUS_LINES.get(status) or _status_line(status)
        if self.connection is not None and self.connection not in _PLAIN_CONNECTION:
            _strip_listed(out, self.connection)
        close = ex.close or not ex.keep_alive or self.proxy.closing
        if ex.upgrade and status != 101:
            close = True  # the client's bytes are raw already: no more requests
        head_method = ex.method == b"HEAD"
        if head_method or status == 204 or status == 304 or status == 101:
            mode = _NO_BODY
        elif self.content_length is not None:
            mode = _LENGTH
        elif ex.http11:
            out.append(b"Transfer-Encoding: chunked\r\n")
            mode = _RECHUNK
        else:
            mode = _UNTIL_CLOSE
            close = True
        ex.resp_mode = mode
        ex.eof_ends = (
            mode != _NO_BODY and self.content_length is None and self.transfer_encoding is None
        )
        ex.close = close
        if status == 101:
            out += (b"Connection: Upgrade\r\nUpgrade: ", self.upgrade or b"", _CRLF)
        elif close:
            out.append(b"Connection: close\r\n")
        elif not ex.http11:
            out.append(b"Connection: keep-alive\r\n")
        route = ex.route
        if route.sticky and ex.backend is not None and ex.backend.addr != ex.prefer:  # type: ignore[union-attr]
            cookies = self.proxy.cookies
            if cookies is not None:
                out += (
                    b"Set-Cookie: _backend=",
                    cookies.encode(ex.backend.addr).encode(),
                    b"; Path=/; HttpOnly\r\n",
                )
        out.append(_CRLF)
        self.out.append(b"".join(out))
        ex.head_sent = True
        self._reset_head()
        if head_method:
            raise _HeadResponse

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex.resp_mode == _RECHUNK:  # type: ignore[union-attr]
            self.out += (b"%x\r\n" % len(body), body, _CRLF)
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.skip:
            self.skip = False
            return
        ex = self.exchange
        if ex is None or ex.status == 101:
            return  # the upgrade: data_received switches to raw bytes
        if ex.resp_mode == _RECHUNK:
            self.out.append(_LAST_CHUNK)
        self._done(ex, self.parser.should_keep_alive())  # type: ignore[union-attr]

    def _done(self, ex: Exchange, reusable: bool) -> None:
        self._flush(ex)  # before the client moves on to its next request
        self.exchange = None
        ex.upstream = None
        if (
            reusable
            and ex.req_done
            and not ex.upgrade
            and not ex.route.disable_keep_alives  # type: ignore[union-attr]
            and not self.write_paused
            and not self.transport.is_closing()
            and self.transport.get_write_buffer_size() == 0
            and not self.proxy.closing
        ):
            if self.read_paused:
                self.resume_reading()
            self.proxy.pool.put(self)
        else:
            self.transport.close()
        ex.client.finished(ex)
