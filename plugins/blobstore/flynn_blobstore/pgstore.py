"""Blobs in PostgreSQL large objects (the default store): the table `files` maps a name to a
large object, and the database is the one of the blobstore's postgres resource (its `PG*`
variables, or `DATABASE_URL`), so blobs are as available as the PostgreSQL appliance.

A PUT writes a new large object and, in the same transaction, points the row at it and
unlinks the old one: a PUT that fails half-way (the client went away, the body was short)
rolls back, and its large object goes with it. Swaps of one name are serialised by an
advisory lock on the name, so of two concurrent PUTs the second replaces the first's object
rather than leaking it. A GET reads in a read-only REPEATABLE READ transaction: its snapshot
keeps the version it opened readable to the end even when a PUT or DELETE unlinks it meanwhile
(large objects are MVCC rows in `pg_largeobject`).

Migrations are `migrations/NNNN_name.sql`, applied at start under an advisory lock (several
processes start together) and recorded in `blobstore_migrations`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import asyncpg

from flynn_blobstore.store import CHUNK, rechunk
from flynn_blobstore.types import BlobInfo
from flynn_host import pgmigrate

log = logging.getLogger("flynn_blobstore.pg")

MIGRATION_LOCK = 0x666C796E6E0B  # "flynn" + 0x0b: pg_advisory_lock keys of this program
INV_WRITE = 0x20000
INV_READ = 0x40000
SEEK_SET = 0
MIGRATIONS = "flynn_blobstore.migrations"

# the advisory lock of a name, held by a PUT or DELETE from its swap until it commits
LOCK_NAME = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"


async def migrate(pool: asyncpg.Pool) -> list[int]:
    """Apply the migrations the database lacks (`flynn_host.pgmigrate`)."""
    return await pgmigrate.migrate(pool, MIGRATIONS, "blobstore_migrations", MIGRATION_LOCK)


class PGReader:
    def __init__(self, conn: asyncpg.Connection, fd: int, info: BlobInfo) -> None:
        self.conn = conn
        self.fd = fd
        self.info = info

    async def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        await self.conn.execute("SELECT lo_lseek64($1, $2, $3)", self.fd, offset, SEEK_SET)
        while length > 0:
            chunk: bytes = await self.conn.fetchval(
                "SELECT loread($1, $2)", self.fd, min(length, CHUNK)
            )
            if not chunk:
                raise RuntimeError(f"large object ended {length} bytes early")
            length -= len(chunk)
            yield chunk


class PGStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str | None = None, max_size: int = 20, **kw: Any) -> PGStore:
        """A store on `dsn` (default: `DATABASE_URL`, else asyncpg's `PG*` variables), its
        migrations applied."""
        pool = await asyncpg.create_pool(
            dsn or os.environ.get("DATABASE_URL") or None,
            min_size=1,
            max_size=max_size,
            # one storage round trip never takes this long unless the primary is gone
            command_timeout=60,
            timeout=10,
            server_settings={"application_name": "flynn-blobstore"},
            **kw,
        )
        assert pool is not None
        try:
            await migrate(pool)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    @contextlib.asynccontextmanager
    async def open(self, name: str) -> AsyncIterator[PGReader | None]:
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await conn.fetchrow(
                "SELECT oid, size, etag, content_type FROM files WHERE name = $1", name
            )
            if row is None:
                yield None
                return
            fd = await conn.fetchval("SELECT lo_open($1, $2)", row["oid"], INV_READ)
            info = BlobInfo(row["size"], row["etag"], row["content_type"])
            yield PGReader(conn, fd, info)

    async def put(self, name: str, chunks: AsyncIterable[bytes], content_type: str) -> BlobInfo:
        digest = hashlib.sha256()
        size = 0
        async with self.pool.acquire() as conn, conn.transaction():
            oid = await conn.fetchval("SELECT lo_create(0)")
            fd = await conn.fetchval("SELECT lo_open($1, $2)", oid, INV_WRITE)
            async for chunk in rechunk(chunks):
                digest.update(chunk)
                size += len(chunk)
                await conn.execute("SELECT lowrite($1, $2)", fd, chunk)
            await conn.execute("SELECT lo_close($1)", fd)
            info = BlobInfo(size, digest.hexdigest(), content_type)
            await conn.execute(LOCK_NAME, name)
            old = await conn.fetchval("SELECT oid FROM files WHERE name = $1", name)
            await conn.execute(
                "INSERT INTO files (name, oid, size, etag, content_type)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE"
                " SET oid = $2, size = $3, etag = $4, content_type = $5, updated_at = now()",
                name, oid, info.size, info.etag, info.content_type,
            )  # fmt: skip
            if old is not None:
                await conn.execute("SELECT lo_unlink($1)", old)
        return info

    async def delete(self, name: str) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_NAME, name)
            old = await conn.fetchval("DELETE FROM files WHERE name = $1 RETURNING oid", name)
            if old is None:
                return False
            await conn.execute("SELECT lo_unlink($1)", old)
            return True

    async def check(self) -> None:
        await self.pool.fetchval("SELECT 1")

    async def close(self) -> None:
        await self.pool.close()
