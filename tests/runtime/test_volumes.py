"""Tests for flynn_host.runtime.volumes: data volumes and their persistent index."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from flynn_host.errors import FlynnError
from flynn_host.runtime.volumes import VolumeManager


def test_create_get_list_delete(tmp_path: Path) -> None:
    vm = VolumeManager(tmp_path)
    info = vm.create({"app": "web"})
    assert set(info) == {"id", "type", "meta", "created_at"}
    assert uuid.UUID(info["id"]).version == 4
    assert info["type"] == "data" and info["meta"] == {"app": "web"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", info["created_at"])
    assert vm.get(info["id"]) == info
    path = vm.path(info["id"])
    assert path == tmp_path / "data" / info["id"] and path.is_dir()
    (path / "file").write_text("data")

    named = vm.create(volume_id="pg-data")
    assert named["meta"] == {}
    assert [v["id"] for v in vm.list()] == [info["id"], "pg-data"]

    vm.delete(info["id"])
    assert not path.exists()
    assert [v["id"] for v in vm.list()] == ["pg-data"]


def test_persists_across_instances(tmp_path: Path) -> None:
    vm = VolumeManager(tmp_path)
    a = vm.create({"k": "v"})
    b = vm.create()
    vm.delete(b["id"])
    assert json.loads((tmp_path / "volumes.json").read_text()) == {"volumes": [a]}
    again = VolumeManager(tmp_path)
    assert again.list() == [a]
    assert again.path(a["id"]).is_dir()


def test_not_found(tmp_path: Path) -> None:
    vm = VolumeManager(tmp_path)
    for call in (vm.get, vm.path, vm.delete):
        with pytest.raises(FlynnError) as e:
            call("nope")
        assert e.value.code == "not_found" and e.value.status == 404
        assert "volume nope not found" in e.value.message


def test_create_errors(tmp_path: Path) -> None:
    vm = VolumeManager(tmp_path)
    vm.create(volume_id="v1")
    with pytest.raises(FlynnError) as e:
        vm.create(volume_id="v1")
    assert e.value.code == "object_exists" and e.value.status == 409
    for bad in ("", "..", "a/b", "x" * 129):
        with pytest.raises(FlynnError) as e:
            vm.create(volume_id=bad)
        assert e.value.code == "validation_error"
    with pytest.raises(FlynnError, match="meta"):
        vm.create({"n": 1})  # type: ignore[dict-item]
    assert [v["id"] for v in vm.list()] == ["v1"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["v1"]
