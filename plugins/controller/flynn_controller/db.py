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
from typing import Any

import asyncpg

from flynn_host import pgmigrate

log = logging.getLogger("flynn_controller.db")

# pg_advisory_lock keys: a constant of this program, so nothing else contends for them
MIGRATION_LOCK = 0x666C796E6E01  # "flynn" + 1
EVENT_LOCK = 0x666C796E6E02

MIGRATIONS = "flynn_controller.migrations"


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
    """(number, file name, SQL) of every controller migration, in order."""
    return pgmigrate.migrations(MIGRATIONS)


async def migrate(pool: asyncpg.Pool) -> list[int]:
    """Apply the migrations this database lacks; returns their numbers. Safe to call from
    several processes at once."""
    return await pgmigrate.migrate(pool, MIGRATIONS, "schema_migrations", MIGRATION_LOCK)
