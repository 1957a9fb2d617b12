"""The provider's work inside PostgreSQL: make an app's role and the database it owns, drop
them again, and tell whether a primary takes writes.

Every call opens a connection of its own to `Postgres.host` (`leader.<service>.discoverd`, the
current primary's name). After a failover that name resolves to the new primary, so the next
request reaches it and no pooled connection to the dead one is ever reused; the provider's
requests are rare enough that a connection each costs nothing that matters.

Names are random, so two racing requests never collide, and checked against `NAME` before they
reach SQL: that check is also what keeps a `DELETE` away from anything the provider did not
make (`postgres`, `replicator`, the template databases)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import string
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from flynn_postgres.types import SUPERUSER

log = logging.getLogger("postgres-api")

# a role's or database's name: a letter and 23 lower-case letters or digits (~119 bits)
NAME = re.compile(r"[a-z][a-z0-9]{23}")
_ALPHABET = string.ascii_lowercase + string.digits
CONNECT_TIMEOUT = 3.0
# how long a primary has to commit a tiny write before it counts as not taking writes: in
# strict mode with no synchronous standby a commit waits forever
WRITE_TIMEOUT = 2.0
# creating or dropping a database copies or removes its files and waits for the standby
OPERATION_TIMEOUT = 15.0
# an undo must not hang on a missing standby either; it commits locally (see `undo`)
UNDO_TIMEOUT = 10.0
# SQLSTATE classes that mean "not now, try again": 08 connection, 53 insufficient resources
# (too many connections), 57 operator intervention (shutting down, starting up); and 25006,
# a write sent to a standby
_TRANSIENT_CLASSES = ("08", "53", "57")
_READ_ONLY = "25006"


class Unavailable(Exception):
    """No primary takes writes now; the same request may work later (a failover, a standby
    coming back)."""


class LoginRefused(Exception):
    """PostgreSQL refused the provider's superuser: its password setting is wrong."""


@dataclass(frozen=True)
class Postgres:
    """Where the primary is, and the superuser the provider acts as."""

    host: str
    port: int
    password: str = field(repr=False)  # never in a log line
    user: str = SUPERUSER
    database: str = "postgres"
    connect_timeout: float = CONNECT_TIMEOUT

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    async def connect(self, **settings: str) -> asyncpg.Connection:
        """A new connection (the name resolved afresh), with server `settings`."""
        return await asyncpg.connect(
            host=self.host, port=self.port, user=self.user, password=self.password,
            database=self.database, timeout=self.connect_timeout,
            server_settings={"application_name": "postgres-api", **settings},
        )  # fmt: skip


@dataclass(frozen=True)
class Credentials:
    """What an app gets: its role, that role's password, and its database."""

    user: str
    password: str = field(repr=False)
    database: str


def new_name() -> str:
    """A random role or database name that `NAME` accepts."""
    return secrets.choice(string.ascii_lowercase) + "".join(
        secrets.choice(_ALPHABET) for _ in range(23)
    )


def new_password() -> str:
    """32 random bytes, URL-safe, so DATABASE_URL needs no escaping."""
    return secrets.token_urlsafe(32)


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677), made
    here so the password itself never reaches the server, its logs or pg_stat_activity. Our
    passwords are ASCII, which SASLprep leaves as it is."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def ident(name: str) -> str:
    """`name` quoted as an SQL identifier; only names `NAME` accepts are ever quoted."""
    if not NAME.fullmatch(name):
        raise ValueError(f"not a provider name: {name!r}")
    return f'"{name}"'


def unavailable_reason(exc: BaseException) -> str | None:
    """Why `exc` means no primary takes writes now, or None when it means something else."""
    if isinstance(exc, Unavailable):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "PostgreSQL did not answer in time"
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        if state == _READ_ONLY or state[:2] in _TRANSIENT_CLASSES:
            return f"PostgreSQL cannot take writes now: {exc}"
        return None
    if isinstance(exc, OSError | asyncpg.InterfaceError):
        # refused, unreachable, a name that does not resolve, a connection cut mid-way
        return f"lost the connection to PostgreSQL: {exc or type(exc).__name__}"
    return None


async def _close(conn: asyncpg.Connection) -> None:
    """Close politely, but never wait long: a connection stuck in a commit is cut."""
    try:
        await asyncio.wait_for(conn.close(), 1.0)
    except Exception:
        conn.terminate()


