"""Fixtures for the blobstore's tests: a throwaway PostgreSQL 15 server (one per test module)
and a real `flynn-host component blobstore` process on loopback, once on a database of it and
once on a directory (`blobstore` is parametrised over both backends), all waited for and
always cleaned up."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from flynn_host.dev.blobstore import BlobstoreProcess, blobstore_process
from flynn_host.dev.controller import PG_BIN, PGServer, pg_server
from flynn_host.dev.host import require_programs


@pytest.fixture(scope="module")
def pg() -> Iterator[PGServer]:
    require_programs(str(PG_BIN / "initdb"), "setpriv")
    with pg_server() as server:
        yield server


@dataclass
class Blobstore:
    """A running blobstore and a look at its storage behind its back."""

    backend: str  # "postgres" or "dir"
    process: BlobstoreProcess
    pg: PGServer | None = None
    database: str = ""
    directory: Path | None = None

    @property
    def url(self) -> str:
        return self.process.url

    def sql(self, query: str) -> str:
        assert self.pg is not None
        return self.pg.psql(query, self.database).strip()

    def leftovers(self) -> list[str]:
        """What storage holds beyond the blobs: large objects no row points at, or files in
        the directory store's temporary directory."""
        if self.backend == "postgres":
            out = self.sql(
                "SELECT oid FROM pg_largeobject_metadata"
                " WHERE oid NOT IN (SELECT oid FROM files) ORDER BY oid"
            )
            return out.split()
        assert self.directory is not None
        return sorted(p.name for p in (self.directory / ".blobstore-tmp").iterdir())

    def large_objects(self) -> int:
        return int(self.sql("SELECT count(*) FROM pg_largeobject_metadata"))


@pytest.fixture(scope="module", params=["postgres", "dir"])
def blobstore(request: pytest.FixtureRequest) -> Iterator[Blobstore]:
    if request.param == "postgres":
        pg: PGServer = request.getfixturevalue("pg")
        database = "blobstore_" + uuid.uuid4().hex[:8]
        pg.psql(f"CREATE DATABASE {database}")
        with blobstore_process(pg, database) as proc:
            yield Blobstore("postgres", proc, pg=pg, database=database)
        return
    top = Path(tempfile.mkdtemp(prefix="flynn-blobstore-test-"))
    try:
        with blobstore_process(directory=top) as proc:
            yield Blobstore("dir", proc, directory=top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
def name() -> str:
    """A blob name no other test uses."""
    return f"/tests/{uuid.uuid4()}.bin"
