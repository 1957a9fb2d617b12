"""The layer store: fetches a job's squashfs layers into a local cache, verifying each against its
mountspec's size and sha512_256, and mounts each layer read-only once, shared by every job that
uses it (reference-counted).

Cache: `<cache_dir>/<id>.squashfs` with a sidecar `<id>.sha512_256` written after the hash was
checked, so a cache hit costs a stat, not a re-hash. Mounts: `<mount_dir>/<id>`, loop-mounted by
`mount -o loop` (an auto-clearing loop device) and unmounted with `umount -d`, so no loop device
outlives its mount. After a daemon restart, `cleanup_stale` removes mounts no job needs and
`adopt` takes over those that running jobs still use.

Sources: a `file://` URL may name only a regular file under the store's image directories
(`limits.image_file`); a download never keeps more than the mountspec's `size` and is abandoned
when the server sends nothing for `read_timeout` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import aiohttp
import aiohttp.abc

from flynn_host import discoverd_resolver, limits
from flynn_host.runtime.images import file_sha512_256, sha512_256
from flynn_host.types import MountSpec

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Layer ids name files and mount points, so "." and ".." (which MountSpec's pattern allows) and
# other dot-names are refused here.
LAYER_ID_RE = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}")


class LayerError(Exception):
    """A layer could not be fetched, verified, mounted or unmounted."""

    def __init__(self, layer_id: str, message: str) -> None:
        super().__init__(message)
        self.layer_id = layer_id


class _Partial:
    """A layer being copied or downloaded into the cache: a temporary file, hashed and counted
    as it is written, and refused as soon as it grows past the expected size."""

    def __init__(self, cache_dir: Path, spec: MountSpec) -> None:
        self.spec = spec
        fd, name = tempfile.mkstemp(dir=cache_dir, prefix=f".{spec.id}.", suffix=".part")
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")
        self.hash = sha512_256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.spec.size:
            raise LayerError(
                self.spec.id,
                f"layer {self.spec.id} from {self.spec.url}: size exceeds the expected "
                f"{self.spec.size} bytes",
            )
        self.hash.update(chunk)
        self.file.write(chunk)

    def copy_from(self, src: BinaryIO) -> None:
        with src:
            while chunk := src.read(CHUNK):
                self.write(chunk)

    def check(self) -> None:
        spec = self.spec
        if self.size != spec.size:
            raise LayerError(
                spec.id, f"layer {spec.id} from {spec.url}: size {self.size}, expected {spec.size}"
            )
        digest = self.hash.hexdigest()
        if digest != spec.sha512_256:
            raise LayerError(
                spec.id,
                f"layer {spec.id} from {spec.url}: sha512_256 {digest}, expected {spec.sha512_256}",
            )

    def commit(self, dest: Path) -> None:
        self.file.close()
        os.replace(self.path, dest)

    def discard(self) -> None:
        """Close and delete the temporary file unless it was committed."""
        self.file.close()
        self.path.unlink(missing_ok=True)


def _unescape_mountinfo(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[str]:
    """Mount points in this process's mount namespace (duplicates if mounts are stacked)."""
    with open("/proc/self/mountinfo") as f:
        return [_unescape_mountinfo(line.split()[4]) for line in f if line.strip()]


def _check_id(layer_id: str) -> None:
    if not LAYER_ID_RE.fullmatch(layer_id):
        raise LayerError(layer_id, f"invalid layer id {layer_id!r}")


