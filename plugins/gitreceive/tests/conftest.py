"""Fixtures for gitreceive's tests, one of each per module: a throwaway PostgreSQL server, a
controller and a blobstore on it, and gitreceive using both (gitreceive_proc.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gitreceive_proc import GitReceive, gitreceive_process

from flynn_host.dev.blobstore import blobstore_process
from flynn_host.dev.controller import PG_BIN, PGServer, controller_process, pg_server
from flynn_host.dev.host import require_programs


@pytest.fixture(scope="module")
def pg() -> Iterator[PGServer]:
    require_programs(str(PG_BIN / "initdb"), "setpriv", "git")
    with pg_server() as server:
        yield server


@pytest.fixture(scope="module")
def gitreceive(pg: PGServer) -> Iterator[GitReceive]:
    with (
        controller_process(pg) as ctl,
        blobstore_process(pg) as bs,
        gitreceive_process(pg, ctl, bs) as gr,
    ):
        yield gr
