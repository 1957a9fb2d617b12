"""Routes, kept by the controller as the one source of truth (the router follows them through
`GET /routes` and the `route`/`route_deletion` events): HTTP routes (domain, path, sticky,
TLS certificate and key, leader-only, drain_backends) and TCP routes (a port given, or the
first free one of 3000–3500; 80 and 443 belong to HTTP).

Rules as Flynn's router had them: one route per (domain, path) and per TCP port — a second is
409 `conflict` "Duplicate route" with the existing route as `detail`; a path other than `/`
needs the domain's `/` route, and that `/` route cannot be removed while path routes use it.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from flynn_controller.api import (
    empty_response,
    fetch_one,
    find_app,
    json_response,
    operation,
    pool,
    read_json,
    uuid_param,
)
from flynn_controller.errors import NotFound, conflict, validation_error
from flynn_controller.events import emit
from flynn_controller.render import route_json
from flynn_controller.types import (
    RESERVED_TCP_PORTS,
    ROUTE_PARENT_PREFIX,
    TCP_PORT_RANGE,
    is_uuid,
    new_id,
)

ROUTE_COLUMNS = (
    "route_id, type, app_id, parent_ref, service, leader, drain_backends, domain, path,"
    " sticky, tls_cert, tls_key, port, created_at, updated_at"
)


def _normal_path(path: str | None) -> str:
    path = path or "/"
    if not path.startswith("/"):
        raise validation_error("path", "must start with /")
    return path if path.endswith("/") else path + "/"


def check_tls(cert: str | None, key: str | None) -> None:
    """Both or neither, and a key that belongs to the certificate."""
    if not cert and not key:
        return
    if not cert or not key:
        raise validation_error("tls_cert" if not cert else "tls_key", "must be set with the other")
    try:
        certs = x509.load_pem_x509_certificates(cert.encode())
    except ValueError:
        raise validation_error("tls_cert", "is not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key.encode(), password=None)
    except (ValueError, TypeError):
        raise validation_error("tls_key", "is not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private.public_key().public_bytes(der, public) != certs[0].public_key().public_bytes(
        der, public
    ):
        raise validation_error("tls_key", "does not match the certificate")


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name) or ""
    if any(c.isspace() or not c.isprintable() for c in value):
        raise validation_error(name, "must not contain spaces or control characters")
    return str(value)


async def _existing(conn: asyncpg.Connection, route: dict[str, Any]) -> dict[str, Any] | None:
    if route["type"] == "http":
        row = await conn.fetchrow(
            f"SELECT {ROUTE_COLUMNS} FROM routes WHERE type = 'http' AND deleted_at IS NULL"
            " AND lower(domain) = lower($1) AND path = $2",
            route["domain"],
            route["path"],
        )
    else:
        row = await conn.fetchrow(
            f"SELECT {ROUTE_COLUMNS} FROM routes WHERE type = 'tcp' AND deleted_at IS NULL"
            " AND port = $1",
            route["port"],
        )
    return route_json(row) if row else None


async def _free_port(conn: asyncpg.Connection) -> int:
    low, high = TCP_PORT_RANGE
    port = await conn.fetchval(
        "SELECT p FROM generate_series($1::int, $2::int) p WHERE NOT EXISTS"
        " (SELECT 1 FROM routes WHERE type = 'tcp' AND deleted_at IS NULL AND port = p)"
        " ORDER BY p LIMIT 1",
        low,
        high,
    )
    if port is None:
        raise conflict(f"no TCP port is free in {low}-{high}")
    return int(port)


async def insert_route(
    conn: asyncpg.Connection, app: asyncpg.Record, body: dict[str, Any]
) -> dict[str, Any]:
    """Validate and store a route of `app` in the caller's transaction, with its event."""
    typ = body.get("type")
    if typ not in ("http", "tcp"):
        raise validation_error("type", "must be http or tcp")
    service = _text(body, "service")
    if not service:
        raise validation_error("service", "must be set")
    route: dict[str, Any] = {"type": typ, "service": service}
    if typ == "http":
        route["domain"] = _text(body, "domain")
        if not route["domain"]:
            raise validation_error("domain", "must be set")
        route["path"] = _normal_path(body.get("path"))
        check_tls(body.get("tls_cert"), body.get("tls_key"))
        if route["path"] != "/" and not await conn.fetchval(
            "SELECT 1 FROM routes WHERE type = 'http' AND deleted_at IS NULL"
            " AND lower(domain) = lower($1) AND path = '/'",
            route["domain"],
        ):
            raise validation_error("path", f"needs a route with path / for {route['domain']}")
    else:
        port = body.get("port") or 0
        if port in RESERVED_TCP_PORTS:
            raise validation_error("port", "is reserved for HTTP and HTTPS")
        route["port"] = port or await _free_port(conn)
    dup = await _existing(conn, route)
    if dup is not None:
        raise conflict("Duplicate route", dup)
    route_id = body.get("id") if isinstance(body.get("id"), str) and is_uuid(body["id"]) else None
    try:
        async with conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO routes (route_id, type, app_id, parent_ref, service, leader,"
                " drain_backends, domain, path, sticky, tls_cert, tls_key, port)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                f" RETURNING {ROUTE_COLUMNS}",
                route_id or new_id(),
                typ,
                app["app_id"],
                ROUTE_PARENT_PREFIX + str(app["app_id"]),
                service,
                bool(body.get("leader")),
                bool(body.get("drain_backends")),
                route.get("domain"),
                route.get("path"),
                bool(body.get("sticky")) if typ == "http" else False,
                body.get("tls_cert") or None if typ == "http" else None,
                body.get("tls_key") or None if typ == "http" else None,
                route.get("port"),
            )
    except asyncpg.UniqueViolationError:
        # a concurrent request took it between our check and our insert
        raise conflict("Duplicate route", await _existing(conn, route)) from None
    out = route_json(row)
    await emit(conn, "route", out["id"], out, app_id=str(app["app_id"]))
    return out


