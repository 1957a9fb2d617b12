"""The directory store (`--dir`): blobs are plain files under the directory, names that
collide with a directory are refused, and what failed PUTs of a killed process left is
cleared at start."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from flynn_blobstore.dirstore import STALE_TMP, TMP_DIR

from flynn_host.dev.blobstore import BlobstoreProcess, blobstore_process


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[BlobstoreProcess, Path]]:
    stale = tmp_path / TMP_DIR / "put-stale"
    fresh = tmp_path / TMP_DIR / "put-fresh"
    stale.parent.mkdir()
    stale.write_bytes(b"left by a killed process")
    fresh.write_bytes(b"another process's PUT in progress")
    old = time.time() - STALE_TMP - 60
    os.utime(stale, (old, old))
    with blobstore_process(directory=tmp_path) as bs:
        yield bs, tmp_path


def test_stale_temporary_files_go_at_start(served: tuple[BlobstoreProcess, Path]) -> None:
    _, root = served
    assert sorted(os.listdir(root / TMP_DIR)) == ["put-fresh"]


async def test_blobs_are_plain_files(served: tuple[BlobstoreProcess, Path]) -> None:
    bs, root = served
    async with aiohttp.ClientSession() as http:
        async with http.put(bs.url + "/slugs/layers/abc.squashfs", data=b"layer") as r:
            assert r.status == 200
        assert (root / "slugs/layers/abc.squashfs").read_bytes() == b"layer"  # noqa: ASYNC240
        assert os.stat(root / "slugs/layers/abc.squashfs").st_mode & 0o777 == 0o644
        # a name whose directory is a blob, and a name that is a directory: 409
        async with http.put(bs.url + "/slugs/layers/abc.squashfs/x", data=b"x") as r:
            assert r.status == 409
        async with http.put(bs.url + "/slugs/layers", data=b"x") as r:
            assert r.status == 409
        async with http.get(bs.url + "/slugs/layers") as r:
            assert r.status == 404
        # the temporary directory is not a blob name
        async with http.put(bs.url + f"/{TMP_DIR}/x", data=b"x") as r:
            assert r.status == 409
        async with http.get(bs.url + f"/{TMP_DIR}/put-fresh") as r:
            assert r.status == 404
        # deleting the last blob of a directory removes the empty directories
        async with http.delete(bs.url + "/slugs/layers/abc.squashfs") as r:
            assert r.status == 200
        assert not (root / "slugs").exists()  # noqa: ASYNC240
