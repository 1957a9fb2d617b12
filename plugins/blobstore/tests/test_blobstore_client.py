"""`flynn_blobstore.client`, what other components use, against a real blobstore."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from blobstore_store import Blobstore
from flynn_blobstore import client
from flynn_blobstore.client import BlobstoreError, Client


async def test_put_a_file_and_get_it_back(blobstore: Blobstore, name: str, tmp_path: Path) -> None:
    src = tmp_path / "src.tar"
    src.write_bytes(os.urandom(3 << 20))
    async with Client(blobstore.url) as blobs:
        assert await blobs.head(name) is None and not await blobs.exists(name)
        await blobs.put(name, src, content_type="application/x-tar")
        info = await blobs.head(name)
        assert info is not None
        assert info.size == 3 << 20 and info.content_type == "application/x-tar"
        assert info.etag == hashlib.sha256(src.read_bytes()).hexdigest()
        assert await blobs.get_to_file(name, tmp_path / "copy.tar")
        assert (tmp_path / "copy.tar").read_bytes() == src.read_bytes()
        assert await blobs.delete(name)
        assert not await blobs.delete(name)
        # a missing blob: False, and the file there is left alone
        assert not await blobs.get_to_file(name, tmp_path / "copy.tar")
        assert (tmp_path / "copy.tar").read_bytes() == src.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["copy.tar", "src.tar"]


async def test_put_a_stream_with_module_functions(blobstore: Blobstore, tmp_path: Path) -> None:
    url = f"{blobstore.url}/{uuid.uuid4()}-cache.tgz"

    async def stream() -> AsyncIterator[bytes]:
        for i in range(10):
            yield bytes([i]) * 100_000

    await client.put(url, stream())
    assert await client.exists(url)
    assert await client.get_to_file(url, tmp_path / "cache.tgz")
    assert (tmp_path / "cache.tgz").read_bytes() == b"".join(
        bytes([i]) * 100_000 for i in range(10)
    )
    info = await client.head(url)
    assert info is not None and info.content_type == "application/octet-stream"
    assert await client.delete(url)


async def test_other_statuses_raise_with_the_url(blobstore: Blobstore, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    async with Client(blobstore.url) as blobs:
        with pytest.raises(BlobstoreError, match=r"PUT http://.*/tests/: 400") as err:
            await blobs.put("/tests/", tmp_path / "f")
        assert err.value.status == 400 and err.value.url.endswith("/tests/")


async def test_no_answer_is_an_error_too(tmp_path: Path) -> None:
    from flynn_host.dev.host import free_port

    url = f"http://127.0.0.1:{free_port()}/x"
    with pytest.raises(BlobstoreError, match=rf"GET {url}: no answer"):
        await client.get_to_file(url, tmp_path / "x")
    assert os.listdir(tmp_path) == []


def test_urls_and_paths() -> None:
    c = Client()
    assert c.url("/repos/a.tar") == "http://blobstore.discoverd/repos/a.tar"
    assert c.url("slugs/x.tgz") == "http://blobstore.discoverd/slugs/x.tgz"
    assert c.url("http://other:8080/y") == "http://other:8080/y"
    assert Client("http://127.0.0.1:1/").url("/z") == "http://127.0.0.1:1/z"
