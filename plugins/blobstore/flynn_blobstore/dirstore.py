"""Blobs as files in a directory (`--dir DIR`, Flynn's `-s`): the blob `/repos/x.tar` is the
file `DIR/repos/x.tar`, its ETag and Content-Type in extended attributes of the file.

A PUT writes a temporary file in `DIR/.blobstore-tmp/` (the same file system), fsyncs it, sets
its attributes and renames it over the blob's name: readers see the old file or the new one,
whole, and a reader that opened the old one keeps its bytes (the inode lives while open). A PUT
that fails removes its temporary file; ones a killed process left are removed at start once
they are an hour old. Where the file system has no user extended attributes the ETag is made
from the file's inode, size and modification time, which change whenever it is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

from flynn_blobstore.store import CHUNK, StoreError, rechunk
from flynn_blobstore.types import DEFAULT_CONTENT_TYPE, BlobInfo

TMP_DIR = ".blobstore-tmp"
STALE_TMP = 3600.0
XATTR_ETAG = "user.flynn.etag"
XATTR_TYPE = "user.flynn.content_type"


def _getxattr(fd: int, attr: str) -> str | None:
    try:
        return os.getxattr(fd, attr).decode()
    except OSError:
        return None


def _setxattrs(fd: int, info: BlobInfo) -> None:
    try:
        os.setxattr(fd, XATTR_ETAG, info.etag.encode())
        os.setxattr(fd, XATTR_TYPE, info.content_type.encode())
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


class DirReader:
    def __init__(self, fd: int, info: BlobInfo) -> None:
        self.fd = fd
        self.info = info

    async def read(self, offset: int, length: int) -> AsyncIterator[bytes]:
        while length > 0:
            chunk = await asyncio.to_thread(os.pread, self.fd, min(length, CHUNK), offset)
            if not chunk:
                raise RuntimeError(f"file ended {length} bytes early")
            offset += len(chunk)
            length -= len(chunk)
            yield chunk


class DirStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / TMP_DIR
        self.tmp.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for stale in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > STALE_TMP:
                    stale.unlink()

    def path(self, name: str) -> Path:
        """The file of blob `name` (a URL path the server checked: absolute, no `..`)."""
        rel = name.lstrip("/")
        if not rel or rel.split("/")[0] == TMP_DIR or "\0" in rel:
            raise StoreError(f"{name!r} is not a name a blob can have here")
        return self.root / rel

    @contextlib.asynccontextmanager
    async def open(self, name: str) -> AsyncIterator[DirReader | None]:
        try:
            path = self.path(name)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, StoreError):
            yield None
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                yield None
                return
            etag = _getxattr(fd, XATTR_ETAG) or f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"
            ctype = _getxattr(fd, XATTR_TYPE) or DEFAULT_CONTENT_TYPE
            yield DirReader(fd, BlobInfo(st.st_size, etag, ctype))
        finally:
            os.close(fd)

    async def put(self, name: str, chunks: AsyncIterable[bytes], content_type: str) -> BlobInfo:
        path = self.path(name)
        try:
            await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise StoreError(f"a blob is in the way of {name}") from exc
        if path.is_dir():
            raise StoreError(f"{name} is a directory of blobs")
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="put-")
        try:
            digest = hashlib.sha256()
            size = 0
            async for chunk in rechunk(chunks):
                digest.update(chunk)
                size += len(chunk)
                await asyncio.to_thread(os.write, fd, chunk)
            info = BlobInfo(size, digest.hexdigest(), content_type)
            _setxattrs(fd, info)
            os.fchmod(fd, 0o644)
            await asyncio.to_thread(os.fsync, fd)
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                # a DELETE removed the (then empty) directory meanwhile
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        await asyncio.to_thread(_fsync_dir, path.parent)
        return info

    async def delete(self, name: str) -> bool:
        try:
            path = self.path(name)
            if path.is_dir():
                return False
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, StoreError):
            return False
        # empty directories left behind go too (another PUT may be filling one: then it stays)
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return True

    async def check(self) -> None:
        if not os.access(self.tmp, os.W_OK):
            raise OSError(f"{self.tmp} is not writable")

    async def close(self) -> None:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
