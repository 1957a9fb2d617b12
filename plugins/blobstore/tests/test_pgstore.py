"""The PostgreSQL store: its migrations, several processes on one database (the blobstore app
runs two), a server killed in the middle of a PUT, and a database that goes away and comes
back."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import uuid
from collections.abc import Iterator

import aiohttp
import asyncpg
import pytest
from flynn_blobstore.pgstore import PGStore

from flynn_host.dev.blobstore import blobstore_process
from flynn_host.dev.controller import PGServer
from flynn_host.dev.host import wait_for


@pytest.fixture
def database(pg: PGServer) -> Iterator[str]:
    name = "blobstore_" + uuid.uuid4().hex[:8]
    pg.psql(f"CREATE DATABASE {name}")
    yield name
    pg.psql(f"DROP DATABASE {name} WITH (FORCE)")


def dsn(pg: PGServer, database: str) -> str:
    return pg.dsn.rsplit("/", 1)[0] + "/" + database


async def test_migrations_apply_once_whoever_starts_first(pg: PGServer, database: str) -> None:
    stores = await asyncio.gather(*(PGStore.connect(dsn(pg, database)) for _ in range(4)))
    try:
        conn = await asyncpg.connect(dsn(pg, database))
        try:
            rows = await conn.fetch("SELECT id, name FROM blobstore_migrations")
            assert [(r["id"], r["name"]) for r in rows] == [(1, "0001_files.sql")]
            columns = await conn.fetch(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'files'"
            )
            assert {c["column_name"] for c in columns} == {
                "name", "oid", "size", "etag", "content_type", "created_at", "updated_at"
            }  # fmt: skip
        finally:
            await conn.close()
    finally:
        for store in stores:
            await store.close()


async def test_processes_on_one_database_share_the_blobs(pg: PGServer, database: str) -> None:
    with blobstore_process(pg, database) as one, blobstore_process(pg, database) as two:
        async with aiohttp.ClientSession() as http:
            async with http.put(one.url + "/shared.tgz", data=b"from one") as r:
                assert r.status == 200
            async with http.get(two.url + "/shared.tgz") as r:
                assert await r.read() == b"from one"
            async with http.delete(two.url + "/shared.tgz") as r:
                assert r.status == 200
            async with http.get(one.url + "/shared.tgz") as r:
                assert r.status == 404


def count_large_objects(pg: PGServer, database: str) -> int:
    return int(pg.psql("SELECT count(*) FROM pg_largeobject_metadata", database))


def test_a_server_killed_during_a_put_leaves_nothing(pg: PGServer, database: str) -> None:
    with blobstore_process(pg, database) as bs:
        host, port = bs.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: {50 << 20}\r\n\r\n".encode())
            s.sendall(b"k" * (4 << 20))
            # the large object is being written, in a transaction not yet committed
            wait_for(lambda: pg.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                " 'flynn-blobstore' AND xact_start IS NOT NULL", database).strip() != "0",
                10, "the PUT's transaction")  # fmt: skip
            bs.proc.send_signal(signal.SIGKILL)
            bs.proc.wait()
    wait_for(lambda: count_large_objects(pg, database) == 0, 10, "the large object rolled back")
    assert pg.psql("SELECT count(*) FROM files", database).strip() == "0"


async def test_the_database_going_away_and_coming_back(pg: PGServer, database: str) -> None:
    with blobstore_process(pg, database) as bs:
        async with aiohttp.ClientSession() as http:
            async with http.put(bs.url + "/kept", data=b"kept") as r:
                assert r.status == 200
            await asyncio.to_thread(pg.stop)
            try:
                async with http.get(bs.url + "/.well-known/status") as r:
                    assert r.status == 503
                    assert (await r.json())["data"]["status"] == "unhealthy"
                async with http.get(bs.url + "/kept") as r:
                    assert r.status == 500
            finally:
                await asyncio.to_thread(pg.start)
            deadline = time.monotonic() + 15
            while True:
                async with http.get(bs.url + "/kept") as r:
                    if r.status == 200:
                        assert await r.read() == b"kept"
                        break
                assert time.monotonic() < deadline, "the blobstore did not reconnect"
                await asyncio.sleep(0.2)
        assert bs.proc.poll() is None
