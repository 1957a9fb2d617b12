"""Tests for flynn_host.dev.busybox: the busybox test image is laid out as a Flynn image, cached,
rebuilt when its recipe changes, reproducible, and runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from flynn_host.dev import busybox
from flynn_host.runtime import images

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting squashfs needs root")


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("images")
    busybox.build_busybox_image(d)
    return d


def _layer_id(images_dir: Path) -> str:
    manifest = json.loads((images_dir / "busybox/manifest.json").read_text())
    return manifest["rootfs"][0]["layers"][0]["id"]


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
    path = busybox.build_busybox_image(images_dir)
    assert path == images_dir / "busybox/manifest.json"
    assert (images_dir / "busybox/id").read_text() == before


def test_recipe_change_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    busybox.build_busybox_image(tmp_path)
    built = []
    real = images.make_squashfs
    monkeypatch.setattr(images, "make_squashfs", lambda *a: built.append(a) or real(*a))
    monkeypatch.setattr(busybox, "RECIPE_VERSION", busybox.RECIPE_VERSION + "-next")
    busybox.build_busybox_image(tmp_path)
    assert built
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-busybox-")]


def test_rebuild_from_scratch_is_reproducible(images_dir: Path, tmp_path: Path) -> None:
    busybox.build_busybox_image(tmp_path, force=True)
    assert _layer_id(tmp_path) == _layer_id(images_dir)
    assert (tmp_path / "busybox/id").read_text() == (images_dir / "busybox/id").read_text()


def test_main_prints_manifest_path(images_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert busybox.main(["--dir", str(images_dir)]) == 0
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
