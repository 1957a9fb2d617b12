"""The HTTP data plane end to end: a real worker process, real backends on loopback, real
clients. Routing, the headers the router adds and removes, keep-alive on both sides, bodies
streamed both ways, 100-continue, upgrades, sticky sessions, draining, and what happens when
backends refuse, die or close pooled connections."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

MB = 1 << 20
REQUEST_WITH_ID = b"GET / HTTP/1.1\r\nHost: example.com\r\nX-Request-Id: %b\r\n\r\n"


async def get_json(http: aiohttp.ClientSession, url: str, host: str, **kw: object) -> dict:
    async with http.get(url, headers={"Host": host, **kw.pop("headers", {})}, **kw) as resp:  # type: ignore[arg-type]
        assert resp.status == 200, await resp.text()
        return await resp.json()


def lower_headers(body: bytes) -> dict[str, str]:
    """The request headers a `servers.named` backend saw, by lower-case name."""
    return {k.lower(): v for k, v in json.loads(body)["header_list"]}


def answer(**response: object) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler that always gives the same response."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(**response)  # type: ignore[arg-type]

    return handle


# --- routing ----------------------------------------------------------------------------


async def test_routes_by_host_and_longest_path(worker, servers, http, make_route) -> None:
    names = ["exact", "api", "api-v2", "wild", "deep-wild", "any"]
    addrs = {n: await servers.named(n) for n in names}
    await worker.routes(
        make_route("example.com", "exact"),
        make_route("example.com", "api", path="/api/"),
        make_route("example.com", "api-v2", path="/api/v2/"),
        make_route("*.example.com", "wild"),
        make_route("*.deep.example.com", "deep-wild"),
        make_route("*", "any"),
    )
    for n in names:
        await worker.backends(n, addrs[n])
    cases = [
        ("example.com", "/", "exact"),
        ("EXAMPLE.com:8080", "/x", "exact"),
        ("example.com.", "/", "exact"),
        ("example.com", "/api", "api"),
        ("example.com", "/api/users?x=1", "api"),
        ("example.com", "/api/v2", "api-v2"),
        ("example.com", "/api/v2/things", "api-v2"),
        ("example.com", "/apiary", "exact"),
        ("www.example.com", "/api/", "wild"),
        ("a.b.example.com", "/", "wild"),
        ("x.deep.example.com", "/", "deep-wild"),
        ("other.org", "/", "any"),
    ]
    for host, path, want in cases:
        got = await get_json(http, worker.url(path), host)
        assert got["name"] == want, (host, path)
        assert got["path"] == path


async def test_no_route_is_404_and_no_backend_503(worker, raw_client, make_route) -> None:
    await worker.routes(make_route("empty.test", "nobody"))
    c = await raw_client(worker.http_port)
    await c.send(b"GET / HTTP/1.1\r\nHost: missing.test\r\n\r\n")
    status, headers, body = await c.response()
    assert (status, body) == (404, b"Not Found\n")
    # answered without closing: the connection serves the next request
    await c.send(b"GET / HTTP/1.1\r\nHost: empty.test\r\n\r\n")
    status, headers, body = await c.response()
    assert (status, body) == (503, b"Service Unavailable\n")
    assert headers["content-type"].startswith("text/plain")
    await c.send(b"HEAD / HTTP/1.1\r\nHost: missing.test\r\n\r\n")
    status, headers, body = await c.response(head=True)
    assert status == 404 and headers["content-length"] == "10"
    # a HEAD answer has no body: the next response starts right after its head
    await c.send(b"GET / HTTP/1.1\r\nHost: missing.test\r\nConnection: close\r\n\r\n")
    status, headers, body = await c.response()
    assert status == 404 and headers["connection"] == "close"
    assert await c.closed()


async def test_custom_503_page(start_worker, http, make_route) -> None:
    page = "<html><body>Down for maintenance ☕</body></html>"
    w = await start_worker(error_503_page=page)
    await w.routes(make_route("empty.test", "nobody"))
    async with http.get(w.url(), headers={"Host": "empty.test"}) as resp:
        assert resp.status == 503
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert await resp.text() == page
    async with http.get(w.url(), headers={"Host": "unrouted.test"}) as resp:
        assert resp.status == 404


# --- headers ----------------------------------------------------------------------------


async def test_forwarding_headers(worker, servers, raw_client, make_route) -> None:
    addr = await servers.named("web")
    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", addr)
    c = await raw_client(worker.http_port)

    before = int(time.time() * 1000)
    good_id = "abcdefghij0123456789+/=-"
    await c.send(
        b"GET /h HTTP/1.1\r\nHost: example.com\r\n"
        b"X-Forwarded-For: 10.1.1.1\r\nX-Forwarded-For: 10.2.2.2\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Port: 1\r\nX-Request-Start: 5\r\n"
        b"X-Request-Id: " + good_id.encode() + b"\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
        b"TE: trailers\r\nProxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\n"
        b"Upgrade: h2c\r\nX-Kept: yes\r\n\r\n"
    )
    status, _, body = await c.response()
    after = int(time.time() * 1000)
    assert status == 200
    h = lower_headers(body)
    assert h["x-forwarded-for"] == "10.1.1.1, 10.2.2.2, 127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-port"] == str(worker.http_port)
    assert before <= int(h["x-request-start"]) <= after
    assert h["x-request-id"] == good_id
    assert h["x-kept"] == "yes"
    for hop in ("x-hop", "keep-alive", "te", "proxy-authorization", "proxy-connection", "upgrade"):
        assert hop not in h, hop
    assert "connection" not in h  # HTTP/1.1 keep-alive to the backend is the default

    # request ids that do not look like one are replaced by a UUID
    for bad in ("short", "x" * 201, "has space in it, twenty+", "semi;colons;are;not;ok;"):
        await c.send(REQUEST_WITH_ID % bad.encode())
        h = lower_headers((await c.response())[2])
        assert h["x-request-id"] != bad
        assert uuid.UUID(h["x-request-id"]).version == 4
    await c.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    h = lower_headers((await c.response())[2])
    assert uuid.UUID(h["x-request-id"]).version == 4
    assert h["x-forwarded-for"] == "127.0.0.1"


async def test_response_hop_headers_dropped(worker, servers, raw_client, make_route) -> None:
    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n"
                b"Connection: close, X-Resp-Hop\r\nX-Resp-Hop: 1\r\nX-Other: 1\r\n"
                b"Proxy-Authenticate: Basic\r\nTrailer: X-T\r\n\r\nok"
            )
            await writer.drain()
            return

    addr = await servers.raw_server(backend)
    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", addr)
    c = await raw_client(worker.http_port)
    for _ in range(3):
        # the backend closes after each response; the client's connection stays open
        await c.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        status, headers, body = await c.response()
        assert (status, body) == (200, b"ok")
        assert headers["x-other"] == "1"
        for hop in ("keep-alive", "connection", "x-resp-hop", "proxy-authenticate", "trailer"):
            assert hop not in headers, hop


# --- keep-alive -------------------------------------------------------------------------


async def test_upstream_connections_are_reused(worker, servers, http, make_route) -> None:
    addr = await servers.named("web")
    await worker.routes(
        make_route("example.com", "web"),
        make_route("nokeep.com", "web", disable_keep_alives=True),
    )
    await worker.backends("web", addr)

    ports = {(await get_json(http, worker.url(), "example.com"))["peer_port"] for _ in range(20)}
    assert len(ports) == 1

    # five clients at once need at most five backend connections, kept for later
    async def client() -> set[int]:
        async with aiohttp.ClientSession() as own:
            return {
                (await get_json(own, worker.url(), "example.com"))["peer_port"] for _ in range(10)
            }

    seen = set().union(*await asyncio.gather(*(client() for _ in range(5))))
    assert len(seen) <= 5

    ports = {(await get_json(http, worker.url(), "nokeep.com"))["peer_port"] for _ in range(5)}
    assert len(ports) == 5


async def test_http10_and_connection_close(worker, servers, raw_client, make_route) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # no length: chunked to HTTP/1.1 clients
        await resp.prepare(request)
        for _ in range(3):
            await resp.write(b"chunk;")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/fixed", answer(text="fixed"))
    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", await servers.app(app))

    c = await raw_client(worker.http_port)
    await c.send(b"GET /stream HTTP/1.0\r\nHost: example.com\r\n\r\n")
    status, headers, body = await c.response()  # to EOF: HTTP/1.0 has no chunks
    assert (status, body) == (200, b"chunk;chunk;chunk;")
    assert "transfer-encoding" not in headers

    c = await raw_client(worker.http_port)
    await c.send(b"GET /fixed HTTP/1.0\r\nHost: example.com\r\nConnection: keep-alive\r\n\r\n")
    status, headers, body = await c.response()
    assert (status, body, headers["connection"]) == (200, b"fixed", "keep-alive")
    await c.send(b"GET /fixed HTTP/1.0\r\nHost: example.com\r\n\r\n")
    status, headers, body = await c.response()
    assert (status, body, headers["connection"]) == (200, b"fixed", "close")
    assert await c.closed()

    c = await raw_client(worker.http_port)
    await c.send(b"GET /stream HTTP/1.1\r\nHost: example.com\r\n\r\n")
    status, headers, body = await c.response()
    assert (status, body, headers["transfer-encoding"]) == (200, b"chunk;chunk;chunk;", "chunked")
    await c.send(b"GET /fixed HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
    status, headers, body = await c.response()
    assert (status, body, headers["connection"]) == (200, b"fixed", "close")
    assert await c.closed()


async def test_pipelined_requests_answered_in_order(worker, servers, raw_client, make_route):
    async def slow_first(request: web.Request) -> web.Response:
        if request.path == "/1":
            await asyncio.sleep(0.3)
        return web.Response(text=request.path)

    app = web.Application()
    app.router.add_route("*", "/{n}", slow_first)
    await worker.routes(make_route("example.com", "web"), make_route("empty.test", "nobody"))
    await worker.backends("web", await servers.app(app))
    c = await raw_client(worker.http_port)
    await c.send(
        b"GET /1 HTTP/1.1\r\nHost: example.com\r\n\r\n"
        b"GET /missing HTTP/1.1\r\nHost: nowhere.test\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /3 HTTP/1.1\r\nHost: example.com\r\n\r\n"
    )
    assert (await c.response())[::2] == (200, b"/1")
    assert (await c.response())[0] == 404
    assert (await c.response())[::2] == (200, b"/2")
    assert (await c.response())[::2] == (200, b"/3")

    # a client that half-closes after its requests still gets every answer
    c = await raw_client(worker.http_port)
    await c.send(
        b"GET /1 HTTP/1.1\r\nHost: example.com\r\n\r\nGET /2 HTTP/1.1\r\nHost: example.com\r\n\r\n"
    )
    c.writer.write_eof()
    assert (await c.response())[::2] == (200, b"/1")
    assert (await c.response())[::2] == (200, b"/2")
    assert await c.closed()


async def test_head_requests_keep_the_connection(worker, servers, raw_client, make_route):
    app = web.Application()
    app.router.add_get("/", answer(body=b"x" * 1000))
    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", await servers.app(app))
    c = await raw_client(worker.http_port)
    for _ in range(3):
        await c.send(b"HEAD / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        status, headers, body = await c.response(head=True)
        assert (status, headers["content-length"], body) == (200, "1000", b"")
    await c.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert (await c.response())[2] == b"x" * 1000


# --- bodies -----------------------------------------------------------------------------


def pattern(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


async def counting_app() -> web.Application:
    """/upload reads the body slowly and answers its size and digest; /download?size=N
    (&chunked=1) sends N bytes of pattern, as fast as the router takes them."""

    async def upload(request: web.Request) -> web.Response:
        digest, size = hashlib.md5(), 0
        async for chunk in request.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
            await asyncio.sleep(0.002)  # slower than the client: the router must hold back
        return web.json_response({"size": size, "md5": digest.hexdigest()})

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        resp = web.StreamResponse()
        if not request.query.get("chunked"):
            resp.content_length = size
        await resp.prepare(request)
        block = pattern(MB)
        for _ in range(size // MB):
            await resp.write(block)
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=1 << 31)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    return app


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_100mb_upload_streams(
    worker, servers, raw_client, make_route, memory_watch, chunked
) -> None:
    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", await servers.app(await counting_app()))
    size = 100 * MB
    block = pattern(MB)
    c = await raw_client(worker.http_port)
    watch = memory_watch(worker)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    await c.send(b"POST /upload HTTP/1.1\r\nHost: example.com\r\n" + framing + b"\r\n\r\n")
    for _ in range(size // MB):
        await c.send(b"%x\r\n%s\r\n" % (MB, block) if chunked else block)
    if chunked:
        await c.send(b"0\r\n\r\n")
    status, _, body = await c.response(within=60)
    growth = await watch.stop()
    print(f"upload ({'chunked' if chunked else 'fixed'}): peak RSS growth {growth} KiB")
    assert status == 200
    assert json.loads(body) == {
        "size": size,
        "md5": hashlib.md5(block * (size // MB)).hexdigest(),
    }
    assert growth < 10 * 1024


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_100mb_download_to_a_slow_client_streams(
    worker, servers, http, make_route, memory_watch, chunked
) -> None:
    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", await servers.app(await counting_app()))
    size = 100 * MB
    watch = memory_watch(worker)
    digest, got = hashlib.md5(), 0
    url = worker.url(f"/download?size={size}" + ("&chunked=1" if chunked else ""))
    async with http.get(url, headers={"Host": "example.com"}) as resp:
        assert resp.status == 200
        if chunked:
            assert resp.headers["Transfer-Encoding"] == "chunked"
        else:
            assert resp.headers["Content-Length"] == str(size)
        async for chunk in resp.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            got += len(chunk)
            await asyncio.sleep(0.002)  # slower than the backend
    growth = await watch.stop()
    print(f"download ({'chunked' if chunked else 'fixed'}): peak RSS growth {growth} KiB")
    assert got == size
    assert digest.hexdigest() == hashlib.md5(pattern(MB) * (size // MB)).hexdigest()
    assert growth < 10 * 1024


async def test_expect_100_continue(worker, servers, raw_client, http, make_route) -> None:
    await worker.routes(make_route("example.com", "web"), make_route("empty.test", "nobody"))
    await worker.backends("web", await servers.named("web"))
    c = await raw_client(worker.http_port)
    await c.send(
        b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    async with asyncio.timeout(5):
        assert await c.reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    await c.send(b"hello")
    status, _, body = await c.response()
    assert status == 200 and json.loads(body)["size"] == 5
    assert "Expect" not in json.loads(body)["headers"]

    # no backend: the final answer comes at once, and no 100 before it
    c = await raw_client(worker.http_port)
    await c.send(
        b"POST / HTTP/1.1\r\nHost: empty.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    assert (await c.response(within=5))[0] == 503

    async with http.post(
        worker.url(), data=b"x" * 100_000, expect100=True, headers={"Host": "example.com"}
    ) as resp:
        assert resp.status == 200 and (await resp.json())["size"] == 100_000


# --- upgrades ---------------------------------------------------------------------------


async def test_websocket_echo(worker, servers, http, make_route) -> None:
    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", await servers.app(app))
    async with http.ws_connect(worker.url("/ws"), headers={"Host": "example.com"}) as ws:
        for i in range(50):
            await ws.send_str(f"hello {i}")
            assert (await ws.receive(timeout=5)).data == f"hello {i}".join(["echo:", ""])
        big = os.urandom(3 * MB)
        await ws.send_bytes(big)
        assert (await ws.receive(timeout=10)).data == big[::-1]
        await ws.close()
    assert ws.closed


async def test_other_upgrade_with_half_close(worker, servers, raw_client, make_route) -> None:
    """`flynn run` attaches with a POST that carries a JSON body and `Upgrade:
    flynn-attach/0`; after the 101 both sides speak their own protocol, and a client that
    has nothing more to send half-closes and still reads what the job prints."""
    got_body: list[bytes] = []

    async def attach(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        assert head.startswith("POST /apps/x/jobs HTTP/1.1")
        assert "Upgrade: flynn-attach/0" in head and "Connection: Upgrade" in head
        length = int(head.split("Content-Length: ")[1].split("\r\n")[0])
        got_body.append(await reader.readexactly(length))
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
            b"Upgrade: flynn-attach/0\r\n\r\n\x00"
        )
        data = b""
        while chunk := await reader.read(65536):  # until the client's EOF
            data += chunk
            writer.write(chunk.upper())
        writer.write(b"|exit %d" % len(data))
        await writer.drain()

    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", await servers.raw_server(attach))
    c = await raw_client(worker.http_port)
    body = b'{"release":"r1","args":["bash"]}'
    await c.send(
        b"POST /apps/x/jobs HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\n"
        b"Upgrade: flynn-attach/0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    async with asyncio.timeout(5):
        head = await c.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert b"Upgrade: flynn-attach/0" in head
        assert await c.reader.readexactly(1) == b"\x00"
        await c.send(b"hello")
        assert await c.reader.readexactly(5) == b"HELLO"
        await c.send(b"world")
        c.writer.write_eof()
        assert await c.reader.read() == b"WORLD|exit 10"
    assert got_body == [body]


async def test_refused_upgrade_is_relayed(worker, servers, http, make_route) -> None:
    app = web.Application()
    app.router.add_get("/ws", answer(status=400, text="no websockets here"))
    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", await servers.app(app))
    with pytest.raises(aiohttp.WSServerHandshakeError) as e:
        await http.ws_connect(worker.url("/ws"), headers={"Host": "example.com"})
    assert e.value.status == 400


async def test_upgrades_are_in_flight_until_closed(worker, servers, http, make_route) -> None:
    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    addr = await servers.app(app)
    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", addr)
    async with http.ws_connect(worker.url("/ws"), headers={"Host": "example.com"}) as ws:
        start = len(worker.messages)
        await worker.backends("web")
        with pytest.raises(TimeoutError):
            await worker.wait_for("drained", within=0.5, start=start)
        await ws.close()
    await worker.wait_for("drained", start=start, addr=addr)


# --- sticky sessions --------------------------------------------------------------------


async def test_sticky_sessions(start_worker, servers, http, make_route) -> None:
    w = await start_worker(cookie_key=base64.b64encode(os.urandom(32)).decode())
    addrs = [await servers.named(f"b{i}", host=f"127.0.0.{2 + i}") for i in range(3)]
    await w.routes(make_route("sticky.test", "web", sticky=True), make_route("plain.test", "web"))
    await w.backends("web", *addrs)

    async def get(host: str, cookie: str | None = None) -> tuple[str, str | None]:
        """The backend's name, and the `_backend` cookie set, if any."""
        headers = {"Host": host}
        if cookie is not None:
            headers["Cookie"] = f"_backend={cookie}"
        async with http.get(w.url(), headers=headers) as resp:
            assert resp.status == 200
            morsel = resp.cookies.get("_backend")
            if morsel is not None:
                assert morsel["path"] == "/" and morsel["httponly"]
            return (await resp.json())["name"], morsel.value if morsel else None

    first, value = await get("sticky.test")
    assert value is not None
    for _ in range(10):
        # the right cookie: the same backend, and no cookie set again
        assert await get("sticky.test", value) == (first, None)

    # a route that is not sticky ignores the cookie and sets none
    seen = [await get("plain.test", value) for _ in range(6)]
    assert {name for name, _ in seen} == {"b0", "b1", "b2"}
    assert {cookie for _, cookie in seen} == {None}

    # the cookie's backend goes away: another serves, and the cookie moves
    gone = addrs[int(first[1])]
    await w.backends("web", *[a for a in addrs if a != gone])
    moved, new_value = await get("sticky.test", value)
    assert moved != first and new_value is not None
    for _ in range(5):
        assert await get("sticky.test", new_value) == (moved, None)

    # garbage cookies are ignored (and replaced)
    name, fresh = await get("sticky.test", "garbage")
    assert fresh is not None


