"""`flynn-host component controller`: one `web` process of the controller app.

It reads its settings from the environment Flynn gave the controller (`PORT`, `AUTH_KEY`,
`DEFAULT_ROUTE_DOMAIN`, `CA_CERT`, `NAME_SEED`, `LOGAGGREGATOR_URL`; the database from the
`PG*` variables of its postgres resource, or `DATABASE_URL`), waits for the database, applies
the migrations it lacks (under an advisory lock: several processes may start together),
serves, and registers itself in discoverd service `controller` when it runs in a cluster
(`DISCOVERD` and `EXTERNAL_IP` set). It also runs a task worker (deployments, app deletions)
unless `RUN_TASKS=false`, when only the `worker` processes (`worker.py`) do. SIGTERM leaves
discoverd first, then stops serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import asyncpg
from aiohttp import web

from flynn_controller import db
from flynn_controller.api import LOGAGGREGATOR_URL, Config
from flynn_controller.server import make_app

log = logging.getLogger("flynn_controller")

SERVICE = "controller"
DB_RETRY = 1.0
DB_WAIT = 300.0  # seconds a starting controller waits for its database
REGISTER_RETRY = 2.0


class SettingsError(Exception):
    pass


def config_from(env: dict[str, str]) -> Config:
    keys = tuple(k for k in (env.get("AUTH_KEY") or "").split(",") if k)
    if not keys:
        raise SettingsError("AUTH_KEY must name at least one key")
    from flynn_host import __version__

    return Config(
        auth_keys=keys,
        default_route_domain=env.get("DEFAULT_ROUTE_DOMAIN", ""),
        ca_cert=env.get("CA_CERT", ""),
        name_seed=env.get("NAME_SEED", ""),
        version=__version__,
        logaggregator_url=env.get("LOGAGGREGATOR_URL") or LOGAGGREGATOR_URL,
    )


async def wait_for_database() -> asyncpg.Pool:
    deadline = asyncio.get_running_loop().time() + DB_WAIT
    while True:
        try:
            pool = await db.create_pool()
            applied = await db.migrate(pool)
            if applied:
                log.info("database: migrations %s applied", applied)
            return pool
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise
            log.warning("database not ready (%s); retrying", exc)
            await asyncio.sleep(DB_RETRY)


async def run(config: Config, env: dict[str, str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = int(env.get("PORT") or 3000)
    listen = env.get("LISTEN_IP") or "0.0.0.0"
    pool = await wait_for_database()
    run_tasks = (env.get("RUN_TASKS") or "true").lower() not in ("false", "0", "no")
    runner = web.AppRunner(make_app(pool, config, run_tasks), shutdown_timeout=3.0)
    await runner.setup()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(pool.close)
        stack.push_async_callback(runner.cleanup)
        try:
            await web.TCPSite(runner, listen, port).start()
        except OSError as exc:
            print(f"controller: cannot serve on {listen}:{port}: {exc}", file=sys.stderr)
            return 1
        from flynn_discoverd.client import registered_in_cluster

        await stack.enter_async_context(registered_in_cluster(SERVICE, port, REGISTER_RETRY))
        print(f"controller: serving on {listen}:{port}", flush=True)
        await stop.wait()
        log.info("stopping")
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    env = dict(os.environ)
    try:
        config = config_from(env)
    except SettingsError as exc:
        print(f"controller: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(config, env))
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        print(f"controller: the database did not answer: {exc}", file=sys.stderr)
        return 1
