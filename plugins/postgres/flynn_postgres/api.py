"""`flynn-host component postgres-api`: Flynn's `postgres` resource provider, the HTTP API an
app's `flynn resource add postgres` reaches (process `web` of the appliance's app, discoverd
service `<service>-api`).

`POST /databases` makes a role and a database it owns and answers the env an app needs;
`DELETE /databases?id=/databases/<user>:<database>` drops them; `GET /ping` is 200 only while
a primary commits writes. Errors are Flynn's error JSON; while no primary takes writes every
endpoint answers 503 `service_unavailable` with `retry: true`. The SQL is in `databases`; this
module holds the settings, the HTTP side and the registration in discoverd
(docs/postgres.md#the-provider-api).

On SIGTERM it leaves discoverd first (so no new request is sent here), then stops serving, and
exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from flynn_discoverd.types import check_service_name

from flynn_host import httphelper
from flynn_host.errors import FlynnError, ValidationError, not_found
from flynn_postgres import databases
from flynn_postgres.databases import Postgres
from flynn_postgres.types import DEFAULT_PORT, DEFAULT_SCOPE

log = logging.getLogger("postgres-api")

# an id this provider hands out; nothing else may be deleted
DATABASE_ID = re.compile(
    rf"/databases/({databases.NAME.pattern}):({databases.NAME.pattern})", re.ASCII
)
# how long a registration in discoverd is retried between attempts, and how long leaving may
# take (discoverd may be gone already: a stop must not hang on it)
REGISTER_RETRY = 2.0
LEAVE_TIMEOUT = 2.0


class SettingsError(ValueError):
    """A setting is wrong or missing; the message says which."""


@dataclass(frozen=True)
class ApiSettings:
    service: str  # the appliance's discoverd service, `postgres`
    pg: Postgres
    listen: str = "0.0.0.0"
    port: int = 80
    # what apps are told to connect to: the primary's name, not the address we reach it by
    public_host: str = ""
    public_port: int = DEFAULT_PORT
    service_name: str = ""  # the API's own discoverd service
    external_ip: str = ""  # the address registered in discoverd


SETTINGS: web.AppKey[ApiSettings] = web.AppKey("settings", ApiSettings)


def leader_host(service: str) -> str:
    """The name that resolves to `service`'s primary."""
    return f"leader.{service}.discoverd"


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="flynn-host component postgres-api")
    p.add_argument("--service", default=env.get("FLYNN_POSTGRES_SERVICE", DEFAULT_SCOPE),
                   help="the appliance's discoverd service (default postgres)")  # fmt: skip
    p.add_argument("--listen", default="0.0.0.0", help="the address to serve on")
    # argparse converts a string default with `type` too: a bad $PORT is a clear exit 2
    p.add_argument("--port", type=int, default=env.get("PORT", "80"))
    p.add_argument("--pg-host", default=None,
                   help="where the primary is (default leader.<service>.discoverd)")  # fmt: skip
    p.add_argument("--pg-port", type=int, default=DEFAULT_PORT)
    p.add_argument("--public-host", default=None,
                   help="the host apps are told (default leader.<service>.discoverd)")  # fmt: skip
    p.add_argument("--public-port", type=int, default=DEFAULT_PORT,
                   help="the port apps are told (PGPORT is added when not 5432)")  # fmt: skip
    p.add_argument("--service-name", default=None,
                   help="the API's discoverd service (default <service>-api)")  # fmt: skip
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace, env: dict[str, str]) -> ApiSettings:
    """The API's settings; `SettingsError` names the first wrong one."""
    password = env.get("POSTGRES_SUPERUSER_PASSWORD", "")
    if not password:
        raise SettingsError("POSTGRES_SUPERUSER_PASSWORD is not set: the API acts as postgres")
    service_name = args.service_name or f"{args.service}-api"
    for what, name in (("service", args.service), ("service name", service_name)):
        try:
            check_service_name(name)
        except ValidationError:
            msg = f"{what} {name!r}: use lower-case letters, digits and '-'"
            raise SettingsError(msg) from None
    for what, port in (("port", args.port), ("pg port", args.pg_port),
                       ("public port", args.public_port)):  # fmt: skip
        if not 0 < port < 65536:
            raise SettingsError(f"{what} {port}: expected 1-65535")
    external_ip = env.get("EXTERNAL_IP", "")
    if env.get("DISCOVERD") and not external_ip:
        raise SettingsError("DISCOVERD is set but EXTERNAL_IP is not: no address to register")
    return ApiSettings(
        service=args.service,
        pg=Postgres(args.pg_host or leader_host(args.service), args.pg_port, password),
        listen=args.listen,
        port=args.port,
        public_host=args.public_host or leader_host(args.service),
        public_port=args.public_port,
        service_name=service_name,
        external_ip=external_ip,
    )