async def test_no_cookie_key_means_no_sticky_cookies(worker, servers, http, make_route) -> None:
    await worker.routes(make_route("sticky.test", "web", sticky=True))
    await worker.backends("web", await servers.named("b"))
    async with http.get(worker.url(), headers={"Host": "sticky.test"}) as resp:
        assert resp.status == 200 and "_backend" not in resp.cookies


# --- draining ---------------------------------------------------------------------------


async def test_drained_only_after_in_flight_requests(worker, servers, http, make_route) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/", slow)
    slow_addr = await servers.app(app, host="127.0.0.2")
    idle_addr = await servers.named("idle", host="127.0.0.3")
    await worker.routes(make_route("example.com", "web"), make_route("other.test", "other"))
    await worker.backends("web", slow_addr)
    await worker.backends("other", idle_addr)

    request = asyncio.ensure_future(http.get(worker.url(), headers={"Host": "example.com"}))
    await asyncio.sleep(0.3)  # the request is with the backend
    start = len(worker.messages)
    await worker.backends("web")
    await worker.backends("other")
    # nothing was in flight to the idle backend: drained at once
    await worker.wait_for("drained", start=start, addr=idle_addr, within=2)
    with pytest.raises(TimeoutError):
        await worker.wait_for("drained", start=start, addr=slow_addr, within=1)
    release.set()
    resp = await request
    assert resp.status == 200 and await resp.text() == "done"
    resp.release()
    await worker.wait_for("drained", start=start, addr=slow_addr, within=5)

    # a backend listed by two services drains when it leaves the last one
    await worker.routes(make_route("a.test", "a"), make_route("b.test", "b"))
    await worker.backends("a", idle_addr)
    await worker.backends("b", idle_addr)
    start = len(worker.messages)
    await worker.backends("a")
    await worker.sync()
    assert not [m for m in worker.messages[start:] if m["op"] == "drained"]
    await worker.backends("b")
    await worker.wait_for("drained", start=start, addr=idle_addr)


