"""The blobstore's client, what other components import: `put` a file or a stream of bytes,
`get_to_file`, `head`/`exists` and `delete`, by URL (`http://blobstore.discoverd/slugs/x.tgz`)
or by path, taken relative to `http://blobstore.discoverd`.

Bodies are streamed both ways, never held whole. A download lands in a temporary file beside
the target and is renamed over it once complete, so a failed one leaves no partial file. A
status other than the ones each call expects raises `BlobstoreError`, which names the URL.

    async with Client() as blobs:
        await blobs.put("/repos/abc.tar", "/tmp/abc.tar")
        found = await blobs.get_to_file("/repos/abc.tar", "/tmp/copy.tar")

The module-level functions do the same with a client of their own.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from flynn_blobstore.types import DEFAULT_CONTENT_TYPE, DEFAULT_URL, BlobInfo

CHUNK = 1 << 18
# no limit on a whole transfer (blobs are large), but a connection that stalls fails
TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=120)

Source = str | os.PathLike[str] | AsyncIterable[bytes]


class BlobstoreError(Exception):
    """The blobstore answered `status` (or not at all: status 0) to `method url`."""

    def __init__(self, method: str, url: str, status: int, detail: str) -> None:
        super().__init__(f"blobstore: {method} {url}: {status or 'no answer'} {detail}".rstrip())
        self.method = method
        self.url = url
        self.status = status
        self.detail = detail


class Client:
    def __init__(
        self, base_url: str = DEFAULT_URL, session: aiohttp.ClientSession | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._own_session = session is None

    def url(self, url_or_path: str) -> str:
        if "://" in url_or_path:
            return url_or_path
        return self.base_url + "/" + url_or_path.lstrip("/")

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=TIMEOUT, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def _request(
        self, method: str, url: str, **kw: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        try:
            async with self.session.request(method, url, **kw) as resp:
                yield resp
        except aiohttp.ClientError as exc:
            raise BlobstoreError(method, url, 0, f"({exc})") from exc

    @staticmethod
    async def _fail(method: str, url: str, resp: aiohttp.ClientResponse) -> BlobstoreError:
        detail = (await resp.content.read(500)).decode(errors="replace").strip()
        return BlobstoreError(method, url, resp.status, detail)

    async def put(self, url: str, source: Source, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
        """Store the file at path `source`, or the bytes an async iterable yields (sent
        chunked), at `url`."""
        url = self.url(url)
        headers = {"Content-Type": content_type}
        if isinstance(source, str | os.PathLike):
            with open(source, "rb") as f:  # noqa: ASYNC230 - aiohttp reads it in chunks
                headers["Content-Length"] = str(os.fstat(f.fileno()).st_size)
                await self._put(url, f, headers)
        else:
            await self._put(url, source, headers)

    async def _put(self, url: str, data: Any, headers: dict[str, str]) -> None:
        async with self._request("PUT", url, data=data, headers=headers) as resp:
            if resp.status != 200:
                raise await self._fail("PUT", url, resp)

    async def get_to_file(self, url: str, path: str | os.PathLike[str]) -> bool:
        """Download `url` into `path`; False (and `path` untouched) if there is no such blob."""
        url = self.url(url)
        target = Path(path)
        async with self._request("GET", url) as resp:
            if resp.status == 404:
                return False
            if resp.status != 200:
                raise await self._fail("GET", url, resp)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            try:
                with os.fdopen(fd, "wb") as f:
                    got = 0
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        f.write(chunk)
                        got += len(chunk)
                if resp.content_length is not None and got != resp.content_length:
                    raise BlobstoreError("GET", url, resp.status,
                                         f"got {got} of {resp.content_length} bytes")  # fmt: skip
                os.replace(tmp, target)
            except aiohttp.ClientError as exc:
                os.unlink(tmp)
                raise BlobstoreError("GET", url, resp.status, f"({exc})") from exc
            except BaseException:
                os.unlink(tmp)
                raise
        return True

    async def head(self, url: str) -> BlobInfo | None:
        """The blob's size, ETag and Content-Type; None if there is none."""
        url = self.url(url)
        async with self._request("HEAD", url) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise await self._fail("HEAD", url, resp)
            return BlobInfo(
                size=int(resp.headers.get("Content-Length") or 0),
                etag=resp.headers.get("ETag", "").strip('"'),
                content_type=resp.headers.get("Content-Type", DEFAULT_CONTENT_TYPE),
            )

    async def exists(self, url: str) -> bool:
        return await self.head(url) is not None

    async def delete(self, url: str) -> bool:
        """Remove the blob; False if there was none."""
        url = self.url(url)
        async with self._request("DELETE", url) as resp:
            if resp.status == 404:
                return False
            if resp.status != 200:
                raise await self._fail("DELETE", url, resp)
            return True


async def put(url: str, source: Source, content_type: str = DEFAULT_CONTENT_TYPE) -> None:
    async with Client() as c:
        await c.put(url, source, content_type)


async def get_to_file(url: str, path: str | os.PathLike[str]) -> bool:
    async with Client() as c:
        return await c.get_to_file(url, path)


async def head(url: str) -> BlobInfo | None:
    async with Client() as c:
        return await c.head(url)


async def exists(url: str) -> bool:
    async with Client() as c:
        return await c.exists(url)


async def delete(url: str) -> bool:
    async with Client() as c:
        return await c.delete(url)
