"""The controller's own JSON schemas of what clients send, used twice: to validate request
bodies (a bad field is Flynn's `validation_error` naming it in `detail.field`) and to describe
the API in `GET /openapi.json`.

They are written in the subset shared by OpenAPI 3.0 and JSON Schema: a field that may be
null says `nullable: true`, which `validator()` turns into a JSON Schema type list. Unknown
fields are accepted and ignored, as Go's JSON decoding did for the 2015 controller: clients
post whole objects back (`flynn meta set` sends the App with its timestamps).
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import jsonschema

from flynn_controller.errors import validation_error
from flynn_controller.types import (
    APP_NAME_MAX,
    ARTIFACT_TYPES,
    JOB_STATES,
    RESOURCE_TYPES,
    STRATEGIES,
)

UUID = {"type": "string", "pattern": r"^[a-fA-F0-9]{8}-?([a-fA-F0-9]{4}-?){3}[a-fA-F0-9]{12}$"}
TIME = {"type": "string", "nullable": True}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}, "nullable": True}
STRINGS = {"type": "array", "items": {"type": "string"}, "nullable": True}
INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
INT64 = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}

APP_NAME = {
    "type": "string",
    "pattern": r"^[a-z\d]+(-[a-z\d]+)*$",
    "maxLength": APP_NAME_MAX,
}

APP = {
    "type": "object",
    "properties": {
        "id": UUID,
        "name": APP_NAME,
        "meta": STRING_MAP,
        "strategy": {"type": "string", "enum": list(STRATEGIES)},
        "release": {**UUID, "nullable": True},
        "deploy_timeout": {**INT32, "minimum": 1},
        "protected": {"type": "boolean"},
        "created_at": TIME,
        "updated_at": TIME,
    },
}

PORT = {
    "type": "object",
    "properties": {
        "port": {"type": "integer", "minimum": 0, "maximum": 65535},
        "proto": {"type": "string", "enum": ["tcp", "udp"]},
        "service": {
            "type": "object",
            "nullable": True,
            "properties": {
                "name": {"type": "string"},
                "create": {"type": "boolean"},
                "check": {"type": "object", "nullable": True},
            },
        },
    },
}

RESOURCE_SPEC = {
    "type": "object",
    "properties": {
        "request": {**INT64, "nullable": True},
        "limit": {**INT64, "nullable": True},
    },
}

PROCESS_TYPE = {
    "type": "object",
    "properties": {
        "cmd": STRINGS,
        "args": STRINGS,
        "entrypoint": STRINGS,
        "env": STRING_MAP,
        "ports": {"type": "array", "items": PORT, "nullable": True},
        "volumes": {
            "type": "array",
            "nullable": True,
            "items": {
                "type": "object",
                "required": ["path"],
                "properties": {
                    "path": {"type": "string", "pattern": "^/"},
                    "delete_on_stop": {"type": "boolean"},
                },
            },
        },
        "data": {"type": "boolean"},
        "omni": {"type": "boolean"},
        "host_network": {"type": "boolean"},
        "service": {"type": "string"},
        "resurrect": {"type": "boolean"},
        "resources": {
            "type": "object",
            "nullable": True,
            "propertyNames": {"enum": list(RESOURCE_TYPES)},
            "additionalProperties": RESOURCE_SPEC,
        },
    },
}

RELEASE = {
    "type": "object",
    "properties": {
        "id": UUID,
        "artifact": {**UUID, "nullable": True},
        "env": STRING_MAP,
        "meta": STRING_MAP,
        "processes": {
            "type": "object",
            "nullable": True,
            "propertyNames": {"pattern": r"^[a-zA-Z0-9_][a-zA-Z0-9_.-]*$", "maxLength": 100},
            "additionalProperties": PROCESS_TYPE,
        },
        "created_at": TIME,
    },
}

ARTIFACT = {
    "type": "object",
    "required": ["type", "uri"],
    "properties": {
        "id": UUID,
        "type": {"type": "string", "enum": list(ARTIFACT_TYPES)},
        "uri": {"type": "string", "minLength": 1, "maxLength": 4096},
        "meta": STRING_MAP,
        "created_at": TIME,
    },
}

FORMATION = {
    "type": "object",
    "properties": {
        "app": {"type": "string"},
        "release": {"type": "string"},
        "processes": {
            "type": "object",
            "nullable": True,
            "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 10000},
        },
        "tags": {
            "type": "object",
            "nullable": True,
            "additionalProperties": STRING_MAP,
        },
        "created_at": TIME,
        "updated_at": TIME,
    },
}

ID_BODY = {"type": "object", "required": ["id"], "properties": {"id": UUID}}

PROVIDER = {
    "type": "object",
    "required": ["name", "url"],
    "properties": {
        "id": UUID,
        "name": {**APP_NAME},
        "url": {"type": "string", "pattern": "^https?://[^/?#]+", "maxLength": 2048},
        "created_at": TIME,
        "updated_at": TIME,
    },
}

RESOURCE_REQ = {
    "type": "object",
    "properties": {
        "apps": {"type": "array", "items": {"type": "string"}, "nullable": True},
        "config": {"nullable": True},
    },
}

RESOURCE = {
    "type": "object",
    "properties": {
        "id": UUID,
        "provider": {"type": "string"},
        "external_id": {"type": "string"},
        "env": STRING_MAP,
        "apps": {"type": "array", "items": {"type": "string"}, "nullable": True},
        "created_at": TIME,
    },
}

ROUTE = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"type": "string", "enum": ["http", "tcp"]},
        "id": {"type": "string"},
        "parent_ref": {"type": "string"},
        "service": {"type": "string", "maxLength": 200},
        "leader": {"type": "boolean"},
        "drain_backends": {"type": "boolean"},
        "domain": {"type": "string", "maxLength": 255},
        "path": {"type": "string", "maxLength": 1024},
        "sticky": {"type": "boolean"},
        "tls_cert": {"type": "string", "maxLength": 65536},
        "tls_key": {"type": "string", "maxLength": 65536},
        "port": {"type": "integer", "minimum": 0, "maximum": 65535},
        "created_at": TIME,
        "updated_at": TIME,
    },
}

JOB = {
    "type": "object",
    "required": ["state"],
    "properties": {
        "id": {"type": "string", "maxLength": 200},
        "app": {"type": "string"},
        "release": {**UUID, "nullable": True},
        "type": {"type": "string", "maxLength": 100},
        "state": {"type": "string", "enum": list(JOB_STATES)},
        "cmd": STRINGS,
        "meta": STRING_MAP,
        "exit_status": {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
        "host_error": {"type": "string", "maxLength": 65536},
        "created_at": TIME,
        "updated_at": TIME,
    },
}

TERMINAL_SIZE = {"type": "integer", "minimum": 0, "maximum": 65535}  # 16 bits in a resize frame

NEW_JOB = {
    "type": "object",
    "required": ["release"],
    "properties": {
        "release": {"type": "string", "maxLength": 100},
        "release_env": {"type": "boolean"},
        "cmd": STRINGS,
        "entrypoint": STRINGS,
        "env": STRING_MAP,
        "meta": STRING_MAP,
        "tty": {"type": "boolean"},
        "tty_columns": TERMINAL_SIZE,
        "tty_lines": TERMINAL_SIZE,
        "disable_log": {"type": "boolean"},
        "resources": PROCESS_TYPE["properties"]["resources"],  # type: ignore[index]
    },
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "app": APP,
    "release": RELEASE,
    "process_type": PROCESS_TYPE,
    "port": PORT,
    "artifact": ARTIFACT,
    "formation": FORMATION,
    "id": ID_BODY,
    "provider": PROVIDER,
    "resource_req": RESOURCE_REQ,
    "resource": RESOURCE,
    "route": ROUTE,
    "job": JOB,
    "new_job": NEW_JOB,
}


def _to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's `nullable` as JSON Schema: `type: [t, "null"]`."""
    if isinstance(node, dict):
        out = {k: _to_json_schema(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable"):
            if "type" in out:
                out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        return out
    if isinstance(node, list):
        return [_to_json_schema(v) for v in node]
    return node


@cache
def validator(name: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_to_json_schema(copy.deepcopy(SCHEMAS[name])))


def _field(error: jsonschema.ValidationError) -> str:
    path = [str(p) for p in error.absolute_path]
    if error.validator == "required":
        missing = str(error.message).split("'")[1] if "'" in error.message else ""
        path.append(missing)
    return ".".join(p for p in path if p)


def _message(error: jsonschema.ValidationError) -> str:
    kind = error.validator
    if kind == "required":
        return "is required"
    if kind == "type":
        want = error.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return f"must be of type {want}"
    if kind == "enum":
        return "must be one of " + ", ".join(str(v) for v in error.validator_value if v)
    if kind == "pattern":
        return "is invalid"
    if kind in ("minimum", "maximum"):
        return f"must be {'at least' if kind == 'minimum' else 'at most'} {error.validator_value}"
    if kind in ("minLength", "maxLength"):
        word = "at least" if kind == "minLength" else "at most"
        return f"must be {word} {error.validator_value} characters long"
    if kind == "propertyNames":
        return "has an invalid key"
    return "is invalid"


def validate(name: str, body: Any) -> None:
    """Raise Flynn's validation_error for the first problem of `body` against schema `name`."""
    errors = sorted(validator(name).iter_errors(body), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    error = errors[0]
    # the most specific cause of an error in a nested schema
    while error.context:
        error = sorted(error.context, key=lambda e: len(e.absolute_path))[-1]
    field = _field(error)
    raise validation_error(field, _message(error))
