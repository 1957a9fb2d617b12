"""Numbered SQL migrations for a component's PostgreSQL database, shared by every component
that keeps one (the controller, the blobstore).

A component ships `NNNN_name.sql` files in a package of its own; `migrate` applies the ones
the database lacks, each in its own transaction, and records them in the component's table.
It runs under an advisory lock, so several processes of one component starting together never
race: the later ones wait, then find nothing left to do. A change to a schema is a new file,
never an edit of an applied one.
"""

from __future__ import annotations

import logging
import re
from importlib import resources

import asyncpg

log = logging.getLogger("flynn_host.pgmigrate")

MIGRATION_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def migrations(package: str) -> list[tuple[int, str, str]]:
    """(number, file name, SQL) of every migration in `package`, in order; the numbers must
    run 1..n without a gap (a gap is a file lost in a merge)."""
    found = []
    for entry in resources.files(package).iterdir():
        m = MIGRATION_FILE.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    found.sort()
    numbers = [n for n, _, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"{package}: migrations are not numbered 1..n without gaps: {numbers}")
    return found


async def migrate(pool: asyncpg.Pool, package: str, table: str, lock_id: int) -> list[int]:
    """Apply the migrations of `package` that `table` does not record; returns their numbers.

    `lock_id` is the component's own `pg_advisory_lock` key, so that components sharing a
    PostgreSQL server do not wait for each other.
    """
    if not TABLE_NAME.match(table):
        raise ValueError(f"invalid migrations table name {table!r}")
    applied: list[int] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", lock_id)
        try:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                " id integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["id"] for r in await conn.fetch(f"SELECT id FROM {table}")}
            for number, name, sql in migrations(package):
                if number in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        f"INSERT INTO {table} (id, name) VALUES ($1, $2)", number, name
                    )
                log.info("%s: applied migration %s", package, name)
                applied.append(number)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", lock_id)
    return applied