async def _run(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


class LayerStore:
    """Fetch, verify, mount and share read-only squashfs layers."""

    def __init__(
        self,
        cache_dir: Path,
        mount_dir: Path,
        image_dirs: Iterable[Path] = (),
        read_timeout: float = limits.LAYER_READ_TIMEOUT,
    ) -> None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        Path(mount_dir).mkdir(parents=True, exist_ok=True)
        # Resolved, because the kernel reports mount points by their real path.
        self.cache_dir = Path(cache_dir).resolve()
        self.mount_dir = Path(mount_dir).resolve()
        # where file:// layers may come from: the image directories, and this cache (the
        # image store names imported layers by their cache files)
        self.image_dirs = [*map(Path, image_dirs), self.cache_dir]
        self.read_timeout = read_timeout
        self._fetch_locks: dict[str, asyncio.Lock] = {}
        self._mount_locks: dict[str, asyncio.Lock] = {}
        # layer id -> number of holders; an entry exists exactly while this store owns a mount
        self._refs: dict[str, int] = {}
        # layers whose cached bytes this process has hashed (once per process, see fetch)
        self._verified: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        # how HTTP downloads resolve names (the daemon sets discoverd's, for `*.discoverd`)
        self.resolver: aiohttp.abc.AbstractResolver | None = None

    def path(self, layer_id: str) -> Path:
        return self.cache_dir / f"{layer_id}.squashfs"

    def mount_point(self, layer_id: str) -> Path:
        return self.mount_dir / layer_id

    def refcount(self, layer_id: str) -> int:
        return self._refs.get(layer_id, 0)

    def check_url(self, url: str) -> None:
        """Raise `limits.FileRefused` if `url` is a `file://` URL this store would not read
        (one outside the image directories); say nothing of other URLs."""
        if url.startswith("file:"):
            limits.image_file(limits.file_url_path(url), self.image_dirs)

    # --- fetching ---------------------------------------------------------------------------

    async def fetch(self, spec: MountSpec) -> Path:
        """Return the verified cache file of `spec`'s layer, copying or downloading it first if
        needed. Concurrent fetches of one layer share one download."""
        _check_id(spec.id)
        async with self._fetch_locks.setdefault(spec.id, asyncio.Lock()):
            dest = self.path(spec.id)
            state = self._cache_state(spec)
            if state == "hit" and spec.id not in self._verified:
                # the sidecar says it was right once; the first use in this process checks the
                # bytes again, so a layer corrupted on disk is refused, not mounted
                if await asyncio.to_thread(file_sha512_256, dest) == spec.sha512_256:
                    self._verified.add(spec.id)
                else:
                    log.warning("cached layer %s is corrupted: fetching it again", spec.id)
                    self._sidecar(spec.id).unlink(missing_ok=True)
                    dest.unlink(missing_ok=True)
                    state = "miss"
            if state == "hit":
                return dest
            # The right size but no matching sidecar (placed by hand, or a crash before the
            # sidecar was written): hash it once rather than download it again.
            if state == "unverified" and (
                await asyncio.to_thread(file_sha512_256, dest) == spec.sha512_256
            ):
                self._write_sidecar(spec.id, spec.sha512_256)
                self._verified.add(spec.id)
                return dest
            if urlparse(spec.url).path == str(dest):
                # the cache file was the only copy: nothing to fetch it again from
                raise LayerError(spec.id, f"layer {spec.id} is missing or corrupted in {dest}")
            part = _Partial(self.cache_dir, spec)
            try:
                await self._download(spec, part)
                part.check()
                # The sidecar vouches for the file, so it goes before the file is replaced and
                # comes back after: a crash in between leaves "unverified", never a false hit.
                self._sidecar(spec.id).unlink(missing_ok=True)
                part.commit(dest)
                self._write_sidecar(spec.id, spec.sha512_256)
                self._verified.add(spec.id)
            finally:
                part.discard()
            return dest

    def _sidecar(self, layer_id: str) -> Path:
        return self.cache_dir / f"{layer_id}.sha512_256"

    def _write_sidecar(self, layer_id: str, digest: str) -> None:
        tmp = self.cache_dir / f".{layer_id}.sha512_256.tmp"
        tmp.write_text(digest + "\n")
        os.replace(tmp, self._sidecar(layer_id))

    def _cache_state(self, spec: MountSpec) -> str:
        """The cached file is a "hit" (verified before), "unverified" (right size) or a "miss"."""
        try:
            if self.path(spec.id).stat().st_size != spec.size:
                return "miss"
        except FileNotFoundError:
            return "miss"
        with contextlib.suppress(FileNotFoundError):
            if self._sidecar(spec.id).read_text().strip() == spec.sha512_256:
                return "hit"
        return "unverified"

    def _local_copy(self, spec: MountSpec) -> Path | None:
        """The same layer in one of this host's image directories (`<dir>/layers/<id>`), if
        there: an image made of the host's own images plus a layer from elsewhere (a slug
        app: slugrunner's layers and the slug's) then downloads only what the host lacks.
        The copy is checked against the hash like any download."""
        for directory in self.image_dirs[:-1]:  # the last one is this cache
            candidate = directory / "layers" / f"{spec.id}.squashfs"
            with contextlib.suppress(OSError):
                if candidate.is_file() and candidate.stat().st_size == spec.size:
                    return candidate
        return None

    async def _download(self, spec: MountSpec, part: _Partial) -> None:
        url = urlparse(spec.url)
        local = self._local_copy(spec) if url.scheme != "file" else None
        if local is not None:
            try:
                src = limits.open_image_file(local, self.image_dirs)
            except (limits.FileRefused, OSError):
                pass  # not usable after all: fetch it from its URL
            else:
                await asyncio.to_thread(part.copy_from, src)
                return
        if url.scheme == "file":
            try:
                src = limits.open_image_file(limits.file_url_path(spec.url), self.image_dirs)
            except FileNotFoundError:
                raise LayerError(spec.id, f"layer {spec.id} not found at {spec.url}") from None
            except (limits.FileRefused, OSError) as exc:
                raise LayerError(spec.id, f"layer {spec.id}: {exc}") from None
            await asyncio.to_thread(part.copy_from, src)
        elif url.scheme in ("http", "https"):
            await self._http_download(spec, part)
        else:
            raise LayerError(spec.id, f"layer {spec.id}: unsupported URL {spec.url}")

    async def _http_download(self, spec: MountSpec, part: _Partial) -> None:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=30, sock_read=self.read_timeout
            )
            self._session = aiohttp.ClientSession(
                timeout=timeout, connector=discoverd_resolver.connector(self.resolver)
            )
        try:
            async with self._session.get(spec.url) as resp:
                if resp.status == 404:
                    raise LayerError(spec.id, f"layer {spec.id} not found at {spec.url}")
                if resp.status != 200:
                    raise LayerError(
                        spec.id, f"layer {spec.id}: GET {spec.url} returned {resp.status}"
                    )
                if (resp.content_length or 0) > spec.size:
                    raise LayerError(
                        spec.id,
                        f"layer {spec.id} from {spec.url}: size {resp.content_length} exceeds "
                        f"the expected {spec.size} bytes",
                    )
                # Chunks are small, so hashing them here does not stall the event loop.
                async for chunk in resp.content.iter_chunked(1 << 16):
                    part.write(chunk)
        except TimeoutError as e:  # aiohttp's: no connection, or nothing read for a while
            raise LayerError(
                spec.id,
                f"layer {spec.id}: downloading {spec.url}: timed out "
                f"(read timeout {self.read_timeout:g} s): {e}",
            ) from e
        except (aiohttp.ClientError, ValueError) as e:  # ValueError: a URL yarl cannot parse
            raise LayerError(spec.id, f"layer {spec.id}: downloading {spec.url}: {e}") from e

    # --- mounting ---------------------------------------------------------------------------

    async def acquire(self, spec: MountSpec) -> Path:
        """Fetch and mount `spec`'s layer read-only (once, however many jobs use it) and return
        its mount point. Pair every acquire with a `release`."""
        _check_id(spec.id)
        async with self._mount_locks.setdefault(spec.id, asyncio.Lock()):
            if spec.id in self._refs:
                self._refs[spec.id] += 1
                return self.mount_point(spec.id)
            await self._mount(spec.id, await self.fetch(spec))
            self._refs[spec.id] = 1
            return self.mount_point(spec.id)

    async def release(self, layer_id: str) -> None:
        """Drop one reference; unmount the layer when none is left. Unknown ids are ignored, so
        clean-up paths may release what they are not sure they acquired."""
        async with self._mount_locks.setdefault(layer_id, asyncio.Lock()):
            if layer_id not in self._refs:
                log.warning("release of layer %s, which is not mounted by this store", layer_id)
                return
            self._refs[layer_id] -= 1
            if self._refs[layer_id] <= 0:
                # Forget it before unmounting: if the umount fails, close() and cleanup_stale at
                # the next start retry, and a new acquire mounts afresh.
                del self._refs[layer_id]
                await self._unmount(layer_id)

    async def adopt(self, layers: Iterable[str | MountSpec]) -> None:
        """Take over layers that jobs still use after a daemon restart: one reference per item
        (repeat an id for each job that uses it). Layers already mounted are not remounted;
        others are mounted from the cache (or fetched, when given a MountSpec)."""
        items = list(layers)
        counts = Counter(x if isinstance(x, str) else x.id for x in items)
        specs = {x.id: x for x in items if isinstance(x, MountSpec)}
        mounted = set(mount_points())
        for layer_id, n in counts.items():
            _check_id(layer_id)
            async with self._mount_locks.setdefault(layer_id, asyncio.Lock()):
                if layer_id not in self._refs and str(self.mount_point(layer_id)) not in mounted:
                    if layer_id in specs:
                        file = await self.fetch(specs[layer_id])
                    else:
                        file = self.path(layer_id)
                        if not file.is_file():
                            raise LayerError(layer_id, f"layer {layer_id} is not in {file}")
                    await self._mount(layer_id, file)
                self._refs[layer_id] = self._refs.get(layer_id, 0) + n

    async def close(self) -> None:
        """Unmount every layer this store mounted or adopted; close the HTTP session."""
        errors = []
        for layer_id in list(self._refs):
            del self._refs[layer_id]
            try:
                await self._unmount(layer_id)
            except LayerError as e:
                errors.append(e)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if errors:
            raise errors[0]

    async def cleanup_stale(self, keep: Iterable[str] = ()) -> list[str]:
        """At start-up: unmount mounts under mount_dir whose layer is not in `keep`, remove
        empty mount directories and partial downloads. Return the unmounted layer ids."""
        keep = set(keep)
        stale = []
        for point in dict.fromkeys(mount_points()):
            path = Path(point)
            if path.parent == self.mount_dir and path.name not in keep:
                stale.append(path.name)
        for layer_id in stale:
            self._refs.pop(layer_id, None)
            await self._unmount(layer_id)
        mounted = set(mount_points())
        for entry in self.mount_dir.iterdir():
            if entry.is_dir() and str(entry) not in mounted:
                with contextlib.suppress(OSError):
                    entry.rmdir()  # only if empty: never delete into a layer
        for part in self.cache_dir.glob(".*.part"):
            part.unlink(missing_ok=True)
        return stale

    async def _mount(self, layer_id: str, file: Path) -> None:
        point = self.mount_point(layer_id)
        point.mkdir(exist_ok=True)
        if str(point) in mount_points():
            return  # left mounted by an earlier run of the daemon: the same content-named layer
        rc, out = await _run("mount", "-t", "squashfs", "-o", "loop,ro", str(file), str(point))
        if rc != 0:
            with contextlib.suppress(OSError):
                point.rmdir()
            raise LayerError(layer_id, f"layer {layer_id}: mounting {file} failed: {out}")

    async def _unmount(self, layer_id: str) -> None:
        point = self.mount_point(layer_id)
        # Stacked mounts (a crashed run mounted twice) come off one at a time.
        while str(point) in mount_points():
            rc, out = await _run("umount", "-d", str(point))
            if rc != 0:
                raise LayerError(layer_id, f"layer {layer_id}: unmounting {point} failed: {out}")
        with contextlib.suppress(OSError):
            point.rmdir()

    def remove(self, layer_id: str) -> None:
        """Delete a cached layer that is not mounted (for garbage collection)."""
        if layer_id in self._refs:
            raise LayerError(layer_id, f"layer {layer_id} is mounted")
        self.path(layer_id).unlink(missing_ok=True)
        self._sidecar(layer_id).unlink(missing_ok=True)