# --- failures ---------------------------------------------------------------------------


async def test_refused_backend_is_passed_over(worker, servers, http, make_route, closed_addr):
    good = await servers.named("good")
    dead = [closed_addr("127.0.0.3"), closed_addr("127.0.0.4")]
    await worker.routes(make_route("example.com", "web"), make_route("dead.test", "dead"))
    await worker.backends("web", dead[0], good, dead[1])
    await worker.backends("dead", *dead)
    for _ in range(10):
        assert (await get_json(http, worker.url(), "example.com"))["name"] == "good"
    async with http.get(worker.url(), headers={"Host": "dead.test"}) as resp:
        assert resp.status == 503


async def test_backend_dying_mid_response(worker, servers, http, make_route) -> None:
    async def dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.transport.abort()

    async def dying_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    await worker.routes(
        make_route("dying.test", "dying"),
        make_route("chunked.test", "chunked"),
        make_route("silent.test", "silent"),
        make_route("good.test", "good"),
    )
    await worker.backends("dying", await servers.raw_server(dying))
    await worker.backends("chunked", await servers.raw_server(dying_chunked))
    await worker.backends("silent", await servers.raw_server(silent))
    await worker.backends("good", await servers.named("good"))
    for host in ("dying.test", "chunked.test"):
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(worker.url(), headers={"Host": host}) as resp:
                assert resp.status == 200
                await resp.read()
    async with http.get(worker.url(), headers={"Host": "silent.test"}) as resp:
        assert resp.status == 502  # closed without a word
    assert worker.alive()
    assert (await get_json(http, worker.url(), "good.test"))["name"] == "good"


