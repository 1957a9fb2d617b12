"""The controller's database: an asyncpg pool on the PostgreSQL the controller was given (the
`PG*` variables of its postgres resource, or `DATABASE_URL`), and the numbered migrations of
`migrations/NNNN_name.sql`, applied at start under an advisory lock so that two controller
processes starting together never race: the second waits, then finds nothing left to do.

Every value that leaves PostgreSQL as JSON goes through asyncpg's jsonb codec set up here, so
handlers see dicts and lists, never strings.
"""

from __future__ import annotations

import json
import logging
import os
import re
from importlib import resources
from typing import Any

import asyncpg

log = logging.getLogger("flynn_controller.db")

# pg_advisory_lock keys: a constant of this program, so nothing else contends for them
MIGRATION_LOCK = 0x666C796E6E01  # "flynn" + 1
EVENT_LOCK = 0x666C796E6E02

MIGRATION_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def dsn_from_env(env: dict[str, str] | None = None) -> str | None:
    """`DATABASE_URL` if set; otherwise None, and asyncpg reads the `PG*` variables itself."""
    env = os.environ if env is None else env
    return env.get("DATABASE_URL") or None


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("jsonb", "json"):
        await conn.set_type_codec(
            typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog", format="text"
        )


async def connect(**kw: Any) -> asyncpg.Connection:
    """One connection outside the pool (the event listener's), with the same codecs."""
    conn = await asyncpg.connect(dsn_from_env(), **kw)
    await _init_connection(conn)
    return conn


async def create_pool(min_size: int = 2, max_size: int = 20) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn_from_env(),
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        # a primary that vanished must not hang a request: the client gets retry:true instead
        command_timeout=15,
        timeout=10,
        server_settings={"application_name": "flynn-controller"},
    )
    assert pool is not None
    return pool


def migrations() -> list[tuple[int, str, str]]:
    """(number, file name, SQL) of every migration in the package, in order."""
    found = []
    for entry in resources.files("flynn_controller.migrations").iterdir():
        m = MIGRATION_FILE.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    found.sort()
    numbers = [n for n, _, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"migrations are not numbered 1..n without gaps: {numbers}")
    return found


async def migrate(pool: asyncpg.Pool) -> list[int]:
    """Apply the migrations this database lacks, each in its own transaction; returns their
    numbers. Safe to call from several processes at once."""
    applied: list[int] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " id integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["id"] for r in await conn.fetch("SELECT id FROM schema_migrations")}
            for number, name, sql in migrations():
                if number in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (id, name) VALUES ($1, $2)", number, name
                    )
                log.info("applied migration %s", name)
                applied.append(number)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied
