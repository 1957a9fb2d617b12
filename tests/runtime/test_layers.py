"""Tests for flynn_host.runtime.layers: verified fetches (file:// and http://), shared read-only
mounts, and clean-up after a restart. Real squashfs files, real loop mounts."""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer as HTTPServer

from flynn_host.runtime.images import file_sha512_256, make_squashfs
from flynn_host.runtime.layers import LayerError, LayerStore, mount_points
from flynn_host.types import MountSpec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting squashfs needs root")


def _squashfs(tmp_path: Path, name: str, text: str) -> Path:
    root = tmp_path / f"{name}-root"
    root.mkdir()
    (root / "hello.txt").write_text(text)
    out = tmp_path / f"{name}.squashfs"
    make_squashfs(root, out)
    return out


def _spec(path: Path, **override: object) -> MountSpec:
    digest = file_sha512_256(path)
    fields: dict = {"id": digest, "url": f"file://{path}", "size": path.stat().st_size}
    fields["sha512_256"] = digest
    fields.update(override)
    return MountSpec(**fields)


def _corrupted(path: Path) -> bytes:
    data = path.read_bytes()
    return data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]


def _mount_count(point: Path) -> int:
    return mount_points().count(str(point))


def _loop_devices(file: Path) -> str:
    return subprocess.run(["losetup", "-j", str(file)], capture_output=True, text=True).stdout


def _force_unmount_all(mount_dir: Path) -> None:
    for point in mount_points():
        if point.startswith(f"{mount_dir}/"):
            subprocess.run(["umount", "-d", point], check=False)


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    return _squashfs(tmp_path, "layer", "hello from a layer\n")


@pytest.fixture
def mount_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "mnt"
    yield d
    _force_unmount_all(d)  # whatever a failed test left behind


@pytest.fixture
async def store(tmp_path: Path, mount_dir: Path) -> AsyncIterator[LayerStore]:
    s = LayerStore(tmp_path / "cache", mount_dir, [tmp_path])
    yield s
    await s.close()