async def test_stale_pooled_connection_is_retried(worker, servers, raw_client, make_route):
    """A backend closes a kept-alive connection just as the router sends on it: a GET is
    sent again on a new connection; a POST is not (it may have had its effect)."""
    connections = 0

    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request: dropped unanswered
        writer.transport.abort()

    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", await servers.raw_server(one_per_connection))
    c = await raw_client(worker.http_port)
    for _ in range(4):
        await c.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        assert (await c.response())[::2] == (200, b"ok")
    assert connections == 4
    await c.send(b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\n\r\n")
    assert (await c.response())[0] == 502


async def test_response_header_timeout(start_worker, servers, http, make_route) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(30)

    w = await start_worker(response_header_timeout=1.0)
    await w.routes(make_route("example.com", "web"))
    await w.backends("web", await servers.raw_server(silent))
    t0 = time.monotonic()
    async with http.get(w.url(), headers={"Host": "example.com"}) as resp:
        assert resp.status == 504
    assert 0.9 < time.monotonic() - t0 < 5


async def test_proxy_protocol(start_worker, servers, raw_client, make_route) -> None:
    w = await start_worker(proxy_protocol=True)
    await w.routes(make_route("example.com", "web"))
    await w.backends("web", await servers.named("web"))
    c = await raw_client(w.http_port)
    await c.send(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 80\r\nGET / HTTP/1.1\r\nHost: ex")
    await c.send(b"ample.com\r\n\r\n")
    status, _, body = await c.response()
    assert status == 200 and json.loads(body)["headers"]["X-Forwarded-For"] == "203.0.113.7"
    c = await raw_client(w.http_port)
    await c.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")  # no PROXY line
    assert await c.closed()


# --- processes --------------------------------------------------------------------------


async def test_two_workers_share_ports(start_worker, servers, make_route) -> None:
    first = await start_worker()
    second = await start_worker(http_ports=first.settings["http_ports"])
    a = await servers.named("a", host="127.0.0.2")
    b = await servers.named("b", host="127.0.0.3")
    # each worker sends the same route to its own backend, to tell them apart
    for w, addr in ((first, a), (second, b)):
        await w.routes(make_route("example.com", "web"))
        await w.backends("web", addr)

    async def names(n: int) -> list[str]:
        out = []
        for _ in range(n):
            # a new connection each time: the kernel picks the worker per connection
            async with aiohttp.ClientSession() as s:
                out.append((await get_json(s, first.url(), "example.com"))["name"])
        return out

    assert set(await names(60)) == {"a", "b"}
    assert await first.stop(signal.SIGTERM) == 0
    assert set(await names(10)) == {"b"}


async def test_stop_lets_requests_finish(worker, servers, http, make_route) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1)
        return web.Response(text="finished")

    app = web.Application()
    app.router.add_get("/", slow)
    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", await servers.app(app))
    request = asyncio.ensure_future(http.get(worker.url(), headers={"Host": "example.com"}))
    await asyncio.sleep(0.3)
    stopping = asyncio.ensure_future(worker.stop())  # EOF on stdin, as if the supervisor died
    resp = await request
    assert resp.status == 200 and await resp.text() == "finished"
    assert await stopping == 0


async def test_worker_reports_problems(worker, servers, http, make_route) -> None:
    await worker.routes(make_route("example.com", "web"))
    # a line that is not a command is reported, not fatal
    start = len(worker.messages)
    assert worker.proc.stdin is not None
    worker.proc.stdin.write(b'not json\n{"op": "frobnicate"}\n')
    await worker.sync()
    errors = [m for m in worker.messages[start:] if m["op"] == "error"]
    assert len(errors) == 2 and "frobnicate" in errors[1]["message"]
    await worker.backends("web", await servers.named("web"))
    assert (await get_json(http, worker.url(), "example.com"))["name"] == "web"


async def test_worker_that_cannot_listen_exits(start_worker) -> None:
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: nobody else may bind this port
    blocker.listen()
    try:
        with pytest.raises(AssertionError, match="exited before 'ready'"):
            await start_worker(http_ports=[blocker.getsockname()[1]])
    finally:
        blocker.close()


async def test_client_abandoning_an_upload_frees_the_backend(
    worker, servers, raw_client, make_route
) -> None:
    seen = asyncio.Event()
    lost = asyncio.Event()

    async def reading(request: web.Request) -> web.Response:
        seen.set()
        try:
            await request.read()
        except BaseException:  # the router closed the connection: cancelled, or an error
            lost.set()
            raise
        return web.Response(text="whole")

    app = web.Application()
    app.router.add_post("/", reading)
    addr = await servers.app(app)
    await worker.routes(make_route("example.com", "web"))
    await worker.backends("web", addr)
    c = await raw_client(worker.http_port)
    await c.send(b"POST / HTTP/1.1\r\nHost: example.com\r\nContent-Length: 1000000\r\n\r\n")
    await c.send(b"x" * 1000)
    async with asyncio.timeout(5):
        await seen.wait()
    c.writer.transport.abort()
    async with asyncio.timeout(5):
        await lost.wait()
    start = len(worker.messages)
    await worker.backends("web")
    await worker.wait_for("drained", start=start, addr=addr, within=2)


async def test_leader_routes_go_to_the_leader(worker, servers, http, make_route) -> None:
    a = await servers.named("a", host="127.0.0.2")
    b = await servers.named("b", host="127.0.0.3")
    await worker.routes(make_route("leader.test", "db", leader=True), make_route("any.test", "db"))
    await worker.backends("db", a, b, leader=b)

    async def names(host: str) -> set[str]:
        return {(await get_json(http, worker.url(), host))["name"] for _ in range(6)}

    assert await names("leader.test") == {"b"}
    assert await names("any.test") == {"a", "b"}
    await worker.backends("db", a, b, leader=None)
    async with http.get(worker.url(), headers={"Host": "leader.test"}) as resp:
        assert resp.status == 503
