"""Tests for flynn_host.images: canonical JSON ids, the reproducible busybox image, manifests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from flynn_host.errors import FlynnError
from flynn_host.runtime import images
from flynn_host.types import MountSpec

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting squashfs needs root")


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("images")
    images.build_busybox_image(d)
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


# --- the busybox image ------------------------------------------------------------------------


def test_busybox_image_layout(images_dir: Path) -> None:
    manifest, base = images.load_manifest("busybox", images_dir)
    assert base == f"file://{images_dir / 'busybox'}/"
    assert (images_dir / "busybox/id").read_text().strip() == images.image_id(manifest)
    layer = manifest["rootfs"][0]["layers"][0]
    path = images_dir / "layers" / f"{layer['id']}.squashfs"
    assert layer["type"] == images.LAYER_TYPE
    assert layer["length"] == path.stat().st_size
    assert layer["hashes"]["sha512_256"] == layer["id"] == images.file_sha512_256(path)
    assert images.entrypoint(manifest)["args"] == ["/bin/sh"]


def test_build_is_cached(images_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (images_dir / "busybox/id").read_text()

    def must_not_build(*args: object) -> None:
        raise AssertionError("rebuilt although the cache key matched")

    monkeypatch.setattr(images, "make_squashfs", must_not_build)
    path = images.build_busybox_image(images_dir)
    assert path == images_dir / "busybox/manifest.json"
    assert (images_dir / "busybox/id").read_text() == before


def test_recipe_change_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images.build_busybox_image(tmp_path)
    built = []
    real = images.make_squashfs
    monkeypatch.setattr(images, "make_squashfs", lambda *a: built.append(a) or real(*a))
    monkeypatch.setattr(images, "RECIPE_VERSION", images.RECIPE_VERSION + "-next")
    images.build_busybox_image(tmp_path)
    assert built
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-busybox-")]


def test_rebuild_from_scratch_is_reproducible(images_dir: Path, tmp_path: Path) -> None:
    images.build_busybox_image(tmp_path, force=True)
    assert _layer_id(tmp_path) == _layer_id(images_dir)
    assert (tmp_path / "busybox/id").read_text() == (images_dir / "busybox/id").read_text()


def test_main_prints_manifest_path(images_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert images.main(["build-busybox", "--dir", str(images_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(images_dir / "busybox/manifest.json")


@needs_root
def test_busybox_layer_mounts_and_runs(images_dir: Path, tmp_path: Path) -> None:
    layer = images_dir / "layers" / f"{_layer_id(images_dir)}.squashfs"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "squashfs", "-o", "loop,ro", str(layer), str(mnt)], check=True)
    try:
        assert os.readlink(mnt / "bin/sh") == "busybox"
        assert os.access(mnt / "bin/busybox", os.X_OK)
        assert (mnt / "tmp").stat().st_mode & 0o7777 == 0o1777
        assert (mnt / "etc/passwd").read_text().startswith("root:x:0:0:")
        assert (mnt / "etc/resolv.conf").read_text() == ""
        for d in ("dev", "proc", "sys", "root"):
            assert (mnt / d).is_dir()
        out = subprocess.run(
            ["chroot", str(mnt), "/bin/sh", "-c", "ls /bin/ls && cat /etc/group"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.startswith("/bin/ls\nroot:x:0:")
    finally:
        subprocess.run(["umount", "-d", str(mnt)], check=True)
    assert subprocess.run(["losetup", "-j", str(layer)], capture_output=True).stdout == b""


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
