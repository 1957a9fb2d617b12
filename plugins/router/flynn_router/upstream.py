"""The backend side of the HTTP proxy: `Upstream`, a connection to a backend that relays one
exchange's response at a time to its client, and `Pool`, the idle ones kept per backend."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import httptools

from flynn_router.httputil import (
    _CONNECTION,
    _CONTENT_LENGTH,
    _CRLF,
    _LAST_CHUNK,
    _LENGTH,
    _NO_BODY,
    _P_UPSTREAM_FULL,
    _PLAIN,
    _PLAIN_CONNECTION,
    _RECHUNK,
    _RESPONSE_HEADERS,
    _SEP,
    _STATUS_LINES,
    _TRANSFER_ENCODING,
    _UNTIL_CLOSE,
    _UPGRADE,
    _WRITE_HIGH,
    _classify,
    _response_kinds,
    _status_line,
    _strip_listed,
    _Timer,
)

if TYPE_CHECKING:
    from flynn_router.downstream import Exchange
    from flynn_router.proxy import Proxy

# one logger for the whole HTTP proxy, both sides and all its modules
log = logging.getLogger("flynn_router.proxy")

# methods whose request may be sent again when a pooled connection turns out to be dead
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))

_JOIN_BELOW = 16 * 1024  # response pieces are written as one bytes below this size


class _BadResponse(Exception):
    """The backend's response cannot be relayed."""


class _HeadResponse(Exception):
    """The head of a response to HEAD is in: stop the parser, which would wait for a body."""


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
