"""`flynn-host component postgres-api` for real: the provider as a subprocess on loopback, over
HTTP, against a singleton node (etcd, Patroni, PostgreSQL 15) shared by the module. An app's
database works with the env it gets and is its own; DELETE removes it and nothing else;
malformed and unknown ids, racing POSTs, no PostgreSQL, a primary that cannot commit, a create
that fails part-way; every listed extension and a refused one; the registration in discoverd."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from flynn_postgres import api as api_module
from flynn_postgres import databases
from flynn_postgres.types import EXTENSIONS
from postgres_nodes import PG_BIN, Node, stop, tail

from flynn_host.dev.host import free_ports, wait_for, wait_for_async

ID = re.compile(r"/databases/([a-z][a-z0-9]{23}):([a-z][a-z0-9]{23})")
ENV_KEYS = {"FLYNN_POSTGRES", "PGHOST", "PGUSER", "PGPASSWORD", "PGDATABASE", "DATABASE_URL"}


# --- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Api:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int


def call(method: str, url: str, body: bytes | None = None, timeout: float = 30) -> Any:
    """(status, decoded JSON body) of one request."""
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def delete_url(api: Api, db_id: str) -> str:
    return f"{api.url}/databases?id={urllib.parse.quote(db_id, safe='')}"


@contextlib.contextmanager
def running_api(args: list[str], env: dict[str, str] | None = None) -> Iterator[Api]:
    """The API as a subprocess on a free loopback port, answering before this yields;
    stopped (SIGTERM, then SIGKILL) and its log removed afterwards."""
    (port,) = free_ports(1)
    base = {k: v for k, v in os.environ.items()
            if k not in ("DISCOVERD", "EXTERNAL_IP", "PORT", "FLYNN_POSTGRES_SERVICE")}  # fmt: skip
    base["POSTGRES_SUPERUSER_PASSWORD"] = "test-superuser-secret"
    with tempfile.TemporaryDirectory(prefix="postgres-api-test-") as tmp:
        log = Path(tmp) / "api.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flynn_host.cli.main", "component", "postgres-api",
                 "--listen", "127.0.0.1", "--port", str(port), *args],
                env={**base, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                process_group=0,
            )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"

            def answering() -> bool:
                assert proc.poll() is None, f"the API exited {proc.returncode}: {tail(log)}"
                with contextlib.suppress(OSError):
                    return call("GET", f"{url}/no-such-path", timeout=2)[0] == 404
                return False

            wait_for(answering, timeout=20, what="the API to answer", every=0.05)
            yield Api(url, proc, log, port)
        except BaseException:
            print(tail(log))
            raise
        finally:
            stop(proc, timeout=10)


def psql(
    target: list[str], sql: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """psql `target` (a URL, or nothing when the env says where) running `sql`."""
    return subprocess.run(
        [str(PG_BIN / "psql"), *target, "-v", "ON_ERROR_STOP=1", "-X", "-At", "-c", sql],
        env={**os.environ, "PGCONNECT_TIMEOUT": "5", **(env or {})},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def as_app(app_env: dict[str, str], sql: str, database: str | None = None) -> str:
    """`sql` as the app whose env this is (on `database` instead of its own, if given)."""
    url = app_env["DATABASE_URL"]
    if database:
        url = url.rsplit("/", 1)[0] + "/" + database
    out = psql([url], sql)
    assert out.returncode == 0, f"{sql!r}: {out.stderr}"
    return out.stdout.strip()


def as_superuser(node: Node, sql: str) -> str:
    out = psql(
        ["-h", "127.0.0.1", "-p", str(node.port), "-U", "postgres", "-d", "postgres"],
        sql, {"PGPASSWORD": node.superuser_password},
    )  # fmt: skip
    assert out.returncode == 0, f"{sql!r}: {out.stderr}"
    return out.stdout.strip()


def exists(node: Node, user: str, database: str) -> tuple[bool, bool]:
    """Whether the role and the database exist."""
    out = as_superuser(
        node,
        f"SELECT (SELECT count(*) FROM pg_roles WHERE rolname = '{user}'), "
        f"(SELECT count(*) FROM pg_database WHERE datname = '{database}')",
    )
    role, db = out.split("|")
    return role == "1", db == "1"


def create(api: Api) -> tuple[str, dict[str, str]]:
    status, body = call("POST", f"{api.url}/databases")
    assert status == 200, body
    return body["id"], body["env"]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(singleton_node: Node) -> Iterator[Api]:
    """The API managing the singleton; apps are told 127.0.0.1 and its port."""
    port = str(singleton_node.port)
    with running_api(
        ["--service", "pgapi", "--pg-host", "127.0.0.1", "--pg-port", port,
         "--public-host", "127.0.0.1", "--public-port", port]
    ) as a:  # fmt: skip
        yield a


@pytest.fixture(scope="module")
def api_without_postgres() -> Iterator[Api]:
    """The API pointed at a loopback port nothing listens on."""
    (closed,) = free_ports(1)
    with running_api(["--pg-host", "127.0.0.1", "--pg-port", str(closed)]) as a:
        yield a


def pg(node: Node) -> databases.Postgres:
    return databases.Postgres("127.0.0.1", node.port, node.superuser_password)


# --- creating and using a database ------------------------------------------------------------


def test_post_gives_a_database_that_works_with_the_env_it_answers(
    api: Api, singleton_node: Node
) -> None:
    db_id, env = create(api)
    m = ID.fullmatch(db_id)
    assert m, db_id
    user, database = m.groups()
    assert set(env) == ENV_KEYS | {"PGPORT"}
    assert env["FLYNN_POSTGRES"] == "pgapi"
    assert (env["PGUSER"], env["PGDATABASE"], env["PGHOST"]) == (user, database, "127.0.0.1")
    assert env["PGPORT"] == str(singleton_node.port)
    assert len(env["PGPASSWORD"]) >= 43  # 32 random bytes
    assert env["DATABASE_URL"] == (
        f"postgres://{user}:{env['PGPASSWORD']}@127.0.0.1:{singleton_node.port}/{database}"
    )

    # through DATABASE_URL, and through the PG* variables alone
    as_app(env, "CREATE TABLE notes (id int PRIMARY KEY, body text)")
    as_app(env, "INSERT INTO notes SELECT i, 'note ' || i FROM generate_series(1, 50) i")
    assert as_app(env, "SELECT count(*), sum(id) FROM notes") == "50|1275"
    pg_env = {k: v for k, v in env.items() if k.startswith("PG")}
    out = psql([], "SELECT current_user, current_database()", pg_env)
    assert out.stdout.strip() == f"{user}|{database}", out.stderr

    # a plain role that owns its database; its password never reached the server in clear
    assert (
        as_superuser(
            singleton_node,
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, "
            f"rolcanlogin, left(rolpassword, 14) FROM pg_authid WHERE rolname = '{user}'",
        )
        == "f|f|f|f|f|t|SCRAM-SHA-256$"
    )
    assert as_superuser(
        singleton_node, f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = "
        f"'{database}'"
    ) == user  # fmt: skip
    assert call("DELETE", delete_url(api, db_id))[0] == 200


def test_an_app_cannot_connect_to_another_apps_database(api: Api) -> None:
    a_id, a = create(api)
    b_id, b = create(api)
    try:
        out = psql([a["DATABASE_URL"].rsplit("/", 1)[0] + "/" + b["PGDATABASE"]], "SELECT 1")
        assert out.returncode != 0
        assert "permission denied for database" in out.stderr
    finally:
        for db_id in (a_id, b_id):
            call("DELETE", delete_url(api, db_id))


def test_racing_posts_each_get_a_working_database_of_their_own(
    api: Api, singleton_node: Node
) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: call("POST", f"{api.url}/databases"), range(4)))
    try:
        assert [status for status, _ in results] == [200] * 4, results
        envs = [body["env"] for _, body in results]
        assert len({e["PGUSER"] for e in envs} | {e["PGDATABASE"] for e in envs}) == 8
        for n, env in enumerate(envs):
            as_app(env, f"CREATE TABLE t{n} AS SELECT {n} AS n")
            assert as_app(env, f"SELECT n FROM t{n}") == str(n)
    finally:
        for status, body in results:
            if status == 200:
                assert call("DELETE", delete_url(api, body["id"]))[0] == 200


# --- deleting ---------------------------------------------------------------------------------


def test_delete_drops_the_role_and_database_and_ends_their_sessions(
    api: Api, singleton_node: Node
) -> None:
    db_id, env = create(api)
    user, database = env["PGUSER"], env["PGDATABASE"]
    as_app(env, "CREATE TABLE kept (id int)")
    # an app still connected does not stop the drop: its session is ended
    session = subprocess.Popen(
        [str(PG_BIN / "psql"), env["DATABASE_URL"], "-X", "-c", "SELECT pg_sleep(60)"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(
            lambda: as_superuser(singleton_node, "SELECT count(*) FROM pg_stat_activity "
                                 f"WHERE usename = '{user}'") == "1",
            timeout=10, what="the app's session",
        )  # fmt: skip
        status, body = call("DELETE", delete_url(api, db_id))
        assert (status, body) == (200, {})
        assert session.wait(timeout=10) != 0
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    assert exists(singleton_node, user, database) == (False, False)
    assert psql([env["DATABASE_URL"]], "SELECT 1").returncode != 0
    # gone: a second DELETE finds nothing
    status, body = call("DELETE", delete_url(api, db_id))
    assert (status, body["code"]) == (404, "not_found")


def _malformed_ids() -> list[str]:
    good = "a" + "b" * 23
    return [
        "/databases/postgres:postgres",
        "/databases/replicator:template1",
        "/databases/postgres:template0",
        f"/databases/{good}:postgres",
        f"/databases/{good}",
        f"databases/{good}:{good}",
        f"/databases/{good}:{good}/",
        f"/databases/{good}:{good}\n",
        f"/databases/{good.upper()}:{good}",
        f"/databases/{good}x:{good}",
        f"/databases/1{good[1:]}:{good}",
        f"/databases/{good}:{good};DROP ROLE postgres",
        f'/databases/{good}";DROP DATABASE postgres;--:{good}',
        f"/databases/{good}:{good}' OR '1'='1",
        "/databases/:",
        "",
    ]


@pytest.mark.parametrize("db_id", _malformed_ids())
def test_malformed_ids_are_refused_and_nothing_is_dropped(
    api: Api, singleton_node: Node, db_id: str
) -> None:
    status, body = call("DELETE", delete_url(api, db_id))
    assert status == 400, body
    assert body["code"] == "validation_error"
    assert body["detail"] == {"field": "id"}
    assert body["message"].startswith("id ")
    assert exists(singleton_node, "postgres", "postgres") == (True, True)
    assert exists(singleton_node, "replicator", "template1") == (True, True)


@pytest.mark.parametrize("query", ["", "?", "?id", "?other=/databases/x:y"])
def test_a_delete_without_an_id_is_refused(api: Api, query: str) -> None:
    status, body = call("DELETE", f"{api.url}/databases{query}")
    assert (status, body["code"], body["detail"]) == (400, "validation_error", {"field": "id"})
    assert "required" in body["message"]


def test_unknown_ids_are_not_found_and_another_apps_pair_is_left_alone(
    api: Api, singleton_node: Node
) -> None:
    unknown = f"/databases/{databases.new_name()}:{databases.new_name()}"
    status, body = call("DELETE", delete_url(api, unknown))
    assert (status, body["code"], body["retry"]) == (404, "not_found", False)
    assert unknown in body["message"]
    a_id, a = create(api)
    b_id, b = create(api)
    try:
        # a's role with b's database: not a pair this provider made
        mixed = f"/databases/{a['PGUSER']}:{b['PGDATABASE']}"
        assert call("DELETE", delete_url(api, mixed))[0] == 404
        assert exists(singleton_node, a["PGUSER"], b["PGDATABASE"]) == (True, True)
        assert exists(singleton_node, b["PGUSER"], a["PGDATABASE"]) == (True, True)
    finally:
        for db_id in (a_id, b_id):
            assert call("DELETE", delete_url(api, db_id))[0] == 200


def test_a_role_left_without_its_database_is_dropped_by_a_delete(
    api: Api, singleton_node: Node
) -> None:
    """What a failed undo would leave: a retried DELETE finishes the job."""
    user, database = databases.new_name(), databases.new_name()
    as_superuser(singleton_node, f'CREATE ROLE "{user}" LOGIN')
    assert call("DELETE", delete_url(api, f"/databases/{user}:{database}"))[0] == 200
    assert exists(singleton_node, user, database) == (False, False)


# --- failures part-way ------------------------------------------------------------------------


async def test_a_create_that_fails_part_way_leaves_no_role_behind(singleton_node: Node) -> None:
    """CREATE DATABASE fails (its name is taken): the role made before it is dropped, and the
    database of that name, which is not ours, is left alone."""
    user, taken = databases.new_name(), databases.new_name()
    as_superuser(singleton_node, f'CREATE DATABASE "{taken}"')
    names = iter([user, taken])
    try:
        with pytest.raises(asyncpg.DuplicateDatabaseError):
            await databases.create(pg(singleton_node), make_name=lambda: next(names))
        assert exists(singleton_node, user, taken) == (False, True)
    finally:
        as_superuser(singleton_node, f'DROP DATABASE IF EXISTS "{taken}"')


async def test_a_create_whose_role_name_is_taken_drops_nothing(singleton_node: Node) -> None:
    taken, database = databases.new_name(), databases.new_name()
    as_superuser(singleton_node, f'CREATE ROLE "{taken}"')
    names = iter([taken, database])
    try:
        with pytest.raises(asyncpg.DuplicateObjectError):
            await databases.create(pg(singleton_node), make_name=lambda: next(names))
        assert exists(singleton_node, taken, database) == (True, False)
    finally:
        as_superuser(singleton_node, f'DROP ROLE IF EXISTS "{taken}"')


async def test_undo_drops_a_role_and_the_database_it_owns(singleton_node: Node) -> None:
    user, database = databases.new_name(), databases.new_name()
    as_superuser(singleton_node, f'CREATE ROLE "{user}" LOGIN')
    as_superuser(singleton_node, f'CREATE DATABASE "{database}" OWNER "{user}"')
    await databases.undo(pg(singleton_node), user, database)
    assert exists(singleton_node, user, database) == (False, False)


# --- no primary that takes writes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/databases"), ("DELETE", f"/databases?id=/databases/{'a' * 24}:{'b' * 24}"),
     ("GET", "/ping")],
)  # fmt: skip
def test_without_postgres_every_endpoint_answers_503_retry(
    api_without_postgres: Api, method: str, path: str
) -> None:
    started = time.monotonic()
    status, body = call(method, api_without_postgres.url + path)
    assert time.monotonic() - started < 5
    assert status == 503, body
    assert body["code"] == "service_unavailable"
    assert body["retry"] is True
    assert "cannot reach a PostgreSQL primary at 127.0.0.1:" in body["message"]


def test_without_postgres_a_malformed_id_is_still_a_400(api_without_postgres: Api) -> None:
    status, body = call("DELETE", f"{api_without_postgres.url}/databases?id=/databases/x:y")
    assert (status, body["code"]) == (400, "validation_error")


def test_a_strict_primary_without_a_standby_answers_503_and_makes_nothing(
    strict_node: Node,
) -> None:
    """Every commit waits for a synchronous standby that does not exist: /ping and POST give up
    after the write check's 2 s instead of hanging, and no role is made."""
    count = "SELECT count(*) FROM pg_roles WHERE rolname ~ '^[a-z][a-z0-9]{23}$'"
    before = as_superuser(strict_node, count)
    port = str(strict_node.port)
    with running_api(["--service", "pgstrict", "--pg-host", "127.0.0.1", "--pg-port", port]) as a:
        # Patroni sets synchronous_standby_names just after it leads, and PostgreSQL applies
        # it a moment later: until then the primary still commits alone
        wait_for(lambda: call("GET", a.url + "/ping")[0] == 503, timeout=20,
                 what="commits to wait for a standby", every=0.2)  # fmt: skip
        for method, path in (("GET", "/ping"), ("POST", "/databases")):
            started = time.monotonic()
            status, body = call(method, a.url + path)
            took = time.monotonic() - started
            assert (status, body["code"], body["retry"]) == (503, "service_unavailable", True)
            assert "did not commit a write within 2 s" in body["message"]
            assert took < 5, f"{method} {path} took {took:.1f}s"
    assert as_superuser(strict_node, count) == before