async def delete_route_row(conn: asyncpg.Connection, row: asyncpg.Record) -> dict[str, Any]:
    """Soft-delete a route in the caller's transaction, with its `route_deletion` event."""
    await conn.execute("UPDATE routes SET deleted_at = now() WHERE route_id = $1", row["route_id"])
    out = route_json(row)
    await emit(conn, "route_deletion", out["id"], out, app_id=str(row["app_id"]))
    return out


async def app_routes(conn: asyncpg.Connection | asyncpg.Pool, app_id: Any) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT {ROUTE_COLUMNS} FROM routes WHERE app_id = $1 AND deleted_at IS NULL"
            " ORDER BY created_at DESC",
            app_id,
        )
    )


@operation("POST", "/apps/{app}/routes", "Add a route to an app", body="route", response="route")
async def create_route(request: web.Request) -> web.Response:
    body = await read_json(request, "route")
    async with pool(request).acquire() as conn, conn.transaction():
        app = await find_app(conn, request.match_info["app"])
        route = await insert_route(conn, app, body)
    return json_response(route)


@operation("GET", "/apps/{app}/routes", "List an app's routes", response="route_list")
async def list_app_routes(request: web.Request) -> web.Response:
    app = await find_app(pool(request), request.match_info["app"])
    return json_response([route_json(r) for r in await app_routes(pool(request), app["app_id"])])


@operation(
    "GET",
    "/routes",
    "List every route (the router's view)",
    response="route_list",
    params=("parent_ref",),
)
async def list_routes(request: web.Request) -> web.Response:
    parent = request.query.get("parent_ref")
    query = f"SELECT {ROUTE_COLUMNS} FROM routes WHERE deleted_at IS NULL"
    args: list[Any] = []
    if parent:
        query += " AND parent_ref = $1"
        args.append(parent)
    rows = await pool(request).fetch(query + " ORDER BY created_at DESC", *args)
    return json_response([route_json(r) for r in rows])


async def _find_route(
    conn: asyncpg.Connection | asyncpg.Pool, request: web.Request, lock: bool = False
) -> tuple[asyncpg.Record, asyncpg.Record]:
    app = await find_app(conn, request.match_info["app"])
    typ = request.match_info["type"]
    if typ not in ("http", "tcp"):
        raise NotFound()
    row = await fetch_one(
        conn,
        f"SELECT {ROUTE_COLUMNS} FROM routes WHERE route_id = $1 AND type = $2"
        f" AND app_id = $3 AND deleted_at IS NULL{' FOR UPDATE' if lock else ''}",
        uuid_param(request.match_info["id"]),
        typ,
        app["app_id"],
    )
    return app, row


@operation("GET", "/apps/{app}/routes/{type}/{id}", "Get a route", response="route")
async def get_route(request: web.Request) -> web.Response:
    _, row = await _find_route(pool(request), request)
    return json_response(route_json(row))


@operation(
    "PUT",
    "/apps/{app}/routes/{type}/{id}",
    "Update a route's service, TLS, sticky, leader",
    body="route",
    response="route",
)
async def update_route(request: web.Request) -> web.Response:
    body = await read_json(request, "route")
    async with pool(request).acquire() as conn, conn.transaction():
        app, row = await _find_route(conn, request, lock=True)
        if body.get("type") != row["type"]:
            raise validation_error("type", f"must be {row['type']}")
        service = _text(body, "service") or row["service"]
        http = row["type"] == "http"
        if http:
            check_tls(body.get("tls_cert"), body.get("tls_key"))
        row = await conn.fetchrow(
            "UPDATE routes SET service = $2, leader = $3, drain_backends = $4, sticky = $5,"
            " tls_cert = $6, tls_key = $7, updated_at = now()"
            f" WHERE route_id = $1 RETURNING {ROUTE_COLUMNS}",
            row["route_id"],
            service,
            bool(body.get("leader")),
            bool(body.get("drain_backends", row["drain_backends"])),
            bool(body.get("sticky")) if http else False,
            (body.get("tls_cert") or None) if http else None,
            (body.get("tls_key") or None) if http else None,
        )
        out = route_json(row)
        await emit(conn, "route", out["id"], out, app_id=str(app["app_id"]))
    return json_response(out)


@operation("DELETE", "/apps/{app}/routes/{type}/{id}", "Remove a route")
async def delete_route(request: web.Request) -> web.Response:
    async with pool(request).acquire() as conn, conn.transaction():
        _, row = await _find_route(conn, request, lock=True)
        if (
            row["type"] == "http"
            and row["path"] == "/"
            and await conn.fetchval(
                "SELECT 1 FROM routes WHERE type = 'http' AND deleted_at IS NULL"
                " AND lower(domain) = lower($1) AND path <> '/'",
                row["domain"],
            )
        ):
            raise validation_error("", "Route has dependent routes")
        await delete_route_row(conn, row)
    return empty_response()
