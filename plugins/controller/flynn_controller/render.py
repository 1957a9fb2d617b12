"""Database rows as Flynn's JSON types (`controller/types` of 2015): field names, which fields
are left out when empty (Go's `omitempty`) and which never are (an app's `meta` is always an
object, a formation's `processes` is present even when null)."""

from __future__ import annotations

from typing import Any

import asyncpg

from flynn_controller.types import fmt_time


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` unless `value` is empty, as Go's omitempty does."""
    if value is None or value == "" or value == {} or value == [] or value is False:
        return
    out[key] = value


def app_json(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {"id": str(row["app_id"]), "name": row["name"]}
    out["meta"] = row["meta"] or {}
    _put(out, "strategy", row["strategy"])
    if row["release_id"] is not None:
        out["release"] = str(row["release_id"])
    _put(out, "deploy_timeout", row["deploy_timeout"])
    out["created_at"] = fmt_time(row["created_at"])
    out["updated_at"] = fmt_time(row["updated_at"])
    return out


def artifact_json(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {"id": str(row["artifact_id"]), "type": row["type"], "uri": row["uri"]}
    _put(out, "meta", row["meta"])
    out["created_at"] = fmt_time(row["created_at"])
    return out


def release_json(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {"id": str(row["release_id"])}
    if row["artifact_id"] is not None:
        out["artifact"] = str(row["artifact_id"])
    _put(out, "env", row["env"])
    _put(out, "meta", row["meta"])
    _put(out, "processes", row["processes"])
    out["created_at"] = fmt_time(row["created_at"])
    return out


def formation_json(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {"app": str(row["app_id"]), "release": str(row["release_id"])}
    out["processes"] = row["processes"]
    _put(out, "tags", row["tags"])
    _put(out, "hosts", row["hosts"])
    out["created_at"] = fmt_time(row["created_at"])
    out["updated_at"] = fmt_time(row["updated_at"])
    return out


def deployment_json(row: asyncpg.Record) -> dict[str, Any]:
    out: dict[str, Any] = {"id": str(row["deployment_id"]), "app": str(row["app_id"])}
    if row["old_release_id"] is not None:
        out["old_release"] = str(row["old_release_id"])
    out["new_release"] = str(row["new_release_id"])
    out["strategy"] = row["strategy"]
    out["status"] = row["status"]
    _put(out, "processes", row["processes"])
    _put(out, "deploy_timeout", row["deploy_timeout"])
    out["created_at"] = fmt_time(row["created_at"])
    if row["finished_at"] is not None:
        out["finished_at"] = fmt_time(row["finished_at"])
    return out


def provider_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(row["provider_id"]),
        "url": row["url"],
        "name": row["name"],
        "created_at": fmt_time(row["created_at"]),
        "updated_at": fmt_time(row["updated_at"]),
    }


def resource_json(row: asyncpg.Record, apps: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": str(row["resource_id"]), "provider": str(row["provider_id"])}
    _put(out, "external_id", row["external_id"])
    _put(out, "env", row["env"])
    _put(out, "apps", apps)
    out["created_at"] = fmt_time(row["created_at"])
    return out


def route_json(row: asyncpg.Record) -> dict[str, Any]:
    """router.Route: `type` and `service` always, times always (Go zero time included)."""
    out: dict[str, Any] = {"type": row["type"], "id": str(row["route_id"])}
    _put(out, "parent_ref", row["parent_ref"])
    out["service"] = row["service"]
    _put(out, "leader", row["leader"])
    _put(out, "drain_backends", row["drain_backends"])
    out["created_at"] = fmt_time(row["created_at"])
    out["updated_at"] = fmt_time(row["updated_at"])
    if row["type"] == "http":
        _put(out, "domain", row["domain"])
        _put(out, "tls_cert", row["tls_cert"])
        _put(out, "tls_key", row["tls_key"])
        _put(out, "sticky", row["sticky"])
        _put(out, "path", row["path"])
    else:
        _put(out, "port", row["port"])
    return out


def job_json(row: asyncpg.Record) -> dict[str, Any]:
    """Job: the host metadata without the controller's own `flynn-controller.*` keys."""
    out: dict[str, Any] = {"id": row["job_id"], "app": str(row["app_id"])}
    if row["release_id"] is not None:
        out["release"] = str(row["release_id"])
    _put(out, "type", row["process_type"])
    out["state"] = row["state"]
    _put(out, "cmd", row["cmd"])
    meta = {k: v for k, v in (row["meta"] or {}).items() if not k.startswith("flynn-controller.")}
    _put(out, "meta", meta)
    if row["exit_status"] is not None:
        out["exit_status"] = row["exit_status"]
    _put(out, "host_error", row["host_error"])
    out["created_at"] = fmt_time(row["created_at"])
    out["updated_at"] = fmt_time(row["updated_at"])
    return out
