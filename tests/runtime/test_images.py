"""Tests for flynn_host.runtime.images: canonical JSON ids, manifests and mountspecs (of the
busybox test image, built for this module)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from flynn_host.dev.busybox import build_busybox_image
from flynn_host.errors import FlynnError
from flynn_host.runtime import images
from flynn_host.types import MountSpec


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("images")
    build_busybox_image(d)
    return d


def _layer_id(images_dir: Path) -> str:
    manifest = json.loads((images_dir / "busybox/manifest.json").read_text())
    return manifest["rootfs"][0]["layers"][0]["id"]


# --- canonical JSON ---------------------------------------------------------------------------


def test_canonical_json_matches_go_tuf_encoding() -> None:
    obj = {"b": 1, "a": [True, False, None, 'q"b\\\n\r<>&é'], "c": {"z": {}, "y": []}}
    expected = '{"a":[true,false,null,"q\\"b\\\\\n\r<>&é"],"b":1,"c":{"y":[],"z":{}}}'
    assert images.canonical_json(obj) == expected.encode()


def test_canonical_json_refuses_floats() -> None:
    with pytest.raises(TypeError):
        images.canonical_json({"a": 1.5})


def test_image_id_is_independent_of_key_order() -> None:
    a = {"_type": images.MANIFEST_TYPE, "meta": {"x": "1", "y": "2"}}
    b = {"meta": {"y": "2", "x": "1"}, "_type": images.MANIFEST_TYPE}
    assert images.image_id(a) == images.image_id(b)
    assert images.image_id(a) == hashlib.new("sha512_256", images.canonical_json(a)).hexdigest()
    assert len(images.image_id(a)) == 64


# --- manifests and mountspecs -----------------------------------------------------------------


def test_load_manifest_by_path_and_url(images_dir: Path) -> None:
    path = images_dir / "busybox/manifest.json"
    by_name, _ = images.load_manifest("busybox", images_dir)
    assert images.load_manifest(str(path), Path("/nonexistent"))[0] == by_name
    assert images.load_manifest(f"file://{path}", Path("/nonexistent"))[0] == by_name


def test_load_manifest_errors(images_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FlynnError) as e:
        images.load_manifest("nosuch", images_dir)
    assert e.value.code == "not_found"
    assert "'nosuch'" in e.value.message and str(images_dir / "nosuch/manifest.json") in str(
        e.value
    )
    with pytest.raises(FlynnError, match="no /nonexistent/m.json"):
        images.load_manifest("file:///nonexistent/m.json", images_dir)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: invalid JSON"):
        images.load_manifest(str(tmp_path / "bad.json"), images_dir)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Flynn image manifest"):
        images.load_manifest(str(tmp_path / "other.json"), images_dir)


def test_mountspecs_for_local_image(images_dir: Path) -> None:
    manifest, _ = images.load_manifest("busybox", images_dir)
    template = images.local_layer_template(images_dir)
    assert template == f"file://{images_dir}/layers/{{id}}.squashfs"
    [raw] = images.mountspecs_for(manifest, template)
    layer_id = _layer_id(images_dir)
    assert raw["type"] == "squashfs" and raw["id"] == layer_id
    assert raw["url"] == f"file://{images_dir}/layers/{layer_id}.squashfs"
    assert raw["hashes"] == {"sha512_256": layer_id}
    spec = MountSpec.from_json(raw, "mountspecs[0]")
    assert spec.size == (images_dir / "layers" / f"{layer_id}.squashfs").stat().st_size


def test_mountspecs_for_needs_amd64_rootfs() -> None:
    manifest = {"_type": images.MANIFEST_TYPE, "rootfs": [{"platform": {"os": "plan9"}}]}
    with pytest.raises(ValueError, match="linux/amd64"):
        images.mountspecs_for(manifest, "http://x/{id}")
    with pytest.raises(ValueError, match="_default"):
        images.entrypoint(manifest)
