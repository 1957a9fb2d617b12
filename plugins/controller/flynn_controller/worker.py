"""`flynn-host component controller-worker`: process `worker` of the controller app, which
runs the work queue's tasks (deployments, app deletions) and serves no API.

It takes the web process's database settings (the `PG*` variables of the controller's
postgres resource, or `DATABASE_URL`), waits for the database and applies missing migrations
as a web process would (under the same advisory lock), then runs the event hub (deployments
wait on job events) and a task worker. With `PORT` set it answers `GET /ping` and
`GET /.well-known/status` there, for health checks; it registers nothing in discoverd (no one
calls it). SIGTERM hands its running tasks back to the other workers, uncounted, and exits.

Web processes run a task worker too unless `RUN_TASKS=false`: any number of workers may
share the queue (`tasks.py`), and a controller started alone (tests, development) still
deploys.
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

# the task handlers: importing them fills tasks.HANDLERS
from flynn_controller import deletion, deployer, deploylog, tasks  # noqa: F401
from flynn_controller.api import HUB, POOL
from flynn_controller.events import EventHub
from flynn_controller.service import wait_for_database

log = logging.getLogger("flynn_controller.worker")


def status_app(pool: asyncpg.Pool, worker: tasks.Worker) -> web.Application:
    async def ping(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def status(request: web.Request) -> web.Response:
        healthy = True
        try:
            await asyncio.wait_for(pool.fetchval("SELECT 1"), 5)
        except Exception:  # noqa: BLE001 - any failure is "unhealthy"
            healthy = False
        body = {
            "data": {
                "status": "healthy" if healthy else "unhealthy",
                "running_tasks": sorted(worker.running),
            }
        }
        return web.json_response(body, status=200 if healthy else 500)

    app = web.Application()
    app.router.add_get("/ping", ping)
    app.router.add_get("/.well-known/status", status)
    return app


async def run(env: dict[str, str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = await wait_for_database()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(pool.close)
        hub = EventHub(pool)
        await hub.start()
        stack.push_async_callback(hub.close)
        stack.push_async_callback(deploylog.close)
        state = web.Application()  # what task handlers find: the pool and the hub
        state[POOL] = pool
        state[HUB] = hub
        worker = tasks.Worker(pool, state)
        state[tasks.WORKER] = worker
        worker.start()
        stack.push_async_callback(worker.close)
        if env.get("PORT"):
            runner = web.AppRunner(status_app(pool, worker), shutdown_timeout=1.0)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            listen = env.get("LISTEN_IP") or "0.0.0.0"
            try:
                await web.TCPSite(runner, listen, int(env["PORT"])).start()
            except OSError as exc:
                print(f"controller-worker: cannot serve on {listen}:{env['PORT']}: {exc}",
                      file=sys.stderr)  # fmt: skip
                return 1
        print("controller-worker: running tasks", flush=True)
        await stop.wait()
        log.info("stopping: handing running tasks back")
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        return asyncio.run(run(dict(os.environ)))
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        print(f"controller-worker: the database did not answer: {exc}", file=sys.stderr)
        return 1
