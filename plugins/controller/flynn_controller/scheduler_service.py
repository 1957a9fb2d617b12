"""`flynn-host component controller-scheduler`: process `scheduler` of the controller app (omni:
one on every host).

Each process registers in discoverd service `controller-scheduler` and serves `$PORT`
(`/.well-known/status`, `/debug/state`); only the service's leader (its oldest instance)
schedules (`scheduler.Scheduler`). When the leader's job dies its registration goes, the next
oldest becomes leader and starts from what the controller and the hosts say: the state is
theirs, not the scheduler's.

Settings: `AUTH_KEY` (the controller's key; the first of a comma-separated list),
`FLYNN_HOST_KEY` (the hosts' API key), `DISCOVERD`, `EXTERNAL_IP` and `PORT` as every job has
them, and `CONTROLLER_URL` to name the controller instead of finding service `controller`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
from typing import Any

from aiohttp import web

from flynn_controller.scheduler import Controller, Scheduler

log = logging.getLogger("flynn_controller.scheduler")

SERVICE = "controller-scheduler"
# a leader whose heartbeats have failed this long stops scheduling: its registration (TTL
# 10 s, heartbeats every 3-5 s) may lapse within the next few seconds, and another instance
# lead
STEP_DOWN_AFTER = 3.0
WATCHDOG_EVERY = 0.5
SCHEDULER = web.AppKey("scheduler", dict)


def make_app(state: dict[str, Any]) -> web.Application:
    app = web.Application()
    app[SCHEDULER] = state

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy", "leader": state["leader"]})

    async def debug_state(request: web.Request) -> web.Response:
        sched: Scheduler | None = state.get("scheduler")
        body = {"leader": state["leader"]}
        if sched is not None:
            body.update(sched.state())
        return web.json_response(body)

    app.router.add_get("/.well-known/status", status)
    app.router.add_get("/debug/state", debug_state)
    return app


def controller_url_finder(discoverd: Any, env: dict[str, str]) -> Any:
    fixed = env.get("CONTROLLER_URL")

    known: list[str] = []

    async def url() -> str:
        """A controller instance; the last one found when discoverd does not answer (this
        host's discoverd restarting or redeployed), so job states are still reported."""
        if fixed:
            return fixed.rstrip("/")
        try:
            instances = await discoverd.instances("controller")
        except Exception:
            if known:
                return known[0]
            raise
        if not instances:
            raise ConnectionError("no controller registered in discoverd")
        known[:] = [f"http://{random.choice(instances).addr}"]
        return known[0]

    return url


async def run(env: dict[str, str]) -> int:
    from flynn_discoverd.client import Client

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    key = (env.get("AUTH_KEY") or "").split(",")[0]
    if not key:
        print("controller-scheduler: AUTH_KEY must be set", file=sys.stderr)
        return 2
    port = int(env.get("PORT") or 3000)
    addr = f"{env.get('EXTERNAL_IP') or '127.0.0.1'}:{port}"
    state: dict[str, Any] = {"leader": False, "scheduler": None}
    runner = web.AppRunner(make_app(state), shutdown_timeout=2.0)
    await runner.setup()
    discoverd = Client()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(runner.cleanup)
        stack.push_async_callback(discoverd.close)
        await web.TCPSite(runner, env.get("LISTEN_IP") or "0.0.0.0", port).start()
        controller = await stack.enter_async_context(
            Controller(controller_url_finder(discoverd, env), key)
        )
        leading = asyncio.create_task(lead(discoverd, addr, controller, state, stop))
        print(f"controller-scheduler: serving on :{port}, registering {addr}", flush=True)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({leading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        leading.cancel()
        with contextlib.suppress(BaseException):
            await leading
        if not stop.is_set() or state.get("failed"):
            return 1
    return 0


async def lead(
    discoverd: Any, addr: str, controller: Controller, state: dict[str, Any], stop: asyncio.Event
) -> None:
    """Register, then schedule while this instance is the service's leader. A scheduler that
    fails ends the process (its job is restarted; meanwhile a standby leads).

    A leader whose heartbeats fail for STEP_DOWN_AFTER seconds (its host's discoverd is
    away: restarting, redeployed, crashing) stops scheduling before its registration can
    lapse and another instance lead, so two schedulers never act at once; once its
    heartbeats go through again it asks who leads, and schedules again if it still does."""

    def ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the scheduler failed: %r", task.exception())
            state["failed"] = True
            stop.set()

    while True:
        try:
            heartbeater = await discoverd.add_service_and_register(SERVICE, addr)
            break
        except Exception as exc:  # noqa: BLE001 - discoverd not there yet
            log.warning("registering in discoverd: %s; retrying", exc)
            await asyncio.sleep(2)
    task: asyncio.Task[None] | None = None
    stepped_down = False

    def start() -> None:
        nonlocal task
        log.info("leader of %s: scheduling", SERVICE)
        sched = Scheduler(controller, discoverd)
        state.update(leader=True, scheduler=sched)
        task = asyncio.create_task(sched.run())
        task.add_done_callback(ended)

    async def halt() -> None:
        nonlocal task
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        task = None
        state.update(leader=False, scheduler=None)

    async def watchdog() -> None:
        nonlocal stepped_down
        failing_for = 0.0
        while True:
            await asyncio.sleep(WATCHDOG_EVERY)
            failing_for = failing_for + WATCHDOG_EVERY if heartbeater.failing else 0.0
            if failing_for >= STEP_DOWN_AFTER and task is not None:
                log.warning("heartbeats failing for %.0fs: not scheduling until discoverd is "
                            "back", failing_for)  # fmt: skip
                stepped_down = True
                await halt()
            elif stepped_down and not heartbeater.failing:
                with contextlib.suppress(Exception):
                    leader = await discoverd.leader(SERVICE)
                    stepped_down = False
                    if leader is not None and leader.addr == addr and task is None:
                        start()

    guard = asyncio.create_task(watchdog())
    try:
        async for event in discoverd.watch(SERVICE, kinds=("leader",)):
            leader = event.instance is not None and event.instance.addr == addr
            if leader and task is None and not stepped_down:
                start()
            elif not leader and task is not None:
                log.info("no longer the leader: stopping")
                await halt()
    finally:
        guard.cancel()
        await halt()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return asyncio.run(run(dict(os.environ)))
