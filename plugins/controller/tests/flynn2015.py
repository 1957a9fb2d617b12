"""Flynn's 2015 controller contract, as recorded: the JSON schemas of v20151214.2
(`/work/shared/reference/flynn-2015/schema`, draft-04) in one `referencing.Registry` keyed by
their `id`s, and the 38 request/response pairs Flynn's own example generator recorded
(`docs/api-examples/controller.json`), in the order the generator ran them.

`response_validator(name)` gives a validator for the response body of example `name`, taken
from `schema/examples/controller/<name>.json` (the part under `response.properties.body`), so
which schema a response uses is the 2015 repository's word, not ours.

Formats: `date-time` is checked (RFC 3339, as Go's `time.Time` marshals; the CLI fails on
anything else). `uuid` is not: the 2015 schemas use `common#/definitions/id` (format uuid) for
route services, parent refs, job and scale event object ids, which the recorded responses
themselves fill with non-UUIDs; only the recorded behaviour is the contract.
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

REFERENCE = Path(
    os.environ.get("FLYNN_2015_REFERENCE", "/work/shared/reference/flynn-2015")
).resolve()
SCHEMA_DIR = REFERENCE / "schema"
EXAMPLES_FILE = REFERENCE / "docs" / "api-examples" / "controller.json"

# The order Flynn's `controller/examples` generator ran the examples in at v20151214 (the
# recorded file is keyed alphabetically; the created_at times in the responses confirm this
# order: provider 25.885 < app 25.903 < route 25.939 < artifact 25.960 < release 25.964 <
# formation 25.981 < release 2 25.989 < deployment 25.993 < job 26.052 < resource 26.145).
RECORDED_ORDER = [
    "provider_create",
    "app_create_error",
    "app_create",
    "app_initial_release_get",
    "app_get",
    "app_list",
    "app_update",
    "app_resource_list",
    "route_create",
    "route_get",
    "route_list",
    "route_delete",
    "artifact_create",
    "release_create",
    "artifact_list",
    "release_list",
    "app_release_set",
    "app_release_get",
    "formation_put",
    "formation_get",
    "formation_list",
    "release_create2",
    "deployment_create",
    "formation_delete",
    "job_run",
    "job_list",
    "job_update",
    "job_delete",
    "provider_get",
    "provider_list",
    "provider_resource_create",
    "provider_resource_get",
    "provider_resource_list",
    "events_list",
    "events_stream",
    "event_get",
    "app_delete",
    "app_log",
]

# Examples whose 2015 example schema names no response body although the response has one:
# the schema of the example to borrow it from.
RESPONSE_SCHEMA_OF = {
    "release_create2": "release_create",  # same call, no example schema of its own
    "app_release_set": "app_release_get",  # PUT /apps/:app/release returns the Release
}

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")

FORMAT_CHECKER = jsonschema.FormatChecker(formats=())


@FORMAT_CHECKER.checks("date-time")
def _is_datetime(value: object) -> bool:
    return not isinstance(value, str) or bool(_RFC3339.match(value))


def _uri(schema: dict[str, Any]) -> str:
    return str(schema["id"]).rstrip("#")


@cache
def registry() -> Registry:  # type: ignore[type-arg]
    """Every schema file under `schema/`, keyed by its `id` (e.g.
    `https://flynn.io/schema/controller/app`), so `/schema/controller/common#/...` refs
    resolve against the referring schema's id without any network."""
    resources = []
    for path in sorted(SCHEMA_DIR.rglob("*.json")):
        contents = json.loads(path.read_text())
        if "id" not in contents:
            continue
        resources.append((_uri(contents), Resource.from_contents(contents, DRAFT4)))
    return Registry().with_resources(resources)


def _validator(ref: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(
        {"$ref": ref}, registry=registry(), format_checker=FORMAT_CHECKER
    )


@cache
def type_validator(type_name: str) -> jsonschema.Draft4Validator:
    """The validator of one controller type, e.g. `type_validator("event")`."""
    return _validator(f"https://flynn.io/schema/controller/{type_name}#")


@cache
def response_validator(name: str) -> jsonschema.Draft4Validator | None:
    """The validator of example `name`'s response body, as its example schema says; None when
    the example has no response body (DELETEs, streams)."""
    name = RESPONSE_SCHEMA_OF.get(name, name)
    path = SCHEMA_DIR / "examples" / "controller" / f"{name}.json"
    example = json.loads(path.read_text())
    for i, part in enumerate(example.get("allOf", [])):
        body = part.get("properties", {}).get("response", {}).get("properties", {}).get("body")
        if body is not None:
            return _validator(f"{_uri(example)}#/allOf/{i}/properties/response/properties/body")
    return None


def schema_errors(validator: jsonschema.Draft4Validator, instance: object) -> list[str]:
    """Every violation, one line each with its JSON path (empty when valid)."""
    return [
        f"{e.json_path}: {e.message}"
        for e in sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
    ]


@cache
def examples() -> dict[str, dict[str, Any]]:
    """The recorded pairs, keyed by name, in `RECORDED_ORDER`."""
    recorded = json.loads(EXAMPLES_FILE.read_text())
    assert sorted(recorded) == sorted(RECORDED_ORDER), "examples file and order disagree"
    return {name: recorded[name] for name in RECORDED_ORDER}
