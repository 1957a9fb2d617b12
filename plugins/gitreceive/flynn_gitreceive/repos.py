"""App repositories: bare git repositories that live in the blobstore between requests (a tar
at `/repos/<app id>.tar`), so any gitreceive process serves any push; and the per-app lock
that serialises pushes across processes.

A request restores the repository into a scratch directory, git works on it there, and a push
that changed a ref stores it back. The lock is a PostgreSQL advisory lock (held on its own
connection, so a process that dies releases it) when gitreceive has a database, else a lock
of this process only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from flynn_gitreceive.types import REPO_PATH

CHUNK = 1 << 16
# the largest pack a push may send (GITRECEIVE_MAX_PUSH): what gitreceive's and the build's
# temporary disks hold with room to spare
MAX_PUSH = 1 << 30


class StoreError(Exception):
    """The blobstore did not answer as expected."""


class RepoStore:
    def __init__(
        self, blobstore_url: str, scratch: Path | None = None, max_push: int = MAX_PUSH
    ) -> None:
        self.blobstore_url = blobstore_url.rstrip("/")
        self.max_push = max_push
        self.scratch = scratch
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def url(self, app_id: str) -> str:
        return self.blobstore_url + REPO_PATH.format(app_id=app_id)

    @contextlib.asynccontextmanager
    async def checkout(self, app_id: str) -> AsyncIterator[Path]:
        """The app's bare repository in a scratch directory (a new one for a first push),
        removed afterwards."""
        work = Path(tempfile.mkdtemp(prefix="repo-", dir=self.scratch))
        try:
            repo = work / "repo.git"
            archive = work / "repo.tar"
            if await self._download(self.url(app_id), archive):
                await asyncio.to_thread(extract, archive, repo)
                archive.unlink()
            else:
                await _git("init", "--quiet", "--bare", str(repo))
            # pushes must not be refused for being non-fast-forward into the bare repo only
            # because of its defaults, and git's automatic gc must not run inside a request
            await _git("-C", str(repo), "config", "gc.auto", "0")
            await _git("-C", str(repo), "config", "receive.fsckObjects", "true")
            await _git("-C", str(repo), "config", "http.receivepack", "true")
            # git's own clear refusal of a push too big to build ("pack exceeds maximum
            # allowed size"), before anything is stored
            await _git("-C", str(repo), "config", "receive.maxInputSize", str(self.max_push))
            yield repo
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def save(self, app_id: str, repo: Path) -> None:
        """Store the repository (its hooks are ours and not kept)."""
        archive = repo.parent / "upload.tar"
        await asyncio.to_thread(_pack, repo, archive)
        try:
            async with self._http().put(
                self.url(app_id),
                data=_file_chunks(archive),
                headers={"Content-Type": "application/x-tar"},
            ) as resp:
                if resp.status != 200:
                    raise StoreError(f"PUT {self.url(app_id)}: HTTP {resp.status}")
        finally:
            archive.unlink(missing_ok=True)

    async def delete(self, app_id: str) -> None:
        async with self._http().delete(self.url(app_id)) as resp:
            if resp.status not in (200, 404):
                raise StoreError(f"DELETE {self.url(app_id)}: HTTP {resp.status}")

    async def _download(self, url: str, dest: Path) -> bool:
        async with self._http().get(url) as resp:
            if resp.status == 404:
                return False
            if resp.status != 200:
                raise StoreError(f"GET {url}: HTTP {resp.status}")
            with dest.open("wb") as f:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    f.write(chunk)
        return True


async def refs(repo: Path) -> str:
    """Every ref and what it points at: what a push changed, if this differs after it."""
    return await _git("-C", str(repo), "for-each-ref", "--format=%(refname) %(objectname)")


async def _git(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise StoreError(f"git {args[0]}: {err.decode(errors='replace').strip()}")
    return out.decode()


def extract(archive: Path, dest: Path) -> None:
    """Unpack a repository tar we made, refusing anything a repository never holds (absolute
    paths, `..`, links, devices): it comes back over the network. (Python 3.11.2, the
    components image's, has no `extractall(filter=...)`.)"""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                raise StoreError(f"{archive.name}: refusing member {m.name!r}")
            m.mode &= 0o755
        tar.extractall(dest, members=members)


def _pack(repo: Path, archive: Path) -> None:
    with tarfile.open(archive, "w") as tar:
        for entry in sorted(repo.iterdir()):
            if entry.name != "hooks":
                tar.add(entry, arcname=entry.name)


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, CHUNK * 16):
            yield chunk


# --- the per-app lock ---------------------------------------------------------------------------


class PushLocks:
    """One push per app at a time, across every gitreceive process sharing the database."""

    def __init__(self, dsn: str | None, use_database: bool) -> None:
        self.dsn = dsn
        self.use_database = use_database
        self._local: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def hold(self, app_id: str, on_wait: Any = None) -> AsyncIterator[None]:
        """Hold the app's lock; `on_wait()` is awaited once if another push holds it."""
        local = self._local.setdefault(app_id, asyncio.Lock())
        if local.locked() and on_wait is not None:
            await on_wait()
            on_wait = None
        async with local:
            if not self.use_database:
                yield
                return
            import asyncpg

            key = int.from_bytes(
                hashlib.sha256(b"gitreceive:" + app_id.encode()).digest()[:8], "big", signed=True
            )
            conn = await asyncpg.connect(self.dsn)
            try:
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                    if on_wait is not None:
                        await on_wait()
                    await conn.execute("SELECT pg_advisory_lock($1)", key)
                yield
            finally:
                # closing the connection releases the lock whatever happened
                await conn.close(timeout=5)