def app_env(settings: ApiSettings, creds: databases.Credentials) -> dict[str, str]:
    """The env an app gets for its database (Flynn's resource env)."""
    host, port = settings.public_host, settings.public_port
    env = {
        "FLYNN_POSTGRES": settings.service,
        "PGHOST": host,
        "PGUSER": creds.user,
        "PGPASSWORD": creds.password,
        "PGDATABASE": creds.database,
        "DATABASE_URL": f"postgres://{creds.user}:{creds.password}@{host}:{port}/{creds.database}",
    }
    if port != DEFAULT_PORT:
        env["PGPORT"] = str(port)
    return env


# --- HTTP -------------------------------------------------------------------------------------


def _translate(exc: Exception) -> FlynnError | None:
    if isinstance(exc, databases.LoginRefused):
        log.error("%s", exc)
        return FlynnError("unknown_error", str(exc))
    reason = databases.unavailable_reason(exc)
    if reason is None:
        return None
    return FlynnError("service_unavailable", reason, retry=True)


errors_middleware = httphelper.errors_middleware(translate=_translate)


def json_response(data: Any) -> web.Response:
    return web.Response(text=json.dumps(data), content_type="application/json")


def parse_id(request: web.Request) -> tuple[str, str]:
    """The role and database of `?id=/databases/<user>:<database>`, checked strictly."""
    value = request.query.get("id")
    if not value:
        raise ValidationError("id", "is required: DELETE /databases?id=/databases/<user>:<db>")
    m = DATABASE_ID.fullmatch(value)
    if m is None:
        raise ValidationError("id", "is not a database id of this provider "
                              "(expected /databases/<user>:<database>)")  # fmt: skip
    return m.group(1), m.group(2)


async def post_database(request: web.Request) -> web.Response:
    # Flynn sends the resource's config; there is nothing to configure, but a body that is
    # not JSON (or too big) is still refused
    await httphelper.read_json(request, required=False)
    settings = request.app[SETTINGS]
    creds = await databases.create(settings.pg)
    return json_response(
        {
            "id": f"/databases/{creds.user}:{creds.database}",
            "env": app_env(settings, creds),
        }
    )


async def delete_database(request: web.Request) -> web.Response:
    user, database = parse_id(request)
    if not await databases.drop(request.app[SETTINGS].pg, user, database):
        raise not_found(f"no database /databases/{user}:{database}")
    return json_response({})


async def ping(request: web.Request) -> web.Response:
    await databases.ping(request.app[SETTINGS].pg)
    return json_response({})


def make_app(settings: ApiSettings) -> web.Application:
    app = web.Application(middlewares=[errors_middleware])
    app[SETTINGS] = settings
    app.router.add_post("/databases", post_database)
    app.router.add_delete("/databases", delete_database)
    app.router.add_get("/ping", ping)
    return app


# --- running ----------------------------------------------------------------------------------


async def run(settings: ApiSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(make_app(settings), shutdown_timeout=5.0)
    await runner.setup()
    # an exit stack unwinds in reverse: discoverd is left before the server stops serving
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(runner.cleanup)
        try:
            await web.TCPSite(runner, settings.listen, settings.port).start()
        except OSError as exc:  # the port is taken, the address is not ours
            print(f"postgres-api: cannot serve on {settings.listen}:{settings.port}: {exc}",
                  file=sys.stderr, flush=True)  # fmt: skip
            return 1
        if settings.external_ip and os.environ.get("DISCOVERD"):
            from flynn_discoverd.client import registered_while_inside

            addr = f"{settings.external_ip}:{settings.port}"
            await stack.enter_async_context(
                registered_while_inside(settings.service_name, addr, REGISTER_RETRY, LEAVE_TIMEOUT)
            )
        print(f"postgres-api: serving on {settings.listen}:{settings.port}, "
              f"managing {settings.pg.where}", flush=True)  # fmt: skip
        await stop.wait()
        log.info("stopping: leaving discoverd, then closing the API")
    print("postgres-api: stopped", flush=True)
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        settings = settings_from(parse_args(argv), dict(os.environ))
    except SettingsError as exc:
        print(f"postgres-api: {exc}", file=sys.stderr, flush=True)
        return 2
    return asyncio.run(run(settings))
