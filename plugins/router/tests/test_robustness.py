"""A worker under abuse: many idle connections, slowloris clients, malformed and oversized
request heads, a huge body for a route without backends, random bytes. In each case the
worker must answer (or close) the abuser, keep serving everyone else at normal latency, and
keep its memory bounded; each test prints the worker's peak RSS."""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import time

import pytest

GOOD_REQUEST = b"GET / HTTP/1.1\r\nHost: good.test\r\n\r\n"


@pytest.fixture
async def abused(start_worker, servers, make_route):
    """A worker with a route that answers (`good.test`) and one without backends
    (`empty.test`)."""

    async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def start(**settings):
        w = await start_worker(**settings)
        await w.routes(make_route("good.test", "good"), make_route("empty.test", "nobody"))
        await w.backends("good", await servers.raw_server(ok))
        return w

    return start


class Prober:
    """Sends a request to the good route every `interval` seconds on a fresh connection
    while a test abuses the worker, recording each one's latency (None: it failed)."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        self.port = port
        self.interval = interval
        self.latencies: list[float | None] = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def probe(self) -> float | None:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(GOOD_REQUEST)
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200")
                    assert await reader.readexactly(2) == b"ok"
                finally:
                    writer.close()
        except (OSError, TimeoutError, AssertionError, asyncio.IncompleteReadError):
            return None
        return time.monotonic() - t0

    async def _run(self) -> None:
        while True:
            self.latencies.append(await self.probe())
            await asyncio.sleep(self.interval)

    async def stop(self) -> list[float | None]:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.latencies

    async def check(self, label: str, worst: float = 0.5, at_least: int = 3) -> None:
        while len(self.latencies) < at_least:  # the abuse may have ended quickly
            self.latencies.append(await self.probe())
        latencies = await self.stop()
        assert latencies, "no probe ran"
        assert None not in latencies, f"{label}: a request to another route failed"
        slowest = max(latencies)  # type: ignore[type-var]
        print(f"{label}: {len(latencies)} probes, slowest {slowest * 1000:.1f} ms")
        assert slowest < worst


def report(label: str, worker, watch_growth_kb: int) -> None:
    now, peak = worker.memory_kb() // 1024, worker.memory_kb("VmHWM") // 1024
    print(f"{label}: RSS now {now} MiB, peak {peak} MiB, growth {watch_growth_kb // 1024} MiB")


@pytest.mark.slow
async def test_10000_idle_connections(abused, memory_watch) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 10_500:
        pytest.skip(f"the open-file hard limit ({hard}) is below 10,500")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    w = await abused(idle_timeout=120)
    watch = memory_watch(w)
    prober = Prober(w.http_port, interval=0.2)
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(20):  # in batches, so that the listen backlog never overflows
            opened = await asyncio.gather(
                *(asyncio.open_connection("127.0.0.1", w.http_port) for _ in range(500))
            )
            writers += [wr for _, wr in opened]
        assert len(writers) == 10_000
        await asyncio.sleep(1)
        # every connection is still open, and the worker still answers at once
        latencies = [await prober.probe() for _ in range(20)]
        assert None not in latencies
        print(f"10,000 idle: slowest of 20 requests {max(latencies) * 1000:.1f} ms")  # type: ignore[type-var]
        assert max(latencies) < 0.5  # type: ignore[type-var]
        assert not any(wr.is_closing() for wr in writers)
        # and the idle connections are still usable
        for wr in writers[::1000]:
            wr.write(GOOD_REQUEST)
        growth = await watch.stop()
        report("10,000 idle connections", w, growth)
        assert growth < 200 * 1024
        await prober.check("10,000 idle connections")
    finally:
        for wr in writers:
            wr.transport.abort()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_slowloris_is_cut_off(abused, memory_watch) -> None:
    w = await abused(header_timeout=3)
    watch = memory_watch(w)
    prober = Prober(w.http_port)
    head = b"GET / HTTP/1.1\r\nHost: good.test\r\nX-Slow: " + b"x" * 100

    async def slowloris() -> tuple[float, bytes]:
        """Sends the head a byte a second; returns when and what the worker answered."""
        reader, writer = await asyncio.open_connection("127.0.0.1", w.http_port)
        t0 = time.monotonic()
        try:
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    async with asyncio.timeout(1):
                        answer = await reader.read()
                    return time.monotonic() - t0, answer
                except TimeoutError:
                    continue
        except ConnectionError:
            return time.monotonic() - t0, b""
        finally:
            writer.close()
        return time.monotonic() - t0, b"(never cut off)"

    results = await asyncio.gather(*(slowloris() for _ in range(50)))
    await prober.check("slowloris")
    growth = await watch.stop()
    report("slowloris", w, growth)
    for elapsed, answer in results:
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer
        assert 2.5 < elapsed < 5.5
    assert growth < 10 * 1024


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: good.test\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: good.test\r\nX: a\x00b\r\n\r\n",
    b"GET /\x01 HTTP/1.1\r\nHost: good.test\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: good.test\r\n\r\n",
    b"GET / FTP/1.1\r\nHost: good.test\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"POST / HTTP/1.1\r\nHost: good.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n",
    b"POST / HTTP/1.1\r\nHost: good.test\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: good.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST / HTTP/1.1\r\nHost: good.test\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: good.test\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n",  # TLS hello
    b" GET / HTTP/1.1\r\nHost: good.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: good.test\r\n X-Folded: yes\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", MALFORMED, ids=range(len(MALFORMED)))
async def test_malformed_requests_get_400(abused, raw_client, request_bytes: bytes) -> None:
    w = await abused()
    c = await raw_client(w.http_port)
    await c.send(request_bytes)
    status, headers, _ = await c.response()
    assert status == 400
    assert headers["connection"] == "close"
    assert await c.closed(within=5)
    c = await raw_client(w.http_port)
    await c.send(GOOD_REQUEST)
    assert (await c.response())[::2] == (200, b"ok")


async def test_malformed_after_a_good_request_on_the_same_connection(abused, raw_client):
    w = await abused()
    c = await raw_client(w.http_port)
    await c.send(GOOD_REQUEST + b"GARBAGE\r\n\r\n")
    assert (await c.response())[::2] == (200, b"ok")
    assert (await c.response())[0] == 400
    assert await c.closed(within=5)


def oversized_heads() -> dict[str, list[bytes]]:
    """Each a list of writes that together pass 16 KiB of head."""
    big = b"x" * 20_000
    return {
        "one header": [b"GET / HTTP/1.1\r\nHost: good.test\r\nX-Big: " + big + b"\r\n\r\n"],
        "many headers": [
            b"GET / HTTP/1.1\r\nHost: good.test\r\n"
            + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(200))
            + b"\r\n"
        ],
        "long url": [b"GET /" + big + b" HTTP/1.1\r\nHost: good.test\r\n\r\n"],
        "trickled header": [b"GET / HTTP/1.1\r\nHost: good.test\r\nX-Big: "] + [b"y" * 1000] * 40,
        "endless header, no end": [
            b"GET / HTTP/1.1\r\nHost: good.test\r\nX-Big: " + b"z" * 300_000
        ],
    }


@pytest.mark.parametrize("name", list(oversized_heads()))
async def test_oversized_heads_get_431(abused, raw_client, memory_watch, name: str) -> None:
    w = await abused()
    watch = memory_watch(w)
    c = await raw_client(w.http_port)
    with contextlib.suppress(ConnectionError):
        for part in oversized_heads()[name]:
            await c.send(part)
            await asyncio.sleep(0.01)
    status, headers, _ = await c.response()
    assert status == 431
    assert headers["connection"] == "close"
    assert await c.closed(within=5)
    assert await watch.stop() < 10 * 1024
    # just under the limit is fine
    c = await raw_client(w.http_port)
    await c.send(
        b"GET / HTTP/1.1\r\nHost: good.test\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(150))
        + b"\r\n"
    )
    assert (await c.response())[::2] == (200, b"ok")


async def test_1gb_body_for_a_route_without_backends(abused, memory_watch) -> None:
    w = await abused()
    watch = memory_watch(w)
    prober = Prober(w.http_port)
    size = 1 << 30
    reader, writer = await asyncio.open_connection("127.0.0.1", w.http_port)
    writer.write(b"POST / HTTP/1.1\r\nHost: empty.test\r\nContent-Length: %d\r\n\r\n" % size)
    block = bytes(1 << 20)

    async def send_all() -> int:
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < size:
                writer.write(block)
                await writer.drain()
                sent += len(block)
        return sent

    t0 = time.monotonic()
    sender = asyncio.ensure_future(send_all())
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert b"Connection: close" in head
    async with asyncio.timeout(30):
        sent = await sender
    writer.close()
    print(f"1 GiB body: router answered 503; client sent {sent >> 20} MiB in "
          f"{time.monotonic() - t0:.1f} s before the router stopped reading")  # fmt: skip
    await prober.check("1 GiB body to a route without backends")
    growth = await watch.stop()
    report("1 GiB body", w, growth)
    assert growth < 10 * 1024
    assert w.alive()


async def test_random_bytes_never_crash_the_worker(abused, raw_client, memory_watch) -> None:
    w = await abused()
    watch = memory_watch(w)
    rng = random.Random(1234)
    valid = (
        b"POST /path?q=1 HTTP/1.1\r\nHost: good.test\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: keep-alive, Upgrade\r\nUpgrade: x\r\n"
        b"Expect: 100-continue\r\nCookie: _backend=abc\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )

    async def attempt(data: bytes) -> None:
        try:
            c = await raw_client(w.http_port)
            await c.send(data)
            c.writer.write_eof()
            await c.closed(within=3)
        except ConnectionError:
            pass
        finally:
            c.close()

    cases = []
    for _ in range(300):
        kind = rng.random()
        if kind < 0.3:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        else:
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                i = rng.randrange(len(data))
                op = rng.random()
                if op < 0.4:
                    data[i] = rng.randrange(256)
                elif op < 0.7:
                    del data[i : i + rng.randrange(1, 10)]
                else:
                    data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 10)))
            data = bytes(data)
        cases.append(data)
    for i in range(0, len(cases), 30):
        await asyncio.gather(*(attempt(d) for d in cases[i : i + 30]))
    assert w.alive()
    c = await raw_client(w.http_port)
    await c.send(GOOD_REQUEST)
    assert (await c.response())[::2] == (200, b"ok")
    growth = await watch.stop()
    report("random bytes", w, growth)
    assert growth < 10 * 1024