@contextlib.asynccontextmanager
async def primary(pg: Postgres, **settings: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the primary; `Unavailable` if `pg` is a standby (in recovery) or
    cannot be reached."""
    try:
        conn = await pg.connect(**settings)
    except TimeoutError:
        raise Unavailable(
            f"cannot reach a PostgreSQL primary at {pg.where}: no answer within "
            f"{pg.connect_timeout:g} s"
        ) from None
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise LoginRefused(
            f"PostgreSQL at {pg.where} refused the login of {pg.user} (is "
            f"POSTGRES_SUPERUSER_PASSWORD the appliance's?): {exc}"
        ) from exc
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        if unavailable_reason(exc) is None:
            raise  # a wrong password, say: not something a retry fixes
        raise Unavailable(f"cannot reach a PostgreSQL primary at {pg.where}: {exc}") from exc
    try:
        if await conn.fetchval("SELECT pg_is_in_recovery()"):
            raise Unavailable(f"{pg.where} is a standby (in recovery), not the primary")
        yield conn
    finally:
        await _close(conn)


async def check_writable(conn: asyncpg.Connection, within: float = WRITE_TIMEOUT) -> None:
    """Commit a transaction that writes within `within` seconds: a primary that cannot
    acknowledge a commit (strict mode, no synchronous standby) is not taking writes, even
    though it accepts connections. The write is a transactional WAL message, which leaves no
    data behind; a transaction that only takes an id (`txid_current()`) would not do, as its
    commit writes no WAL of its own and so does not wait for the standby."""
    try:
        async with asyncio.timeout(within), conn.transaction():
            await conn.execute("SELECT pg_logical_emit_message(true, 'postgres-api', 'ping')")
    except TimeoutError:
        raise Unavailable(
            f"the primary did not commit a write within {within:g} s (in strict mode that "
            "means no synchronous standby is connected)"
        ) from None


async def ping(pg: Postgres) -> None:
    """Return when a primary takes writes; raise `Unavailable` otherwise."""
    async with primary(pg) as conn:
        await check_writable(conn)


async def create(
    pg: Postgres, make_name: Callable[[], str] = new_name, within: float = OPERATION_TIMEOUT
) -> Credentials:
    """Make a login role with a random name and password, and a database it owns that no one
    else may connect to. Any failure undoes what was made (`undo`), so no role is left without
    its database. `make_name` is a seam for tests."""
    creds = Credentials(make_name(), new_password(), make_name())
    user, db = ident(creds.user), ident(creds.database)
    verifier = scram_verifier(creds.password)
    async with primary(pg) as conn:
        # nothing is made on a primary that could not acknowledge it
        await check_writable(conn)
        try:
            async with asyncio.timeout(within):
                await conn.execute(
                    f"CREATE ROLE {user} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                    f"NOREPLICATION NOBYPASSRLS PASSWORD '{verifier}'"
                )
        except asyncpg.DuplicateObjectError:
            raise  # a role of that name is someone else's: nothing was made
        except BaseException:
            # a CREATE cut short while its commit waited for the standby did commit
            await undo(pg, creds.user, None)
            raise
        try:
            async with asyncio.timeout(within):
                await conn.execute(f"CREATE DATABASE {db} OWNER {user}")
                await conn.execute(f"REVOKE ALL ON DATABASE {db} FROM PUBLIC")
        except BaseException:
            await undo(pg, creds.user, creds.database)
            raise
    log.info("created role %s and database %s", creds.user, creds.database)
    return creds


async def undo(pg: Postgres, user: str, database: str | None) -> None:
    """Drop `database` if `user` owns it (a database of that name made by anyone else is left
    alone), then `user`: the undo of a `create` that failed part-way. It runs on a connection
    of its own (the failed one may be cut or stuck in a commit) with `synchronous_commit =
    local`, so it does not wait for a standby that may be missing: no one was told of these
    objects, so losing their drop in a failover loses no acknowledged write. It never raises:
    the caller reports the original error."""
    try:
        async with asyncio.timeout(UNDO_TIMEOUT), primary(pg, synchronous_commit="local") as c:
            if database is not None and await _owner_of(c, database) == user:
                await c.execute(f"DROP DATABASE IF EXISTS {ident(database)} WITH (FORCE)")
            await c.execute(f"DROP ROLE IF EXISTS {ident(user)}")
    except Exception as exc:
        log.error(
            "could not undo a failed create: role %s and database %s may be left "
            "(DELETE /databases?id=/databases/%s:%s drops them): %s",
            user, database, user, database, exc,
        )  # fmt: skip


async def _owner_of(conn: asyncpg.Connection, database: str) -> str | None:
    return await conn.fetchval(  # type: ignore[no-any-return]
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", database
    )


async def _role_databases(conn: asyncpg.Connection, user: str) -> list[str] | None:
    """The databases `user` owns; None when there is no such role."""
    row: Any = await conn.fetchrow(
        "SELECT array(SELECT datname FROM pg_database WHERE datdba = r.oid) AS dbs "
        "FROM pg_roles r WHERE r.rolname = $1",
        user,
    )
    return None if row is None else list(row["dbs"])


async def drop(pg: Postgres, user: str, database: str, within: float = OPERATION_TIMEOUT) -> bool:
    """Drop `database` (its sessions ended) and then `user`; False when they are not a pair
    this provider made: the database does not exist or another role owns it. A role left
    without its database (a failed undo, or a drop cut short after the database) counts as
    found, so a retried DELETE finishes the job."""
    drop_db, drop_role = ident(database), ident(user)  # ValueError before any SQL
    async with primary(pg) as conn, asyncio.timeout(within):
        owner = await _owner_of(conn, database)
        if owner is None:
            owned = await _role_databases(conn, user)
            if owned is None or owned:
                return False
        elif owner != user:
            return False
        # FORCE ends the sessions connected to the database first
        await conn.execute(f"DROP DATABASE IF EXISTS {drop_db} WITH (FORCE)")
        # the role may still have sessions in other databases (postgres): end them too
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", user
        )
        await conn.execute(f"DROP ROLE IF EXISTS {drop_role}")
    log.info("dropped database %s and role %s", database, user)
    return True
