"""Fixtures for the blobstore's tests: a throwaway PostgreSQL 15 server (one per test module)
and a real `flynn-host component blobstore` process on loopback, once on a database of it and
once on a directory (`blobstore` is parametrised over both backends), all waited for and
always cleaned up."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from blobstore_store import Blobstore

from flynn_host.dev.blobstore import blobstore_process
from flynn_host.dev.controller import PG_BIN, PGServer, pg_server
from flynn_host.dev.host import require_programs


@pytest.fixture(scope="module")
def pg() -> Iterator[PGServer]:
    require_programs(str(PG_BIN / "initdb"), "setpriv")
    with pg_server() as server:
        yield server


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
