"""A small work queue on PostgreSQL for what the controller does after answering (deleting an
app, running a deployment): `enqueue` writes a row in the caller's transaction, so a task
exists exactly when the change that asked for it committed; every controller process runs a
`Worker` that claims due rows with `FOR UPDATE SKIP LOCKED`, so each task runs once even with
several processes, and a process that dies mid-task loses nothing (its lock goes with its
connection and another process takes the row).

A task that fails is retried with a growing delay up to `MAX_ATTEMPTS`; its handler decides
what the last failure means for clients (an `app_deletion` event with the error, a `failed`
deployment). Why not procrastinate or similar: they bring a second PostgreSQL driver
(psycopg) and their own schema, and cannot enqueue inside an asyncpg transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web

log = logging.getLogger("flynn_controller.tasks")

MAX_ATTEMPTS = 3
RETRY_DELAY = 2.0  # seconds, times the attempt number
POLL_INTERVAL = 2.0

TaskHandler = Callable[[asyncpg.Pool, dict[str, Any], int, web.Application], Awaitable[None]]
HANDLERS: dict[str, TaskHandler] = {}

WORKER = web.AppKey("worker", "Worker")


def handler(kind: str) -> Callable[[TaskHandler], TaskHandler]:
    """Register the function that runs tasks of `kind`. It gets (pool, args, attempt, app);
    `attempt` counts from 1 and equals MAX_ATTEMPTS on the last try."""

    def register(fn: TaskHandler) -> TaskHandler:
        HANDLERS[kind] = fn
        return fn

    return register


async def enqueue(conn: asyncpg.Connection, kind: str, args: dict[str, Any]) -> int:
    task_id: int = await conn.fetchval(
        "INSERT INTO tasks (kind, args) VALUES ($1, $2) RETURNING task_id", kind, args
    )
    return task_id


def wake(app: web.Application) -> None:
    """Let this process's worker look at the queue now (it would within POLL_INTERVAL)."""
    worker = app.get(WORKER)
    if worker is not None:
        worker.wake.set()


class Worker:
    def __init__(self, pool: asyncpg.Pool, app: web.Application) -> None:
        self.pool = pool
        self.app = app
        self.wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="tasks-worker")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL_INTERVAL)
            self.wake.clear()
            try:
                while await self.run_one():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database is away; poll again
                log.warning("task queue: %s", exc)

    async def run_one(self) -> bool:
        """Claim one due task and run it to the end (its row stays locked meanwhile);
        False when there is none."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT task_id, kind, args, attempts FROM tasks"
                " WHERE done_at IS NULL AND run_at <= now()"
                " ORDER BY task_id LIMIT 1 FOR UPDATE SKIP LOCKED"
            )
            if row is None:
                return False
            attempt = row["attempts"] + 1
            fn = HANDLERS.get(row["kind"])
            error: str | None = None
            if fn is None:
                error = f"no handler for task kind {row['kind']!r}"
            else:
                try:
                    await fn(self.pool, row["args"], attempt, self.app)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - recorded and retried
                    log.warning("task %s %s attempt %d: %s", row["kind"], row["args"], attempt, exc)
                    error = str(exc) or type(exc).__name__
            done = error is None or attempt >= MAX_ATTEMPTS or fn is None
            await conn.execute(
                "UPDATE tasks SET attempts = $2, last_error = $3,"
                " done_at = CASE WHEN $4 THEN now() END,"
                " run_at = now() + make_interval(secs => $5)"
                " WHERE task_id = $1",
                row["task_id"],
                attempt,
                error,
                done,
                RETRY_DELAY * attempt,
            )
            return True
