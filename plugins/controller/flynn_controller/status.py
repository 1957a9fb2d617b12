"""The small endpoints: `/ping` (the only one without a key), `/.well-known/status` (healthy
while the database answers), `/ca-cert` (the cluster CA that `flynn cluster add` saves for
git), and `/openapi.json`, the API described from the operation table and the request
schemas (none of Flynn's versions had one)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from aiohttp import web

from flynn_controller.api import OPERATIONS, config, json_response, operation, pool
from flynn_controller.schemas import SCHEMAS


@operation("GET", "/ping", "Liveness (no key needed)", auth=False)
async def ping(request: web.Request) -> web.Response:
    return web.Response(status=200)


@operation("GET", "/.well-known/status", "Health: the database answers")
async def status(request: web.Request) -> web.Response:
    healthy = True
    try:
        await asyncio.wait_for(pool(request).fetchval("SELECT 1"), 5)
    except Exception:  # noqa: BLE001 - any failure is "unhealthy"
        healthy = False
    body = {
        "data": {
            "status": "healthy" if healthy else "unhealthy",
            "version": config(request).version,
        }
    }
    resp = json_response(body)
    resp.set_status(200 if healthy else 500)
    return resp


@operation("GET", "/ca-cert", "The cluster's CA certificate (PEM)")
async def ca_cert(request: web.Request) -> web.Response:
    return web.Response(
        body=config(request).ca_cert.encode(),
        headers={"Content-Type": "application/x-x509-ca-cert"},
    )


ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "message", "retry"],
    "properties": {
        "code": {"type": "string"},
        "message": {"type": "string"},
        "detail": {},
        "retry": {"type": "boolean"},
    },
}


def _params(op: Any) -> list[dict[str, Any]]:
    out = []
    for part in op.path.split("/"):
        if part.startswith("{"):
            out.append(
                {"name": part[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            )
    for name in op.params:
        out.append({"name": name, "in": "query", "required": False, "schema": {"type": "string"}})
    if op.stream:
        out.append(
            {
                "name": "Last-Event-Id",
                "in": "header",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
            }
        )
    return out


def openapi_document(version: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        entry: dict[str, Any] = {
            "summary": op.summary,
            "operationId": op.handler.__name__,
            "parameters": _params(op),
            "responses": {
                "200": {"description": "success (every success is 200, as Flynn's)"},
                "400": {
                    "description": "validation_error or syntax_error",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/error"}}
                    },
                },
                "401": {"description": "no or wrong key (bare)"},
                "404": {"description": "not found (bare)"},
                "409": {
                    "description": "object_exists or conflict",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/error"}}
                    },
                },
                "500": {
                    "description": "unknown_error; retry: true when the database is away",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/error"}}
                    },
                },
            },
        }
        if op.auth:
            entry["security"] = [{"basic": []}]
        if op.body:
            entry["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{op.body}"}}
                },
            }
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Flynn controller",
            "version": version,
            "description": "Flynn's controller API (2015 wire format), on PostgreSQL.",
        },
        "paths": paths,
        "components": {
            "schemas": {**copy.deepcopy(SCHEMAS), "error": ERROR_SCHEMA},
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"}},
        },
    }


@operation("GET", "/openapi.json", "This description")
async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document(config(request).version))