# --- HTTP -------------------------------------------------------------------------------------


def test_ping_answers_200_while_the_primary_takes_writes(api: Api) -> None:
    assert call("GET", f"{api.url}/ping") == (200, {})


def test_unknown_paths_wrong_methods_and_bad_bodies_get_flynn_errors(api: Api) -> None:
    status, body = call("GET", f"{api.url}/databases/nope")
    assert (status, body["code"]) == (404, "not_found")
    assert call("GET", f"{api.url}/databases")[0] == 405
    assert call("POST", f"{api.url}/ping")[0] == 405
    status, body = call("POST", f"{api.url}/databases", b"{not json")
    assert (status, body["code"]) == (400, "syntax_error")
    # the resource config Flynn's controller sends is accepted (and ignored)
    status, body = call("POST", f"{api.url}/databases", b'{"config": {}}')
    assert status == 200, body
    assert call("DELETE", delete_url(api, body["id"]))[0] == 200


# --- extensions -------------------------------------------------------------------------------


def test_the_app_role_creates_every_listed_extension_and_stays_a_plain_role(
    api: Api, singleton_node: Node
) -> None:
    assert as_superuser(singleton_node, "SHOW local_preload_libraries") == "pgextwlist"
    assert as_superuser(singleton_node, "SHOW extwlist.extensions") == ",".join(EXTENSIONS)
    db_id, env = create(api)
    try:
        # postgis_topology and pgrouting need postgis, earthdistance needs cube
        ordered = ["postgis", "cube"] + [e for e in EXTENSIONS if e not in ("postgis", "cube")]
        as_app(env, "; ".join(f'CREATE EXTENSION IF NOT EXISTS "{e}"' for e in ordered))
        made = as_app(env, "SELECT string_agg(extname, ',' ORDER BY extname) FROM pg_extension")
        assert sorted(made.split(",")) == sorted(EXTENSIONS)
        # and they work for the app
        assert as_app(env, "SELECT ST_AsText(ST_MakePoint(1, 2))") == "POINT(1 2)"
        assert as_app(env, "SELECT 'a=>1'::hstore -> 'a'") == "1"
        assert as_app(env, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") == "f"
    finally:
        assert call("DELETE", delete_url(api, db_id))[0] == 200


@pytest.mark.parametrize("extension", ["adminpack", "file_fdw"])
def test_an_extension_not_listed_is_refused(api: Api, extension: str) -> None:
    db_id, env = create(api)
    try:
        out = psql([env["DATABASE_URL"]], f"CREATE EXTENSION {extension}")
        assert out.returncode != 0
        assert f'permission denied to create extension "{extension}"' in out.stderr
    finally:
        call("DELETE", delete_url(api, db_id))


def test_an_app_cannot_widen_the_allow_list(api: Api) -> None:
    """extwlist.extensions is the superuser's: an app role that sets it for its session, its
    connection or its database still cannot create what the list leaves out."""
    db_id, env = create(api)
    try:
        url, database = env["DATABASE_URL"], env["PGDATABASE"]
        refused = 'permission denied to set parameter "extwlist.extensions"'
        for sql in (
            "SET extwlist.extensions = 'adminpack'",
            f"ALTER DATABASE \"{database}\" SET extwlist.extensions = 'adminpack'",
            "ALTER ROLE current_user SET extwlist.extensions = 'adminpack'",
        ):
            out = psql([url], sql)
            assert out.returncode != 0 and refused in out.stderr, (sql, out.stderr)
        # a setting in the connection's options is dropped with a warning
        out = psql([url], "CREATE EXTENSION adminpack",
                   {"PGOPTIONS": "-c extwlist.extensions=adminpack"})  # fmt: skip
        assert refused in out.stderr
        assert 'permission denied to create extension "adminpack"' in out.stderr
    finally:
        call("DELETE", delete_url(api, db_id))


# --- settings, discoverd, stopping ------------------------------------------------------------


def test_settings_defaults_follow_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLYNN_POSTGRES_SERVICE", "PORT"):
        monkeypatch.delenv(name, raising=False)
    args = api_module.parse_args([])
    assert (args.listen, args.port) == ("0.0.0.0", 80)
    env = {"POSTGRES_SUPERUSER_PASSWORD": "pw"}
    s = api_module.settings_from(args, env)
    assert (s.pg.host, s.pg.port, s.public_host, s.service_name) == (
        "leader.postgres.discoverd", 5432, "leader.postgres.discoverd", "postgres-api"
    )  # fmt: skip
    creds = databases.Credentials("u" * 24, "pw", "d" * 24)
    app_env = api_module.app_env(s, creds)
    assert set(app_env) == ENV_KEYS
    assert app_env["DATABASE_URL"] == (
        f"postgres://{'u' * 24}:pw@leader.postgres.discoverd:5432/{'d' * 24}"
    )
    s2 = api_module.settings_from(api_module.parse_args(["--service", "pg-two"]), env)
    assert (s2.pg.host, s2.service_name) == ("leader.pg-two.discoverd", "pg-two-api")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "POSTGRES_SUPERUSER_PASSWORD is not set"),
        (["--service", "Post_gres"], {"POSTGRES_SUPERUSER_PASSWORD": "x"}, "service 'Post_gres'"),
        (["--port", "0"], {"POSTGRES_SUPERUSER_PASSWORD": "x"}, "port 0"),
        ([], {"POSTGRES_SUPERUSER_PASSWORD": "x", "DISCOVERD": "http://127.0.0.1:1111"},
         "EXTERNAL_IP is not"),
    ],
)  # fmt: skip
def test_wrong_settings_exit_2_naming_them(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("POSTGRES_SUPERUSER_PASSWORD", "DISCOVERD", "EXTERNAL_IP", "PORT")
    }
    out = subprocess.run(
        [sys.executable, "-m", "flynn_host.cli.main", "component", "postgres-api", *argv],
        env={**clean, **env}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert message in out.stderr


async def test_it_registers_in_discoverd_and_leaves_on_sigterm(singleton_node: Node) -> None:
    from flynn_discoverd.client import Client
    from flynn_discoverd.etcd import EtcdClient
    from flynn_discoverd.server import serve
    from flynn_discoverd.store import Store

    (discoverd_port,) = free_ports(1)
    store = Store(EtcdClient([f"http://127.0.0.1:{singleton_node.etcd_port}"]), prefix="/t-api")
    runner = await serve(store, "127.0.0.1", discoverd_port)
    discoverd = f"http://127.0.0.1:{discoverd_port}"
    client = Client([discoverd])
    try:
        env = {"DISCOVERD": discoverd, "EXTERNAL_IP": "127.0.0.1"}
        port = str(singleton_node.port)
        with running_api(["--service", "pgapi", "--pg-host", "127.0.0.1", "--pg-port", port],
                         env) as a:  # fmt: skip

            async def registered() -> bool:
                with contextlib.suppress(Exception):
                    found = await client.instances("pgapi-api")
                    return [i.addr for i in found] == [f"127.0.0.1:{a.port}"]
                return False

            await wait_for_async(registered, within=15, what="the API in discoverd")
            a.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(a.proc.wait, 10) == 0, tail(a.log)
            assert await client.instances("pgapi-api") == []
            assert "postgres-api: stopped" in a.log.read_text()
    finally:
        await client.close()
        await runner.cleanup()
        await store.close()