@pytest.fixture
async def http_server(layer: Path) -> AsyncIterator[HTTPServer]:
    corrupt = _corrupted(layer)

    async def good(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(layer)

    async def bad(request: web.Request) -> web.Response:
        return web.Response(body=corrupt)

    app = web.Application()
    app.router.add_get("/layers/good.squashfs", good)
    app.router.add_get("/layers/corrupt.squashfs", bad)
    server = HTTPServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


# --- fetch ------------------------------------------------------------------------------------


async def test_fetch_file_url(store: LayerStore, layer: Path) -> None:
    spec = _spec(layer)
    path = await store.fetch(spec)
    assert path == store.cache_dir / f"{spec.id}.squashfs"
    assert filecmp.cmp(path, layer, shallow=False)
    # a cache hit does not touch the source again
    os.unlink(layer)
    assert await store.fetch(spec) == path


async def test_fetch_wrong_hash_leaves_nothing(store: LayerStore, layer: Path) -> None:
    spec = _spec(layer, sha512_256="0" * 64)
    with pytest.raises(LayerError) as e:
        await store.fetch(spec)
    assert spec.id in str(e.value) and "0" * 64 in str(e.value)
    assert file_sha512_256(layer) in str(e.value)
    assert list(store.cache_dir.iterdir()) == []


async def test_fetch_wrong_size(store: LayerStore, layer: Path) -> None:
    size = _spec(layer).size
    for wrong in (size + 1, size - 1):
        with pytest.raises(LayerError, match=f"expected {wrong}"):
            await store.fetch(_spec(layer, size=wrong))
    assert list(store.cache_dir.iterdir()) == []


async def test_fetch_missing_file(store: LayerStore, tmp_path: Path) -> None:
    spec = MountSpec(id="abc", url=f"file://{tmp_path}/nope.squashfs", size=1, sha512_256="0" * 64)
    with pytest.raises(LayerError, match=f"layer abc not found at file://{tmp_path}/nope"):
        await store.fetch(spec)
    assert list(store.cache_dir.iterdir()) == []


async def test_fetch_refuses_path_like_ids(store: LayerStore, layer: Path) -> None:
    with pytest.raises(LayerError, match="invalid layer id"):
        await store.acquire(_spec(layer, id=".."))


async def test_fetch_http(store: LayerStore, layer: Path, http_server: HTTPServer) -> None:
    spec = _spec(layer, url=str(http_server.make_url("/layers/good.squashfs")))
    path = await store.fetch(spec)
    assert filecmp.cmp(path, layer, shallow=False)


async def test_fetch_http_corrupt_body(
    store: LayerStore, layer: Path, http_server: HTTPServer
) -> None:
    spec = _spec(layer, url=str(http_server.make_url("/layers/corrupt.squashfs")))
    with pytest.raises(LayerError, match="sha512_256"):
        await store.fetch(spec)
    missing = _spec(layer, url=str(http_server.make_url("/layers/missing.squashfs")))
    with pytest.raises(LayerError, match="not found at http://127.0.0.1"):
        await store.fetch(missing)
    assert list(store.cache_dir.iterdir()) == []


async def test_a_layer_in_the_image_dirs_is_copied_not_downloaded(
    tmp_path: Path, mount_dir: Path, layer: Path, http_server: HTTPServer
) -> None:
    images_dir = tmp_path / "images"
    (images_dir / "layers").mkdir(parents=True)
    spec = _spec(layer, url=str(http_server.make_url("/layers/nowhere.squashfs")))
    os.link(layer, images_dir / "layers" / f"{spec.id}.squashfs")
    store = LayerStore(tmp_path / "cache", mount_dir, [images_dir])
    try:
        # the URL answers 404: only the host's own copy can have been used
        path = await store.fetch(spec)
        assert filecmp.cmp(path, layer, shallow=False)
        # a copy of another size is not taken for the layer: the URL is tried, and fails
        other = _spec(_squashfs(tmp_path, "other", "another layer\n"))
        (images_dir / "layers" / f"{other.id}.squashfs").write_bytes(b"short")
        with pytest.raises(LayerError, match="not found at http://127.0.0.1"):
            await store.fetch(
                _spec(
                    tmp_path / "other.squashfs",
                    url=str(http_server.make_url("/layers/missing.squashfs")),
                )
            )
    finally:
        await store.close()


async def test_file_urls_name_only_regular_files_under_the_image_dirs(
    store: LayerStore, layer: Path, tmp_path: Path
) -> None:
    # issue 9, finding 2: a layer url of file:///etc/shadow leaked its size and hash, and
    # file:///dev/zero read without end; links and `..` must not lead out either
    (tmp_path / "to-shadow").symlink_to("/etc/shadow")
    (tmp_path / "to-zero").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    outside = {
        "file:///etc/shadow": "not under the image directories",
        f"file://{tmp_path}/../../etc/shadow": "not under the image directories",
        f"file://{tmp_path}/to-shadow": "not under the image directories",
        f"file://{tmp_path}/to-zero": "not under the image directories",
        f"file://{tmp_path}/fifo": "not a regular file",
        f"file://{tmp_path}/dir": "not a regular file",
        "file://otherhost/etc/passwd": "must name a local path",
    }
    for url, why in outside.items():
        spec = _spec(layer, url=url, size=1 << 30)
        with pytest.raises(LayerError, match=why) as err:
            await asyncio.wait_for(store.fetch(spec), 10)  # a FIFO must not block the read
        assert "sha512_256" not in str(err.value) and "size" not in str(err.value)
        if "regular" not in why:  # check_url (the API's early check) looks at the path only
            with pytest.raises(ValueError, match=why):
                store.check_url(url)
    assert list(store.cache_dir.iterdir()) == []
    # the same layer from inside the image directories is fine
    assert await store.fetch(_spec(layer)) == store.path(_spec(layer).id)


async def test_http_download_is_capped_and_times_out(tmp_path: Path, mount_dir: Path) -> None:
    """A server that sends more than the mountspec's size is cut off at the size; one that
    stops sending is given up after the read timeout."""
    stalled = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            while True:
                await resp.write(b"\0" * 65536)
        return resp

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"\0" * 1000)
        await stalled.wait()
        return resp

    app = web.Application()
    app.router.add_get("/endless", endless)
    app.router.add_get("/stall", stall)
    server = HTTPServer(app, host="127.0.0.1")
    await server.start_server()
    store = LayerStore(tmp_path / "cache", mount_dir, read_timeout=1)
    try:
        big = MountSpec(id="big", url=str(server.make_url("/endless")), size=1 << 20,
                        sha512_256="0" * 64)  # fmt: skip
        with pytest.raises(LayerError, match="big .*exceeds the expected 1048576 bytes"):
            await asyncio.wait_for(store.fetch(big), 20)
        slow = MountSpec(id="slow", url=str(server.make_url("/stall")), size=1 << 20,
                         sha512_256="0" * 64)  # fmt: skip
        started = time.monotonic()
        with pytest.raises(LayerError, match="slow: downloading .* timed out"):
            await asyncio.wait_for(store.fetch(slow), 20)
        assert time.monotonic() - started < 10
        assert [p for p in store.cache_dir.iterdir()] == []
    finally:
        stalled.set()
        await store.close()
        await server.close()


