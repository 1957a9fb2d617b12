"""A small work queue on PostgreSQL for what the controller does after answering (deleting an
app, running a deployment): `enqueue` writes a row in the caller's transaction, so a task
exists exactly when the change that asked for it committed, and every process that runs a
`Worker` (each `web` process unless told not to, and the `worker` processes) takes due rows.

A task is claimed with a session-level advisory lock on its id, held on a connection of its
own for as long as the task runs; no transaction stays open meanwhile. Deployments run for
minutes: an open transaction (the row lock of `FOR UPDATE`) would hold back vacuum's horizon
for the whole database that long and fall to any `idle_in_transaction_session_timeout`,
while an idle session with an advisory lock costs nothing. The lock goes with the session:
a worker that dies (its socket closes; a vanished host is found by the TCP keepalives set on
the connection) frees its tasks at once and another worker takes them. The worker checks its
claim's connection every few seconds and stops the task if it broke, since another worker
may have taken it.

Every claim counts one attempt, so a task that kills its worker is not retried forever. A
worker that is shut down gives its tasks back uncounted (a deployment of the controller stops
the very workers that run it). A task that raises is retried with a growing delay; its handler
decides what the last failure means for clients (an `app_deletion` event with the error, a
`failed` deployment). A task claimed after `MAX_ATTEMPTS` (its workers died) is still handed
to its handler once more, marked as past its last attempt, so it can end cleanly.

Why not procrastinate or similar: they bring a second PostgreSQL driver (psycopg) and their
own schema, and cannot enqueue inside an asyncpg transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web

from flynn_controller import db

log = logging.getLogger("flynn_controller.tasks")

MAX_ATTEMPTS = 3
RETRY_DELAY = 2.0  # seconds, times the attempt number
POLL_INTERVAL = 1.0
MAX_RUNNING = 16  # tasks one worker runs at once (a deployment mostly waits)
CLAIM_CHECK = 3.0  # seconds between checks that a claim's connection is alive
# pg_advisory_lock(class, id) keys: the two-int form, a class of this program's own
LOCK_CLASS = 0x666C7903
# a vanished worker host is noticed by PostgreSQL within about idle + interval * count
KEEPALIVES = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5",
              "tcp_keepalives_count": "3"}  # fmt: skip
SET_KEEPALIVES = "SELECT " + ", ".join(
    f"set_config('{k}', '{v}', false)" for k, v in KEEPALIVES.items()
)

TaskHandler = Callable[[asyncpg.Pool, dict[str, Any], int, web.Application], Awaitable[None]]
HANDLERS: dict[str, TaskHandler] = {}


def handler(kind: str) -> Callable[[TaskHandler], TaskHandler]:
    """Register the function that runs tasks of `kind`. It gets (pool, args, attempt, app);
    `attempt` counts from 1; it is MAX_ATTEMPTS on the last try, and more when the workers
    of the earlier tries died."""

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


def _lock_id(task_id: int) -> int:
    return task_id % 2**31


class ClaimLost(Exception):
    """The connection holding a task's lock broke: another worker may run the task now."""


class Worker:
    def __init__(self, pool: asyncpg.Pool, app: web.Application) -> None:
        self.pool = pool
        self.app = app
        self.wake = asyncio.Event()
        self.running: dict[int, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="tasks-worker")

    async def close(self) -> None:
        """Stop taking tasks and give the running ones back (uncounted) to other workers."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        running = list(self.running.values())
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL_INTERVAL)
            self.wake.clear()
            try:
                while len(self.running) < MAX_RUNNING and await self.claim_one():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database is away; poll again
                log.warning("task queue: %s", exc)

    async def claim_one(self) -> bool:
        """Claim one due task that no worker holds and start running it; False when there
        is none. The claim is held on a connection of its own, outside the pool, so running
        tasks never take the connections requests need."""
        candidates = [
            r["task_id"]
            for r in await self.pool.fetch(
                "SELECT task_id FROM tasks WHERE done_at IS NULL AND run_at <= now()"
                " ORDER BY task_id LIMIT 100"
            )
            if r["task_id"] not in self.running
        ]
        if not candidates:
            return False
        conn = await db.connect(timeout=10)
        try:
            for task_id in candidates:
                if not await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)", LOCK_CLASS, _lock_id(task_id)
                ):
                    continue  # another worker runs it
                # finished between the look and the lock? (a worker finishes under the lock)
                row = await conn.fetchrow(
                    "UPDATE tasks SET attempts = attempts + 1"
                    " WHERE task_id = $1 AND done_at IS NULL AND run_at <= now()"
                    " RETURNING task_id, kind, args, attempts",
                    task_id,
                )
                if row is None:
                    await conn.execute(
                        "SELECT pg_advisory_unlock($1, $2)", LOCK_CLASS, _lock_id(task_id)
                    )
                    continue
                await conn.execute(SET_KEEPALIVES)
                self.running[task_id] = asyncio.create_task(
                    self._run(conn, row), name=f"task-{row['kind']}-{task_id}"
                )
                return True
        except BaseException:
            conn.terminate()  # the session's end drops any advisory lock
            raise
        await conn.close(timeout=5)
        return False

    async def _run(self, conn: asyncpg.Connection, row: asyncpg.Record) -> None:
        task_id, attempt = row["task_id"], row["attempts"]
        fn = HANDLERS.get(row["kind"])
        error: str | None = None
        finished = False
        try:
            if fn is None:
                error = f"no handler for task kind {row['kind']!r}"
            else:
                try:
                    await self._run_guarded(conn, fn(self.pool, row["args"], attempt, self.app))
                except ClaimLost:
                    log.warning("task %s %s: lost its claim; left to another worker",
                                row["kind"], task_id)  # fmt: skip
                    return
                except Exception as exc:  # noqa: BLE001 - recorded and retried
                    log.warning("task %s %s attempt %d: %s", row["kind"], row["args"], attempt, exc)
                    error = str(exc) or type(exc).__name__
            done = error is None or attempt >= MAX_ATTEMPTS or fn is None
            await conn.execute(
                "UPDATE tasks SET last_error = $2,"
                " done_at = CASE WHEN $3 THEN now() END,"
                " run_at = now() + make_interval(secs => $4)"
                " WHERE task_id = $1",
                task_id,
                error,
                done,
                RETRY_DELAY * attempt,
                timeout=10,
            )
            finished = True
        finally:
            if not finished:
                # shut down (or the connection broke): hand the task back without counting
                with contextlib.suppress(Exception):
                    await asyncio.shield(
                        conn.execute(
                            "UPDATE tasks SET attempts = attempts - 1 WHERE task_id = $1",
                            task_id,
                            timeout=5,
                        )
                    )
            self.running.pop(task_id, None)
            try:
                await asyncio.shield(conn.close(timeout=5))  # the session's end drops the lock
            except Exception:  # noqa: BLE001 - a broken connection: its lock is gone anyway
                conn.terminate()
            self.wake.set()  # there may be more to do

    async def _run_guarded(self, conn: asyncpg.Connection, work: Awaitable[None]) -> None:
        """Run a handler while checking that the claim's connection lives; a broken one
        stops the handler with ClaimLost."""
        job = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({job}, timeout=CLAIM_CHECK)
                if done:
                    return job.result()
                try:
                    await conn.fetchval("SELECT 1", timeout=CLAIM_CHECK)
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    raise ClaimLost() from None
        finally:
            if not job.done():
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await job


WORKER = web.AppKey("worker", Worker)
