"""The controller's aiohttp application: the operation table of the handler modules as routes,
behind two middlewares —

- `errors`: Flynn's error JSON for everything a client can cause, a bare 404 for "not found",
  `unknown_error` with `retry: true` when the database or network is in trouble (so the 2015
  client retries through a PostgreSQL fail-over), and never a stack trace;
- `authenticate`: HTTP Basic with one of `AUTH_KEY`'s keys as password (the user is ignored),
  or `?key=` on event streams; a bare 401 otherwise. Only `/ping` is open. Keys are compared
  in constant time, and every key is compared, so timing says nothing about which matched.

Each process also runs the event hub (LISTEN/NOTIFY fan-out) and, unless `run_tasks` is off,
a task worker; both start and stop with the application.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

# the handler modules: importing them fills api.OPERATIONS and tasks.HANDLERS
from flynn_controller import (  # noqa: F401
    apps,
    deletion,
    deploylog,
    deployments,
    events_api,
    formations,
    jobs,
    logs,
    releases,
    resources,
    routes,
    runjobs,
    status,
    tasks,
)
from flynn_controller.api import CONFIG, HUB, OPERATIONS, POOL, Config, Handler
from flynn_controller.errors import APIError, NotFound, bare, unknown_error
from flynn_controller.events import EventHub

log = logging.getLogger("flynn_controller.server")

OPEN_PATHS = frozenset(op.path for op in OPERATIONS if not op.auth)

# SQLSTATE classes that mean "try again": connection trouble, a server shutting down or
# starting, a read-only standby, serialization/deadlock, out of resources
RETRY_SQLSTATE_PREFIXES = ("08", "57", "25006", "40001", "40P01", "53", "55P03")


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, TimeoutError, asyncpg.InterfaceError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        return state.startswith(RETRY_SQLSTATE_PREFIXES)
    return False


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    # U+0000 cannot be stored or compared by PostgreSQL: nothing a URL names can hold one
    if "\x00" in request.path or any("\x00" in k or "\x00" in v for k, v in request.query.items()):
        return bare(404)
    try:
        return await handler(request)
    except NotFound:
        return bare(404)
    except APIError as exc:
        return exc.response()
    except web.HTTPNotFound:
        return bare(404)
    except web.HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - answered as Flynn's unknown_error
        if is_transient(exc):
            log.warning("%s %s: %s (client told to retry)", request.method, request.path, exc)
            return unknown_error(retry=True).response()
        log.exception("%s %s failed", request.method, request.path)
        return unknown_error(retry=False).response()


def _password(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return None
        return decoded.partition(":")[2]
    if "text/event-stream" in request.headers.get("Accept", ""):
        return request.query.get("key")
    return None


def key_matches(password: str | None, keys: tuple[str, ...]) -> bool:
    if not password:
        return False
    given = password.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in OPEN_PATHS:
        return await handler(request)
    if not key_matches(_password(request), request.app[CONFIG].auth_keys):
        return bare(401)
    return await handler(request)


def make_app(pool: asyncpg.Pool, config: Config, run_tasks: bool = True) -> web.Application:
    app = web.Application(middlewares=[errors, authenticate], client_max_size=1 << 20)
    app[POOL] = pool
    app[CONFIG] = config
    for op in OPERATIONS:
        app.router.add_route(op.method, op.path, op.handler)

    async def background(app: web.Application) -> AsyncIterator[None]:
        hub = EventHub(pool)
        await hub.start()
        app[HUB] = hub
        worker = None
        if run_tasks:
            worker = tasks.Worker(pool, app)
            app[tasks.WORKER] = worker
            worker.start()
        yield
        if worker is not None:
            await worker.close()
        await hub.close()
        await deploylog.close()

    app.cleanup_ctx.append(background)
    return app