async def test_concurrent_fetches_share_one_copy(
    store: LayerStore, layer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = store._download

    async def counting(*args: object) -> None:
        calls.append(args)
        await real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_download", counting)
    paths = await asyncio.gather(*(store.fetch(_spec(layer)) for _ in range(5)))
    assert len(set(paths)) == 1 and len(calls) == 1


# --- mounts -----------------------------------------------------------------------------------


async def test_acquire_mounts_once_and_release_unmounts(store: LayerStore, layer: Path) -> None:
    spec = _spec(layer)
    points = await asyncio.gather(*(store.acquire(spec) for _ in range(10)))
    point = store.mount_point(spec.id)
    assert set(points) == {point}
    assert _mount_count(point) == 1
    assert store.refcount(spec.id) == 10
    assert (point / "hello.txt").read_text() == "hello from a layer\n"
    with pytest.raises(OSError):
        (point / "new").write_text("read-only")
    cached = store.path(spec.id)
    assert _loop_devices(cached)

    for _ in range(9):
        await store.release(spec.id)
    assert _mount_count(point) == 1
    await store.release(spec.id)
    assert _mount_count(point) == 0
    assert not point.exists()
    assert _loop_devices(cached) == ""
    await store.release(spec.id)  # an extra release is ignored


async def test_close_unmounts_everything(tmp_path: Path, mount_dir: Path) -> None:
    store = LayerStore(tmp_path / "cache", mount_dir, [tmp_path])
    specs = [_spec(_squashfs(tmp_path, f"l{i}", f"layer {i}")) for i in range(3)]
    for spec in specs:
        await store.acquire(spec)
    await store.close()
    for spec in specs:
        assert _mount_count(store.mount_point(spec.id)) == 0
        assert _loop_devices(store.path(spec.id)) == ""


async def test_cleanup_stale_and_adopt(tmp_path: Path, mount_dir: Path) -> None:
    keep, stale = _spec(_squashfs(tmp_path, "keep", "keep")), _spec(_squashfs(tmp_path, "old", "x"))
    # A previous daemon mounted both, then died.
    before = LayerStore(tmp_path / "cache", mount_dir, [tmp_path])
    for spec in (keep, stale):
        await before.acquire(spec)
    (mount_dir / "empty-leftover").mkdir()

    store = LayerStore(tmp_path / "cache", mount_dir, [tmp_path])
    assert await store.cleanup_stale(keep={keep.id}) == [stale.id]
    assert _mount_count(store.mount_point(stale.id)) == 0
    assert _loop_devices(store.path(stale.id)) == ""
    assert not (mount_dir / "empty-leftover").exists()
    assert not store.mount_point(stale.id).exists()

    # Two jobs still use `keep`: adopting takes it over without a second mount.
    await store.adopt([keep.id, keep.id])
    point = store.mount_point(keep.id)
    assert _mount_count(point) == 1 and store.refcount(keep.id) == 2
    # A layer that is cached but not mounted is mounted by adopt.
    await store.adopt([stale])
    assert _mount_count(store.mount_point(stale.id)) == 1

    await store.release(keep.id)
    assert _mount_count(point) == 1
    await store.release(keep.id)
    assert _mount_count(point) == 0
    await store.close()
    assert _mount_count(store.mount_point(stale.id)) == 0
    assert _loop_devices(store.path(keep.id)) == _loop_devices(store.path(stale.id)) == ""


async def test_adopt_unknown_layer(store: LayerStore) -> None:
    with pytest.raises(LayerError, match="layer nope is not in"):
        await store.adopt(["nope"])
