"""`flynn run` and `flynn pg` against a controller without hosts (one controller process on a
throwaway PostgreSQL per module): the messages they give before a job is needed, and the
controller's error when it cannot start one. Running jobs is tested on a booted cluster
(`plugins/controller/tests/test_run_jobs_cluster.py`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from cli_home import Home
from flynn_controller.client import Client

from flynn_host.dev.controller import ControllerProcess, controller_process, pg_server
from flynn_host.dev.host import missing_programs

pytestmark = pytest.mark.skipif(
    bool(missing_programs("/usr/lib/postgresql/15/bin/postgres")), reason="needs PostgreSQL 15"
)

BUSYBOX = "file:///var/lib/flynn/images/busybox/manifest.json"


@pytest.fixture(scope="module")
def controller() -> Iterator[ControllerProcess]:
    with pg_server() as pg, controller_process(pg) as ctl:
        yield ctl


@pytest.fixture
def cli(home: Home, controller: ControllerProcess) -> Home:
    home.ok("cluster", "add", "--no-git", "test", controller.url, controller.key)
    return home


def new_app(cli: Home) -> str:
    name = f"app-{uuid.uuid4().hex[:8]}"
    cli.ok("create", "-y", name)
    return name


def test_run_needs_a_release_and_a_host(cli: Home, controller: ControllerProcess) -> None:
    app = new_app(cli)
    err = cli.fail("-a", app, "run", "true")
    assert err == "No app release, specify a release with -release\n"
    assert cli.fail("-a", app, "run", "-d", "true") == err

    api = Client(controller.url, controller.key)
    artifact = api.create_artifact({"type": "flynn", "uri": BUSYBOX})
    release = api.create_release({"artifact": artifact["id"]})
    api.set_app_release(app, release["id"])
    no_host = "unknown_error: no hosts are available to run the job\n"
    assert cli.fail("-a", app, "run", "-d", "--", "echo", "hi") == no_host
    assert cli.fail("-a", app, "run", "--", "echo", "hi") == no_host
    bogus = str(uuid.uuid4())
    assert cli.fail("-a", app, "run", "-r", bogus, "true") == (
        f"validation_error: release could not find release with ID {bogus}\n"
    )


def test_pg_needs_the_apps_database_env(cli: Home, controller: ControllerProcess) -> None:
    app = new_app(cli)
    no_db = "No postgres database found. Provision one with `flynn resource add postgres`\n"
    for args in (["psql"], ["dump", "-q"], ["restore", "-f", "x"]):
        assert cli.fail("-a", app, "pg", *args) == no_db
    cli.ok("-a", app, "env", "set", "FLYNN_POSTGRES=postgres", "PGHOST=h", "PGUSER=u")
    assert cli.fail("-a", app, "pg", "psql") == "missing PGPASSWORD in app environment\n"
    cli.ok("-a", app, "env", "set", "PGPASSWORD=p", "PGDATABASE=d")
    # the postgres app does not exist here
    assert cli.fail("-a", app, "pg", "dump") == "the postgres app 'postgres' has no release\n"
