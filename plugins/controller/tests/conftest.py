"""Fixtures for the controller's tests, one of each per test module: a throwaway PostgreSQL 15
server, a real `flynn-host component controller` process on it (both on loopback, waited for
and always cleaned up), `api` (requests to that controller, see `controller_http`) and
`provider` (a stand-in for an external resource provider)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from controller_http import Api, FakeProvider, fake_provider

from flynn_host.dev.controller import (
    PG_BIN,
    ControllerProcess,
    PGServer,
    controller_process,
    pg_server,
)
from flynn_host.dev.host import require_programs


@pytest.fixture(scope="module")
def pg() -> Iterator[PGServer]:
    require_programs(str(PG_BIN / "initdb"), "setpriv")
    with pg_server() as server:
        yield server


@pytest.fixture(scope="module")
def controller(pg: PGServer) -> Iterator[ControllerProcess]:
    with controller_process(pg) as ctl:
        yield ctl


@pytest.fixture(scope="module")
def api(controller: ControllerProcess) -> Api:
    return Api(controller)


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    with fake_provider() as p:
        yield p
