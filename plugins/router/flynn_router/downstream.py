"""The client side of the HTTP proxy: `ClientConnection` parses a client's requests, routes
each (`Exchange`), answers the ones the router answers itself, forwards the others to an
`Upstream`, and pumps bytes both ways after an accepted upgrade."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from functools import partial
from typing import TYPE_CHECKING

import httptools

from flynn_router.httputil import (
    _CONNECTION,
    _CONTENT_LENGTH,
    _COOKIE,
    _CRLF,
    _EXPECT,
    _HOST,
    _LAST_CHUNK,
    _NO_BODY,
    _P_BUFFER,
    _P_PIPELINE,
    _P_UPSTREAM_FULL,
    _PLAIN,
    _REQUEST_HEADERS,
    _REQUEST_ID,
    _SEP,
    _TRANSFER_ENCODING,
    _UPGRADE,
    _VALID_REQUEST_ID,
    _WRITE_HIGH,
    _XFF,
    _classify,
    _new_request_id,
    _request_kinds,
    _request_start,
    _strip_listed,
    _strip_names,
    _Timer,
)
from flynn_router.types import Backend, Route
from flynn_router.upstream import Upstream

if TYPE_CHECKING:
    from flynn_router.proxy import Proxy

# one logger for the whole HTTP proxy, both sides and all its modules
log = logging.getLogger("flynn_router.proxy")

# what a client connection's bytes are
_HTTP, _PROXY_LINE, _RAW, _LINGER = range(4)

_BUFFER_LIMIT = 256 * 1024  # request body held while connecting before reading pauses
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _TooLarge(Exception):
    """The request head passed `max_header_size`."""


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
